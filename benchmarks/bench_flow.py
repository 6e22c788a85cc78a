"""The flow runner's cost per node, side by side with LangGraph, in one run.

* a 100-node linear flow (each node ``x -> x + 1``), sync and async: the cost per node of
  ``nk.Flow`` (dict state and TypedDict state) and of LangGraph's ``StateGraph`` of the same
  shape, over the bare chain of the same 100 functions; and nodekit's overhead divided by
  LangGraph's (target: at most 1/10);
* 1,000 independent async nodes, each awaiting ``asyncio.sleep(0.01)``: ``nk.Flow.arun``,
  ``node.amap``, LangGraph fanning out with ``Send``, and a bare ``asyncio.gather``;
* a durable 100-node flow on a SQLite journal: the cost per node of a fresh run and of a
  resume that replays every node.

``python -m benchmarks.bench_flow`` writes its section of BENCHMARKS.md; ``--quick`` is a smoke
run that writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

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
        return cls(repeats=7, target_ns=300_000_000, wide_runs=7, durable_runs=5)


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


def durable(cfg: Config) -> dict[str, list[float]]:
    runs = count()
    times: dict[str, list[float]] = {"fresh run": [], "resume (every node replayed)": []}
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteStore(Path(folder) / "journal.db")
        try:
            flow = nk_chain(False, name="durable")
            for _ in range(cfg.durable_runs + 1):
                run_id = f"bench-{next(runs)}"
                start = time.perf_counter()
                first = flow.run({"x": 0}, run_id=run_id, store=store)
                fresh = time.perf_counter() - start
                start = time.perf_counter()
                again = flow.run({"x": 0}, run_id=run_id, store=store)
                resume = time.perf_counter() - start
                if first != again or first["x"] != NODES:
                    raise AssertionError("durable: the resume did not replay the run")
                if run_id != "bench-0":  # the first run warms imports and adapters
                    times["fresh run"].append(fresh)
                    times["resume (every node replayed)"].append(resume)
        finally:
            store.close()
    return times


# ---------------------------------------------------------------------------- rendering


def _per_node(stats: Stats) -> float:
    return stats.best / NODES


def render(
    cfg: Config,
    sync_t: dict[str, Stats],
    async_t: dict[str, Stats],
    wide_t: dict[str, list[float]],
    durable_t: dict[str, list[float]],
    notes: list[str],
) -> str:
    out = [
        "## Flow runner: cost per node, wide fan-out, durable journal",
        "",
        "`python -m benchmarks.bench_flow`. Every subject is checked to compute the right "
        "result before anything is timed.",
        "",
        _common.machine_markdown(),
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
    out += [
        "",
        f"### Durable {NODES}-node flow on a SQLite journal",
        "",
        f"`flow.run(state, run_id=..., store=SQLiteStore(path))` (WAL, `synchronous=NORMAL`): "
        "each node's entry is acquired with a lease and completed with its update as canonical "
        f"JSON before the next node starts. Best and median of {cfg.durable_runs} runs, µs per "
        "node; the resume runs the same `run_id` again, so every node is replayed from the "
        "journal.",
        "",
    ]
    durable_rows = []
    for label, values in durable_t.items():
        durable_rows.append(
            [
                label,
                f"{min(values) / NODES * 1e6:,.0f}",
                f"{statistics.median(values) / NODES * 1e6:,.0f}",
            ]
        )
    out.append(table(["run", "best µs/node", "median µs/node"], durable_rows, align="lrr"))
    out += ["", "### Notes", ""]
    out += [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def run(quick: bool) -> str:
    """Run every measurement and return the markdown section."""
    cfg = Config.for_run(quick)
    if logging.getLogger("nodekit").isEnabledFor(logging.DEBUG):
        raise SystemExit("nodekit's logger is at DEBUG: per-call events would be timed")
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
        "pydantic-model flows do. LangGraph runs with its defaults (no checkpointer).",
        "nodekit's async mode awaits a lone ready node in place (a chain needs no task per "
        "node); independent nodes run as tasks. LangGraph runs each superstep's tasks through "
        "its executor.",
        "The durable figures include SQLite's own cost: two transactions per fresh node "
        "(acquire, complete) and one per replayed node, each `BEGIN IMMEDIATE` on a WAL "
        "database.",
    ]
    if quick:
        notes.append("**Quick smoke run: too few repeats for the figures to mean much.**")
    return render(cfg, sync_t, async_t, wide_t, durable_t, notes)


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
