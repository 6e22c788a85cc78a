"""A keyed WRITE that calls a plain HTTP client itself: one charge on the server, every library.

The key guards nodekit's claim, not the server. An ambiguous error (the request went out, the
answer was lost) is retried only when the attempt carried the key downstream — `nodekit.http`
sent the derived ``Idempotency-Key``, or the node used ``nk.context().idempotency_key_for``.
Otherwise the call raises `OutcomeUnknown` chained to the library's error and keeps the key.
Effects are counted on the server (`LocalAPI`'s ledger), never in the test process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import requests

import nodekit as nk
from nodekit import http as nkhttp
from nodekit.testing import FaultPlan, LocalAPI, capture_events, instant

try:
    import aiohttp
except ImportError:  # a dev dependency; its tests skip without it
    aiohttp = None

needs_aiohttp = pytest.mark.skipif(aiohttp is None, reason="aiohttp is not installed")


@pytest.fixture
def api() -> Iterator[LocalAPI]:
    with LocalAPI(faults=FaultPlan(rate=0.0)) as server:
        yield server


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "memory":
        return nk.MemoryStore()
    return nk.SQLiteStore(tmp_path / "keys.db")


def charges(api: LocalAPI) -> int:
    """Charges the server processed (a replayed or faulted-before request is not one)."""
    return sum(1 for e in api.ledger.entries if e.outcome == "processed")


def headers(carry: bool) -> dict[str, str]:
    if not carry:
        return {}
    return {"Idempotency-Key": nk.context().idempotency_key_for("charge")}


# -------------------------------------------------------------- the four plain clients


def sync_clients(api: LocalAPI) -> dict[str, Callable[[bool], int]]:
    url = f"{api.url}/status/201"

    def with_httpx(carry: bool) -> int:
        response = httpx.post(url, headers=headers(carry), timeout=5)
        response.raise_for_status()
        return response.status_code

    def with_requests(carry: bool) -> int:
        response = requests.post(url, headers=headers(carry), timeout=5)
        response.raise_for_status()
        return response.status_code

    return {"httpx": with_httpx, "requests": with_requests}


def async_clients(api: LocalAPI) -> dict[str, Callable[[bool], Awaitable[int]]]:
    url = f"{api.url}/status/201"

    async def with_httpx(carry: bool) -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(url, headers=headers(carry))
            response.raise_for_status()
            return response.status_code

    async def with_aiohttp(carry: bool) -> int:
        assert aiohttp is not None
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, headers=headers(carry)) as response,
        ):
            response.raise_for_status()
            return response.status

    found: dict[str, Callable[[bool], Awaitable[int]]] = {"httpx": with_httpx}
    if aiohttp is not None:
        found["aiohttp"] = with_aiohttp
    return found


def keyed(store: Any) -> nk.Idempotency:
    return nk.Idempotency(key=lambda order: order, store=store)


# -------------------------------------------------------------- no key downstream


@pytest.mark.parametrize("library", ["httpx", "requests"])
def test_a_dropped_answer_is_not_retried_when_no_key_went_downstream(
    api: LocalAPI, store: Any, library: str
) -> None:
    send = sync_clients(api)[library]

    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    def charge(order: str) -> int:
        return send(False)

    api.fail_next("drop_after")  # processed, then the connection closed without an answer
    with instant() as clock, pytest.raises(nk.OutcomeUnknown) as info:
        charge("o-1")
    assert nk.classify(info.value.__cause__) == "ambiguous"  # the library's own error
    assert "sent no idempotency key downstream" in str(info.value)
    assert clock.sleeps == []
    # the key is kept: calling again does not charge again
    with pytest.raises((nk.IdempotencyInProgress, nk.OutcomeUnknown)):
        charge("o-1")
    assert charges(api) == 1


@pytest.mark.parametrize("library", ["httpx", "aiohttp"])
async def test_an_async_dropped_answer_is_not_retried_when_no_key_went_downstream(
    api: LocalAPI, store: Any, library: str
) -> None:
    if library not in async_clients(api):
        pytest.skip("aiohttp is not installed")
    send = async_clients(api)[library]

    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    async def charge(order: str) -> int:
        return await send(False)

    api.fail_next("drop_after")
    with instant() as clock, pytest.raises(nk.OutcomeUnknown) as info:
        await charge("o-1")
    assert nk.classify(info.value.__cause__) == "ambiguous"
    assert clock.sleeps == []
    with pytest.raises((nk.IdempotencyInProgress, nk.OutcomeUnknown)):
        await charge("o-1")
    assert charges(api) == 1


# -------------------------------------------------------------- the key carried downstream


@pytest.mark.parametrize("library", ["httpx", "requests"])
def test_a_dropped_answer_is_retried_as_a_replay_when_the_key_went_downstream(
    api: LocalAPI, store: Any, library: str
) -> None:
    send = sync_clients(api)[library]

    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    def charge(order: str) -> int:
        return send(True)

    api.fail_next("drop_after")
    with instant() as clock:
        assert charge("o-1") == 201
    assert len(clock.sleeps) == 1
    assert charges(api) == 1
    assert [e.outcome for e in api.ledger.entries][-1] == "replayed"


@pytest.mark.parametrize("library", ["httpx", "aiohttp"])
async def test_an_async_dropped_answer_is_retried_when_the_key_went_downstream(
    api: LocalAPI, store: Any, library: str
) -> None:
    if library not in async_clients(api):
        pytest.skip("aiohttp is not installed")
    send = async_clients(api)[library]

    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    async def charge(order: str) -> int:
        return await send(True)

    api.fail_next("drop_after")
    with instant():
        assert await charge("o-1") == 201
    assert charges(api) == 1


def test_nodekit_http_carries_the_key_so_the_retry_is_a_replay(api: LocalAPI, store: Any) -> None:
    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    def charge(order: str) -> int:
        with httpx.Client(timeout=5) as client:
            response = nkhttp.post(client, f"{api.url}/status/201")
            return response.status_code

    api.fail_next("drop_after")
    with instant():
        assert charge("o-1") == 201
    assert charges(api) == 1


def test_the_key_is_carried_per_attempt(api: LocalAPI, store: Any) -> None:
    """An attempt that did not send the key is not retried, even if an earlier one did."""
    sent: list[int] = []
    send = sync_clients(api)["httpx"]

    @nk.node(name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    def charge(order: str) -> int:
        attempt = nk.context().attempt
        sent.append(attempt)
        return send(attempt == 1)  # only the first attempt carries the key

    api.fail_next("drop_after", "drop_after")
    with instant(), pytest.raises(nk.OutcomeUnknown):
        charge("o-1")
    assert sent == [1, 2]  # the first (carried) was retried, the second (not carried) was not


def test_an_explicit_retry_on_still_retries_and_warns(api: LocalAPI, store: Any) -> None:
    """`Retry(on=...)` is the user's decision: retried, with the warning event."""
    send = sync_clients(api)["requests"]

    @nk.node(
        name="charge",
        retry=nk.Retry(attempts=3, on=requests.ConnectionError),
        idempotency=keyed(store),
    )
    def charge(order: str) -> int:
        return send(False)

    api.fail_next("drop_after")
    with instant(), capture_events(prefix="node.retry_unsafe") as events:
        assert charge("o-1") == 201
    assert len(events) == 1
    assert "keyed WRITE" in events[0]["reason"]
    assert charges(api) == 2  # what the user chose: the server has no key to dedupe by


def test_a_read_node_with_a_key_retries_without_carrying_it(api: LocalAPI, store: Any) -> None:
    send = sync_clients(api)["httpx"]

    @nk.node(
        name="lookup",
        effect=nk.Effect.READ,
        retry=nk.Retry(attempts=3),
        idempotency=keyed(store),
    )
    def lookup(order: str) -> int:
        return send(False)

    api.fail_next("drop_after")
    with instant():
        assert lookup("o-1") == 201
