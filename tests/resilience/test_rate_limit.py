"""RateLimit: GCRA spacing through nodekit's waits, RateLimited near the deadline, Retry-After."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import nodekit as nk
from nodekit.testing import capture_events, instant

from .conftest import Clock, Service, make_node, run

READ = nk.Effect.READ


def too_many(retry_after: str) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://api.example.com/prices")
    response = httpx.Response(429, headers={"Retry-After": retry_after}, request=request)
    return httpx.HTTPStatusError("HTTP 429", request=request, response=response)


def test_calls_are_spaced_at_the_rate(mode: str, clock: Clock) -> None:
    limit = nk.RateLimit("api", 10, per=1.0)  # one call every 0.1 s
    service = Service()
    node = make_node(mode, service, effect=READ, rate_limit=limit)
    with instant() as waits:
        for _ in range(5):
            assert run(mode, node) == "ok"
    assert service.calls == 5
    assert waits.sleeps == [pytest.approx(0.1 * n) for n in range(1, 5)]


def test_a_burst_starts_at_once_then_the_pace_holds(mode: str, clock: Clock) -> None:
    limit = nk.RateLimit("api", 10, burst=3)
    node = make_node(mode, Service(), effect=READ, rate_limit=limit)
    with instant() as waits:
        for _ in range(5):
            run(mode, node)
    assert waits.sleeps == [pytest.approx(0.1), pytest.approx(0.2)]


def test_a_wait_past_the_deadline_raises_rate_limited_without_calling(
    mode: str, clock: Clock
) -> None:
    limit = nk.RateLimit("api", 10)
    service = Service()
    node = make_node(mode, service, effect=READ, rate_limit=limit, timeout=nk.Timeout(total=0.25))
    with instant() as waits, capture_events(prefix="rate_limit.") as events:
        for _ in range(3):  # waits 0, 0.1, 0.2: within 0.25 s
            run(mode, node)
        with pytest.raises(nk.RateLimited) as raised:
            run(mode, node)  # would wait 0.3 s
    assert service.calls == 3
    error = raised.value
    assert (error.limit, error.node) == ("api", node.name)
    assert error.retry_after == pytest.approx(0.3)
    assert nk.classify(error) == "safe"
    assert len(waits.sleeps) == 2
    assert events.names() == ["rate_limit.waited", "rate_limit.waited", "rate_limit.rejected"]


def test_a_refused_wait_reserves_nothing(mode: str, clock: Clock) -> None:
    limit = nk.RateLimit("api", 10)
    hurried = make_node(
        mode, Service(), effect=READ, rate_limit=limit, timeout=nk.Timeout(total=0.05)
    )
    patient = make_node(mode, Service(), effect=READ, rate_limit=limit)
    with instant() as waits:
        run(mode, patient)
        with pytest.raises(nk.RateLimited):
            run(mode, hurried)
        run(mode, patient)
    assert waits.sleeps == [pytest.approx(0.1)]


def test_a_retry_after_from_the_service_pauses_every_caller(mode: str, clock: Clock) -> None:
    limit = nk.RateLimit("api", 100)
    told = make_node(mode, Service(too_many("2")), name="told", effect=READ, rate_limit=limit)
    other = make_node(mode, Service(), name="other", effect=READ, rate_limit=limit)
    with instant() as waits, capture_events(prefix="rate_limit.") as events:
        with pytest.raises(httpx.HTTPStatusError):
            run(mode, told)
        assert run(mode, other) == "ok"
    assert waits.sleeps == [pytest.approx(2.0)]
    paused = events.named("rate_limit.paused")
    assert len(paused) == 1
    assert (paused[0].node, paused[0].wait, paused[0]["limit"]) == ("told", 2.0, "api")


def test_the_retry_after_the_retry_honours_is_also_the_pause(mode: str, clock: Clock) -> None:
    limit = nk.RateLimit("api", 100)
    service = Service(too_many("1"))
    node = make_node(mode, service, effect=READ, rate_limit=limit, retry=nk.Retry(jitter=0))
    with instant() as waits:
        from nodekit._runtime import RUNTIME

        record = RUNTIME.sleep

        def sleep(seconds: float) -> None:  # time passes while nodekit waits
            record(seconds)
            clock.advance(seconds)

        async def asleep(seconds: float) -> None:
            sleep(seconds)

        RUNTIME.sleep, RUNTIME.asleep = sleep, asleep
        assert run(mode, node) == "ok"
    # the retry waits the 1 s the server asked for; by then the pause is over, so the
    # limiter lets the retry through at once
    assert waits.sleeps == [pytest.approx(1.0)]
    assert service.calls == 2


async def test_sync_and_async_nodes_share_one_pace(clock: Clock) -> None:
    limit = nk.RateLimit("api", 10)
    service = Service()
    sync_node = make_node("sync", service, effect=READ, rate_limit=limit)
    async_node = make_node("async", service, effect=READ, rate_limit=limit)
    with instant() as waits:
        await async_node()
        await asyncio.to_thread(sync_node)
        await async_node()
    assert waits.sleeps == [pytest.approx(0.1), pytest.approx(0.2)]


@pytest.mark.parametrize(
    ("args", "kwargs", "option"),
    [
        ((0,), {}, "rate"),
        ((-1,), {}, "rate"),
        ((float("inf"),), {}, "rate"),
        (("10",), {}, "rate"),
        ((10, 0), {}, "per"),
        ((10,), {"burst": 0}, "burst"),
        ((10,), {"burst": 1.5}, "burst"),
    ],
)
def test_bad_options_are_config_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], option: str
) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        nk.RateLimit("api", *args, **kwargs)
    assert raised.value.option == option
