"""Idempotency keys per store: first executions, replays, and the cost of a keyed call.

Measured in one process, sync and async, for every built-in store (MemoryStore, SQLiteStore in
a temporary directory, RedisStore under a unique key prefix, PostgresStore in a fresh schema),
through ``@nk.node(name="bench", idempotency=nk.Idempotency(key=lambda k: k, store=store))``
returning a small dict:

* first executions/s: N distinct keys, each run once (acquire, run, store the result);
* replays/s: the same N keys again (each answered from the store; the function does not run);
* the added cost of a keyed call over a plain ``@nk.node`` with the same body, µs per call;
* beside them, when ``aws_lambda_powertools`` is importable, its ``idempotent_function`` on
  ``RedisCachePersistenceLayer`` for the same N keys (sync only: it has no async form).

Best of a few rounds, fresh keys in every round. Redis keys and the PostgreSQL schema are
removed afterwards, the SQLite file goes with its temporary directory.
``python -m benchmarks.bench_idempotency`` writes its section of BENCHMARKS.md; ``--quick`` is
a smoke run that writes nothing. ``NODEKIT_TEST_REDIS_URL`` and ``NODEKIT_TEST_POSTGRES_URL``
(the test suite's variables) point it at other servers.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import importlib.util
import os
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import nodekit as nk

from . import _common
from ._common import table

SECTION = "idempotency"
REDIS_URL = os.environ.get("NODEKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "NODEKIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

MEMORY, SQLITE, REDIS, POSTGRES = "MemoryStore", "SQLiteStore", "RedisStore", "PostgresStore"
POWERTOOLS = "Powertools RedisCachePersistenceLayer"
SYNC, ASYNC = "sync", "async"

# First executions per second a durable store should reach, sync, single process (targets;
# Redis must also beat Powertools on the same server).
THROUGHPUT_GUIDE = {SQLITE: 6_000.0, REDIS: 4_000.0, POSTGRES: 1_500.0}
# Added cost of a keyed call over a plain node, MemoryStore (µs): first execution, replay.
MEMORY_ADDED_GUIDE_US = 10.0
MEMORY_REPLAY_GUIDE_US = 5.0
# 500 concurrent async keyed calls (first executions): p50 latency target on PostgreSQL (ms).
CONCURRENT = 500
CONCURRENT_P50_GUIDE_MS = {POSTGRES: 50.0}
BUSY_LOAD = 1.5


@dataclass(frozen=True)
class Config:
    rounds: int
    keys: dict[str, int]  # per store
    warmup: int

    @classmethod
    def for_run(cls, quick: bool) -> Config:
        if quick:
            n = {MEMORY: 1_000, SQLITE: 200, REDIS: 200, POSTGRES: 200, POWERTOOLS: 200}
            return cls(rounds=1, keys=n, warmup=20)
        # sized for the whole module to take well under a minute on a small, busy machine
        n = {MEMORY: 10_000, SQLITE: 3_000, REDIS: 3_000, POSTGRES: 2_000, POWERTOOLS: 3_000}
        return cls(rounds=3, keys=n, warmup=200)


@dataclass
class Row:
    """The samples of one (store, mode): seconds per pass of N calls, one per round."""

    store: str
    mode: str
    n: int
    first: list[float] = field(default_factory=list)
    replay: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)  # plain node (or bare function)

    def rate(self, samples: list[float], best: bool = True) -> float:
        seconds = min(samples) if best else statistics.median(samples)
        return self.n / seconds

    def us_per_call(self, samples: list[float]) -> float:
        return min(samples) / self.n * 1e6


# ---------------------------------------------------------------------------- subjects


class Counter:
    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0


def _sync_body(counter: Counter) -> Callable[..., dict[str, Any]]:
    def bench(k: str) -> dict[str, Any]:
        counter.calls += 1
        return {"key": k, "status": "ok", "amount": 42}

    return bench


def _async_body(counter: Counter) -> Callable[..., Awaitable[dict[str, Any]]]:
    async def bench(k: str) -> dict[str, Any]:
        counter.calls += 1
        return {"key": k, "status": "ok", "amount": 42}

    return bench


def _expected(k: str) -> dict[str, Any]:
    return {"key": k, "status": "ok", "amount": 42}


def keyed(store: Any, body: Callable[..., Any]) -> Any:
    return nk.node(name="bench", idempotency=nk.Idempotency(key=lambda k: k, store=store))(body)


def plain(body: Callable[..., Any]) -> Any:
    return nk.node(name="bench_plain")(body)


def fresh_keys(tag: str, n: int) -> list[str]:
    run = uuid.uuid4().hex[:12]
    return [f"{tag}-{run}-{i}" for i in range(n)]


# ---------------------------------------------------------------------------- timing


def _pass_sync(fn: Callable[..., Any], keys: list[str]) -> float:
    """Seconds for one call per key, back to back, collector off (collected before)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for k in keys:
            fn(k=k)
        return (time.perf_counter_ns() - start) / 1e9
    finally:
        gc.enable()


