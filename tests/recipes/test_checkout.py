"""recipes.checkout: every order is charged once, sent one receipt, takes its stock once and
gets one audit file, through faults, second runs and a SIGKILL.

Effects are counted where they happen, never from counters inside the recipe: charges and
receipts from the DemoAPI's ledger (the API verifies every receipt's ``X-Signature``), the
stock from the SQLite database, the audit records from their files. nodekit's waits are
instant; the recipe's timeouts are real, so the tests' own fault plans have no "slow" answers
(the demo's plan, the recipe's, has a few).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nodekit.testing import FaultPlan, Instant, capture_events
from nodekit.testing._server import FAULT_KINDS
from recipes import checkout
from recipes._demo_api import DemoAPI, DemoLedger

WORKER = Path(__file__).with_name("_checkout_worker.py")
FAST_KINDS = tuple(kind for kind in FAULT_KINDS if kind != "slow")  # timeouts are real
STOCK = 100_000
NODES = ("reserve_stock", "charge_payment", "send_receipt", "write_audit")
AUDIT_FIELDS = {"order_id", "sku", "qty", "amount_cents", "remaining_stock", "charge_id"}
# Every kind of fault early on, on both routes, spread out so that no node meets them all in a
# row; then a seeded 25 % of requests fail.
SCRIPT: dict[str, Any] = {
    "POST /charges": ["drop_after", None, "503", None, "drop_before", None, "429", "drop_after"],
    "POST /webhooks": ["drop_after", None, "429", None, "drop_before", None, "503"],
}


def plan(seed: int, rate: float, script: Any = ()) -> FaultPlan:
    return FaultPlan(seed=seed, rate=rate, kinds=FAST_KINDS, script=script, retry_after=0)


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    with DemoAPI(faults=plan(7, 0.25, SCRIPT), webhook_secret=checkout.WEBHOOK_SECRET) as server:
        yield server


def run(api: DemoAPI, data: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = checkout.main(["--api-url", api.url, "--data-dir", str(data), *extra], out=out)
    return code, out.getvalue()


# ---------------------------------------------------------------------------- effects


def stock(data: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(data / "checkout.sqlite")) as db:
        return dict(db.execute("SELECT sku, qty FROM checkout_stock").fetchall())


def audit_files(data: Path) -> dict[str, Path]:
    """order id -> audit file (a killed write may leave a temporary `.<name>.<hex>.tmp`)."""
    return {path.stem: path for path in (data / "audit").glob("*.json")}


def check_effects(
    ledger: DemoLedger, data: Path, orders: Sequence[checkout.Order], initial: int = STOCK
) -> None:
    """Each order: one charge, one receipt naming that charge, its stock taken once, one
    audit file holding the order, its charge and a remaining stock consistent with the rest."""
    ids = [order.order_id for order in orders]
    charges: dict[str, list[str]] = defaultdict(list)
    for entry in ledger.find(route="POST /charges", effect=True):
        charges[entry.data["order_id"]].append(entry.data["id"])
    assert {order: len(made) for order, made in charges.items()} == dict.fromkeys(ids, 1)
    for order_id in ids[:3]:
        assert len(ledger.charges_for(order_id)) == 1
    receipts: dict[str, list[str]] = defaultdict(list)
    for entry in ledger.deliveries("receipts"):
        receipts[entry.data["event"]["order_id"]].append(entry.data["event"]["charge_id"])
    assert dict(receipts) == {order: charges[order] for order in ids}

    taken: Counter[str] = Counter()
    for order in orders:
        taken[order.sku] += order.qty
    assert stock(data) == {sku: initial - qty for sku, qty in taken.items()}

    files = audit_files(data)
    assert sorted(files) == sorted(ids)
    remaining: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for order in orders:
        record = json.loads(files[order.order_id].read_text(encoding="utf-8"))
        assert set(record) == AUDIT_FIELDS
        assert record == {
            **order.model_dump(include={"order_id", "sku", "qty", "amount_cents"}),
            "charge_id": charges[order.order_id][0],
            "remaining_stock": record["remaining_stock"],
        }
        remaining[order.sku].append((record["remaining_stock"], order.qty))
    # The stock each order saw is that of one serial order of the transactions, per SKU.
    for sku, seen in remaining.items():
        level = initial
        for left, qty in sorted(seen, reverse=True):
            level -= qty
            assert left == level, (sku, seen)


def snapshot(data: Path) -> dict[str, tuple[bytes, int]]:
    return {
        order: (path.read_bytes(), path.stat().st_mtime_ns)
        for order, path in audit_files(data).items()
    }


# ---------------------------------------------------------------------------- runs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_order_is_charged_once_through_faults_and_a_second_run_replays_everything(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, mode: str
) -> None:
    count = 12
    orders = checkout.make_orders(count, prefix="t")
    args = ("--orders", str(count), "--mode", mode, "--prefix", "t", "--concurrency", "4")

    code, out = run(api, tmp_path, *args)
    assert code == 0, out
    assert f"{count} of {count} orders completed" in out
    check_effects(api.ledger, tmp_path, orders)
    # The faults were met, the ambiguous one included: a charge made, its answer lost, and
    # the retry answered from the API's idempotency store rather than charged again.
    assert {entry.fault for entry in api.ledger if entry.fault} == set(FAST_KINDS)
    assert api.ledger.find(route="POST /charges", fault="drop_after", effect=True)
    assert api.ledger.find(route="POST /charges", outcome="replayed")
    assert all(api.ledger.keys("POST /charges"))
    assert all(api.ledger.keys("POST /webhooks"))
    assert "attempts:" in out
    assert "connection dropped" in out

    requests, files, levels = len(api.ledger), snapshot(tmp_path), stock(tmp_path)
    with capture_events(prefix="flow.") as events:
        code, again = run(api, tmp_path, *args)
    assert code == 0, again
    assert len(api.ledger) == requests  # not one request: every node came from the journal
    assert stock(tmp_path) == levels
    assert snapshot(tmp_path) == files
    check_effects(api.ledger, tmp_path, orders)
    skipped = Counter(event.node for event in events.named("flow.node_skipped"))
    assert skipped == dict.fromkeys(NODES, count)
    assert not events.named("flow.node_finished")
    assert f"node results replayed from the journal: {4 * count}" in again
    assert again.count("replayed from the journal: " + ", ".join(NODES)) == count


def test_an_order_begun_in_async_mode_is_replayed_in_sync_mode(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """The async nodes share their names (and so their journal entries and keys) with the sync ones."""
    args = ("--orders", "5", "--prefix", "x", "--quiet")
    assert run(api, tmp_path, *args, "--mode", "async")[0] == 0
    requests = len(api.ledger)
    code, out = run(api, tmp_path, *args, "--mode", "sync")
    assert code == 0, out
    assert len(api.ledger) == requests
    assert "node results replayed from the journal: 20" in out
    check_effects(api.ledger, tmp_path, checkout.make_orders(5, prefix="x"))


def test_orders_out_of_stock_fail_alone_without_a_retry_or_a_charge(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """Not enough stock is a business error: not retried, nothing charged, the run exits 1."""
    orders = checkout.make_orders(6, prefix="s")
    level = {order.sku: 2 for order in orders}
    served = []
    for order in orders:  # sync mode: the orders in turn
        if level[order.sku] >= order.qty:
            level[order.sku] -= order.qty
            served.append(order)
    assert 0 < len(served) < len(orders)
    with capture_events() as events:
        code, out = run(api, tmp_path, "--orders", "6", "--prefix", "s", "--stock", "2")
    assert code == 1
    charged = [
        entry.data["order_id"] for entry in api.ledger.find(route="POST /charges", effect=True)
    ]
    assert sorted(charged) == [order.order_id for order in served]
    assert stock(tmp_path) == level
    assert sorted(audit_files(tmp_path)) == [order.order_id for order in served]
    assert not events.for_node("reserve_stock").named("node.retrying")
    for order in orders:
        if order not in served:
            assert f"{order.order_id}  FAILED at reserve_stock: OutOfStock" in out


@pytest.mark.slow
def test_a_thousand_async_orders_through_faults_are_each_charged_exactly_once(
    tmp_path: Path, nk_instant: Instant
) -> None:
    count = 1_000
    with DemoAPI(faults=plan(11, 0.15), webhook_secret=checkout.WEBHOOK_SECRET) as api:
        code, out = run(
            api,
            tmp_path,
            *("--orders", str(count), "--mode", "async", "--concurrency", "32", "--quiet"),
        )
        assert code == 0, out
        assert f"{count} of {count} orders completed" in out
        assert len(api.ledger.find(fault="drop_after")) > 10
        check_effects(api.ledger, tmp_path, checkout.make_orders(count))


# ---------------------------------------------------------------------------- compensation


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_order_whose_receipt_is_refused_is_refunded_and_its_stock_released_once(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, mode: str
) -> None:
    """The receipt API refuses one order for good (403): its charge is refunded and its stock
    released, each exactly once (the API's ledger, the database); a second run of the same
    orders replays the compensation instead of refunding again."""
    count, declined = 6, "r-0002"
    orders = checkout.make_orders(count, prefix="r")
    kept = [order for order in orders if order.order_id != declined]
    args = ("--orders", str(count), "--prefix", "r", "--mode", mode, "--concurrency", "3")
    api.refuse_receipts(declined)  # what --refuse-receipt does to the local API
    with capture_events() as events:
        code, out = run(api, tmp_path, *args)
    assert code == 0, out  # a declined order undone completely is settled
    assert f"{count - 1} of {count} orders completed" in out
    assert "1 compensated (charge refunded, stock released)" in out
    charge = api.ledger.charges_for(declined)
    assert len(charge) == 1
    refunds = api.ledger.refunds_for(declined)
    assert [entry.data["charge_id"] for entry in refunds] == [charge[0].data["id"]]
    assert len(api.ledger.find(route="POST /refunds", effect=True)) == 1
    assert all(api.ledger.keys("POST /refunds"))  # sent with the compensation's own key
    delivered = {entry.data["event"]["order_id"] for entry in api.ledger.deliveries("receipts")}
    assert delivered == {order.order_id for order in kept}
    taken: Counter[str] = Counter()
    for order in kept:
        taken[order.sku] += order.qty
    assert stock(tmp_path) == {sku: STOCK - taken[sku] for sku in {o.sku for o in orders}}
    assert sorted(audit_files(tmp_path)) == [order.order_id for order in kept]
    assert not (tmp_path / "outbox" / f"{declined}.json").exists()  # refused, not queued
    undone = events.for_node("charge_payment").named("node.compensated")
    assert [event.run_id for event in undone] == [f"checkout:{declined}"]
    assert [e.node for e in events.named("node.compensated")] == [
        "charge_payment",
        "reserve_stock",
    ]
    assert not events.named("node.compensation_failed")

    requests, levels = len(api.ledger), stock(tmp_path)
    code, again = run(api, tmp_path, *args)
    assert code == 0, again
    assert len(api.ledger) == requests  # no refund sent again, no receipt retried
    assert stock(tmp_path) == levels
    assert len(api.ledger.refunds_for(declined)) == 1
    assert f"{declined}  charge_payment  compensated (done before" in again


# ---------------------------------------------------------------------------- SIGKILL


def charges_on_file(path: Path) -> int:
    """The charges made so far, by the ledger file the DemoAPI appends to."""
    return len(DemoAPI.read_ledger(path).find(route="POST /charges", effect=True))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_batch_killed_midway_resumes_with_every_order_charged_once(
    tmp_path: Path, mode: str
) -> None:
    """SIGKILL once some orders are charged (by the ledger file), then the same command again."""
    count, kill_after = 120, 30
    data, ledger_path = tmp_path / "data", tmp_path / "ledger.jsonl"
    server = DemoAPI(
        faults=plan(5, 0.15), webhook_secret=checkout.WEBHOOK_SECRET, ledger_path=ledger_path
    )
    with server as api:
        command = [
            sys.executable,
            str(WORKER),
            *("--api-url", api.url, "--data-dir", str(data), "--orders", str(count)),
            *("--mode", mode, "--concurrency", "8", "--prefix", "k", "--quiet"),
        ]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while charges_on_file(ledger_path) < kill_after:
                assert proc.poll() is None, "the worker finished before it could be killed"
                assert time.monotonic() < deadline, "the worker charged too few orders"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert proc.wait() == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        charged = len(api.ledger.find(route="POST /charges", effect=True))
        assert kill_after <= charged < count  # killed mid-batch

        # A killed node holds its order's journal entry until its lease runs out.
        time.sleep(max(0.0, killed_at + checkout.LEASE + 0.5 - time.monotonic()))
        final = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert final.returncode == 0, final.stdout + final.stderr
        assert f"{count} of {count} orders completed" in final.stdout
        assert "node results replayed from the journal: " in final.stdout

        on_file = DemoAPI.read_ledger(ledger_path)
        assert len(on_file) == len(api.ledger)
        for ledger in (api.ledger, on_file):
            check_effects(ledger, data, checkout.make_orders(count, prefix="k"))


# ---------------------------------------------------------------------------- the command line


def test_demo_shows_both_passes_and_no_second_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nk_instant: Instant
) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert checkout.main(["--demo", "--data-dir", "tmp"], out=out) == 0
    text = out.getvalue()
    first, _, second = text.partition("second pass:")
    assert "first pass: every node runs" in first
    assert second, text
    # the tour's 7th order is refused a receipt for good: refunded, its stock released, and
    # the second pass replays that too (nothing refunded twice)
    declined = "o-0007"
    for part in (first, second):
        assert "19 of 20 orders completed in" in part
        assert ", 1 compensated (charge refunded, stock released)" in part
        assert f"refunds in the API's ledger: 1 for {declined} (no order refunded twice)" in part
    assert f"{declined}  charge_payment  compensated\n" in first
    assert f"{declined}  reserve_stock   compensated\n" in first
    assert f"{declined}  charge_payment  compensated (done before" in second
    assert "charges in the API's ledger: 20 for 20 orders, 20 new in this pass" in first
    assert "charges in the API's ledger: 20 for 20 orders, 0 new in this pass" in second
    assert first.count("no order charged twice") == 1
    assert second.count("no order charged twice") == 1
    assert "every effect is replayed, not repeated" in second
    assert "node results replayed from the journal: 78" in second  # 19 x 4, and 2
    assert "CHARGED TWICE" not in text
    # the guards act on the first pass: the rate limit spaces the calls, the breaker holds
    # through the demo's faults, nothing falls back; the replayed pass never reaches them
    waits = re.search(r"rate limit payments-api: (\d+) calls waited their turn", first)
    assert waits is not None, first
    assert int(waits[1]) > 0
    assert "circuit payments-api: closed throughout; 0 calls rejected" in first
    assert "fallbacks: 0" in first
    assert "rate limit payments-api" not in second
    data = tmp_path / "tmp" / "demo"
    kept = [order for order in checkout.make_orders(20) if order.order_id != declined]
    assert sorted(audit_files(data)) == [order.order_id for order in kept]
    assert sum(stock(data).values()) == 3 * STOCK - sum(order.qty for order in kept)


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        checkout.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--api-url",
        "--db-url",
        "--data-dir",
        "--faults",
        "--seed",
        "--orders",
        "--mode",
        "--concurrency",
        "--stock",
        "--journal",
        "--prefix",
        "--again",
        "--quiet",
        "--plain",
        "--demo",
        "--outage",
    ):
        assert flag in text
