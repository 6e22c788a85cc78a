"""`PostgresStore`: idempotency records in a PostgreSQL table, shared by processes and hosts.

`acquire` is one statement: ``INSERT … ON CONFLICT DO UPDATE … WHERE <acquirable>`` applies
the same decision as every other store on the row's latest version (row-locked by PostgreSQL),
and the same statement reads the record as it stood, so both outcomes cost one round trip
(and a replay writes nothing). A row nodekit never writes (an unknown state, a time that is
NaN or infinite, an epoch below 1, an unknown format) is never acquirable: the statement
returns it untouched and `checked_record` raises `IdempotencyCorruptRecord`.
`complete`, `release` and `renew` are single ``UPDATE``/``DELETE`` statements conditional on
``(owner_token, IN_PROGRESS)``. Time is the server's (``clock_timestamp()``) unless a clock is
injected. The schema, table and ``nodekit_meta`` are created on first use under an advisory
lock, so many processes may start at once; a table made by an older nodekit gets the columns
it lacks (``holder``: nullable, so older processes on the same table keep working).

Connections: the sync methods share one `psycopg_pool.ConnectionPool`; each event loop gets
a small pool of its own (`LoopPool`), since asyncio connections belong to their loop. Every
operation is safe to send twice (the owner token is chosen before the first try, and every
write after the acquire is conditional on it), so an operation whose connection turns out
broken is sent once more on a fresh connection instead of failing the call.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import ConfigError
from .._redact import error_text
from ._base import Closing, PoolTimeout, Unreachable, checked_record, new_token, pool_wait
from ._holder import holder_text
from ._pgpool import SLICE, Connections, LoopPool, watched
from ._pgsql import COLUMNS, DDL_LOCK, Statements, decide, key_params
from ._store import (
    COMPLETED,
    FORMAT_VERSION,
    IN_PROGRESS,
    Acquisition,
    Clock,
    NotSent,
    Record,
    RecordKey,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresStore"]

T = TypeVar("T")

# an acquire that saw the record change between its snapshot and its upsert asks again; a
# few races in a row are possible under contention, an endless series is not
_ACQUIRE_TRIES = 10


def _seconds(value: object, option: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(
            f"PostgresStore {option} must be seconds (float or timedelta) >= 0, got {value!r}",
            option=option,
        )
    return float(value)


def _resend_failed(exc: BaseException) -> ConnectionError:
    return ConnectionError(
        f"PostgresStore: the connection broke during the operation and no other could be "
        f"had to send it again ({error_text(exc)})"
    )


# ---------------------------------------------------------------------------- the store


class PostgresStore(Closing):
    """Idempotency records in a PostgreSQL table (created, with its schema, if missing).

    `dsn` is a libpq URL or conninfo string. `schema` (default: the connection's search
    path) and `table` place the records. `clock` is injectable (tests); otherwise time is
    the server's.

    Connections are pooled, opened lazily and kept for reuse: a store costs the server at most
    `pool_size` connections for its sync methods (one `psycopg_pool.ConnectionPool`, shared by
    every thread; one connection kept open while idle) plus `pool_size` per event loop that
    uses its async methods (asyncio connections belong to their loop; a loop's connections
    close once it has closed and another loop uses the store, or on `close`). Each connection
    is held for one statement only, never while a node's body runs, so `pool_size` bounds the
    store calls in flight, not the node calls.

    `pool_size` (default 10): the most connections in use at once, per pool (an int ≥ 1).
    `pool_timeout` (seconds or `timedelta`, default 30): how long an operation waits for a
    free connection. Acquires and reads wait at most until the running node's deadline, if
    that comes sooner, and then fail *before* anything ran (`TimeoutError`, reported by a
    keyed call as `IdempotencyStoreError`); completions, releases and renewals wait the whole
    `pool_timeout`, since their effect already happened. If the server refuses connections,
    waiting callers fail at once with the connection error instead.

    A connection found broken (the server restarted, an idle connection was reset) is
    discarded, with the other idle ones, and the operation is sent once more on a fresh
    connection: every operation is safe to send twice. The pools close on `close`/`aclose`,
    when the store is garbage-collected, and at interpreter exit; their threads never keep
    the process alive. psycopg errors otherwise propagate.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        table: str = "nodekit_idempotency",
        clock: Clock | None = None,
        pool_size: int = 10,
        pool_timeout: float | timedelta = 30.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ConfigError(f"PostgresStore needs a DSN string, got {dsn!r}", option="dsn")
        for option, value in (("schema", schema), ("table", table)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(
                    f"PostgresStore {option} must be a non-empty string, got {value!r}",
                    option=option,
                )
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(
                f"PostgresStore pool_size must be an int >= 1, got {pool_size!r}",
                option="pool_size",
            )
        try:
            import psycopg
            import psycopg_pool  # noqa: F401  (checked now, used on first sync call)
        except ImportError as exc:
            raise ConfigError(
                f"PostgresStore needs {exc.name!r}: pip install 'nodekit[postgres]'",
                option="dsn",
            ) from exc
        self.dsn = dsn
        self.schema = schema
        self.table = table
        self.pool_size = pool_size
        self.pool_timeout = _seconds(pool_timeout, "pool_timeout")
        self._clock = clock
        self._sql = Statements(schema, table)
        # a connection-level failure: the connection is unusable, the server maybe fine
        self._broken: tuple[type[Exception], ...] = (
            psycopg.OperationalError,
            psycopg.InterfaceError,
        )
        self._conns = Connections()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._label = repr(self)
        self._finalizer = weakref.finalize(self, self._conns.close, 1.0)

    def __repr__(self) -> str:
        try:
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(self.dsn)
        except Exception:
            where = "?"
        else:
            where = " ".join(
                f"{k}={v}" for k, v in info.items() if k in ("host", "port", "dbname", "user")
            )
        table = f"{self.schema}.{self.table}" if self.schema else self.table
        return f"PostgresStore({where!r}, table={table!r}, pool_size={self.pool_size})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its DSN and options: another process (an executor's worker) re-opens
        the same table, with pools of its own."""
        options: dict[str, Any] = {
            "schema": self.schema,
            "table": self.table,
            "pool_size": self.pool_size,
            "pool_timeout": self.pool_timeout,
        }
        if self._clock is not None:
            options["clock"] = self._clock
        return (functools.partial(PostgresStore, self.dsn, **options), ())

    # ------------------------------------------------------------------ sync connections

    def _pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        conns = self._conns
        pool = conns.sync
        if pool is not None:
            return pool
        from psycopg_pool import ConnectionPool

        with conns.lock:
            if conns.closed:
                raise RuntimeError("PostgresStore is closed")
            if conns.sync is None:
                pool = ConnectionPool(
                    self.dsn,
                    connection_class=watched(conns.health),
                    kwargs={"autocommit": True},
                    min_size=1,
                    max_size=self.pool_size,
                    open=False,
                    name="nodekit-postgres",
                    timeout=self.pool_timeout,
                    # a failed connection attempt is not retried in the background (it would
                    # back off for seconds): the next caller that needs a connection retries
                    reconnect_timeout=0.0,
                    num_workers=2,
                )
                pool.open(wait=False)
                conns.sync = pool
            return conns.sync

    def _checkout(
        self, pool: ConnectionPool[psycopg.Connection[Any]], bounded: bool
    ) -> psycopg.Connection[Any]:
        """A connection from the pool, waiting at most `pool_wait(pool_timeout)` seconds."""
        import psycopg_pool

        wait = max(0.0, pool_wait(self.pool_timeout, bounded=bounded))
        start = time.monotonic()
        deadline = start + wait
        while True:
            try:
                return pool.getconn(max(0.0, min(deadline - time.monotonic(), SLICE)))
            except psycopg_pool.PoolTimeout:
                failed = self._conns.health.since(start)
                if failed is not None:
                    raise Unreachable(
                        f"PostgresStore: cannot connect to the server: {error_text(failed)}"
                    ) from failed
                if time.monotonic() >= deadline:
                    raise PoolTimeout(
                        f"PostgresStore: no free connection among {self.pool_size} "
                        f"within {wait:.3g} s"
                    ) from None

    def _run(
        self,
        op: Callable[[psycopg.Connection[Any]], T],
        *,
        bounded: bool,
    ) -> T:
        """`op` on a pooled connection; sent once more on a fresh one if it was broken."""
        pool = self._pool()
        conn = self._checkout(pool, bounded)
        try:
            return self._once(conn, op)
        except self._broken:
            if not conn.closed:
                raise
        finally:
            pool.putconn(conn)
        pool.drain()  # the other connections were most likely cut too: never reuse them
        try:
            conn = self._checkout(pool, bounded)
        except NotSent as exc:  # the first send may have landed: not "nothing was sent"
            raise _resend_failed(exc) from exc
        try:
            return self._once(conn, op)
        finally:
            pool.putconn(conn)

    def _once(self, conn: psycopg.Connection[Any], op: Callable[[psycopg.Connection[Any]], T]) -> T:
        if not self._ready:
            with self._ready_lock:
                if not self._ready:
                    row = conn.execute(self._sql.exists, self._sql.names).fetchone()
                    if not (row and row[0]):
                        with conn.transaction():
                            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
                            for statement in self._sql.ddl:
                                conn.execute(statement)
                    self._ready = True
        return op(conn)

    # ------------------------------------------------------------------ async connections

    async def _arun(
        self,
        op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
        *,
        bounded: bool,
    ) -> T:
        """`op` on a connection of this loop's pool; sent once more on a fresh one if broken."""
        pool, conn = await self._acheckout(bounded)
        slots = pool.slots
        try:
            try:
                return await self._aonce(conn, op)
            except self._broken:
                if not conn.closed:
                    raise
            finally:
                pool.keep(conn)
            pool.drain()  # the other connections were most likely cut too
            try:
                conn = await self._aconnect(pool)
            except Exception as exc:  # the first send may have landed
                raise _resend_failed(exc) from exc
            try:
                return await self._aonce(conn, op)
            finally:
                pool.keep(conn)
        finally:
            slots.release()

    async def _acheckout(self, bounded: bool) -> tuple[LoopPool, psycopg.AsyncConnection[Any]]:
        """A slot of this loop's pool and a connection in it, waiting at most
        `pool_wait(pool_timeout)` seconds for the slot."""
        loop = asyncio.get_running_loop()
        pool = self._conns.loops.get(loop)
        if pool is None or pool.closed:
            pool = self._conns.loop_pool(loop, self.pool_size)
        slots = pool.slots
        if slots.locked():
            wait = max(0.0, pool_wait(self.pool_timeout, bounded=bounded))
            try:
                async with asyncio.timeout(wait):
                    await slots.acquire()
            except TimeoutError:
                raise PoolTimeout(
                    f"PostgresStore: no free connection among {self.pool_size} within {wait:.3g} s"
                ) from None
        else:
            await slots.acquire()
        try:
            conn = pool.idle.pop() if pool.idle else await self._aconnect(pool)
        except self._broken as exc:
            slots.release()
            raise Unreachable(
                f"PostgresStore: cannot connect to the server: {error_text(exc)}"
            ) from exc
        except BaseException:
            slots.release()
            raise
        return pool, conn

    async def _aconnect(self, pool: LoopPool) -> psycopg.AsyncConnection[Any]:
        import psycopg

        if pool.closed:
            raise RuntimeError("PostgresStore is closed")
        # shielded: a caller cancelled mid-connect leaves the connection to the pool, not
        # half-open for the garbage collector
        task = asyncio.ensure_future(psycopg.AsyncConnection.connect(self.dsn, autocommit=True))
        try:
            conn = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(pool.adopt)
            raise
        pool.add(conn)
        return conn

    async def _aonce(
        self,
        conn: psycopg.AsyncConnection[Any],
        op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    ) -> T:
        if not self._ready:  # concurrent first calls may all check: the DDL is idempotent
            cur = await conn.execute(self._sql.exists, self._sql.names)
            row = await cur.fetchone()
            if not (row and row[0]):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
                    for statement in self._sql.ddl:
                        await conn.execute(statement)
            self._ready = True
        return await op(conn)

    # ------------------------------------------------------------------ parameters

    def _now(self) -> float | None:
        return None if self._clock is None else float(self._clock())

    def _acquire_params(
        self,
        key: RecordKey,
        fingerprint: str,
        lease: float,
        ttl: float,
        takeover: bool,
        token: str | None,
        dead: str | None,
    ) -> dict[str, Any]:
        return {
            **key_params(key),
            "now": self._now(),
            "fingerprint": fingerprint,
            # chosen once: an acquire sent again (a broken connection) names the same owner
            "token": token or new_token(),
            "lease": float(lease),
            "span": float(max(ttl, lease)),
            "takeover": bool(takeover),
            "in_progress": IN_PROGRESS,
            "completed": COMPLETED,
            "format_version": FORMAT_VERSION,
            "holder": holder_text(),
            "dead": dead,
        }

    def _complete_params(
        self, key: RecordKey, token: str, result: str | None, error: str | None, ttl: float
    ) -> dict[str, Any]:
        return {
            **key_params(key),
            "now": self._now(),
            "token": token,
            "in_progress": IN_PROGRESS,
            "completed": COMPLETED,
            "result": result,
            "error": error,
            "ttl": float(ttl),
        }

    def _holds_params(self, key: RecordKey, token: str, **extra: Any) -> dict[str, Any]:
        return {**key_params(key), "token": token, "in_progress": IN_PROGRESS, **extra}

    def _unsettled(self) -> RuntimeError:
        return RuntimeError(
            f"{self._label}: the record changed under {_ACQUIRE_TRIES} acquires in a row"
        )

    # ------------------------------------------------------------------ sync protocol

    def acquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition:
        params = self._acquire_params(key, fingerprint, lease, ttl, takeover, token, dead)
        statement, label = self._sql.acquire, self._label

        def op(conn: psycopg.Connection[Any]) -> Acquisition:
            for _ in range(_ACQUIRE_TRIES):
                rows = conn.execute(statement, params).fetchall()
                answer = decide(rows, fingerprint, takeover, label, dead)
                if answer is not None:
                    return answer
            raise self._unsettled()

        return self._run(op, bounded=True)

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        params = self._complete_params(key, token, result, error, ttl)
        return self._write(self._sql.complete, params)

    def release(self, key: RecordKey, token: str) -> bool:
        return self._write(self._sql.release, self._holds_params(key, token))

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        params = self._holds_params(key, token, now=self._now(), lease=float(lease))
        return self._write(self._sql.renew, params)

    def get(self, key: RecordKey) -> Record | None:
        statement = self._sql.get
        row = self._run(
            lambda conn: conn.execute(statement, key_params(key)).fetchone(), bounded=True
        )
        return None if row is None else checked_record(row, self._label)

    def delete(self, key: RecordKey) -> bool:
        return self._write(self._sql.delete, key_params(key))

    def _write(self, statement: Any, params: dict[str, Any]) -> bool:
        """One conditional write (not bounded by the node's deadline): did it change a row?"""
        return self._run(lambda conn: conn.execute(statement, params).rowcount == 1, bounded=False)

    def close(self) -> None:
        """Close the pools: idle connections now, those in use when they come back.

        Later calls raise `RuntimeError`. Another event loop's idle connections close in
        that loop's thread (or now, if it is not running).
        """
        self._finalizer.detach()
        self._conns.close()

    # ------------------------------------------------------------------ async protocol

    async def aacquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition:
        params = self._acquire_params(key, fingerprint, lease, ttl, takeover, token, dead)
        statement, label = self._sql.acquire, self._label

        async def op(conn: psycopg.AsyncConnection[Any]) -> Acquisition:
            for _ in range(_ACQUIRE_TRIES):
                cur = await conn.execute(statement, params)
                answer = decide(await cur.fetchall(), fingerprint, takeover, label, dead)
                if answer is not None:
                    return answer
            raise self._unsettled()

        return await self._arun(op, bounded=True)

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        params = self._complete_params(key, token, result, error, ttl)
        return await self._awrite(self._sql.complete, params)

    async def arelease(self, key: RecordKey, token: str) -> bool:
        return await self._awrite(self._sql.release, self._holds_params(key, token))

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        params = self._holds_params(key, token, now=self._now(), lease=float(lease))
        return await self._awrite(self._sql.renew, params)

    async def aget(self, key: RecordKey) -> Record | None:
        statement = self._sql.get

        async def op(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
            return await (await conn.execute(statement, key_params(key))).fetchone()

        row = await self._arun(op, bounded=True)
        return None if row is None else checked_record(row, self._label)

    async def adelete(self, key: RecordKey) -> bool:
        return await self._awrite(self._sql.delete, key_params(key))

    async def _awrite(self, statement: Any, params: dict[str, Any]) -> bool:
        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            return (await conn.execute(statement, params)).rowcount == 1

        return await self._arun(op, bounded=False)

    async def aclose(self) -> None:
        """Close the store: this loop's idle connections here, the rest as `close` does."""
        pool = self._conns.loops.get(asyncio.get_running_loop())
        if pool is not None:
            pool.closed = True
            idle, pool.idle = pool.idle, []
            for conn in idle:
                pool.conns.pop(conn, None)
                with suppress(Exception):
                    await conn.close()
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ tests

    def _put(self, record: Record) -> None:
        """Write a record as is (tests use it to plant corrupt or foreign records)."""
        params = {c: getattr(record, c) for c in COLUMNS}
        statement = self._sql.put
        self._run(lambda conn: conn.execute(statement, params), bounded=False)
