"""The transactional outbox: a message written with the row, dispatched after the commit.

Guarantee: `Outbox` covers "write the row, then call the API": the message is written in the
same transaction as the row and dispatched afterwards, with a stable key, so a crash between
the two delays the call but never loses or duplicates it (when the API honours the key).
Dispatchers compete safely: each message is claimed by one dispatcher at a time (`_claims`).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from .._canonical import canonical_json, digest
from .._context import current_or_none
from .._errors import ConfigError
from ._claim_drivers import AsyncClaims, SyncClaims, adeliver, deliver
from ._claims import Round, check_batch, check_seconds, new_owner
from ._dialect import check_table, dialect_of, is_async_connection, pg_idle, sqlite_idle
from ._message import Message, messages_from
from ._outbox_sql import OutboxSQL

__all__ = ["Message", "Outbox"]


def _dbapi(conn: Any) -> Any:
    """The driver's connection under a SQLAlchemy `Session` or `Connection` (the message then
    commits with the session's transaction), or `conn` itself."""
    if not type(conn).__module__.startswith("sqlalchemy."):
        return conn
    if hasattr(conn, "get_bind"):  # a Session: its connection in the current transaction
        conn = conn.connection()
    return conn.connection.driver_connection


def _sync_dialect(conn: Any, method: str, instead: str) -> str:
    """`dialect_of` for an `Outbox` method that needs a sync connection (`instead` is the fix)."""
    dialect = dialect_of(conn)
    if is_async_connection(conn):
        raise ConfigError(
            f"nodekit.sql: Outbox.{method} got a psycopg.AsyncConnection; use {instead}",
            option="connection",
        )
    return dialect


