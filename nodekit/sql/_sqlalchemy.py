"""Transactions on SQLAlchemy sessions, connections, engines and session factories.

Guarantee: the key's statements run on the very connection the session or connection uses,
inside the transaction it commits, so the user's ORM objects (flushed at commit) and the key
commit or roll back together. An engine (or a session factory) lends a connection (a session)
per transaction, which goes back to the pool afterwards; after a dropped connection SQLAlchemy
hands the next transaction a fresh one, and the key settles whether the last commit happened.
SQLAlchemy is never imported here: the objects the caller passes bring it along.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from .._errors import ConfigError
from ._effects import Effects, Statements

__all__ = [
    "async_connection_tx",
    "async_engine_tx",
    "async_session_factory_tx",
    "async_session_tx",
    "connection_tx",
    "engine_tx",
    "session_factory_tx",
    "session_tx",
]

_DIALECTS = {"postgresql": True, "sqlite": False}


def _statements(bind: Any, effects: Effects) -> tuple[bool, Statements]:
    """(is PostgreSQL, the statements in the driver's parameter style) for an engine's dialect."""
    dialect = bind.dialect
    postgres = _DIALECTS.get(dialect.name)
    if postgres is None:
        raise ConfigError(
            f"nodekit.sql supports SQLAlchemy on PostgreSQL and SQLite, got {dialect.name!r}",
            option="connection",
        )
    return postgres, effects.statements(
        "postgres" if postgres else "sqlite", str(dialect.paramstyle)
    )


def _busy(what: str) -> ConfigError:
    return ConfigError(
        f"nodekit.sql: the SQLAlchemy {what} is already inside a transaction or has pending "
        "changes; the effect and its key must commit together, so pass an idle one",
        option="connection",
    )


def _check_session(session: Any) -> None:
    if session.in_transaction() or session.new or session.dirty or session.deleted:
        raise _busy(type(session).__name__)


def _check_transactional(conn: Any) -> Any:
    """`conn`, unless its isolation level is AUTOCOMMIT (each statement would commit alone)."""
    sync = getattr(conn, "sync_connection", None) or conn
    autocommit = getattr(sync, "_is_autocommit_isolation", None)
    if autocommit is not None and autocommit():
        raise ConfigError(
            "nodekit.sql: the SQLAlchemy connection runs with isolation_level='AUTOCOMMIT', "
            "so the effect and its key could not commit together; use a transactional "
            "isolation level",
            option="connection",
        )
    return conn


class _Tx:
    """A `Tx` over a SQLAlchemy ``Connection`` (driver SQL: no compilation, no autoflush)."""

    __slots__ = ("conn", "handle", "postgres", "sql")

    def __init__(self, handle: Any, conn: Any, sql: Statements, postgres: bool) -> None:
        self.handle = handle
        self.conn = conn
        self.sql = sql
        self.postgres = postgres

    def run(self, sql: str, params: Sequence[Any]) -> int:
        return int(self.conn.exec_driver_sql(sql, tuple(params)).rowcount)

    def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(self.conn.exec_driver_sql(sql, tuple(params)).one())


class _AsyncTx:
    __slots__ = ("conn", "handle", "postgres", "sql")

    def __init__(self, handle: Any, conn: Any, sql: Statements, postgres: bool) -> None:
        self.handle = handle
        self.conn = conn
        self.sql = sql
        self.postgres = postgres

    async def run(self, sql: str, params: Sequence[Any]) -> int:
        return int((await self.conn.exec_driver_sql(sql, tuple(params))).rowcount)

    async def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple((await self.conn.exec_driver_sql(sql, tuple(params))).one())


# ---------------------------------------------------------------------------- sync


def _create(conn: Any, sql: Statements, table: str) -> None:
    conn.exec_driver_sql(sql.lock, (table,))
    conn.exec_driver_sql(sql.ddl)


@contextmanager
def connection_tx(conn: Any, effects: Effects) -> Iterator[_Tx]:
    """A transaction on an idle SQLAlchemy ``Connection``."""
    if conn.in_transaction():
        raise _busy("Connection")
    postgres, sql = _statements(conn, effects)
    if postgres and not effects.ready(conn.engine):
        with conn.begin():
            _create(conn, sql, effects.table)
        effects.mark_ready(conn.engine)
    with conn.begin():
        _check_transactional(conn)
        if not postgres:
            conn.exec_driver_sql(sql.ddl)
        yield _Tx(conn, conn, sql, postgres)


@contextmanager
def session_tx(session: Any, effects: Effects) -> Iterator[_Tx]:
    """A transaction on an idle ORM ``Session``: ORM writes flush and commit with the key."""
    _check_session(session)
    bind = session.get_bind()
    postgres, sql = _statements(bind, effects)
    home = bind.engine
    if postgres and not effects.ready(home):
        with session.begin():
            _create(session.connection(), sql, effects.table)
        effects.mark_ready(home)
    with session.begin():
        conn = _check_transactional(session.connection())
        if not postgres:
            conn.exec_driver_sql(sql.ddl)
        yield _Tx(session, conn, sql, postgres)


@contextmanager
def engine_tx(engine: Any, effects: Effects) -> Iterator[_Tx]:
    """A ``Connection`` from the engine's pool for one transaction."""
    with engine.connect() as conn, connection_tx(conn, effects) as tx:
        yield tx


@contextmanager
def session_factory_tx(factory: Any, effects: Effects) -> Iterator[_Tx]:
    """A new ``Session`` from a ``sessionmaker`` for one transaction, closed afterwards."""
    with factory() as session, session_tx(session, effects) as tx:
        yield tx


# ---------------------------------------------------------------------------- async


@asynccontextmanager
async def async_connection_tx(conn: Any, effects: Effects) -> AsyncIterator[_AsyncTx]:
    if conn.in_transaction():
        raise _busy("AsyncConnection")
    postgres, sql = _statements(conn, effects)
    home = conn.sync_engine
    if postgres and not effects.ready(home):
        async with conn.begin():
            await conn.exec_driver_sql(sql.lock, (effects.table,))
            await conn.exec_driver_sql(sql.ddl)
        effects.mark_ready(home)
    async with conn.begin():
        _check_transactional(conn)
        if not postgres:
            await conn.exec_driver_sql(sql.ddl)
        yield _AsyncTx(conn, conn, sql, postgres)


@asynccontextmanager
async def async_session_tx(session: Any, effects: Effects) -> AsyncIterator[_AsyncTx]:
    _check_session(session)
    bind = session.sync_session.get_bind()
    postgres, sql = _statements(bind, effects)
    home = bind.engine
    if postgres and not effects.ready(home):
        async with session.begin():
            conn = await session.connection()
            await conn.exec_driver_sql(sql.lock, (effects.table,))
            await conn.exec_driver_sql(sql.ddl)
        effects.mark_ready(home)
    async with session.begin():
        conn = _check_transactional(await session.connection())
        if not postgres:
            await conn.exec_driver_sql(sql.ddl)
        yield _AsyncTx(session, conn, sql, postgres)


@asynccontextmanager
async def async_engine_tx(engine: Any, effects: Effects) -> AsyncIterator[_AsyncTx]:
    async with engine.connect() as conn, async_connection_tx(conn, effects) as tx:
        yield tx


@asynccontextmanager
async def async_session_factory_tx(factory: Any, effects: Effects) -> AsyncIterator[_AsyncTx]:
    async with factory() as session, async_session_tx(session, effects) as tx:
        yield tx
