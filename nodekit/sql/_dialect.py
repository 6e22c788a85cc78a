"""The connections `nodekit.sql` accepts: which database, whether idle, how a transaction opens.

Guarantee: a transaction begun here starts on an idle connection (anything else is a
`ConfigError`), so none of the caller's pending work can commit together with a key or an
outbox mark; it yields a plain-tuple cursor whatever the caller's row factory, and always ends
committed or rolled back, leaving the connection idle for a retry. The remaining deadline
becomes PostgreSQL's ``statement_timeout``, which is only ever lowered, and only for the
transaction.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from .._context import current_or_none
from .._errors import ConfigError
from .._sqlite import database_file, writer_lock

__all__ = [
    "apg_tx",
    "check_table",
    "checkout_timeout",
    "deadline_ms",
    "dialect_of",
    "is_async_connection",
    "pg_idle",
    "pg_tx",
    "sqlite_idle",
    "sqlite_tx",
]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_table(table: str, option: str) -> str:
    if not _IDENT.match(table):
        raise ConfigError(
            f"nodekit.sql: {option} {table!r} is not a plain SQL identifier", option=option
        )
    return table


def dialect_of(conn: Any) -> str:
    module = type(conn).__module__.partition(".")[0]
    if module == "sqlite3":
        return "sqlite"
    if module == "psycopg":
        return "postgres"
    raise ConfigError(
        f"nodekit.sql supports sqlite3 and psycopg 3 connections, got {type(conn).__qualname__}",
        option="connection",
    )


def is_async_connection(conn: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(conn, "execute", None))


def sqlite_idle(conn: Any, what: str) -> None:
    if conn.in_transaction:
        raise ConfigError(
            f"nodekit.sql: the sqlite3 connection is already inside a transaction; {what}, "
            "so pass an idle connection",
            option="connection",
        )


@contextmanager
def sqlite_tx(conn: Any, ddl: str) -> Iterator[Any]:
    """BEGIN IMMEDIATE ... COMMIT on an idle connection, yielding a plain-tuple cursor."""
    sqlite_idle(conn, "the effect and its key must commit together")
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


def pg_idle(conn: Any, what: str) -> None:
    # A broken connection (UNKNOWN) is not a configuration error: psycopg raises its own
    # OperationalError when it is used, which the retry loop classifies.
    if conn.info.transaction_status.name in _BUSY:
        raise ConfigError(
            "nodekit.sql: the psycopg connection is busy or inside a transaction; "
            f"{what}, so pass an idle connection",
            option="connection",
        )


@contextmanager
def pg_tx(conn: Any) -> Iterator[Any]:
    """A transaction on an idle psycopg connection, yielding a plain-tuple cursor."""
    from psycopg.rows import tuple_row

    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        yield cur


@asynccontextmanager
async def apg_tx(conn: Any) -> AsyncIterator[Any]:
    """`pg_tx` on a psycopg ``AsyncConnection``."""
    from psycopg.rows import tuple_row

    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        yield cur


def deadline_ms() -> int | None:
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


def checkout_timeout() -> float | None:
    """How long a pool may take to lend a connection: the remaining deadline, or its default."""
    ctx = current_or_none()
    return ctx.remaining() if ctx is not None else None
