"""Compensation: `flow.add(node, compensate=undo)` undoes completed nodes when a run fails.

In-process tests count the compensations in a list (no crash involved); the SIGKILL tests
count the refunds and releases on the LocalAPI's ledger, the server's own record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.flow._compensate import JournaledError
from nodekit.idempotency._store import RecordKey
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import APIRequest, APIResponse, LocalAPI, capture_events

from . import _compensation_worker

WORKER = Path(_compensation_worker.__file__)


class Refused(Exception):
    """A permanent business error."""


def saga(
    log: list[Any], *, fail: bool = True, undo_fails: str | None = None
) -> nk.Flow[dict[str, Any]]:
    """a -> b -> c (c fails when `fail`); a and b are compensated, c has no compensation."""
    flow = nk.Flow("saga")

    def undo_a(result: Any, x: int) -> None:
        if undo_fails == "a":
            raise RuntimeError("stock service down")
        log.append(("undo_a", result, x, nk.context().idempotency_key))

    async def undo_b(result: Any, state: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if undo_fails == "b":
            raise RuntimeError("refund refused")
        log.append(("undo_b", result, state["y"], nk.context().idempotency_key))

    @flow.node(compensate=undo_a)
    def a(x: int) -> dict[str, Any]:
        log.append("a")
        return {"y": x + 1}

    @flow.node(after=a, output="charge", compensate=undo_b)
    def b(y: int) -> str:
        log.append("b")
        return f"ch-{y}"

    @flow.node(after=b)
    def c(charge: str) -> dict[str, Any]:
        log.append("c")
        if fail:
            raise Refused("receipt refused for good")
        return {"done": True}

    return flow


def key_of(run_id: str, node: str) -> str:
    """The documented idempotency key of a compensation: derived from run id and node."""
    return digest(canonical_json([run_id, node, "compensate"]))


def run_mode(flow: nk.Flow[Any], mode: str, state: Any, **options: Any) -> Any:
    if mode == "sync":
        return flow.run(state, **options)
    return asyncio.run(flow.arun(state, **options))


# ---------------------------------------------------------------------------- not durable


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_run_compensates_completed_nodes_in_reverse_completion_order(mode: str) -> None:
    log: list[Any] = []
    with capture_events() as events, pytest.raises(nk.FlowError) as caught:
        run_mode(saga(log), mode, {"x": 1}, run_id="r1")
    error = caught.value
    assert log == [
        "a",
        "b",
        "c",
        ("undo_b", "ch-2", 2, key_of("r1", "b")),  # the last completed is undone first
        ("undo_a", {"y": 2}, 1, key_of("r1", "a")),
    ]
    assert error.failed == "c"
    assert error.compensated == ("b", "a")
    assert dict(error.not_compensated) == {}
    assert isinstance(error.__cause__, Refused)  # the node's error stays the cause
    assert "compensated: b, a" in str(error)
    names = [e.name for e in events if e.name.startswith(("flow.", "node.comp"))]
    assert names[-4:] == [
        "flow.compensating",
        "node.compensated",
        "node.compensated",
        "flow.failed",
    ]
    compensating = events.named("flow.compensating")[0]
    assert compensating["nodes"] == ("b", "a")
    assert compensating["failed"] == "c"
    done = events.named("node.compensated")
    assert [e.node for e in done] == ["b", "a"]
    assert all(e.duration is not None and e.duration >= 0 for e in done)
    failed = events.named("flow.failed")[0]
    assert failed["compensated"] == ("b", "a")
    assert failed["not_compensated"] == ()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("broken", ["a", "b"])
def test_a_failing_compensation_is_reported_and_the_others_still_run(
    mode: str, broken: str
) -> None:
    log: list[Any] = []
    with capture_events() as events, pytest.raises(nk.FlowError) as caught:
        run_mode(saga(log, undo_fails=broken), mode, {"x": 1}, run_id="r2")
    error = caught.value
    other = "a" if broken == "b" else "b"
    assert error.compensated == (other,)
    assert list(error.not_compensated) == [broken]
    assert "RuntimeError" in error.not_compensated[broken]
    assert f"NOT compensated: {broken} (RuntimeError" in str(error)
    assert isinstance(error.__cause__, Refused)
    assert [e[0] for e in log if isinstance(e, tuple)] == [f"undo_{other}"]
    bad = events.named("node.compensation_failed")
    assert [e.node for e in bad] == [broken]
    assert bad[0].error is not None
    assert "RuntimeError" in bad[0].error
    assert events.named("flow.failed")[0]["not_compensated"] == (broken,)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_that_succeeds_compensates_nothing(mode: str) -> None:
    log: list[Any] = []
    with capture_events() as events:
        final = run_mode(saga(log, fail=False), mode, {"x": 1})
    assert final["done"] is True
    assert log == ["a", "b", "c"]
    assert not events.named("flow.compensating")


def test_only_completed_nodes_are_compensated() -> None:
    """A node that fails is not compensated, nor are the nodes after it."""
    log: list[str] = []
    flow = nk.Flow("partial")

    @flow.node(compensate=lambda: log.append("undo_first"))
    def first() -> None:
        log.append("first")

    @flow.node(after=first, compensate=lambda: log.append("undo_second"))
    def second() -> None:
        raise Refused("no")

    @flow.node(after=second, compensate=lambda: log.append("undo_third"))
    def third() -> None:
        log.append("third")

    with pytest.raises(nk.FlowError) as caught:
        flow.run({})
    assert log == ["first", "undo_first"]
    assert caught.value.compensated == ("first",)


def test_a_flow_without_compensations_pays_no_compensation_work() -> None:
    flow = nk.Flow("plain")
    flow.add(lambda: {"a": 1}, name="one")
    plan = flow._compile()
    assert plan.compensable is False
    assert all(step.compensate is None for step in plan.order)
    flow.add(lambda a: (_ for _ in ()).throw(Refused("x")), name="two", after="one")
    with capture_events() as events, pytest.raises(nk.FlowError) as caught:
        flow.run({})
    assert caught.value.compensated == ()
    assert not events.named("flow.compensating")
    assert len(events.named("flow.failed")) == 1


@pytest.mark.parametrize(
    "error",
    [
        nk.IdempotencyInProgress("held elsewhere", node="second"),
        nk.OutcomeUnknown("maybe charged", node="second"),
        ConnectionRefusedError("the API is down"),  # transient: safe
        nk.CircuitOpen("open", node="second"),
    ],
    ids=["in-progress", "outcome-unknown", "transient", "circuit-open"],
)
def test_a_run_that_did_not_fail_for_good_is_not_compensated(error: Exception) -> None:
    """A transient error, or one a resume may settle: running it again may complete it."""
    log: list[str] = []
    flow = nk.Flow("busy")

    @flow.node(compensate=lambda: log.append("undo"))
    def first() -> None:
        log.append("first")

    @flow.node(after=first)
    def second() -> None:
        raise error

    with capture_events() as events, pytest.raises(nk.FlowError):
        flow.run({})
    assert log == ["first"]
    assert not events.named("flow.compensating")
    assert len(events.named("flow.failed")) == 1


# ---------------------------------------------------------------------------- build time


def test_compensate_must_be_callable() -> None:
    flow = nk.Flow("bad")
    not_callable: Any = "refund"
    with pytest.raises(nk.ConfigError) as caught:
        flow.add(lambda: None, name="one", compensate=not_callable)
    assert caught.value.node == "one"
    assert caught.value.option == "compensate"
    with pytest.raises(nk.ConfigError) as caught:

        @flow.node(compensate=not_callable)
        def two() -> None: ...

    assert caught.value.node == "two"
    assert caught.value.option == "compensate"


def test_a_compensation_parameter_nothing_binds_is_refused_before_a_run() -> None:
    class State(BaseModel):
        x: int
        y: int | None = None

    flow = nk.Flow("typed", state=State)

    def undo(result: Any, missing: str) -> None: ...

    flow.add(lambda x: {"y": x}, name="one", compensate=undo)
    with pytest.raises(nk.ConfigError) as caught:
        flow.check()
    assert caught.value.node == "one"
    assert caught.value.option == "compensate"
    assert "'missing'" in str(caught.value)
    ran: list[int] = []
    flow2 = nk.Flow("typed2", state=State)
    flow2.add(lambda x: ran.append(x), name="one", compensate=undo)
    with pytest.raises(nk.ConfigError):
        flow2.run({"x": 1})
    assert ran == []  # refused before any node ran

    def fine(result: Any, x: int, y: int | None, state: State, extra: int = 3) -> None: ...

    flow3 = nk.Flow("typed3", state=State)
    flow3.add(lambda x: {"y": x}, name="one", compensate=fine)
    flow3.check()


def test_a_compensation_takes_resources_like_a_node() -> None:
    seen: list[Any] = []
    flow = nk.Flow("res", resources={"bank": lambda: "the-bank"})

    def undo(result: Any, bank: str, teller: str) -> None:
        seen.append((result, bank, teller))

    flow.add(lambda: {"v": 1}, name="one", compensate=undo)
    flow.add(lambda v: (_ for _ in ()).throw(Refused("x")), name="two", after="one")
    with nk.use(teller="ann"), pytest.raises(nk.FlowError) as caught:
        flow.run({})
    assert seen == [({"v": 1}, "the-bank", "ann")]
    assert caught.value.compensated == ("one",)


# ---------------------------------------------------------------------------- durable


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_compensated_durable_run_stays_compensated_on_resume(tmp_path: Path, mode: str) -> None:
    log: list[Any] = []
    store = SQLiteStore(tmp_path / "journal.sqlite")
    try:
        with pytest.raises(nk.FlowError) as first:
            run_mode(saga(log), mode, {"x": 1}, run_id="d1", store=store)
        assert first.value.compensated == ("b", "a")
        keys = [entry[3] for entry in log if isinstance(entry, tuple)]
        assert keys == [key_of("d1", "b"), key_of("d1", "a")]
        log.clear()
        with capture_events() as events, pytest.raises(nk.FlowError) as again:
            run_mode(saga(log), mode, {"x": 1}, run_id="d1", store=store)
        assert log == []  # no node and no compensation ran again
        assert again.value.compensated == ("b", "a")
        assert str(again.value) == str(first.value)
        assert again.value.failed == "c"
        cause = again.value.__cause__  # the journal has the error's text, not the object
        assert isinstance(cause, JournaledError)
        assert str(cause).startswith("Refused: ")
        assert [e["replayed"] for e in events.named("node.compensated")] == [True, True]
        assert not events.named("flow.node_started")
    finally:
        store.close()


def test_a_failed_compensation_is_journaled_and_reported_again_on_resume(tmp_path: Path) -> None:
    log: list[Any] = []
    store = SQLiteStore(tmp_path / "journal.sqlite")
    try:
        with pytest.raises(nk.FlowError) as first:
            saga(log, undo_fails="a").run({"x": 1}, run_id="d2", store=store)
        assert list(first.value.not_compensated) == ["a"]
        log.clear()
        with pytest.raises(nk.FlowError) as again:
            saga(log).run({"x": 1}, run_id="d2", store=store)
        assert log == []
        assert again.value.compensated == ("b",)
        assert dict(again.value.not_compensated) == dict(first.value.not_compensated)
    finally:
        store.close()


def test_a_node_replayed_from_an_earlier_attempt_is_compensated(tmp_path: Path) -> None:
    """First attempt: c fails with an error a resume may settle (nothing undone); the resume
    replays a and b, c fails for good, and a and b are compensated."""
    log: list[Any] = []
    store = SQLiteStore(tmp_path / "journal.sqlite")
    attempts: list[int] = []
    flow = nk.Flow("replayed")

    @flow.node(compensate=lambda result: log.append(("undo_a", result)))
    def a() -> dict[str, Any]:
        log.append("a")
        return {"y": 1}

    @flow.node(after=a)
    def c(y: int) -> None:
        attempts.append(y)
        if len(attempts) == 1:
            raise nk.OutcomeUnknown("unknown", node="c")
        raise Refused("for good")

    try:
        with pytest.raises(nk.FlowError) as first:
            flow.run({}, run_id="d3", store=store)
        assert first.value.compensated == ()
        assert log == ["a"]
        with pytest.raises(nk.FlowError) as second:
            flow.run({}, run_id="d3", store=store)
        assert log == ["a", ("undo_a", {"y": 1})]  # a replayed, not run again
        assert second.value.compensated == ("a",)
    finally:
        store.close()


# ---------------------------------------------------------------------------- SIGKILL


class Shop:
    """A LocalAPI with keyed effect routes: reserve, charge, release, refund."""

    ROUTES = ("reserve", "charges", "releases", "refunds")

    def __init__(self) -> None:
        routes = {f"POST /{name}": self._effect(name) for name in self.ROUTES}
        self.api = LocalAPI(routes=routes)

    @staticmethod
    def _effect(name: str) -> Any:
        def handle(request: APIRequest) -> APIResponse:
            run = request.json()["run"]
            return APIResponse(201, {"ok": name}, effect=True, data={"run": run})

        return handle

    def effects(self, route: str) -> Counter[str]:
        return Counter(
            entry.data["run"] for entry in self.api.ledger.find(route=f"POST /{route}", effect=True)
        )


class Zygote:
    """The worker's `zygote`: forks a fresh worker process per run in milliseconds (each its
    own pid, sharing nothing with the test or the others), so 20 kills and resumes stay quick."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask() == "ready"

    def ask(self, *request: Any) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if request:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, *args: str) -> int:
        answer = self.ask("run", *args)
        assert answer.startswith("pid "), answer
        return int(answer.split()[1])

    def wait(self, pid: int) -> int:
        answer = self.ask("wait", pid)
        assert answer.startswith(f"exit {pid} "), answer
        return int(answer.split()[2])

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def crash_loop(spec: str, tmp_path: Path, runs: int = 20) -> None:
    """Each run: a worker SIGKILLed at a random point around its compensations, then resumed
    by run id in a new process, which reports the run's `FlowError`."""
    rng = random.Random(12)
    zygote = Zygote()
    shop = Shop()
    try:
        with shop.api as api:
            killed_during = 0
            for i in range(runs):
                run_id = f"saga-{i}"
                out = tmp_path / f"{run_id}.out"
                args = (spec, run_id, api.url, str(out))
                pid = zygote.start(*args)
                deadline = time.monotonic() + 20
                while shop.effects("charges")[run_id] < 1:
                    assert time.monotonic() < deadline, out.read_text()
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.2))  # a random point around the compensations
                refunded = shop.effects("refunds")[run_id]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if zygote.wait(pid) == -signal.SIGKILL and refunded:
                    killed_during += 1
                resumed = zygote.start(*args)
                assert zygote.wait(resumed) == 0, out.read_text()
                outcome = json.loads(out.read_text().strip().splitlines()[-1])
                assert outcome == {"compensated": ["charge", "reserve"], "not_compensated": {}}
            for route in Shop.ROUTES:
                effects = shop.effects(route)
                assert effects == {f"saga-{i}": 1 for i in range(runs)}, route
            # some kills landed mid-compensation (after the refund was made, before the end)
            assert killed_during >= 2, killed_during
    finally:
        zygote.close()


