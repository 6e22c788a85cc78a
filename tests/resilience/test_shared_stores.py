"""Shared breakers, limits and bulkheads in one process, on SQLite, Redis and PostgreSQL:
sync and async twins, what a store outage does, and what a call costs in round trips."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.resilience._shared import SYNC_EVERY
from nodekit.testing import FaultProxy, capture_events

STORES = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.services),
    pytest.param("postgres", marks=pytest.mark.services),
]


class Outage:
    """A store whose server can be cut off and brought back: Redis and PostgreSQL behind a
    `FaultProxy` (connections reset, new ones refused); SQLite with its file locked by
    another connection (``BEGIN EXCLUSIVE``; the store's busy timeout is short)."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.proxy: FaultProxy | None = None
        self.locker: sqlite3.Connection | None = None
        if kind == "sqlite":
            self.path = str(tmp_path / "shared.db")
            self.store: Any = nk.SQLiteStore(self.path, busy_timeout=0.2)
        elif kind == "redis":
            from nodekit.idempotency.redis import RedisStore

            request.getfixturevalue("redis_url")
            self.proxy = FaultProxy("127.0.0.1", 6379).start()
            self.store = RedisStore(
                self.proxy.url("redis://{address}/0"),
                prefix=request.getfixturevalue("redis_prefix"),
                pool_timeout=1.0,
                socket_timeout=1.0,
                socket_connect_timeout=1.0,
            )
        else:
            from nodekit.idempotency.postgres import PostgresStore

            request.getfixturevalue("postgres_url")
            self.proxy = FaultProxy("127.0.0.1", 5432).start()
            self.store = PostgresStore(
                self.proxy.url("postgresql://postgres@{address}/test"),
                schema=request.getfixturevalue("pg_schema"),
                pool_timeout=1.0,
            )

    def cut(self) -> None:
        if self.proxy is not None:
            self.proxy.refuse()
            self.proxy.cut()
        else:
            self.locker = sqlite3.connect(self.path, isolation_level=None)
            self.locker.execute("BEGIN EXCLUSIVE")

    def heal(self) -> None:
        if self.proxy is not None:
            self.proxy.heal()
        elif self.locker is not None:
            self.locker.execute("ROLLBACK")
            self.locker.close()
            self.locker = None

    def close(self) -> None:
        self.heal()
        self.store.close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture(params=STORES)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    kind = request.param
    made = Outage(kind, request, tmp_path)
    yield made
    made.close()


@pytest.fixture
def store(outage: Outage) -> Any:
    return outage.store


# ---------------------------------------------------------------------------- twins


async def test_async_half_open_admits_one_probe_among_concurrent_tasks(store: Any) -> None:
    """Async twin: an open shared breaker whose time is up lets one of five tasks probe."""
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, open_for=0.2, store=store)
    reached = []

    @nk.node(circuit=breaker, effect=nk.Effect.READ)
    async def call(fail: bool) -> str:
        reached.append(fail)
        await asyncio.sleep(0.05)
        if fail:
            raise ConnectionError("down")
        return "ok"

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await call(True)
    assert breaker.state == "open"
    with pytest.raises(nk.CircuitOpen):
        await call(False)
    await asyncio.sleep(0.25)
    outcomes = await asyncio.gather(*(call(False) for _ in range(5)), return_exceptions=True)
    assert sum(1 for o in outcomes if o == "ok") == 1
    assert sum(1 for o in outcomes if isinstance(o, nk.CircuitOpen)) == 4
    assert breaker.state == "closed"
    assert len(reached) == 3


def test_successes_counted_locally_reach_the_store_before_a_failure(store: Any) -> None:
    """A healthy breaker batches its successes, but sends them with the first failure: the
    failure rate the store judges is the true one (3 of 6 here opens it, 2 of 5 does not)."""
    breaker = nk.CircuitBreaker("api", min_calls=6, failure_rate=0.5, store=store)

    @nk.node(circuit=breaker, effect=nk.Effect.READ, retry=None)
    def call(fail: bool) -> None:
        if fail:
            raise ConnectionError("down")

    for _ in range(3):
        call(False)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            call(True)
    assert breaker.state == "closed"
    with pytest.raises(ConnectionError):
        call(True)
    assert breaker.state == "open"


