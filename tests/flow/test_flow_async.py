"""Flows in async mode: concurrency, cancellation, streaming, merging, amap (twins of test_flow)."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ValidationError

import nodekit as nk


class Order(BaseModel):
    amount: int = 0
    total: int = 0
    notes: Annotated[list[str], operator.add] = []


# ---------------------------------------------------------------------------- build-time checks


async def test_config_errors_are_raised_before_any_node_runs() -> None:
    ran: list[str] = []
    flow = nk.Flow("typo", state=Order)
    flow.add(lambda amount: ran.append("a"), name="a")
    flow.add(lambda amont: ran.append("b"), name="b")
    with pytest.raises(nk.ConfigError, match="'amont'") as info:
        await flow.arun(Order())
    assert info.value.node == "b"
    cyclic = nk.Flow("cyclic")
    cyclic.add(lambda: None, name="a", after="b")
    cyclic.add(lambda: None, name="b", after="a")
    with pytest.raises(nk.ConfigError, match="cycle"):
        await cyclic.arun({})
    assert ran == []


async def test_unordered_nodes_writing_one_field_fail_the_async_flow() -> None:
    flow = nk.Flow("runtime-race")
    flow.add(lambda: {"v": 1}, name="a")
    flow.add(lambda: {"v": 2}, name="b")
    with pytest.raises(nk.FlowError, match="'v'") as info:
        await flow.arun({})
    assert isinstance(info.value.__cause__, nk.ConfigError)


# ---------------------------------------------------------------------------- binding and state


async def test_async_binding_of_state_fields_resources_and_defaults() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def session() -> AsyncIterator[str]:
        log.append("open")
        yield "sess"
        log.append("close")

    flow = nk.Flow("bind", state=Order, resources={"http": session})

    @flow.node
    async def look(state: Order, amount: int, http: str, missing: int = 7) -> dict[str, Any]:
        log.append(f"{state.amount} {amount} {http} {missing}")
        return {"total": amount * 2}

    out = await flow.arun({"amount": 5})
    assert out == Order(amount=5, total=10)
    assert log == ["open", "5 5 sess 7", "close"]


async def test_sync_runs_enter_async_flow_resources_on_their_threads_loop() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def session() -> AsyncIterator[str]:
        log.append("open")
        yield "sess"
        log.append("close")

    flow = nk.Flow("sync-async-resource", resources={"http": session})
    flow.add(lambda http: {"http": http}, name="a")
    assert await asyncio.to_thread(flow.run, {}) == {"http": "sess"}
    assert log == ["open", "close"]


async def test_async_updates_from_dicts_models_outputs_and_none() -> None:
    flow = nk.Flow("model", state=Order)

    @flow.node
    async def price(amount: int) -> dict[str, Any]:
        return {"total": str(amount * 2)}

    @flow.node(after=price)
    def note(total: int) -> Order:
        return Order(notes=[f"total {total}"])

    @flow.node(after=price, output="amount")
    async def same(amount: int) -> int:
        return amount

    flow.add(lambda: None, name="nothing")
    out = await flow.arun({"amount": "21"})
    assert out == Order(amount=21, total=42, notes=["total 42"])
    with pytest.raises(ValidationError):
        await flow.arun({"amount": "many"})


async def test_an_invalid_async_update_changes_nothing() -> None:
    flow = nk.Flow("invalid", state=Order)
    flow.add(lambda amount: {"total": amount}, name="ok")

    @flow.node(after="ok")
    async def bad() -> dict[str, Any]:
        return {"total": "lots", "amount": 9}

    with pytest.raises(nk.FlowError, match=r"'bad'.*'total'") as info:
        await flow.arun({"amount": 3})
    assert info.value.state == Order(amount=3, total=3)
    assert info.value.field == "total"
    assert info.value.completed == ("ok",)


async def test_async_flow_error_carries_its_context() -> None:
    boom = RuntimeError("declined")
    flow = nk.Flow("fail")
    flow.add(lambda: {"a": 1}, name="a")

    @flow.node(after="a")
    async def charge() -> None:
        raise boom

    with pytest.raises(nk.FlowError) as info:
        await flow.arun({}, run_id="run-7")
    error = info.value
    assert (error.state, error.completed, error.failed, error.run_id) == (
        {"a": 1},
        ("a",),
        "charge",
        "run-7",
    )
    assert error.__cause__ is boom


async def test_async_nodes_see_the_run_id_in_tasks_and_threads() -> None:
    seen: list[str] = []
    flow = nk.Flow("ids")
    flow.add(lambda: seen.append(nk.context().run_id), name="in_thread")

    @flow.node
    async def in_task() -> None:
        seen.append(nk.context().run_id)

    await flow.arun({}, run_id="r-9")
    assert seen == ["r-9", "r-9"]


# ---------------------------------------------------------------------------- concurrency


async def test_fifty_independent_async_nodes_run_concurrently() -> None:
    flow = nk.Flow("wide")
    for i in range(50):

        async def nap(i: int = i) -> dict[str, int]:
            await asyncio.sleep(0.1)
            return {f"n{i}": i}

        flow.add(nap, name=f"n{i}")
    started = time.perf_counter()
    out = await flow.arun({})
    took = time.perf_counter() - started
    assert len(out) == 50
    assert took < 0.6, took


async def test_blocking_sync_nodes_run_in_threads_and_the_loop_keeps_ticking() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    def blocking(field: str) -> dict[str, int]:
        time.sleep(0.3)
        return {field: threading.get_ident()}

    flow = nk.Flow("blocking")
    flow.add(lambda: blocking("a"), name="a")
    flow.add(lambda: blocking("b"), name="b")
    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    out = await flow.arun({})
    took = time.perf_counter() - started
    task.cancel()
    assert took < 0.5, took
    assert out["a"] != out["b"] != threading.get_ident()
    assert ticks >= 10  # about 30 in 0.3 s: the loop was never blocked


async def test_max_concurrency_bounds_the_running_nodes() -> None:
    active = peak = 0
    flow = nk.Flow("bounded", max_concurrency=3)
    for i in range(9):

        async def work(i: int = i) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1

        flow.add(work, name=f"w{i}")
    await flow.arun({})
    assert peak == 3


async def test_a_dependant_starts_as_soon_as_its_dependencies_finish() -> None:
    times: dict[str, float] = {}
    flow = nk.Flow("eager")

    @flow.node
    async def fast() -> None:
        await asyncio.sleep(0.01)

    @flow.node
    async def slow() -> None:
        await asyncio.sleep(0.2)

    @flow.node(after=fast)
    async def next_to_fast() -> None:
        times["next"] = time.perf_counter()

    started = time.perf_counter()
    await flow.arun({})
    assert times["next"] - started < 0.15


async def test_on_error_cancel_cancels_running_siblings() -> None:
    cancelled: list[str] = []
    flow = nk.Flow("cancel", on_error="cancel")

    @flow.node
    async def slow() -> dict[str, int]:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return {"slow": 1}

    @flow.node
    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("nope")

    flow.add(lambda: {"after": 1}, name="after_slow", after=slow)
    started = time.perf_counter()
    with pytest.raises(nk.FlowError) as info:
        await flow.arun({})
    assert time.perf_counter() - started < 0.5
    assert cancelled == ["slow"]
    assert info.value.failed == "failing"
    assert info.value.state == {}
    assert info.value.completed == ()


async def test_on_error_finish_lets_running_siblings_finish_and_keeps_their_updates() -> None:
    flow = nk.Flow("finish", on_error="finish")

    @flow.node
    async def slow() -> dict[str, int]:
        await asyncio.sleep(0.1)
        return {"slow": 1}

    @flow.node
    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("nope")

    flow.add(lambda: {"after": 1}, name="after_slow", after=slow)
    with pytest.raises(nk.FlowError) as info:
        await flow.arun({})
    assert info.value.state == {"slow": 1}  # applied; its dependant did not start
    assert info.value.completed == ("slow",)
    assert info.value.failed == "failing"


async def test_cancelling_arun_cancels_its_nodes() -> None:
    cancelled: list[str] = []
    flow = nk.Flow("outer-cancel")
    for name in ("a", "b"):

        async def slow(name: str = name) -> None:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        flow.add(slow, name=name)
    task = asyncio.create_task(flow.arun({}))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["a", "b"]


async def test_parallel_reducer_updates_merge_in_declaration_order() -> None:
    flow = nk.Flow("merge", state=Order)

    @flow.node
    async def first() -> dict[str, Any]:
        await asyncio.sleep(0.05)  # finishes last
        return {"notes": ["first"]}

    @flow.node
    async def second() -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"notes": ["second"]}

    @flow.node
    async def third() -> dict[str, Any]:
        return {"notes": ["third"]}

    out = await flow.arun(Order())
    assert out.notes == ["first", "second", "third"]
    assert (await flow.arun(Order())).notes == (await asyncio.to_thread(flow.run, Order())).notes


# ---------------------------------------------------------------------------- streaming


async def test_astream_yields_the_runs_events() -> None:
    flow = nk.Flow("astreamed")
    flow.add(lambda: {"a": 1}, name="a")

    @flow.node(after="a")
    async def b(a: int) -> dict[str, int]:
        return {"b": a + 1}

    events = [event async for event in flow.astream({}, run_id="as-1")]
    flow_events = [(e.name, e.node) for e in events if e.name.startswith("flow.")]
    assert flow_events == [
        ("flow.started", None),
        ("flow.node_started", "a"),
        ("flow.node_finished", "a"),
        ("flow.node_started", "b"),
        ("flow.node_finished", "b"),
        ("flow.finished", None),
    ]
    assert ("node.succeeded", "a") in [(e.name, e.node) for e in events]  # from a worker thread
    assert {e.run_id for e in events} == {"as-1"}
    assert events[-1]["state"] == {"a": 1, "b": 2}


async def test_astream_ends_with_flow_failed_then_raises() -> None:
    flow = nk.Flow("astream-fail")
    flow.add(lambda: 1 / 0, name="a")
    seen: list[str] = []

    async def consume() -> None:
        async for event in flow.astream({}):
            seen.append(event.name)

    with pytest.raises(nk.FlowError):
        await consume()
    assert seen[-1] == "flow.failed"


async def test_astream_closed_early_cancels_the_run() -> None:
    cancelled: list[str] = []
    flow = nk.Flow("astream-early")
    flow.add(lambda: None, name="a")

    @flow.node(after="a")
    async def slow() -> None:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    stream = flow.astream({})
    async for event in stream:
        if event.name == "flow.node_started" and event.node == "slow":
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert cancelled == ["slow"]


# ---------------------------------------------------------------------------- amap


async def test_amap_returns_results_in_input_order_with_failures_beside_them() -> None:
    @nk.node(name="ainvert")
    async def invert(x: int) -> float:
        await asyncio.sleep(0.001 * (5 - x))
        return 1 / x

    result = await invert.amap([1, 2, 0, 4], concurrency=2)
    assert result.results == (1.0, 0.5, None, 0.25)
    assert isinstance(result.errors[2], ZeroDivisionError)
    with pytest.raises(ExceptionGroup):
        result.unwrap()


async def test_amap_bounds_concurrency_and_runs_sync_nodes_in_threads() -> None:
    active = peak = 0
    lock = threading.Lock()

    @nk.node(name="blocking")
    def blocking(x: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return x * 2

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    result = await blocking.amap(range(6), concurrency=3)
    task.cancel()
    assert result.unwrap() == [0, 2, 4, 6, 8, 10]
    assert peak == 3
    assert ticks >= 3


async def test_amap_of_many_async_items_runs_them_concurrently() -> None:
    @nk.node(name="nap")
    async def nap(x: int) -> int:
        await asyncio.sleep(0.1)
        return x

    started = time.perf_counter()
    assert (await nap.amap(range(100))).unwrap() == list(range(100))
    assert time.perf_counter() - started < 0.6
