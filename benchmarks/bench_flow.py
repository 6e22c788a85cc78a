"""The flow runner's cost per node, side by side with LangGraph, in one run.

* a 100-node linear flow (each node ``x -> x + 1``), sync and async: the cost per node of
  ``nk.Flow`` (dict state and TypedDict state) and of LangGraph's ``StateGraph`` of the same
  shape, over the bare chain of the same 100 functions; and nodekit's overhead divided by
  LangGraph's (target: at most 1/10);
* 1,000 independent async nodes, each awaiting ``asyncio.sleep(0.01)``: ``nk.Flow.arun``,
  ``node.amap``, LangGraph fanning out with ``Send``, and a bare ``asyncio.gather``;
* a durable 100-node flow on a SQLite journal beside LangGraph's ``SqliteSaver``
  checkpointer: the cost per node of a fresh run, and what running the same run (thread) again
  costs, once finished and once after its last node failed. Without
  ``langgraph-checkpoint-sqlite`` (the ``bench`` dependency group, which ``make bench``
  installs) the LangGraph rows are skipped with a note.

``python -m benchmarks.bench_flow`` writes its section of BENCHMARKS.md; ``--quick`` is a smoke
run that writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

try:
    from langgraph.checkpoint.sqlite import SqliteSaver
except ImportError:  # the `bench` dependency group installs it
    SqliteSaver = None

import nodekit as nk
from nodekit.idempotency.sqlite import SQLiteStore

from . import _common
from ._common import Batch, Stats, table

SECTION = "flow"
NODES = 100
WIDE = 1_000
NAP = 0.01
RATIO_TARGET = 0.10


class Chain(TypedDict):
    x: int


class Fan(TypedDict):
    out: Annotated[list[int], operator.add]


class Item(TypedDict):
    i: int


@dataclass(frozen=True)
class Config:
    repeats: int
    target_ns: int
    wide_runs: int
    durable_runs: int

    @classmethod
    def for_run(cls, quick: bool) -> Config:
        if quick:
            return cls(repeats=3, target_ns=20_000_000, wide_runs=2, durable_runs=1)
        return cls(repeats=7, target_ns=300_000_000, wide_runs=7, durable_runs=7)


# ---------------------------------------------------------------------------- subjects


def _step_sync(i: int) -> Callable[[int], dict[str, int]]:
    def step(x: int) -> dict[str, int]:
        return {"x": x + 1}

    step.__name__ = step.__qualname__ = f"n{i}"
    return step


def _step_async(i: int) -> Callable[[int], Any]:
    async def step(x: int) -> dict[str, int]:
        return {"x": x + 1}

    step.__name__ = step.__qualname__ = f"n{i}"
    return step


def nk_chain(is_async: bool, state: Any = None, name: str = "chain") -> nk.Flow:
    flow = nk.Flow(name, state=state)
    previous: Any = None
    for i in range(NODES):
        step = _step_async(i) if is_async else _step_sync(i)
        previous = flow.add(step, after=previous if previous is not None else ())
    return flow


def lg_chain(is_async: bool) -> Any:
    graph = StateGraph(Chain)
    for i in range(NODES):
        if is_async:

            async def step(state: Chain) -> dict[str, int]:
                return {"x": state["x"] + 1}

        else:

            def step(state: Chain) -> dict[str, int]:  # type: ignore[misc]
                return {"x": state["x"] + 1}

        graph.add_node(f"n{i}", step)
    graph.add_edge(START, "n0")
    for i in range(NODES - 1):
        graph.add_edge(f"n{i}", f"n{i + 1}")
    graph.add_edge(f"n{NODES - 1}", END)
    return graph.compile()


def bare_chain_sync() -> Callable[[], dict[str, int]]:
    steps = [_step_sync(i) for i in range(NODES)]

    def run() -> dict[str, int]:
        state = {"x": 0}
        for step in steps:
            state = {**state, **step(state["x"])}
        return state

    return run


def bare_chain_async() -> Callable[[], Any]:
    steps = [_step_async(i) for i in range(NODES)]

    async def run() -> dict[str, int]:
        state = {"x": 0}
        for step in steps:
            state = {**state, **(await step(state["x"]))}
        return state

    return run


# ---------------------------------------------------------------------------- linear chains


def sync_batch(call: Callable[[], Any]) -> Batch:
    def batch(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            call()
        return time.perf_counter_ns() - start

    return batch


def async_batch(loop: asyncio.AbstractEventLoop, make: Callable[[], Any]) -> Batch:
    async def many(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            await make()
        return time.perf_counter_ns() - start

    def batch(n: int) -> int:
        return loop.run_until_complete(many(n))

    return batch


def chains(cfg: Config, loop: asyncio.AbstractEventLoop) -> tuple[dict[str, Stats], ...]:
    start = {"x": 0}
    nk_dict = nk_chain(False)
    nk_typed = nk_chain(False, Chain, "typed")
    lg_sync = lg_chain(False)
    sync_rows: dict[str, Callable[[], Any]] = {
        "bare chain": bare_chain_sync(),
        "nodekit Flow.run (dict state)": lambda: nk_dict.run(start),
        "nodekit Flow.run (TypedDict state)": lambda: nk_typed.run(start),
        "LangGraph invoke": lambda: lg_sync.invoke(start),
    }
    nk_async = nk_chain(True)
    lg_async = lg_chain(True)
    bare_async = bare_chain_async()
    async_rows: dict[str, Callable[[], Any]] = {
        "bare chain": bare_async,
        "nodekit Flow.arun (dict state)": lambda: nk_async.arun(start),
        "LangGraph ainvoke": lambda: lg_async.ainvoke(start),
    }
    for label, call in sync_rows.items():
        if call()["x"] != NODES:
            raise AssertionError(f"{label}: wrong result")
    for label, make in async_rows.items():
        if loop.run_until_complete(make())["x"] != NODES:
            raise AssertionError(f"{label}: wrong result")
    sync_t = _common.measure(
        {label: sync_batch(call) for label, call in sync_rows.items()},
        repeats=cfg.repeats,
        target_ns=cfg.target_ns,
    )
    async_t = _common.measure(
        {label: async_batch(loop, make) for label, make in async_rows.items()},
        repeats=cfg.repeats,
        target_ns=cfg.target_ns,
    )
    return sync_t, async_t


# ---------------------------------------------------------------------------- 1,000 wide


def wide(cfg: Config, loop: asyncio.AbstractEventLoop) -> dict[str, list[float]]:
    flow = nk.Flow("wide")
    for i in range(WIDE):

        async def nap(i: int = i) -> dict[str, int]:
            await asyncio.sleep(NAP)
            return {f"n{i}": i}

        flow.add(nap, name=f"n{i}")

    @nk.node(name="nap")
    async def nap_node(i: int) -> int:
        await asyncio.sleep(NAP)
        return i

    async def bare_nap(i: int) -> int:
        await asyncio.sleep(NAP)
        return i

    async def worker(state: Item) -> dict[str, list[int]]:
        await asyncio.sleep(NAP)
        return {"out": [state["i"]]}

    graph = StateGraph(Fan)
    graph.add_node("work", worker)
    graph.add_conditional_edges(START, lambda _: [Send("work", {"i": i}) for i in range(WIDE)])
    graph.add_edge("work", END)
    fan = graph.compile()

    async def gather() -> Any:
        return await asyncio.gather(*(bare_nap(i) for i in range(WIDE)))

    subjects: dict[str, Callable[[], Any]] = {
        "bare asyncio.gather": gather,
        "nodekit Flow.arun, 1,000 nodes": lambda: flow.arun({}),
        "nodekit node.amap, 1,000 items": lambda: nap_node.amap(range(WIDE)),
        "LangGraph ainvoke, 1,000 Send": lambda: fan.ainvoke({"out": []}),
    }
    checks: dict[str, Callable[[Any], bool]] = {
        "bare asyncio.gather": lambda r: len(r) == WIDE,
        "nodekit Flow.arun, 1,000 nodes": lambda r: len(r) == WIDE,
        "nodekit node.amap, 1,000 items": lambda r: r.ok and len(r) == WIDE,
        "LangGraph ainvoke, 1,000 Send": lambda r: sorted(r["out"]) == list(range(WIDE)),
    }
    times: dict[str, list[float]] = {label: [] for label in subjects}
    for label, make in subjects.items():  # warm up and check
        if not checks[label](loop.run_until_complete(make())):
            raise AssertionError(f"{label}: wrong result")
    for _ in range(cfg.wide_runs):
        for label, make in subjects.items():
            start = time.perf_counter()
            loop.run_until_complete(make())
            times[label].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------- durable

NK_FRESH = "nodekit `flow.run`, SQLiteStore (`synchronous=NORMAL`, its default)"
NK_FRESH_FULL = "nodekit `flow.run`, SQLiteStore (`synchronous=FULL`)"
LG_FRESH = 'LangGraph `invoke`, SqliteSaver (`durability="async"`, its default)'
LG_FRESH_SYNC = 'LangGraph `invoke`, SqliteSaver, `durability="sync"`'
LG_FRESH_SYNC_NORMAL = (
    'LangGraph `invoke`, SqliteSaver, `durability="sync"`, `PRAGMA synchronous=NORMAL`'
)
FRESH_NK = (NK_FRESH, NK_FRESH_FULL)
FRESH_LG = (LG_FRESH, LG_FRESH_SYNC, LG_FRESH_SYNC_NORMAL)

NK_AGAIN = "nodekit: the same `run_id`, finished run"
LG_AGAIN_NONE = "LangGraph: `invoke(None, config)`, finished thread"
LG_AGAIN_INPUT = "LangGraph: `invoke(state, config)`, finished thread"
NK_AFTER_FAILURE = "nodekit: the same `run_id` after the last node failed"
LG_AFTER_FAILURE = "LangGraph: `invoke(None, config)` after the last node failed"
AGAIN_NK = (NK_AGAIN, NK_AFTER_FAILURE)
AGAIN_LG = (LG_AGAIN_NONE, LG_AGAIN_INPUT, LG_AFTER_FAILURE)
WHAT_RUNS = {
    NK_AGAIN: f"replays the {NODES} journaled nodes in order, runs none",
    LG_AGAIN_NONE: "loads the thread's latest checkpoint and returns its state, runs no node",
    LG_AGAIN_INPUT: f"a new run from the saved state: all {NODES} nodes run again, each "
    "checkpointed",
    NK_AFTER_FAILURE: f"replays {NODES - 1} journaled nodes, runs the last",
    LG_AFTER_FAILURE: "loads the latest checkpoint, runs the last node",
}


class Crash(Exception):
    """Raised by the durable chains' last node when a round asks it to fail."""


