"""`nodekit.http` against real servers: the demo shop's fault-injecting `DemoAPI` and httpbin.

Effects are counted from the DemoAPI's ledger (what the server did), never in the test
process; every behaviour runs with a sync node and an async node (`flavor`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

import nodekit as nk
import nodekit.http as nh
from nodekit.testing import FaultPlan, Instant, capture_events
from nodekit.testing._server import FAULT_KINDS
from recipes._demo_api import DemoAPI

from .conftest import Caller

RETRY = nk.Retry(attempts=4, initial=0.1, jitter=0)


def charge_node(flavor: str, **options: Any) -> Any:
    """A node that charges an order with ``POST /charges`` through the `http` resource."""
    options.setdefault("name", "charge")
    if flavor == "sync":

        @nk.node(**options)
        def charge(
            order_id: str, amount: int, *, http: httpx.Client = nk.resource()
        ) -> dict[str, Any]:
            response = nh.post(http, "/charges", json={"order_id": order_id, "amount": amount})
            return {**response.json(), "replayed": nh.replayed(response)}

        return charge

    @nk.node(**options)
    async def acharge(
        order_id: str, amount: int, *, http: httpx.AsyncClient = nk.resource()
    ) -> dict[str, Any]:
        response = await nh.apost(http, "/charges", json={"order_id": order_id, "amount": amount})
        return {**response.json(), "replayed": nh.replayed(response)}

    return acharge


def keyed(store: nk.MemoryStore | None = None, **options: Any) -> dict[str, Any]:
    """Node options for a charge keyed by its order id."""
    idem = nk.Idempotency(key=lambda order_id: order_id, store=store or nk.MemoryStore())
    return {"idempotency": idem, "retry": RETRY, **options}


# ---------------------------------------------------------------------------- one key per call


def test_503_storm_sends_one_key_and_honours_retry_after(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """Every attempt of a keyed write carries the same key; the server's Retry-After is the wait."""
    api.fail_next("503", "429", route="POST /charges")
    charge = charge_node(call.flavor, **keyed())

    result = call(charge, "order-1", 500)

    assert result["order_id"] == "order-1"
    keys = api.ledger.keys("POST /charges")
    assert len(keys) == 3
    assert keys[0] is not None
    assert len(set(keys)) == 1
    assert len(api.charges_for("order-1")) == 1
    assert waits.sleeps == [1.0, 1.0]  # Retry-After: 1, not the 0.1 s backoff


