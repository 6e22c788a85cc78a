"""The state behind each primitive: one small backend protocol each, and its in-memory form.

A primitive (`CircuitBreaker`, `RateLimit`, `Bulkhead`) never touches its counters itself: it
asks its backend for one atomic step and acts on the answer (emit, wait, raise). The steps
are chosen so that a shared store can do each one as a single atomic operation (a Lua
script on Redis, one conditional statement or transaction on SQL):

- breaker: `admit` (pass; or move an open breaker whose time is up to half-open and reserve
  one of its probe places, an expiring, fenced reservation; or refuse), `record` (an outcome:
  a probe's counts only while its reservation holds), `release` (a probe that ended without
  an outcome), `force` (isolate / reset) and `read`;
- rate limit: `reserve` (one GCRA step: the wait before this call may start, reserved only
  if it fits in the caller's budget) and `pause` (a server's Retry-After);
- bulkhead: `acquire` / `aacquire` (a slot, waiting in a bounded queue up to a timeout) and
  `release`; a shared store's slots are leased, so a crashed holder's slot comes back.

Times are `time.monotonic()` seconds here; a shared backend uses the store's clock instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "CLOSED",
    "FULL",
    "HALF_OPEN",
    "ISOLATED",
    "OPEN",
    "PASS",
    "SLOT",
    "TIMED_OUT",
    "Admission",
    "BreakerBackend",
    "BreakerSettings",
    "LimiterBackend",
    "LimiterSettings",
    "MemoryBreaker",
    "MemoryLimiter",
    "MemorySlots",
    "SlotBackend",
    "SlotSettings",
    "Transition",
]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
ISOLATED = "isolated"

# ---------------------------------------------------------------------------- breaker


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_rate: float
    min_calls: int
    window: float
    open_for: float
    half_open_calls: int
    probe_lease: float


@dataclass(frozen=True, slots=True)
class Admission:
    """A breaker's answer to one call.

    `probe` is the fencing token of a half-open probe reservation (None for a call admitted
    while closed); `retry_after` the seconds until a probe may pass when refused (None when
    unknown); `half_opened` is true when this call moved the breaker to half-open.
    """

    allowed: bool
    state: str
    probe: int | None = None
    retry_after: float | None = None
    half_opened: bool = False


PASS = Admission(True, CLOSED)


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state caused by a recorded outcome or a forced state."""

    to: str
    calls: int = 0
    failures: int = 0


class BreakerBackend(Protocol):
    """A circuit breaker's state; every method is one atomic step."""

    settings: BreakerSettings

    def admit(self, now: float) -> Admission: ...

    def record(self, now: float, probe: int | None, failed: bool) -> Transition | None: ...

    def release(self, probe: int) -> None: ...

    def force(self, now: float, state: str) -> Transition | None: ...

    def read(self, now: float) -> str: ...


_BUCKETS = 10


