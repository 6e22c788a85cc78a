"""Under plain load every store holds: 10,000 keyed calls through 50 threads and through 500
asyncio tasks, no error, no effect twice, and the process's threads and file descriptors and
the server's connections flat (the second half of the load leaves them where the first did).

Effects are counted outside the process: one line per effect appended (O_APPEND) to a ledger
file. Keys repeat (2,000 distinct keys, 5 calls each), so replays and first executions mix.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import MemoryStore

pytestmark = pytest.mark.slow

CALLS = 10_000
KEYS = 2_000
THREADS = 50
TASKS = 500
POOL = 8
# "Flat" allows what starts once per process whenever it is first needed: the lease renewer
# thread (when a call first outlives a third of its lease) and a descriptor or two of the
# runtime's; a leak would grow with the load (thousands of calls), not by one.
SLACK_THREADS = 1
SLACK_FDS = 2


class Ledger:
    """An append-only file of effects: one line per effect, written by one syscall."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, key: str) -> None:
        os.write(self._fd, f"{key}\n".encode())

    def close(self) -> None:
        os.close(self._fd)

    def counts(self) -> Counter[str]:
        return Counter(self.path.read_text().split())


class Load:
    """One store under test: how to make it, and how to count its server connections."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.tag = f"nkload{uuid.uuid4().hex[:10]}"
        self.request = request

    def make(self) -> Any:
        if self.kind == "memory":
            return MemoryStore()
        if self.kind == "sqlite":
            return nk.SQLiteStore(self.tmp_path / "load.db")
        if self.kind == "redis":
            from nodekit.idempotency.redis import RedisStore

            url = self.request.getfixturevalue("redis_url")
            prefix = self.request.getfixturevalue("redis_prefix")
            return RedisStore(_with_query(url, client_name=self.tag), prefix=prefix, pool_size=POOL)
        from nodekit.idempotency.postgres import PostgresStore

        url = self.request.getfixturevalue("postgres_url")
        schema = self.request.getfixturevalue("pg_schema")
        return PostgresStore(
            _with_query(url, application_name=self.tag), schema=schema, pool_size=POOL
        )

    def server_connections(self) -> int:
        """This store's connections as the server counts them (0 for in-process stores)."""
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.request.getfixturevalue("redis_url"))
            try:
                return sum(1 for c in client.client_list() if c.get("name") == self.tag)
            finally:
                client.close()
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.request.getfixturevalue("postgres_url")) as pg:
                row = pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (self.tag,),
                ).fetchone()
            return int(row[0]) if row else 0
        return 0


def _with_query(url: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return url + ("&" if "?" in url else "?") + query


def resources() -> tuple[int, int]:
    """(threads, open file descriptors) of this process, read from /proc."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def load(request: pytest.FixtureRequest, tmp_path: Path) -> Load:
    return Load(request.param, request, tmp_path)


def keyed(store: Any, ledger: Ledger, *, is_async: bool) -> Any:
    idem = nk.Idempotency(key=lambda order: order, store=store, on_conflict="wait", wait_timeout=60)
    if is_async:

        async def acharge(order: str) -> str:
            ledger.record(order)
            return order

        return nk.node(name="charge", effect=nk.Effect.WRITE, idempotency=idem)(acharge)

    def charge(order: str) -> str:
        ledger.record(order)
        return order

    return nk.node(name="charge", effect=nk.Effect.WRITE, idempotency=idem)(charge)


def orders(start: int, stop: int) -> list[str]:
    return [f"order-{i % KEYS}" for i in range(start, stop)]


def snapshot(load: Load) -> tuple[int, int, int]:
    """(threads, file descriptors, server connections) right now."""
    return (*resources(), load.server_connections())


def check(
    ledger: Ledger, results: list[Any], calls: list[str], first: tuple[int, ...], load: Load
) -> None:
    """No error, every result right, each key's effect exactly once, and the resources left
    by the second half of the load no more than the first half left (see SLACK_*)."""
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert results == calls
    counts = ledger.counts()
    assert len(counts) == KEYS
    assert max(counts.values()) == 1, "an effect ran twice"
    threads, fds, conns = snapshot(load)
    assert threads <= first[0] + SLACK_THREADS
    assert fds <= first[1] + SLACK_FDS
    assert conns <= POOL if load.kind in ("redis", "postgres") else conns == 0


def run_threads(node: Callable[[str], str], calls: list[str]) -> list[Any]:
    def call(order: str) -> Any:
        try:
            return node(order)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(call, calls))


async def run_tasks(node: Any, calls: list[str]) -> list[Any]:
    queue = iter(calls)
    results: dict[int, Any] = {}
    index = iter(range(len(calls)))

    async def worker() -> None:
        for i, order in zip(index, queue, strict=False):
            try:
                results[i] = await node(order)
            except Exception as exc:
                results[i] = exc

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return [results[i] for i in range(len(calls))]


def test_ten_thousand_calls_through_fifty_threads(load: Load, tmp_path: Path) -> None:
    store = load.make()
    ledger = Ledger(tmp_path / "effects.log")
    try:
        node = keyed(store, ledger, is_async=False)
        half = CALLS // 2
        results = run_threads(node, orders(0, half))
        first = snapshot(load)
        results += run_threads(node, orders(half, CALLS))
        check(ledger, results, orders(0, CALLS), first, load)
    finally:
        store.close()
        ledger.close()
    assert threading.active_count() < THREADS


async def test_ten_thousand_calls_through_five_hundred_tasks(load: Load, tmp_path: Path) -> None:
    store = load.make()
    ledger = Ledger(tmp_path / "effects.log")
    try:
        node = keyed(store, ledger, is_async=True)
        half = CALLS // 2
        results = await run_tasks(node, orders(0, half))
        first = snapshot(load)
        results += await run_tasks(node, orders(half, CALLS))
        check(ledger, results, orders(0, CALLS), first, load)
    finally:
        await store.aclose()
        ledger.close()


def test_a_thousand_map_calls_keep_connections_bounded(load: Load, tmp_path: Path) -> None:
    """Each `node.map()` runs in fresh threads; the store's connections do not follow them:
    server connections stay within the pool, descriptors and threads where they were."""
    store = load.make()
    ledger = Ledger(tmp_path / "effects.log")
    try:
        node = keyed(store, ledger, is_async=False)
        for call in range(50):  # the pool grows to what four threads need, then stays
            node.map([f"warm{call}-{i}" for i in range(4)], concurrency=4)
        first = snapshot(load)
        peak = 0
        for call in range(1_000):
            result = node.map([f"m{call}-{i}" for i in range(4)], concurrency=4)
            assert result.ok, result.errors
            if call % 100 == 0:
                peak = max(peak, load.server_connections())
        threads, fds, conns = snapshot(load)
        assert threads <= first[0] + SLACK_THREADS
        assert fds <= first[1] + SLACK_FDS
        assert max(peak, conns) <= POOL
        counts = ledger.counts()
        assert len(counts) == 4_200
        assert max(counts.values()) == 1
    finally:
        store.close()
        ledger.close()
