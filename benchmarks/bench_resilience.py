"""Circuit breakers and rate limits: what a guard costs on a call that it lets through.

Measured side by side in one process, with the peers users would pick instead:

* a **closed circuit breaker**, in memory: ``@nk.node(circuit=nk.CircuitBreaker(...))`` over a
  plain ``@nk.node`` around the same function, beside pybreaker (its decorator) and purgatory
  (``SyncCircuitBreakerFactory`` / ``AsyncCircuitBreakerFactory`` decorators) over the bare
  function; sync and async (pybreaker's only async form needs tornado: no async row);
* a **local rate-limit acquire that never waits** (the rate far above what one process can
  reach): ``@nk.node(rate_limit=nk.RateLimit(...))`` over a plain node (nodekit's acquire has
  no public call of its own), beside limits (``FixedWindowRateLimiter`` and
  ``MovingWindowRateLimiter`` on ``MemoryStorage``, ``hit``), pyrate-limiter
  (``Limiter.try_acquire(blocking=False)``) and aiolimiter (``AsyncLimiter.acquire``, async
  only) over the bare function;
* a **Redis rate-limit acquire** (``RateLimit(store=nk.RedisStore(url, prefix=unique))``): the
  ``EVALSHA`` calls the server counted (``INFO commandstats`` before and after N calls) and the
  µs per acquire next to a redis-py ``PING`` (one round trip) in the same run; skipped with a
  note when Redis is not reachable. Its keys are removed afterwards.

Every pass builds fresh objects, runs N calls with the collector off and checks that the
subject did its thing (the function ran N times, the breaker is still closed, the limiter
never waited nor refused). Best of several passes, round-robin so drift hits every row alike.
``python -m benchmarks.bench_resilience`` writes its section of BENCHMARKS.md; ``--quick`` is a
smoke run that writes nothing. ``NODEKIT_TEST_REDIS_URL`` points it at another Redis.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import aiolimiter
import purgatory
import pybreaker
from limits import RateLimitItemPerHour
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from pyrate_limiter import Duration, Limiter, Rate

import nodekit as nk

from . import _common
from ._common import ns, table

SECTION = "resilience"
REDIS_URL = os.environ.get("NODEKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PEERS = ("pybreaker", "purgatory", "aiolimiter", "limits", "pyrate-limiter", "redis")
SYNC, ASYNC = "sync", "async"
BUSY_LOAD = 1.5

# Issue 11's targets: a closed breaker adds at most 1 µs per call in memory and less than
# pybreaker and purgatory; a local acquire costs less than aiolimiter, limits and
# pyrate-limiter; a Redis acquire is one round trip.
CIRCUIT_GUIDE_NS = 1_000.0

# Rates no pass can reach, so that no limiter ever waits or refuses: GCRA with a burst above
# the calls of a pass never makes a call wait, whatever their spacing.
HUGE_RATE = 1_000_000_000
HUGE_BURST = 10_000_000

# Row labels
BARE = "bare function"
PLAIN = "plain `@nk.node`"
NK_CIRCUIT = "nodekit `circuit=CircuitBreaker`"
PYBREAKER = "pybreaker `@CircuitBreaker()`"
PURGATORY = "purgatory `@factory(name)`"
NK_LIMIT = "nodekit `rate_limit=RateLimit`"
LIMITS_FIXED = "limits FixedWindow `hit`"
LIMITS_MOVING = "limits MovingWindow `hit`"
PYRATE = "pyrate-limiter `try_acquire`"
AIOLIMITER = "aiolimiter `acquire`"


@dataclass(frozen=True)
class Config:
    rounds: int
    n: int  # calls per pass, local subjects
    redis_n: int  # calls per pass, Redis
    redis_rounds: int

    @classmethod
    def for_run(cls, quick: bool) -> Config:
        if quick:
            return cls(rounds=2, n=2_000, redis_n=200, redis_rounds=1)
        # sized for the whole module to take well under a minute on a small, busy machine
        return cls(rounds=9, n=20_000, redis_n=2_000, redis_rounds=3)


class Counter:
    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0


def _sync_body(counter: Counter) -> Callable[[int], int]:
    def work(x: int) -> int:
        counter.calls += 1
        return x

    return work


def _async_body(counter: Counter) -> Callable[[int], Any]:
    async def work(x: int) -> int:
        counter.calls += 1
        return x

    return work


def _check(label: str, ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"{label}: {what}")


def _ran(label: str, counter: Counter, n: int) -> None:
    _check(label, counter.calls == n, f"the function ran {counter.calls} times, expected {n}")


# ---------------------------------------------------------------------------- passes
#
# A pass builds its subject afresh, times n calls (perf_counter_ns around the loop only), checks
# what the subject did and returns the elapsed nanoseconds. `_timed` runs it with gc off.

Pass = Callable[[int], int]


def _timed(pass_: Pass, n: int) -> int:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return pass_(n)
    finally:
        if enabled:
            gc.enable()


def sync_passes() -> dict[str, dict[str, Pass]]:
    """Sync passes: {table: {row: pass}}; the first row of each table is its baseline."""

    def bare(n: int) -> int:
        counter = Counter()
        fn = _sync_body(counter)
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        elapsed = time.perf_counter_ns() - start
        _ran(BARE, counter, n)
        return elapsed

    def plain(n: int) -> int:
        counter = Counter()
        fn = nk.node(name="bench")(_sync_body(counter))
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        elapsed = time.perf_counter_ns() - start
        _ran(PLAIN, counter, n)
        return elapsed

    def nk_circuit(n: int) -> int:
        counter = Counter()
        breaker = nk.CircuitBreaker("bench")
        fn = nk.node(name="bench", circuit=breaker)(_sync_body(counter))
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        elapsed = time.perf_counter_ns() - start
        _ran(NK_CIRCUIT, counter, n)
        _check(NK_CIRCUIT, breaker.state == "closed", f"breaker is {breaker.state}")
        return elapsed

    def py_breaker(n: int) -> int:
        counter = Counter()
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
        fn = breaker(_sync_body(counter))
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        elapsed = time.perf_counter_ns() - start
        _ran(PYBREAKER, counter, n)
        state = breaker.current_state
        _check(PYBREAKER, state == "closed" and breaker.fail_counter == 0, f"breaker is {state}")
        return elapsed

    def purgatory_(n: int) -> int:
        counter = Counter()
        factory = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        fn = factory("bench")(_sync_body(counter))
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        elapsed = time.perf_counter_ns() - start
        _ran(PURGATORY, counter, n)
        state = factory.get_breaker("bench").context.state
        _check(PURGATORY, state == "closed", f"breaker is {state}")
        return elapsed

    def nk_limit(n: int) -> int:
        counter = Counter()
        limit = nk.RateLimit("bench", HUGE_RATE, burst=HUGE_BURST)
        fn = nk.node(name="bench", rate_limit=limit)(_sync_body(counter))
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)  # a refusal would raise RateLimited
        elapsed = time.perf_counter_ns() - start
        _ran(NK_LIMIT, counter, n)
        return elapsed

    def limits_pass(label: str, strategy: type) -> Pass:
        def pass_(n: int) -> int:
            counter = Counter()
            fn = _sync_body(counter)
            limiter = strategy(MemoryStorage())
            item = RateLimitItemPerHour(HUGE_RATE)
            hit = limiter.hit
            refused = 0
            start = time.perf_counter_ns()
            for i in range(n):
                if not hit(item, "bench"):
                    refused += 1
                    continue
                fn(i)
            elapsed = time.perf_counter_ns() - start
            _check(label, refused == 0, f"{refused} hits refused")
            _ran(label, counter, n)
            return elapsed

        return pass_

    def pyrate(n: int) -> int:
        counter = Counter()
        fn = _sync_body(counter)
        limiter = Limiter(Rate(HUGE_RATE, Duration.HOUR))
        try:
            acquire = limiter.try_acquire
            refused = 0
            start = time.perf_counter_ns()
            for i in range(n):
                if not acquire("bench", blocking=False):
                    refused += 1
                    continue
                fn(i)
            elapsed = time.perf_counter_ns() - start
        finally:
            limiter.close()
        _check(PYRATE, refused == 0, f"{refused} acquires refused")
        _ran(PYRATE, counter, n)
        return elapsed

    return {
        "circuit": {
            BARE: bare,
            PLAIN: plain,
            NK_CIRCUIT: nk_circuit,
            PYBREAKER: py_breaker,
            PURGATORY: purgatory_,
        },
        "limit": {
            BARE: bare,
            PLAIN: plain,
            NK_LIMIT: nk_limit,
            LIMITS_FIXED: limits_pass(LIMITS_FIXED, FixedWindowRateLimiter),
            LIMITS_MOVING: limits_pass(LIMITS_MOVING, MovingWindowRateLimiter),
            PYRATE: pyrate,
        },
    }


def async_passes(loop: asyncio.AbstractEventLoop) -> dict[str, dict[str, Pass]]:
    """Async passes: each awaits n calls one after the other in `loop`."""

    def run(coro: Any) -> int:
        return loop.run_until_complete(coro)

    async def loop_over(fn: Any, n: int) -> int:
        start = time.perf_counter_ns()
        for i in range(n):
            await fn(i)
        return time.perf_counter_ns() - start

    def bare(n: int) -> int:
        counter = Counter()
        elapsed = run(loop_over(_async_body(counter), n))
        _ran(BARE, counter, n)
        return elapsed

    def plain(n: int) -> int:
        counter = Counter()
        elapsed = run(loop_over(nk.node(name="bench")(_async_body(counter)), n))
        _ran(PLAIN, counter, n)
        return elapsed

    def nk_circuit(n: int) -> int:
        counter = Counter()
        breaker = nk.CircuitBreaker("bench")
        elapsed = run(loop_over(nk.node(name="bench", circuit=breaker)(_async_body(counter)), n))
        _ran(NK_CIRCUIT, counter, n)
        _check(NK_CIRCUIT, breaker.state == "closed", f"breaker is {breaker.state}")
        return elapsed

    def purgatory_(n: int) -> int:
        counter = Counter()
        factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        elapsed = run(loop_over(factory("bench")(_async_body(counter)), n))
        _ran(PURGATORY, counter, n)
        state = run(factory.get_breaker("bench")).context.state
        _check(PURGATORY, state == "closed", f"breaker is {state}")
        return elapsed

    def nk_limit(n: int) -> int:
        counter = Counter()
        limit = nk.RateLimit("bench", HUGE_RATE, burst=HUGE_BURST)
        elapsed = run(loop_over(nk.node(name="bench", rate_limit=limit)(_async_body(counter)), n))
        _ran(NK_LIMIT, counter, n)
        return elapsed

    def aiolimiter_(n: int) -> int:
        counter = Counter()
        fn = _async_body(counter)
        # max_rate above n: the bucket can never be full, so acquire never waits
        limiter = aiolimiter.AsyncLimiter(HUGE_RATE, 1)

        async def go() -> int:
            acquire = limiter.acquire
            start = time.perf_counter_ns()
            for i in range(n):
                await acquire()
                await fn(i)
            return time.perf_counter_ns() - start

        elapsed = run(go())
        _ran(AIOLIMITER, counter, n)
        waiters = len(getattr(limiter, "_waiters", ()))
        _check(AIOLIMITER, waiters == 0 and limiter.has_capacity(), f"{waiters} waiters")
        return elapsed

    return {
        "circuit": {BARE: bare, PLAIN: plain, NK_CIRCUIT: nk_circuit, PURGATORY: purgatory_},
        "limit": {BARE: bare, PLAIN: plain, NK_LIMIT: nk_limit, AIOLIMITER: aiolimiter_},
    }


def verify_nodekit(loop: asyncio.AbstractEventLoop, n: int) -> list[str]:
    """One untimed pass per nodekit subject with an event sink: no wait, refusal or breaker
    transition may be reported (the timed passes run without a sink, as users' code would)."""
    seen: list[str] = []
    remove = nk.add_sink(lambda event: seen.append(event.name))
    try:
        for body, call in (
            (_sync_body, lambda fn, i: fn(i)),
            (_async_body, lambda fn, i: loop.run_until_complete(fn(i))),
        ):
            breaker = nk.CircuitBreaker("verify")
            limit = nk.RateLimit("verify", HUGE_RATE, burst=HUGE_BURST)
            for options in ({"circuit": breaker}, {"rate_limit": limit}):
                counter = Counter()
                fn = nk.node(name="verify", **options)(body(counter))
                for i in range(n):
                    call(fn, i)
                _ran(f"verify {options}", counter, n)
            _check("verify", breaker.state == "closed", f"breaker is {breaker.state}")
    finally:
        remove()
    bad = sorted({name for name in seen if name.startswith(("circuit.", "rate_limit."))})
    _check("verify", not bad, f"events {bad}")
    return bad


# ---------------------------------------------------------------------------- measuring


@dataclass
class Row:
    label: str
    samples: list[float] = field(default_factory=list)  # ns per call, one per pass

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure(passes: dict[str, Pass], n: int, rounds: int) -> dict[str, Row]:
    """Every pass `rounds` times, round-robin with a rotating start; one warm-up pass each."""
    for pass_ in passes.values():
        _timed(pass_, max(1, n // 10))
    rows = {label: Row(label) for label in passes}
    labels = list(passes)
    for round_ in range(rounds):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            rows[label].samples.append(_timed(passes[label], n) / n)
    return rows


# ---------------------------------------------------------------------------- Redis


@dataclass
class RedisResult:
    mode: str
    n: int
    node_ns: list[float] = field(default_factory=list)  # node with the Redis rate limit
    plain_ns: list[float] = field(default_factory=list)  # plain node, same round
    evalsha: list[int] = field(default_factory=list)  # server-counted EVALSHA per pass
    scripted: list[int] = field(default_factory=list)  # commands run inside the scripts
    reads: list[int] = field(default_factory=list)  # read events the server processed
    names: set[str] = field(default_factory=set)  # the commands counted besides EVALSHA
    server_us: list[float] = field(default_factory=list)  # server time per EVALSHA, µs
    ping_ns: list[float] = field(default_factory=list)  # a PING in this mode, same round


def _server_counts(client: Any) -> dict[str, int]:
    """The server's calls per command and its read events, in one INFO (one round trip)."""
    info = client.info("commandstats", "stats")
    counts = {
        name: int(value["calls"]) for name, value in info.items() if name.startswith("cmdstat_")
    }
    counts["reads"] = int(info["total_reads_processed"])
    counts["evalsha_usec"] = int(info.get("cmdstat_evalsha", {}).get("usec", 0))
    return counts


def _delta(before: dict[str, int], after: dict[str, int]) -> tuple[int, int, int, set[str], float]:
    """EVALSHA calls; every other command (those the scripts run: commandstats counts them
    too) but the INFO that read the counts; read events, but the INFO's own; the commands
    counted besides EVALSHA; the server's µs per EVALSHA (scripted commands included)."""
    diff = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    usec = diff.pop("evalsha_usec", 0)
    reads = diff.pop("reads", 0) - 1
    evalsha = diff.pop("cmdstat_evalsha", 0)
    diff["cmdstat_info"] = diff.get("cmdstat_info", 0) - 1
    names = {k.removeprefix("cmdstat_").upper() for k, v in diff.items() if v}
    return evalsha, sum(diff.values()), reads, names, usec / max(evalsha, 1)


def _redis_cleanup(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def bench_redis(
    loop: asyncio.AbstractEventLoop, cfg: Config
) -> tuple[list[RedisResult], int] | str:
    """Per mode: the node with a Redis RateLimit and a plain node, and the EVALSHA count over
    each pass, a PING per round; the keys removed. A string says why it was skipped."""
    try:
        import redis
        import redis.asyncio
    except ImportError:
        return "redis-py is not installed"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        return f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__})"
    prefix = f"nodekit-bench-{uuid.uuid4().hex[:12]}:"
    store = nk.RedisStore(REDIS_URL, prefix=prefix)
    results: list[RedisResult] = []
    removed = 0
    try:
        n = cfg.redis_n
        counter = Counter()
        limit = nk.RateLimit("bench", HUGE_RATE, burst=HUGE_BURST, store=store)
        subjects = {
            SYNC: (
                nk.node(name="bench", rate_limit=limit)(_sync_body(counter)),
                nk.node(name="bench_plain")(_sync_body(counter)),
                lambda fn, m: _loop_sync(fn, m),
            ),
            ASYNC: (
                nk.node(name="bench", rate_limit=limit)(_async_body(counter)),
                nk.node(name="bench_plain")(_async_body(counter)),
                lambda fn, m: loop.run_until_complete(_loop_async(fn, m)),
            ),
        }
        # warm-up (connections, the script loaded once) with an event sink: no waits, no refusals
        seen: list[str] = []
        remove = nk.add_sink(lambda event: seen.append(event.name))
        try:
            for limited, plain, timed in subjects.values():
                timed(limited, 200)
                timed(plain, 200)
        finally:
            remove()
        bad = sorted({name for name in seen if name.startswith("rate_limit.")})
        _check("Redis warm-up", not bad, f"events {bad}")
        for mode in subjects:
            results.append(RedisResult(mode, n))
        aclient = redis.asyncio.Redis.from_url(REDIS_URL)
        pingers = {
            SYNC: lambda m: _loop_ping(client, m),
            ASYNC: lambda m: loop.run_until_complete(_loop_aping(aclient, m)),
        }
        for ping in pingers.values():
            ping(50)
        for _ in range(cfg.redis_rounds):
            for result in results:
                result.ping_ns.append(_timed(pingers[result.mode], n) / n)
            for result, (limited, plain, timed) in zip(results, subjects.values(), strict=True):
                result.plain_ns.append(_timed(lambda m, p=plain, t=timed: t(p, m), n) / n)
                before_calls = counter.calls
                before = _server_counts(client)
                elapsed = _timed(lambda m, f=limited, t=timed: t(f, m), n)
                after = _server_counts(client)
                _check(f"Redis {result.mode}", counter.calls - before_calls == n, "calls lost")
                evalsha, scripted, reads, names, server_us = _delta(before, after)
                result.names |= names
                result.server_us.append(server_us)
                result.node_ns.append(elapsed / n)
                result.evalsha.append(evalsha)
                result.scripted.append(scripted)
                result.reads.append(reads)
        loop.run_until_complete(aclient.aclose())
    finally:
        with suppress(Exception):
            loop.run_until_complete(store.aclose())
        store.close()
        client.close()
        removed = _redis_cleanup(prefix)
    return results, removed


def _loop_sync(fn: Any, n: int) -> int:
    start = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return time.perf_counter_ns() - start


async def _loop_async(fn: Any, n: int) -> int:
    start = time.perf_counter_ns()
    for i in range(n):
        await fn(i)
    return time.perf_counter_ns() - start


async def _loop_aping(client: Any, n: int) -> int:
    ping = client.ping
    start = time.perf_counter_ns()
    for _ in range(n):
        await ping()
    return time.perf_counter_ns() - start


def _loop_ping(client: Any, n: int) -> int:
    ping = client.ping
    start = time.perf_counter_ns()
    for _ in range(n):
        ping()
    return time.perf_counter_ns() - start


# ---------------------------------------------------------------------------- report


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _us(value_ns: float) -> str:
    return f"{value_ns / 1000:,.2f}"


def render_circuit(results: dict[str, dict[str, Row]]) -> list[str]:
    out = [
        "### Closed circuit breaker, in memory",
        "",
        "ns per call, best of the passes (median beside it). *Added*: for nodekit, the node "
        'with `circuit=nk.CircuitBreaker("bench")` (defaults) minus a plain `@nk.node` '
        "around the same function, i.e. what the breaker adds to a node; for pybreaker "
        "(`@pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)`) and purgatory "
        '(`@SyncCircuitBreakerFactory(...)("bench")`, async: `AsyncCircuitBreakerFactory`), '
        "their decorator minus the bare function. Every pass checks that the function ran N "
        "times and that the breaker is still closed. Target: a closed breaker adds ≤ "
        f"{CIRCUIT_GUIDE_NS / 1000:.0f} µs per call in memory, and less than pybreaker and "
        "purgatory.",
        "",
    ]
    body = []
    for mode, rows in results.items():
        bare, plain = rows[BARE].best, rows[PLAIN].best
        peers = [rows[p].best - bare for p in (PYBREAKER, PURGATORY) if p in rows]
        for label, row in rows.items():
            if label == BARE:
                added, guide = "—", "—"
            elif label == PLAIN:
                added, guide = ns(row.best - bare) + " (the node)", "—"
            elif label == NK_CIRCUIT:
                added_ns = row.best - plain
                added = ns(added_ns)
                guide = f"≤ {CIRCUIT_GUIDE_NS:,.0f} ns: {_verdict(added_ns <= CIRCUIT_GUIDE_NS)}"
                if peers:
                    guide += f"; below the peers: {_verdict(all(added_ns < p for p in peers))}"
            else:
                added, guide = ns(row.best - bare), "—"
            body.append([mode, label, ns(row.best), ns(row.median), added, guide])
    out.append(table(["mode", "subject", "ns/call", "median", "added ns", "guide"], body, "llrrrl"))
    return out


def render_limit(results: dict[str, dict[str, Row]]) -> list[str]:
    out = [
        "",
        "### Local rate-limit acquire that never waits",
        "",
        "ns per call, best of the passes (median beside it); the rate is far above what the "
        f"loop reaches ({HUGE_RATE:,} per second or per hour, nodekit with `burst="
        f"{HUGE_BURST:,}`), so no acquire waits or is refused. *Acquire*: nodekit's acquire "
        "has no public call of its own, so it is measured as the node with "
        '`rate_limit=nk.RateLimit("bench", rate, burst=...)` minus a plain `@nk.node` '
        "(GCRA reserve, the guard around it, and whatever the node does for a guarded "
        "attempt); the peers as their acquire plus the bare function minus the bare function "
        "(`if not limiter.hit(item, key): ...`; pyrate-limiter "
        "`if not limiter.try_acquire(key, blocking=False): ...`; `await "
        "limiter.acquire()`). Every pass checks that none was refused and that the function "
        "ran N times; aiolimiter's bucket can never fill (its size is above N), and a separate "
        "pass with an event sink checks that nodekit reports no wait. Target: a local "
        "acquire costs less than aiolimiter, limits and pyrate-limiter.",
        "",
    ]
    body = []
    for mode, rows in results.items():
        bare, plain = rows[BARE].best, rows[PLAIN].best
        peer_labels = [p for p in (LIMITS_FIXED, LIMITS_MOVING, PYRATE, AIOLIMITER) if p in rows]
        peers = [rows[p].best - bare for p in peer_labels]
        for label, row in rows.items():
            if label == BARE:
                added, guide = "—", "—"
            elif label == PLAIN:
                added, guide = ns(row.best - bare) + " (the node)", "—"
            elif label == NK_LIMIT:
                added_ns = row.best - plain
                added = ns(added_ns)
                guide = f"below the peers: {_verdict(all(added_ns < p for p in peers))}"
            else:
                added, guide = ns(row.best - bare), "—"
            body.append([mode, label, ns(row.best), ns(row.median), added, guide])
    out.append(
        table(["mode", "subject", "ns/call", "median", "acquire ns", "guide"], body, "llrrrl")
    )
    return out


def render_redis(redis: tuple[list[RedisResult], int] | str, cfg: Config) -> list[str]:
    out = ["", "### Redis rate-limit acquire", ""]
    if isinstance(redis, str):
        return [*out, f"**Skipped**: {redis}."]
    results, removed = redis
    out += [
        f'`RateLimit("bench", rate, burst=..., store=nk.RedisStore(url, prefix=unique))` on '
        f"the local Redis, N = {cfg.redis_n:,} calls per pass, {cfg.redis_rounds} pass(es) per "
        "mode after a warm-up (connection, script load) watched by an event sink (no wait, "
        "no refusal). Counted by the server (`INFO commandstats stats` before and after "
        "each pass, the `INFO` itself taken out; the fewest of the passes, as the server is "
        "shared and other clients land in the same counters), per acquire: *EVALSHA* "
        "(`cmdstat_evalsha`), *in script*: every other command counted, which here are the "
        "commands the script runs inside the server (commandstats counts those too), and "
        "*reads*: the read events the server processed (`total_reads_processed`), i.e. "
        "requests arriving from clients: one per round trip. "
        "*Acquire µs*: the node with the limit minus a plain node, best pass of each. "
        "*Server µs*: the server's own time per EVALSHA (commandstats `usec`, the script's "
        "commands included). "
        "*PING*: a redis-py `PING` (one round trip; async: `redis.asyncio`), N per pass, one "
        "pass per round beside the others, best pass. "
        "Target: a Redis acquire is one round trip.",
        "",
    ]
    body = []
    for r in results:
        evalsha, scripted, reads = min(r.evalsha), min(r.scripted), min(r.reads)
        acquire = min(r.node_ns) - min(r.plain_ns)
        one_trip = evalsha == r.n and reads == r.n
        body.append(
            [
                r.mode,
                f"{r.n:,}",
                f"{evalsha / r.n:.3f}",
                f"{scripted / r.n:.3f}",
                f"{reads / r.n:.3f}",
                f"{min(r.server_us):,.1f}",
                _us(min(r.plain_ns)),
                _us(min(r.node_ns)),
                _us(acquire),
                _us(min(r.ping_ns)),
                f"{acquire / min(r.ping_ns):.2f}",
                f"one round trip: {_verdict(one_trip)}",
            ]
        )
    out.append(
        table(
            [
                "mode",
                "N",
                "EVALSHA",
                "in script",
                "reads",
                "server µs",
                "plain node µs",
                "node + limit µs",
                "acquire µs",
                "PING µs",
                "acquire / PING",
                "guide",
            ],
            body,
            "lrrrrrrrrrrl",
        )
    )
    names = sorted(set().union(*(r.names for r in results)))
    out += [
        "",
        f"Commands counted besides EVALSHA: {', '.join(f'`{n}`' for n in names) or 'none'}. "
        f"The run's {removed} Redis key(s) under its prefix were removed afterwards.",
    ]
    return out


def render(
    cfg: Config,
    circuit: dict[str, dict[str, Row]],
    limit: dict[str, dict[str, Row]],
    redis: tuple[list[RedisResult], int] | str,
    loads: tuple[tuple[float, float, float], tuple[float, float, float]],
    quick: bool,
) -> str:
    start, end = loads
    load_text = (
        f"{start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start, "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at the end (1 / 5 / 15 min)"
    )
    out = [
        "## Resilience: closed circuit breakers and rate-limit acquires",
        "",
        "`python -m benchmarks.bench_resilience`. One process; each subject wraps "
        "`def work(x): counter.calls += 1; return x` (async: `async def`), called as `fn(i)` "
        f"N = {cfg.n:,} times per pass, one call after the other (async: awaited one after the "
        f"other in one event loop). Best of {cfg.rounds} passes per subject, round-robin with a "
        "rotating start after one warm-up pass each; fresh breakers, limiters and nodes in "
        "every pass; gc off during each pass.",
        "",
        _common.machine_markdown(),
        f"- **Peers:** {_common.package_versions(PEERS)}",
        f"- **Load average:** {load_text}",
    ]
    if max(start[0], end[0]) > BUSY_LOAD:
        out.append(
            f"- **The machine was busy with other work** (load average above {BUSY_LOAD}): "
            "the figures are higher than an idle machine would give."
        )
    out.append("")
    out += render_circuit(circuit)
    out += render_limit(limit)
    out += render_redis(redis, cfg)
    notes = [
        "pybreaker has no asyncio form (its `call_async` needs tornado): no async pybreaker "
        "row. aiolimiter is asyncio only: no sync row.",
        "nodekit's breaker counts every attempt in a sliding time window (failure rate over "
        "`window`, `min_calls`); pybreaker and purgatory count consecutive failures. "
        "purgatory's decorator looks its breaker up by name in its unit of work on every call.",
        "limits' `MovingWindowRateLimiter` on `MemoryStorage` keeps one entry per hit in the "
        "window and inserts each new one at the front of a list: its cost per hit grows with "
        f"the hits already in the window (up to N = {cfg.n:,} here, fresh storage every pass). "
        "The fixed window is one counter. pyrate-limiter's `InMemoryBucket` appends one item "
        "per acquire and skips its window search while the bucket holds fewer items than the "
        "limit.",
        "The guides compare nodekit's added cost over a plain node with the peers' added cost "
        "over the bare function, as issue 11 states its targets. A whole nodekit call also "
        "pays for the plain node (its row), which the peers' decorators do not do (retries, "
        "timeouts, events, classification): for whole calls, compare the ns/call column.",
    ]
    if quick:
        notes.append("**Quick smoke run: too few calls and passes for the figures to mean much.**")
    out += ["", "### Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(out) + "\n"


def run(quick: bool) -> str:
    cfg = Config.for_run(quick)
    load_start = os.getloadavg()
    loop = asyncio.new_event_loop()
    try:
        verify_nodekit(loop, min(cfg.n, 2_000))
        sync, async_ = sync_passes(), async_passes(loop)
        circuit = {
            SYNC: measure(sync["circuit"], cfg.n, cfg.rounds),
            ASYNC: measure(async_["circuit"], cfg.n, cfg.rounds),
        }
        limit = {
            SYNC: measure(sync["limit"], cfg.n, cfg.rounds),
            ASYNC: measure(async_["limit"], cfg.n, cfg.rounds),
        }
        with warnings.catch_warnings():
            # RedisStore warns once that a server without AOF loses idempotency records on a
            # restart; this module uses no idempotency record
            warnings.filterwarnings("ignore", message="RedisStore: the Redis server")
            redis = bench_redis(loop, cfg)
    finally:
        loop.close()
    return render(cfg, circuit, limit, redis, (load_start, os.getloadavg()), quick)


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