class MemoryBreaker:
    """A breaker's state in this process: a sliding window of `_BUCKETS` buckets.

    Outcomes older than the window are forgotten a bucket (window / 10) at a time. The healthy
    case takes no lock: a success while closed, with no failure in the window and within the
    current bucket, only bumps that bucket's count (two threads bumping it at the same
    instant may count one success, which can only make the breaker a little more cautious).
    Everything else — a failure, a new bucket, a probe — happens under the lock.
    """

    _ids: list[int]
    _calls: list[int]
    _fails: list[int]
    _index: int
    _bucket_end: float
    _failing: bool

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._state = CLOSED
        self._width = settings.window / _BUCKETS
        self._opened_at = 0.0
        self._probes: dict[int, float] = {}  # fencing token -> reservation expiry
        self._passed = 0  # probes that succeeded in this half-open period
        self._fence = 0
        self._clear_window()

    def admit(self, now: float) -> Admission:
        # Unlocked read: closed is the common case, and a call racing the opening is one of
        # the calls that were already on their way.
        if self._state is CLOSED:
            return PASS
        with self._lock:
            return self._admit(now)

    def _admit(self, now: float) -> Admission:
        state = self._state
        if state is CLOSED:
            return PASS
        if state is ISOLATED:
            return Admission(False, ISOLATED)
        settings = self.settings
        half_opened = False
        if state is OPEN:
            until = self._opened_at + settings.open_for
            if now < until:
                return Admission(False, OPEN, retry_after=until - now)
            self._state = HALF_OPEN
            self._probes.clear()
            self._passed = 0
            half_opened = True
        probes = self._probes
        for token in [token for token, expires in probes.items() if expires <= now]:
            del probes[token]  # a probe that never reported: its place is free again
        if len(probes) + self._passed >= settings.half_open_calls:
            return Admission(False, HALF_OPEN, half_opened=half_opened)
        self._fence += 1
        probes[self._fence] = now + settings.probe_lease
        return Admission(True, HALF_OPEN, probe=self._fence, half_opened=half_opened)

    def record(self, now: float, probe: int | None, failed: bool) -> Transition | None:
        if (
            not failed
            and probe is None
            and not self._failing
            and now < self._bucket_end
            and self._state is CLOSED
        ):
            self._calls[self._index] += 1
            return None
        with self._lock:
            if probe is not None:
                return self._probe_outcome(now, probe, failed)
            if self._state is not CLOSED:
                return None  # admitted before the breaker opened: the window restarted since
            if now >= self._bucket_end:
                self._advance(now)
            index = self._index
            self._calls[index] += 1
            if failed:
                self._fails[index] += 1
                self._failing = True
            if not self._failing:
                return None
            settings = self.settings
            calls, failures = sum(self._calls), sum(self._fails)
            if calls >= settings.min_calls and failures >= settings.failure_rate * calls:
                self._open(now)
                return Transition(OPEN, calls, failures)
            return None

    def _advance(self, now: float) -> None:
        """Forget the buckets that fell out of the window; start the bucket `now` is in."""
        bucket = int(now // self._width)
        oldest = bucket - _BUCKETS
        for index in range(_BUCKETS):
            if self._ids[index] <= oldest:
                self._ids[index] = -1
                self._calls[index] = self._fails[index] = 0
        self._index = bucket % _BUCKETS
        self._ids[self._index] = bucket
        self._bucket_end = (bucket + 1) * self._width
        self._failing = any(self._fails)

    def _probe_outcome(self, now: float, probe: int, failed: bool) -> Transition | None:
        if self._state is not HALF_OPEN or self._probes.pop(probe, None) is None:
            return None  # fenced off: the reservation expired or the period ended
        if failed:
            self._open(now)
            return Transition(OPEN, self._passed + 1, 1)
        self._passed += 1
        if self._passed >= self.settings.half_open_calls:
            calls = self._passed
            self._close()
            return Transition(CLOSED, calls, 0)
        return None

    def _clear_window(self) -> None:
        self._ids = [-1] * _BUCKETS
        self._calls = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._index = 0
        self._bucket_end = float("-inf")  # the next outcome starts a bucket
        self._failing = False  # a failure is in the window: outcomes take the lock
        self._probes.clear()
        self._passed = 0

    def _open(self, now: float) -> None:
        self._clear_window()
        self._state = OPEN
        self._opened_at = now

    def _close(self) -> None:
        self._clear_window()
        self._state = CLOSED

    def release(self, probe: int) -> None:
        with self._lock:
            self._probes.pop(probe, None)

    def force(self, now: float, state: str) -> Transition | None:
        with self._lock:
            if self._state is state:
                return None
            if state is CLOSED:
                self._close()
            else:
                self._clear_window()
                self._state = ISOLATED
            return Transition(state)

    def read(self, now: float) -> str:
        state = self._state
        if state is OPEN and now >= self._opened_at + self.settings.open_for:
            return HALF_OPEN  # the next call will be a probe
        return state


# ---------------------------------------------------------------------------- rate limit


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    interval: float  # seconds between calls at the steady rate
    burst: int


class LimiterBackend(Protocol):
    """A rate limit's state (GCRA: one theoretical arrival time); each method is atomic."""

    settings: LimiterSettings

    def reserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        """``(True, wait)``: the call may start after `wait` seconds, its place reserved; or
        ``(False, wait)``: it would have to wait longer than `budget`; nothing reserved."""
        ...

    def pause(self, now: float, seconds: float) -> bool:
        """Let no call start for `seconds`; False if a longer pause already holds."""
        ...


class MemoryLimiter:
    """GCRA in this process: a call may start at ``tat - tolerance``, then moves ``tat`` on by
    one interval; the tolerance ``(burst - 1) * interval`` lets `burst` calls start at once
    after a quiet period."""

    __slots__ = ("_interval", "_lock", "_tat", "_tolerance", "settings")

    def __init__(self, settings: LimiterSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._interval = settings.interval
        self._tolerance = (settings.burst - 1) * settings.interval
        self._tat = 0.0

    def reserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        # acquire/release, not `with`: the context-manager protocol costs several times the
        # lock itself on this, the path of every rate-limited attempt
        lock = self._lock
        lock.acquire()
        try:
            tat = self._tat if self._tat > now else now
            wait = tat - self._tolerance - now
            if wait <= 0.0:
                wait = 0.0
            elif budget is not None and wait > budget:
                return False, wait
            self._tat = tat + self._interval
            return True, wait
        finally:
            lock.release()

    def pause(self, now: float, seconds: float) -> bool:
        # the next call may start at now + seconds, and then one per interval (no burst)
        tat = now + seconds + self._tolerance
        with self._lock:
            if tat <= self._tat:
                return False
            self._tat = tat
            return True


# ---------------------------------------------------------------------------- bulkhead

# what `acquire` returns: the memory backend's one kind of slot, or why there is none
SLOT = "slot"
FULL = "full"
TIMED_OUT = "timed_out"
_QUEUE = "queue"


@dataclass(frozen=True, slots=True)
class SlotSettings:
    limit: int
    queue: int


class SlotBackend(Protocol):
    """A bulkhead's slots, shared by threads and tasks (and processes, with a store)."""

    settings: SlotSettings

    def acquire(self, budget: float | None) -> Any:
        """A slot (a lease, released with `release`), or `FULL` when `limit` calls run and
        `queue` wait already, or `TIMED_OUT` when no slot came within `budget` seconds (None:
        no limit)."""
        ...

    async def aacquire(self, budget: float | None) -> Any: ...

    def release(self, slot: Any) -> None: ...

    def in_use(self) -> int: ...


class _Waiter:
    __slots__ = ("granted", "wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.granted = False
        self.wake = wake


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MemorySlots:
    """Slots in this process: one count under one lock, for threads and tasks alike.

    A released slot is handed straight to the first waiter (first come, first served), so a
    newcomer never overtakes the queue and the count never exceeds the limit. A thread waits
    on an event, a task on a future of its own loop.
    """

    def __init__(self, settings: SlotSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._used = 0
        self._waiters: deque[_Waiter] = deque()

    def _take(self) -> Any:
        """Under the lock: `SLOT`, `FULL`, or `_QUEUE` (the caller queues a waiter)."""
        if self._used < self.settings.limit and not self._waiters:
            self._used += 1
            return SLOT
        if len(self._waiters) >= self.settings.queue:
            return FULL
        return _QUEUE

    def acquire(self, budget: float | None) -> Any:
        with self._lock:
            got = self._take()
            if got is not _QUEUE:
                return got
            event = threading.Event()
            waiter = _Waiter(event.set)
            self._waiters.append(waiter)
        event.wait(budget)
        return SLOT if self._leave(waiter) else TIMED_OUT

    async def aacquire(self, budget: float | None) -> Any:
        with self._lock:
            got = self._take()
            if got is not _QUEUE:
                return got
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                loop.call_soon_threadsafe(_resolve, future)

            waiter = _Waiter(wake)
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(budget):
                await future
        except TimeoutError:
            return SLOT if self._leave(waiter) else TIMED_OUT
        except BaseException:
            if self._leave(waiter):  # granted as it was cancelled: pass the slot on
                self.release(SLOT)
            raise
        return SLOT

    def _leave(self, waiter: _Waiter) -> bool:
        """Whether the waiter got its slot; if not, it leaves the queue."""
        with self._lock:
            if waiter.granted:
                return True
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return False

    def release(self, slot: Any) -> None:
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                try:
                    waiter.wake()
                except RuntimeError:  # its event loop is closed: the next waiter gets it
                    waiter.granted = False
                    continue
                return
            self._used -= 1

    def in_use(self) -> int:
        return self._used
