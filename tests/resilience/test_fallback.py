"""fallback=: a substitute result when nothing happened, never when the effect may have."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import capture_events, instant

from .conftest import Service, make_fallback, make_node, run

READ, WRITE = nk.Effect.READ, nk.Effect.WRITE


def keyed_charge(mode: str, service: Service, recorder: Recorder) -> Any:
    """A keyed WRITE node `charge(order)` with no retry and the recorder as fallback."""
    options: dict[str, Any] = {
        "name": "charge",
        "effect": WRITE,
        "retry": None,
        "idempotency": nk.Idempotency(key=lambda order: order, store=nk.MemoryStore()),
        "fallback": make_fallback(mode, recorder),
    }
    if mode == "sync":

        def charge(order: str) -> Any:
            return service(order)

        return nk.node(**options)(charge)

    async def acharge(order: str) -> Any:
        return service(order)

    return nk.node(**options)(acharge)


class Recorder:
    """A fallback body that records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[BaseException, tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, error: BaseException, *args: Any, **kwargs: Any) -> str:
        self.calls.append((error, args, kwargs))
        return "cached"


def test_runs_for_a_safe_error_once_retries_run_out(mode: str) -> None:
    recorder = Recorder()
    service = Service(*[ConnectionRefusedError("down")] * 3)
    node = make_node(
        mode,
        service,
        effect=WRITE,
        retry=nk.Retry(attempts=3),
        fallback=make_fallback(mode, recorder),
    )
    with instant(), capture_events() as events:
        assert run(mode, node, "sku-1", qty=2) == "cached"
    assert service.calls == 3
    [(error, args, kwargs)] = recorder.calls
    assert isinstance(error, ConnectionRefusedError)
    assert (args, kwargs) == (("sku-1",), {"qty": 2})
    [fallback] = events.named("node.fallback")
    assert (fallback.node, fallback["kind"], fallback["attempts"]) == (node.name, "safe", 3)
    assert events.names().index("node.failed") < events.names().index("node.fallback")


def test_runs_for_a_permanent_error(mode: str) -> None:
    recorder = Recorder()
    node = make_node(
        mode, Service(ValueError("bad sku")), effect=WRITE, fallback=make_fallback(mode, recorder)
    )
    assert run(mode, node) == "cached"
    assert isinstance(recorder.calls[0][0], ValueError)


def test_runs_for_an_open_circuit_without_calling_the_function(mode: str) -> None:
    breaker = nk.CircuitBreaker("api")
    breaker.isolate()
    recorder, service = Recorder(), Service()
    node = make_node(
        mode, service, effect=WRITE, circuit=breaker, fallback=make_fallback(mode, recorder)
    )
    assert run(mode, node) == "cached"
    assert service.calls == 0
    assert isinstance(recorder.calls[0][0], nk.CircuitOpen)


def test_runs_for_a_full_bulkhead_and_a_rate_limit(mode: str) -> None:
    limit = nk.RateLimit("api", 1, per=60.0)
    recorder = Recorder()
    node = make_node(
        mode,
        Service(),
        effect=WRITE,
        rate_limit=limit,
        timeout=nk.Timeout(total=1.0),
        fallback=make_fallback(mode, recorder),
    )
    assert run(mode, node) == "ok"
    assert run(mode, node) == "cached"  # the next place is a minute away
    assert isinstance(recorder.calls[0][0], nk.RateLimited)


def test_runs_for_an_ambiguous_error_of_a_read(mode: str) -> None:
    recorder = Recorder()
    node = make_node(
        mode, Service(ConnectionResetError()), effect=READ, fallback=make_fallback(mode, recorder)
    )
    assert run(mode, node) == "cached"


def test_never_for_an_ambiguous_write_without_a_key(mode: str) -> None:
    """The connection dropped after the request was sent: the charge may have happened."""
    recorder = Recorder()
    service = Service(ConnectionResetError("dropped"))
    node = make_node(
        mode, service, effect=WRITE, retry=nk.Retry(), fallback=make_fallback(mode, recorder)
    )
    with instant(), capture_events() as events, pytest.raises(nk.UnsafeRetry) as raised:
        run(mode, node)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    assert recorder.calls == []
    assert "node.fallback" not in events.names()


def test_never_for_an_ambiguous_write_without_retry(mode: str) -> None:
    recorder = Recorder()
    node = make_node(
        mode, Service(TimeoutError("read timeout")), fallback=make_fallback(mode, recorder)
    )
    with pytest.raises(TimeoutError):
        run(mode, node)
    assert recorder.calls == []


def test_never_for_outcome_unknown(mode: str) -> None:
    recorder = Recorder()
    service = Service(ConnectionResetError("dropped"))
    node = keyed_charge(mode, service, recorder)
    with pytest.raises(nk.OutcomeUnknown):
        run(mode, node, "order-1")
    assert recorder.calls == []


def test_the_fallback_result_is_not_stored_under_the_key(mode: str) -> None:
    """Fallback is outside idempotency: the next call with the key runs the function."""
    recorder = Recorder()
    service = Service(ConnectionRefusedError())
    node = keyed_charge(mode, service, recorder)
    assert run(mode, node, "order-1") == "cached"
    assert run(mode, node, "order-1") == "ok"
    assert service.calls == 2


def test_an_error_of_the_fallback_propagates_chained_to_the_node_error(mode: str) -> None:
    def broken(error: BaseException, *args: Any) -> Any:
        raise LookupError("no cache either")

    node = make_node(mode, Service(ConnectionRefusedError()), fallback=make_fallback(mode, broken))
    with pytest.raises(LookupError) as raised:
        run(mode, node)
    assert isinstance(raised.value.__context__, ConnectionRefusedError)


def test_a_flow_uses_the_fallback() -> None:
    @nk.node(effect=READ, fallback=lambda error, sku: {"price": 0})
    def price(sku: str) -> dict[str, int]:
        raise ConnectionRefusedError()

    flow = nk.Flow("quote")
    flow.add(price)
    assert flow.run({"sku": "a"})["price"] == 0


def test_a_fallback_that_is_not_callable_is_a_config_error() -> None:
    with pytest.raises(nk.ConfigError) as raised:

        @nk.node(fallback="cached")  # type: ignore[call-overload]
        def quote() -> None: ...

    assert raised.value.option == "fallback"


def test_a_fallback_of_the_other_kind_is_a_config_error() -> None:
    async def async_fallback(error: BaseException) -> None: ...

    with pytest.raises(nk.ConfigError, match="must be sync") as raised:

        @nk.node(fallback=async_fallback)
        def quote() -> None: ...

    assert raised.value.option == "fallback"
    with pytest.raises(nk.ConfigError, match="must be async"):

        @nk.node(fallback=lambda error: None)
        async def aquote() -> None: ...

    assert asyncio.iscoroutinefunction(async_fallback)
