"""Exactly-once database effects: the key is recorded in the same transaction as the write.

Guarantee: a `transactional` node's database effect happens exactly once per key, because the
key's row and the user's writes commit or roll back together; a repeat finds the row and
returns the stored result without running. One core, here, runs every driver the same way
(claim the key, run, store the result, commit); `_drivers` tells which driver an object
belongs to, and each driver module only opens and ends its transactions.

Transient database errors (locked, serialization failure, deadlock, lock timeout, a dropped
connection) roll the transaction back and retry the whole of it. A rolled-back transaction
changed nothing, and a commit whose outcome is unknown is settled by the key: the retry's
first statement claims the key again (on a fresh connection where a pool or SQLAlchemy gives
one), finds it committed and replays, or finds it absent and runs; a commit still in flight
holds the key's row, so the claim waits for its outcome. Every error is therefore safe to retry.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from .._context import context, current_or_none
from .._errors import ConfigError
from .._events import emit
from .._node import Node, node
from .._policies import Effect, Retry, Seconds, Timeout
from .._spec import NodeSpec
from ..idempotency._claim import MISMATCH
from ..idempotency._keyed import refusal_error, replayed
from ..idempotency._policy import Idempotency, IdempotencyPlan
from ..idempotency._store import RecordKey
from ._dialect import check_table, deadline_ms
from ._drivers import Driver, driver_of
from ._effects import AsyncTx, Effects, Tx

__all__ = ["transactional"]

P = ParamSpec("P")
R = TypeVar("R")


def _replayed(plan: IdempotencyPlan, key: RecordKey, row: tuple[Any, ...], fingerprint: str) -> Any:
    """The outcome a committed key row replays; a different payload is a mismatch."""
    stored_fp, result, error = row
    name = plan.node
    ctx = current_or_none()
    run_id, attempt = (ctx.run_id, ctx.attempt) if ctx is not None else (None, 0)
    if stored_fp != fingerprint:
        emit("idempotency.mismatch", name, run_id, attempt, key=key.short)
        raise refusal_error(MISMATCH, name, key)
    if ctx is not None:
        ctx.replayed = True
    emit("idempotency.replayed", name, run_id, attempt, key=key.short)
    emit("node.replayed", name, run_id, attempt, key=key.short)
    value, failure = replayed(plan, name, key, result, error)
    if failure is not None:
        raise failure
    return value


def _connection_of(
    plan: IdempotencyPlan, connection: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    conn = kwargs.get(connection)
    if conn is None and args:
        try:
            conn = plan.signature.bind_partial(*args, **kwargs).arguments.get(connection)
        except TypeError:
            conn = None
    if conn is None:
        raise ConfigError(
            f"node {plan.node!r}: no connection passed as {connection!r}",
            node=plan.node,
            option=connection,
        )
    return conn


def transactional(
    *,
    name: str,
    key: Callable[..., Any] | None = None,
    connection: str = "db",
    retry: Retry | bool | None = True,
    timeout: Timeout | Seconds | None = None,
    version: str | int | None = None,
    scope: str | Callable[..., Any] | None = None,
    fields: list[str] | None = None,
    table: str = "nodekit_sql_effects",
) -> Callable[[Callable[P, R]], Node[P, R]]:
    """Make a function a node whose database effect happens exactly once per key.

    The function takes its database handle as the parameter named by `connection` (typically
    ``db: Session = nk.resource()``). The node opens a transaction on it, records the key
    (`key` over the arguments, as in `nk.Idempotency`), runs the function, stores its JSON
    result and commits — all or nothing. A repeat with the same key returns the stored result
    without running; the same key with another payload raises `IdempotencyMismatch`.

    Handles: ``sqlite3`` and psycopg 3 connections; SQLAlchemy ``Session`` and ``Connection``
    (PostgreSQL or SQLite; ORM objects added to the session commit with the key); asyncpg
    connections, psycopg ``AsyncConnection`` and SQLAlchemy ``AsyncSession`` /
    ``AsyncConnection`` for ``async def`` nodes. Pools lend one connection per attempt and
    get it back: a SQLAlchemy ``Engine`` / ``AsyncEngine`` (the function receives a
    ``Connection``), a ``sessionmaker`` / ``async_sessionmaker`` (a ``Session``),
    ``psycopg_pool.ConnectionPool`` / ``AsyncConnectionPool`` and ``asyncpg.Pool`` (a
    connection). A session or connection passed in must be idle (not inside a transaction,
    no pending ORM changes): a busy one is a `ConfigError`, since its pending work would
    otherwise commit with the key.

    The remaining deadline becomes PostgreSQL's ``statement_timeout`` (per transaction, never
    raising the session's own) and a pool's checkout timeout. With a `timeout`, a sync node's
    attempt runs in a worker thread, so a ``sqlite3`` connection must be opened with
    ``check_same_thread=False``; an attempt abandoned at its timeout is not stopped and may
    still commit (once, by its key).
    """
    check_table(table, "table")
    effects = Effects(table)
    settings: dict[str, Any] = {
        "name": name,
        "key": key,
        "connection": connection,
        "retry": retry,
        "timeout": timeout,
        "version": version,
        "scope": scope,
        "fields": fields,
        "table": table,
    }

    def decorate(fn: Callable[P, R]) -> Node[P, R]:
        _check_connection_param(fn, name, connection)
        holder: dict[str, IdempotencyPlan] = {}
        wrapped = _runner(fn, holder, effects, connection)
        result: Any = node(name=name, retry=retry, timeout=timeout, effect=Effect.WRITE)(wrapped)
        policy = Idempotency(key=key, scope=scope, fields=fields, version=version, store=_NoStore())
        holder["plan"] = _plan(result.spec, policy, connection)
        # A plain node's options() would rebuild a node that is not transactional (and not
        # replay-safe): rebuild through transactional instead.
        result.options = functools.partial(_options, settings, fn)
        return result  # type: ignore[no-any-return]

    return decorate


def _check_connection_param(fn: Callable[..., Any], name: str, connection: str) -> None:
    """A `ConfigError` at decoration time unless `fn` has the parameter `connection`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if connection not in params:
        raise ConfigError(
            f"node {name!r}: nodekit.sql.transactional needs a parameter {connection!r} for "
            "the connection (e.g. `*, db: sqlite3.Connection = nk.resource()`)",
            node=name,
            option="connection",
        )


