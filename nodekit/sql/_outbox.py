"""The transactional outbox: a message written with the row, dispatched after the commit.

Guarantee: `Outbox` covers "write the row, then call the API": the message is written in the
same transaction as the row and dispatched afterwards, with a stable key, so a crash between
the two delays the call but never loses or duplicates it (when the API honours the key).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._canonical import canonical_json, digest
from .._context import current_or_none
from .._errors import ConfigError
from .._redact import error_text
from ._dialect import check_table, dialect_of, is_async_connection, pg_idle, sqlite_idle

__all__ = ["Message", "Outbox"]


def _sync_dialect(conn: Any, method: str, instead: str) -> str:
    """`dialect_of` for an `Outbox` method that needs a sync connection (`instead` is the fix)."""
    dialect = dialect_of(conn)
    if is_async_connection(conn):
        raise ConfigError(
            f"nodekit.sql: Outbox.{method} got a psycopg.AsyncConnection; use {instead}",
            option="connection",
        )
    return dialect


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
        self.table = check_table(table, "table")
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
        return "failed", (error_text(error, 500), message.id)  # redacted, one line

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
            sqlite_idle(conn, what)
        else:
            pg_idle(conn, what)

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
        if dialect_of(conn) != "postgres" or not is_async_connection(conn):
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
        dialect = dialect_of(conn)
        self._idle(conn, dialect)
        sync = not is_async_connection(conn)

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
