"""The node core's success path, side by side with the retry libraries users would pick instead.

Measured in one run, sync and async, for a function that succeeds at once:

* ns per call (best and median of the repeats) and the overhead over the bare call, for the
  bare function, a plain try/for-loop retry wrapper, ``@nk.node(retry=nk.Retry(),
  effect=nk.Effect.READ)``, ``@nk.node(retry=nk.Retry())`` (WRITE, the default), tenacity,
  stamina and backoff; and nodekit's overhead divided by tenacity's (target: at most 1/10);
* cyclic garbage per call: with the collector off, N calls, then what ``gc.collect()`` finds
  unreachable (target for nodekit: 0);
* the same nodekit rows once structlog has been imported (unconfigured, as a library finds it:
  nodekit binds nothing per call then, nor with ``nk.add_node_context`` in a configured chain);
* ``import nodekit`` in fresh interpreters beside tenacity, stamina and langgraph.graph, and
  which heavy modules ``import nodekit`` pulls in.

``python -m benchmarks.bench_node`` writes its section of BENCHMARKS.md; ``--quick`` is a smoke
run that writes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import backoff
import stamina
import tenacity

import nodekit as nk

from . import _common
from ._common import Batch, Stats, ns, table

SECTION = "node"
STRUCTLOG_AT_START = "structlog" in sys.modules

# Rows of the success-path tables, in order; the first is the baseline.
BARE = "bare call"
PLAIN = "plain try/for retry"
NK_READ = "nodekit READ"
NK_WRITE = "nodekit WRITE"
TENACITY = "tenacity"
STAMINA = "stamina"
BACKOFF = "backoff"
DECORATIONS = {
    BARE: "none: `def add_one(x): return x + 1`",
    PLAIN: "`for attempt in range(3): try: return fn(...) except Exception: sleep(...)`",
    NK_READ: "`@nk.node(retry=nk.Retry(), effect=nk.Effect.READ)`",
    NK_WRITE: "`@nk.node(retry=nk.Retry())` (effect WRITE, the default)",
    TENACITY: "`@tenacity.retry(stop=stop_after_attempt(3), wait=wait_exponential())`",
    STAMINA: "`@stamina.retry(on=Exception, attempts=3)`",
    BACKOFF: "`@backoff.on_exception(backoff.expo, Exception, max_tries=3)`",
}
NODEKIT_ROWS = (NK_READ, NK_WRITE)

IMPORTS = ("nodekit", "tenacity", "stamina", "langgraph.graph")
HEAVY = ("pydantic", "httpx", "structlog", "tenacity", "langgraph", "prometheus_client")
IMPORT_TARGET_MS = 150.0
RATIO_TARGET = 0.10


@dataclass(frozen=True)
class Config:
    repeats: int
    target_ns: int
    garbage_calls: int
    import_runs: int

    @classmethod
    def for_run(cls, quick: bool) -> Config:
        if quick:
            return cls(repeats=3, target_ns=2_000_000, garbage_calls=500, import_runs=2)
        return cls(repeats=11, target_ns=40_000_000, garbage_calls=20_000, import_runs=7)


# ---------------------------------------------------------------------------- subjects


def _plain_retry_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, 4):
            try:
                return fn(*args, **kwargs)
            except Exception:
                if attempt == 3:
                    raise
                time.sleep(0.1 * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    return wrapper


def _plain_retry_async(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, 4):
            try:
                return await fn(*args, **kwargs)
            except Exception:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.1 * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    return wrapper


def _decorators(is_async: bool) -> dict[str, Callable[[Any], Any]]:
    return {
        BARE: lambda fn: fn,
        PLAIN: _plain_retry_async if is_async else _plain_retry_sync,
        NK_READ: nk.node(retry=nk.Retry(), effect=nk.Effect.READ),
        NK_WRITE: nk.node(retry=nk.Retry()),
        TENACITY: tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential()
        ),
        STAMINA: stamina.retry(on=Exception, attempts=3),
        BACKOFF: backoff.on_exception(backoff.expo, Exception, max_tries=3),
    }


def _fresh_sync() -> Callable[[int], int]:
    def add_one(x: int) -> int:
        return x + 1

    return add_one


def _fresh_async() -> Callable[[int], Awaitable[int]]:
    async def add_one(x: int) -> int:
        return x + 1

    return add_one


def build(is_async: bool, labels: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Each subject decorates its own, freshly defined `add_one`."""
    fresh = _fresh_async if is_async else _fresh_sync
    decorators = _decorators(is_async)
    return {
        label: deco(fresh())
        for label, deco in decorators.items()
        if labels is None or label in labels
    }


