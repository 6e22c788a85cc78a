"""Durable flows: the journal, resume, divergence, leases, TTLs, and SIGKILL at random points."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.idempotency import RecordKey
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import capture_events

from . import _crash_worker

WORKER = Path(_crash_worker.__file__)
NODES = ("extract", "left", "right", "join", "load")


def journal_key(flow: str, node: str, run_id: str) -> RecordKey:
    """The documented journal key of a node's entry."""
    return RecordKey(f"flow:{flow}:{node}", "", digest(canonical_json([run_id, node, 0])))


class Counter:
    """Counts calls per node: the tests' stand-in for effects (in-process tests only)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> None:
        self.calls.append(name)


def pipeline(counter: Counter, fail_at: set[str]) -> nk.Flow:
    flow = nk.Flow("pipeline")

    @flow.node
    def fetch(x: int) -> dict[str, Any]:
        counter("fetch")
        return {"rows": [x, x + 1], "key": nk.context().idempotency_key_for("fetch")}

    @flow.node(after=fetch)
    async def enrich(rows: list[int]) -> dict[str, Any]:
        counter("enrich")
        return {"total": sum(rows)}

    @flow.node(after=enrich, output="report")
    def report(total: int) -> str:
        counter("report")
        if "report" in fail_at:
            raise RuntimeError("printer on fire")
        return f"total={total}"

    return flow


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = SQLiteStore(tmp_path / "journal.db")
    yield store
    store.close()


# ---------------------------------------------------------------------------- resume


def test_a_resumed_run_replays_journaled_nodes_and_runs_the_rest(store: Any) -> None:
    counter = Counter()
    fail_at = {"report"}
    flow = pipeline(counter, fail_at)
    with pytest.raises(nk.FlowError) as info:
        flow.run({"x": 1}, run_id="r1", store=store)
    assert info.value.completed == ("fetch", "enrich")
    assert counter.calls == ["fetch", "enrich", "report"]
    fail_at.clear()
    with capture_events() as events:
        out = flow.run({"x": 1}, run_id="r1", store=store)
    assert counter.calls == ["fetch", "enrich", "report", "report"]
    assert out["report"] == "total=3"
    assert out["rows"] == [1, 2]
    assert [(e.name, e.node) for e in events.named("flow.node_skipped")] == [
        ("flow.node_skipped", "fetch"),
        ("flow.node_skipped", "enrich"),
    ]
    assert [e.node for e in events.named("node.replayed")] == ["fetch", "enrich"]
    # a completed run replays everything and runs nothing
    assert flow.run({"x": 1}, run_id="r1", store=store) == out
    assert len(counter.calls) == 4


async def test_an_async_resumed_run_replays_journaled_nodes(store: Any) -> None:
    counter = Counter()
    fail_at = {"report"}
    flow = pipeline(counter, fail_at)
    with pytest.raises(nk.FlowError):
        await flow.arun({"x": 1}, run_id="ar1", store=store)
    fail_at.clear()
    out = await flow.arun({"x": 1}, run_id="ar1", store=store)
    assert counter.calls == ["fetch", "enrich", "report", "report"]
    assert out["report"] == "total=3"
    # sync and async modes share the journal
    assert flow.run({"x": 1}, run_id="ar1", store=store) == out
    assert len(counter.calls) == 4


def test_the_journal_entry_is_the_nodes_update_as_canonical_json(store: Any) -> None:
    flow = pipeline(Counter(), set())
    flow.run({"x": 1}, run_id="j1", store=store)
    record = store.get(journal_key("pipeline", "enrich", "j1"))
    assert record.state == "COMPLETED"
    assert json.loads(record.result) == {"any": ["total"], "update": {"total": 3}}
    assert record.result == canonical_json(json.loads(record.result))


def test_a_store_url_is_opened_and_closed_by_the_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'by-url.db'}"
    counter = Counter()
    flow = pipeline(counter, set())
    first = flow.run({"x": 2}, run_id="u1", store=url)
    assert flow.run({"x": 2}, run_id="u1", store=url) == first
    assert counter.calls == ["fetch", "enrich", "report"]


def test_downstream_keys_are_stable_across_resumes(store: Any) -> None:
    counter = Counter()
    fail_at = {"report"}
    flow = pipeline(counter, fail_at)
    with pytest.raises(nk.FlowError) as info:
        flow.run({"x": 1}, run_id="k1", store=store)
    key = info.value.state["key"]
    fail_at.clear()
    store.delete(journal_key("pipeline", "fetch", "k1"))  # force fetch to run again
    assert flow.run({"x": 1}, run_id="k1", store=store)["key"] == key
    assert counter.calls.count("fetch") == 2
    other = flow.run({"x": 1}, run_id="k2", store=store)["key"]
    assert other != key


def test_typed_state_is_journaled_through_its_field_types(store: Any) -> None:
    from datetime import UTC, datetime

    class Job(BaseModel):
        at: datetime | None = None
        tags: list[str] = []

    counter = Counter()
    flow = nk.Flow("typed", state=Job)

    @flow.node
    def stamp() -> dict[str, Any]:
        counter("stamp")
        return {"at": datetime(2024, 1, 2, tzinfo=UTC), "tags": ("a", "b")}

    first = flow.run(Job(), run_id="t1", store=store)
    again = flow.run(Job(), run_id="t1", store=store)
    assert again == first
    assert isinstance(again.at, datetime)
    assert counter.calls == ["stamp"]


def test_an_update_that_cannot_be_journaled_fails_the_node(store: Any) -> None:
    flow = nk.Flow("unjournalable")
    flow.add(lambda: {"when": {1, 2}}, name="setty")
    with pytest.raises(nk.FlowError, match="cannot be journaled") as info:
        flow.run({}, run_id="x1", store=store)
    assert info.value.field == "when"
    assert store.get(journal_key("unjournalable", "setty", "x1")) is None  # released


# ---------------------------------------------------------------------------- divergence


def test_resuming_with_another_input_state_is_a_flow_error(store: Any) -> None:
    flow = pipeline(Counter(), set())
    flow.run({"x": 1}, run_id="d1", store=store)
    with pytest.raises(nk.FlowError, match="different input state") as info:
        flow.run({"x": 2}, run_id="d1", store=store)
    assert info.value.failed is None
    assert info.value.completed == ()


def test_resuming_with_another_set_of_nodes_is_a_flow_error(store: Any) -> None:
    pipeline(Counter(), set()).run({"x": 1}, run_id="d2", store=store)
    changed = pipeline(Counter(), set())
    changed.add(lambda: None, name="extra")
    with pytest.raises(nk.FlowError, match="other nodes"):
        changed.run({"x": 1}, run_id="d2", store=store)


async def test_a_journaled_update_that_no_longer_validates_is_a_flow_error(store: Any) -> None:
    class V1(BaseModel):
        size: str | None = None

    class V2(BaseModel):
        size: int | None = None

    one = nk.Flow("evolving", state=V1)
    one.add(lambda: {"size": "large"}, name="measure")
    one.run(V1(), run_id="v1", store=store)
    two = nk.Flow("evolving", state=V2)
    two.add(lambda: {"size": 3}, name="measure")
    assert two.run(V2(), run_id="v2", store=store) == V2(size=3)  # a new run is fine
    with pytest.raises(nk.FlowError, match="journaled update") as info:
        await two.arun(V2(), run_id="v1", store=store)
    assert info.value.failed == "measure"
    assert info.value.field == "size"


def test_a_new_node_version_runs_again_on_resume(store: Any) -> None:
    counter = Counter()

    def build(version: int) -> nk.Flow:
        flow = nk.Flow("versioned")

        @flow.node(version=version)
        def step() -> dict[str, int]:
            counter("step")
            return {"v": version}

        return flow

    build(1).run({}, run_id="n1", store=store)
    with pytest.raises(nk.FlowError, match="other nodes"):
        build(2).run({}, run_id="n1", store=store)  # the flow's shape is journaled too


# ---------------------------------------------------------------------------- leases


def test_a_concurrent_run_of_one_run_id_never_runs_a_node_twice(store: Any) -> None:
    entered = threading.Event()
    release = threading.Event()
    calls: list[str] = []
    flow = nk.Flow("concurrent")

    @flow.node
    def slow() -> dict[str, int]:
        calls.append("slow")
        entered.set()
        release.wait(5)
        return {"done": 1}

    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(flow.run({}, run_id="c1", store=store)))
    first.start()
    assert entered.wait(5)
    with pytest.raises(nk.FlowError, match="another run") as info:
        flow.run({}, run_id="c1", store=store)
    assert isinstance(info.value.__cause__, nk.IdempotencyInProgress)
    release.set()
    first.join()
    assert results == [{"done": 1}]
    assert flow.run({}, run_id="c1", store=store) == {"done": 1}
    assert calls == ["slow"]


def test_a_crashed_runs_lease_is_taken_over_after_it_expires(store: Any) -> None:
    flow = nk.Flow("takeover", lease=0.2)
    flow.add(lambda: {"ok": 1}, name="step")
    # a dead run holds the node's journal entry (as a SIGKILLed process leaves it)
    fingerprint = digest(canonical_json(["flow-node", "takeover", "step", None]))
    store.acquire(journal_key("takeover", "step", "l1"), fingerprint, lease=0.2, ttl=60)
    with pytest.raises(nk.FlowError, match="another run"):
        flow.run({}, run_id="l1", store=store)
    time.sleep(0.25)
    with capture_events(prefix="idempotency.") as events:
        assert flow.run({}, run_id="l1", store=store) == {"ok": 1}
    assert "idempotency.takeover" in events.names()


def test_a_long_node_keeps_its_lease_while_it_runs(store: Any) -> None:
    flow = nk.Flow("heartbeat", lease=0.15)
    seen: list[Any] = []

    @flow.node
    def long() -> dict[str, int]:
        time.sleep(0.4)  # past the lease: renewed every 0.05 s
        seen.append(store.get(journal_key("heartbeat", "long", "h1")).lease_expires_at)
        return {"ok": 1}

    before = time.time()
    assert flow.run({}, run_id="h1", store=store) == {"ok": 1}
    assert seen[0] > before + 0.4


# ---------------------------------------------------------------------------- TTLs


def test_resuming_from_an_expired_journal_entry_warns_and_strict_refuses(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SQLiteStore(tmp_path / "clock.db", clock=lambda: now[0])
    counter = Counter()
    fail_at = {"report"}
    flow = pipeline(counter, fail_at)
    flow.ttl = 3600.0
    with pytest.raises(nk.FlowError):
        flow.run({"x": 1}, run_id="old", store=store)
    now[0] += 7200  # the journal expired
    fail_at.clear()
    with pytest.warns(nk.NodekitWarning, match="expired"):
        flow.run({"x": 1}, run_id="old", store=store)
    assert counter.calls.count("fetch") == 2
    now[0] += 7200
    flow.strict = True
    with pytest.raises(nk.FlowError, match="expired"):
        flow.run({"x": 1}, run_id="old", store=store)
    store.close()


def test_replaying_an_entry_older_than_a_keyed_nodes_ttl_warns(tmp_path: Path) -> None:
    now = [time.time() - 7200]
    store = SQLiteStore(tmp_path / "ttl.db", clock=lambda: now[0])
    flow = nk.Flow("keyed-ttl")

    @flow.node(idempotency=nk.Idempotency(ttl=60, store=nk.MemoryStore()), name="charge")
    def charge(order: str) -> dict[str, str]:
        return {"charged": order}

    flow.run({"order": "o-1"}, run_id="t", store=store)
    now[0] = time.time()
    with pytest.warns(nk.NodekitWarning, match="older than the node's idempotency TTL"):
        flow.run({"order": "o-1"}, run_id="t", store=store)
    store.close()


# ---------------------------------------------------------------------------- SIGKILL


def _completed(store: Any, run_id: str) -> frozenset[str]:
    done = set()
    for node in NODES:
        record = store.get(journal_key("crash", node, run_id))
        if record is not None and record.state == "COMPLETED":
            done.add(node)
    return frozenset(done)


def _flow_length(spec: str, ledger: Path) -> float:
    """Seconds from the worker's ``ready`` to its exit, for one uninterrupted run."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), spec, "calibration", str(ledger)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    assert json.loads(proc.stdout.read()) == _crash_worker.EXPECTED
    assert proc.wait() == 0
    proc.stdout.close()
    return time.perf_counter() - started