class Outbox:
    """Messages written in the same transaction as a row, dispatched after it commits.

    `add` (`aadd` on an ``AsyncConnection``) inside the transaction; `dispatch` (or
    `adispatch`) later, from any number of processes, threads or hosts at once: each call
    claims a batch of pending messages under a lease, hands them to `handler` in order, and
    marks each one dispatched in the same transaction that releases its claim. A message is
    claimed by one dispatcher at a time; one whose dispatcher died is claimed again when the
    lease ends. A crash between commit and dispatch, or between the handler and the mark,
    means the message is handed over again with the same `key` — at-least-once delivery,
    made effectively once by a receiver (or a keyed node) that honours the key.
    `nodekit.sql.Dispatcher` (and ``nodekit outbox run``) loops over `dispatch` until stopped.
    """

    def __init__(self, table: str = "nodekit_outbox") -> None:
        self.table = check_table(table, "table")
        self._statements = {d: OutboxSQL(self.table, d) for d in ("sqlite", "postgres")}
        # psycopg connections on which the table is known to exist (committed); see _ensure.
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()
        # ... and on which it is known to have the claim columns (see _claims.SyncClaims)
        self._claims_ready: weakref.WeakSet[Any] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"Outbox({self.table!r})"

    def _sql(self, dialect: str) -> OutboxSQL:
        return self._statements[dialect]

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

    def _round(
        self,
        *,
        owner: str | None,
        limit: Any,
        topic: str | None,
        lease: Any,
        retry_delay: Any,
        stop: threading.Event | None = None,
    ) -> Round:
        return Round(
            owner=owner or new_owner(),
            limit=check_batch(limit, "limit"),
            lease=check_seconds(lease, "lease", positive=True),
            retry_delay=check_seconds(retry_delay, "retry_delay", positive=False),
            topic=topic,
            stop=stop,
        )

    # ------------------------------------------------------------------ sync

    def _ensure(self, conn: Any, dialect: str) -> None:
        """Create the table if needed, in the caller's transaction if one is open.

        DDL inside the caller's transaction rolls back with it, so a connection is only
        remembered once the table was created outside one (committed).
        """
        if dialect == "sqlite":
            conn.execute(self._sql(dialect).create)  # local and cheap: no need to remember
            return
        if conn in self._ready:
            return
        idle = conn.info.transaction_status.name == "IDLE"
        with conn.transaction(), conn.cursor() as cur:  # a savepoint inside the caller's
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            cur.execute(self._sql(dialect).create)
        if idle:
            self._ready.add(conn)

    def add(self, conn: Any, topic: str, payload: Any, *, key: str | None = None) -> str:
        """Queue a message inside the caller's open transaction; returns its key.

        `conn` is a sqlite3 or psycopg connection, or a SQLAlchemy `Session` or `Connection`
        (the message is written on its driver connection, in its transaction).

        Without `key`, inside a keyed node the key is derived from the node's key, the topic
        and the payload (stable across retries and resumes); elsewhere it is a digest of topic
        and payload. A message whose key is already queued is not queued again.
        """
        conn = _dbapi(conn)
        dialect = _sync_dialect(conn, "add", "`await outbox.aadd(...)`")
        self._ensure(conn, dialect)
        key = self._message_key(topic, payload, key)
        conn.execute(
            self._sql(dialect).insert,
            (topic, key, json.dumps(payload, sort_keys=True), time.time()),
        )
        return key

    def pending(self, conn: Any, *, limit: int = 100) -> list[Message]:
        """The messages not dispatched yet (claimed or not), oldest first.

        Commits nothing of the caller's.
        """
        dialect = _sync_dialect(conn, "pending", "adispatch")
        self._ensure(conn, dialect)
        sql = self._sql(dialect).pending
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
        return messages_from(rows)

    def _idle(self, conn: Any, dialect: str) -> None:
        what = "dispatch commits each message's mark"
        if dialect == "sqlite":
            sqlite_idle(conn, what)
        else:
            pg_idle(conn, what)

    def dispatch(
        self,
        conn: Any,
        handler: Callable[[Message], Any],
        *,
        limit: int = 100,
        topic: str | None = None,
        lease: float | timedelta = 30.0,
        retry_delay: float | timedelta = 0.0,
        owner: str | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Claim up to `limit` pending messages, hand them to `handler` in order.

        Returns how many were delivered. Only messages of `topic`, when given. A handler that
        raises leaves its message pending (attempts and redacted last error recorded, not
        claimable again for `retry_delay` seconds) and dispatch moves on to the next one.
        The claim lasts `lease` seconds and is renewed while the batch is being delivered;
        no delivery starts with less than half of it left, so `handler` must finish well
        within half the lease. `stop` (a `threading.Event`) ends the batch after the current
        message and gives the rest back at once. The connection must be idle: claims and
        marks are committed as they happen.
        """
        dialect = _sync_dialect(conn, "dispatch", "adispatch")
        self._idle(conn, dialect)
        r = self._round(
            owner=owner, limit=limit, topic=topic, lease=lease, retry_delay=retry_delay, stop=stop
        )
        return deliver(SyncClaims(conn, self._sql(dialect), self._claims_ready), handler, r)

    # ------------------------------------------------------------------ async

    async def _aensure(self, conn: Any) -> None:
        if conn in self._ready:
            return
        idle = conn.info.transaction_status.name == "IDLE"
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await cur.execute(self._sql("postgres").create)
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
            self._sql("postgres").insert,
            (topic, key, json.dumps(payload, sort_keys=True), time.time()),
        )
        return key

    async def adispatch(
        self,
        conn: Any,
        handler: Callable[[Message], Awaitable[Any]],
        *,
        limit: int = 100,
        topic: str | None = None,
        lease: float | timedelta = 30.0,
        retry_delay: float | timedelta = 0.0,
        owner: str | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """`dispatch` with an async handler.

        `conn` is a psycopg ``AsyncConnection``, or a sync connection (its calls are short
        and block the event loop briefly).
        """
        dialect = dialect_of(conn)
        self._idle(conn, dialect)
        r = self._round(
            owner=owner, limit=limit, topic=topic, lease=lease, retry_delay=retry_delay, stop=stop
        )
        sql = self._sql(dialect)
        if is_async_connection(conn):
            return await adeliver(AsyncClaims(conn, sql, self._claims_ready), handler, r)
        return await adeliver(SyncClaims(conn, sql, self._claims_ready), handler, r)
