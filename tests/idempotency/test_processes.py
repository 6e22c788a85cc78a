"""Real processes on real stores: exactly one holder per key, crashes, stalls and fencing.

Effects are counted in a ledger file outside the processes (one O_APPEND line per effect),
never in a Python counter. Processes come from a "forkserver": none inherits the test process's threads or state.
"""

import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodekit.idempotency import COMPLETED, derive_key

from . import _workers
from ._workers import DURABLE, StoreSpec, effects, make_store, read_lines

pytestmark = pytest.mark.slow

# "forkserver": every worker is a fresh fork of one clean server process (no threads, no test
# state inherited), with nodekit and the workers imported once there instead of per process.
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["nodekit", "nodekit.idempotency.sqlite", _workers.__name__])
LEASE = 0.5


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
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.join(5)


def join_all(procs: list[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for process in procs:
        process.join(max(0.1, deadline - time.monotonic()))
        assert process.exitcode == 0, f"worker {process.pid} exited with {process.exitcode}"


def results(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def stored(spec: StoreSpec, order: str) -> Any:
    store = make_store(spec)
    try:
        return store.get(_workers.record_key(order))
    finally:
        store.close()


# ---------------------------------------------------------------------------- exactly once


@pytest.mark.parametrize("on_conflict", ["raise", "wait"])
def test_eight_processes_on_one_key_run_it_once(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any], on_conflict: str
) -> None:
    barrier = PROCESSES.Barrier(8)
    procs = [
        processes(_workers.race, spec, files["ledger"], files["results"], barrier, on_conflict)
        for _ in range(8)
    ]
    join_all(procs)

    ran = effects(files["ledger"])
    assert len(ran) == 1, ran
    winner = f"charged:order-race:{ran[0]['pid']}"
    outcomes = results(files["results"])
    assert len(outcomes) == 8
    got = Counter(o.get("result") or o["error"] for o in outcomes)
    if on_conflict == "wait":
        assert got == {winner: 8}
    else:  # the others were refused while it ran, or (late starters) got the replay
        assert got[winner] >= 1
        assert set(got) <= {winner, "IdempotencyInProgress"}
    record = stored(spec, "order-race")
    assert record.state == COMPLETED
    assert json.loads(record.result) == winner


@pytest.fixture(params=[p for p in DURABLE if getattr(p, "values", (p,))[0] != "postgres"])
def spec_for_many(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """SQLite and Redis (PostgreSQL is in the other races; 1,000 keys there is slower)."""
    return _workers.store_spec(request, request.param, tmp_path)


def test_a_thousand_keys_four_callers_run_each_key_once(
    spec_for_many: StoreSpec, files: dict[str, str], processes: Callable[..., Any]
) -> None:
    spec = spec_for_many
    n = 1000
    barrier = PROCESSES.Barrier(4)
    procs = [
        processes(_workers.many_keys, spec, files["ledger"], files["results"], barrier, n, seed)
        for seed in range(4)
    ]
    join_all(procs, timeout=60)

    ran = Counter(line["order"] for line in effects(files["ledger"]))
    assert len(ran) == n
    assert set(ran.values()) == {1}
    tallies = results(files["results"])
    assert len(tallies) == 4
    assert sum(t["ran"] for t in tallies) == n
    assert sum(t["other"] for t in tallies) == 0
    assert sum(t["ran"] + t["replayed"] + t["in_progress"] for t in tallies) == 4 * n


# ---------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("when", ["after_acquire", "after_effect"])
def test_a_holder_killed_mid_call_is_taken_over_with_the_same_downstream_key(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any], when: str
) -> None:
    """SIGKILL the holder; after its lease expires another process runs the call (at least once)."""
    victim = processes(_workers.victim, spec, files["ledger"], files["signal"], LEASE, when)
    held = _workers.wait_for_line(files["signal"])
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    assert victim.exitcode == -signal.SIGKILL

    taker = processes(_workers.taker, spec, files["ledger"], files["results"], LEASE)
    join_all([taker])

    [report] = results(files["results"])
    assert report["result"] == f"charged:order-crash:{taker.pid}"
    assert "idempotency.takeover" in report["events"]
    ran = effects(files["ledger"])
    assert [line["pid"] for line in ran] == (
        [taker.pid] if when == "after_acquire" else [victim.pid, taker.pid]
    )
    downstream = derive_key(_workers.record_key("order-crash").digest, "charge")
    assert {line["downstream"] for line in ran} == {held["downstream"]} == {downstream}
    assert ran[-1]["epoch"] == held["epoch"] + 1
    record = stored(spec, "order-crash")
    assert record.state == COMPLETED
    assert record.epoch == held["epoch"] + 1


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_a_stopped_holder_cannot_complete_or_release_after_a_takeover(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any], ending: str
) -> None:
    """SIGSTOP the holder past its lease; another process takes over and completes; SIGCONT.

    The late holder's completion (or release) is refused: the record keeps the second
    process's result, and the first reports `lease_lost`.
    """
    holder = processes(
        _workers.stalled_holder,
        spec,
        files["ledger"],
        files["signal"],
        files["results"],
        LEASE,
        ending,
    )
    _workers.wait_for_line(files["signal"])
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        taker = processes(_workers.taker, spec, files["ledger"], files["results"], LEASE)
        join_all([taker])
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    join_all([holder])

    reports = {r["pid"]: r for r in results(files["results"])}
    second = f"charged:order-crash:{taker.pid}"
    assert reports[taker.pid]["result"] == second
    assert "idempotency.takeover" in reports[taker.pid]["events"]
    late = reports[holder.pid]
    assert late["events"].count("idempotency.lease_lost") == 1
    if ending == "return":
        assert late["result"] == second  # the recorded outcome, not its own
    else:
        assert late["error"] == "ValueError"
    assert "idempotency.completed" not in late["events"]
    assert "idempotency.released" not in late["events"]
    assert [line["pid"] for line in effects(files["ledger"])] == [holder.pid, taker.pid]
    record = stored(spec, "order-crash")
    assert record.state == COMPLETED
    assert json.loads(record.result) == second
    assert record.epoch == 2
