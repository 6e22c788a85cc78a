"""The claim protocol's drivers: its statements on a connection, and one round of delivery.

`SyncClaims` (sqlite3, psycopg) and `AsyncClaims` (psycopg ``AsyncConnection``) run the
statements of `OutboxSQL`; `deliver` and `adeliver` run one round — claim, deliver, settle —
line for line alike, the decisions taken by `_claims.Batch`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

from .._sqlite import database_file, writer_lock
from ._claims import Batch, Round, Settlement, gone
from ._dialect import apg_tx, pg_tx
from ._message import Message, messages_from
from ._outbox_sql import CLAIM_COLUMNS, OutboxSQL

__all__ = ["AsyncClaims", "SyncClaims", "adeliver", "as_async", "deliver"]

_CHUNK = 500  # ids per statement: under every SQLite's limit on host parameters


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


# PostgreSQL statements run unprepared: a generic plan made while the table was small (as
# psycopg prepares a statement after five runs) would stay in use as it grows.
_UNPREPARED = {"prepare": False}


class SyncClaims:
    """The claim protocol's statements on a sync connection (sqlite3 or psycopg)."""

    def __init__(self, conn: Any, sql: OutboxSQL, ready: Any) -> None:
        self.conn = conn
        self.sql = sql
        self._ready = ready  # psycopg connections whose table is known to be migrated

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        if self.sql.dialect != "sqlite":
            with pg_tx(self.conn) as cur:
                yield cur
            return
        conn = self.conn
        cur = conn.cursor()
        cur.row_factory = None  # the caller's row factory must not change our reads
        writer = writer_lock(database_file(cur))
        writer.acquire()  # this process's writers queue here, not in SQLite's busy handler
        try:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                conn.commit()
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        finally:
            writer.release()
            cur.close()

    def prepare(self) -> None:
        """Create the table, or add the claim columns and index to an old one."""
        sql = self.sql
        if sql.dialect == "sqlite":
            if self._sqlite_ready():
                return  # the common case costs one read, no write lock
            with self._tx() as cur:
                cur.execute(sql.create)
                have = {row[0] for row in cur.execute(sql.columns).fetchall()}
                for name in CLAIM_COLUMNS:
                    if name not in have:
                        cur.execute(sql.add_column(name))
                cur.execute(sql.create_index)
            return
        if self.conn in self._ready:
            return
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sql.table,))
            cur.execute(sql.create)
            have = {row[0] for row in cur.execute(sql.columns, (sql.table,)).fetchall()}
            for name in CLAIM_COLUMNS:
                if name not in have:
                    cur.execute(sql.add_column(name))
            if cur.execute("SELECT to_regclass(%s)", (sql.index,)).fetchone()[0] is None:
                cur.execute(sql.create_index)
        self._ready.add(self.conn)

    def _sqlite_ready(self) -> bool:
        """Whether the table, its claim columns and its index all exist (one read)."""
        cur = self.conn.cursor()
        try:
            names = {
                row[0]
                for row in cur.execute(
                    "SELECT name FROM sqlite_master WHERE name IN (?, ?)",
                    (self.sql.table, self.sql.index),
                ).fetchall()
            }
            if len(names) < 2:
                return False
            have = {row[0] for row in cur.execute(self.sql.columns).fetchall()}
        finally:
            cur.close()
        return all(name in have for name in CLAIM_COLUMNS)

    def claim(self, owner: str, limit: int, lease: float, topic: str | None) -> list[Message]:
        sql = self.sql
        with self._tx() as cur:
            if sql.dialect != "sqlite":
                params = (owner, lease, *([topic] if topic is not None else []), limit)
                cur.execute(sql.claim(topic is not None), params, **_UNPREPARED)
                return messages_from(cur.fetchall())
            params = (*([topic] if topic is not None else []), limit)
            rows = cur.execute(sql.claimable(topic is not None), params).fetchall()
            if rows:
                cur.execute(sql.take(len(rows)), (owner, lease, *(row[0] for row in rows)))
            return messages_from(rows)

    def free_dead(self) -> int:
        """Release the claims of dispatchers on this host whose process is gone."""
        sql = self.sql
        if sql.dialect == "sqlite":
            cur = self.conn.cursor()
            try:
                owners = [row[0] for row in cur.execute(sql.owners).fetchall()]
            finally:
                cur.close()
        else:
            with self._tx() as pcur:
                pcur.execute(sql.owners, **_UNPREPARED)
                owners = [row[0] for row in pcur.fetchall()]
        dead = [owner for owner in owners if gone(owner)]
        if dead:
            with self._tx() as cur:
                for owner in dead:
                    cur.execute(sql.free_owner, (owner,))
        return len(dead)

    def settle(self, owner: str, s: Settlement, lease: float, retry_delay: float) -> set[int]:
        """Write `s` in one transaction; returns the extended ids this owner still holds."""
        if not s:
            return set()
        sql = self.sql
        extra = _UNPREPARED if sql.dialect != "sqlite" else {}
        held: set[int] = set()
        with self._tx() as cur:
            for ids in _chunks(s.done):
                cur.execute(sql.done(len(ids)), (time.time(), owner, *ids), **extra)
            if s.failed:
                cur.executemany(
                    sql.failed,
                    [(error, retry_delay, retry_delay, owner, id_) for id_, error in s.failed],
                )
            for ids in _chunks(s.release):
                cur.execute(sql.release(len(ids)), (owner, *ids), **extra)
            for ids in _chunks(s.extend):
                cur.execute(sql.extend(len(ids)), (lease, owner, *ids), **extra)
                cur.execute(sql.held(len(ids)), (owner, *ids), **extra)
                held.update(row[0] for row in cur.fetchall())
        return held