def verify(sync: dict[str, Any], loop: asyncio.AbstractEventLoop, aio: dict[str, Any]) -> None:
    """Every subject returns the right value, and an async subject stays a coroutine function."""
    for label, fn in sync.items():
        got = fn(41)
        if got != 42:
            raise AssertionError(f"sync {label}: add_one(41) returned {got!r}")
    for label, fn in aio.items():
        if not asyncio.iscoroutinefunction(fn):
            raise AssertionError(f"async {label}: not a coroutine function")
        got = loop.run_until_complete(fn(41))
        if got != 42:
            raise AssertionError(f"async {label}: await add_one(41) returned {got!r}")


def check_environment() -> list[str]:
    """Make sure no library runs in a mode that skips work; describe what was found."""
    if not stamina.is_active():
        stamina.set_active(True)
    if stamina.is_testing():
        stamina.set_testing(False)
    if logging.getLogger("nodekit").isEnabledFor(logging.DEBUG):
        raise SystemExit("nodekit's logger is at DEBUG: per-call events would be timed")
    return [
        f"stamina: active={stamina.is_active()}, testing={stamina.is_testing()}; "
        f"prometheus_client installed: {importlib.util.find_spec('prometheus_client') is not None}",
    ]


# ---------------------------------------------------------------------------- timing