def _runner(
    fn: Callable[..., Any],
    holder: dict[str, IdempotencyPlan],
    effects: Effects,
    connection: str,
) -> Callable[..., Any]:
    """What the node calls: `fn` once per key, under the plan `holder` receives after decoration."""
    if inspect.iscoroutinefunction(fn):

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            return await _once_async(holder["plan"], effects, connection, fn, args, kwargs)

        wrapped: Callable[..., Any] = run_async
    else:

        def run_sync(*args: Any, **kwargs: Any) -> Any:
            return _once_sync(holder["plan"], effects, connection, fn, args, kwargs)

        wrapped = run_sync
    functools.update_wrapper(wrapped, fn)
    return wrapped


def _plan(spec: NodeSpec, policy: Idempotency, connection: str) -> IdempotencyPlan:
    """The node's key plan: replay-safe, with the connection kept out of the key's arguments."""
    spec.replay_safe = True
    plan = IdempotencyPlan(policy, spec)
    plan.resource_params = plan.resource_params | {connection}
    plan.params.pop(connection, None)
    return plan


def _options(settings: dict[str, Any], fn: Callable[..., Any], **changes: Any) -> Any:
    """A re-configured copy of a transactional node (``place.options(retry=None)``)."""
    unknown = sorted(set(changes) - set(settings))
    if unknown:
        raise ConfigError(
            f"node {settings['name']!r}: unknown option(s) {unknown}; options are {list(settings)}",
            node=settings["name"],
            option=unknown[0],
        )
    return transactional(**{**settings, **changes})(fn)