class AsyncClaims:
    """`SyncClaims` on a psycopg ``AsyncConnection`` (PostgreSQL only)."""

    def __init__(self, conn: Any, sql: OutboxSQL, ready: Any) -> None:
        self.conn = conn
        self.sql = sql
        self._ready = ready

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Any]:
        async with apg_tx(self.conn) as cur:
            yield cur

    async def prepare(self) -> None:
        sql = self.sql
        if self.conn in self._ready:
            return
        async with self._tx() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sql.table,))
            await cur.execute(sql.create)
            await cur.execute(sql.columns, (sql.table,))
            have = {row[0] for row in await cur.fetchall()}
            for name in CLAIM_COLUMNS:
                if name not in have:
                    await cur.execute(sql.add_column(name))
            await cur.execute("SELECT to_regclass(%s)", (sql.index,))
            if (await cur.fetchone())[0] is None:
                await cur.execute(sql.create_index)
        self._ready.add(self.conn)

    async def claim(self, owner: str, limit: int, lease: float, topic: str | None) -> list[Message]:
        params = (owner, lease, *([topic] if topic is not None else []), limit)
        async with self._tx() as cur:
            await cur.execute(self.sql.claim(topic is not None), params, **_UNPREPARED)
            return messages_from(await cur.fetchall())

    async def free_dead(self) -> int:
        sql = self.sql
        async with self._tx() as cur:
            await cur.execute(sql.owners, **_UNPREPARED)
            owners = [row[0] for row in await cur.fetchall()]
        dead = [owner for owner in owners if gone(owner)]
        if dead:
            async with self._tx() as cur:
                for owner in dead:
                    await cur.execute(sql.free_owner, (owner,))
        return len(dead)

    async def settle(self, owner: str, s: Settlement, lease: float, retry_delay: float) -> set[int]:
        if not s:
            return set()
        sql = self.sql
        held: set[int] = set()
        async with self._tx() as cur:
            for ids in _chunks(s.done):
                await cur.execute(sql.done(len(ids)), (time.time(), owner, *ids), **_UNPREPARED)
            if s.failed:
                await cur.executemany(
                    sql.failed,
                    [(error, retry_delay, retry_delay, owner, id_) for id_, error in s.failed],
                )
            for ids in _chunks(s.release):
                await cur.execute(sql.release(len(ids)), (owner, *ids), **_UNPREPARED)
            for ids in _chunks(s.extend):
                await cur.execute(sql.extend(len(ids)), (lease, owner, *ids), **_UNPREPARED)
                await cur.execute(sql.held(len(ids)), (owner, *ids), **_UNPREPARED)
                held.update(row[0] for row in await cur.fetchall())
        return held