def sync_batch(fn: Callable[[int], int]) -> Batch:
    def batch(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in repeat(None, n):
            fn(1)
        return time.perf_counter_ns() - start

    return batch


def async_batch(loop: asyncio.AbstractEventLoop, fn: Callable[[int], Awaitable[int]]) -> Batch:
    async def run(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in repeat(None, n):
            await fn(1)
        return time.perf_counter_ns() - start

    def batch(n: int) -> int:
        return loop.run_until_complete(run(n))

    return batch


def time_all(
    sync: dict[str, Any], loop: asyncio.AbstractEventLoop, aio: dict[str, Any], cfg: Config
) -> tuple[dict[str, Stats], dict[str, Stats]]:
    batches = {("sync", k): sync_batch(f) for k, f in sync.items()}
    batches |= {("async", k): async_batch(loop, f) for k, f in aio.items()}
    keyed = {f"{mode}|{label}": b for (mode, label), b in batches.items()}
    stats = _common.measure(keyed, repeats=cfg.repeats, target_ns=cfg.target_ns)
    return (
        {label: stats[f"sync|{label}"] for label in sync},
        {label: stats[f"async|{label}"] for label in aio},
    )


def garbage_sync(fn: Callable[[int], int], calls: int) -> float:
    gc.collect()
    gc.disable()
    try:
        for _ in repeat(None, calls):
            fn(1)
        return gc.collect() / calls
    finally:
        gc.enable()


def garbage_async(
    loop: asyncio.AbstractEventLoop, fn: Callable[[int], Awaitable[int]], calls: int
) -> float:
    async def run() -> int:
        gc.collect()
        for _ in repeat(None, calls):
            await fn(1)
        return gc.collect()

    gc.collect()
    gc.disable()
    try:
        return loop.run_until_complete(run()) / calls
    finally:
        gc.enable()


# ---------------------------------------------------------------------------- imports


_IMPORT_TIMER = (
    "import time\nt = time.perf_counter_ns()\nimport {module}\nprint(time.perf_counter_ns() - t)\n"
)

_IMPORT_CENSUS = """\
import json, sys
before = set(sys.modules)
import nodekit
new = sorted(set(sys.modules) - before)
top = sorted({m.split(".")[0] for m in new})
print(json.dumps({
    "modules": len(new),
    "third_party": [t for t in top if t not in sys.stdlib_module_names and t != "nodekit"],
    "stdlib": [t for t in top if t in sys.stdlib_module_names],
    "loaded": [m for m in sys.argv[1:] if m in sys.modules],
}))
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=_common.ROOT,
        env=env,
    )


def import_times(runs: int) -> dict[str, list[float]]:
    """Milliseconds for `import <module>` in fresh interpreters, runs interleaved."""
    for module in IMPORTS:  # warm-up: byte-code caches written, files in the page cache
        _python("-c", f"import {module}")
    times: dict[str, list[float]] = {module: [] for module in IMPORTS}
    for _ in range(runs):
        for module in IMPORTS:
            out = _python("-c", _IMPORT_TIMER.format(module=module)).stdout
            times[module].append(int(out.strip().splitlines()[-1]) / 1e6)
    return times


def import_census() -> dict[str, Any]:
    """Which modules `import nodekit` loads, and where its import time goes (one run)."""
    census: dict[str, Any] = json.loads(_python("-c", _IMPORT_CENSUS, *HEAVY).stdout)
    report = _python("-X", "importtime", "-c", "import nodekit").stderr
    entries = []
    for line in report.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        head, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        entries.append((int(head), int(cumulative), name.strip(), depth))
    # The subtree of `import nodekit`: the entries after the previous top-level one.
    end = max(i for i, e in enumerate(entries) if e[2] == "nodekit" and e[3] <= 1)
    top_depth = entries[end][3]
    start = end
    while start > 0 and entries[start - 1][3] > top_depth:
        start -= 1
    by_package: dict[str, int] = {}
    for self_us, _, name, _ in entries[start : end + 1]:
        package = name.split(".")[0]
        by_package[package] = by_package.get(package, 0) + self_us
    rows = sorted(by_package.items(), key=lambda item: -item[1])
    census["self_ms_by_package"] = [(name, us / 1000) for name, us in rows]
    census["importtime_total_ms"] = entries[end][1] / 1000
    return census


# ---------------------------------------------------------------------------- report


def _overhead(stats: Stats, bare: Stats) -> float:
    return stats.best - bare.best


def _ratio(label: str, timed: dict[str, Stats]) -> float:
    return _overhead(timed[label], timed[BARE]) / _overhead(timed[TENACITY], timed[BARE])


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _garbage(value: float) -> str:
    return "0" if value == 0 else f"{value:.2f}"


def render(
    cfg: Config,
    sync_t: dict[str, Stats],
    async_t: dict[str, Stats],
    garbage: dict[str, tuple[float, float]],
    logged: tuple[dict[str, Stats], dict[str, Stats], dict[str, tuple[float, float]]],
    imports: dict[str, list[float]],
    census: dict[str, Any],
    notes: list[str],
) -> str:
    out = [
        "## Node core: success-path cost, garbage, import time",
        "",
        "`python -m benchmarks.bench_node`. The function under test succeeds at once; every "
        "subject decorates its own copy of `add_one(x)` and is checked to return 42 for 41, "
        "sync and async, before anything is timed.",
        "",
        _common.machine_markdown(),
        "",
        "### Success path, ns per call",
        "",
        f"Best and median of {cfg.repeats} repeats (each about "
        f"{cfg.target_ns / 1e6:.0f} ms of back-to-back calls, gc off, repeats interleaved "
        "across rows). *Overhead* = best minus the bare call's best. Async: "
        "`for _ in range(n): await f(1)` inside one running event loop, the bare `async def` "
        "as baseline.",
        "",
    ]
    rows = []
    for label in DECORATIONS:
        s, a = sync_t[label], async_t[label]
        rows.append(
            [
                label,
                ns(s.best),
                ns(s.median),
                "—" if label == BARE else ns(_overhead(s, sync_t[BARE])),
                ns(a.best),
                ns(a.median),
                "—" if label == BARE else ns(_overhead(a, async_t[BARE])),
            ]
        )
    out.append(
        table(
            [
                "subject",
                "sync best",
                "sync median",
                "sync overhead",
                "async best",
                "async median",
                "async overhead",
            ],
            rows,
            "lrrrrrr",
        )
    )
    out += ["", "| subject | decoration |", "| --- | --- |"]
    out += [f"| {label} | {how} |" for label, how in DECORATIONS.items()]

    out += [
        "",
        f"### nodekit overhead ÷ tenacity overhead (target ≤ {RATIO_TARGET:.2f})",
        "",
    ]
    rows = []
    for label in NODEKIT_ROWS:
        rs, ra = _ratio(label, sync_t), _ratio(label, async_t)
        rows.append(
            [
                label,
                f"{rs:.3f} (1/{1 / rs:.0f}), {_verdict(rs <= RATIO_TARGET)}",
                f"{ra:.3f} (1/{1 / ra:.0f}), {_verdict(ra <= RATIO_TARGET)}",
            ]
        )
    out.append(table(["subject", "sync", "async"], rows))

    out += [
        "",
        "### Cyclic garbage per call (target for nodekit: 0)",
        "",
        f"Collector off, {cfg.garbage_calls:,} calls, then the number of unreachable objects "
        "`gc.collect()` finds, divided by the calls (async: all inside one coroutine).",
        "",
    ]
    rows = [[label, _garbage(s), _garbage(a)] for label, (s, a) in garbage.items()]
    out.append(table(["subject", "sync objects/call", "async objects/call"], rows, "lrr"))

    log_sync, log_async, log_garbage = logged
    out += [
        "",
        "### nodekit with structlog imported",
        "",
        "Measured after the tables above, once `import structlog` has run (nodekit depends on "
        "structlog, so an application usually has it loaded), structlog left unconfigured. "
        "nodekit binds nothing per call then, nor once `nk.add_node_context` is in a "
        "configured chain (it reads the running node when a line is logged); only a "
        "configured chain without it gets node, run_id and attempt bound into contextvars for "
        "`merge_contextvars` on every call (about a microsecond, not measured here). "
        "The bare call is re-measured in this phase for the overhead; the ratio divides it by "
        "tenacity's overhead from the first table (target ≤ 0.10).",
        "",
    ]
    rows = []
    for label in NODEKIT_ROWS:
        s, a = log_sync[label], log_async[label]
        gs, ga = log_garbage[label]
        rows.append(
            [
                label,
                ns(s.best),
                ns(_overhead(s, log_sync[BARE])),
                ns(a.best),
                ns(_overhead(a, log_async[BARE])),
                f"{_overhead(s, log_sync[BARE]) / _overhead(sync_t[TENACITY], sync_t[BARE]):.3f}",
                f"{_overhead(a, log_async[BARE]) / _overhead(async_t[TENACITY], async_t[BARE]):.3f}",
                f"{_garbage(gs)} / {_garbage(ga)}",
            ]
        )
    out.append(
        table(
            [
                "subject",
                "sync best",
                "sync overhead",
                "async best",
                "async overhead",
                "÷ tenacity sync",
                "÷ tenacity async",
                "garbage/call sync / async",
            ],
            rows,
            "lrrrrrrr",
        )
    )

    out += [
        "",
        f"### `import` in a fresh interpreter, ms (target for nodekit ≤ {IMPORT_TARGET_MS:.0f})",
        "",
        f"`time.perf_counter_ns()` around the import statement in {cfg.import_runs} fresh "
        "`python -c` processes per module, interleaved, after one warm-up each (byte-code "
        "cached, files in the page cache; interpreter start-up not included).",
        "",
    ]
    rows = []
    for module, values in imports.items():
        best, median = min(values), statistics.median(values)
        verdict = f" ({_verdict(best <= IMPORT_TARGET_MS)})" if module == "nodekit" else ""
        rows.append([f"`import {module}`", f"{best:.1f}{verdict}", f"{median:.1f}"])
    out.append(table(["statement", "best", "median"], rows, "lrr"))

    loaded = census["loaded"]
    heavy = ", ".join(f"{m}: **{'yes' if m in loaded else 'no'}**" for m in HEAVY)
    third = ", ".join(census["third_party"]) or "none"
    top = ", ".join(f"{name} {ms:.1f}" for name, ms in census["self_ms_by_package"][:8])
    out += [
        "",
        f"`import nodekit` loads {census['modules']} new modules. Third-party packages among "
        f"them: {third}. Heavy modules loaded: {heavy}.",
        "",
        f"Where the time goes (one `python -X importtime -c 'import nodekit'`, "
        f"{census['importtime_total_ms']:.1f} ms in all; self time summed per top-level "
        f"package, ms): {top}.",
        "",
        "### Notes",
        "",
    ]
    out += [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def run(quick: bool) -> str:
    cfg = Config.for_run(quick)
    notes = check_environment()
    if STRUCTLOG_AT_START:
        notes.append("structlog was already imported when the main tables were measured.")
    loop = asyncio.new_event_loop()
    try:
        sync_subjects = build(is_async=False)
        async_subjects = build(is_async=True)
        verify(sync_subjects, loop, async_subjects)
        sync_t, async_t = time_all(sync_subjects, loop, async_subjects, cfg)
        garbage = {
            label: (
                garbage_sync(sync_subjects[label], cfg.garbage_calls),
                garbage_async(loop, async_subjects[label], cfg.garbage_calls),
            )
            for label in DECORATIONS
        }
        notes.append(
            "structlog imported by the time the main tables were done: "
            f"{'structlog' in sys.modules} (stamina's success path calls no retry hook; its "
            "hooks, which import structlog or prometheus_client when installed, are set up "
            "on the first retry only)."
        )

        import structlog  # noqa: F401 - the second phase measures nodekit with it loaded

        labels = (BARE, *NODEKIT_ROWS)
        log_sync_subjects = build(is_async=False, labels=labels)
        log_async_subjects = build(is_async=True, labels=labels)
        verify(log_sync_subjects, loop, log_async_subjects)
        log_sync, log_async = time_all(log_sync_subjects, loop, log_async_subjects, cfg)
        log_garbage = {
            label: (
                garbage_sync(log_sync_subjects[label], cfg.garbage_calls),
                garbage_async(loop, log_async_subjects[label], cfg.garbage_calls),
            )
            for label in NODEKIT_ROWS
        }
    finally:
        loop.close()
    imports = import_times(cfg.import_runs)
    census = import_census()
    notes.append(
        "tenacity, stamina and backoff keep their default configuration apart from the "
        "arguments shown; no nodekit event sink is registered and the `nodekit` logger is "
        "not at DEBUG, so nodekit emits no per-call events."
    )
    if quick:
        notes.append("**Quick smoke run: too few repeats for the figures to mean much.**")
    return render(
        cfg,
        sync_t,
        async_t,
        garbage,
        (log_sync, log_async, log_garbage),
        imports,
        census,
        notes,
    )


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
