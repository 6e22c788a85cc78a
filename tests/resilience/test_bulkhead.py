"""Bulkhead: never more than `limit` at once across threads and tasks; a queue; BulkheadFull."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import capture_events

READ = nk.Effect.READ


class Gauge:
    """Counts the calls running at once (under a lock) and remembers the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def test_never_more_than_limit_across_50_threads() -> None:
    bulkhead = nk.Bulkhead("db", 5, queue=50)
    gauge = Gauge()

    @nk.node(effect=READ, bulkhead=bulkhead)
    def query(n: int) -> int:
        gauge.enter()
        time.sleep(0.002)  # the query's own work, so that calls overlap
        gauge.leave()
        return n

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(query, range(50)))
    assert results == list(range(50))
    assert gauge.most == 5
    assert bulkhead.in_use == 0


async def test_never_more_than_limit_across_200_tasks() -> None:
    bulkhead = nk.Bulkhead("db", 7, queue=200)
    gauge = Gauge()

    @nk.node(effect=READ, bulkhead=bulkhead)
    async def query(n: int) -> int:
        gauge.enter()
        await asyncio.sleep(0.001)
        gauge.leave()
        return n

    results = await asyncio.gather(*(query(n) for n in range(200)))
    assert list(results) == list(range(200))
    assert gauge.most == 7
    assert bulkhead.in_use == 0


async def test_threads_and_tasks_share_one_count() -> None:
    bulkhead = nk.Bulkhead("db", 3, queue=100)
    gauge = Gauge()

    @nk.node(effect=READ, bulkhead=bulkhead)
    def sync_query() -> None:
        gauge.enter()
        time.sleep(0.002)
        gauge.leave()

    @nk.node(effect=READ, bulkhead=bulkhead)
    async def async_query() -> None:
        gauge.enter()
        await asyncio.sleep(0.002)
        gauge.leave()

    await asyncio.gather(
        *(asyncio.to_thread(sync_query) for _ in range(20)), *(async_query() for _ in range(40))
    )
    assert gauge.calls == 60
    assert gauge.most == 3
    assert bulkhead.in_use == 0


def test_full_without_a_queue_refuses_without_calling() -> None:
    bulkhead = nk.Bulkhead("db", 1)
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @nk.node(effect=READ, bulkhead=bulkhead)
    def query(n: int) -> int:
        calls.append(n)
        inside.set()
        release.wait(10)
        return n

    holder = threading.Thread(target=query, args=(1,))
    holder.start()
    inside.wait(10)
    with capture_events(prefix="bulkhead.") as events, pytest.raises(nk.BulkheadFull) as raised:
        query(2)
    release.set()
    holder.join(10)
    assert calls == [1]
    error = raised.value
    assert (error.bulkhead, error.limit, error.queue) == ("db", 1, 0)
    assert nk.classify(error) == "safe"
    assert events.names() == ["bulkhead.rejected"]
    assert query(3) == 3


async def test_full_without_a_queue_refuses_a_task_without_calling() -> None:
    bulkhead = nk.Bulkhead("db", 1)
    release = asyncio.Event()
    calls: list[int] = []

    @nk.node(effect=READ, bulkhead=bulkhead)
    async def query(n: int) -> int:
        calls.append(n)
        await release.wait()
        return n

    holder = asyncio.create_task(query(1))
    await asyncio.sleep(0)
    with pytest.raises(nk.BulkheadFull):
        await query(2)
    release.set()
    assert await holder == 1
    assert calls == [1]


def test_a_queued_call_runs_when_a_slot_frees() -> None:
    bulkhead = nk.Bulkhead("db", 1, queue=1)
    inside, release = threading.Event(), threading.Event()

    @nk.node(effect=READ, bulkhead=bulkhead)
    def query(n: int) -> int:
        if n == 1:
            inside.set()
            release.wait(10)
        return n

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(query, 1)
        inside.wait(10)
        queued = pool.submit(query, 2)
        time.sleep(0.02)  # let the second call join the queue
        with pytest.raises(nk.BulkheadFull):
            query(3)  # the queue is full too
        release.set()
        assert (first.result(10), queued.result(10)) == (1, 2)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_queued_call_gives_up_at_its_deadline(mode: str) -> None:
    bulkhead = nk.Bulkhead("db", 1, queue=5)
    inside, release = threading.Event(), threading.Event()
    options: dict[str, Any] = {"effect": READ, "bulkhead": bulkhead}

    @nk.node(**options)
    def hold() -> None:
        inside.set()
        release.wait(10)

    @nk.node(**options, timeout=nk.Timeout(total=0.05))
    def sync_query() -> str:
        return "ran"

    @nk.node(**options, timeout=nk.Timeout(total=0.05))
    async def async_query() -> str:
        return "ran"

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    started = time.monotonic()
    call = sync_query if mode == "sync" else lambda: asyncio.run(async_query())
    try:
        with pytest.raises(nk.BulkheadFull, match="before the deadline"):
            call()
        assert 0.04 <= time.monotonic() - started < 2.0
    finally:
        release.set()
        holder.join(10)
    assert bulkhead.in_use == 0


def test_an_abandoned_sync_attempt_keeps_its_slot_until_it_ends() -> None:
    bulkhead = nk.Bulkhead("db", 1)
    release, ended = threading.Event(), threading.Event()

    @nk.node(effect=READ, bulkhead=bulkhead, timeout=0.02)
    def stuck() -> None:
        release.wait(10)
        ended.set()

    with pytest.raises(nk.NodeTimeout):
        stuck()
    assert bulkhead.in_use == 1  # still running in its worker thread
    with pytest.raises(nk.BulkheadFull):
        stuck()
    release.set()
    ended.wait(10)
    deadline = time.monotonic() + 5
    while bulkhead.in_use and time.monotonic() < deadline:
        time.sleep(0.001)
    assert bulkhead.in_use == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "option"),
    [
        ((0,), {}, "limit"),
        ((2.5,), {}, "limit"),
        ((1,), {"queue": -1}, "queue"),
    ],
)
def test_bad_options_are_config_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], option: str
) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        nk.Bulkhead("db", *args, **kwargs)
    assert raised.value.option == option