def test_read_timeout_retry_replays_the_stored_response(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """A keyed write whose answer timed out is retried with the same key and replayed."""
    api.fail_next("slow", route="POST /charges")  # answered after 1 s; the client waits 0.3 s
    charge = charge_node(call.flavor, **keyed())

    result = call(charge, "order-2", 700)

    assert result["replayed"] is True
    entries = api.ledger.find(route="POST /charges")
    assert [entry.outcome for entry in entries] == ["processed", "replayed"]
    assert len({entry.idempotency_key for entry in entries}) == 1
    assert len(api.charges_for("order-2")) == 1


def test_connect_errors_retry_with_the_same_key(
    call: Caller, api: DemoAPI, closed_port: int, waits: Instant
) -> None:
    """Refused connections (nothing sent) are retried; the key does not depend on the host."""
    dead = f"http://127.0.0.1:{closed_port}"

    def url() -> str:
        return f"{dead}/charges" if nk.context().attempt < 3 else "/charges"

    store = nk.MemoryStore()
    if call.is_async:

        @nk.node(name="charge", **keyed(store))
        async def charge(order_id: str, *, http: httpx.AsyncClient = nk.resource()) -> int:
            response = await nh.apost(http, url(), json={"order_id": order_id, "amount": 1})
            return response.status_code

    else:

        @nk.node(name="charge", **keyed(store))
        def charge(order_id: str, *, http: httpx.Client = nk.resource()) -> int:
            response = nh.post(http, url(), json={"order_id": order_id, "amount": 1})
            return response.status_code

    assert call(charge, "order-3") == 201
    keys = call.keys()
    assert len(keys) == 3
    assert keys[0] is not None
    assert len(set(keys)) == 1
    assert api.ledger.keys("POST /charges") == keys[2:]


def test_unkeyed_write_retries_safe_errors_without_a_key(
    call: Caller, api: DemoAPI, closed_port: int, waits: Instant
) -> None:
    """A write without a key still retries what certainly did not happen: 503, 429."""
    api.fail_next("503", "429", route="POST /charges")
    charge = charge_node(call.flavor, retry=RETRY)

    call(charge, "order-4", 100)

    assert api.ledger.keys("POST /charges") == [None, None, None]
    assert len(api.charges_for("order-4")) == 1


def test_unkeyed_write_is_not_retried_after_a_drop_after_processing(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """The ambiguous case: the charge happened, the answer was lost; retrying would repeat it."""
    api.fail_next("drop_after", route="POST /charges")
    charge = charge_node(call.flavor, retry=RETRY)

    with pytest.raises(nk.UnsafeRetry) as caught:
        call(charge, "order-5", 100)

    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert len(api.ledger.find(route="POST /charges")) == 1
    assert len(api.charges_for("order-5")) == 1
    assert waits.sleeps == []


def test_keyed_write_after_a_drop_after_processing_gets_the_stored_response(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """With a key the retry is a replay: one charge, and the client learns its id."""
    api.fail_next("drop_after", route="POST /charges")
    charge = charge_node(call.flavor, **keyed())

    with capture_events(prefix="http.") as events:
        result = call(charge, "order-6", 100)

    [made] = api.charges_for("order-6")
    assert result["id"] == made.data["id"]
    assert result["replayed"] is True
    assert [entry.outcome for entry in api.ledger] == ["processed", "replayed"]
    [response] = events.named("http.response")
    assert response["status"] == 201
    assert response["replayed"] is True
    assert response["method"] == "POST"
    assert response.node == "charge"
    assert response.attempt == 2


def test_resumed_call_sends_the_same_key(call: Caller, api: DemoAPI, waits: Instant) -> None:
    """A second call of the same keyed node (after the first one's lease expired) reuses the key."""
    now = [1_000.0]
    store = nk.MemoryStore(clock=lambda: now[0])
    idem = nk.Idempotency(key=lambda order_id: order_id, store=store, lease=30)
    charge = charge_node(call.flavor, idempotency=idem, retry=nk.Retry(attempts=2, jitter=0))
    api.fail_next("drop_after", "drop_after", route="POST /charges")

    with pytest.raises(nk.OutcomeUnknown):
        call(charge, "order-7", 100)
    now[0] += 60  # the lease expires: a later run takes the key over
    result = call(charge, "order-7", 100)

    assert result["replayed"] is True
    keys = api.ledger.keys("POST /charges")
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert len(api.charges_for("order-7")) == 1


def test_another_process_sends_the_same_key(api: DemoAPI) -> None:
    """The key is derived from the node's key alone: a fresh process sends the same header."""
    script = f"""
import httpx, nodekit as nk, nodekit.http as nh

@nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order_id: order_id))
def charge(order_id: str) -> int:
    with httpx.Client(base_url={api.url!r}) as client:
        return nh.post(client, "/charges", json={{"order_id": order_id, "amount": 3}}).status_code

print(charge("order-8"))
"""
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "201"

    keys = api.ledger.keys("POST /charges")
    assert len(keys) == 2
    assert keys[0] is not None
    assert keys[0] == keys[1]
    assert [entry.outcome for entry in api.ledger] == ["processed", "replayed"]
    assert len(api.charges_for("order-8")) == 1


def test_seeded_fault_storm_charges_every_order_exactly_once(flavor: str, waits: Instant) -> None:
    """Under a seeded mix of every fault, keyed charges land exactly once per order."""
    plan = FaultPlan(seed=2, rate=0.4, slow=0.4)  # seed 2 draws every kind of fault
    store = nk.MemoryStore()
    charge = charge_node(
        flavor,
        retry=nk.Retry(attempts=12, jitter=0),
        idempotency=nk.Idempotency(key=lambda order_id: order_id, store=store),
    )
    orders = [f"storm-{i}" for i in range(16)]
    with DemoAPI(faults=plan) as server:
        caller = Caller(flavor, server.url, timeout=0.15)
        for order in orders:
            caller(charge, order, 10)
        faults = {entry.fault for entry in server.ledger if entry.fault}
        assert faults == set(FAULT_KINDS)
        for order in orders:
            assert len(server.charges_for(order)) == 1, order


# ---------------------------------------------------------------------------- IETF codes


def _post_in_thread(url: str, key: str, body: dict[str, Any]) -> threading.Thread:
    def send() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            client.post("/charges", json=body, headers={"Idempotency-Key": key})

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_409_in_progress_is_retried_until_the_stored_response(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """A duplicate while the first request is in flight gets 409, waits, and is replayed."""
    gate = api.gate("POST /charges")
    body = {"order_id": "order-9", "amount": 5}
    first = _post_in_thread(api.url, "key-9", body)
    assert gate.arrived.wait(5)

    def settle() -> None:
        if nk.context().attempt == 2:  # the first request may finish now
            gate.release()
            first.join()

    if call.is_async:

        @nk.node(name="duplicate", retry=RETRY)
        async def duplicate(*, http: httpx.AsyncClient = nk.resource()) -> bool:
            settle()
            return nh.replayed(await nh.apost(http, "/charges", json=body, idempotency_key="key-9"))

    else:

        @nk.node(name="duplicate", retry=RETRY)
        def duplicate(*, http: httpx.Client = nk.resource()) -> bool:
            settle()
            return nh.replayed(nh.post(http, "/charges", json=body, idempotency_key="key-9"))

    assert call(duplicate) is True
    assert sorted(entry.outcome for entry in api.ledger) == ["conflict", "processed", "replayed"]
    assert len(api.charges_for("order-9")) == 1
    assert waits.sleeps == [1.0]  # the 409's Retry-After


def test_422_key_reused_with_another_body_is_not_retried(
    call: Caller, api: DemoAPI, waits: Instant
) -> None:
    """Same key, different request: `IdempotencyMismatch` (and an httpx error), no retry."""
    with httpx.Client(base_url=api.url) as client:
        client.post(
            "/charges", json={"order_id": "a", "amount": 1}, headers={"Idempotency-Key": "k"}
        )
    body = {"order_id": "b", "amount": 2}

    if call.is_async:

        @nk.node(name="reuse", retry=RETRY)
        async def reuse(*, http: httpx.AsyncClient = nk.resource()) -> None:
            await nh.apost(http, "/charges", json=body, idempotency_key="k")

    else:

        @nk.node(name="reuse", retry=RETRY)
        def reuse(*, http: httpx.Client = nk.resource()) -> None:
            nh.post(http, "/charges", json=body, idempotency_key="k")

    with pytest.raises(nk.IdempotencyMismatch) as caught:
        call(reuse)

    assert isinstance(caught.value, httpx.HTTPStatusError)
    assert isinstance(caught.value, nh.KeyMismatch)
    assert [entry.outcome for entry in api.ledger] == ["processed", "mismatch"]
    assert api.charges_for("b") == []
    assert waits.sleeps == []


def test_409_without_a_key_is_a_plain_client_error(api: DemoAPI, waits: Instant) -> None:
    """Only a keyed request's 409 means "in progress"; otherwise it is a permanent 4xx."""

    @nk.node(name="conflict", retry=RETRY, effect=nk.Effect.READ)
    def conflict(http: httpx.Client) -> None:
        nh.post(http, "/status/409")

    with httpx.Client(base_url=api.url) as client, pytest.raises(nh.HTTPStatusError) as caught:
        conflict(client)

    assert not isinstance(caught.value, nk.IdempotencyInProgress)
    assert caught.value.status_code == 409
    assert len(api.ledger) == 1


# ---------------------------------------------------------------------------- keys


def test_keys_only_for_keyed_nodes_and_non_idempotent_methods(call: Caller, api: DemoAPI) -> None:
    """POST and PATCH in a keyed node are keyed (per step); GET and unkeyed nodes are not."""
    idem = nk.Idempotency(key=lambda n: n, store=nk.MemoryStore())

    if call.is_async:

        @nk.node(name="several", idempotency=idem)
        async def several(n: int, *, http: httpx.AsyncClient = nk.resource()) -> str:
            await nh.aget(http, "/status/200")
            await nh.apost(http, "/status/200", step="first")
            await nh.apost(http, "/status/200", step="second")
            await nh.apatch(http, "/status/200")
            await nh.aput(http, "/status/200")
            await nh.adelete(http, "/status/200")
            return nk.context().idempotency_key_for("first")

        @nk.node(name="unkeyed")
        async def unkeyed(*, http: httpx.AsyncClient = nk.resource()) -> None:
            await nh.apost(http, "/status/200")
            await nh.apost(http, "/status/200", idempotency_key="given")

    else:

        @nk.node(name="several", idempotency=idem)
        def several(n: int, *, http: httpx.Client = nk.resource()) -> str:
            nh.get(http, "/status/200")
            nh.post(http, "/status/200", step="first")
            nh.post(http, "/status/200", step="second")
            nh.patch(http, "/status/200")
            nh.put(http, "/status/200")
            nh.delete(http, "/status/200")
            return nk.context().idempotency_key_for("first")

        @nk.node(name="unkeyed")
        def unkeyed(*, http: httpx.Client = nk.resource()) -> None:
            nh.post(http, "/status/200")
            nh.post(http, "/status/200", idempotency_key="given")

    first = call(several, 1)
    call(unkeyed)

    get, post1, post2, patch, put, delete, plain, given = call.keys()
    assert (get, put, delete) == (None, None, None)
    assert post1 == first
    assert len({post1, post2, patch}) == 3
    assert plain is None
    assert given == "given"


# ---------------------------------------------------------------------------- deadlines


def test_remaining_deadline_caps_the_request_timeout(call: Caller, api: DemoAPI) -> None:
    """Every phase of the httpx timeout is at most what is left of the node's total budget."""
    call.timeout = 30.0
    if call.is_async:

        @nk.node(name="bounded", timeout=nk.Timeout(total=2.0), effect=nk.Effect.READ)
        async def bounded(*, http: httpx.AsyncClient = nk.resource()) -> None:
            await nh.aget(http, "/status/200")
            await nh.aget(http, "/status/200", timeout=0.5)

    else:

        @nk.node(name="bounded", timeout=nk.Timeout(total=2.0), effect=nk.Effect.READ)
        def bounded(*, http: httpx.Client = nk.resource()) -> None:
            nh.get(http, "/status/200")
            nh.get(http, "/status/200", timeout=0.5)

    call(bounded)

    capped, smaller = (request.extensions["timeout"] for request in call.sent)
    assert set(capped) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 2.0 for value in capped.values())
    assert all(value == 0.5 for value in smaller.values())


def test_slow_endpoint_fails_at_the_deadline_not_at_the_client_timeout(
    call: Caller, api: DemoAPI
) -> None:
    """``/delay/10`` with a 0.4 s budget and a 30 s client timeout gives up after about 0.4 s."""
    call.timeout = 30.0
    if call.is_async:

        @nk.node(name="slow", timeout=nk.Timeout(total=0.4), effect=nk.Effect.READ)
        async def slow(*, http: httpx.AsyncClient = nk.resource()) -> None:
            await nh.aget(http, "/delay/10")

    else:

        @nk.node(name="slow", timeout=nk.Timeout(total=0.4), effect=nk.Effect.READ)
        def slow(*, http: httpx.Client = nk.resource()) -> None:
            nh.get(http, "/delay/10")

    started = time.monotonic()
    with pytest.raises((httpx.ReadTimeout, nk.NodeTimeout)):
        call(slow)
    assert time.monotonic() - started < 2.0


def test_request_outside_a_node_keeps_the_client_timeout(api: DemoAPI) -> None:
    """Without a node there is no deadline: the client's own timeout applies, no key is sent."""
    seen: list[httpx.Request] = []
    with httpx.Client(
        base_url=api.url, timeout=7.0, event_hooks={"request": [seen.append]}
    ) as client:
        response = nh.post(client, "/status/201")
    assert response.status_code == 201
    assert seen[0].extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}
    assert "Idempotency-Key" not in seen[0].headers


# ---------------------------------------------------------------------------- httpbin


@pytest.mark.parametrize(
    ("status", "attempts"),
    [(404, 1), (400, 1), (500, 4), (502, 4), (503, 4), (504, 4), (429, 4), (408, 4), (425, 4)],
)
def test_status_codes_against_httpbin(
    flavor: str, httpbin_url: str, waits: Instant, status: int, attempts: int
) -> None:
    """Retryable statuses are retried (a READ node), other 4xx are not; all raise the status."""
    call = Caller(flavor, httpbin_url)
    if call.is_async:

        @nk.node(name="status", retry=RETRY, effect=nk.Effect.READ)
        async def fetch(*, http: httpx.AsyncClient = nk.resource()) -> None:
            await nh.aget(http, f"/status/{status}")

    else:

        @nk.node(name="status", retry=RETRY, effect=nk.Effect.READ)
        def fetch(*, http: httpx.Client = nk.resource()) -> None:
            nh.get(http, f"/status/{status}")

    with pytest.raises(httpx.HTTPStatusError) as caught:
        call(fetch)

    assert isinstance(caught.value, nh.HTTPStatusError)
    assert caught.value.status_code == status
    assert len(call.sent) == attempts
    assert len(waits.sleeps) == attempts - 1


def test_raise_for_status_false_returns_client_errors_but_raises_retryable_ones(
    httpbin_url: str,
) -> None:
    """``raise_for_status=False`` hands back a 418; a 503 still raises for the attempt loop."""
    with httpx.Client(base_url=httpbin_url) as client:
        assert nh.get(client, "/status/418", raise_for_status=False).status_code == 418
        with pytest.raises(nh.HTTPStatusError):
            nh.get(client, "/status/503", raise_for_status=False)
        assert nh.get(client, "/status/204").status_code == 204


async def test_async_helpers_against_httpbin(httpbin_url: str) -> None:
    """The async twins send what they are given (`/anything` echoes it)."""
    async with httpx.AsyncClient(base_url=httpbin_url) as client:
        response = await nh.arequest(
            client, "post", "/anything", json={"a": 1}, params={"page": 2}, idempotency_key="k-1"
        )
    echoed = response.json()
    assert echoed["json"] == {"a": 1}
    assert echoed["args"] == {"page": "2"}
    assert echoed["headers"]["Idempotency-Key"] == "k-1"


def test_httpbin_sees_the_derived_key(flavor: str, httpbin_url: str) -> None:
    """The header httpbin received is the node's `idempotency_key_for("POST /anything")`."""
    call = Caller(flavor, httpbin_url)
    idem = nk.Idempotency(key=lambda ref: ref, store=nk.MemoryStore())
    if call.is_async:

        @nk.node(name="echo", idempotency=idem)
        async def echo(ref: str, *, http: httpx.AsyncClient = nk.resource()) -> str:
            response = await nh.apost(http, "/anything", json={"ref": ref})
            return str(response.json()["headers"]["Idempotency-Key"])

    else:

        @nk.node(name="echo", idempotency=idem)
        def echo(ref: str, *, http: httpx.Client = nk.resource()) -> str:
            response = nh.post(http, "/anything", json={"ref": ref})
            return str(response.json()["headers"]["Idempotency-Key"])

    @nk.node(name="echo", idempotency=nk.Idempotency(key=lambda ref: ref, store=nk.MemoryStore()))
    def expected(ref: str) -> str:
        return nk.context().idempotency_key_for("POST /anything")

    received = call(echo, "ref-1")
    assert received == expected("ref-1")
    assert len(received) >= 32


SECRETS = ("Bearer tok-3xq9", "session=ck-8812", "apikey-77aa", "qs-secret-5150")


def test_secret_headers_are_sent_but_never_reported(
    flavor: str, httpbin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Authorization, Cookie and X-Api-Key reach the server and appear in no event or log line."""
    call = Caller(flavor, httpbin_url)
    headers = {"Authorization": SECRETS[0], "Cookie": SECRETS[1], "X-Api-Key": SECRETS[2]}
    params = {"api_key": SECRETS[3], "page": "3"}
    if call.is_async:

        @nk.node(name="secretive", retry=RETRY)
        async def secretive(*, http: httpx.AsyncClient = nk.resource()) -> Any:
            return (await nh.apost(http, "/anything", headers=headers, params=params)).json()

        @nk.node(name="failing", retry=None)
        async def failing(*, http: httpx.AsyncClient = nk.resource()) -> Any:
            await nh.apost(http, "/status/401", headers=headers, params=params)

    else:

        @nk.node(name="secretive", retry=RETRY)
        def secretive(*, http: httpx.Client = nk.resource()) -> Any:
            return nh.post(http, "/anything", headers=headers, params=params).json()

        @nk.node(name="failing", retry=None)
        def failing(*, http: httpx.Client = nk.resource()) -> Any:
            nh.post(http, "/status/401", headers=headers, params=params)

    caplog.set_level(logging.DEBUG, logger="nodekit")
    with capture_events() as events:
        echoed = call(secretive)
        with pytest.raises(nh.HTTPStatusError) as caught:
            call(failing)

    assert echoed["headers"]["Authorization"] == SECRETS[0]
    assert echoed["headers"]["X-Api-Key"] == SECRETS[2]
    reported = [repr(event) + repr(event.as_dict()) for event in events]
    ours = [record for record in caplog.records if record.name.startswith("nodekit")]
    assert any("http.response" in record.getMessage() for record in ours)
    reported += [record.getMessage() + repr(record.__dict__) for record in ours]
    reported.append(str(caught.value))
    for text in reported:
        for secret in SECRETS:
            assert secret not in text
    urls = [event["url"] for event in events.named("http.response")]
    assert urls[0].endswith("/anything?api_key=***&page=3")
    assert any(event.name == "node.failed" for event in events)


def test_redact_url_drops_user_info_and_secret_query_values() -> None:
    url = "https://user:pw@api.example.com:8443/v1/pay?token=abc&page=2&signature=x"
    assert (
        nh.redact_url(url) == "https://api.example.com:8443/v1/pay?token=***&page=2&signature=***"
    )
    assert nh.redact_url("http://[::1]:8080/x?q=1") == "http://[::1]:8080/x?q=1"
    assert nh.redact_url("/relative?password=p") == "/relative?password=***"


def test_retry_after_http_date_is_parsed() -> None:
    """``Retry-After`` as an HTTP date becomes seconds from now."""
    request = httpx.Request("GET", "https://api.example.com/")
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    response = httpx.Response(503, headers={"Retry-After": when}, request=request)
    error = nh.HTTPStatusError("503", request=request, response=response)
    assert error.retry_after is not None
    assert 25 <= error.retry_after <= 31
    assert nk.classify(error) == "safe"


def test_deadline_already_passed_is_a_safe_timeout(api: DemoAPI) -> None:
    """A request asked for after the deadline is not sent: a `NodeTimeout` classified safe."""

    @nk.node(name="late", timeout=nk.Timeout(total=0.2), effect=nk.Effect.READ)
    async def late(http: httpx.AsyncClient) -> None:
        ctx = nk.context()
        ctx.deadline = time.monotonic() - 1  # as if the budget were spent
        await nh.aget(http, "/status/200")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=api.url) as client:
            await late(client)

    with pytest.raises(nk.NodeTimeout) as caught:
        asyncio.run(main())
    assert nk.classify(caught.value) == "safe"
    assert len(api.ledger) == 0


def test_missing_httpx_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delitem(sys.modules, "nodekit.http")
    with pytest.raises(ImportError, match=r"pip install 'nodekit\[http\]'"):
        importlib.import_module("nodekit.http")
