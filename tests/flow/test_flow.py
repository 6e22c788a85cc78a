"""Flows in sync mode: build-time checks, binding, state, failures, streaming, map."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypedDict

import pytest
from pydantic import BaseModel, ValidationError

import nodekit as nk
from nodekit.testing import Flaky, instant


class Order(BaseModel):
    amount: int = 0
    currency: str = "EUR"
    total: int = 0
    notes: Annotated[list[str], operator.add] = []


class Doc(TypedDict):
    text: str
    words: int


# ---------------------------------------------------------------------------- build-time checks


def test_a_cycle_is_a_config_error_naming_the_nodes() -> None:
    flow = nk.Flow("cyclic")
    flow.add(lambda: None, name="a", after="c")
    flow.add(lambda: None, name="b", after="a")
    flow.add(lambda: None, name="c", after="b")
    with pytest.raises(nk.ConfigError, match="dependency cycle a -> b -> c -> a"):
        flow.run({})


def test_an_unknown_dependency_name_is_a_config_error_before_anything_runs() -> None:
    ran: list[str] = []
    flow = nk.Flow("unknown")
    flow.add(lambda: ran.append("a"), name="a")
    flow.add(lambda: ran.append("b"), name="b", after="nope")
    with pytest.raises(nk.ConfigError, match="'nope'") as info:
        flow.run({})
    assert info.value.node == "b"
    assert ran == []


def test_a_dependency_on_a_node_never_added_is_a_config_error_at_add() -> None:
    def stray() -> None: ...

    flow = nk.Flow("stray")
    with pytest.raises(nk.ConfigError, match="stray"):
        flow.add(lambda: None, name="a", after=stray)


def test_a_duplicate_name_is_a_config_error() -> None:
    def step() -> None: ...

    flow = nk.Flow("dup")
    flow.add(step)
    with pytest.raises(nk.ConfigError, match="already added") as info:
        flow.add(step)
    assert info.value.node == "step"
    flow.add(step, name="step_again")  # another name is fine


def test_a_parameter_matching_nothing_is_a_config_error_naming_node_and_parameter() -> None:
    ran: list[str] = []
    flow = nk.Flow("typo", state=Order)

    @flow.node
    def first(amount: int) -> None:
        ran.append("first")

    @flow.node(after=first)
    def price(amont: int) -> None:  # typo
        ran.append("price")

    with pytest.raises(nk.ConfigError, match="'amont'") as info:
        flow.run(Order())
    assert (info.value.node, info.value.option) == ("price", "amont")
    assert ran == []
    with pytest.raises(nk.ConfigError):
        flow.check()


def test_an_untyped_flow_checks_parameters_against_the_input_and_declared_outputs() -> None:
    flow = nk.Flow("untyped")
    flow.add(lambda x: x + 1, name="inc", output="y")
    flow.add(lambda y: {"z": y * 2}, name="dbl", after="inc")
    flow.check({"x": 1})
    assert flow.run({"x": 1}) == {"x": 1, "y": 2, "z": 4}
    with pytest.raises(nk.ConfigError, match="'x'"):
        flow.run({"w": 1})


def test_a_parameter_after_an_undeclared_writer_is_checked_when_the_node_runs() -> None:
    flow = nk.Flow("late")
    flow.add(lambda: {"rows": [1, 2]}, name="fetch")
    flow.add(lambda rows: {"n": len(rows)}, name="count", after="fetch")
    assert flow.run({}) == {"rows": [1, 2], "n": 2}
    flow2 = nk.Flow("late2")
    flow2.add(lambda: {"other": 1}, name="fetch")
    flow2.add(lambda rows: None, name="count", after="fetch")
    with pytest.raises(nk.FlowError, match="'rows'") as info:
        flow2.run({})
    assert info.value.failed == "count"
    assert info.value.field == "rows"


def test_two_unordered_nodes_declaring_one_output_is_a_config_error() -> None:
    flow = nk.Flow("race", state=Order)
    flow.add(lambda amount: 1, name="a", output="total")
    flow.add(lambda amount: 2, name="b", output="total")
    with pytest.raises(nk.ConfigError, match=r"'a' and 'b'.*'total'") as info:
        flow.check()
    assert info.value.option == "total"


def test_ordered_writers_and_reduced_fields_may_share_a_field() -> None:
    flow = nk.Flow("ordered", state=Order)
    flow.add(lambda amount: 1, name="a", output="total")
    flow.add(lambda total: total + 1, name="b", output="total", after="a")
    flow.add(lambda: ["x"], name="c", output="notes")
    flow.add(lambda: ["y"], name="d", output="notes")
    out = flow.run(Order())
    assert (out.total, out.notes) == (2, ["x", "y"])


def test_unordered_nodes_writing_one_field_at_run_time_fail_the_flow() -> None:
    flow = nk.Flow("runtime-race")
    flow.add(lambda: {"v": 1}, name="a")
    flow.add(lambda: {"v": 2}, name="b")
    with pytest.raises(nk.FlowError, match="'v'") as info:
        flow.run({})
    assert info.value.failed == "b"
    assert isinstance(info.value.__cause__, nk.ConfigError)
    assert info.value.state == {"v": 1}


def test_bad_flow_options_are_config_errors() -> None:
    with pytest.raises(nk.ConfigError, match="max_concurrency"):
        nk.Flow("x", max_concurrency=0)
    with pytest.raises(nk.ConfigError, match="on_error"):
        nk.Flow("x", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(nk.ConfigError, match="state"):
        nk.Flow("x", state=int)
    with pytest.raises(nk.ConfigError, match="resource"):
        nk.Flow("x", resources={"db": 3})  # type: ignore[dict-item]
    with pytest.raises(nk.ConfigError, match="reducers"):
        nk.Flow("x", state=Order, reducers={"nope": operator.add})
    flow = nk.Flow("x", state=Order)
    with pytest.raises(nk.ConfigError, match="output"):
        flow.add(lambda: 1, name="a", output="missing")
    with pytest.raises(nk.ConfigError, match="itself"):
        flow.add(lambda: 1, name="b", after="b")


# ---------------------------------------------------------------------------- binding


def test_parameters_bind_the_whole_state_fields_and_defaults() -> None:
    seen: dict[str, Any] = {}
    flow = nk.Flow("bind", state=Order)

    @flow.node
    def look(state: Order, amount: int, currency: str, missing: int = 7) -> None:
        seen.update(state=state, amount=amount, currency=currency, missing=missing)

    flow.run({"amount": 5})
    assert seen == {"state": Order(amount=5), "amount": 5, "currency": "EUR", "missing": 7}


def test_resources_bind_by_name_from_use_and_from_flow_factories() -> None:
    log: list[str] = []

    @contextmanager
    def database() -> Iterator[str]:
        log.append("open")
        yield "db-conn"
        log.append("close")

    flow = nk.Flow("res", resources={"db": database})

    @flow.node
    def save(db: str, http: str, *, cache: str = nk.resource()) -> dict[str, str]:
        log.append(f"save {db} {http} {cache}")
        return {"saved": db}

    with nk.use(http="client", cache="lru"):
        assert flow.run({}) == {"saved": "db-conn"}
    assert log == ["open", "save db-conn client lru", "close"]
    with pytest.raises(nk.ConfigError, match=r"not provided|matches no"):
        flow.run({})  # http and cache are not provided outside the block
    assert len(log) == 3  # checked before the flow's own resources were opened


def test_override_wins_over_the_flow_resources() -> None:
    flow = nk.Flow("over", resources={"db": lambda: "real"})
    flow.add(lambda db: {"db": db}, name="use_db")
    with nk.override(db="fake"):
        assert flow.run({}) == {"db": "fake"}


def test_positional_only_parameters_are_bound() -> None:
    flow = nk.Flow("posonly", state=Doc)

    def count(text: str, /) -> int:
        return len(text.split())

    flow.add(count, output="words")
    assert flow.run({"text": "a b c", "words": 0}) == {"text": "a b c", "words": 3}


# ---------------------------------------------------------------------------- state and updates


def test_dict_state_updates_from_dicts_outputs_and_none() -> None:
    flow = nk.Flow("dicts")
    flow.add(lambda x: {"y": x + 1}, name="a")
    flow.add(lambda y: y * 10, name="b", after="a", output="z")
    flow.add(lambda: None, name="c", after="b")
    state = {"x": 1}
    assert flow.run(state) == {"x": 1, "y": 2, "z": 20}
    assert state == {"x": 1}  # the input is never mutated


def test_pydantic_state_is_validated_in_and_after_every_update() -> None:
    flow = nk.Flow("model", state=Order)

    @flow.node
    def price(amount: int) -> dict[str, Any]:
        return {"total": str(amount * 2)}  # coerced by validation

    @flow.node(after=price)
    def note(total: int) -> Order:
        return Order(notes=[f"total {total}"])  # a model: only its set fields apply

    out = flow.run({"amount": "21"})
    assert isinstance(out, Order)
    assert out == Order(amount=21, total=42, notes=["total 42"])
    with pytest.raises(ValidationError):
        flow.run({"amount": "many"})


def test_typeddict_state_is_validated_field_by_field() -> None:
    flow = nk.Flow("typed", state=Doc)
    flow.add(lambda text: str(len(text.split())), name="count", output="words")
    assert flow.run({"text": "a b", "words": 0}) == {"text": "a b", "words": 2}
    with pytest.raises(nk.ConfigError, match="text"):
        flow.run({"words": 0})


def test_an_invalid_update_fails_naming_node_and_field_and_changes_nothing() -> None:
    flow = nk.Flow("invalid", state=Order)
    flow.add(lambda amount: {"total": amount}, name="ok")
    flow.add(lambda: {"total": "lots", "currency": "USD"}, name="bad", after="ok")
    flow.add(lambda: {"currency": "GBP"}, name="never", after="bad")
    with pytest.raises(nk.FlowError, match=r"'bad'.*'total'") as info:
        flow.run({"amount": 3})
    error = info.value
    assert error.failed == "bad"
    assert error.field == "total"
    assert error.state == Order(amount=3, total=3)  # neither total nor currency changed
    assert error.completed == ("ok",)
    assert isinstance(error.__cause__, ValidationError)


def test_an_update_of_an_unknown_field_is_invalid() -> None:
    flow = nk.Flow("unknown-field", state=Order)
    flow.add(lambda: {"colour": "red"}, name="paint")
    with pytest.raises(nk.FlowError, match="'colour'") as info:
        flow.run({})
    assert info.value.field == "colour"


def test_a_node_returning_a_plain_value_without_output_fails_the_flow() -> None:
    flow = nk.Flow("plain")
    flow.add(lambda: 42, name="answer")
    with pytest.raises(nk.FlowError, match="output=") as info:
        flow.run({})
    assert isinstance(info.value.__cause__, TypeError)


def test_a_node_sees_the_state_as_a_read_only_mapping() -> None:
    flow = nk.Flow("readonly")

    @flow.node
    def meddle(state: Any) -> None:
        state["x"] = 2

    with pytest.raises(nk.FlowError) as info:
        flow.run({"x": 1})
    assert isinstance(info.value.__cause__, TypeError)
    assert info.value.state == {"x": 1}


# ---------------------------------------------------------------------------- failures


def test_flow_error_carries_state_completed_failed_run_id_and_the_cause() -> None:
    boom = RuntimeError("card declined")
    flow = nk.Flow("fail")
    flow.add(lambda: {"a": 1}, name="a")
    flow.add(lambda: {"b": 2}, name="b", after="a")

    @flow.node(after="b")
    def charge() -> None:
        raise boom

    flow.add(lambda: {"d": 4}, name="d", after="charge")
    with pytest.raises(nk.FlowError) as info:
        flow.run({}, run_id="run-42")
    error = info.value
    assert error.state == {"a": 1, "b": 2}
    assert error.completed == ("a", "b")
    assert error.failed == error.node == "charge"
    assert error.run_id == "run-42"
    assert error.__cause__ is boom
    assert "card declined" in str(error)


def test_node_retries_happen_inside_the_flow_node() -> None:
    flaky = Flaky([ConnectionError("reset")], result={"ok": True})
    flow = nk.Flow("retry")
    flow.add(nk.node(name="call", retry=nk.Retry(attempts=2), effect=nk.Effect.READ)(flaky))
    with instant():
        assert flow.run({}) == {"ok": True}
    assert flaky.calls == 2


# ---------------------------------------------------------------------------- run id, async nodes


def test_nodes_see_the_flows_run_id() -> None:
    seen: list[str] = []
    flow = nk.Flow("ids")

    @flow.node
    def sync_node() -> None:
        seen.append(nk.context().run_id)

    @flow.node(after=sync_node)
    async def async_node() -> None:
        seen.append(nk.context().run_id)

    flow.run({}, run_id="r-1")
    assert seen == ["r-1", "r-1"]


def test_async_nodes_run_on_a_private_loop_in_sync_mode() -> None:
    flow = nk.Flow("mixed")

    @flow.node
    async def fetch(x: int) -> dict[str, int]:
        await asyncio.sleep(0.001)
        return {"y": x + 1}

    flow.add(lambda y: {"z": y * 2}, name="double", after=fetch)
    assert flow.run({"x": 1}) == {"x": 1, "y": 2, "z": 4}


async def test_a_sync_run_works_from_a_thread_whose_loop_is_running() -> None:
    flow = nk.Flow("in-loop")

    @flow.node
    async def fetch(x: int) -> dict[str, int]:
        await asyncio.sleep(0.001)
        return {"y": x + 1, "thread": threading.get_ident() != main}

    main = threading.get_ident()
    asyncio.get_running_loop()  # a loop runs in this thread
    assert flow.run({"x": 1}) == {"x": 1, "y": 2, "thread": True}


def test_sync_mode_runs_in_dependency_then_declaration_order() -> None:
    order: list[str] = []
    flow = nk.Flow("order")
    flow.add(lambda: order.append("c"), name="c", after="b")
    flow.add(lambda: order.append("a"), name="a")
    flow.add(lambda: order.append("b"), name="b")
    flow.add(lambda: order.append("d"), name="d")
    flow.run({})
    assert order == ["a", "b", "c", "d"]


# ---------------------------------------------------------------------------- streaming


def test_stream_yields_the_runs_events_in_order_as_it_runs() -> None:
    ran: list[str] = []
    flow = nk.Flow("streamed")

    def step(name: str, value: int) -> dict[str, int]:
        ran.append(name)
        return {name: value}

    flow.add(lambda: step("a", 1), name="a")
    flow.add(lambda a: step("b", a + 1), name="b", after="a")
    events = flow.stream({}, run_id="s-1")
    assert ran == []  # nothing runs before iteration
    first = next(events)
    assert first.name == "flow.started"
    assert first["flow"] == "streamed"
    rest = list(events)
    names = [(e.name, e.node) for e in rest]
    assert [n for n in names if n[0].startswith("flow.")] == [
        ("flow.node_started", "a"),
        ("flow.node_finished", "a"),
        ("flow.node_started", "b"),
        ("flow.node_finished", "b"),
        ("flow.finished", None),
    ]
    assert ("node.succeeded", "a") in names
    assert all(e.run_id == "s-1" for e in [first, *rest])
    assert rest[-1]["state"] == {"a": 1, "b": 2}
    assert rest[-1]["completed"] == ("a", "b")


def test_stream_ends_with_flow_failed_then_raises() -> None:
    flow = nk.Flow("stream-fail")
    flow.add(lambda: {"a": 1}, name="a")
    flow.add(lambda: 1 / 0, name="b", after="a")
    seen: list[str] = []

    def consume() -> None:
        for event in flow.stream({}):
            seen.append(event.name)

    with pytest.raises(nk.FlowError) as info:
        consume()
    assert seen[-1] == "flow.failed"
    assert info.value.failed == "b"


def test_stream_keeps_the_run_id_out_of_the_consumers_context() -> None:
    flow = nk.Flow("ctx")
    flow.add(lambda: None, name="a")
    for _ in flow.stream({}, run_id="inner"):
        assert nk._context._RUN_ID.get() is None


def test_stream_closed_early_stops_the_run() -> None:
    ran: list[str] = []
    flow = nk.Flow("early")
    flow.add(lambda: ran.append("a"), name="a")
    flow.add(lambda: ran.append("b"), name="b", after="a")
    events = flow.stream({})
    for event in events:
        if event.name == "flow.node_finished":
            break
    events.close()  # type: ignore[attr-defined]
    assert ran == ["a"]


def test_other_runs_events_are_not_streamed() -> None:
    inner = nk.Flow("inner")
    inner.add(lambda: None, name="x")
    outer = nk.Flow("outer")

    @outer.node
    def run_other() -> None:
        inner.run({}, run_id="other")

    names = [(e.name, e.run_id) for e in outer.stream({}, run_id="mine")]
    assert all(run_id == "mine" for _, run_id in names)


# ---------------------------------------------------------------------------- reducers


def test_reducers_from_annotations_and_from_the_flow() -> None:
    flow = nk.Flow("reduce", reducers={"count": operator.add})
    flow.add(lambda: {"count": 1}, name="a")
    flow.add(lambda: {"count": 2}, name="b")
    assert flow.run({"count": 10}) == {"count": 13}


# ---------------------------------------------------------------------------- map


def test_map_returns_results_in_input_order_with_failures_beside_them() -> None:
    @nk.node(name="invert", effect=nk.Effect.NONE)
    def invert(x: int) -> float:
        time.sleep(0.001 * (5 - x % 5))
        return 1 / x

    result = invert.map([1, 2, 0, 4], concurrency=3)
    assert result.results == (1.0, 0.5, None, 0.25)
    assert list(result.errors) == [2]
    assert isinstance(result.errors[2], ZeroDivisionError)
    assert not result.ok
    assert len(result) == 4
    with pytest.raises(ExceptionGroup, match="1 of 4 items"):
        result.unwrap()
    assert invert.map([1, 2]).unwrap() == [1.0, 0.5]


def test_map_bounds_concurrency_with_threads() -> None:
    lock = threading.Lock()
    active = peak = 0

    @nk.node(name="slow")
    def slow(x: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return x

    assert slow.map(range(8), concurrency=3).unwrap() == list(range(8))
    assert peak == 3
    assert slow.map([], concurrency=2).results == ()
    with pytest.raises(nk.ConfigError, match="concurrency"):
        slow.map([1], concurrency=0)


def test_map_of_an_async_node_from_sync_code() -> None:
    @nk.node(name="twice")
    async def twice(x: int) -> int:
        await asyncio.sleep(0.001)
        return 2 * x

    assert twice.map([1, 2, 3], concurrency=2).unwrap() == [2, 4, 6]


def test_map_items_keep_the_callers_context() -> None:
    @nk.node(name="which")
    def which(x: int, *, tag: str = nk.resource()) -> str:
        return f"{tag}{x}"

    with nk.use(tag="t"):
        assert which.map([1, 2], concurrency=2).unwrap() == ["t1", "t2"]


def test_an_empty_flow_returns_its_input() -> None:
    assert nk.Flow("empty").run({"x": 1}) == {"x": 1}


def test_the_decorator_form_takes_node_options_and_returns_the_node() -> None:
    flaky = Flaky([ConnectionError("reset")], result=None)
    flow = nk.Flow("decorated", state=Doc)

    @flow.node(output="words", retry=nk.Retry(attempts=2), effect=nk.Effect.READ)
    def count(text: str) -> int:
        flaky()
        return len(text.split())

    assert count("a b") == 2  # still callable on its own
    assert flow.nodes == ("count",)
    flow.check()  # a TypedDict flow checks without an input
    with instant():
        assert flow.run({"text": "a b c", "words": 0})["words"] == 3
    assert flaky.calls == 3
