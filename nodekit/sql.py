"""Exactly-once database effects: the key is recorded in the same transaction as the write.

Guarantee: a `transactional` node's database effect happens exactly once per key, because the
key's row and the user's writes commit or roll back together; a repeat finds the row and
returns the stored result without running. Works with `sqlite3` and psycopg 3 connections
(sync), and psycopg's `AsyncConnection` for ``async def`` nodes.

Transient database errors (locked, serialization failure, deadlock) roll the transaction back
and retry the whole of it; since a rolled-back transaction changed nothing, and a commit that
may or may not have happened is resolved by the key, every error is safe to retry.

`Outbox` covers "write the row, then call the API": the message is written in the same
transaction as the row and dispatched afterwards, with a stable key, so a crash between the
two delays the call but never loses or duplicates it (when the API honours the key).
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from ._canonical import canonical_json, digest
from ._context import context, current_or_none
from ._errors import ConfigError
from ._events import emit
from ._node import Node, node
from ._policies import Effect, Retry, Seconds, Timeout
from ._sqlite import database_file, writer_lock
from .idempotency._claim import MISMATCH
from .idempotency._keyed import refusal_error, replayed
from .idempotency._policy import Idempotency, IdempotencyPlan
from .idempotency._store import RecordKey

__all__ = ["Message", "Outbox", "transactional"]

P = ParamSpec("P")
R = TypeVar("R")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _check_table(table: str, option: str) -> str:
    if not _IDENT.match(table):
        raise ConfigError(
            f"nodekit.sql: {option} {table!r} is not a plain SQL identifier", option=option
        )
    return table


def _dialect(conn: Any) -> str:
    module = type(conn).__module__.partition(".")[0]
    if module == "sqlite3":
        return "sqlite"
    if module == "psycopg":
        return "postgres"
    raise ConfigError(
        f"nodekit.sql supports sqlite3 and psycopg 3 connections, got {type(conn).__qualname__}",
        option="connection",
    )


def _is_async_connection(conn: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(conn, "execute", None))


def _sync_dialect(conn: Any, method: str, instead: str) -> str:
    """`_dialect` for an `Outbox` method that needs a sync connection (`instead` is the fix)."""
    dialect = _dialect(conn)
    if _is_async_connection(conn):
        raise ConfigError(
            f"nodekit.sql: Outbox.{method} got a psycopg.AsyncConnection; use {instead}",
            option="connection",
        )
    return dialect


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


def _sqlite_idle(conn: Any, what: str) -> None:
    if conn.in_transaction:
        raise ConfigError(
            f"nodekit.sql: the sqlite3 connection is already inside a transaction; {what}, "
            "so pass an idle connection",
            option="connection",
        )


@contextmanager
def _sqlite_tx(conn: Any, ddl: str) -> Iterator[Any]:
    """BEGIN IMMEDIATE ... COMMIT on an idle connection, yielding a plain-tuple cursor."""
    _sqlite_idle(conn, "the effect and its key must commit together")
    cur = conn.cursor()
    cur.row_factory = None  # the caller's row factory (dicts, Row) must not change our reads
    # this process's writers queue here rather than in SQLite's sleeping busy handler
    writer = writer_lock(database_file(cur))
    writer.acquire()
    try:
        # IMMEDIATE takes the write lock up front: a busy database fails here, before the
        # function runs, with "database is locked" (transient, retried).
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(ddl)
            yield cur
            conn.commit()
        except BaseException:
            # Also after a failed COMMIT ("database is locked" while readers finish): SQLite
            # keeps the transaction open then, and the retry needs an idle connection.
            if conn.in_transaction:
                conn.rollback()
            raise
    finally:
        writer.release()
        cur.close()


_BUSY = frozenset({"ACTIVE", "INTRANS", "INERROR"})


def _pg_idle(conn: Any, what: str) -> None:
    # A broken connection (UNKNOWN) is not a configuration error: psycopg raises its own
    # OperationalError when it is used, which the retry loop classifies.
    if conn.info.transaction_status.name in _BUSY:
        raise ConfigError(
            "nodekit.sql: the psycopg connection is busy or inside a transaction; "
            f"{what}, so pass an idle connection",
            option="connection",
        )


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


# Only ever lowers the session's statement_timeout (0 means none), in the transaction only.
_LIMIT = (
    "SELECT set_config('statement_timeout', %s, true) FROM pg_settings "
    "WHERE name = 'statement_timeout' AND (setting::bigint = 0 OR setting::bigint > %s)"
)


def _deadline_ms() -> int | None:
    """The remaining deadline as a statement_timeout, in milliseconds, or None.

    It ends a little before the node's deadline (a fifth of it, at most 100 ms), so that the
    server cancels the statement and rolls back before the client gives up on the attempt:
    the node then fails with the database's own `QueryCanceled`, and the connection is idle
    again, rather than still busy in an abandoned attempt.
    """
    ctx = current_or_none()
    remaining = ctx.remaining() if ctx is not None else None
    if remaining is None:
        return None
    return max(1, int((remaining - min(0.1, remaining * 0.2)) * 1000))


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
    _check_table(table, "table")
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
        holder: dict[str, IdempotencyPlan] = {}

        if inspect.iscoroutinefunction(fn):

            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await _once_async(holder["plan"], effects, connection, fn, args, kwargs)

            wrapped: Callable[..., Any] = run_async
        else:

            def run_sync(*args: Any, **kwargs: Any) -> Any:
                return _once_sync(holder["plan"], effects, connection, fn, args, kwargs)

            wrapped = run_sync
        functools.update_wrapper(wrapped, fn)
        result: Any = node(name=name, retry=retry, timeout=timeout, effect=Effect.WRITE)(wrapped)
        spec = result.spec
        spec.replay_safe = True
        plan = IdempotencyPlan(
            Idempotency(key=key, scope=scope, fields=fields, version=version, store=_NoStore()),
            spec,
        )
        plan.resource_params = plan.resource_params | {connection}
        plan.params.pop(connection, None)
        holder["plan"] = plan
        # A plain node's options() would rebuild a node that is not transactional (and not
        # replay-safe): rebuild through transactional instead.
        result.options = functools.partial(_options, settings, fn)
        return result  # type: ignore[no-any-return]

    return decorate


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
    dialect = _dialect(conn)
    if _is_async_connection(conn):
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
        tx: Any = _sqlite_tx(conn, effects.ddl(dialect))
    else:
        _pg_idle(conn, "the effect and its key must commit together")
        effects.ensure_sync(conn)
        tx = _pg_tx(conn)
    with tx as cur:
        if dialect == "postgres":
            limit = _deadline_ms()
            if limit is not None:
                cur.execute(_LIMIT, (str(limit), limit))
        cur.execute(insert, (key.namespace, key.digest, fingerprint, time.time()))
        if cur.rowcount != 1:
            row = cur.execute(select, (key.namespace, key.digest)).fetchone()
            return _replayed(plan, key, tuple(row), fingerprint)
        value = fn(*args, **kwargs)
        text, error = plan.results.encode_result(value)
        cur.execute(update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    return value


@contextmanager
def _pg_tx(conn: Any) -> Iterator[Any]:
    """A transaction on an idle psycopg connection, yielding a plain-tuple cursor."""
    from psycopg.rows import tuple_row

    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        yield cur


async def _once_async(
    plan: IdempotencyPlan,
    effects: _Effects,
    connection: str,
    fn: Callable[..., Awaitable[Any]],
    args: Any,
    kwargs: Any,
) -> Any:
    conn = _connection_of(plan, connection, args, kwargs)
    if _dialect(conn) != "postgres" or not _is_async_connection(conn):
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
    _pg_idle(conn, "the effect and its key must commit together")
    await effects.ensure_async(conn)
    async with _apg_tx(conn) as cur:
        limit = _deadline_ms()
        if limit is not None:
            await cur.execute(_LIMIT, (str(limit), limit))
        await cur.execute(insert, (key.namespace, key.digest, fingerprint, time.time()))
        if cur.rowcount != 1:
            row = await (await cur.execute(select, (key.namespace, key.digest))).fetchone()
            return _replayed(plan, key, tuple(row), fingerprint)
        value = await fn(*args, **kwargs)
        text, error = plan.results.encode_result(value)
        await cur.execute(update, (text, error, key.namespace, key.digest))
    emit("idempotency.completed", plan.node, ctx.run_id, ctx.attempt, key=key.short)
    return value


@asynccontextmanager
async def _apg_tx(conn: Any) -> AsyncIterator[Any]:
    from psycopg.rows import tuple_row

    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        yield cur


# ---------------------------------------------------------------------------- outbox


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message: `key` is stable, so a redelivery is recognisable downstream."""

    id: int
    topic: str
    key: str
    payload: Any
    attempts: int


