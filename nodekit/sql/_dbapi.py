"""Transactions on `sqlite3` and psycopg 3 connections, and on connections from `psycopg_pool`.

Guarantee: each yields a `Tx` inside a transaction that began on an idle connection and ends
committed or rolled back; a pool lends one connection per transaction and gets it back idle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from ._dialect import apg_tx, checkout_timeout, pg_idle, pg_tx, sqlite_tx
from ._effects import Effects, Statements

__all__ = ["apsycopg_pool_tx", "apsycopg_tx", "psycopg_pool_tx", "psycopg_tx", "sqlite3_tx"]

_WHAT = "the effect and its key must commit together"


class _CursorTx:
    """A `Tx` over a DB-API cursor (sqlite3, psycopg) that yields plain tuples."""

    __slots__ = ("cur", "handle", "postgres", "sql")

    def __init__(self, handle: Any, cur: Any, sql: Statements, postgres: bool) -> None:
        self.handle = handle
        self.cur = cur
        self.sql = sql
        self.postgres = postgres

    def run(self, sql: str, params: Sequence[Any]) -> int:
        self.cur.execute(sql, params)
        return int(self.cur.rowcount)

    def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(self.cur.execute(sql, params).fetchone())


class _AsyncCursorTx:
    __slots__ = ("cur", "handle", "postgres", "sql")

    def __init__(self, handle: Any, cur: Any, sql: Statements) -> None:
        self.handle = handle
        self.cur = cur
        self.sql = sql
        self.postgres = True

    async def run(self, sql: str, params: Sequence[Any]) -> int:
        await self.cur.execute(sql, params)
        return int(self.cur.rowcount)

    async def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(await (await self.cur.execute(sql, params)).fetchone())


@contextmanager
def sqlite3_tx(conn: Any, effects: Effects) -> Iterator[_CursorTx]:
    with sqlite_tx(conn, effects.ddl("sqlite")) as cur:
        yield _CursorTx(conn, cur, effects.statements("sqlite", "qmark"), False)


@contextmanager
def psycopg_tx(conn: Any, effects: Effects, home: Any = None) -> Iterator[_CursorTx]:
    """A transaction on a psycopg connection; `home` (a pool) is where the table is known."""
    pg_idle(conn, _WHAT)
    sql = effects.statements("postgres", "format")
    home = conn if home is None else home
    if not effects.ready(home):
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.lock, (effects.table,))
            cur.execute(sql.ddl)
        effects.mark_ready(home)
    with pg_tx(conn) as cur:
        yield _CursorTx(conn, cur, sql, True)


@asynccontextmanager
async def apsycopg_tx(
    conn: Any, effects: Effects, home: Any = None
) -> AsyncIterator[_AsyncCursorTx]:
    pg_idle(conn, _WHAT)
    sql = effects.statements("postgres", "format")
    home = conn if home is None else home
    if not effects.ready(home):
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(sql.lock, (effects.table,))
            await cur.execute(sql.ddl)
        effects.mark_ready(home)
    async with apg_tx(conn) as cur:
        yield _AsyncCursorTx(conn, cur, sql)


@contextmanager
def psycopg_pool_tx(pool: Any, effects: Effects) -> Iterator[_CursorTx]:
    """A connection from a `psycopg_pool.ConnectionPool` for one transaction, then given back."""
    with pool.connection(timeout=checkout_timeout()) as conn, psycopg_tx(conn, effects, pool) as tx:
        yield tx


@asynccontextmanager
async def apsycopg_pool_tx(pool: Any, effects: Effects) -> AsyncIterator[_AsyncCursorTx]:
    async with (
        pool.connection(timeout=checkout_timeout()) as conn,
        apsycopg_tx(conn, effects, pool) as tx,
    ):
        yield tx