def _kill_and_resume(spec: str, store: Any, ledger: Path, kills: int, seed: int) -> None:
    """SIGKILL the worker `kills` times at random points, resuming with the same run id.

    Each kill comes a random delay (0 to the length of an uninterrupted run, measured first)
    after the worker is ready; the
    next worker resumes the same run id. A run found complete after a kill is done with, and
    the next kill hits a new run id, so that every kill interrupts a run somewhere. At the
    end every run is resumed to completion. Then, from outside the processes, what the
    DESIGN promises: a node whose journal entry completed never runs again (no effect line
    after the kill that found it journaled); the set of journaled nodes never shrinks; every
    node's effect carries one downstream key on every attempt and resume, so a consumer that
    deduplicates by key (as an ``Idempotency-Key`` server does) applies each effect exactly
    once; a node runs again only after a crash (between its effect and its journal entry).
    """
    rng = random.Random(seed)
    flow_seconds = _flow_length(spec, ledger.with_name("calibration.txt"))
    run = 0
    run_id = f"crash-{seed}-{run}"
    snapshots: dict[str, list[tuple[int, frozenset[str]]]] = {run_id: []}
    for kill in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), spec, run_id, str(ledger)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, flow_seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with ledger.open("a") as file:
            file.write(f"KILL {kill} {run_id}\n")
        done = _completed(store, run_id)
        snapshots[run_id].append((kill, done))
        if done == frozenset(NODES):
            run += 1
            run_id = f"crash-{seed}-{run}"
            snapshots[run_id] = []
    for run_id in snapshots:
        final = subprocess.run(
            [sys.executable, str(WORKER), spec, run_id, str(ledger)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert final.returncode == 0, final.stderr
        assert json.loads(final.stdout.splitlines()[-1]) == _crash_worker.EXPECTED
        assert _completed(store, run_id) == frozenset(NODES)

    partial = [done for runs in snapshots.values() for _, done in runs if done != set(NODES)]
    assert len(partial) >= kills // 2, snapshots  # most kills interrupted a run midway
    assert any(len(done) > 0 for done in partial), snapshots
    lines = [line.split() for line in ledger.read_text().splitlines()]
    kill_at = {int(line[1]): i for i, line in enumerate(lines) if line[0] == "KILL"}
    for run_id, runs in snapshots.items():
        for (_, earlier), (_, later) in itertools.pairwise(runs):
            assert earlier <= later  # no completed node is ever lost
        effects = [(i, line[1], line[2]) for i, line in enumerate(lines) if line[0] == run_id]
        keys = {node: {key for _, n, key in effects if n == node} for node in NODES}
        assert all(len(found) == 1 for found in keys.values()), keys  # one key per node
        assert len({key for found in keys.values() for key in found}) == len(NODES)
        for kill, done in runs:
            for position, node, _ in effects:
                if node in done:
                    assert position < kill_at[kill], f"{node} ran again after it was journaled"
        markers = sorted(kill_at[kill] for kill, _ in runs)
        for node in NODES:
            positions = [p for p, n, _ in effects if n == node]
            for first, second in itertools.pairwise(positions):
                assert any(first < m < second for m in markers), f"{node} repeated without a crash"


@pytest.mark.slow
def test_sigkill_at_random_points_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    store = SQLiteStore(path)
    try:
        _kill_and_resume(f"sqlite:///{path}", store, tmp_path / "ledger.txt", 20, seed=20)
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.services
def test_sigkill_at_random_points_on_postgres(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    postgres = pytest.importorskip("nodekit.idempotency.postgres")
    store = postgres.PostgresStore(postgres_url, schema=pg_schema)
    try:
        _kill_and_resume(f"{postgres_url}|{pg_schema}", store, tmp_path / "ledger.txt", 20, seed=7)
    finally:
        store.close()


def test_the_crash_worker_runs_to_completion_in_process(tmp_path: Path) -> None:
    """The worker's flow, without kills: every node's effect appears once."""
    ledger = tmp_path / "ledger.txt"
    store = SQLiteStore(tmp_path / "j.db")
    flow = _crash_worker.build(str(ledger))
    assert flow.run({"seed": 1}, run_id="inproc", store=store) == _crash_worker.EXPECTED
    assert [line.split()[1] for line in ledger.read_text().splitlines()] == list(NODES)
    store.close()


def test_async_mode_journals_before_dependants_start(store: Any) -> None:
    order: list[str] = []
    flow = nk.Flow("async-journal")

    @flow.node
    async def first() -> dict[str, int]:
        order.append("first")
        return {"a": 1}

    @flow.node(after=first)
    async def second(a: int) -> dict[str, int]:
        record = store.get(journal_key("async-journal", "first", "aj"))
        order.append(record.state)
        return {"b": a}

    asyncio.run(flow.arun({}, run_id="aj", store=store))
    assert order == ["first", "COMPLETED"]


def test_streaming_a_resumed_run_shows_the_replays(store: Any) -> None:
    counter = Counter()
    flow = pipeline(counter, set())
    flow.run({"x": 1}, run_id="st1", store=store)
    names = [(e.name, e.node) for e in flow.stream({"x": 1}, run_id="st1", store=store)]
    assert names.count(("flow.node_skipped", "fetch")) == 1
    assert ("node.replayed", "report") in names
    assert names[-1] == ("flow.finished", None)
    assert len(counter.calls) == 3


async def test_astreaming_a_resumed_run_shows_the_replays(store: Any) -> None:
    counter = Counter()
    flow = pipeline(counter, set())
    await flow.arun({"x": 1}, run_id="st2", store=store)
    names = [(e.name, e.node) async for e in flow.astream({"x": 1}, run_id="st2", store=store)]
    assert [n for n, _ in names if n == "flow.node_skipped"] == ["flow.node_skipped"] * 3
    assert names[-1] == ("flow.finished", None)
    assert len(counter.calls) == 3