class _NoStore:
    """Placeholder: a transactional node keeps its keys in the user's database.

    It passes the policy's store check whatever operations a store has to offer; none of
    them is ever called.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def never(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
            raise NotImplementedError(f"nodekit.sql keeps no store ({name})")

        return never


def _driver(plan: IdempotencyPlan, conn: Any, connection: str, is_async: bool) -> Driver:
    """The connection's driver, which must match the node's flavour (sync or async)."""
    driver = driver_of(conn)
    if driver.is_async and not is_async:
        raise ConfigError(
            f"node {plan.node!r}: a {driver.label} needs an `async def` node",
            node=plan.node,
            option=connection,
        )
    if is_async and not driver.is_async:
        raise ConfigError(
            f"node {plan.node!r}: async transactional nodes need an async connection "
            "(psycopg.AsyncConnection or its pool, a SQLAlchemy AsyncSession, AsyncConnection or "
            f"AsyncEngine, asyncpg), got a {driver.label}",
            node=plan.node,
            option=connection,
        )
    return driver


def _lent(
    plan: IdempotencyPlan, connection: str, args: Any, kwargs: Any, handle: Any
) -> tuple[Any, Any]:
    """The call's arguments with the connection a pool lent in place of the pool."""
    if connection in kwargs:
        return args, {**kwargs, connection: handle}
    bound = plan.signature.bind_partial(*args, **kwargs)
    bound.arguments[connection] = handle
    return bound.args, bound.kwargs


def _once_sync(
    plan: IdempotencyPlan,
    effects: Effects,
    connection: str,
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
) -> Any:
    conn = _connection_of(plan, connection, args, kwargs)
    driver = _driver(plan, conn, connection, False)
    found = plan.key_for(args, kwargs)
    if found is None and not driver.pooled:
        return fn(*args, **kwargs)
    tx: Tx
    with driver.open(conn, effects) as tx:
        if driver.pooled:
            args, kwargs = _lent(plan, connection, args, kwargs, tx.handle)
        if found is None:
            return fn(*args, **kwargs)
        key, fingerprint = found
        ctx = context()
        ctx.idempotency_key = key.digest
        sql = tx.sql
        if tx.postgres:
            limit = deadline_ms()
            if limit is not None:
                tx.run(sql.limit, (str(limit), limit))
        if tx.run(sql.insert, (key.namespace, key.digest, fingerprint, time.time())) != 1:
            row = tx.row(sql.select, (key.namespace, key.digest))
            return _replayed(plan, key, row, fingerprint)
        value = fn(*args, **kwargs)
        text, error, unstored = plan.results.encode(value)
        tx.run(sql.update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    if unstored is not None:  # warned once committed: a warning filter may raise
        plan.results.warn(unstored)
    return value


async def _once_async(
    plan: IdempotencyPlan,
    effects: Effects,
    connection: str,
    fn: Callable[..., Awaitable[Any]],
    args: Any,
    kwargs: Any,
) -> Any:
    conn = _connection_of(plan, connection, args, kwargs)
    driver = _driver(plan, conn, connection, True)
    found = plan.key_for(args, kwargs)
    if found is None and not driver.pooled:
        return await fn(*args, **kwargs)
    tx: AsyncTx
    async with driver.open(conn, effects) as tx:
        if driver.pooled:
            args, kwargs = _lent(plan, connection, args, kwargs, tx.handle)
        if found is None:
            return await fn(*args, **kwargs)
        key, fingerprint = found
        ctx = context()
        ctx.idempotency_key = key.digest
        sql = tx.sql
        if tx.postgres:
            limit = deadline_ms()
            if limit is not None:
                await tx.run(sql.limit, (str(limit), limit))
        if await tx.run(sql.insert, (key.namespace, key.digest, fingerprint, time.time())) != 1:
            row = await tx.row(sql.select, (key.namespace, key.digest))
            return _replayed(plan, key, row, fingerprint)
        value = await fn(*args, **kwargs)
        text, error, unstored = plan.results.encode(value)
        await tx.run(sql.update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    if unstored is not None:  # warned once committed: a warning filter may raise
        plan.results.warn(unstored)
    return value
