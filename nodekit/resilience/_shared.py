"""State shared across processes through a store: what every store has in common.

Each store module (`_sqlite.py`, `_redis.py`, `_postgres.py`) supplies the atomic steps
(`BreakerSteps`, `SlotSteps`) and a `LimiterBackend` of its own; this module wraps them once:

- `SharedBreaker`: a breaker whose healthy, closed state is cached in the process. While the
  shared window holds no failure, admitting a call costs no round trip and successes are
  counted locally and sent at most `SYNC_EVERY` seconds later (with the next step that goes
  to the store). A failure, a probe, or any state but closed-and-healthy goes to the store
  on every call, and a failure carries the successes still held back. What that means for
  `min_calls`: the store's window lacks at most `SYNC_EVERY` worth of *successes*, so the
  failure rate it judges can only be higher (never a later opening); and a process learns
  that the window is no longer healthy up to `SYNC_EVERY` late, but its own first failure
  is sent at once and ends its cached view. The calls that reach a failing service beyond
  `min_calls` are therefore those already admitted when it opened — at most one per
  concurrent caller (thread, task or process) — as without the cache.
- `SharedSlots`: leased bulkhead slots. A holder's lease is renewed by one daemon thread
  (`Keeper`) every third of the lease while it holds; a process that dies stops renewing, and
  its slot is free again when the lease ends. A caller that finds every slot taken polls the
  store (2 ms, doubling to 50 ms) until its deadline; across processes there is no queue
  order.

Failure of the store, carried out by the guards (`CircuitGuard`, `RateLimitGuard`,
`BulkheadGuard`): a rate limit or a bulkhead that cannot reach its store **refuses** the
attempt (`RateLimited` / `BulkheadFull`, safe, chained to the store's error): the limit
exists because the service cannot take more, and a process that cannot coordinate must not
guess. A breaker **admits** the call (event ``circuit.store_failed``): it protects callers
from a failing *service*, and a store outage says nothing about the service; outcomes it
cannot record are dropped. A store error after the function ran (an outcome, a pause, a
slot's release) never replaces the call's own result or error: a slot whose release failed
comes back when its lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from typing import Any, Protocol

from ._state import (
    CLOSED,
    FULL,
    PASS,
    SLOT,
    TIMED_OUT,
    Admission,
    BreakerSettings,
    SlotSettings,
    Transition,
)

__all__ = ["SYNC_EVERY", "BreakerSteps", "Keeper", "SharedBreaker", "SharedSlots", "SlotSteps"]

# how stale a process's view of a healthy shared breaker may be, and how long its successes
# wait to be flushed (seconds)
SYNC_EVERY = 0.05

# a bulkhead's poll for a free slot: first wait, and the longest (seconds)
_POLL_FIRST = 0.002
_POLL_MOST = 0.05


class BreakerSteps(Protocol):
    """A store's atomic breaker steps (`_rules.breaker_*`, on the store's clock)."""

    def admit(self, successes: int) -> tuple[bool, str, int | None, float | None, bool, bool]: ...

    def record(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]: ...

    def release(self, probe: int) -> None: ...

    def force(self, state: str) -> bool: ...

    def read(self) -> str: ...

    async def aadmit(
        self, successes: int
    ) -> tuple[bool, str, int | None, float | None, bool, bool]: ...

    async def arecord(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]: ...

    async def arelease(self, probe: int) -> None: ...


class SharedBreaker:
    """`BreakerBackend` over a store's `BreakerSteps`, with the healthy closed state cached."""

    shared = True

    def __init__(self, settings: BreakerSettings, steps: BreakerSteps) -> None:
        self.settings = settings
        self.steps = steps
        self._lock = threading.Lock()
        self._healthy_until = 0.0  # monotonic: until then, closed and healthy without asking
        self._pending = 0  # successes not yet flushed to the store
        self._flush_at = 0.0

    # -- the cache

    def _take(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, 0
        return pending

    def _learn(self, healthy: bool) -> None:
        now = time.monotonic()
        self._healthy_until = now + SYNC_EVERY if healthy else 0.0
        self._flush_at = now + SYNC_EVERY

    def _admission(self, answer: tuple[Any, ...]) -> Admission:
        allowed, state, probe, retry_after, half_opened, healthy = answer
        self._learn(healthy)
        if allowed and state == CLOSED:
            return PASS
        return Admission(allowed, state, probe, retry_after, half_opened)

    def _successes(self, probe: int | None, failed: bool) -> int | None:
        """None: a success counted locally, nothing to send now. Otherwise the batched
        successes to send with this outcome (which the step counts itself)."""
        if failed or probe is not None or time.monotonic() >= self._healthy_until:
            return self._take()
        with self._lock:
            self._pending += 1
        if time.monotonic() < self._flush_at:
            return None
        return max(self._take() - 1, 0)

    def _transition(self, answer: tuple[Any, ...]) -> Transition | None:
        to, calls, failures, healthy = answer
        self._learn(healthy)
        return None if to is None else Transition(to, calls, failures)

    # -- BreakerBackend

    def admit(self, now: float) -> Admission:
        if time.monotonic() < self._healthy_until:
            return PASS
        return self._admission(self.steps.admit(self._take()))

    async def aadmit(self, now: float) -> Admission:
        if time.monotonic() < self._healthy_until:
            return PASS
        return self._admission(await self.steps.aadmit(self._take()))

    def record(self, now: float, probe: int | None, failed: bool) -> Transition | None:
        successes = self._successes(probe, failed)
        if successes is None:
            return None
        return self._transition(self.steps.record(successes, probe, failed))

    async def arecord(self, now: float, probe: int | None, failed: bool) -> Transition | None:
        successes = self._successes(probe, failed)
        if successes is None:
            return None
        return self._transition(await self.steps.arecord(successes, probe, failed))

    def release(self, probe: int) -> None:
        self.steps.release(probe)

    async def arelease(self, probe: int) -> None:
        await self.steps.arelease(probe)

    def force(self, now: float, state: str) -> Transition | None:
        self._healthy_until = 0.0
        self._take()
        return Transition(state) if self.steps.force(state) else None

    def read(self, now: float) -> str:
        return self.steps.read()


# ---------------------------------------------------------------------------- bulkhead


class SlotSteps(Protocol):
    """A store's atomic slot steps (`_rules.slots_*`, on the store's clock)."""

    def take(self, token: str, limit: int, queue: int, lease: float) -> str: ...

    def renew(self, token: str, lease: float) -> bool: ...

    def give(self, token: str) -> None: ...

    def count(self) -> int: ...

    async def atake(self, token: str, limit: int, queue: int, lease: float) -> str: ...

    async def agive(self, token: str) -> None: ...


def _token() -> str:
    return os.urandom(12).hex()


class SharedSlots:
    """`SlotBackend` over a store's `SlotSteps`: leased slots, renewed while held."""

    shared = True

    def __init__(self, settings: SlotSettings, steps: SlotSteps, lease: float) -> None:
        self.settings = settings
        self.steps = steps
        self.lease = lease

    def acquire(self, budget: float | None) -> Any:
        settings, steps, lease = self.settings, self.steps, self.lease
        token = _token()
        deadline = None if budget is None else time.monotonic() + budget
        poll = _POLL_FIRST
        while True:
            got = steps.take(token, settings.limit, settings.queue, lease)
            if got == SLOT:
                KEEPER.hold(self, token)
                return token
            if got == FULL:
                return FULL
            pause = _next_pause(poll, deadline)
            if pause is None:
                steps.give(token)  # leave the queue
                return TIMED_OUT
            time.sleep(pause)
            poll = min(poll * 2, _POLL_MOST)

    async def aacquire(self, budget: float | None) -> Any:
        settings, steps, lease = self.settings, self.steps, self.lease
        token = _token()
        deadline = None if budget is None else time.monotonic() + budget
        poll = _POLL_FIRST
        try:
            while True:
                got = await steps.atake(token, settings.limit, settings.queue, lease)
                if got == SLOT:
                    KEEPER.hold(self, token)
                    return token
                if got == FULL:
                    return FULL
                pause = _next_pause(poll, deadline)
                if pause is None:
                    await steps.agive(token)
                    return TIMED_OUT
                await asyncio.sleep(pause)
                poll = min(poll * 2, _POLL_MOST)
        except asyncio.CancelledError:
            # a slot or queue place taken as the task was cancelled: give it back now
            # (its lease would free it anyway), from a thread, since this task may not await
            threading.Thread(target=self._give_quietly, args=(token,), daemon=True).start()
            raise

    def _give_quietly(self, token: str) -> None:
        with contextlib.suppress(Exception):  # else its lease frees it
            self.steps.give(token)

    def release(self, slot: Any) -> None:
        KEEPER.drop(slot)
        self.steps.give(slot)

    async def arelease(self, slot: Any) -> None:
        KEEPER.drop(slot)
        await self.steps.agive(slot)

    def in_use(self) -> int:
        return self.steps.count()


def _next_pause(poll: float, deadline: float | None) -> float | None:
    """The next poll's wait (jittered), or None once the deadline has passed."""
    pause = poll * (0.5 + random.random())
    if deadline is None:
        return pause
    left = deadline - time.monotonic()
    if left <= 0.0:
        return None
    return min(pause, left)


class Keeper:
    """Renews every held bulkhead slot, every third of its lease, from one daemon thread.

    `hold` and `drop` only touch a dict; the thread wakes every third of the shortest lease
    held and renews the slots held longer than that. A renewal that fails (store down, or the
    slot already expired) is tried again at the next wake; the holder keeps running, and its
    slot may then be given to another caller once the lease ends (the bulkhead then briefly
    admits one call too many, which is the price of not refusing a call that already runs).
    """

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self._held: dict[str, tuple[SharedSlots, float]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, slots: SharedSlots, token: str) -> None:
        self._held[token] = (slots, time.monotonic())
        if self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="nodekit-slot-keeper", daemon=True
                    )
                    self._thread.start()

    def drop(self, token: str) -> None:
        self._held.pop(token, None)

    def _loop(self) -> None:
        while True:
            held = list(self._held.items())
            period = min((s.lease for _, (s, _) in held), default=1.0) / 3
            now = time.monotonic()
            for token, (slots, since) in held:
                if now - since < slots.lease / 3 or token not in self._held:
                    continue
                try:
                    kept = slots.steps.renew(token, slots.lease)
                except Exception:  # the store is down: tried again at the next wake
                    continue
                if kept and token in self._held:
                    self._held[token] = (slots, now)
                else:  # released meanwhile, or expired and maybe taken: nothing to keep
                    self._held.pop(token, None)
            with self._cond:
                self._cond.wait(period)


KEEPER = Keeper()
os.register_at_fork(after_in_child=KEEPER._start)  # a child holds none of its parent's slots
