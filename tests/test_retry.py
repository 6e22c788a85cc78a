"""Retry: transient errors are retried, permanent ones are not, and WRITE nodes stay safe.

Every behaviour runs on the three call paths a node can take: the bare fast path, the fast
path with structlog imported (context bound for its log lines) and the observed path (a sink
listens), each sync and async.
"""

from __future__ import annotations

import email.utils
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tenacity

import nodekit as nk
from nodekit.testing import Flaky, capture_events, instant

BACKOFF = nk.Retry(attempts=4, initial=0.1, multiplier=2.0, max_wait=10.0, jitter=0)


@pytest.fixture(params=["plain", "structlog", "observed"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test on each of the node's call paths."""
    if request.param == "plain":
        monkeypatch.delitem(sys.modules, "structlog", raising=False)
    elif request.param == "structlog":
        import structlog  # noqa: F401
    if request.param == "observed":
        with capture_events():
            yield request.param
    else:
        yield request.param


def http_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://api.example.com/charges")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


def sync_node(flaky: Flaky, **options: Any) -> Any:
    @nk.node(**options)
    def call() -> Any:
        return flaky()

    return call


def async_node(flaky: Flaky, **options: Any) -> Any:
    fake = flaky.async_()

    @nk.node(**options)
    async def call() -> Any:
        return await fake()

    return call


AMBIGUOUS = [
    pytest.param(ConnectionResetError("reset by peer"), id="reset"),
    pytest.param(httpx.ReadTimeout("read timed out"), id="read-timeout"),
    pytest.param(http_error(500), id="500"),
    pytest.param(http_error(502), id="502"),
    pytest.param(http_error(504), id="504"),
]
SAFE = [
    pytest.param(ConnectionRefusedError("refused"), id="refused"),
    pytest.param(httpx.ConnectError("connect failed"), id="connect-error"),
    pytest.param(http_error(503), id="503"),
    pytest.param(http_error(429), id="429"),
]
PERMANENT = [
    pytest.param(ValueError("bad input"), id="value"),
    pytest.param(KeyError("missing"), id="key"),
    pytest.param(http_error(404), id="404"),
]


# ---------------------------------------------------------------------------- transient


def test_transient_errors_are_retried_with_exponential_waits(path: str) -> None:
    flaky = Flaky([TimeoutError("slow"), ConnectionResetError("reset")], result="ok")
    call = sync_node(flaky, retry=BACKOFF, effect=nk.Effect.READ)
    with instant() as clock:
        assert call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


async def test_transient_errors_are_retried_with_exponential_waits_async(path: str) -> None:
    flaky = Flaky([TimeoutError("slow"), ConnectionResetError("reset")], result="ok")
    call = async_node(flaky, retry=BACKOFF, effect=nk.Effect.READ)
    with instant() as clock:
        assert await call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


def test_exhausted_retries_raise_the_original_error_with_a_note(path: str) -> None:
    error = ConnectionRefusedError("refused")
    flaky = Flaky([error], times=10)
    call = sync_node(flaky, retry=BACKOFF)
    with instant() as clock, pytest.raises(ConnectionRefusedError) as info:
        call()
    assert info.value is error
    assert flaky.calls == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert info.value.__notes__ == [
        "nodekit: node 'sync_node.<locals>.call' gave up after 4 attempts (retries exhausted)"
    ]


async def test_exhausted_retries_raise_the_original_error_with_a_note_async(path: str) -> None:
    error = ConnectionRefusedError("refused")
    flaky = Flaky([error], times=10)
    call = async_node(flaky, retry=BACKOFF)
    with instant() as clock, pytest.raises(ConnectionRefusedError) as info:
        await call()
    assert info.value is error
    assert flaky.calls == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert info.value.__notes__ == [
        "nodekit: node 'async_node.<locals>.call' gave up after 4 attempts (retries exhausted)"
    ]


def test_waits_are_capped_at_max_wait() -> None:
    flaky = Flaky([TimeoutError], times=5)
    retry = nk.Retry(attempts=5, initial=1, multiplier=10, max_wait=5, jitter=0)
    call = sync_node(flaky, retry=retry, effect=nk.Effect.READ)
    with instant() as clock, pytest.raises(TimeoutError):
        call()
    assert clock.sleeps == [1.0, 5.0, 5.0, 5.0]


async def test_waits_are_capped_at_max_wait_async() -> None:
    flaky = Flaky([TimeoutError], times=5)
    retry = nk.Retry(attempts=5, initial=1, multiplier=10, max_wait=5, jitter=0)
    call = async_node(flaky, retry=retry, effect=nk.Effect.READ)
    with instant() as clock, pytest.raises(TimeoutError):
        await call()
    assert clock.sleeps == [1.0, 5.0, 5.0, 5.0]


def test_jitter_adds_at_most_its_bound() -> None:
    flaky = Flaky([TimeoutError], times=20)
    retry = nk.Retry(attempts=20, initial=1, multiplier=1, max_wait=10, jitter=0.5)
    call = sync_node(flaky, retry=retry, effect=nk.Effect.READ)
    with instant() as clock, pytest.raises(TimeoutError):
        call()
    assert len(clock.sleeps) == 19
    assert all(1.0 <= wait <= 1.5 for wait in clock.sleeps)
    assert len(set(clock.sleeps)) > 1


def test_retry_true_means_the_default_policy() -> None:
    flaky = Flaky([ConnectionRefusedError], times=5)
    call = sync_node(flaky, retry=True)
    with instant() as clock, pytest.raises(ConnectionRefusedError):
        call()
    assert flaky.calls == nk.Retry().attempts == 3
    assert len(clock.sleeps) == 2


def test_a_node_without_retry_calls_once(path: str) -> None:
    flaky = Flaky([ConnectionRefusedError("refused")], result="ok")
    call = sync_node(flaky)
    with pytest.raises(ConnectionRefusedError):
        call()
    assert flaky.calls == 1


async def test_a_node_without_retry_calls_once_async(path: str) -> None:
    flaky = Flaky([ConnectionRefusedError("refused")], result="ok")
    call = async_node(flaky)
    with pytest.raises(ConnectionRefusedError):
        await call()
    assert flaky.calls == 1


# ---------------------------------------------------------------------------- permanent


@pytest.mark.parametrize("error", PERMANENT)
def test_permanent_errors_are_not_retried(path: str, error: Exception) -> None:
    flaky = Flaky([error], result="ok")
    call = sync_node(flaky, retry=BACKOFF, effect=nk.Effect.READ)
    with instant() as clock, pytest.raises(type(error)) as info:
        call()
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "gave up after 1 attempt (permanent error, not retried)" in info.value.__notes__[-1]


@pytest.mark.parametrize("error", PERMANENT)
async def test_permanent_errors_are_not_retried_async(path: str, error: Exception) -> None:
    flaky = Flaky([error], result="ok")
    call = async_node(flaky, retry=BACKOFF, effect=nk.Effect.READ)
    with instant() as clock, pytest.raises(type(error)) as info:
        await call()
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "gave up after 1 attempt (permanent error, not retried)" in info.value.__notes__[-1]


# ---------------------------------------------------------------------------- effects


def check_unsafe(info: pytest.ExceptionInfo[nk.UnsafeRetry], error: Exception) -> None:
    assert info.value.__cause__ is error
    assert info.value.attempts == 1
    assert info.value.node is not None
    assert info.value.node.endswith(".call")
    message = str(info.value)
    assert "Effect.READ" in message
    assert "idempotency" in message
    assert type(error).__name__ in message


@pytest.mark.parametrize("error", AMBIGUOUS)
def test_write_without_key_refuses_to_retry_an_ambiguous_error(path: str, error: Exception) -> None:
    flaky = Flaky([error], result="ok")
    call = sync_node(flaky, retry=BACKOFF)
    with instant() as clock, pytest.raises(nk.UnsafeRetry) as info:
        call()
    assert flaky.calls == 1
    assert clock.sleeps == []
    check_unsafe(info, error)


@pytest.mark.parametrize("error", AMBIGUOUS)
async def test_write_without_key_refuses_to_retry_an_ambiguous_error_async(
    path: str, error: Exception
) -> None:
    flaky = Flaky([error], result="ok")
    call = async_node(flaky, retry=BACKOFF)
    with instant() as clock, pytest.raises(nk.UnsafeRetry) as info:
        await call()
    assert flaky.calls == 1
    assert clock.sleeps == []
    check_unsafe(info, error)


def test_write_is_the_default_effect() -> None:
    call = sync_node(Flaky(), retry=BACKOFF)
    assert call.effect is nk.Effect.WRITE
    assert nk.node(retry=BACKOFF, effect=nk.Effect.WRITE)(lambda: None).effect is nk.Effect.WRITE


@pytest.mark.parametrize("error", SAFE)
def test_write_without_key_retries_a_safe_error(path: str, error: Exception) -> None:
    flaky = Flaky([error, error], result="ok")
    call = sync_node(flaky, retry=BACKOFF, effect=nk.Effect.WRITE)
    with instant() as clock:
        assert call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


@pytest.mark.parametrize("error", SAFE)
async def test_write_without_key_retries_a_safe_error_async(path: str, error: Exception) -> None:
    flaky = Flaky([error, error], result="ok")
    call = async_node(flaky, retry=BACKOFF, effect=nk.Effect.WRITE)
    with instant() as clock:
        assert await call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


@pytest.mark.parametrize("effect", [nk.Effect.READ, nk.Effect.NONE])
@pytest.mark.parametrize("error", AMBIGUOUS)
def test_read_and_none_nodes_retry_ambiguous_errors(
    path: str, error: Exception, effect: nk.Effect
) -> None:
    flaky = Flaky([error, error], result="ok")
    call = sync_node(flaky, retry=BACKOFF, effect=effect)
    with instant() as clock:
        assert call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


@pytest.mark.parametrize("effect", [nk.Effect.READ, nk.Effect.NONE])
@pytest.mark.parametrize("error", AMBIGUOUS)
async def test_read_and_none_nodes_retry_ambiguous_errors_async(
    path: str, error: Exception, effect: nk.Effect
) -> None:
    flaky = Flaky([error, error], result="ok")
    call = async_node(flaky, retry=BACKOFF, effect=effect)
    with instant() as clock:
        assert await call() == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]


def test_ambiguous_error_on_the_last_attempt_raises_the_original_error() -> None:
    error = ConnectionResetError("reset")
    call = sync_node(Flaky([error]), retry=nk.Retry(attempts=1))
    with pytest.raises(ConnectionResetError) as info:
        call()
    assert info.value is error
    assert "gave up after 1 attempt (retries exhausted)" in info.value.__notes__[-1]


def test_explicit_retry_on_wins_over_write_safety_with_a_warning_event() -> None:
    flaky = Flaky([ConnectionResetError("reset")], times=2, result="charged")
    retry = nk.Retry(attempts=3, initial=0.1, jitter=0, on=ConnectionResetError)
    call = sync_node(flaky, retry=retry)
    with instant() as clock, capture_events() as events:
        assert call() == "charged"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]
    unsafe = events.named("node.retry_unsafe")
    assert [event.attempt for event in unsafe] == [1, 2]
    assert all(isinstance(event.exc, ConnectionResetError) for event in unsafe)
    assert "idempotency" in unsafe[0]["reason"]
    names = events.names()
    assert names.index("node.retry_unsafe") < names.index("node.retrying")


