"""Exactly-once database effects: the key is recorded in the same transaction as the write.

Guarantee: a `transactional` node's database effect happens exactly once per key, because the
key's row and the user's writes commit or roll back together; a repeat finds the row and
returns the stored result without running. Works with `sqlite3` and psycopg 3 connections
(sync), and psycopg's `AsyncConnection` for ``async def`` nodes.

Transient database errors (locked, serialization failure, deadlock) roll the transaction back
and retry the whole of it; since a rolled-back transaction changed nothing, and a commit that
may or may not have happened is resolved by the key, every error is safe to retry.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
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
from ._dialect import (
    LIMIT,
    apg_tx,
    check_table,
    deadline_ms,
    dialect_of,
    is_async_connection,
    pg_idle,
    pg_tx,
    sqlite_tx,
)

__all__ = ["transactional"]

P = ParamSpec("P")
R = TypeVar("R")


class _Effects:
    """The effects table of one dialect: (namespace, key_digest) -> fingerprint, result.

    SQLite creates it inside each call's own transaction (a local statement, cheap and always
    true to the file the connection has open). PostgreSQL creates it once per connection in a
    transaction of its own, serialised by an advisory lock so that two processes starting
    together do not race on the catalog; the connections already set up are held weakly, so
    a new connection that reuses a closed one's ``id`` is set up again.
    """

    def __init__(self, table: str) -> None:
        self.table = table
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()

    def ddl(self, dialect: str) -> str:
        created = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (namespace TEXT NOT NULL, "
            "key_digest TEXT NOT NULL, fingerprint TEXT NOT NULL, result TEXT, error TEXT, "
            f"created_at {created} NOT NULL, PRIMARY KEY (namespace, key_digest))"
        )

    def ensure_sync(self, conn: Any) -> None:
        if conn in self._ready:
            return
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            cur.execute(self.ddl("postgres"))
        self._ready.add(conn)

    async def ensure_async(self, conn: Any) -> None:
        if conn in self._ready:
            return
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await cur.execute(self.ddl("postgres"))
        self._ready.add(conn)

    def sql(self, dialect: str) -> tuple[str, str, str]:
        mark = "?" if dialect == "sqlite" else "%s"
        insert = (
            f"INSERT INTO {self.table} (namespace, key_digest, fingerprint, created_at) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}) ON CONFLICT (namespace, key_digest) DO NOTHING"
        )
        select = (
            f"SELECT fingerprint, result, error FROM {self.table} "
            f"WHERE namespace = {mark} AND key_digest = {mark}"
        )
        update = (
            f"UPDATE {self.table} SET result = {mark}, error = {mark} "
            f"WHERE namespace = {mark} AND key_digest = {mark}"
        )
        return insert, select, update


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

    The function takes its connection as the keyword-only parameter named by `connection`
    (typically ``db: sqlite3.Connection = nk.resource()``). The node opens a transaction on
    it, records the key (`key` over the arguments, as in `nk.Idempotency`), runs the function,
    stores its JSON result and commits — all or nothing. A repeat with the same key returns
    the stored result without running; the same key with another payload raises
    `IdempotencyMismatch`. The connection must be idle (not inside a transaction): a busy
    one is a `ConfigError`, since its pending work would otherwise commit with the key.

    The remaining deadline becomes PostgreSQL's ``statement_timeout`` (per statement, never
    raising the session's own). With a `timeout`, a sync node's attempt runs in a worker
    thread, so a ``sqlite3`` connection must be opened with ``check_same_thread=False``; an
    attempt abandoned at its timeout is not stopped and may still commit (once, by its key).
    """
    check_table(table, "table")
    effects = _Effects(table)
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
    effects: _Effects,
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


def _once_sync(
    plan: IdempotencyPlan,
    effects: _Effects,
    connection: str,
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
) -> Any:
    conn = _connection_of(plan, connection, args, kwargs)
    dialect = dialect_of(conn)
    if is_async_connection(conn):
        raise ConfigError(
            f"node {plan.node!r}: a psycopg.AsyncConnection needs an `async def` node",
            node=plan.node,
            option=connection,
        )
    found = plan.key_for(args, kwargs)
    if found is None:
        return fn(*args, **kwargs)
    key, fingerprint = found
    ctx = context()
    ctx.idempotency_key = key.digest
    insert, select, update = effects.sql(dialect)
    if dialect == "sqlite":
        tx: Any = sqlite_tx(conn, effects.ddl(dialect))
    else:
        pg_idle(conn, "the effect and its key must commit together")
        effects.ensure_sync(conn)
        tx = pg_tx(conn)
    with tx as cur:
        if dialect == "postgres":
            limit = deadline_ms()
            if limit is not None:
                cur.execute(LIMIT, (str(limit), limit))
        cur.execute(insert, (key.namespace, key.digest, fingerprint, time.time()))
        if cur.rowcount != 1:
            row = cur.execute(select, (key.namespace, key.digest)).fetchone()
            return _replayed(plan, key, tuple(row), fingerprint)
        value = fn(*args, **kwargs)
        text, error, unstored = plan.results.encode(value)
        cur.execute(update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    if unstored is not None:  # warned once committed: a warning filter may raise
        plan.results.warn(unstored)
    return value


async def _once_async(
    plan: IdempotencyPlan,
    effects: _Effects,
    connection: str,
    fn: Callable[..., Awaitable[Any]],
    args: Any,
    kwargs: Any,
) -> Any:
    conn = _connection_of(plan, connection, args, kwargs)
    if dialect_of(conn) != "postgres" or not is_async_connection(conn):
        raise ConfigError(
            f"node {plan.node!r}: async transactional nodes need a psycopg.AsyncConnection, got "
            f"{type(conn).__qualname__}",
            node=plan.node,
            option=connection,
        )
    found = plan.key_for(args, kwargs)
    if found is None:
        return await fn(*args, **kwargs)
    key, fingerprint = found
    ctx = context()
    ctx.idempotency_key = key.digest
    insert, select, update = effects.sql("postgres")
    pg_idle(conn, "the effect and its key must commit together")
    await effects.ensure_async(conn)
    async with apg_tx(conn) as cur:
        limit = deadline_ms()
        if limit is not None:
            await cur.execute(LIMIT, (str(limit), limit))
        await cur.execute(insert, (key.namespace, key.digest, fingerprint, time.time()))
        if cur.rowcount != 1:
            row = await (await cur.execute(select, (key.namespace, key.digest))).fetchone()
            return _replayed(plan, key, tuple(row), fingerprint)
        value = await fn(*args, **kwargs)
        text, error, unstored = plan.results.encode(value)
        await cur.execute(update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    if unstored is not None:  # warned once committed: a warning filter may raise
        plan.results.warn(unstored)
    return value
