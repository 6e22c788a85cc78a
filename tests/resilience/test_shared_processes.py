"""Breakers, rate limits and bulkheads shared by real processes through SQLite, Redis and
PostgreSQL. The local service's request log is the only witness (never a Python counter);
workers come from a forkserver and take plain data only.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk

from . import _shared_workers as workers
from ._shared_workers import Service, StoreSpec, make_store

pytestmark = pytest.mark.slow

PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["nodekit", "httpx", workers.__name__])

STORES = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.services),
    pytest.param("postgres", marks=pytest.mark.services),
]


@pytest.fixture(params=STORES)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """A store every process opens for itself: a SQLite file, a Redis prefix, a PG schema."""
    kind = request.param
    if kind == "sqlite":
        return ("sqlite", str(tmp_path / "shared.db"))
    if kind == "redis":
        return (
            "redis",
            request.getfixturevalue("redis_url"),
            request.getfixturevalue("redis_prefix"),
        )
    return (
        "postgres",
        request.getfixturevalue("postgres_url"),
        request.getfixturevalue("pg_schema"),
    )


@pytest.fixture
def service() -> Iterator[Service]:
    running = Service().start()
    yield running
    running.stop()


@pytest.fixture
def processes() -> Iterator[Callable[..., Any]]:
    """Start worker processes; any still alive at the end are killed (no strays)."""
    started: list[Any] = []

    def start(target: Callable[..., Any], *args: Any) -> Any:
        process = PROCESSES.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(5)


def join_all(procs: list[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for process in procs:
        process.join(max(0.1, deadline - time.monotonic()))
        assert process.exitcode == 0, f"worker {process.pid} exited with {process.exitcode}"


# ---------------------------------------------------------------------------- breaker

BREAKER: dict[str, Any] = {"min_calls": 5, "failure_rate": 1.0, "window": 30.0, "open_for": 0.5}
WORKERS = 8


def test_a_failing_service_sees_min_calls_then_one_probe_per_half_open_window(
    spec: StoreSpec, service: Service, processes: Callable[..., Any]
) -> None:
    """8 processes hammer a failing service through one shared breaker: it sees the
    failures that open it (min_calls, plus at most one call per other process already on its
    way), then exactly one request per half-open window, never two in one."""
    barrier = PROCESSES.Barrier(WORKERS)
    seconds = 2.6
    procs = [
        processes(workers.breaker_worker, spec, service.url, barrier, seconds, BREAKER)
        for _ in range(WORKERS)
    ]
    join_all(procs)

    times = sorted(hit.at for hit in service.paths("/fail"))
    assert times, "the service saw nothing"
    open_for = BREAKER["open_for"]
    burst = [t for t in times if t < times[0] + open_for / 2]
    probes = times[len(burst) :]
    # the calls that opened it, and those already admitted by other processes when it did
    assert BREAKER["min_calls"] <= len(burst) <= BREAKER["min_calls"] + WORKERS - 1, burst
    # then one probe per half-open window across all 8 processes: never two in one window
    gaps = [b - a for a, b in zip([burst[-1], *probes], probes, strict=False)]
    assert all(gap >= open_for * 0.9 for gap in gaps), gaps
    assert 2 <= len(probes) <= seconds / open_for + 1, probes


def test_a_breaker_created_in_a_new_process_while_open_stays_open(
    spec: StoreSpec, service: Service, processes: Callable[..., Any]
) -> None:
    """A process that creates the breaker joins the shared state: open stays open."""
    options: dict[str, Any] = {"min_calls": 2, "failure_rate": 1.0, "open_for": 30.0}
    store = make_store(spec)
    breaker = nk.CircuitBreaker("service", store=store, **options)

    @nk.node(circuit=breaker, effect=nk.Effect.READ)
    def fail() -> None:
        raise ConnectionError("down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            fail()
    assert breaker.state == "open"

    out = PROCESSES.Queue()
    join_all([processes(workers.joiner, spec, service.url, options, out)])
    assert out.get(timeout=5) == ("open", "CircuitOpen")
    assert service.paths("/ok") == []
    assert breaker.state == "open"
    store.close()


# ---------------------------------------------------------------------------- rate limit


def test_four_processes_share_one_rate_limit_and_one_429_pauses_all(
    spec: StoreSpec, service: Service, processes: Callable[..., Any]
) -> None:
    """4 processes through one shared ``RateLimit(rate=50)``: in no 1 s window does the
    service see more than rate + burst requests (+2 for scheduling jitter on arrival), and
    its one 429 with ``Retry-After: 1`` silences all four for that second."""
    service.limit_at = 40
    barrier = PROCESSES.Barrier(4)
    procs = [processes(workers.limit_worker, spec, service.url, barrier, 2.8) for _ in range(4)]
    join_all(procs)

    hits = service.paths("/limited")
    times = [hit.at for hit in hits]
    most = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert most <= 50 + 1 + 2, most
    told = next(hit.at for hit in hits if hit.status == 429)
    # calls reserved before the pause (one per process at most) may still arrive just after
    paused = [t - told for t in times if told + 0.15 < t < told + 0.95]
    assert paused == [], paused
    assert any(t > told + 1.0 for t in times)  # and then they go on
    assert len(times) >= 60  # the limit paced them, it did not stop them


# ---------------------------------------------------------------------------- bulkhead


def test_four_processes_never_run_more_than_the_shared_bulkhead_limit(
    spec: StoreSpec, service: Service, processes: Callable[..., Any]
) -> None:
    """A shared ``Bulkhead(limit=3)`` across 4 processes: never more than 3 in flight."""
    barrier = PROCESSES.Barrier(4)
    procs = [processes(workers.bulkhead_worker, spec, service.url, barrier, 8) for _ in range(4)]
    join_all(procs)

    hits = service.paths("/slow/40")
    assert len(hits) == 32
    assert max(hit.in_flight for hit in hits) == 3
    assert service.most_in_flight == 3


def test_a_killed_holder_gives_its_slot_back_when_its_lease_ends(
    spec: StoreSpec, service: Service, processes: Callable[..., Any]
) -> None:
    """A process SIGKILLed while it holds the one slot: its lease is renewed while it lives,
    and the slot is free again at most one lease after its death."""
    lease = 1.0
    victim = processes(workers.holder, spec, service.url, lease)
    deadline = time.monotonic() + 10
    while not service.paths("/hang"):
        assert time.monotonic() < deadline, "the holder never called"
        time.sleep(0.01)
    store = make_store(spec)
    bulkhead = nk.Bulkhead("service", 1, queue=1, store=store, lease=lease)
    time.sleep(lease * 1.5)
    assert bulkhead.in_use == 1  # renewed past its first lease

    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    killed = time.monotonic()

    @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ, timeout=nk.Timeout(total=5.0))
    def call() -> float:
        return time.monotonic()

    started = call()
    assert started - killed <= lease + 0.3
    assert bulkhead.in_use == 0
    store.close()