async def test_explicit_retry_on_wins_over_write_safety_with_a_warning_event_async() -> None:
    flaky = Flaky([ConnectionResetError("reset")], times=2, result="charged")
    retry = nk.Retry(attempts=3, initial=0.1, jitter=0, on=ConnectionResetError)
    call = async_node(flaky, retry=retry)
    with instant() as clock, capture_events() as events:
        assert await call() == "charged"
    assert flaky.calls == 3
    assert clock.sleeps == [0.1, 0.2]
    assert [event.attempt for event in events.named("node.retry_unsafe")] == [1, 2]


def test_explicit_retry_on_wins_without_events_listening(path: str) -> None:
    flaky = Flaky([ConnectionResetError("reset")], times=2, result="charged")
    call = sync_node(flaky, retry=nk.Retry(on=(ConnectionResetError,), jitter=0))
    with instant():
        assert call() == "charged"
    assert flaky.calls == 3


def test_explicit_retry_on_retries_only_the_listed_errors() -> None:
    error = ConnectionRefusedError("refused")
    call = sync_node(Flaky([error], times=3), retry=nk.Retry(on=KeyError))
    with instant() as clock, pytest.raises(ConnectionRefusedError) as info:
        call()
    assert clock.sleeps == []
    assert "gave up after 1 attempt (not retried)" in info.value.__notes__[-1]


