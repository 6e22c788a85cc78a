"""Routing: `flow.route(after=, to=)`, `nk.END`, loops bounded by `max_steps`, journaled
decisions that a resume follows, and the build-time checks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
import pytest

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.idempotency import RecordKey
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import APIRequest, APIResponse, LocalAPI, capture_events

MODES = ("sync", "async")


def run_flow(flow: nk.Flow[Any], mode: str, state: Any, **options: Any) -> Any:
    """`flow.run` or `flow.arun` (on a fresh event loop): the twin tests share one body."""
    if mode == "sync":
        return flow.run(state, **options)
    return asyncio.run(flow.arun(state, **options))


class Shop:
    """A LocalAPI whose effect routes (charges, notices, attempts) the ledger counts per run."""

    ROUTES = ("charges", "notices", "attempts")
    client: httpx.Client

    def __init__(self) -> None:
        self.api = LocalAPI(routes={f"POST /{name}": self._effect(name) for name in self.ROUTES})

    @staticmethod
    def _effect(name: str) -> Any:
        def handle(request: APIRequest) -> APIResponse:
            return APIResponse(201, {"ok": name}, effect=True, data={"run": request.json()["run"]})

        return handle

    def post(self, route: str) -> None:
        """One effect, for the run the calling node belongs to."""
        response = self.client.post(f"/{route}", json={"run": nk.context().run_id})
        response.raise_for_status()

    def effects(self, route: str) -> Counter[str]:
        return Counter(
            entry.data["run"] for entry in self.api.ledger.find(route=f"POST /{route}", effect=True)
        )


@pytest.fixture
def shop() -> Iterator[Shop]:
    shop = Shop()
    with shop.api as api, httpx.Client(base_url=api.url) as client:
        shop.client = client
        yield shop


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "journal.db")
    yield store
    store.close()


# ---------------------------------------------------------------------------- checkout


class Order(TypedDict, total=False):
    amount: int
    error: str
    charged: int
    notified: str


def checkout(shop: Shop) -> nk.Flow[Order]:
    """check -> (charge | notify | END), chosen on the state."""
    flow = nk.Flow("checkout", Order)

    @flow.node
    def check(amount: int) -> Order:
        if amount <= 0:
            return {"error": "amount must be positive"}
        return {}

    @flow.node
    def charge(amount: int) -> Order:
        shop.post("charges")
        return {"charged": amount}

    @flow.node
    def notify(error: str) -> Order:
        shop.post("notices")
        return {"notified": error}

    def decide(state: Order) -> Any:
        if "error" in state:
            return notify
        return nk.END if state["amount"] > 1000 else charge

    flow.route(after=check, to=decide, targets=[charge, notify, nk.END])
    return flow


@pytest.mark.parametrize("mode", MODES)
def test_an_error_state_routes_to_notify_and_the_charge_never_runs(shop: Shop, mode: str) -> None:
    flow = checkout(shop)
    with capture_events() as events:
        out = run_flow(flow, mode, {"amount": 0}, run_id="bad")
    assert out == {"amount": 0, "error": "amount must be positive", "notified": out["error"]}
    assert shop.effects("charges")["bad"] == 0
    assert shop.effects("notices")["bad"] == 1
    finished = events.named("flow.finished")[0]
    assert finished.fields["completed"] == ("check", "notify")
    routed = events.named("flow.routed")
    assert [(e.node, e.fields["route"], e.fields["to"]) for e in routed] == [
        ("check", "decide", ("notify",))
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_good_state_routes_to_the_charge_and_END_runs_nothing(shop: Shop, mode: str) -> None:
    flow = checkout(shop)
    assert run_flow(flow, mode, {"amount": 5}, run_id="good")["charged"] == 5
    out = run_flow(flow, mode, {"amount": 5000}, run_id="big")
    assert out == {"amount": 5000}
    assert shop.effects("charges") == {"good": 1}
    assert shop.effects("notices") == {}


async def test_async_nodes_and_an_async_route_function(shop: Shop) -> None:
    flow = nk.Flow("async-route")
    seen: list[str] = []

    @flow.node
    async def check(amount: int) -> dict[str, Any]:
        return {"ok": amount > 0}

    @flow.node
    async def charge(amount: int) -> dict[str, Any]:
        seen.append("charge")
        return {"charged": amount}

    @flow.node
    async def reject() -> dict[str, Any]:
        seen.append("reject")
        return {"rejected": True}

    async def decide(state: Any) -> Literal["charge", "reject"]:
        await asyncio.sleep(0)
        return "charge" if state["ok"] else "reject"

    flow.route(after=check, to=decide)  # the targets come from the Literal annotation
    assert (await flow.arun({"amount": -1}))["rejected"] is True
    assert flow.run({"amount": 3})["charged"] == 3  # an async route in sync mode too
    assert seen == ["reject", "charge"]


@pytest.mark.parametrize("mode", MODES)
def test_a_route_may_pick_several_nodes_and_their_dependants_follow(mode: str) -> None:
    flow = nk.Flow("fan", max_concurrency=4)
    ran: list[str] = []

    @flow.node
    def start() -> dict[str, Any]:
        return {"n": 2}

    @flow.node(output="left")
    def left(n: int) -> int:
        ran.append("left")
        return n + 1

    @flow.node(output="right")
    def right(n: int) -> int:
        ran.append("right")
        return n * 10

    @flow.node(output="never")
    def never() -> int:
        ran.append("never")
        return 0

    @flow.node(after=[left, right], output="total")
    def join(left: int, right: int) -> int:
        ran.append("join")
        return left + right

    @flow.node(after=never, output="skipped")
    def after_never() -> int:
        ran.append("after_never")
        return 0

    flow.route(
        after=start,
        to=lambda state: [left, right],
        targets=[left, right, never],
    )
    out = run_flow(flow, mode, None)
    assert out["total"] == 23
    assert sorted(ran) == ["join", "left", "right"]  # never picked: it and its dependant skip


@pytest.mark.parametrize("mode", MODES)
def test_targets_as_a_mapping_of_what_the_route_returns(mode: str) -> None:
    flow = nk.Flow("paths")

    @flow.node(output="grade")
    def grade(score: int) -> str:
        return "pass" if score >= 50 else "fail"

    @flow.node(output="message")
    def congratulate() -> str:
        return "well done"

    @flow.node(output="message")
    def console() -> str:
        return "next time"

    flow.route(
        after=grade,
        to=lambda state: state["grade"] == "pass",
        targets={True: congratulate, False: "console"},
    )
    assert run_flow(flow, mode, {"score": 70})["message"] == "well done"
    assert run_flow(flow, mode, {"score": 10})["message"] == "next time"


# ---------------------------------------------------------------------------- loops


def retry_loop(shop: Shop, *, succeed_at: int | None, max_steps: int | None = None) -> nk.Flow[Any]:
    """prepare -> attempt, and attempt -> (attempt | done | END) through a route."""
    flow = nk.Flow("retry", max_steps=max_steps)

    @flow.node(output="tries")
    def prepare() -> int:
        return 0

    @flow.node(after=prepare)
    def attempt(tries: int) -> dict[str, Any]:
        shop.post("attempts")
        tries += 1
        return {"tries": tries, "ok": succeed_at is not None and tries >= succeed_at}

    @flow.node(output="result")
    def done(tries: int) -> str:
        return f"ok after {tries}"

    def again(state: Any) -> Any:
        return done if state["ok"] else attempt

    flow.route(after=attempt, to=again, targets=[attempt, done])
    return flow


@pytest.mark.parametrize("mode", MODES)
def test_a_loop_through_a_route_runs_until_the_route_ends_it(shop: Shop, mode: str) -> None:
    flow = retry_loop(shop, succeed_at=3)
    with capture_events() as events:
        out = run_flow(flow, mode, None, run_id=f"loop-{mode}")
    assert out["result"] == "ok after 3"
    assert shop.effects("attempts") == {f"loop-{mode}": 3}
    assert events.named("flow.finished")[0].fields["completed"] == (
        "prepare",
        "attempt",
        "attempt",
        "attempt",
        "done",
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_loop_that_never_ends_stops_at_max_steps_with_a_clear_error(
    shop: Shop, mode: str
) -> None:
    flow = retry_loop(shop, succeed_at=None, max_steps=6)
    with pytest.raises(nk.FlowError) as info:
        run_flow(flow, mode, None, run_id=f"endless-{mode}")
    message = str(info.value)
    assert "flow 'retry'" in message
    assert "max_steps=6" in message
    assert "['attempt']" in message  # the loop's nodes
    assert info.value.failed == "attempt"
    # six steps: prepare once, attempt five times; the seventh never started
    assert shop.effects("attempts") == {f"endless-{mode}": 5}
    assert info.value.completed == ("prepare", *["attempt"] * 5)


def test_the_default_max_steps_bounds_a_loop_at_100_steps(shop: Shop) -> None:
    flow = retry_loop(shop, succeed_at=None)
    with pytest.raises(nk.FlowError, match="max_steps=100"):
        flow.run(None, run_id="default")
    assert shop.effects("attempts") == {"default": 99}


@pytest.mark.parametrize("mode", MODES)
def test_each_execution_of_a_looped_node_has_its_own_journal_entry(
    shop: Shop, store: SQLiteStore, mode: str
) -> None:
    flow = retry_loop(shop, succeed_at=3)
    run_id = f"entries-{mode}"
    run_flow(flow, mode, None, run_id=run_id, store=store)
    for call in range(3):
        key = RecordKey("flow:retry:attempt", "", digest(canonical_json([run_id, "attempt", call])))
        record = store.get(key)
        assert record is not None
        assert json.loads(record.result or "")["update"]["tries"] == call + 1
    missing = RecordKey("flow:retry:attempt", "", digest(canonical_json([run_id, "attempt", 3])))
    assert store.get(missing) is None
    # a resume of the completed run replays all five executions and runs nothing
    with capture_events() as events:
        out = run_flow(flow, mode, None, run_id=run_id, store=store)
    assert out["result"] == "ok after 3"
    assert shop.effects("attempts") == {run_id: 3}
    assert [e.node for e in events.named("flow.node_skipped")] == [
        "prepare",
        "attempt",
        "attempt",
        "attempt",
        "done",
    ]
    assert all(e.fields["replayed"] for e in events.named("flow.routed"))


# ---------------------------------------------------------------------------- durable routes


def switchable(shop: Shop, choice: dict[str, str], fail: set[str]) -> nk.Flow[Any]:
    """check -> (charge | notify); the route follows `choice`, and `fail` makes nodes fail."""
    flow = nk.Flow("switch")

    @flow.node(output="checked")
    def check() -> bool:
        return True

    @flow.node(output="charged")
    def charge() -> bool:
        if "charge" in fail:
            raise RuntimeError("card network down")
        shop.post("charges")
        return True

    @flow.node(output="notified")
    def notify() -> bool:
        shop.post("notices")
        return True

    flow.route(after=check, to=lambda state: choice["to"], targets=["charge", "notify"])
    return flow


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_run_follows_the_journaled_route(
    shop: Shop, store: SQLiteStore, mode: str
) -> None:
    choice, fail = {"to": "charge"}, {"charge"}
    flow = switchable(shop, choice, fail)
    run_id = f"resume-{mode}"
    with pytest.raises(nk.FlowError) as info:
        run_flow(flow, mode, None, run_id=run_id, store=store)
    assert info.value.failed == "charge"
    # the route function would now choose otherwise: the resume keeps the journaled decision
    choice["to"] = "notify"
    fail.clear()
    with capture_events() as events:
        out = run_flow(flow, mode, None, run_id=run_id, store=store)
    assert out == {"checked": True, "charged": True}
    assert shop.effects("charges") == {run_id: 1}
    assert shop.effects("notices") == {}
    [routed] = events.named("flow.routed")
    assert routed.fields["to"] == ("charge",)
    assert routed.fields["replayed"] is True
    # a new run decides afresh
    assert run_flow(flow, mode, None, run_id=f"{run_id}-new", store=store)["notified"] is True


@pytest.mark.slow
def test_a_run_killed_after_the_decision_resumes_on_the_journaled_route(
    shop: Shop, tmp_path: Path
) -> None:
    """SIGKILL (os._exit) right after the decision was journaled: the next process, whose
    route function prefers the other node, follows the journal; effects counted by the
    server's ledger."""
    db = tmp_path / "journal.db"
    script = f"""
import os, httpx, nodekit as nk
flow = nk.Flow("killed")

@flow.node(output="checked")
def check() -> bool:
    return True

@flow.node(output="charged")
def charge() -> bool:
    if os.environ["PHASE"] == "1":
        os._exit(9)  # the process dies: the decision is journaled, charge never completed
    httpx.post("{shop.api.url}/charges", json={{"run": nk.context().run_id}}).raise_for_status()
    return True

@flow.node(output="notified")
def notify() -> bool:
    httpx.post("{shop.api.url}/notices", json={{"run": nk.context().run_id}}).raise_for_status()
    return True

prefer = "charge" if os.environ["PHASE"] == "1" else "notify"
flow.route(after=check, to=lambda state: prefer, targets=[charge, notify])
print(flow.run(None, run_id="k1", store=nk.SQLiteStore({str(db)!r})))
"""
    first = subprocess.run(
        [sys.executable, "-c", script], env=_env("1"), capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 9, first.stderr
    second = subprocess.run(
        [sys.executable, "-c", script], env=_env("2"), capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert "'charged': True" in second.stdout
    assert shop.effects("charges") == {"k1": 1}
    assert shop.effects("notices") == {}


def _env(phase: str) -> dict[str, str]:
    import os

    return {**os.environ, "PHASE": phase}


def test_a_resume_with_other_routes_is_refused(shop: Shop, store: SQLiteStore) -> None:
    flow = switchable(shop, {"to": "charge"}, {"charge"})
    with pytest.raises(nk.FlowError):
        flow.run(None, run_id="shape", store=store)
    other = switchable(shop, {"to": "charge"}, set())
    other.route(after="charge", to=lambda state: nk.END, targets=[nk.END], name="extra")
    with pytest.raises(nk.FlowError, match="other nodes or dependencies"):
        other.run(None, run_id="shape", store=store)


# ---------------------------------------------------------------------------- checks


def small_flow() -> tuple[nk.Flow[Any], Any, Any]:
    flow = nk.Flow("checks")

    @flow.node(output="a")
    def first() -> int:
        return 1

    @flow.node(output="b")
    def second() -> int:
        return 2

    return flow, first, second


def test_an_unknown_target_is_a_config_error_when_the_flow_is_built() -> None:
    flow, first, _ = small_flow()
    flow.route(after=first, to=lambda state: "ghost", targets=["second", "ghost"], name="pick")
    with pytest.raises(nk.ConfigError, match=r"route 'pick' after 'first': target 'ghost'"):
        flow.check()
    with pytest.raises(nk.ConfigError, match="target 'ghost'"):
        flow.run()


def test_an_unknown_after_is_a_config_error_naming_the_route() -> None:
    flow, _, second = small_flow()
    flow.route(after="nowhere", to=lambda state: second, targets=[second], name="pick")
    with pytest.raises(nk.ConfigError, match=r"route 'pick' after 'nowhere'") as info:
        flow.check()
    assert info.value.option == "after"


def test_a_node_object_not_added_or_no_targets_is_refused_at_once() -> None:
    flow, first, _ = small_flow()

    @nk.node
    def stranger() -> None:
        return None

    with pytest.raises(nk.ConfigError, match="'stranger', which was not added"):
        flow.route(after=first, to=lambda state: stranger, targets=[stranger])
    with pytest.raises(nk.ConfigError, match="declare the nodes it can lead to"):
        flow.route(after=first, to=lambda state: "second")
    with pytest.raises(nk.ConfigError, match="to=fn"):
        flow.route(after=first, to="second", targets=["second"])  # type: ignore[arg-type]
    flow.route(after=first, to=lambda state: "second", targets=["second"], name="r")
    with pytest.raises(nk.ConfigError, match="already declared"):
        flow.route(after=first, to=lambda state: "second", targets=["second"], name="r")


@pytest.mark.parametrize("mode", MODES)
def test_a_target_outside_the_declared_ones_fails_the_run_naming_the_route(mode: str) -> None:
    flow, first, second = small_flow()

    @flow.node(output="c")
    def third() -> int:
        return 3

    flow.route(after=first, to=lambda state: third, targets=[second], name="pick")
    with pytest.raises(nk.FlowError) as info:
        run_flow(flow, mode, None)
    assert "route 'pick' returned" in str(info.value)
    assert "not among the route's targets ['second']" in str(info.value)
    assert info.value.failed == "first"


def test_plain_cycles_stay_config_errors_and_END_is_not_a_node_name() -> None:
    flow = nk.Flow("cycle")

    @flow.node(after="b", output="x")
    def a() -> int:
        return 1

    @flow.node(after=a, output="y")
    def b() -> int:
        return 2

    flow.route(after=a, to=lambda state: nk.END, targets=[nk.END])
    with pytest.raises(nk.ConfigError, match="dependency cycle"):
        flow.check()
    ends = nk.Flow("ends")
    ends.add(lambda: None, name=nk.END)
    ends.add(lambda: None, name="start")
    ends.route(after="start", to=lambda state: nk.END, targets=[nk.END])
    with pytest.raises(nk.ConfigError, match="may not be named '__end__'"):
        ends.check()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_steps_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(nk.ConfigError, match="max_steps") as info:
        nk.Flow("bad", max_steps=bad)
    assert info.value.option == "max_steps"


def test_a_flow_without_routes_keeps_the_plain_drivers() -> None:
    flow, _, _ = small_flow()
    plan = flow._compile()
    assert plan.routes is None
    assert plan.subflows is False
    assert flow.run() == {"a": 1, "b": 2}
    assert nk.END == nk.flow.END == "__end__"


def test_a_routed_dict_flow_binds_fields_written_upstream_of_the_route(shop: Shop) -> None:
    """In a dict flow, a target's parameter may come from the route's node (no output=)."""
    flow = nk.Flow("untyped")

    @flow.node
    def check(amount: int) -> dict[str, Any]:
        return {"error": "too small"} if amount < 1 else {"ok": True}

    @flow.node(output="notified")
    def notify(error: str) -> str:
        shop.post("notices")
        return error

    flow.route(
        after=check,
        to=lambda state: notify if "error" in state else nk.END,
        targets=[notify, nk.END],
    )
    flow.check({"amount": 0})
    names = [event.name for event in flow.stream({"amount": 0}, run_id="streamed")]
    assert names.count("flow.routed") == 1
    assert names[-1] == "flow.finished"
    assert names.index("flow.routed") < names.index("flow.finished")
    assert shop.effects("notices") == {"streamed": 1}


async def test_a_routed_async_run_runs_sync_nodes_on_the_flows_executor() -> None:
    threads: list[str] = []
    with ThreadPoolExecutor(2, thread_name_prefix="routed-pool") as pool:
        flow = nk.Flow("pooled", executor=pool)

        @flow.node(output="n")
        def first() -> int:
            threads.append(threading.current_thread().name)
            return 1

        @flow.node(output="m")
        def second(n: int) -> int:
            threads.append(threading.current_thread().name)
            return n + 1

        flow.route(after=first, to=lambda state: second, targets=[second])
        assert await flow.arun() == {"n": 1, "m": 2}
    assert len(threads) == 2
    assert all(name.startswith("routed-pool") for name in threads)
