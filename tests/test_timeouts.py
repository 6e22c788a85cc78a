"""Timeouts: async attempts are cancelled, sync attempts abandoned, deadlines bound retries."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest

import nodekit as nk
from nodekit.testing import Flaky, capture_events, instant

READ = nk.Effect.READ


def test_node_timeout_is_a_timeout_error_classified_ambiguous() -> None:
    error = nk.NodeTimeout("too slow", node="n", timeout=1.0)
    assert isinstance(error, TimeoutError)
    assert isinstance(error, nk.NodekitError)
    assert nk.classify(error) == "ambiguous"
    assert nk.classify(nk.NodeTimeout("abandoned", abandoned=True)) == "ambiguous"


async def test_async_attempt_is_cancelled_at_its_deadline() -> None:
    seen: list[str] = []

    @nk.node(timeout=0.05, effect=READ)
    async def slow() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "late"

    started = time.monotonic()
    with pytest.raises(nk.NodeTimeout) as info:
        await slow()
    assert time.monotonic() - started < 0.5
    assert seen == ["cancelled"]
    assert info.value.abandoned is False
    assert info.value.timeout == pytest.approx(0.05)
    assert info.value.node == "test_async_attempt_is_cancelled_at_its_deadline.<locals>.slow"
    assert isinstance(info.value.__cause__, TimeoutError)


def test_sync_attempt_is_abandoned_at_its_deadline_and_keeps_running() -> None:
    finished = threading.Event()

    @nk.node(timeout=0.1, effect=READ)
    def slow() -> str:
        time.sleep(0.3)
        finished.set()
        return "late"

    started = time.monotonic()
    with pytest.raises(nk.NodeTimeout) as info:
        slow()
    elapsed = time.monotonic() - started
    assert 0.09 < elapsed < 0.1 + 0.5
    assert info.value.abandoned is True
    assert info.value.timeout == pytest.approx(0.1)
    assert not finished.is_set()
    assert finished.wait(2), "the abandoned attempt keeps running in its worker thread"


def test_sync_attempt_within_its_timeout_returns_its_result_and_errors() -> None:
    @nk.node(timeout=2, effect=READ)
    def quick(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 2

    assert quick(21) == 42
    with pytest.raises(ValueError, match="negative"):
        quick(-1)


async def test_async_attempt_within_its_timeout_returns_its_result_and_errors() -> None:
    @nk.node(timeout=2, effect=READ)
    async def quick(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 2

    assert await quick(21) == 42
    with pytest.raises(ValueError, match="negative"):
        await quick(-1)


async def test_a_timeout_error_raised_by_the_function_itself_is_not_a_node_timeout() -> None:
    @nk.node(timeout=2, effect=READ)
    async def own() -> None:
        raise TimeoutError("upstream said so")

    with pytest.raises(TimeoutError, match="upstream said so") as info:
        await own()
    assert not isinstance(info.value, nk.NodeTimeout)


def test_sync_timed_out_attempt_is_retried_for_a_read_node() -> None:
    calls: list[int] = []

    @nk.node(timeout=0.05, retry=nk.Retry(attempts=3, jitter=0), effect=READ)
    def sometimes_slow() -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.2)
        return "ok"

    with instant() as clock:
        assert sometimes_slow() == "ok"
    assert len(calls) == 2
    assert clock.sleeps == [0.1]


async def test_async_timed_out_attempt_is_retried_for_a_read_node() -> None:
    calls: list[int] = []

    @nk.node(timeout=0.05, retry=nk.Retry(attempts=3, jitter=0), effect=READ)
    async def sometimes_slow() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(1)
        return "ok"

    with instant() as clock:
        assert await sometimes_slow() == "ok"
    assert len(calls) == 2
    assert clock.sleeps == [0.1]


def test_sync_timed_out_write_is_not_retried() -> None:
    calls: list[int] = []

    @nk.node(timeout=0.05, retry=nk.Retry(attempts=3))
    def charge() -> None:
        calls.append(1)
        time.sleep(0.2)

    with instant(), pytest.raises(nk.UnsafeRetry) as info:
        charge()
    assert len(calls) == 1
    assert isinstance(info.value.__cause__, nk.NodeTimeout)
    assert info.value.__cause__.abandoned is True


async def test_async_timed_out_write_is_not_retried() -> None:
    calls: list[int] = []

    @nk.node(timeout=0.05, retry=nk.Retry(attempts=3))
    async def charge() -> None:
        calls.append(1)
        await asyncio.sleep(1)

    with instant(), pytest.raises(nk.UnsafeRetry) as info:
        await charge()
    assert len(calls) == 1
    assert isinstance(info.value.__cause__, nk.NodeTimeout)


def test_total_timeout_stops_retries_when_the_next_wait_does_not_fit() -> None:
    flaky = Flaky([TimeoutError("slow")], times=10)
    call = nk.node(
        retry=nk.Retry(attempts=10, initial=1, max_wait=1, jitter=0),
        timeout=nk.Timeout(total=0.5),
        effect=READ,
    )(flaky)
    with instant() as clock, pytest.raises(TimeoutError) as info:
        call()
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "(deadline:" in info.value.__notes__[-1]


async def test_total_timeout_stops_retries_when_the_next_wait_does_not_fit_async() -> None:
    flaky = Flaky([TimeoutError("slow")], times=10)
    call = nk.node(
        retry=nk.Retry(attempts=10, initial=1, max_wait=1, jitter=0),
        timeout=nk.Timeout(total=0.5),
        effect=READ,
    )(flaky.async_())
    with instant() as clock, pytest.raises(TimeoutError) as info:
        await call()
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "(deadline:" in info.value.__notes__[-1]


def test_total_timeout_bounds_all_attempts_together() -> None:
    calls: list[float] = []

    @nk.node(
        retry=nk.Retry(attempts=50, initial=0.001, jitter=0),
        timeout=nk.Timeout(attempt=0.1, total=0.2),
        effect=READ,
    )
    def failing() -> None:
        calls.append(time.monotonic())
        time.sleep(0.03)
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with instant(), pytest.raises((ConnectionRefusedError, nk.NodeTimeout)):
        failing()
    assert time.monotonic() - started < 0.2 + 0.5
    assert 2 <= len(calls) < 50


async def test_total_timeout_bounds_all_attempts_together_async() -> None:
    calls: list[float] = []

    @nk.node(
        retry=nk.Retry(attempts=50, initial=0.001, jitter=0),
        timeout=nk.Timeout(attempt=0.1, total=0.2),
        effect=READ,
    )
    async def failing() -> None:
        calls.append(time.monotonic())
        await asyncio.sleep(0.03)
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with instant(), pytest.raises((ConnectionRefusedError, nk.NodeTimeout)):
        await failing()
    assert time.monotonic() - started < 0.2 + 0.5
    assert 2 <= len(calls) < 50


def test_an_attempt_gets_only_what_is_left_of_the_total_budget() -> None:
    calls: list[int] = []

    @nk.node(
        retry=nk.Retry(attempts=3, initial=0.001, jitter=0),
        timeout=nk.Timeout(attempt=0.3, total=0.35),
        effect=READ,
    )
    def slow() -> None:
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.3)
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with instant(), pytest.raises(nk.NodeTimeout) as info:
        slow()
    assert time.monotonic() - started < 0.35 + 0.5
    assert len(calls) == 2
    assert info.value.timeout is not None
    assert info.value.timeout < 0.2


async def test_an_attempt_gets_only_what_is_left_of_the_total_budget_async() -> None:
    calls: list[int] = []

    @nk.node(
        retry=nk.Retry(attempts=3, initial=0.001, jitter=0),
        timeout=nk.Timeout(attempt=0.3, total=0.35),
        effect=READ,
    )
    async def slow() -> None:
        calls.append(1)
        await asyncio.sleep(0.2 if len(calls) == 1 else 1)
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with instant(), pytest.raises(nk.NodeTimeout) as info:
        await slow()
    assert time.monotonic() - started < 0.35 + 0.5
    assert len(calls) == 2
    assert info.value.timeout is not None
    assert info.value.timeout < 0.2


def test_timedelta_is_accepted_for_timeouts() -> None:
    @nk.node(timeout=timedelta(milliseconds=50), effect=READ)
    def slow() -> None:
        time.sleep(0.2)

    with pytest.raises(nk.NodeTimeout) as info:
        slow()
    assert info.value.timeout == pytest.approx(0.05)


async def test_timedelta_is_accepted_for_timeouts_async() -> None:
    @nk.node(timeout=nk.Timeout(attempt=timedelta(milliseconds=50)), effect=READ)
    async def slow() -> None:
        await asyncio.sleep(1)

    with pytest.raises(nk.NodeTimeout) as info:
        await slow()
    assert info.value.timeout == pytest.approx(0.05)


def test_timed_out_attempt_emits_timed_out_then_abandoned_finished_events() -> None:
    # a name of its own: abandoned attempts of other tests may still report in meanwhile
    @nk.node(timeout=0.05, effect=READ, name="slow-events-order")
    def slow() -> None:
        time.sleep(0.15)

    with capture_events() as captured:
        with pytest.raises(nk.NodeTimeout):
            slow()
        deadline = time.monotonic() + 2
        while (
            not captured.for_node("slow-events-order").named("node.abandoned_finished")
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
    events = captured.for_node("slow-events-order")
    assert events.names() == [
        "node.started",
        "node.timed_out",
        "node.failed",
        "node.abandoned_finished",
    ]
    timed_out = events.named("node.timed_out")[0]
    assert timed_out["abandoned"] is True
    assert timed_out["timeout"] == pytest.approx(0.05)
    assert events.named("node.abandoned_finished")[0]["ok"] is True


def test_a_nested_node_whose_deadline_already_passed_does_not_run() -> None:
    calls: list[int] = []

    @nk.node(timeout=1, name="child")
    def child() -> None:
        calls.append(1)

    @nk.node
    def parent() -> None:
        nk.context().deadline = time.monotonic() - 1
        child()

    with pytest.raises(nk.NodeTimeout, match="before attempt 1 could start") as info:
        parent()
    assert calls == []
    assert nk.classify(info.value) == "safe", "nothing ran, so the timeout is safe"


async def test_a_nested_node_whose_deadline_already_passed_does_not_run_async() -> None:
    calls: list[int] = []

    @nk.node(timeout=1, name="child")
    async def child() -> None:
        calls.append(1)

    @nk.node
    async def parent() -> None:
        nk.context().deadline = time.monotonic() - 1
        await child()

    with pytest.raises(nk.NodeTimeout, match="before attempt 1 could start") as info:
        await parent()
    assert calls == []
    assert nk.classify(info.value) == "safe"