def test_explicit_predicate_decides_what_is_retried() -> None:
    flaky = Flaky([ValueError("try again"), ValueError("try again")], result="ok")
    retry = nk.Retry(on=lambda exc: "again" in str(exc), jitter=0)
    with instant():
        assert sync_node(flaky, retry=retry)() == "ok"
    assert flaky.calls == 3


async def test_explicit_predicate_decides_what_is_retried_async() -> None:
    flaky = Flaky([ValueError("try again"), ValueError("try again")], result="ok")
    retry = nk.Retry(on=lambda exc: "again" in str(exc), jitter=0)
    with instant():
        assert await async_node(flaky, retry=retry)() == "ok"
    assert flaky.calls == 3


def test_tenacity_strategies_drive_retry_stop_and_wait() -> None:
    flaky = Flaky([KeyError("k")], times=5)
    retry = nk.Retry(
        on=tenacity.retry_if_exception_type(KeyError),
        stop=tenacity.stop_after_attempt(2),
        wait=tenacity.wait_fixed(3),
    )
    with instant() as clock, pytest.raises(KeyError):
        sync_node(flaky, retry=retry)()
    assert flaky.calls == 2
    assert clock.sleeps == [3.0]


async def test_tenacity_strategies_drive_retry_stop_and_wait_async() -> None:
    flaky = Flaky([KeyError("k")], times=5)
    retry = nk.Retry(
        on=tenacity.retry_if_exception_type(KeyError),
        stop=tenacity.stop_after_attempt(2),
        wait=tenacity.wait_fixed(3),
    )
    with instant() as clock, pytest.raises(KeyError):
        await async_node(flaky, retry=retry)()
    assert flaky.calls == 2
    assert clock.sleeps == [3.0]


