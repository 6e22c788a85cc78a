"""`PostgresStore`'s connections: one sync `psycopg_pool.ConnectionPool`, one small pool per
event loop (asyncio connections belong to their loop), closed together.

Kept apart from the store so that a finalizer can close every connection when the store is
collected or the interpreter exits, without keeping the store alive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["SLICE", "Connections", "Health", "LoopPool", "finish", "watched"]

# the longest a sync caller waits on the pool before checking whether connecting fails
SLICE = 0.05
# how long closing waits for the pool's threads (at exit: not long)
CLOSE_WAIT = 5.0


def finish(conn: Any) -> None:
    """Close a connection's socket now, from any thread, without awaiting anything."""
    with suppress(Exception):
        conn.pgconn.finish()


class Health:
    """The last failed connection attempt of a pool's workers: (monotonic time, error)."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed: tuple[float, BaseException] | None = None

    def since(self, start: float) -> BaseException | None:
        failed = self.failed
        return failed[1] if failed is not None and failed[0] >= start else None


def watched(health: Health) -> type[psycopg.Connection[Any]]:
    """A connection class that tells `health` when the pool could not connect.

    The pool connects in its own threads and only makes waiting callers wait longer; this is
    how a caller learns that the server is unreachable and fails now, with the real error.
    """
    import psycopg

    class Watched(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                return super().connect(conninfo, **kwargs)
            except Exception as exc:
                health.failed = (time.monotonic(), exc)
                raise

    return Watched


# ---------------------------------------------------------------------------- async pools


class LoopPool:
    """One event loop's async connections: at most `size` in use, idle ones kept for reuse.

    An `asyncio.Semaphore` bounds the connections in use; a caller takes an idle connection
    or opens one. Connections older than the last `drain` (a broken one was found: the
    server probably restarted) are closed when they come back instead of being reused.
    Everything here runs in the loop's thread, except `shut` (any thread).
    """

    __slots__ = ("closed", "conns", "generation", "idle", "loop", "size", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.size = size
        self.slots = asyncio.Semaphore(size)
        self.idle: list[psycopg.AsyncConnection[Any]] = []
        # every open connection, idle or in use -> the generation it was opened in
        self.conns: dict[psycopg.AsyncConnection[Any], int] = {}
        self.generation = 0
        self.closed = False

    def add(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conns[conn] = self.generation

    def keep(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A connection is no longer in use: back to the idle ones, or closed."""
        from psycopg.pq import TransactionStatus

        if (
            self.closed
            or self.conns.get(conn) != self.generation
            or conn.closed
            or conn.pgconn.transaction_status != TransactionStatus.IDLE
        ):
            self.conns.pop(conn, None)
            finish(conn)
        else:
            self.idle.append(conn)

    def adopt(self, task: asyncio.Future[psycopg.AsyncConnection[Any]]) -> None:
        """A connection that finished opening after its caller was cancelled: keep it idle."""
        if task.cancelled() or task.exception() is not None:
            return
        conn = task.result()
        if self.closed or len(self.conns) >= self.size:
            finish(conn)
        else:
            self.add(conn)
            self.idle.append(conn)

    def drain(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        self.generation += 1
        idle, self.idle = self.idle, []
        for conn in idle:
            self.conns.pop(conn, None)
            finish(conn)

    def shut(self) -> None:
        """Close this pool (from any thread): every connection if its loop is gone or idle,
        else the idle ones in the loop's thread; those in use close when they come back."""
        self.closed = True
        loop = self.loop
        if loop.is_closed() or not loop.is_running():
            conns, self.conns, self.idle = self.conns, {}, []
            for conn in conns:
                finish(conn)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.drain()
        else:
            with suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.drain)


class Connections:
    """Every connection of one store: the sync pool and one `LoopPool` per event loop.

    Kept apart from the store so that a finalizer can close them when the store is collected
    or the interpreter exits, without keeping the store alive. The loop pools are keyed by
    their loop (a strong reference: a closed loop's pool is swept, its connections closed,
    as soon as another loop makes its own pool, or on close).
    """

    __slots__ = ("closed", "health", "lock", "loops", "sync")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sync: ConnectionPool[psycopg.Connection[Any]] | None = None
        self.loops: dict[asyncio.AbstractEventLoop, LoopPool] = {}
        self.health = Health()
        self.closed = False

    def loop_pool(self, loop: asyncio.AbstractEventLoop, size: int) -> LoopPool:
        with self.lock:
            if self.closed:
                raise RuntimeError("PostgresStore is closed")
            pool = self.loops.get(loop)
            if pool is None:
                for old in [p for p in self.loops.values() if p.loop.is_closed()]:
                    del self.loops[old.loop]
                    old.shut()
                pool = self.loops[loop] = LoopPool(loop, size)
            return pool

    def close(self, wait: float = CLOSE_WAIT) -> None:
        with self.lock:
            self.closed = True
            sync, self.sync = self.sync, None
            loops, self.loops = self.loops, {}
        if sync is not None:
            sync.close(wait)
        for pool in loops.values():
            pool.shut()