def test_a_probe_that_never_reports_frees_its_place_at_expiry_and_is_fenced_off(
    store: Any,
) -> None:
    """The half-open reservation expires (a probe holder that died gives its place back),
    and the late outcome of the expired probe changes nothing."""
    breaker = nk.CircuitBreaker("api", min_calls=1, failure_rate=1.0, open_for=0.2, store=store)
    backend: Any = breaker._backend
    backend.record(0.0, None, True)  # one failure opens it
    assert breaker.state == "open"
    time.sleep(0.22)
    first = backend.admit(0.0)
    assert first.allowed
    assert first.probe is not None
    assert first.half_opened
    assert not backend.admit(0.0).allowed  # one probe at a time
    time.sleep(0.22)  # the first probe's holder never reported: its place is free again
    second = backend.admit(0.0)
    assert second.allowed
    assert second.probe not in (None, first.probe)
    assert backend.record(0.0, first.probe, True) is None  # fenced off: stays half-open
    closed = backend.record(0.0, second.probe, False)
    assert closed is not None
    assert closed.to == "closed"
    assert breaker.state == "closed"


def test_sync_breaker_joins_and_isolate_reset_are_shared(store: Any) -> None:
    """Two breakers of one name on one store are one breaker: isolate and reset included."""
    first = nk.CircuitBreaker("api", store=store)
    second = nk.CircuitBreaker("api", store=store)
    first.isolate()
    assert second.state == "isolated"

    @nk.node(circuit=second)
    def call() -> str:
        return "ran"

    with pytest.raises(nk.CircuitOpen):
        call()
    second.reset()
    assert first.state == "closed"
    assert call() == "ran"


async def test_async_bulkhead_runs_at_most_its_limit_and_times_out_the_rest(store: Any) -> None:
    """Async twin: a shared bulkhead of 2 runs 2 tasks at once; a waiter past its deadline
    gets `BulkheadFull`."""
    bulkhead = nk.Bulkhead("api", 2, queue=10, store=store)
    running, most = 0, 0

    @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ)
    async def call(seconds: float) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(seconds)
        running -= 1

    await asyncio.gather(*(call(0.03) for _ in range(6)))
    assert most == 2
    assert bulkhead.in_use == 0

    hurried = call.options(timeout=nk.Timeout(total=0.1))
    slow = [asyncio.ensure_future(call(0.4)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(nk.BulkheadFull):
        await hurried(0.0)
    await asyncio.gather(*slow)


def test_sync_bulkhead_waits_within_the_deadline_then_refuses(store: Any) -> None:
    """Sync twin: with the one slot held elsewhere, a caller waits until its deadline and
    gets `BulkheadFull`; once the slot is given back, the next caller runs."""
    bulkhead = nk.Bulkhead("api", 1, queue=1, store=store)
    other = nk.Bulkhead("api", 1, queue=1, store=store)  # another holder of the same slots
    held = other._backend.acquire(None)

    @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ, timeout=nk.Timeout(total=0.2))
    def call() -> str:
        return "ran"

    started = time.monotonic()
    with pytest.raises(nk.BulkheadFull):
        call()
    assert 0.15 <= time.monotonic() - started < 1.0
    other._backend.release(held)
    assert call() == "ran"
    assert bulkhead.in_use == 0


async def test_async_rate_limit_paces_calls_and_a_retry_after_pauses_it(store: Any) -> None:
    """Async twin: ``RateLimit(20)`` spaces calls 50 ms apart; a Retry-After pauses it."""
    limit = nk.RateLimit("api", 20, store=store)
    started: list[float] = []

    class TooMany(Exception):
        retry_after = 0.3

    @nk.node(rate_limit=limit, effect=nk.Effect.READ)
    async def call(fail: bool) -> None:
        started.append(time.monotonic())
        if fail:
            raise TooMany

    for _ in range(4):
        await call(False)
    gaps = [b - a for a, b in itertools.pairwise(started)]
    # spaced on the store's clock; each start here is off by the round trip's jitter
    assert all(gap >= 0.03 for gap in gaps), gaps
    assert started[3] - started[0] >= 3 * 0.05 - 0.01, gaps
    with pytest.raises(TooMany):
        await call(True)
    await call(False)
    assert started[-1] - started[-2] >= 0.28


# ---------------------------------------------------------------------------- outage


def test_a_store_cut_off_mid_call_refuses_limits_and_slots_but_not_the_breaker(
    outage: Outage,
) -> None:
    """Cut off mid-call, the call's result stands (a failed release is left to the lease);
    then, while the store is down, a rate limit and a bulkhead refuse (safe, nothing ran,
    chained to the store's error) and a breaker lets the call through; back up, the slot
    whose release failed is free again once its lease ends."""
    store = outage.store
    breaker = nk.CircuitBreaker("api", store=store)
    limit = nk.RateLimit("api", 1000, store=store)
    bulkhead = nk.Bulkhead("api", 1, store=store, lease=0.5)
    ran: list[str] = []

    @nk.node(circuit=breaker, rate_limit=limit, bulkhead=bulkhead, effect=nk.Effect.READ)
    def guarded(cut: bool) -> str:
        ran.append("guarded")
        if cut:
            outage.cut()
        return "done"

    assert guarded(False) == "done"
    with capture_events() as events:
        assert guarded(True) == "done"
    assert "bulkhead.store_failed" in [e.name for e in events]

    @nk.node(rate_limit=limit, effect=nk.Effect.READ, retry=None)
    def limited() -> None:
        ran.append("limited")

    @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ, retry=None)
    def slotted() -> None:
        ran.append("slotted")

    @nk.node(circuit=breaker, effect=nk.Effect.READ, retry=None)
    def breakered() -> str:
        ran.append("breakered")
        return "ran"

    with pytest.raises(nk.RateLimited) as refused:
        limited()
    assert refused.value.__cause__ is not None
    with pytest.raises(nk.BulkheadFull) as full:
        slotted()
    assert full.value.__cause__ is not None
    time.sleep(SYNC_EVERY * 1.2)  # past the breaker's cached view: it asks the store
    with capture_events() as events:
        assert breakered() == "ran"
    assert "circuit.store_failed" in [e.name for e in events]
    assert ran == ["guarded", "guarded", "breakered"]

    outage.heal()
    deadline = time.monotonic() + 3.0
    in_use = None
    while in_use != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(Exception):  # a pool may report the outage once more
            in_use = bulkhead.in_use
    assert in_use == 0
    slotted()
    limited()
    assert ran[-2:] == ["slotted", "limited"]