# ---------------------------------------------------------------------------- Retry-After

LONG = nk.Retry(attempts=3, initial=0.1, max_wait=60, jitter=0)


class Throttled(Exception):
    """A transient error carrying the server's requested wait as an attribute."""

    nodekit_kind = "safe"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled for {retry_after}s")
        self.retry_after = retry_after


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_header_is_honoured(path: str, status: int) -> None:
    flaky = Flaky([http_error(status, {"Retry-After": "7"})], result="ok")
    with instant() as clock:
        assert sync_node(flaky, retry=LONG)() == "ok"
    assert flaky.calls == 2
    assert clock.sleeps == [7.0]


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_header_is_honoured_async(path: str, status: int) -> None:
    flaky = Flaky([http_error(status, {"Retry-After": "7"})], result="ok")
    with instant() as clock:
        assert await async_node(flaky, retry=LONG)() == "ok"
    assert flaky.calls == 2
    assert clock.sleeps == [7.0]


def http_date_in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


def test_retry_after_http_date_is_honoured() -> None:
    flaky = Flaky([http_error(503, {"Retry-After": http_date_in(30)})], result="ok")
    with instant() as clock:
        assert sync_node(flaky, retry=LONG)() == "ok"
    assert len(clock.sleeps) == 1
    assert 28.0 < clock.sleeps[0] <= 30.0


async def test_retry_after_http_date_is_honoured_async() -> None:
    flaky = Flaky([http_error(503, {"Retry-After": http_date_in(30)})], result="ok")
    with instant() as clock:
        assert await async_node(flaky, retry=LONG)() == "ok"
    assert len(clock.sleeps) == 1
    assert 28.0 < clock.sleeps[0] <= 30.0


def test_retry_after_attribute_on_the_exception_is_honoured() -> None:
    flaky = Flaky([Throttled(3), Throttled(4.5)], result="ok")
    with instant() as clock:
        assert sync_node(flaky, retry=LONG)() == "ok"
    assert clock.sleeps == [3.0, 4.5]


async def test_retry_after_attribute_on_the_exception_is_honoured_async() -> None:
    flaky = Flaky([Throttled(3), Throttled(4.5)], result="ok")
    with instant() as clock:
        assert await async_node(flaky, retry=LONG)() == "ok"
    assert clock.sleeps == [3.0, 4.5]


def test_retry_after_is_clamped_to_max_wait() -> None:
    flaky = Flaky([http_error(429, {"Retry-After": "120"})], result="ok")
    retry = nk.Retry(initial=0.1, max_wait=5, jitter=0)
    with instant() as clock:
        assert sync_node(flaky, retry=retry)() == "ok"
    assert clock.sleeps == [5.0]


async def test_retry_after_is_clamped_to_max_wait_async() -> None:
    flaky = Flaky([http_error(429, {"Retry-After": "120"})], result="ok")
    retry = nk.Retry(initial=0.1, max_wait=5, jitter=0)
    with instant() as clock:
        assert await async_node(flaky, retry=retry)() == "ok"
    assert clock.sleeps == [5.0]


def test_retry_after_past_the_deadline_gives_up_at_once() -> None:
    error = http_error(503, {"Retry-After": "30"})
    flaky = Flaky([error], result="ok")
    call = sync_node(flaky, retry=LONG, timeout=nk.Timeout(total=5))
    with instant() as clock, pytest.raises(httpx.HTTPStatusError) as info:
        call()
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "gave up after 1 attempt (deadline:" in info.value.__notes__[-1]


async def test_retry_after_past_the_deadline_gives_up_at_once_async() -> None:
    error = http_error(503, {"Retry-After": "30"})
    flaky = Flaky([error], result="ok")
    call = async_node(flaky, retry=LONG, timeout=nk.Timeout(total=5))
    with instant() as clock, pytest.raises(httpx.HTTPStatusError) as info:
        await call()
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "gave up after 1 attempt (deadline:" in info.value.__notes__[-1]


def test_write_out_of_time_raises_the_ambiguous_error_not_unsafe_retry() -> None:
    """No retry would happen anyway, so the user sees their own error, as when out of attempts."""
    error = ConnectionResetError("reset")
    retry = nk.Retry(initial=10, max_wait=10, jitter=0)
    call = sync_node(Flaky([error]), retry=retry, timeout=nk.Timeout(total=1))
    with instant(), pytest.raises(ConnectionResetError) as info:
        call()
    assert info.value is error
    assert "(deadline:" in info.value.__notes__[-1]
