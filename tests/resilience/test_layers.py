"""The order of the layers, the same in sync and async, and nothing for nodes without them."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import capture_events, instant

from .conftest import Clock, Service, make_node, run

READ = nk.Effect.READ


def test_an_open_circuit_takes_no_rate_limit_place(mode: str) -> None:
    """Circuit sits outside the rate limit: a refused call never spends a place."""
    breaker = nk.CircuitBreaker("api")
    limit = nk.RateLimit("api", 10)
    refused = make_node(mode, Service(), effect=READ, circuit=breaker, rate_limit=limit)
    plain = make_node(mode, Service(), effect=READ, rate_limit=limit)
    breaker.isolate()
    with instant() as waits:
        for _ in range(3):
            with pytest.raises(nk.CircuitOpen):
                run(mode, refused)
        run(mode, plain)
    assert waits.sleeps == []


def test_refusals_of_inner_layers_do_not_count_for_the_breaker(mode: str, clock: Clock) -> None:
    """A full bulkhead or a rate limit says nothing about the service: no failure recorded."""
    breaker = nk.CircuitBreaker("api", min_calls=1, failure_rate=0.1)
    limit = nk.RateLimit("api", 1, per=60.0)
    node = make_node(
        mode,
        Service(),
        effect=READ,
        circuit=breaker,
        rate_limit=limit,
        timeout=nk.Timeout(total=1.0),
    )
    run(mode, node)
    for _ in range(3):
        with pytest.raises(nk.RateLimited):
            run(mode, node)
    assert breaker.state == "closed"


def test_a_rate_limit_wait_holds_no_bulkhead_slot() -> None:
    """Rate limit sits outside the bulkhead: a call waiting for its turn holds no slot."""
    bulkhead = nk.Bulkhead("db", 1)
    limit = nk.RateLimit("db", 1, per=60.0)
    seen: list[int] = []
    waiting = threading.Event()

    def sleep(seconds: float) -> None:
        seen.append(bulkhead.in_use)
        waiting.set()

    @nk.node(effect=READ, rate_limit=limit, bulkhead=bulkhead)
    def query() -> str:
        return "ok"

    with instant():
        from nodekit._runtime import RUNTIME

        RUNTIME.sleep = sleep
        query()
        query()  # waits a minute (recorded), holding nothing
    assert seen == [0]


def test_guards_act_per_attempt_and_each_retry_is_counted(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=10)
    limit = nk.RateLimit("api", 10)
    service = Service(ConnectionRefusedError(), ConnectionRefusedError())
    node = make_node(
        mode,
        service,
        effect=READ,
        circuit=breaker,
        rate_limit=limit,
        retry=nk.Retry(attempts=3, initial=0.1, jitter=0),
    )
    with instant() as waits:
        assert run(mode, node) == "ok"
    assert service.calls == 3
    # per attempt: a backoff wait, then the limiter's own (the backoff did not pass in real time)
    assert len(waits.sleeps) == 4


def test_a_node_without_resilience_options_has_no_guards() -> None:
    @nk.node
    def plain() -> int:
        return 1

    assert plain.spec.guards == ()
    guarded = plain.options(circuit=nk.CircuitBreaker("api"), bulkhead=nk.Bulkhead("db", 2))
    assert [type(guard).__name__ for guard in guarded.spec.guards] == [
        "CircuitGuard",
        "BulkheadGuard",
    ]
    assert guarded.options(circuit=None, bulkhead=None).spec.guards == ()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("circuit", "api"),
        ("rate_limit", 10),
        ("bulkhead", nk.CircuitBreaker("api")),
    ],
)
def test_an_option_of_the_wrong_type_is_a_config_error(option: str, value: Any) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        nk.node(**{option: value})(lambda: None)
    assert raised.value.option == option


def test_events_carry_names_never_arguments(mode: str, clock: Clock) -> None:
    breaker = nk.CircuitBreaker("api", min_calls=1, failure_rate=1.0)
    node = make_node(mode, Service(ConnectionRefusedError()), effect=READ, circuit=breaker)
    with capture_events() as events:
        with pytest.raises(ConnectionRefusedError):
            run(mode, node, "card-4242")
        with pytest.raises(nk.CircuitOpen):
            run(mode, node, "card-4242")
    for event in events:
        assert "card-4242" not in repr(event.as_dict())
