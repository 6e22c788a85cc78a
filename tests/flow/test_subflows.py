"""Subflows: `flow.add(inner_flow, name=..., after=...)` runs a flow as one node, its state
mapped in and out by field name, durable under a child run id, its events nested."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.idempotency import RecordKey
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import APIRequest, APIResponse, LocalAPI, capture_events

MODES = ("sync", "async")


def run_flow(flow: nk.Flow[Any], mode: str, state: Any, **options: Any) -> Any:
    if mode == "sync":
        return flow.run(state, **options)
    return asyncio.run(flow.arun(state, **options))


class Bank:
    """A LocalAPI counting fee lookups and charges per run id (the inner flow's effects)."""

    client: httpx.Client

    def __init__(self) -> None:
        self.api = LocalAPI(routes={"POST /fees": self._effect, "POST /charges": self._effect})

    @staticmethod
    def _effect(request: APIRequest) -> APIResponse:
        return APIResponse(201, {}, effect=True, data={"run": request.json()["run"]})

    def post(self, route: str) -> None:
        self.client.post(f"/{route}", json={"run": nk.context().run_id}).raise_for_status()

    def effects(self, route: str) -> Counter[str]:
        return Counter(
            entry.data["run"] for entry in self.api.ledger.find(route=f"POST /{route}", effect=True)
        )


@pytest.fixture
def bank() -> Iterator[Bank]:
    bank = Bank()
    with bank.api as api, httpx.Client(base_url=api.url) as client:
        bank.client = client
        yield bank


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "journal.db")
    yield store
    store.close()


class Payment(TypedDict, total=False):
    amount: int
    fee: int
    total: int


class Order(BaseModel):
    order_id: str
    amount: int
    total: int = 0  # passed in (a field the inner state has too), and updated
    receipt: str | None = None