def _pass_async(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], keys: list[str]) -> float:
    async def run() -> float:
        start = time.perf_counter_ns()
        for k in keys:
            await fn(k=k)
        return (time.perf_counter_ns() - start) / 1e9

    gc.collect()
    gc.disable()
    try:
        return loop.run_until_complete(run())
    finally:
        gc.enable()


def _check(label: str, counter: Counter, before: int, expected: int) -> None:
    ran = counter.calls - before
    if ran != expected:
        raise AssertionError(f"{label}: the function ran {ran} times, expected {expected}")


def _check_results(
    label: str, call: Callable[[str], Any], keys: list[str], sample: int = 20
) -> None:
    for k in keys[:: max(1, len(keys) // sample)]:
        got = call(k)
        if got != _expected(k):
            raise AssertionError(f"{label}: replay of {k!r} returned {got!r}")


def bench_store(
    name: str, store: Any, loop: asyncio.AbstractEventLoop, cfg: Config
) -> dict[str, Row]:
    """Rounds of: plain pass, first pass, replay pass; sync then async, fresh keys each time."""
    n = cfg.keys[name]
    counters = {SYNC: Counter(), ASYNC: Counter()}
    subjects = {
        SYNC: (keyed(store, _sync_body(counters[SYNC])), plain(_sync_body(counters[SYNC]))),
        ASYNC: (keyed(store, _async_body(counters[ASYNC])), plain(_async_body(counters[ASYNC]))),
    }

    def timed(mode: str, fn: Any, keys: list[str]) -> float:
        if mode == SYNC:
            return _pass_sync(fn, keys)
        return _pass_async(loop, fn, keys)

    def call(mode: str, fn: Any) -> Callable[[str], Any]:
        if mode == SYNC:
            return lambda k: fn(k=k)
        return lambda k: loop.run_until_complete(fn(k=k))

    # warm-up: connections, tables, scripts, codecs; the keys are replayed once as well
    for mode, (kfn, pfn) in subjects.items():
        keys = fresh_keys(f"warm-{mode}", cfg.warmup)
        timed(mode, pfn, keys)
        timed(mode, kfn, keys)
        timed(mode, kfn, keys)

    rows = {mode: Row(name, mode, n) for mode in subjects}
    for round_ in range(cfg.rounds):
        for mode, (kfn, pfn) in subjects.items():
            counter, row = counters[mode], rows[mode]
            label = f"{name} {mode} round {round_ + 1}"
            row.baseline.append(timed(mode, pfn, fresh_keys(f"plain-{mode}", n)))
            keys = fresh_keys(f"r{round_}-{mode}", n)
            before = counter.calls
            row.first.append(timed(mode, kfn, keys))
            _check(f"{label} first", counter, before, n)
            before = counter.calls
            row.replay.append(timed(mode, kfn, keys))
            _check(f"{label} replay", counter, before, 0)
            _check_results(label, call(mode, kfn), keys)
            _check(f"{label} replay check", counter, before, 0)
    return rows


@dataclass
class Burst:
    """Latencies (seconds) of CONCURRENT async keyed calls started at once, one list per round."""

    store: str
    rounds: list[list[float]] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # this process's CPU time per wave

    def best(self) -> tuple[list[float], float, float]:
        """The round with the lowest p50, its wall time and this process's CPU time."""
        i = min(range(len(self.rounds)), key=lambda j: statistics.median(self.rounds[j]))
        return sorted(self.rounds[i]), self.walls[i], self.cpus[i]


def bench_burst(name: str, store: Any, loop: asyncio.AbstractEventLoop, cfg: Config) -> Burst:
    """CONCURRENT first executions awaited together (asyncio.gather), each call's latency
    measured from the common start: what 500 requests arriving at once see."""
    counter = Counter()
    fn = keyed(store, _async_body(counter))
    burst = Burst(name)

    async def one(k: str, start: float) -> float:
        await fn(k=k)
        return time.perf_counter() - start

    async def wave(keys: list[str]) -> tuple[list[float], float, float]:
        cpu, start = time.process_time(), time.perf_counter()
        latencies = await asyncio.gather(*(one(k, start) for k in keys))
        return list(latencies), time.perf_counter() - start, time.process_time() - cpu

    loop.run_until_complete(wave(fresh_keys("burst-warm", CONCURRENT)))
    for round_ in range(cfg.rounds):
        before = counter.calls
        latencies, wall, cpu = loop.run_until_complete(
            wave(fresh_keys(f"burst{round_}", CONCURRENT))
        )
        _check(f"{name} burst round {round_ + 1}", counter, before, CONCURRENT)
        burst.rounds.append(latencies)
        burst.walls.append(wall)
        burst.cpus.append(cpu)
    return burst


def render_bursts(bursts: list[Burst], cfg: Config) -> list[str]:
    out = [
        "",
        f"### {CONCURRENT} concurrent async keyed calls",
        "",
        f"{CONCURRENT} first executions started at once in one event loop "
        "(`asyncio.gather`), each call's latency measured from the common start; the round "
        f"with the lowest p50 of {cfg.rounds} (after a warm-up wave). Stores at their default "
        f"pool sizes. *Client CPU*: this process's CPU time for the wave (all of it on one "
        "core, the event loop's): the p50 cannot be below about half of it. Target: p50 ≤ "
        f"{CONCURRENT_P50_GUIDE_MS[POSTGRES]:.0f} ms on PostgreSQL.",
        "",
    ]
    body = []
    for burst in bursts:
        lat, wall, cpu = burst.best()
        p50 = statistics.median(lat) * 1000
        p95 = lat[int(len(lat) * 0.95) - 1] * 1000
        guide = CONCURRENT_P50_GUIDE_MS.get(burst.store)
        verdict = "—" if guide is None else f"≤ {guide:.0f}: {_verdict(p50 <= guide)}"
        body.append(
            [
                burst.store,
                f"{p50:,.1f}",
                f"{p95:,.1f}",
                f"{lat[-1] * 1000:,.1f}",
                f"{CONCURRENT / wall:,.0f}",
                f"{cpu * 1000:,.0f}",
                verdict,
            ]
        )
    out.append(
        table(
            ["store", "p50 ms", "p95 ms", "max ms", "calls/s", "client CPU ms", "target (p50)"],
            body,
            "lrrrrrl",
        )
    )
    return out


# ---------------------------------------------------------------------------- floors


def round_trip_floors() -> dict[str, float]:
    """What the servers cost without nodekit, µs per operation, measured in this run: a Redis
    PING (redis-py, one round trip) and a PostgreSQL autocommit single-row upsert (psycopg,
    one round trip and one WAL flush). A first execution needs two of either, which bounds
    its rate whatever the client does."""
    floors: dict[str, float] = {}
    with suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            floors[REDIS] = _best_us(client.ping, 2_000)
        finally:
            client.close()
    with suppress(Exception):
        import psycopg

        table = f"nodekit_bench_floor_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f"CREATE TABLE {table} (k int PRIMARY KEY, v int)")
            try:
                counter = iter(range(10**9))
                query = (
                    f"INSERT INTO {table} VALUES (%s, 1) "
                    f"ON CONFLICT (k) DO UPDATE SET v = {table}.v + 1"
                )
                floors[POSTGRES] = _best_us(lambda: conn.execute(query, (next(counter),)), 500)
            finally:
                conn.execute(f"DROP TABLE {table}")
    return floors


def _best_us(fn: Callable[[], Any], n: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def render_floors(floors: dict[str, float], rows: list[Row]) -> list[str]:
    """Each durable store's rate against the floor its round trips set in this run."""
    out = ["", "### What the servers allow", ""]
    what = {
        REDIS: "a `PING` through redis-py (one round trip)",
        POSTGRES: "an autocommit single-row upsert through psycopg (one round trip and one "
        "WAL flush)",
    }
    for store, us in floors.items():
        row = next((r for r in rows if r.store == store and r.mode == SYNC), None)
        if row is None:
            continue
        ceiling = 1e6 / (2 * us)
        rate = row.rate(row.first)
        guide = THROUGHPUT_GUIDE[store]
        out.append(
            f"- **{store}**: {what[store]} took {us:,.0f} µs in this run. A first execution "
            f"needs two of them, so no client can exceed {ceiling:,.0f} first executions/s "
            f"here; nodekit reached {rate:,.0f}/s ({rate / ceiling:.0%} of that ceiling). "
            + (
                f"The target of {guide:,.0f}/s leaves {1e6 / guide - 2 * us:,.0f} µs of client "
                f"time per first execution beyond the two round trips; nodekit and the "
                f"client library take {1e6 / rate - 2 * us:,.0f} µs."
                if ceiling >= guide
                else f"The target of {guide:,.0f}/s is above that ceiling: it needs round "
                f"trips of at most {1e6 / (2 * guide):,.0f} µs."
            )
        )
    return out


# ---------------------------------------------------------------------------- stores


@contextmanager
def sqlite_store() -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="nodekit-bench-") as where:
        store = nk.SQLiteStore(os.path.join(where, "idempotency.db"))
        try:
            yield store
        finally:
            store.close()


def _redis_cleanup(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        removed = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(client.delete(*batch))
                batch = []
        if batch:
            removed += int(client.delete(*batch))
        return removed
    finally:
        client.close()


@contextmanager
def redis_store(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    import redis

    probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        probe.ping()
    finally:
        probe.close()
    prefix = f"nodekit-bench-{uuid.uuid4().hex[:12]}:"
    store = nk.RedisStore(REDIS_URL, prefix=prefix)
    try:
        yield store
    finally:
        with suppress(Exception):
            loop.run_until_complete(store.aclose())
        store.close()
        _redis_cleanup(prefix)


@contextmanager
def postgres_store(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    import psycopg

    schema = f"nodekit_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=2)
    store = nk.PostgresStore(POSTGRES_URL, schema=schema)
    try:
        yield store
    finally:
        with suppress(Exception):
            loop.run_until_complete(store.aclose())
        store.close()
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


# ---------------------------------------------------------------------------- Powertools


def powertools_status() -> tuple[bool, str]:
    """Whether aws_lambda_powertools' idempotency on Redis can be measured, and why not."""
    if importlib.util.find_spec("aws_lambda_powertools") is None:
        return False, (
            "`aws_lambda_powertools` is not installed in this environment "
            "(`pip install aws-lambda-powertools` to add the comparison); skipped."
        )
    if importlib.util.find_spec("boto3") is None:
        return False, (
            "`aws_lambda_powertools` is installed but `boto3` is not: its idempotency package "
            "imports the DynamoDB layer, hence boto3, even for Redis "
            "(`pip install 'aws-lambda-powertools[redis,aws-sdk]'`); skipped."
        )
    if os.environ.get("POWERTOOLS_IDEMPOTENCY_DISABLED", "").lower() in ("1", "true", "yes", "on"):
        return False, "POWERTOOLS_IDEMPOTENCY_DISABLED is set: Powertools would skip its store."
    return True, f"aws-lambda-powertools {importlib.metadata.version('aws-lambda-powertools')}"


def bench_powertools(cfg: Config) -> tuple[Row, str]:
    import redis
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
        RedisCachePersistenceLayer,
    )

    n = cfg.keys[POWERTOOLS]
    prefix = f"nodekit-bench-pt-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        layer = RedisCachePersistenceLayer(client=client)
        config = IdempotencyConfig()  # defaults: whole payload hashed, 1 h expiry, no local cache
        counter = Counter()
        fn = idempotent_function(
            _sync_body(counter),
            data_keyword_argument="k",
            persistence_store=layer,
            config=config,
            key_prefix=f"{prefix}bench",
        )
        bare = _sync_body(counter)
        keys = fresh_keys("pt-warm", cfg.warmup)
        _pass_sync(bare, keys)
        _pass_sync(fn, keys)
        _pass_sync(fn, keys)
        row = Row(POWERTOOLS, SYNC, n)
        for round_ in range(cfg.rounds):
            label = f"powertools round {round_ + 1}"
            row.baseline.append(_pass_sync(bare, fresh_keys("pt-bare", n)))
            keys = fresh_keys(f"pt-r{round_}", n)
            before = counter.calls
            row.first.append(_pass_sync(fn, keys))
            _check(f"{label} first", counter, before, n)
            before = counter.calls
            row.replay.append(_pass_sync(fn, keys))
            _check(f"{label} replay", counter, before, 0)
            _check_results(label, lambda k: fn(k=k), keys)
            _check(f"{label} replay check", counter, before, 0)
        written = sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()
        _redis_cleanup(prefix)
    return row, f"{written:,} Redis keys written"


# ---------------------------------------------------------------------------- report


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _us(value: float) -> str:
    return f"{value:,.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _guide_rate(row: Row, rows: list[Row]) -> str:
    guide = THROUGHPUT_GUIDE.get(row.store)
    if guide is None or row.mode != SYNC:
        return "—"
    rate = row.rate(row.first)
    text = f"≥ {guide:,.0f}: {_verdict(rate >= guide)}"
    peer = next((r for r in rows if r.store == POWERTOOLS), None)
    if row.store == REDIS and peer is not None:
        text += f"; above Powertools: {_verdict(rate > peer.rate(peer.first))}"
    return text


def render(
    cfg: Config,
    rows: list[Row],
    skipped: list[str],
    notes: list[str],
    loads: tuple[tuple[float, float, float], tuple[float, float, float]],
    bursts: list[Burst],
    floors: dict[str, float],
) -> str:
    start, end = loads
    busy = max(start[0], end[0]) > BUSY_LOAD
    load_text = (
        f"{start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start, "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at the end (1 / 5 / 15 min)"
    )
    out = [
        "## Idempotency: first executions, replays, keyed-call cost per store",
        "",
        "`python -m benchmarks.bench_idempotency`. One process; every call is "
        '`@nk.node(name="bench", idempotency=nk.Idempotency(key=lambda k: k, store=store))` '
        "around a function that returns a three-field dict, called as `fn(k=key)` one call "
        "after the other (async: awaited one after the other in one event loop).",
        "",
        _common.machine_markdown(),
        f"- **Load average:** {load_text}",
    ]
    if busy:
        out.append(
            f"- **The machine was busy with other test runs** (load average above {BUSY_LOAD}): "
            "the figures are lower than an idle machine would give."
        )
    out += [
        "- **Servers:** Redis and PostgreSQL on the same host (loopback); SQLite in a "
        "temporary directory (WAL, `synchronous=NORMAL`, the store's defaults).",
        "",
        "### Throughput, calls per second",
        "",
        f"Best of {cfg.rounds} round{'s' if cfg.rounds > 1 else ''} (median beside it), fresh keys in every round, gc off "
        "during each pass. *First executions*: N distinct keys, each acquired, run and "
        "completed. *Replays*: the same N keys again; every replay is checked not to run the "
        "function and a sample is checked to return the first result. A warm-up of "
        f"{cfg.warmup} keys per subject (connections, tables, scripts) is not counted.",
        "",
    ]
    body = []
    for row in rows:
        body.append(
            [
                row.store,
                row.mode,
                f"{row.n:,}",
                f"{_rate(row.rate(row.first))} ({_rate(row.rate(row.first, best=False))})",
                f"{_rate(row.rate(row.replay))} ({_rate(row.rate(row.replay, best=False))})",
                _guide_rate(row, rows),
            ]
        )
    out.append(
        table(
            [
                "store",
                "mode",
                "N keys",
                "first executions/s",
                "replays/s",
                "guide (first executions/s)",
            ],
            body,
            "llrrrl",
        )
    )
    out += [
        "",
        "### Cost of a keyed call, µs per call",
        "",
        "Per-call time of the best pass. *Added* = the keyed call minus a plain "
        '`@nk.node(name="bench_plain")` around the same function, timed in the same round over '
        "N fresh arguments (for Powertools: minus the bare, undecorated function). Targets for "
        f"MemoryStore: added cost ≤ {MEMORY_ADDED_GUIDE_US:.0f} µs on a first execution, "
        f"≤ {MEMORY_REPLAY_GUIDE_US:.0f} µs on a replay.",
        "",
    ]
    body = []
    for row in rows:
        base = row.us_per_call(row.baseline)
        first = row.us_per_call(row.first) - base
        replay = row.us_per_call(row.replay) - base
        guide = "—"
        if row.store == MEMORY:
            guide = (
                f"first ≤ {MEMORY_ADDED_GUIDE_US:.0f}: {_verdict(first <= MEMORY_ADDED_GUIDE_US)}; "
                f"replay ≤ {MEMORY_REPLAY_GUIDE_US:.0f}: "
                f"{_verdict(replay <= MEMORY_REPLAY_GUIDE_US)}"
            )
        body.append(
            [
                row.store,
                row.mode,
                _us(base),
                _us(row.us_per_call(row.first)),
                _us(first),
                _us(row.us_per_call(row.replay)),
                _us(replay),
                guide,
            ]
        )
    out.append(
        table(
            [
                "store",
                "mode",
                "baseline",
                "first execution",
                "added",
                "replay",
                "added",
                "guide",
            ],
            body,
            "llrrrrrl",
        )
    )
    out += render_floors(floors, rows)
    out += render_bursts(bursts, cfg)
    out += ["", "### Notes", ""]
    out += [f"- {note}" for note in skipped + notes]
    return "\n".join(out) + "\n"


def run(quick: bool) -> str:
    cfg = Config.for_run(quick)
    load_start = os.getloadavg()
    loop = asyncio.new_event_loop()
    rows: list[Row] = []
    bursts: list[Burst] = []
    skipped: list[str] = []
    notes: list[str] = [
        "Round trips per call. MemoryStore: none. SQLiteStore: a first execution is two "
        "`BEGIN IMMEDIATE` transactions (acquire, complete), a replay one; its async methods "
        "run in worker threads. RedisStore: a first execution is two `EVALSHA` (acquire, "
        "complete), a replay one. PostgresStore: a first execution is two statements "
        "(an upsert that returns the record, an update), a replay one. A sync keyed call also "
        "starts and stops the lease heartbeat.",
        "nodekit checks a payload fingerprint on every keyed call and stores only digests; "
        "results are stored as JSON through the return annotation.",
    ]
    try:
        with ExitStack() as stack:
            openers: list[tuple[str, Callable[[], Any]]] = [
                (MEMORY, nk.MemoryStore),
                (SQLITE, lambda: stack.enter_context(sqlite_store())),
                (REDIS, lambda: stack.enter_context(redis_store(loop))),
                (POSTGRES, lambda: stack.enter_context(postgres_store(loop))),
            ]
            for name, opener in openers:
                try:
                    store = opener()
                except Exception as exc:  # a server that is not there: say so, go on
                    skipped.append(f"**{name} skipped**: could not open it ({exc!r}).")
                    continue
                rows.extend(bench_store(name, store, loop, cfg).values())
                bursts.append(bench_burst(name, store, loop, cfg))
    finally:
        loop.close()

    ok, why = powertools_status()
    if ok and any(row.store == REDIS for row in rows):
        with warnings.catch_warnings():
            # The class is deprecated in favour of its alias CachePersistenceLayer (the same
            # class); without a Lambda context every in-progress write warns that the remaining
            # time is unknown. Both are silenced; the warn() calls are still timed.
            warnings.filterwarnings("ignore", message="RedisCachePersistenceLayer will be removed")
            warnings.filterwarnings("ignore", message="Couldn't determine the remaining time")
            row, written = bench_powertools(cfg)
        rows.append(row)
        notes.append(
            f"{POWERTOOLS} ({why}): `idempotent_function(data_keyword_argument='k', "
            "persistence_store=RedisCachePersistenceLayer(client=redis.Redis.from_url(url)), "
            "config=IdempotencyConfig())` on the same Redis, same N, no Lambda context "
            "(none is needed; installed as `aws-lambda-powertools[redis,aws-sdk]`, because "
            "`aws_lambda_powertools.utilities.idempotency` imports boto3 for its DynamoDB layer "
            "even when only Redis is used; not a nodekit dependency). Defaults kept: the key is an MD5 of the whole payload, no payload "
            "validation, no local cache, 1 h expiry. A first execution is `SET NX` then `SET` "
            "(2 round trips), a replay `SET NX` (refused) then `GET` (2 round trips). Powertools' "
            f"idempotency has no async form, so there is no async row. The run left {written} "
            "under its own prefix, removed afterwards."
        )
    elif ok:
        skipped.append(f"{POWERTOOLS}: skipped, Redis is not reachable.")
    else:
        skipped.append(f"{POWERTOOLS}: {why}")
    if quick:
        notes.append("**Quick smoke run: too few keys and rounds for the figures to mean much.**")
    floors = round_trip_floors()
    return render(cfg, rows, skipped, notes, (load_start, os.getloadavg()), bursts, floors)


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