@dataclass
class Probe:
    """Shared with the durable chains' first and last nodes: a call count and a failure."""

    first_calls: int = 0
    fail_last: bool = False


@dataclass
class Durable:
    """Seconds per call over the counted rounds; facts about one LangGraph thread."""

    fresh: dict[str, list[float]]
    again: dict[str, list[float]]
    facts: dict[str, int]


def _durable_steps(probe: Probe) -> list[Callable[[int], dict[str, int]]]:
    """The chain's 100 steps; the first counts its calls, the last fails on demand."""
    steps = [_step_sync(i) for i in range(NODES)]

    def first(x: int) -> dict[str, int]:
        probe.first_calls += 1
        return {"x": x + 1}

    def last(x: int) -> dict[str, int]:
        if probe.fail_last:
            raise Crash(f"n{NODES - 1} failed")
        return {"x": x + 1}

    for i, step in ((0, first), (NODES - 1, last)):
        step.__name__ = step.__qualname__ = f"n{i}"
        steps[i] = step
    return steps


def nk_durable(probe: Probe) -> nk.Flow:
    flow = nk.Flow("durable")
    previous: Any = ()
    for step in _durable_steps(probe):
        previous = flow.add(step, after=previous)
    return flow


def _lg_node(step: Callable[[int], dict[str, int]]) -> Callable[[Chain], dict[str, int]]:
    def node(state: Chain) -> dict[str, int]:
        return step(state["x"])

    return node


