"""`Bulkhead`: at most `limit` attempts at once, a bounded queue, and `BulkheadFull` beyond it.

Sync and async callers share one count: a thread waits on an event, a task on a future, and
a released slot goes to the first in the queue. A queued attempt waits until the call's
deadline (or for ever without one); the rest are refused with `BulkheadFull` (safe: the
function did not run). A sync attempt abandoned at its timeout still runs in its worker
thread, so it keeps its slot until it really ends.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .._errors import BulkheadFull, NodeTimeout
from .._events import emit
from .._policies import Seconds
from .._spec import NodeSpec
from ._common import cell_for, check_count, check_name, check_seconds, state_for
from ._state import FULL, TIMED_OUT, MemorySlots, SlotBackend, SlotSettings

__all__ = ["Bulkhead", "BulkheadGuard"]

_KIND = "Bulkhead"


class Bulkhead:
    """A concurrency limit shared by every node that names it in ``@nk.node(bulkhead=...)``.

    At most `limit` attempts run at once, across threads and tasks; up to `queue` more wait
    (first come, first served) within their deadline. `store=None` keeps the count in this
    object; a `MemoryStore` shares it with every bulkhead of the same name on that store; a
    SQLite, Redis or PostgreSQL store with every process using it: each slot is a lease of
    `lease` seconds (default 10), renewed while its holder runs, so the slot of a process that
    dies comes back at most `lease` later. Across processes, waiters poll the store (no queue
    order). A bulkhead whose store cannot be reached refuses the attempt (`BulkheadFull`,
    safe). `in_use` is the number of slots taken now.
    """

    __slots__ = ("_backend", "_guard", "lease", "limit", "name", "queue", "store")

    def __init__(
        self,
        name: str,
        limit: int,
        *,
        queue: int = 0,
        store: Any = None,
        lease: Seconds = 10.0,
    ) -> None:
        self.name = check_name(_KIND, name)
        self.limit = check_count(_KIND, name, "limit", limit, least=1)
        self.queue = check_count(_KIND, name, "queue", queue, least=0)
        self.lease = check_seconds(_KIND, name, "lease", lease)
        self.store = store
        settings = SlotSettings(limit=self.limit, queue=self.queue)
        self._backend: SlotBackend = state_for(
            _KIND,
            self.name,
            store,
            settings,
            lambda: MemorySlots(settings),
            lambda kind, store: _shared_slots(kind, store, self.name, settings, self.lease),
        )
        self._guard = BulkheadGuard(self)

    @property
    def in_use(self) -> int:
        return self._backend.in_use()

    def __repr__(self) -> str:
        # a shared count is not read for a repr: that would be I/O, and it may fail
        where = (
            f"store={self.store!r}"
            if getattr(self._backend, "shared", False)
            else f"in_use={self.in_use}"
        )
        return f"Bulkhead({self.name!r}, {self.limit}, queue={self.queue}, {where})"


class BulkheadGuard:
    """The bulkhead as one per-attempt layer (`_spec.AttemptGuard`).

    With a shared store, a store that fails *refuses* the attempt: `BulkheadFull` chained to
    the store's error (safe: the function did not run). A release that fails is left to the
    slot's lease.
    """

    __slots__ = ("backend", "name", "shared")

    # entering may wait (for the rate, for a slot): an async node always awaits it
    awaits = True

    def __init__(self, bulkhead: Bulkhead) -> None:
        self.name = bulkhead.name
        self.backend = bulkhead._backend
        self.shared = getattr(self.backend, "shared", False)

    def _refuse(self, spec: NodeSpec, ctx: Any, why: str) -> BulkheadFull:
        settings = self.backend.settings
        emit(
            "bulkhead.rejected",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            bulkhead=self.name,
            reason=why,
        )
        said = (
            f"{settings.limit} running and {settings.queue} queued"
            if why == FULL
            else "no slot came free before the deadline"
            if why == TIMED_OUT
            else f"its store cannot be reached ({why})"
        )
        return BulkheadFull(
            f"node {spec.name!r}: bulkhead {self.name!r} is full ({said}); "
            "the function did not run",
            node=spec.name,
            bulkhead=self.name,
            limit=settings.limit,
            queue=settings.queue,
        )

    def _store_failed(self, spec: NodeSpec, ctx: Any, exc: Exception) -> BulkheadFull:
        emit(
            "bulkhead.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc, bulkhead=self.name
        )
        return self._refuse(spec, ctx, type(exc).__name__)

    def enter(self, spec: NodeSpec, ctx: Any) -> Any:
        try:
            slot = self.backend.acquire(ctx.remaining())
        except Exception as exc:
            raise self._store_failed(spec, ctx, exc) from exc
        if slot is FULL or slot is TIMED_OUT:
            raise self._refuse(spec, ctx, slot)
        return slot

    async def aenter(self, spec: NodeSpec, ctx: Any) -> Any:
        try:
            slot = await self.backend.aacquire(ctx.remaining())
        except Exception as exc:
            raise self._store_failed(spec, ctx, exc) from exc
        if slot is FULL or slot is TIMED_OUT:
            raise self._refuse(spec, ctx, slot)
        return slot

    def _release_quietly(self, spec: NodeSpec, ctx: Any, token: Any) -> None:
        try:
            self.backend.release(token)
        except Exception as exc:  # its lease gives the slot back
            emit("bulkhead.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc)

    def exit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None:
        if isinstance(error, NodeTimeout) and error.when_finished is not None:
            # abandoned, still running in its worker thread: the slot is its until it ends
            error.when_finished(partial(self._release_quietly, spec, ctx, token))
            return
        self._release_quietly(spec, ctx, token)

    async def aexit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None:
        if not self.shared or (isinstance(error, NodeTimeout) and error.when_finished is not None):
            self.exit(spec, ctx, token, error, now, duration)
            return
        backend: Any = self.backend
        try:
            await backend.arelease(token)
        except Exception as exc:
            emit("bulkhead.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc)


def _shared_slots(
    store_kind: str, store: Any, name: str, settings: SlotSettings, lease: float
) -> SlotBackend:
    from ._shared import SharedSlots

    steps: Any
    if store_kind == "redis":
        from ._redis import RedisSlots

        steps = RedisSlots(store, name)
    else:
        from ._docs import DocSlots

        steps = DocSlots(cell_for(store_kind, store), name)
    return SharedSlots(settings, steps, lease)