def payment(bank: Bank, fail: set[str], *, asynchronous: bool = False) -> nk.Flow[Payment]:
    """fee -> total: two keyed effects against the bank."""
    inner = nk.Flow("payment", Payment)

    if asynchronous:

        @inner.node
        async def fee(amount: int) -> Payment:
            await asyncio.to_thread(bank.post, "fees")
            return {"fee": max(1, amount // 10)}

    else:

        @inner.node
        def fee(amount: int) -> Payment:
            bank.post("fees")
            return {"fee": max(1, amount // 10)}

    @inner.node(after=fee)
    def total(amount: int, fee: int) -> Payment:
        if "total" in fail:
            raise RuntimeError("ledger offline")
        bank.post("charges")
        return {"total": amount + fee}

    return inner


def shop(inner: nk.Flow[Payment]) -> nk.Flow[Order]:
    outer = nk.Flow("shop", Order)

    @outer.node(output="amount")
    def price(amount: int) -> int:
        return amount * 2

    outer.add(inner, name="pay", after=price)

    @outer.node(after="pay", output="receipt")
    def receipt(order_id: str, total: int) -> str:
        return f"{order_id}: {total}"

    return outer


# ---------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inner_async", [False, True])
def test_the_inner_state_is_mapped_in_and_out_by_field_name(
    bank: Bank, mode: str, inner_async: bool
) -> None:
    seen: list[Any] = []
    inner = payment(bank, set(), asynchronous=inner_async)

    @inner.node(after="total")
    def look(state: Any) -> None:
        seen.append(dict(state))

    outer = shop(inner)
    out = run_flow(outer, mode, {"order_id": "o-1", "amount": 50}, run_id=f"map-{mode}")
    # in: only the fields the inner state has (amount), as the outer state stood
    assert seen == [{"amount": 100, "fee": 10, "total": 110}]
    # out: the fields it added or changed that the outer state has (total; fee is inner only)
    assert out == Order(order_id="o-1", amount=100, total=110, receipt="o-1: 110")
    child = f"map-{mode}/pay"
    assert bank.effects("charges") == {child: 1}


@pytest.mark.parametrize("mode", MODES)
def test_output_stores_the_whole_inner_state(bank: Bank, mode: str) -> None:
    outer = nk.Flow("wrap")
    outer.add(payment(bank, set()), name="pay", output="payment")
    out = run_flow(outer, mode, {"amount": 30, "unrelated": "x"})
    assert out == {"amount": 30, "unrelated": "x", "payment": {"amount": 30, "fee": 3, "total": 33}}


@pytest.mark.parametrize("mode", MODES)
def test_an_inner_failure_fails_the_outer_run_at_the_subflow_node(bank: Bank, mode: str) -> None:
    outer = shop(payment(bank, {"total"}))
    with pytest.raises(nk.FlowError) as info:
        run_flow(outer, mode, {"order_id": "o-2", "amount": 5}, run_id="fails")
    assert info.value.failed == "pay"
    assert info.value.completed == ("price",)
    inner_error = info.value.__cause__
    assert isinstance(inner_error, nk.FlowError)
    assert inner_error.failed == "total"
    assert inner_error.run_id == "fails/pay"
    assert inner_error.completed == ("fee",)


def test_a_flow_cannot_be_its_own_subflow() -> None:
    flow = nk.Flow("self")
    with pytest.raises(nk.ConfigError, match="cannot run itself"):
        flow.add(flow, name="again")


# ---------------------------------------------------------------------------- durable


@pytest.mark.parametrize("mode", MODES)
def test_a_durable_resume_replays_the_inner_nodes_under_the_child_run_id(
    bank: Bank, store: SQLiteStore, mode: str
) -> None:
    fail = {"total"}
    outer = shop(payment(bank, fail))
    run_id = f"durable-{mode}"
    child = f"{run_id}/pay"
    with pytest.raises(nk.FlowError):
        run_flow(outer, mode, {"order_id": "o-3", "amount": 20}, run_id=run_id, store=store)
    assert bank.effects("fees") == {child: 1}
    # the inner run journaled in the parent's store, under the child run id
    fee_key = RecordKey("flow:payment:fee", "", digest(canonical_json([child, "fee", 0])))
    assert store.get(fee_key) is not None
    fail.clear()
    with capture_events() as events:
        out = run_flow(outer, mode, {"order_id": "o-3", "amount": 20}, run_id=run_id, store=store)
    assert out.receipt == "o-3: 44"
    # the inner fee node was replayed, not run: one fee and one charge on the server
    assert bank.effects("fees") == {child: 1}
    assert bank.effects("charges") == {child: 1}
    skipped = [(e.run_id, e.node) for e in events.named("flow.node_skipped")]
    assert (run_id, "price") in skipped
    assert (child, "fee") in skipped
    # the completed run replays the subflow node whole: the inner run does not start
    with capture_events() as again:
        assert (
            run_flow(outer, mode, {"order_id": "o-3", "amount": 20}, run_id=run_id, store=store)
            == out
        )
    assert [e.run_id for e in again.named("flow.started")] == [run_id]


# ---------------------------------------------------------------------------- events


@pytest.mark.parametrize("mode", MODES)
def test_inner_events_carry_the_parent_flow_and_run_id(bank: Bank, mode: str) -> None:
    outer = shop(payment(bank, set()))
    with capture_events(prefix="flow.") as events:
        run_flow(outer, mode, {"order_id": "o-4", "amount": 1}, run_id="nest")
    inner = [e for e in events if e.run_id == "nest/pay"]
    assert [e.name for e in inner] == [
        "flow.started",
        "flow.node_started",
        "flow.node_finished",
        "flow.node_started",
        "flow.node_finished",
        "flow.finished",
    ]
    for event in inner:
        assert event.fields["flow"] == "payment"
        assert event.fields["parent_flow"] == "shop"
        assert event.fields["parent_run_id"] == "nest"
        assert event.fields["parent_node"] == "pay"
    outer_events = [e for e in events if e.run_id == "nest"]
    assert all("parent_run_id" not in e.fields for e in outer_events)
    # the inner run happens inside the outer node "pay"
    names = [(e.name, e.node, e.run_id) for e in events]
    start = names.index(("flow.node_started", "pay", "nest"))
    end = names.index(("flow.node_finished", "pay", "nest"))
    assert start < names.index(("flow.started", None, "nest/pay")) < end


# ---------------------------------------------------------------------------- in a loop


@pytest.mark.parametrize("mode", MODES)
def test_a_subflow_in_a_loop_runs_under_one_child_run_id_per_execution(
    store: SQLiteStore, mode: str
) -> None:
    inner = nk.Flow("step")

    @inner.node(output="count")
    def bump(count: int) -> int:
        return count + 1

    outer = nk.Flow("looper")

    @outer.node(output="count")
    def begin() -> int:
        return 0

    outer.add(inner, name="inc", after=begin)
    outer.route(
        after="inc",
        to=lambda state: "inc" if state["count"] < 3 else nk.END,
        targets=["inc", nk.END],
    )
    with capture_events(prefix="flow.started") as events:
        out = run_flow(outer, mode, None, run_id="L", store=store)
    assert out == {"count": 3}
    assert [e.run_id for e in events] == ["L", "L/inc", "L/inc#1", "L/inc#2"]
    # resumed, every execution is replayed from the parent's journal
    with capture_events(prefix="flow.started") as again:
        assert run_flow(outer, mode, None, run_id="L", store=store) == out
    assert [e.run_id for e in again] == ["L"]


def test_the_outer_stream_carries_the_inner_runs_events(bank: Bank) -> None:
    outer = shop(payment(bank, set()))
    events = list(outer.stream({"order_id": "o-5", "amount": 2}, run_id="s"))
    inner = [(e.name, e.node) for e in events if e.run_id == "s/pay" and e.name.startswith("flow.")]
    assert inner[0] == ("flow.started", None)
    assert ("flow.node_finished", "total") in inner
    assert events[-1].name == "flow.finished"
    assert events[-1].run_id == "s"