def lg_durable(probe: Probe) -> Any:
    """The uncompiled graph: each round compiles it with its own checkpointer."""
    graph = StateGraph(Chain)
    for i, step in enumerate(_durable_steps(probe)):
        graph.add_node(f"n{i}", _lg_node(step))
    graph.add_edge(START, "n0")
    for i in range(NODES - 1):
        graph.add_edge(f"n{i}", f"n{i + 1}")
    graph.add_edge(f"n{NODES - 1}", END)
    return graph


def _clock(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _expect(label: str, result: Any, probe: Probe, first_calls: int) -> None:
    """The run returned the chain's result and ran its first node `first_calls` times."""
    if result != {"x": NODES} or probe.first_calls != first_calls:
        raise AssertionError(f"durable, {label}: wrong result or wrong nodes run")


def _fail_once(label: str, probe: Probe, call: Callable[[], Any], error: type) -> None:
    probe.fail_last = True
    try:
        call()
    except error:
        pass
    else:
        raise AssertionError(f"durable, {label}: the last node did not fail")
    finally:
        probe.fail_last = False


def _durable_round(
    folder: Path, shift: int, probe: Probe, flow: nk.Flow, builder: Any
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """One round, every subject on a fresh SQLite file of its own in `folder`."""
    start = {"x": 0}
    fresh: dict[str, float] = {}
    again: dict[str, float] = {}
    facts: dict[str, int] = {}
    with ExitStack() as stack:

        def store(name: str, synchronous: str) -> SQLiteStore:
            opened = SQLiteStore(folder / f"{name}.db", synchronous=synchronous)
            stack.callback(opened.close)
            return opened

        def compiled(name: str, synchronous: str | None = None) -> tuple[Any, Any]:
            conn = sqlite3.connect(folder / f"{name}.db", check_same_thread=False)
            stack.callback(conn.close)
            saver = SqliteSaver(conn)
            saver.setup()  # tables and WAL before the clock starts, as SQLiteStore does
            if synchronous is not None:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            return builder.compile(checkpointer=saver), saver

        nk_normal = store("nodekit", "NORMAL")
        nk_full = store("nodekit-full", "FULL")
        subjects: dict[str, Callable[[], Any]] = {
            NK_FRESH: lambda: flow.run(start, run_id="fresh", store=nk_normal),
            NK_FRESH_FULL: lambda: flow.run(start, run_id="fresh", store=nk_full),
        }
        thread: Any = {"configurable": {"thread_id": "fresh"}}
        if builder is not None:
            lg, saver = compiled("langgraph")
            lg_sync, _ = compiled("langgraph-sync")
            lg_sync_normal, _ = compiled("langgraph-sync-normal", "NORMAL")
            subjects |= {
                LG_FRESH: lambda: lg.invoke(start, thread),
                LG_FRESH_SYNC: lambda: lg_sync.invoke(start, thread, durability="sync"),
                LG_FRESH_SYNC_NORMAL: lambda: lg_sync_normal.invoke(
                    start, thread, durability="sync"
                ),
            }
        labels = list(subjects)
        shift %= len(labels)
        for label in labels[shift:] + labels[:shift]:  # a different order every round
            calls = probe.first_calls
            fresh[label], result = _clock(subjects[label])
            _expect(label, result, probe, calls + 1)

        calls = probe.first_calls
        again[NK_AGAIN], result = _clock(lambda: flow.run(start, run_id="fresh", store=nk_normal))
        _expect(NK_AGAIN, result, probe, calls)
        _fail_once(
            NK_AFTER_FAILURE,
            probe,
            lambda: flow.run(start, run_id="failed", store=nk_normal),
            nk.FlowError,
        )
        calls = probe.first_calls
        again[NK_AFTER_FAILURE], result = _clock(
            lambda: flow.run(start, run_id="failed", store=nk_normal)
        )
        _expect(NK_AFTER_FAILURE, result, probe, calls)
        if builder is None:
            return fresh, again, facts

        facts["checkpoints"] = len(list(saver.list(thread)))
        (facts["writes"],) = saver.conn.execute(
            "SELECT count(*) FROM writes WHERE thread_id = 'fresh'"
        ).fetchone()
        calls = probe.first_calls
        again[LG_AGAIN_NONE], result = _clock(lambda: lg.invoke(None, thread))
        _expect(LG_AGAIN_NONE, result, probe, calls)
        if len(list(saver.list(thread))) != facts["checkpoints"]:
            raise AssertionError(f"durable, {LG_AGAIN_NONE}: it wrote a checkpoint")
        again[LG_AGAIN_INPUT], result = _clock(lambda: lg.invoke(start, thread))
        _expect(LG_AGAIN_INPUT, result, probe, calls + 1)
        facts["checkpoints after the re-invoke"] = len(list(saver.list(thread)))

        failed: Any = {"configurable": {"thread_id": "failed"}}
        _fail_once(LG_AFTER_FAILURE, probe, lambda: lg.invoke(start, failed), Crash)
        snapshot = lg.get_state(failed)
        if snapshot.next != (f"n{NODES - 1}",) or snapshot.values != {"x": NODES - 1}:
            raise AssertionError(f"durable, {LG_AFTER_FAILURE}: not stopped before the last node")
        calls = probe.first_calls
        again[LG_AFTER_FAILURE], result = _clock(lambda: lg.invoke(None, failed))
        _expect(LG_AFTER_FAILURE, result, probe, calls)
    return fresh, again, facts


def durable(cfg: Config) -> Durable:
    probe = Probe()
    flow = nk_durable(probe)
    builder = lg_durable(probe) if SqliteSaver is not None else None
    with_lg = builder is not None
    out = Durable(
        fresh={label: [] for label in FRESH_NK + (FRESH_LG if with_lg else ())},
        again={label: [] for label in AGAIN_NK + (AGAIN_LG if with_lg else ())},
        facts={},
    )
    with tempfile.TemporaryDirectory() as top:
        for n in range(cfg.durable_runs + 1):
            folder = Path(top) / f"round-{n}"
            folder.mkdir()
            fresh, again, facts = _durable_round(folder, n, probe, flow, builder)
            if n == 0:  # the first round warms imports, adapters and SQLite
                continue
            for label, seconds in fresh.items():
                out.fresh[label].append(seconds)
            for label, seconds in again.items():
                out.again[label].append(seconds)
            out.facts = facts
    return out


# ---------------------------------------------------------------------------- rendering


def _per_node(stats: Stats) -> float:
    return stats.best / NODES


def render(
    cfg: Config,
    sync_t: dict[str, Stats],
    async_t: dict[str, Stats],
    wide_t: dict[str, list[float]],
    durable_t: Durable,
    notes: list[str],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    start, end = loads
    out = [
        "## Flow runner: cost per node, wide fan-out, durable journal",
        "",
        "`python -m benchmarks.bench_flow`. Every subject is checked to compute the right "
        "result before anything is timed.",
        "",
        _common.machine_markdown(),
        f"- **Load average:** {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start, "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at the end (1 / 5 / 15 min)",
        "",
        f"### {NODES}-node linear flow, µs per node",
        "",
        f"Each node computes `x + 1` and the next one depends on it. Best and median of "
        f"{cfg.repeats} repeats of whole runs, divided by {NODES}. *Overhead* = best minus the "
        "bare chain's best (the same functions called in a loop, merging each update into a "
        "new dict). Async: the nodes are `async def`, awaited in one running loop.",
        "",
    ]
    rows = []
    for mode, timings in (("sync", sync_t), ("async", async_t)):
        bare = _per_node(timings["bare chain"])
        for label, stats in timings.items():
            per = _per_node(stats)
            rows.append(
                [
                    mode,
                    label,
                    f"{per / 1000:,.2f}",
                    f"{stats.median / NODES / 1000:,.2f}",
                    "—" if label == "bare chain" else f"{(per - bare) / 1000:,.2f}",
                ]
            )
    out.append(table(["mode", "subject", "best", "median", "overhead"], rows, align="llrrr"))
    out += ["", "### nodekit overhead ÷ LangGraph overhead (target ≤ 0.10)", ""]
    ratio_rows = []
    for mode, timings, theirs in (
        ("sync", sync_t, "LangGraph invoke"),
        ("async", async_t, "LangGraph ainvoke"),
    ):
        bare = _per_node(timings["bare chain"])
        lg = _per_node(timings[theirs]) - bare
        for label, stats in timings.items():
            if not label.startswith("nodekit"):
                continue
            ratio = (_per_node(stats) - bare) / lg
            verdict = "met" if ratio <= RATIO_TARGET else "**missed**"
            ratio_rows.append([mode, label, f"{ratio:.3f} (1/{1 / ratio:.0f}), {verdict}"])
    out.append(table(["mode", "subject", "ratio"], ratio_rows))
    out += [
        "",
        f"### {WIDE:,} independent async nodes, each awaiting `asyncio.sleep({NAP})`",
        "",
        f"Wall time of one whole run, best and median of {cfg.wide_runs}; *overhead* = best "
        f"minus the {NAP * 1000:.0f} ms every node sleeps (they all sleep at once).",
        "",
    ]
    wide_rows = []
    for label, values in wide_t.items():
        best = min(values)
        wide_rows.append(
            [
                label,
                f"{best * 1000:,.1f}",
                f"{statistics.median(values) * 1000:,.1f}",
                f"{(best - NAP) * 1000:,.1f}",
                f"{(best - NAP) / WIDE * 1e6:,.1f}",
            ]
        )
    out.append(
        table(
            ["subject", "best ms", "median ms", "overhead ms", "overhead µs per node"],
            wide_rows,
            align="lrrrr",
        )
    )
    out += render_durable(cfg, sync_t, durable_t)
    out += ["", "### Notes", ""]
    out += [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def render_durable(cfg: Config, sync_t: dict[str, Stats], durable_t: Durable) -> list[str]:
    with_lg = LG_FRESH in durable_t.fresh
    out = [
        "",
        f"### Durable {NODES}-node flow: nodekit's SQLite journal beside LangGraph's SQLite "
        "checkpointer",
        "",
        "nodekit: `flow.run(state, run_id=..., store=SQLiteStore(path))` (WAL): each node's "
        "entry is acquired with a lease and completed with its update as canonical JSON before "
        "the next node starts. LangGraph: the same chain as a `StateGraph` compiled with "
        "`checkpointer=SqliteSaver(sqlite3.connect(path, check_same_thread=False))` (WAL, set "
        'by the saver), run as `invoke(state, {"configurable": {"thread_id": ...}})`: a '
        "checkpoint of the state after every step, and each node's writes. Every subject has "
        "a fresh SQLite file in a temporary directory, every round. Best and median of "
        f"{cfg.durable_runs} rounds (a first, warm-up round is not counted).",
        "",
        "#### Fresh run, µs per node",
        "",
        "*Journaling* = best minus the best of the same runner without a store or checkpointer "
        "(the sync rows of the first table: nodekit `Flow.run (dict state)`, LangGraph "
        "`invoke`).",
        "",
    ]
    baseline = {
        "nodekit": _per_node(sync_t["nodekit Flow.run (dict state)"]),
        "LangGraph": _per_node(sync_t["LangGraph invoke"]),
    }
    rows = []
    for label, values in durable_t.fresh.items():
        best = min(values) / NODES * 1e6
        bare = baseline[label.split(" ", 1)[0]] / 1000
        rows.append(
            [
                label,
                f"{best:,.0f}",
                f"{statistics.median(values) / NODES * 1e6:,.0f}",
                f"{best - bare:,.0f}",
            ]
        )
    out.append(table(["subject", "best", "median", "journaling"], rows, align="lrrr"))
    out += [
        "",
        "#### The same run again, ms per call",
        "",
        "Timed after the fresh run of the first nodekit and first LangGraph rows above, on "
        "their file, run id and thread (default settings). *After the last node failed*: "
        f"a new run id or thread whose node n{NODES - 1} raised (untimed); the call is checked "
        "to return the chain's result without running node n0 again.",
        "",
    ]
    rows = []
    for label, values in durable_t.again.items():
        best = min(values)
        rows.append(
            [
                label,
                WHAT_RUNS[label],
                f"{best * 1000:,.2f}",
                f"{statistics.median(values) * 1000:,.2f}",
                f"{best / NODES * 1e6:,.0f}",
            ]
        )
    out.append(
        table(
            ["call", "what it does", "best ms", "median ms", f"best ÷ {NODES} nodes, µs"],
            rows,
            align="llrrr",
        )
    )
    if not with_lg:
        out += [
            "",
            "**LangGraph rows skipped:** `langgraph-checkpoint-sqlite` is not installed "
            "(`make bench` installs it with the `bench` dependency group).",
        ]
    return out


def durable_notes(durable_t: Durable) -> list[str]:
    notes = [
        "The durable figures include SQLite's own cost. nodekit: two transactions per fresh "
        "node (acquire, complete) and one per replayed node, each `BEGIN IMMEDIATE` on a WAL "
        "database. `synchronous=NORMAL` (SQLiteStore's default) syncs the WAL to disk at WAL "
        "checkpoints; `FULL` (SQLite's default, so SqliteSaver's as constructed here) syncs it "
        "at every commit. The `synchronous` rows swap that one setting on each side.",
    ]
    if LG_FRESH not in durable_t.fresh:
        return notes
    facts = durable_t.facts
    checkpoints = facts.get("checkpoints", 0)
    more = facts.get("checkpoints after the re-invoke", 0) - checkpoints
    notes += [
        f"LangGraph's SqliteSaver, for one fresh {NODES}-node run: {checkpoints} checkpoints "
        "(the input, the step from START, then one per node) and "
        f"{facts.get('writes', 0)} rows of writes (each step's `x` and the edge to the next), "
        "each `put` and `put_writes` committed on its own. `durability` is LangGraph's "
        'setting: `"async"` (its default) writes each checkpoint in the background while the '
        'next step runs; `"sync"` writes it before the next step starts, which is what '
        "nodekit guarantees for every node.",
        "Running again is not the same operation on both sides. LangGraph keeps a thread's "
        "checkpoints, not a per-node journal: resuming (`invoke(None, config)`) loads the "
        "latest checkpoint and runs only the nodes still pending, so on a finished thread it "
        "runs nothing and returns the saved state; invoking a finished thread with an input "
        f"starts a new run from the saved state (the input overwrites `x`) and runs all {NODES} "
        f"nodes again, adding {more} checkpoints. nodekit resumes by replaying the journal "
        "entry of every completed node in order and runs only the nodes without one; the same "
        "`run_id` never runs a completed node twice.",
        "Not measured: LangGraph's `AsyncSqliteSaver` (nodekit's durable flow is timed in sync "
        "mode only here).",
    ]
    return notes


def run(quick: bool) -> str:
    """Run every measurement and return the markdown section."""
    cfg = Config.for_run(quick)
    if logging.getLogger("nodekit").isEnabledFor(logging.DEBUG):
        raise SystemExit("nodekit's logger is at DEBUG: per-call events would be timed")
    load_start = os.getloadavg()
    loop = asyncio.new_event_loop()
    try:
        sync_t, async_t = chains(cfg, loop)
        wide_t = wide(cfg, loop)
    finally:
        loop.close()
    durable_t = durable(cfg)
    notes = [
        "nodekit wraps each plain function with `nk.node` defaults (effect WRITE, no retry); no "
        "event sink is registered, so no per-node events are built. The dict-state flow does "
        "no validation; the TypedDict flow validates every update field with pydantic, as the "
        "pydantic-model flows do. In the linear and wide cases LangGraph runs with its "
        "defaults (no checkpointer).",
        "nodekit's async mode awaits a lone ready node in place (a chain needs no task per "
        "node); independent nodes run as tasks. LangGraph runs each superstep's tasks through "
        "its executor.",
        *durable_notes(durable_t),
    ]
    if quick:
        notes.append("**Quick smoke run: too few repeats for the figures to mean much.**")
    return render(cfg, sync_t, async_t, wide_t, durable_t, notes, (load_start, os.getloadavg()))


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
