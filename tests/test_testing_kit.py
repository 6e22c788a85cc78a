"""The test kit: fakes, instant waits, event capture and the pytest plugin's fixtures."""

from __future__ import annotations

import inspect
import threading
import time
from importlib.metadata import entry_points

import pytest

import nodekit as nk
import nodekit.testing
from nodekit._runtime import RUNTIME
from nodekit.testing import Events, Flaky, Instant, capture_events, instant

RETRY = nk.Retry(attempts=3, initial=1, multiplier=3, jitter=0)

# ---------------------------------------------------------------------------- Flaky


def test_flaky_raises_its_errors_in_turn_then_returns() -> None:
    instance = ConnectionResetError("same object")
    flaky = Flaky([instance, TimeoutError], result="done")
    with pytest.raises(ConnectionResetError) as first:
        flaky(1, key="a")
    assert first.value is instance
    with pytest.raises(TimeoutError):
        flaky(2)
    assert flaky(3) == "done"
    assert flaky() == "done"
    assert flaky.calls == 4
    assert flaky.failures == 2
    assert flaky.args[0] == ((1,), {"key": "a"})
    assert flaky.args[2] == ((3,), {})


def test_flaky_raises_a_new_instance_for_an_exception_class() -> None:
    flaky = Flaky([KeyError, KeyError])
    errors = []
    for _ in range(2):
        with pytest.raises(KeyError) as info:
            flaky()
        errors.append(info.value)
    assert errors[0] is not errors[1]


def test_flaky_times_repeats_one_error() -> None:
    flaky = Flaky([ConnectionRefusedError], times=3, result=1)
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            flaky()
    assert flaky() == 1
    with pytest.raises(ValueError, match="exactly one error"):
        Flaky([KeyError, ValueError], times=2)


def test_flaky_callable_result_is_called_with_the_arguments() -> None:
    flaky = Flaky(result=lambda x, y=0: x + y)
    assert flaky(2, y=3) == 5


async def test_flaky_async_shares_the_script_and_counters() -> None:
    flaky = Flaky([TimeoutError], result="ok")
    call = flaky.async_()
    assert inspect.iscoroutinefunction(call)
    with pytest.raises(TimeoutError):
        await call()
    assert flaky() == "ok"
    assert await call() == "ok"
    assert flaky.calls == 3


def test_flaky_drives_a_node_through_its_retries() -> None:
    flaky = Flaky([ConnectionRefusedError], times=2, result="ok")
    with instant():
        assert nk.node(retry=RETRY)(flaky)() == "ok"
    assert flaky.calls == 3


# ---------------------------------------------------------------------------- instant


def test_instant_records_the_requested_waits_without_sleeping() -> None:
    call = nk.node(retry=RETRY)(Flaky([ConnectionRefusedError], times=2, result="ok"))
    started = time.monotonic()
    with instant() as clock:
        assert call() == "ok"
    assert time.monotonic() - started < 0.5
    assert isinstance(clock, Instant)
    assert clock.sleeps == [1.0, 3.0]
    assert clock.total == 4.0


async def test_instant_records_the_requested_waits_without_sleeping_async() -> None:
    call = nk.node(retry=RETRY)(Flaky([ConnectionRefusedError], times=2, result="ok").async_())
    started = time.monotonic()
    with instant() as clock:
        assert await call() == "ok"
    assert time.monotonic() - started < 0.5
    assert clock.sleeps == [1.0, 3.0]


def test_instant_restores_real_waits_after_the_block() -> None:
    real = RUNTIME.sleep, RUNTIME.asleep

    def fail_inside() -> None:
        with instant():
            assert (RUNTIME.sleep, RUNTIME.asleep) != real
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert (RUNTIME.sleep, RUNTIME.asleep) == real


def test_instant_leaves_the_code_under_tests_own_sleeps_alone() -> None:
    with instant() as clock:
        started = time.monotonic()
        time.sleep(0.02)
        assert time.monotonic() - started >= 0.02
    assert clock.sleeps == []


# ---------------------------------------------------------------------------- capture_events


def test_capture_events_collects_only_inside_the_block() -> None:
    call = nk.node(name="n")(lambda: 1)
    call()
    with capture_events() as events:
        call()
    call()
    assert isinstance(events, Events)
    assert events.names() == ["node.started", "node.succeeded"]
    assert [event.node for event in events] == ["n", "n"]


def test_capture_events_filters_by_prefix_and_queries() -> None:
    one = nk.node(name="one")(lambda: 1)
    two = nk.node(name="two")(lambda: 2)
    with capture_events(prefix="node.succeeded") as events:
        one()
        two()
    assert events.names() == ["node.succeeded", "node.succeeded"]
    assert [event.node for event in events.named("node.succeeded")] == ["one", "two"]
    assert events.for_node("two").names() == ["node.succeeded"]
    assert events.named("node.started") == []


def test_capture_events_sees_events_from_other_threads() -> None:
    call = nk.node(name="threaded")(lambda: 1)
    with capture_events() as events:
        workers = [threading.Thread(target=call) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert len(events.named("node.succeeded")) == 4
    assert len({event.run_id for event in events}) == 4


def test_capture_events_nest_independently() -> None:
    call = nk.node(name="n")(lambda: 1)
    with capture_events() as outer:
        call()
        with capture_events() as inner:
            call()
    assert len(outer) == 4
    assert len(inner) == 2


def test_testing_reexports_override() -> None:
    assert nodekit.testing.override is nk.override


# ---------------------------------------------------------------------------- pytest plugin


def test_plugin_is_registered_through_the_pytest11_entry_point(
    request: pytest.FixtureRequest,
) -> None:
    (entry,) = [ep for ep in entry_points(group="pytest11") if ep.name == "nodekit"]
    assert entry.value == "nodekit.testing._plugin"
    assert request.config.pluginmanager.get_plugin("nodekit") is not None


def test_nk_instant_fixture_makes_waits_instant(nk_instant: Instant) -> None:
    call = nk.node(retry=RETRY)(Flaky([ConnectionRefusedError], times=2, result="ok"))
    assert call() == "ok"
    assert nk_instant.sleeps == [1.0, 3.0]


async def test_nk_instant_fixture_makes_waits_instant_async(nk_instant: Instant) -> None:
    call = nk.node(retry=RETRY)(Flaky([ConnectionRefusedError], result="ok").async_())
    assert await call() == "ok"
    assert nk_instant.sleeps == [1.0]


def test_nk_events_fixture_captures_the_tests_events(nk_events: Events) -> None:
    nk.node(name="fixture")(lambda: 1)()
    assert nk_events.names() == ["node.started", "node.succeeded"]
    assert nk_events[0].node == "fixture"


async def test_nk_events_fixture_captures_the_tests_events_async(nk_events: Events) -> None:
    async def work() -> int:
        return 1

    await nk.node(name="fixture")(work)()
    assert nk_events.names() == ["node.started", "node.succeeded"]
