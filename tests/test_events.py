"""Events: one typed stream, in order, with their fields; metrics are a sink of it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

import nodekit as nk
from nodekit.testing import Flaky, capture_events, instant

RETRY = nk.Retry(attempts=3, initial=0.1, multiplier=2, jitter=0)


@pytest.fixture
def metrics() -> Iterator[nk.Metrics]:
    sink = nk.Metrics()
    remove = nk.add_sink(sink)
    try:
        yield sink
    finally:
        remove()


def test_success_emits_started_then_succeeded() -> None:
    @nk.node(name="ok", effect=nk.Effect.READ)
    def ok() -> int:
        return 1

    with capture_events() as events:
        assert ok() == 1
    assert events.names() == ["node.started", "node.succeeded"]
    started, succeeded = events
    assert started.node == succeeded.node == "ok"
    assert started.attempt == 1
    assert started["effect"] == "read"
    assert succeeded["attempts"] == 1
    assert succeeded.duration is not None
    assert succeeded.duration >= 0
    assert started.run_id is not None
    assert started.run_id == succeeded.run_id
    assert succeeded.error is None


async def test_success_emits_started_then_succeeded_async() -> None:
    @nk.node(name="ok")
    async def ok() -> int:
        await asyncio.sleep(0.01)
        return 1

    with capture_events() as events:
        assert await ok() == 1
    assert events.names() == ["node.started", "node.succeeded"]
    assert events[0]["effect"] == "write"
    assert events[1]["attempts"] == 1
    assert events[1].duration is not None
    assert events[1].duration >= 0.005


def check_retried(events: list[nk.Event], first: BaseException, second: BaseException) -> None:
    assert [event.name for event in events] == [
        "node.started",
        "node.retrying",
        "node.retrying",
        "node.succeeded",
    ]
    _, retry1, retry2, succeeded = events
    assert (retry1.attempt, retry1.wait, retry1.exc) == (1, 0.1, first)
    assert (retry2.attempt, retry2.wait, retry2.exc) == (2, 0.2, second)
    assert retry1.error == "ConnectionRefusedError: refused"
    assert retry1["kind"] == "safe"
    assert retry2["kind"] == "ambiguous"
    assert retry1["retry_after"] is None
    assert succeeded.attempt == 3
    assert succeeded["attempts"] == 3
    assert len({event.run_id for event in events}) == 1


def test_retries_emit_retrying_with_attempt_wait_and_error() -> None:
    first, second = ConnectionRefusedError("refused"), TimeoutError("slow")
    flaky = Flaky([first, second], result="ok")
    call = nk.node(retry=RETRY, effect=nk.Effect.READ, name="flaky")(flaky)
    with instant(), capture_events() as events:
        assert call() == "ok"
    check_retried(events, first, second)


async def test_retries_emit_retrying_with_attempt_wait_and_error_async() -> None:
    first, second = ConnectionRefusedError("refused"), TimeoutError("slow")
    flaky = Flaky([first, second], result="ok")
    call = nk.node(retry=RETRY, effect=nk.Effect.READ, name="flaky")(flaky.async_())
    with instant(), capture_events() as events:
        assert await call() == "ok"
    check_retried(events, first, second)


def test_giving_up_emits_failed_with_attempts_and_kind() -> None:
    call = nk.node(retry=RETRY, name="down")(Flaky([ConnectionRefusedError("refused")], times=5))
    with instant(), capture_events() as events, pytest.raises(ConnectionRefusedError):
        call()
    assert events.names() == ["node.started", "node.retrying", "node.retrying", "node.failed"]
    failed = events[-1]
    assert failed.attempt == 3
    assert failed["attempts"] == 3
    assert failed["kind"] == "safe"
    assert failed.error == "ConnectionRefusedError: refused"
    assert failed.duration is not None


async def test_giving_up_emits_failed_with_attempts_and_kind_async() -> None:
    flaky = Flaky([ValueError("bad")], times=5)
    call = nk.node(retry=RETRY, name="bad")(flaky.async_())
    with instant(), capture_events() as events, pytest.raises(ValueError, match="bad"):
        await call()
    assert events.names() == ["node.started", "node.failed"]
    assert events[-1]["attempts"] == 1
    assert events[-1]["kind"] == "permanent"


def test_unsafe_retry_emits_failed_marked_unsafe() -> None:
    call = nk.node(retry=RETRY, name="charge")(Flaky([ConnectionResetError("reset")]))
    with capture_events() as events, pytest.raises(nk.UnsafeRetry):
        call()
    assert events.names() == ["node.started", "node.failed"]
    assert events[-1]["unsafe"] is True
    assert events[-1]["kind"] == "ambiguous"
    assert events[-1].error == "ConnectionResetError: reset"


async def test_unsafe_retry_emits_failed_marked_unsafe_async() -> None:
    call = nk.node(retry=RETRY, name="charge")(Flaky([ConnectionResetError("reset")]).async_())
    with capture_events() as events, pytest.raises(nk.UnsafeRetry):
        await call()
    assert events.names() == ["node.started", "node.failed"]
    assert events[-1]["unsafe"] is True


def test_timeout_emits_timed_out_then_failed() -> None:
    release = threading.Event()

    @nk.node(timeout=0.05, name="slow")
    def slow() -> None:
        release.wait(1)

    with capture_events(prefix="node.") as events, pytest.raises(nk.NodeTimeout):
        slow()
    release.set()
    assert events.names()[:3] == ["node.started", "node.timed_out", "node.failed"]
    timed_out = events[1]
    assert timed_out["abandoned"] is True
    assert timed_out["timeout"] == pytest.approx(0.05)
    assert timed_out.error is not None
    assert timed_out.error.startswith("NodeTimeout:")


async def test_timeout_emits_timed_out_then_failed_async() -> None:
    @nk.node(timeout=0.05, name="slow")
    async def slow() -> None:
        await asyncio.sleep(1)

    with capture_events() as events, pytest.raises(nk.NodeTimeout):
        await slow()
    assert events.names() == ["node.started", "node.timed_out", "node.failed"]
    assert events[1]["abandoned"] is False
    assert events[2]["kind"] == "ambiguous"


def test_nested_nodes_share_the_run_id_and_nest_their_events() -> None:
    @nk.node(name="inner")
    def inner() -> int:
        return 1

    @nk.node(name="outer")
    def outer() -> int:
        return inner() + 1

    with capture_events() as events:
        assert outer() == 2
    assert [(event.name, event.node) for event in events] == [
        ("node.started", "outer"),
        ("node.started", "inner"),
        ("node.succeeded", "inner"),
        ("node.succeeded", "outer"),
    ]
    assert len({event.run_id for event in events}) == 1
    assert events.for_node("inner").names() == ["node.started", "node.succeeded"]


def test_events_carry_no_exception_in_their_loggable_form() -> None:
    call = nk.node(retry=RETRY, name="f")(Flaky([ConnectionRefusedError("refused")], result=1))
    with instant(), capture_events() as events:
        call()
    retrying = events.named("node.retrying")[0]
    loggable = retrying.as_dict()
    assert loggable["node"] == "f"
    assert loggable["attempt"] == 1
    assert loggable["wait"] == 0.1
    assert loggable["error"] == "ConnectionRefusedError: refused"
    assert "exc" not in loggable
    assert "exc=" not in repr(retrying)


def test_a_failing_sink_never_breaks_a_node() -> None:
    def broken(event: nk.Event) -> None:
        raise RuntimeError("sink down")

    remove = nk.add_sink(broken)
    try:
        assert nk.node(lambda: 5)() == 5
    finally:
        remove()


def test_remove_sink_stops_delivery() -> None:
    seen: list[str] = []

    def sink(event: nk.Event) -> None:
        seen.append(event.name)

    nk.add_sink(sink)
    nk.node(lambda: None)()
    nk.remove_sink(sink)
    nk.remove_sink(sink)  # removing twice is harmless
    nk.node(lambda: None)()
    assert seen == ["node.started", "node.succeeded"]


def test_no_event_is_built_on_the_success_path_when_nobody_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nodekit._events

    built: list[str] = []
    monkeypatch.setattr(nodekit._events, "Event", lambda name, **kw: built.append(name))
    assert nk.node(lambda: 1)() == 1
    assert built == []
    with capture_events():
        nk.node(lambda: 1)()
    assert built == ["node.started", "node.succeeded"]


def test_metrics_count_calls_successes_failures_retries_and_timeouts(
    metrics: nk.Metrics,
) -> None:
    ok = nk.node(retry=RETRY, name="ok")(Flaky([ConnectionRefusedError], result=1))
    down = nk.node(retry=RETRY, name="down")(Flaky([ConnectionRefusedError], times=9))

    @nk.node(timeout=0.05, name="slow", effect=nk.Effect.READ)
    def slow() -> None:
        time.sleep(0.15)

    with instant():
        ok()
        ok()
        with pytest.raises(ConnectionRefusedError):
            down()
        with pytest.raises(nk.NodeTimeout):
            slow()
    snapshot = metrics.snapshot()
    assert snapshot["ok"].calls == 2
    assert snapshot["ok"].successes == 2
    assert snapshot["ok"].retries == 1
    assert snapshot["ok"].failures == 0
    assert snapshot["down"].calls == 1
    assert snapshot["down"].failures == 1
    assert snapshot["down"].retries == 2
    assert snapshot["slow"].timeouts == 1
    assert snapshot["slow"].failures == 1
    assert snapshot["ok"].latency_max >= snapshot["ok"].latency_mean >= 0
    snapshot["ok"]["calls"] = 100
    assert metrics.snapshot()["ok"].calls == 2, "a snapshot is a copy"
    metrics.reset()
    assert metrics.snapshot() == {}


async def test_metrics_count_async_calls(metrics: nk.Metrics) -> None:
    flaky = Flaky([TimeoutError], result=1)
    call = nk.node(retry=RETRY, name="a", effect=nk.Effect.READ)(flaky.async_())
    with instant():
        await call()
    stats = metrics.snapshot()["a"]
    assert (stats.calls, stats.successes, stats.retries, stats.failures) == (1, 1, 1, 0)