def _messages(rows: Iterable[Sequence[Any]]) -> list[Message]:
    """`Message`s from ``SELECT id, topic, key, payload, attempts`` rows."""
    return [Message(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]


class Outbox:
    """Messages written in the same transaction as a row, dispatched after it commits.

    `add` (`aadd` on an ``AsyncConnection``) inside the transaction; `dispatch` (or
    `adispatch`) later, from any process: each pending message is handed to `handler` in order
    and marked dispatched when the handler returns. A crash between commit and dispatch, or
    between the handler and the mark, means the message is handed over again with the same
    `key` — at-least-once delivery, made effectively once by a receiver (or a keyed node) that
    honours the key. Two dispatchers running at once may both deliver a message.
    """

    def __init__(self, table: str = "nodekit_outbox") -> None:
        self.table = _check_table(table, "table")
        # psycopg connections on which the table is known to exist (committed); see _ensure.
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()

    # ------------------------------------------------------------------ SQL

    def _ddl(self, dialect: str) -> str:
        if dialect == "sqlite":
            return (
                f"CREATE TABLE IF NOT EXISTS {self.table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
                "created_at REAL NOT NULL, dispatched_at REAL, attempts INTEGER NOT NULL DEFAULT 0, "
                "last_error TEXT)"
            )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (id BIGSERIAL PRIMARY KEY, "
            "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL, dispatched_at DOUBLE PRECISION, "
            "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)"
        )

    def _sql(self, dialect: str, what: str) -> str:
        mark = "?" if dialect == "sqlite" else "%s"
        if what == "insert":
            return (
                f"INSERT INTO {self.table} (topic, key, payload, created_at) VALUES "
                f"({mark}, {mark}, {mark}, {mark}) ON CONFLICT (key) DO NOTHING"
            )
        if what == "pending":
            return (
                f"SELECT id, topic, key, payload, attempts FROM {self.table} "
                f"WHERE dispatched_at IS NULL ORDER BY id LIMIT {mark}"
            )
        if what == "done":
            return (
                f"UPDATE {self.table} SET dispatched_at = {mark}, attempts = attempts + 1 "
                f"WHERE id = {mark} AND dispatched_at IS NULL"
            )
        return (
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = {mark} "
            f"WHERE id = {mark} AND dispatched_at IS NULL"
        )

    @staticmethod
    def _message_key(topic: str, payload: Any, key: str | None) -> str:
        if key is not None:
            return key

        material = digest(canonical_json([topic, payload]))
        ctx = current_or_none()
        if ctx is not None and ctx.idempotency_key is not None:
            # Stable across the node's attempts and resumes; the payload is part of it so
            # that two messages on one topic from one call are two messages.
            return ctx.idempotency_key_for(f"outbox:{topic}:{material}")
        return material[:40]

    @staticmethod
    def _mark_args(message: Message, error: BaseException | None) -> tuple[str, tuple[Any, ...]]:
        if error is None:
            return "done", (time.time(), message.id)
        return "failed", (f"{type(error).__name__}: {error}"[:500], message.id)

    # ------------------------------------------------------------------ sync

    def _ensure(self, conn: Any, dialect: str) -> None:
        """Create the table if needed, in the caller's transaction if one is open.

        DDL inside the caller's transaction rolls back with it, so a connection is only
        remembered once the table was created outside one (committed).
        """
        if dialect == "sqlite":
            conn.execute(self._ddl(dialect))  # local and cheap: no need to remember
            return
        if conn in self._ready:
            return
        idle = conn.info.transaction_status.name == "IDLE"
        with conn.transaction(), conn.cursor() as cur:  # a savepoint inside the caller's
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            cur.execute(self._ddl(dialect))
        if idle:
            self._ready.add(conn)

    def add(self, conn: Any, topic: str, payload: Any, *, key: str | None = None) -> str:
        """Queue a message inside the caller's open transaction; returns its key.

        Without `key`, inside a keyed node the key is derived from the node's key, the topic
        and the payload (stable across retries and resumes); elsewhere it is a digest of topic
        and payload. A message whose key is already queued is not queued again.
        """
        dialect = _sync_dialect(conn, "add", "`await outbox.aadd(...)`")
        self._ensure(conn, dialect)
        key = self._message_key(topic, payload, key)
        conn.execute(
            self._sql(dialect, "insert"),
            (topic, key, json.dumps(payload, sort_keys=True), time.time()),
        )
        return key

    def pending(self, conn: Any, *, limit: int = 100) -> list[Message]:
        """The messages not dispatched yet, oldest first (commits nothing of the caller's)."""
        dialect = _sync_dialect(conn, "pending", "adispatch")
        self._ensure(conn, dialect)
        sql = self._sql(dialect, "pending")
        if dialect == "sqlite":
            cur = conn.cursor()
            cur.row_factory = None
            try:
                rows = cur.execute(sql, (limit,)).fetchall()
            finally:
                cur.close()
        else:
            from psycopg.rows import tuple_row

            # A transaction of its own when idle (nothing left open on a non-autocommit
            # connection), a savepoint inside the caller's otherwise.
            with conn.transaction(), conn.cursor(row_factory=tuple_row) as pcur:
                rows = pcur.execute(sql, (limit,)).fetchall()
        return _messages(rows)

    def _idle(self, conn: Any, dialect: str) -> None:
        what = "dispatch commits each message's mark"
        if dialect == "sqlite":
            _sqlite_idle(conn, what)
        else:
            _pg_idle(conn, what)

    def _mark(self, conn: Any, dialect: str, message: Message, error: BaseException | None) -> None:
        what, params = self._mark_args(message, error)
        if dialect == "sqlite":
            with conn:  # commits (rolls back on error) the mark on its own
                conn.execute(self._sql(dialect, what), params)
        else:
            with conn.transaction():
                conn.execute(self._sql(dialect, what), params)

    def dispatch(self, conn: Any, handler: Callable[[Message], Any], *, limit: int = 100) -> int:
        """Hand pending messages to `handler` in order; returns how many were dispatched.

        A handler that raises leaves its message pending (attempts and last error recorded)
        and dispatch moves on to the next message. The connection must be idle: each mark
        is committed as soon as its handler returns.
        """
        dialect = _sync_dialect(conn, "dispatch", "adispatch")
        self._idle(conn, dialect)
        done = 0
        for message in self.pending(conn, limit=limit):
            try:
                handler(message)
            except Exception as exc:
                self._mark(conn, dialect, message, exc)
                continue
            self._mark(conn, dialect, message, None)
            done += 1
        return done

    # ------------------------------------------------------------------ async

    async def _aensure(self, conn: Any) -> None:
        if conn in self._ready:
            return
        idle = conn.info.transaction_status.name == "IDLE"
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await cur.execute(self._ddl("postgres"))
        if idle:
            self._ready.add(conn)

    async def aadd(self, conn: Any, topic: str, payload: Any, *, key: str | None = None) -> str:
        """`add` on a psycopg ``AsyncConnection`` (inside an async transactional node)."""
        if _dialect(conn) != "postgres" or not _is_async_connection(conn):
            raise ConfigError(
                "nodekit.sql: Outbox.aadd takes a psycopg.AsyncConnection; use add otherwise",
                option="connection",
            )
        await self._aensure(conn)
        key = self._message_key(topic, payload, key)
        await conn.execute(
            self._sql("postgres", "insert"),
            (topic, key, json.dumps(payload, sort_keys=True), time.time()),
        )
        return key

    async def _apending(self, conn: Any, limit: int) -> list[Message]:
        from psycopg.rows import tuple_row

        await self._aensure(conn)
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(self._sql("postgres", "pending"), (limit,))
            rows = await cur.fetchall()
        return _messages(rows)

    async def _amark(self, conn: Any, message: Message, error: BaseException | None) -> None:
        what, params = self._mark_args(message, error)
        async with conn.transaction():
            await conn.execute(self._sql("postgres", what), params)

    async def adispatch(
        self, conn: Any, handler: Callable[[Message], Awaitable[Any]], *, limit: int = 100
    ) -> int:
        """`dispatch` with an async handler.

        `conn` is a psycopg ``AsyncConnection``, or a sync connection (its calls are short
        and block the event loop briefly).
        """
        dialect = _dialect(conn)
        self._idle(conn, dialect)
        sync = not _is_async_connection(conn)

        async def mark(message: Message, error: BaseException | None) -> None:
            if sync:
                self._mark(conn, dialect, message, error)
            else:
                await self._amark(conn, message, error)

        messages = self.pending(conn, limit=limit) if sync else await self._apending(conn, limit)
        done = 0
        for message in messages:
            try:
                await handler(message)
            except Exception as exc:
                await mark(message, exc)
                continue
            await mark(message, None)
            done += 1
        return done