def test_sharing_through_a_store_imports_no_driver_it_does_not_use(tmp_path: Path) -> None:
    """Importing nodekit and sharing through SQLite imports neither redis nor psycopg."""
    code = (
        "import sys, nodekit as nk\n"
        f"store = nk.SQLiteStore({str(tmp_path / 'x.db')!r})\n"
        "nk.CircuitBreaker('a', store=store); nk.RateLimit('a', 1, store=store)\n"
        "nk.Bulkhead('a', 1, store=store)\n"
        "print(sorted(m for m in ('redis', 'psycopg', 'psycopg_pool') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- round trips


class Monitor:
    """The commands clients send to Redis about keys under `prefix` (``MONITOR``; commands
    run inside a script are left out: they cost no round trip). Other clients of the shared
    server do not count."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.commands: list[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)
        self.client.echo(prefix + "monitor-started")  # one command, so MONITOR is live
        while not any("monitor-started" in c for c in self.commands):
            time.sleep(0.01)
        self.commands.clear()

    def _listen(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            for entry in monitor.listen():
                command = entry["command"]
                if self.prefix + "monitor-stop" in command:
                    return
                if self.prefix in command and entry["client_type"] != "lua":
                    self.commands.append(command)

    def stop(self) -> list[str]:
        """The commands seen (their names), once everything sent before has been seen."""
        self.client.echo(self.prefix + "monitor-stop")
        self.thread.join(5)
        self.client.close()
        return [command.split(" ", 1)[0].upper() for command in self.commands]


@pytest.mark.services
def test_a_redis_rate_limit_acquire_is_one_round_trip(redis_url: str, redis_prefix: str) -> None:
    """Seen by the server (``MONITOR``, this test's keys only): one EVALSHA per acquire."""
    from nodekit.idempotency.redis import RedisStore

    store = RedisStore(redis_url, prefix=redis_prefix)
    limit = nk.RateLimit("api", 1_000_000, store=store)

    @nk.node(rate_limit=limit)
    def call() -> None:
        pass

    call()  # first use: the store's one-off checks and the script load
    monitor = Monitor(redis_url, redis_prefix)
    for _ in range(100):
        call()
    assert monitor.stop() == ["EVALSHA"] * 100
    store.close()


@pytest.mark.services
def test_a_closed_healthy_redis_breaker_does_not_ask_the_store_per_call(
    redis_url: str, redis_prefix: str
) -> None:
    """A healthy closed shared breaker caches its state: a round trip per `SYNC_EVERY` at
    most, not one per call."""
    from nodekit.idempotency.redis import RedisStore

    store = RedisStore(redis_url, prefix=redis_prefix)
    breaker = nk.CircuitBreaker("api", store=store)

    @nk.node(circuit=breaker)
    def call() -> None:
        pass

    call()
    monitor = Monitor(redis_url, redis_prefix)
    started = time.monotonic()
    for _ in range(2000):
        call()
    elapsed = time.monotonic() - started
    sent = monitor.stop()
    assert set(sent) <= {"EVALSHA"}
    assert len(sent) <= elapsed / SYNC_EVERY + 2, (sent, elapsed)
    store.close()
