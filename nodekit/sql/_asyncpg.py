"""Transactions on asyncpg connections and on connections from an asyncpg pool.

Guarantee: the key's statements run in the connection's own transaction (``$1`` parameters,
prepared once per connection by asyncpg), which begins on an idle connection and ends
committed or rolled back; a pool lends one connection per transaction and gets it back.
asyncpg is never imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .._errors import ConfigError
from ._dialect import checkout_timeout
from ._effects import Effects, Statements

__all__ = ["asyncpg_pool_tx", "asyncpg_tx"]


class _Tx:
    __slots__ = ("conn", "handle", "postgres", "sql")

    def __init__(self, conn: Any, sql: Statements) -> None:
        self.handle = conn
        self.conn = conn
        self.sql = sql
        self.postgres = True

    async def run(self, sql: str, params: Sequence[Any]) -> int:
        status: str = await self.conn.execute(sql, *params)  # e.g. "INSERT 0 1"
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else 0

    async def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(await self.conn.fetchrow(sql, *params))


@asynccontextmanager
async def asyncpg_tx(conn: Any, effects: Effects, home: Any = None) -> AsyncIterator[_Tx]:
    """A transaction on an idle asyncpg connection; `home` (a pool) is where the table is known."""
    if conn.is_in_transaction():
        raise ConfigError(
            "nodekit.sql: the asyncpg connection is already inside a transaction; the effect "
            "and its key must commit together, so pass an idle connection",
            option="connection",
        )
    sql = effects.statements("postgres", "numeric_dollar")
    home = conn if home is None else home
    if not effects.ready(home):
        async with conn.transaction():
            await conn.execute(sql.lock, effects.table)
            await conn.execute(sql.ddl)
        effects.mark_ready(home)
    tx = conn.transaction()
    await tx.start()
    try:
        yield _Tx(conn, sql)
    except BaseException as exc:
        # The original error is what the retry loop must classify: asyncpg's own exit would
        # replace a dropped connection's error with "the underlying connection is closed".
        if not _lost(conn):
            with contextlib.suppress(Exception):
                await tx.rollback()
        elif _client_side(exc):
            raise ConnectionAbortedError(
                f"asyncpg: the connection was lost inside the transaction ({type(exc).__name__})"
            ) from exc
        raise
    await tx.commit()


def _lost(conn: Any) -> bool:
    """Whether the connection died: closed, or (a pool's) detached when its link went."""
    try:
        return bool(conn.is_closed())
    except Exception:
        return True


def _client_side(exc: BaseException) -> bool:
    """asyncpg's complaint about using a dead connection, rather than the server's answer.

    A pool detaches a connection whose link dies, and later calls on it raise
    ``InterfaceError: ... released back to the pool``, which says nothing of the lost
    transaction; it is mapped to `ConnectionAbortedError` (ambiguous: the key settles it).
    """
    return any(
        cls.__module__.startswith("asyncpg") and cls.__name__ == "InterfaceError"
        for cls in type(exc).__mro__
    )


@asynccontextmanager
async def asyncpg_pool_tx(pool: Any, effects: Effects) -> AsyncIterator[_Tx]:
    """A connection from an ``asyncpg.Pool`` for one transaction, then released."""
    async with (
        pool.acquire(timeout=checkout_timeout()) as conn,
        asyncpg_tx(conn, effects, pool) as tx,
    ):
        yield tx
