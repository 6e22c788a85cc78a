"""`LocalAPI`: the fault-injecting server the integration tests and recipes count effects on.

Most tests drive it through the demo shop's routes (`recipes._demo_api.DemoAPI`); the
route-registration tests use a bare `LocalAPI`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nodekit.testing import APIRequest, APIResponse, FaultPlan, LocalAPI
from recipes._demo_api import DemoAPI


def post_charge(client: httpx.Client, order: str, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/charges", json={"order_id": order, "amount": 10}, headers=headers)


# ---------------------------------------------------------------------------- ledger


def test_ledger_records_every_request_and_counts_charges(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        first = post_charge(client, "o-1", key="k-1")
        post_charge(client, "o-1")
        client.get("/items")

    assert first.status_code == 201
    assert first.json() == {"id": "ch_000001", "order_id": "o-1", "amount": 10}
    assert [(e.method, e.path, e.idempotency_key, e.status) for e in api.ledger] == [
        ("POST", "/charges", "k-1", 201),
        ("POST", "/charges", None, 201),
        ("GET", "/items", None, 200),
    ]
    assert len(api.charges_for("o-1")) == 2
    assert api.ledger.find(effect=False, method="GET")[0].path == "/items"


def test_ledger_file_is_readable_from_another_process(tmp_path: Path) -> None:
    """Each entry is appended as a JSON line as it happens; `Ledger.load` reads it back."""
    path = tmp_path / "ledger.jsonl"
    with DemoAPI(ledger_path=path) as server, httpx.Client(base_url=server.url) as client:
        post_charge(client, "o-2", key="k-2")
        post_charge(client, "o-2", key="k-2")
        counted = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from recipes._demo_api import DemoAPI; "
                "print(len(DemoAPI.read_ledger(sys.argv[1]).charges_for('o-2')))",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        in_memory = server.ledger.entries
    assert counted.stdout.strip() == "1"
    assert DemoAPI.read_ledger(path).entries == in_memory
    assert [json.loads(line)["outcome"] for line in path.read_text().splitlines()] == [
        "processed",
        "replayed",
    ]


def test_standalone_server_process(tmp_path: Path) -> None:
    """``python -m recipes._demo_api`` serves until terminated and writes its ledger."""
    ledger = tmp_path / "ledger.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "recipes._demo_api", "--port", "0", "--ledger", str(ledger)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url) as client:
            assert post_charge(client, "o-3", key="k-3").status_code == 201
            assert post_charge(client, "o-3", key="k-3").headers["Idempotent-Replayed"] == "true"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()
    assert len(DemoAPI.read_ledger(ledger).charges_for("o-3")) == 1


# ---------------------------------------------------------------------------- Idempotency-Key


def test_repeat_with_the_same_key_replays_the_stored_response(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        first = post_charge(client, "o-4", key="k-4")
        second = post_charge(client, "o-4", key="k-4")
    assert second.status_code == first.status_code == 201
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(api.charges_for("o-4")) == 1


def test_same_key_with_another_body_is_422(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        post_charge(client, "o-5", key="k-5")
        other = post_charge(client, "o-6", key="k-5")
    assert other.status_code == 422
    assert api.charges_for("o-6") == []
    assert api.ledger.entries[-1].outcome == "mismatch"


def test_duplicate_while_in_flight_is_409(api: DemoAPI) -> None:
    gate = api.gate("POST /charges")
    answers: list[httpx.Response] = []

    def first() -> None:
        with httpx.Client(base_url=api.url) as client:
            answers.append(post_charge(client, "o-7", key="k-7"))

    thread = threading.Thread(target=first)
    thread.start()
    assert gate.arrived.wait(5)
    with httpx.Client(base_url=api.url) as client:
        duplicate = post_charge(client, "o-7", key="k-7")
        gate.release()
        thread.join()
        after = post_charge(client, "o-7", key="k-7")

    assert duplicate.status_code == 409
    assert duplicate.headers["Retry-After"] == "1"
    assert answers[0].status_code == 201
    assert after.headers["Idempotent-Replayed"] == "true"
    assert len(api.charges_for("o-7")) == 1


def test_server_errors_are_not_stored_for_replay(api: DemoAPI) -> None:
    """A 5xx answer releases the key: the next request with it is processed again."""
    with httpx.Client(base_url=api.url) as client:
        assert client.post("/status/500", headers={"Idempotency-Key": "k"}).status_code == 500
        again = client.post("/status/500", headers={"Idempotency-Key": "k"})
    assert "Idempotent-Replayed" not in again.headers
    assert [entry.outcome for entry in api.ledger] == ["processed", "processed"]


# ---------------------------------------------------------------------------- faults


def test_503_and_429_carry_retry_after_and_process_nothing(api: DemoAPI) -> None:
    api.fail_next("503", "429")
    with httpx.Client(base_url=api.url) as client:
        answers = [post_charge(client, "o-8", key="k-8") for _ in range(3)]
    assert [a.status_code for a in answers] == [503, 429, 201]
    assert [a.headers.get("Retry-After") for a in answers[:2]] == ["1", "1"]
    assert [entry.outcome for entry in api.ledger] == ["fault", "fault", "processed"]
    assert len(api.charges_for("o-8")) == 1


def test_drop_before_processing_records_no_effect(api: DemoAPI) -> None:
    api.fail_next("drop_before")
    with httpx.Client(base_url=api.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            post_charge(client, "o-9", key="k-9")
        retried = post_charge(client, "o-9", key="k-9")
    assert "Idempotent-Replayed" not in retried.headers  # the key was never taken
    [dropped, processed] = api.ledger
    assert (dropped.outcome, dropped.fault, dropped.effect, dropped.status) == (
        "dropped",
        "drop_before",
        False,
        None,
    )
    assert processed.effect
    assert len(api.charges_for("o-9")) == 1


def test_drop_after_processing_records_the_effect(api: DemoAPI) -> None:
    """The ambiguous case: the client sees the same error, but the charge was made."""
    api.fail_next("drop_after")
    with httpx.Client(base_url=api.url) as client, pytest.raises(httpx.RemoteProtocolError):
        post_charge(client, "o-10")
    [entry] = api.ledger
    assert (entry.outcome, entry.fault, entry.effect, entry.status) == (
        "processed",
        "drop_after",
        True,
        None,
    )
    assert len(api.charges_for("o-10")) == 1


def test_slow_answer_times_out_after_the_effect(api: DemoAPI) -> None:
    api.fail_next("slow")
    with httpx.Client(base_url=api.url, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            post_charge(client, "o-11")
        assert client.get("/status/200").status_code == 200  # the server is not stuck
    assert len(api.charges_for("o-11")) == 1


def test_scripted_faults_per_route_leave_other_routes_alone() -> None:
    plan = FaultPlan.scripted("503", None, "503", route="POST /charges")
    with DemoAPI(faults=plan) as server, httpx.Client(base_url=server.url) as client:
        codes = []
        for _ in range(4):
            codes.append(client.get("/items").status_code)
            codes.append(post_charge(client, "o-12").status_code)
    assert codes == [200, 503, 200, 201, 200, 503, 200, 201]


def _faults_seen(seed: int) -> list[str | None]:
    plan = FaultPlan(seed=seed, rate=0.5, kinds=("503", "429"), routes=("GET /items",))
    with DemoAPI(faults=plan) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(20):
            client.get("/items")
            client.get("/enrich/x")
        return [entry.fault for entry in server.ledger]


def test_seeded_plan_is_deterministic_and_bounded_to_its_routes() -> None:
    first, again, other = _faults_seen(3), _faults_seen(3), _faults_seen(4)
    assert first == again
    assert first != other
    assert all(fault is None for fault in first[1::2])  # /enrich is not in the plan's routes
    assert {"503", "429"} <= set(first)


def test_fault_plan_validates_its_options() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultPlan(kinds=("boom",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        FaultPlan(rate=2.0)
    with DemoAPI() as server, pytest.raises(ValueError, match="unknown fault"):
        server.fail_next("boom")  # type: ignore[arg-type]


def test_close_ends_requests_held_by_delays(api: DemoAPI) -> None:
    """Closing the server does not wait for a ``/delay/30`` (or a held gate) to finish."""

    def wait_long() -> None:
        with (
            httpx.Client(base_url=api.url, timeout=10) as client,
            contextlib.suppress(httpx.HTTPError),
        ):
            client.get("/delay/30")

    thread = threading.Thread(target=wait_long)
    thread.start()
    time.sleep(0.2)  # let the request reach the server (not a backoff wait)
    started = time.monotonic()
    api.close()
    thread.join(5)
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()


# ---------------------------------------------------------------------------- endpoints


def test_webhooks_verify_signatures_count_deliveries_and_can_be_gone() -> None:
    secret = "whsec-1"
    body = json.dumps({"id": "evt-1"}).encode()
    with DemoAPI(webhook_secret=secret) as server, httpx.Client(base_url=server.url) as client:
        ok = client.post(
            "/webhooks/shop", content=body, headers={"X-Signature": DemoAPI.sign(secret, body)}
        )
        bad = client.post("/webhooks/shop", content=body, headers={"X-Signature": "sha256=00"})
        server.gone("shop")
        gone = client.post(
            "/webhooks/shop", content=body, headers={"X-Signature": DemoAPI.sign(secret, body)}
        )
        deliveries = server.deliveries("shop")
    assert (ok.status_code, bad.status_code, gone.status_code) == (200, 401, 410)
    assert len(deliveries) == 1
    assert deliveries[0].data["event"] == {"id": "evt-1"}


def test_items_are_paged_with_next_links_from_a_seeded_dataset() -> None:
    def fetch_all(seed: int) -> list[dict[str, object]]:
        with DemoAPI(items=23, seed=seed) as server, httpx.Client() as client:
            items: list[dict[str, object]] = []
            url: str | None = f"{server.url}/items?per_page=10"
            while url:
                page = client.get(url).json()
                items += page["items"]
                url = page["next"]
            return items

    items = fetch_all(1)
    assert [item["id"] for item in items] == list(range(1, 24))
    assert items == fetch_all(1)
    assert items != fetch_all(2)


def test_items_reject_bad_paging(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        assert client.get("/items?page=0").status_code == 400
        assert client.get("/items?per_page=x").status_code == 400
        assert client.get("/items?page=99").json()["items"] == []


def test_enrich_status_and_delay_endpoints(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        enriched = client.get("/enrich/sku-1").json()
        assert enriched == client.get("/enrich/sku-1").json()
        assert set(enriched) == {"id", "score", "tier", "tags"}
        limited = client.get("/status/429?retry_after=2")
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "2")
        assert client.get("/delay/0.05").json() == {"delay": 0.05}
        assert client.get("/nowhere").status_code == 404
        assert client.post("/charges", content=b"not json").status_code == 400
        assert len(client.get("/_ledger").json()) == 6  # control paths are not recorded


# ---------------------------------------------------------------------------- routes


def test_registered_routes_get_keys_faults_and_the_ledger() -> None:
    """A bare LocalAPI serves the caller's routes with the same machinery as the demo's."""

    def put_thing(request: APIRequest) -> APIResponse:
        thing = {"name": request.params["name"], "size": request.json()["size"]}
        return APIResponse(201, thing, {"X-Thing": request.headers["x-thing"]}, True, thing)

    with (
        LocalAPI(routes={"PUT /things/{name}": put_thing}) as server,
        httpx.Client(base_url=server.url, headers={"X-Thing": "t"}) as client,
    ):
        first = client.put("/things/box", json={"size": 3}, headers={"Idempotency-Key": "k"})
        again = client.put("/things/box", json={"size": 3}, headers={"Idempotency-Key": "k"})
        server.fail_next("503", route="PUT /things")
        faulted = client.put("/things/bag", json={"size": 1})
        assert client.post("/things/box", json={"size": 3}).status_code == 404  # other method
        assert client.put("/things/box/lid", json={"size": 3}).status_code == 404  # exact path
        assert client.get("/status/418").status_code == 418  # built-in routes stay
    assert (first.status_code, first.json()) == (201, {"name": "box", "size": 3})
    assert (first.headers["X-Thing"], again.headers["Idempotent-Replayed"]) == ("t", "true")
    assert faulted.status_code == 503
    assert [e.data for e in server.ledger.find(route="PUT /things", effect=True)] == [
        {"name": "box", "size": 3}
    ]


def test_a_route_added_while_serving_replaces_the_old_handler(api: DemoAPI) -> None:
    with httpx.Client(base_url=api.url) as client:
        api.route("GET /items", lambda request: APIResponse(200, {"items": "mine"}))
        api.route("/ping", lambda request: APIResponse(200, request.method))
        assert client.get("/items").json() == {"items": "mine"}
        assert client.delete("/ping").json() == "DELETE"  # no method: any method
    with pytest.raises(ValueError, match="a route is"):
        api.route("charges", lambda request: APIResponse(200))