class _AsyncOverSync:
    """`SyncClaims` behind the async interface (an async handler on a sync connection)."""

    def __init__(self, claims: SyncClaims) -> None:
        self._claims = claims

    async def prepare(self) -> None:
        self._claims.prepare()

    async def claim(self, owner: str, limit: int, lease: float, topic: str | None) -> list[Message]:
        return self._claims.claim(owner, limit, lease, topic)

    async def free_dead(self) -> int:
        return self._claims.free_dead()

    async def settle(self, owner: str, s: Settlement, lease: float, retry_delay: float) -> set[int]:
        return self._claims.settle(owner, s, lease, retry_delay)


class _AsyncOps(Protocol):
    async def prepare(self) -> None: ...
    async def claim(
        self, owner: str, limit: int, lease: float, topic: str | None
    ) -> list[Message]: ...
    async def free_dead(self) -> int: ...
    async def settle(
        self, owner: str, s: Settlement, lease: float, retry_delay: float
    ) -> set[int]: ...


def as_async(claims: SyncClaims | AsyncClaims) -> _AsyncOps:
    return _AsyncOverSync(claims) if isinstance(claims, SyncClaims) else claims


# ---------------------------------------------------------------------------- drivers


def deliver(claims: SyncClaims, handler: Callable[[Message], Any], r: Round) -> int:
    """Claim up to `r.limit` messages, deliver them in order, settle; returns how many done."""
    claims.prepare()
    started = time.monotonic()
    messages = claims.claim(r.owner, r.limit, r.lease, r.topic)
    if len(messages) < r.limit and claims.free_dead():
        messages += claims.claim(r.owner, r.limit - len(messages), r.lease, r.topic)
    batch = Batch(messages, r.lease, started)
    current: Message | None = None
    try:
        while not r.stopped():
            if batch.due(now := time.monotonic()):
                held = claims.settle(r.owner, batch.checkpoint(), r.lease, r.retry_delay)
                batch.renewed(held, now)
            current = batch.next()
            if current is None:
                break
            try:
                handler(current)
            except Exception as exc:
                batch.failed(current, exc)
            else:
                batch.succeeded(current)
            current = None
    finally:
        claims.settle(r.owner, batch.final(current), r.lease, r.retry_delay)
    return batch.delivered


async def adeliver(
    claims: SyncClaims | AsyncClaims, handler: Callable[[Message], Awaitable[Any]], r: Round
) -> int:
    """`deliver` with an async handler (and, on an ``AsyncConnection``, async statements)."""
    ops = as_async(claims)
    await ops.prepare()
    started = time.monotonic()
    messages = await ops.claim(r.owner, r.limit, r.lease, r.topic)
    if len(messages) < r.limit and await ops.free_dead():
        messages += await ops.claim(r.owner, r.limit - len(messages), r.lease, r.topic)
    batch = Batch(messages, r.lease, started)
    current: Message | None = None
    try:
        while not r.stopped():
            if batch.due(now := time.monotonic()):
                held = await ops.settle(r.owner, batch.checkpoint(), r.lease, r.retry_delay)
                batch.renewed(held, now)
            current = batch.next()
            if current is None:
                break
            try:
                await handler(current)
            except Exception as exc:
                batch.failed(current, exc)
            else:
                batch.succeeded(current)
            current = None
    finally:
        await ops.settle(r.owner, batch.final(current), r.lease, r.retry_delay)
    return batch.delivered
