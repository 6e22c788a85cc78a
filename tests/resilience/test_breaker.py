"""CircuitBreaker: opens on a failure rate over a window, refuses without calling, probes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from datetime import timedelta
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import capture_events, instant

from .conftest import Clock, Service, make_node, run

READ = nk.Effect.READ


def fail_to_open(mode: str, breaker: nk.CircuitBreaker, calls: int) -> None:
    """Drive the breaker open with `calls` refused connections through a throwaway node."""
    service = Service(*[ConnectionRefusedError("down")] * calls)
    node = make_node(mode, service, name="opener", effect=READ, circuit=breaker)
    for _ in range(calls):
        with pytest.raises(ConnectionRefusedError):
            run(mode, node)
    assert breaker.state == "open"


def test_opens_once_min_calls_are_in_and_the_failure_rate_is_reached(
    mode: str, clock: Clock
) -> None:
    breaker = nk.CircuitBreaker("api", failure_rate=0.5, min_calls=4)
    service = Service(ConnectionResetError(), ConnectionResetError(), ConnectionResetError())
    node = make_node(mode, service, effect=READ, circuit=breaker)
    with capture_events(prefix="circuit.") as events:
        for _ in range(3):  # 3 of 3 failed, but fewer than min_calls
            with pytest.raises(ConnectionResetError):
                run(mode, node)
        assert breaker.state == "closed"
        assert run(mode, node) == "ok"  # 4 calls, 3 failed: 75% >= 50%
        assert breaker.state == "open"
        with pytest.raises(nk.CircuitOpen):
            run(mode, node)
    assert service.calls == 4
    assert events.names() == ["circuit.opened", "circuit.rejected"]
    opened = events[0]
    assert (opened["circuit"], opened["calls"], opened["failures"]) == ("api", 4, 3)
    assert opened.node == node.name


def test_stays_closed_below_the_failure_rate(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", failure_rate=0.5, min_calls=4)
    service = Service(ConnectionResetError(), "ok", "ok", "ok", "ok", ConnectionResetError())
    node = make_node(mode, service, effect=READ, circuit=breaker)
    for _ in range(6):
        with contextlib.suppress(ConnectionResetError):
            run(mode, node)
    assert breaker.state == "closed"  # 2 of 6 failed: 33%


def test_permanent_errors_never_trip_it(mode: str, clock: Clock) -> None:
    """A 4xx-like business error means the service answered: it counts as healthy."""
    breaker = nk.CircuitBreaker("api", failure_rate=0.1, min_calls=2)
    service = Service(*[ValueError("no such order")] * 20)
    node = make_node(mode, service, effect=READ, circuit=breaker)
    for _ in range(20):
        with pytest.raises(ValueError, match="no such order"):
            run(mode, node)
    assert service.calls == 20
    assert breaker.state == "closed"


def test_open_refuses_without_calling_and_says_when_it_half_opens(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, open_for=30.0)
    fail_to_open(mode, breaker, 2)
    service = Service()
    node = make_node(mode, service, name="guarded", effect=READ, circuit=breaker)
    clock.advance(10.0)
    with capture_events(prefix="circuit.") as events, pytest.raises(nk.CircuitOpen) as raised:
        run(mode, node)
    assert service.calls == 0
    error = raised.value
    assert (error.node, error.circuit, error.state) == ("guarded", "api", "open")
    assert error.retry_after == pytest.approx(20.0)
    assert nk.classify(error) == "safe"
    assert events.names() == ["circuit.rejected"]
    assert events[0]["retry_after"] == pytest.approx(20.0)


def test_half_open_lets_a_success_close_it(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, open_for=5.0)
    fail_to_open(mode, breaker, 2)
    clock.advance(5.0)
    assert breaker.state == "half_open"
    service = Service()
    node = make_node(mode, service, effect=READ, circuit=breaker)
    with capture_events(prefix="circuit.") as events:
        assert run(mode, node) == "ok"
    assert events.names() == ["circuit.half_opened", "circuit.closed"]
    assert breaker.state == "closed"
    assert run(mode, node) == "ok"
    assert service.calls == 2


def test_a_failed_probe_opens_it_again(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, open_for=5.0)
    fail_to_open(mode, breaker, 2)
    clock.advance(5.0)
    service = Service(ConnectionRefusedError())
    node = make_node(mode, service, effect=READ, circuit=breaker)
    with capture_events(prefix="circuit.") as events:
        with pytest.raises(ConnectionRefusedError):
            run(mode, node)
        with pytest.raises(nk.CircuitOpen) as raised:
            run(mode, node)
    assert events.names() == ["circuit.half_opened", "circuit.opened", "circuit.rejected"]
    assert raised.value.retry_after == pytest.approx(5.0)
    assert service.calls == 1


def test_half_open_needs_every_probe_to_succeed(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker(
        "api", min_calls=2, failure_rate=1.0, open_for=5.0, half_open_calls=3
    )
    fail_to_open(mode, breaker, 2)
    clock.advance(5.0)
    node = make_node(mode, Service(), effect=READ, circuit=breaker)
    run(mode, node)
    run(mode, node)
    assert breaker.state == "half_open"
    run(mode, node)
    assert breaker.state == "closed"


def test_half_open_admits_exactly_n_probes_across_threads(clock: Clock) -> None:
    breaker = nk.CircuitBreaker(
        "api", min_calls=2, failure_rate=1.0, open_for=5.0, half_open_calls=2
    )
    fail_to_open("sync", breaker, 2)
    clock.advance(5.0)
    release, entered = threading.Event(), []
    lock = threading.Lock()

    @nk.node(effect=READ, circuit=breaker)
    def probe() -> str:
        with lock:
            entered.append(1)
        release.wait(10)
        return "ok"

    outcomes: list[str] = []

    def caller() -> None:
        try:
            outcomes.append(probe())
        except nk.CircuitOpen as exc:
            outcomes.append(exc.state or "")

    with capture_events(prefix="circuit.") as events:
        threads = [threading.Thread(target=caller) for _ in range(30)]
        for thread in threads:
            thread.start()
        while len(outcomes) < 28:  # every caller but the two probes is refused at once
            threading.Event().wait(0.001)
        release.set()
        for thread in threads:
            thread.join(10)
    assert len(entered) == 2
    assert sorted(outcomes) == ["half_open"] * 28 + ["ok", "ok"]
    assert events.names().count("circuit.half_opened") == 1
    assert events.names().count("circuit.closed") == 1
    assert breaker.state == "closed"


async def test_half_open_admits_exactly_n_probes_across_tasks(clock: Clock) -> None:
    breaker = nk.CircuitBreaker(
        "api", min_calls=2, failure_rate=1.0, open_for=5.0, half_open_calls=2
    )
    opener = Service(*[ConnectionRefusedError()] * 2)

    @nk.node(effect=READ, circuit=breaker)
    async def failing() -> Any:
        return opener()

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            await failing()
    clock.advance(5.0)
    release, entered = asyncio.Event(), []

    @nk.node(effect=READ, circuit=breaker)
    async def probe() -> str:
        entered.append(1)
        await release.wait()
        return "ok"

    async def caller() -> str:
        try:
            return await probe()
        except nk.CircuitOpen as exc:
            return exc.state or ""

    tasks = [asyncio.create_task(caller()) for _ in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    outcomes = await asyncio.gather(*tasks)
    assert len(entered) == 2
    assert sorted(outcomes) == ["half_open"] * 48 + ["ok", "ok"]
    assert breaker.state == "closed"


def test_isolate_refuses_every_call_until_reset(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api")
    service = Service()
    node = make_node(mode, service, effect=READ, circuit=breaker)
    with capture_events(prefix="circuit.") as events:
        breaker.isolate()
        clock.advance(3600.0)
        with pytest.raises(nk.CircuitOpen) as raised:
            run(mode, node)
        assert breaker.state == "isolated"
        breaker.reset()
        assert run(mode, node) == "ok"
    assert (raised.value.state, raised.value.retry_after) == ("isolated", None)
    assert events.names() == ["circuit.opened", "circuit.rejected", "circuit.closed"]
    assert events[0]["manual"] is True
    assert service.calls == 1


def test_slow_calls_count_as_failures(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, slow_call=1.0)

    def slow() -> str:
        clock.advance(2.0)
        return "late"

    node = make_node(mode, Service(slow, slow), effect=READ, circuit=breaker)
    assert run(mode, node) == "late"  # a slow call still returns its result
    assert run(mode, node) == "late"
    assert breaker.state == "open"


def test_fast_calls_do_not_count_as_slow(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, slow_call=1.0)
    node = make_node(mode, Service(), effect=READ, circuit=breaker)
    for _ in range(5):
        run(mode, node)
    assert breaker.state == "closed"


def test_failures_older_than_the_window_are_forgotten(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, window=10.0)
    service = Service(ConnectionRefusedError(), ConnectionRefusedError())
    node = make_node(mode, service, effect=READ, circuit=breaker)
    with pytest.raises(ConnectionRefusedError):
        run(mode, node)
    clock.advance(11.0)
    with pytest.raises(ConnectionRefusedError):
        run(mode, node)
    assert breaker.state == "closed"


def test_one_breaker_guards_several_nodes(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("payments", min_calls=2, failure_rate=1.0)
    fail_to_open(mode, breaker, 2)
    other = Service()
    refund = make_node(mode, other, name="refund", effect=READ, circuit=breaker)
    with pytest.raises(nk.CircuitOpen):
        run(mode, refund)
    assert other.calls == 0


def test_retry_gives_up_at_once_when_the_circuit_opens(mode: str, clock: Clock) -> None:
    """Each attempt counts; once open, the retry would be refused too, so it stops there."""
    breaker = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, open_for=30.0)
    service = Service(*[ConnectionRefusedError()] * 10)
    node = make_node(
        mode, service, effect=READ, circuit=breaker, retry=nk.Retry(attempts=5, jitter=0)
    )
    with instant() as waits, pytest.raises(nk.CircuitOpen) as raised:
        run(mode, node)
    assert service.calls == 2
    assert len(waits.sleeps) == 2
    assert "gave up after 3 attempts (circuit open for 30.000s)" in str(raised.value.__notes__)


def test_retry_waits_for_a_circuit_that_half_opens_within_max_wait(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=1, failure_rate=1.0, open_for=2.0)

    service = Service(ConnectionRefusedError())
    node = make_node(
        mode, service, effect=READ, circuit=breaker, retry=nk.Retry(attempts=3, jitter=0)
    )
    real_sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        real_sleeps.append(seconds)
        clock.advance(seconds)

    async def asleep(seconds: float) -> None:
        sleep(seconds)

    with instant():
        from nodekit._runtime import RUNTIME

        RUNTIME.sleep, RUNTIME.asleep = sleep, asleep
        # refused: open; backs off 0.1 s, is refused (half-opens in 1.9 s), waits that long,
        # and the third attempt is the probe that closes it
        assert run(mode, node) == "ok"
    assert service.calls == 2
    assert real_sleeps == [pytest.approx(0.1), pytest.approx(1.9)]
    assert breaker.state == "closed"


def test_a_memory_store_shares_the_state_by_name(clock: Clock) -> None:
    store = nk.MemoryStore()
    first = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, store=store)
    fail_to_open("sync", first, 2)
    joined = nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0, store=store)
    assert joined.state == "open"  # joins the shared state, never resets it
    assert nk.CircuitBreaker("api", min_calls=2, failure_rate=1.0).state == "closed"
    with pytest.raises(nk.ConfigError) as raised:
        nk.CircuitBreaker("api", min_calls=3, store=store)
    assert raised.value.option == "store"


def test_a_store_that_is_no_nodekit_store_is_a_config_error() -> None:
    with pytest.raises(nk.ConfigError, match="must be a nodekit store") as raised:
        nk.CircuitBreaker("api", store={"state": "closed"})
    assert raised.value.option == "store"


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"failure_rate": 0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": True}, "failure_rate"),
        ({"min_calls": 0}, "min_calls"),
        ({"window": 0}, "window"),
        ({"open_for": -1.0}, "open_for"),
        ({"half_open_calls": 0}, "half_open_calls"),
        ({"slow_call": "1s"}, "slow_call"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], option: str) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        nk.CircuitBreaker("api", **options)
    assert raised.value.option == option


def test_times_accept_timedelta_and_repr_shows_the_configuration() -> None:
    breaker = nk.CircuitBreaker("api", window=timedelta(minutes=1), open_for=timedelta(seconds=5))
    assert (breaker.window, breaker.open_for) == (60.0, 5.0)
    assert "CircuitBreaker('api'" in repr(breaker)
    assert "state='closed'" in repr(breaker)
