"""recipes.checkout's guards: one circuit breaker and one rate limit (``payments-api``) on the
two API calls, a receipt queued in the outbox when it cannot be sent, never a charge hidden.

What reached the API is counted in the DemoAPI's ledger, never by a counter in the recipe;
what the guards did, by nodekit's events. nodekit's waits are instant (`nk_instant`).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import nodekit as nk
from nodekit.testing import FaultPlan, Instant, capture_events
from nodekit.testing._server import FAULT_KINDS
from recipes import checkout
from recipes._demo_api import DemoAPI

FAST_KINDS = tuple(kind for kind in FAULT_KINDS if kind != "slow")  # timeouts are real
GUARD_LINE = re.compile(
    r"rate limit payments-api: (\d+) calls waited their turn \(([\d.]+) s summed over the calls\), "
    r"(\d+) rejected, (\d+) pauses for a Retry-After"
)
CIRCUIT_LINE = re.compile(
    r"circuit payments-api: (.+); (\d+) calls rejected without reaching the API"
)
FALLBACK_LINE = re.compile(r"fallbacks: (\d+)")


def run(api: DemoAPI, data: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = checkout.main(["--api-url", api.url, "--data-dir", str(data), *extra], out=out)
    return code, out.getvalue()


def charges(api: DemoAPI) -> Counter[str]:
    return Counter(
        entry.data["order_id"] for entry in api.ledger.find(route="POST /charges", effect=True)
    )


def receipts(api: DemoAPI) -> Counter[str]:
    return Counter(entry.data["event"]["order_id"] for entry in api.deliveries("receipts"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_summary_counts_what_the_guards_did_as_their_events_tell(
    tmp_path: Path, nk_instant: Instant, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the usual faults: the limit makes calls wait, the breaker stays closed, no
    fallback; the summary's counts are those of nodekit's events."""
    # 10 calls/s: the ~30 calls of 12 orders come faster than that whatever the machine's
    # load, so some must wait (instantly, `nk_instant`), well within the 15 s deadline
    monkeypatch.setattr(checkout, "RATE", 10.0)
    plan = FaultPlan(seed=7, rate=0.25, kinds=FAST_KINDS, retry_after=0)
    count = 12
    with (
        DemoAPI(faults=plan, webhook_secret=checkout.WEBHOOK_SECRET) as api,
        capture_events() as events,
    ):
        code, out = run(api, tmp_path, "--orders", str(count), "--mode", mode, "--concurrency", "4")
        assert code == 0, out
        assert charges(api) == dict.fromkeys(charges(api), 1)
        assert len(charges(api)) == count
        assert receipts(api) == dict.fromkeys(charges(api), 1)

    limit = GUARD_LINE.search(out)
    assert limit is not None, out
    waited = events.named("rate_limit.waited")
    assert int(limit[1]) == len(waited) > 0
    assert float(limit[2]) == pytest.approx(sum(event["wait"] for event in waited), abs=0.01)
    assert int(limit[3]) == len(events.named("rate_limit.rejected")) == 0
    assert int(limit[4]) == len(events.named("rate_limit.paused"))
    circuit = CIRCUIT_LINE.search(out)
    assert circuit is not None, out
    assert circuit[1] == "closed throughout"
    assert int(circuit[2]) == len(events.named("circuit.rejected")) == 0
    assert not events.named("circuit.opened")
    fallbacks = FALLBACK_LINE.search(out)
    assert fallbacks is not None
    assert int(fallbacks[1]) == len(events.named("node.fallback")) == 0
    # every guarded call went through the one shared limit
    assert {event.fields["limit"] for event in waited} == {"payments-api"}
    assert {event.node for event in waited} <= {"charge_payment", "send_receipt"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_outage_opens_the_breaker_queues_the_receipt_and_a_rerun_completes_the_orders(
    tmp_path: Path, nk_instant: Instant, mode: str
) -> None:
    """The API answers 503 to the 9 requests after the first charge: the first receipt falls
    back to the outbox, the breaker opens, and the later charges are refused before they
    reach the API. Nothing is charged twice; once the API is back, a re-run completes them."""
    count = 6
    # one order at a time in async mode too: which request meets the outage is then fixed
    args = ("--orders", str(count), "--mode", mode, "--concurrency", "1", "--prefix", "u")
    ids = [order.order_id for order in checkout.make_orders(count, prefix="u")]
    breaker = checkout.BREAKER["min_calls"]
    with DemoAPI(webhook_secret=checkout.WEBHOOK_SECRET) as api:
        api.outage(9, after_charges=1)  # what `--outage 9` does to the recipe's local API
        with capture_events() as events:
            code, out = run(api, tmp_path, *args)
        assert code == 1, out
        # the breaker opened and refused calls; every refused call is absent from the ledger
        assert len(events.named("circuit.opened")) >= 1
        rejected = events.named("circuit.rejected")
        assert rejected
        assert re.search(r"circuit payments-api: \d+ opened", out), out
        circuit = CIRCUIT_LINE.search(out)
        assert circuit is not None
        assert int(circuit[2]) == len(rejected)
        # what reached the API: u-0001's charge, its receipt's 8 attempts (all 503: it falls
        # back), u-0002's first charge attempt, which opens the breaker — then nothing
        assert len(api.ledger) == breaker
        assert len(api.ledger.find(outcome="fault")) == 9
        assert charges(api) == dict.fromkeys(charges(api), 1)  # no order charged twice
        charged_first = set(charges(api))
        assert charged_first == {"u-0001"}
        # the receipt of a charged order fell back: queued in the outbox, not delivered
        fell_back = events.named("node.fallback")
        assert fell_back, out
        assert {event.node for event in fell_back} == {"send_receipt"}
        assert FALLBACK_LINE.search(out)[1] == str(len(fell_back))  # type: ignore[index]
        queued = {path.stem for path in (tmp_path / "outbox").glob("*.json")}
        assert queued
        assert queued <= charged_first
        assert queued == {"u-0001"}
        assert not receipts(api).keys() & queued
        first = min(queued)
        record = json.loads((tmp_path / "outbox" / f"{first}.json").read_text(encoding="utf-8"))
        assert record["order_id"] == first
        assert record["charge_id"] == charges_ids(api)[first]
        # never a fallback for a charge: those orders failed, and say so
        assert not events.for_node("charge_payment").named("node.fallback")
        assert "FAILED at charge_payment: CircuitOpen" in out

        # The API is back; the breaker (its state in the journal's SQLite store) is closed
        # by hand rather than by waiting `open_for` seconds.
        store = nk.SQLiteStore(tmp_path / "journal.sqlite")
        try:
            breaker_here = checkout.guards(store)[0]
            assert breaker_here.state == "open"  # shared: this process sees it open
            breaker_here.reset()
        finally:
            store.close()
        before = len(api.ledger)
        code, again = run(api, tmp_path, *args)
        assert code == 0, again
        assert f"{count} of {count} orders completed" in again
        assert charges(api) == dict.fromkeys(ids, 1)  # each order charged exactly once
        # the orders charged before the outage were not charged again; their queued
        # receipts stay queued (the journal replays the fallback's result)
        assert set(receipts(api)) == set(ids) - queued
        new = api.ledger.entries[before:]
        assert not [
            entry
            for entry in new
            if entry.path == "/charges" and entry.data.get("order_id") in charged_first
        ]
        assert "circuit payments-api: closed throughout" in again


def charges_ids(api: DemoAPI) -> dict[str, str]:
    return {
        entry.data["order_id"]: entry.data["id"]
        for entry in api.ledger.find(route="POST /charges", effect=True)
    }


def test_the_guards_live_in_the_journals_store_when_processes_can_share_it(
    tmp_path: Path,
) -> None:
    store = nk.SQLiteStore(tmp_path / "journal.sqlite")
    try:
        assert checkout._guard_store(store) is store
        breaker, limit = checkout.guards(store)
        assert breaker.store is store
        assert limit.store is store
        breaker.isolate()
        assert checkout.guards(store)[0].state == "isolated"  # one state, by name
        breaker.reset()
    finally:
        store.close()
    assert checkout._guard_store(nk.MemoryStore()) is None


def test_outage_flag_makes_the_local_api_go_down_after_the_first_charge(
    tmp_path: Path, nk_instant: Instant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--outage N`` on the recipe's own local API: one order charged and its receipt queued,
    the breaker opened, the other orders refused before a charge (by the summary of the
    API's ledger)."""
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    args = ["--data-dir", "d", "--orders", "4", "--outage", "9", "--quiet"]
    assert checkout.main(args, out=out) == 1
    text = out.getvalue()
    assert "charges in the API's ledger: 1 for 1 orders" in text, text
    assert "no order charged twice" in text
    assert "faults the local API injected so far: 503 x9" in text
    assert "circuit payments-api: 1 opened; 3 calls rejected without reaching the API" in text
    assert "fallbacks: 1 (send_receipt x1: receipts queued in outbox/ for later)" in text
    assert [path.name for path in (tmp_path / "d" / "outbox").iterdir()] == ["o-0001.json"]