@pytest.mark.slow
def test_sigkill_during_compensation_sqlite_every_refund_and_release_once(tmp_path: Path) -> None:
    crash_loop(f"sqlite:///{tmp_path / 'journal.sqlite'}", tmp_path)


@pytest.mark.slow
def test_sigkill_during_compensation_postgres_every_refund_and_release_once(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    from nodekit.idempotency.postgres import PostgresStore

    PostgresStore(postgres_url, schema=pg_schema).close()  # the schema's tables, made once
    crash_loop(f"{postgres_url}|{pg_schema}", tmp_path)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_stream_shows_the_compensations_before_the_failure(mode: str) -> None:
    log: list[Any] = []
    flow = saga(log)
    names: list[str] = []

    def consume() -> None:
        for event in flow.stream({"x": 1}):
            names.append(event.name)

    async def aconsume() -> None:
        async for event in flow.astream({"x": 1}):
            names.append(event.name)

    with pytest.raises(nk.FlowError):
        consume() if mode == "sync" else asyncio.run(aconsume())
    tail = [name for name in names if name.startswith(("flow.compensating", "node.comp", "flow.f"))]
    assert tail == ["flow.compensating", "node.compensated", "node.compensated", "flow.failed"]


def test_concurrent_nodes_are_compensated_in_reverse_completion_order() -> None:
    """In async mode the completion order, not the declaration order, decides."""
    log: list[str] = []
    flow = nk.Flow("parallel", on_error="finish")

    @flow.node(compensate=lambda: log.append("undo_slow"))
    async def slow() -> None:
        await asyncio.sleep(0.05)
        log.append("slow")

    @flow.node(compensate=lambda: log.append("undo_fast"))
    async def fast() -> None:
        log.append("fast")

    @flow.node(after=fast)
    async def boom() -> None:
        await asyncio.sleep(0.01)
        raise Refused("for good")

    with pytest.raises(nk.FlowError) as caught:
        asyncio.run(flow.arun({}))
    # slow was still running when boom failed; on_error="finish" let it complete
    assert log == ["fast", "slow", "undo_slow", "undo_fast"]
    assert caught.value.completed == ("fast", "slow")
    assert caught.value.compensated == ("slow", "fast")


@pytest.mark.parametrize("durable", [False, True])
def test_a_node_a_loop_ran_twice_is_compensated_once_per_completion(
    tmp_path: Path, durable: bool
) -> None:
    """Each completion has its own compensation key and its own `result`."""
    log: list[Any] = []
    flow = nk.Flow("loop")

    def refund(result: Any) -> None:
        log.append(("refund", result, nk.context().idempotency_key))

    @flow.node
    def start() -> None: ...

    @flow.node(after=start, output="n", compensate=refund)
    def charge(n: int) -> int:
        return n + 1

    @flow.node
    def receipt(n: int) -> None:
        raise Refused("for good")

    flow.route(
        after=charge,
        to=lambda state: charge if state["n"] < 2 else receipt,
        targets=[charge, receipt],
    )
    store = SQLiteStore(tmp_path / "journal.sqlite") if durable else None
    try:
        with pytest.raises(nk.FlowError) as caught:
            flow.run({"n": 0}, run_id="loop-1", store=store)
    finally:
        if store is not None:
            store.close()
    second = digest(canonical_json(["loop-1", "charge", "compensate", 1]))
    assert log == [("refund", 2, second), ("refund", 1, key_of("loop-1", "charge"))]
    assert caught.value.compensated == ("charge", "charge")


# ---------------------------------------------------------------------------- in-flight nodes


def racing(effects: list[str], *, compensated: bool, routed: bool) -> nk.Flow[dict[str, Any]]:
    """`slow` (a sync node, in a worker thread) is still running when `fast` fails for good."""
    flow = nk.Flow("race", on_error="cancel")
    failed = threading.Event()

    def undo_slow(result: Any) -> None:
        effects.append(f"undo_slow:{result}")

    def slow(x: int) -> int:
        assert failed.wait(5)
        time.sleep(0.1)  # the loop has seen fast's failure by now
        effects.append("charged")
        return x

    def fast(x: int) -> None:
        failed.set()
        raise Refused("no")

    undo = undo_slow if compensated else None
    if routed:
        flow.add(lambda: None, name="start")
        flow.add(slow, name="slow", output="s", compensate=undo)
        flow.add(fast, name="fast")
        flow.route(after="start", to=lambda state: ["slow", "fast"], targets=["slow", "fast"])
    else:
        flow.add(slow, name="slow", output="s", compensate=undo)
        flow.add(fast, name="fast")
    return flow


@pytest.mark.parametrize("routed", [False, True], ids=["dag", "routed"])
def test_a_compensable_flow_waits_for_in_flight_nodes_and_compensates_them(routed: bool) -> None:
    """A sync node in a worker thread cannot be cancelled: with compensations, the run lets
    it finish, lists it as completed and undoes it."""
    effects: list[str] = []
    with pytest.raises(nk.FlowError) as caught:
        asyncio.run(racing(effects, compensated=True, routed=routed).arun({"x": 7, "s": 0}))
    assert effects == ["charged", "undo_slow:7"]
    assert "slow" in caught.value.completed
    assert caught.value.compensated == ("slow",)
    assert caught.value.failed == "fast"


@pytest.mark.parametrize("routed", [False, True], ids=["dag", "routed"])
def test_a_flow_without_compensations_still_cancels_in_flight_nodes(routed: bool) -> None:
    """on_error="cancel" as before: the running sibling's task is cancelled, not completed."""
    effects: list[str] = []
    with pytest.raises(nk.FlowError) as caught:
        asyncio.run(racing(effects, compensated=False, routed=routed).arun({"x": 7, "s": 0}))
    assert "slow" not in caught.value.completed
    assert caught.value.compensated == ()
    assert effects == ["charged"]  # the thread ran on: why compensable flows wait for it


# ---------------------------------------------------------------------------- transient undo


class Dropped(Exception):
    """The refund request was sent and the connection dropped: it may have happened."""

    nodekit_kind = "ambiguous"


def refunding(db: Path, failures: list[BaseException]) -> nk.Flow[dict[str, Any]]:
    """charge -> receipt (refused for good); the refund fails with `failures.pop(0)` while
    any is left, else writes its row to a sqlite table (the effect, counted outside)."""
    flow = nk.Flow("refunding")

    def refund(result: Any) -> None:
        if failures:
            raise failures.pop(0)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("INSERT INTO refunds (charge) VALUES (?)", (result,))

    @flow.node(output="charge", compensate=refund)
    def charge(x: int) -> str:
        return f"ch-{x}"

    @flow.node(after=charge)
    def receipt(charge: str) -> None:
        raise Refused("receipt refused for good")

    return flow


def refunds(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT charge FROM refunds")]


@pytest.fixture
def refund_db(tmp_path: Path) -> Path:
    db = tmp_path / "effects.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE refunds (charge TEXT NOT NULL)")
    return db


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_compensation_that_failed_safely_runs_again_on_resume(
    tmp_path: Path, refund_db: Path, mode: str, nk_instant: Any
) -> None:
    """The refund API was down (a safe error: it did not happen): the first run reports it
    not compensated, and a resume runs the refund again, once."""
    store = SQLiteStore(tmp_path / "journal.sqlite")
    failures: list[BaseException] = [ConnectionRefusedError("refund API down")] * 10
    try:
        with pytest.raises(nk.FlowError) as first:
            run_mode(refunding(refund_db, failures), mode, {"x": 1}, run_id="t1", store=store)
        assert list(first.value.not_compensated) == ["charge"]
        assert "ConnectionRefusedError" in first.value.not_compensated["charge"]
        assert refunds(refund_db) == []
        failures.clear()  # the API is back
        with pytest.raises(nk.FlowError) as second:
            run_mode(refunding(refund_db, failures), mode, {"x": 1}, run_id="t1", store=store)
        assert second.value.compensated == ("charge",)
        assert dict(second.value.not_compensated) == {}
        assert refunds(refund_db) == ["ch-1"]
        with pytest.raises(nk.FlowError) as third:
            run_mode(refunding(refund_db, failures), mode, {"x": 1}, run_id="t1", store=store)
        assert third.value.compensated == ("charge",)
        assert refunds(refund_db) == ["ch-1"]  # replayed, not refunded twice
    finally:
        store.close()


def test_a_compensation_that_failed_ambiguously_keeps_its_entry_locked(
    tmp_path: Path, refund_db: Path, nk_instant: Any
) -> None:
    """An ambiguous error (the refund may have happened) is reported as outcome unknown; its
    journal entry stays locked, so a resume within the lease does not refund again."""
    store = SQLiteStore(tmp_path / "journal.sqlite")
    failures: list[BaseException] = [Dropped("connection dropped after sending")] * 10
    try:
        with capture_events() as events, pytest.raises(nk.FlowError) as first:
            refunding(refund_db, failures).run({"x": 1}, run_id="t2", store=store)
        why = first.value.not_compensated["charge"]
        assert "OutcomeUnknown" in why
        assert "Dropped" in why
        assert events.named("idempotency.outcome_unknown")
        failures.clear()
        with pytest.raises(nk.FlowError) as second:
            refunding(refund_db, failures).run({"x": 1}, run_id="t2", store=store)
        assert list(second.value.not_compensated) == ["charge"]
        assert "in progress" in second.value.not_compensated["charge"]
        assert refunds(refund_db) == []
    finally:
        store.close()


def test_a_compensation_that_failed_for_good_is_not_run_again(
    tmp_path: Path, refund_db: Path, nk_instant: Any
) -> None:
    store = SQLiteStore(tmp_path / "journal.sqlite")
    failures: list[BaseException] = [Refused("refund refused: card closed")] * 10
    try:
        with pytest.raises(nk.FlowError) as first:
            refunding(refund_db, failures).run({"x": 1}, run_id="t3", store=store)
        failures.clear()
        with pytest.raises(nk.FlowError) as second:
            refunding(refund_db, failures).run({"x": 1}, run_id="t3", store=store)
        assert dict(second.value.not_compensated) == dict(first.value.not_compensated)
        assert "card closed" in second.value.not_compensated["charge"]
        assert refunds(refund_db) == []
    finally:
        store.close()


# ---------------------------------------------------------------------------- resume alignment


def test_a_completion_whose_journal_entry_is_gone_keeps_the_results_aligned(
    tmp_path: Path, nk_instant: Any
) -> None:
    """A loop charged twice; the first charge's journal entry is gone when the run resumes:
    its refund gets ``result=None``, and the second refund still gets the second charge."""
    log: list[Any] = []
    down: list[bool] = [True]
    flow = nk.Flow("loop2")

    def refund(result: Any) -> None:
        if down[0]:
            raise ConnectionRefusedError("refund API down")
        log.append(("refund", result, nk.context().idempotency_key))

    @flow.node
    def start() -> None: ...

    @flow.node(after=start, output="n", compensate=refund)
    def charge(n: int) -> int:
        return n + 1

    @flow.node
    def receipt(n: int) -> None:
        raise Refused("for good")

    flow.route(
        after=charge,
        to=lambda state: charge if state["n"] < 2 else receipt,
        targets=[charge, receipt],
    )
    store = SQLiteStore(tmp_path / "journal.sqlite")
    try:
        with pytest.raises(nk.FlowError) as first:
            flow.run({"n": 0}, run_id="loop-2", store=store)
        assert list(first.value.not_compensated) == ["charge#2", "charge"]
        step = next(s for s in flow._compile().order if s.name == "charge")
        gone = RecordKey(
            f"flow:loop2:{step.namespace}", "", digest(canonical_json(["loop-2", "charge", 0]))
        )
        assert store.delete(gone)
        down[0] = False
        with pytest.raises(nk.FlowError) as second:
            flow.run({"n": 0}, run_id="loop-2", store=store)
    finally:
        store.close()
    later = digest(canonical_json(["loop-2", "charge", "compensate", 1]))
    assert log == [("refund", 2, later), ("refund", None, key_of("loop-2", "charge"))]
    assert second.value.compensated == ("charge", "charge")
