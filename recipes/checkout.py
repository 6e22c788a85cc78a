"""Checkout: reserve stock, charge the payment, send the receipt, write the audit line.

The flagship recipe: one `nk.Flow` per order, four nodes, each touching the world in its own
way and each made safe to repeat:

- ``reserve_stock``: a SQL write, exactly once (`nodekit.sql.transactional`: the key's row
  commits with the stock update);
- ``charge_payment``: an HTTP POST, keyed (`nk.Idempotency`), sending a stable
  ``Idempotency-Key`` (`nodekit.http`) so the payment API charges once even when a response is
  lost after the charge was made;
- ``send_receipt``: an HMAC-signed webhook, keyed the same way;
- ``write_audit``: the audit record, written atomically and idempotently (`nodekit.files`).

When a later step fails for good (the receipt service refuses the order), the order is undone:
the flow's compensations run in reverse — ``refund_payment`` (an HTTP POST with a stable
``Idempotency-Key``: the compensation's own key, the same on every resume) and
``release_stock`` (a SQL write, exactly once like the reservation) — and the run's journal
records that the order was compensated, so running it again refunds nothing twice.

Both API calls go through one circuit breaker and one rate limit (``payments-api``), kept in
the journal's store when it is SQLite, Redis or PostgreSQL, so every process running orders
shares them: the limit spaces the calls, the breaker stops calling an API that is down. A
receipt that cannot be sent now (the API is down, or the breaker is open) is queued in
``outbox/`` for later — a recorded fallback; a receipt the API refuses for good (a 4xx) is not
queued: the order fails and is compensated. A charge never falls back (its failure must show).
``--outage N`` makes the local API answer 503 to the N requests after the first charge.

Every run has a run id (``checkout:<order id>``) and a durable journal (SQLite by default), so
running an order again — after a crash, or on purpose — replays what completed and runs only
the rest. Sync mode runs orders one after the other; async mode runs them concurrently.

    python -m recipes.checkout --orders 50 --faults 0.2 --mode async
    python -m recipes.checkout --demo          # what `make demo` runs
    python -m recipes.checkout --demo --outage 9    # the breaker opens, a receipt is queued
    python -m recipes.checkout --refuse-receipt o-0003   # that order is refunded, stock released
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
from pydantic import BaseModel

import nodekit as nk
from nodekit import files, sql
from nodekit import http as nkhttp

from . import _progress
from ._common import api_base, connect, data_dir, parser

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Order", "build_flow", "main", "make_orders", "run_orders"]

WEBHOOK_SECRET = "checkout-demo-secret"
RETRY = nk.Retry(attempts=8, initial=0.05, multiplier=2.0, max_wait=1.0, jitter=0.05)
HTTP_TIMEOUT = nk.Timeout(attempt=0.5, total=15)
# How long a crashed run's node blocks a resume of its order (a running node's lease is renewed
# every third of it). The defaults (a node's whole time budget, else 60 s) would make a resume
# started right after a crash fail those orders as "in progress" for up to a minute.
LEASE = 5.0
# The guards of the two API calls. The breaker opens when 80 % of the last 10 s of attempts
# failed, once there are at least 10 of them: the demo's quarter of failing requests (even a
# run of them) never gets there, an API that is down does within ten calls. It stays open for
# 2 s, longer than a retry wait (`RETRY.max_wait`), so a retry that would only meet it again
# stops at once.
BREAKER: dict[str, Any] = {"failure_rate": 0.8, "min_calls": 10, "window": 10.0, "open_for": 2.0}
# 100 calls a second, 5 at once after a pause: the demo's bursts of fast answers wait a few
# milliseconds each (a few hundredths of a second in all), and a Retry-After pauses it.
RATE, BURST = 100.0, 5
# The demo always meets the ambiguous case: the charge is made, then the connection drops
# before the answer arrives. Only the Idempotency-Key keeps the retry from charging again.
DEMO_SCRIPT = {"POST /charges": [None, "drop_after", None, None, "503", None, "drop_after", "429"]}


class Order(BaseModel):
    """The flow's state: the order, then what each node added to it."""

    order_id: str
    sku: str
    qty: int
    amount_cents: int
    remaining_stock: int | None = None
    charge_id: str | None = None
    receipt: str | None = None
    audit_file: str | None = None


class OutOfStock(Exception):
    """Not enough stock: a business error, never retried."""


# The demo's tour declines one order for good: the receipt service refuses it (the 7th order),
# so its charge is refunded and its stock released.
DEMO_REFUSED = 7


def make_orders(count: int, *, prefix: str = "o") -> list[Order]:
    """A deterministic batch of orders over three SKUs."""
    skus = ("sku-red", "sku-green", "sku-blue")
    return [
        Order(
            order_id=f"{prefix}-{i:04d}",
            sku=skus[i % len(skus)],
            qty=1 + i % 3,
            amount_cents=500 + 125 * (i % 7),
        )
        for i in range(1, count + 1)
    ]


# ---------------------------------------------------------------------------- the database


def _q(db: Any, statement: str) -> str:
    """Our statements use ``?`` placeholders; psycopg wants ``%s``."""
    return statement if type(db).__module__.startswith("sqlite3") else statement.replace("?", "%s")


def prepare_database(db: Any, skus: Sequence[str], stock: int) -> None:
    """Create the stock table and give every SKU `stock` units if it has none yet."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS checkout_stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)"
    )
    for sku in skus:
        db.execute(
            _q(
                db,
                "INSERT INTO checkout_stock (sku, qty) VALUES (?, ?) ON CONFLICT (sku) DO NOTHING",
            ),
            (sku, stock),
        )
    if type(db).__module__.startswith("sqlite3"):
        db.commit()


@sql.transactional(name="reserve_stock", key=lambda order_id: order_id, retry=RETRY)
def reserve_stock(order_id: str, sku: str, qty: int, *, db: Any = nk.resource()) -> dict[str, int]:
    """Take `qty` units of `sku`; exactly once per order, whatever retries or resumes do."""
    cur = db.execute(
        _q(db, "UPDATE checkout_stock SET qty = qty - ? WHERE sku = ? AND qty >= ?"),
        (qty, sku, qty),
    )
    if cur.rowcount != 1:
        raise OutOfStock(f"order {order_id}: not enough {sku}")
    row = db.execute(_q(db, "SELECT qty FROM checkout_stock WHERE sku = ?"), (sku,)).fetchone()
    return {"remaining_stock": int(row[0])}


@sql.transactional(name="release_stock", key=lambda order_id: order_id, retry=RETRY)
def release_stock(order_id: str, sku: str, qty: int, *, db: Any = nk.resource()) -> None:
    """`reserve_stock`'s compensation: put the order's units back, exactly once per order."""
    db.execute(_q(db, "UPDATE checkout_stock SET qty = qty + ? WHERE sku = ?"), (qty, sku))


# ---------------------------------------------------------------------------- HTTP nodes


def _signed(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    data = json.dumps(body, sort_keys=True).encode()
    signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), data, hashlib.sha256).hexdigest()
    return data, {"X-Signature": signature, "Content-Type": "application/json"}


_keyed = nk.Idempotency(key=lambda order_id: order_id, lease=LEASE)


@nk.node(name="charge_payment", retry=RETRY, timeout=HTTP_TIMEOUT, idempotency=_keyed)
def charge_payment(
    order_id: str, amount_cents: int, *, http: httpx.Client = nk.resource()
) -> dict[str, str]:
    """Charge the order once: the same Idempotency-Key on every attempt and resume."""
    response = nkhttp.post(http, "/charges", json={"order_id": order_id, "amount": amount_cents})
    return {"charge_id": str(response.json()["id"])}


@nk.node(name="send_receipt", retry=RETRY, timeout=HTTP_TIMEOUT, idempotency=_keyed)
def send_receipt(
    order_id: str,
    charge_id: str,
    *,
    http: httpx.Client = nk.resource(),
    outbox: Path = nk.resource(),
) -> dict[str, str]:
    """Deliver the signed receipt webhook once."""
    body, headers = _signed({"order_id": order_id, "charge_id": charge_id})
    response = nkhttp.post(http, "/webhooks/receipts", content=body, headers=headers)
    return {"receipt": "replayed" if nkhttp.replayed(response) else "delivered"}


@nk.node(name="refund_payment", retry=RETRY, timeout=HTTP_TIMEOUT)
def refund_payment(
    result: dict[str, str], order_id: str, *, http: httpx.Client = nk.resource()
) -> None:
    """`charge_payment`'s compensation: refund the charge once. `result` is the charge's
    update; the ``Idempotency-Key`` is the compensation's own (run id and node), the same on
    every retry and every resume, so the API refunds once."""
    body = {"order_id": order_id, "charge_id": result["charge_id"]}
    nkhttp.post(http, "/refunds", json=body)


@nk.node(name="refund_payment", retry=RETRY, timeout=HTTP_TIMEOUT)
async def arefund_payment(
    result: dict[str, str], order_id: str, *, ahttp: httpx.AsyncClient = nk.resource()
) -> None:
    """The async twin of `refund_payment`."""
    body = {"order_id": order_id, "charge_id": result["charge_id"]}
    await nkhttp.apost(ahttp, "/refunds", json=body)


@nk.node(name="charge_payment", retry=RETRY, timeout=HTTP_TIMEOUT, idempotency=_keyed)
async def acharge_payment(
    order_id: str, amount_cents: int, *, ahttp: httpx.AsyncClient = nk.resource()
) -> dict[str, str]:
    """The async twin of `charge_payment` (same name: the same keys, the same records)."""
    response = await nkhttp.apost(
        ahttp, "/charges", json={"order_id": order_id, "amount": amount_cents}
    )
    return {"charge_id": str(response.json()["id"])}


@nk.node(name="send_receipt", retry=RETRY, timeout=HTTP_TIMEOUT, idempotency=_keyed)
async def asend_receipt(
    order_id: str,
    charge_id: str,
    *,
    ahttp: httpx.AsyncClient = nk.resource(),
    outbox: Path = nk.resource(),
) -> dict[str, str]:
    """The async twin of `send_receipt`."""
    body, headers = _signed({"order_id": order_id, "charge_id": charge_id})
    response = await nkhttp.apost(ahttp, "/webhooks/receipts", content=body, headers=headers)
    return {"receipt": "replayed" if nkhttp.replayed(response) else "delivered"}


# ---------------------------------------------------------------------------- guards, fallback


def guards(store: Any = None) -> tuple[nk.CircuitBreaker, nk.RateLimit]:
    """The breaker and the rate limit of the payments API, their state in `store` (the
    journal's: shared by every process using it) or, without one, in the objects."""
    breaker = nk.CircuitBreaker("payments-api", **BREAKER, store=store)
    return breaker, nk.RateLimit("payments-api", RATE, burst=BURST, store=store)


def refused(error: BaseException | None) -> bool:
    """The API refused the request for good (a 4xx other than 408, 409, 425 or 429)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 425, 429)


def queue_receipt(
    error: Exception, order_id: str, charge_id: str, *, outbox: Path, **_: Any
) -> dict[str, str]:
    """`send_receipt`'s fallback: the receipt could not be sent now (the API is down, or the
    breaker is open), so it goes to the outbox, to be sent later. nodekit calls it only when
    nothing was delivered — never after an ambiguous error (a dropped connection, a timeout).
    A receipt the API refused for good is not queued: the error stands, the order fails and
    its compensations undo it."""
    if refused(error):
        raise error
    body = {"order_id": order_id, "charge_id": charge_id, "reason": type(error).__name__}
    files.put(outbox / f"{order_id}.json", json.dumps(body, sort_keys=True) + "\n")
    return {"receipt": "queued"}


async def aqueue_receipt(
    error: Exception, order_id: str, charge_id: str, *, outbox: Path, **_: Any
) -> dict[str, str]:
    """The async twin of `queue_receipt` (the file is written in a worker thread)."""
    if refused(error):
        raise error
    return await asyncio.to_thread(queue_receipt, error, order_id, charge_id, outbox=outbox)


# ---------------------------------------------------------------------------- the audit file


@nk.node(name="write_audit", retry=nk.Retry(attempts=3, initial=0.05))
def write_audit(state: Order, *, audit_dir: Path = nk.resource()) -> dict[str, str]:
    """One audit record per order, written atomically; writing it again changes nothing."""
    path = audit_dir / f"{state.order_id}.json"
    record = state.model_dump(exclude={"audit_file", "receipt"})
    files.put(path, json.dumps(record, sort_keys=True, indent=2) + "\n")
    return {"audit_file": str(path)}


# ---------------------------------------------------------------------------- the flow


def build_flow(mode: str, db_factory: Callable[[], Any], store: Any = None) -> nk.Flow[Order]:
    """The checkout flow; async mode uses the async HTTP nodes (the SQL and file nodes are
    sync and run in worker threads, never blocking the loop). Both HTTP nodes go through
    the `guards` kept in `store`; a receipt falls back to the outbox (`queue_receipt`). The
    stock and the charge are compensated (`release_stock`, `refund_payment`) when a later
    step fails for good."""
    flow = nk.Flow("checkout", state=Order, resources={"db": db_factory}, lease=LEASE)
    breaker, limit = guards(store)
    charge: Any = acharge_payment if mode == "async" else charge_payment
    receipt: Any = asend_receipt if mode == "async" else send_receipt
    charge = charge.options(circuit=breaker, rate_limit=limit)  # a charge never falls back
    receipt = receipt.options(
        circuit=breaker,
        rate_limit=limit,
        fallback=aqueue_receipt if mode == "async" else queue_receipt,
    )
    refund: Any = arefund_payment if mode == "async" else refund_payment
    flow.add(reserve_stock, compensate=release_stock)
    flow.add(charge, after=[reserve_stock.name], compensate=refund)
    flow.add(receipt, after=["charge_payment"])
    flow.add(write_audit, after=["send_receipt"])
    return flow


class _Database:
    """The `db` resource of one run: connects when entered (in async mode, in a worker
    thread), closes on exit. One connection per run: concurrent runs never share a
    transaction."""

    def __init__(self, db_url: str | None, default: Path) -> None:
        self.db_url, self.default = db_url, default
        self.conn: Any = None

    def __enter__(self) -> Any:
        self.conn = connect(self.db_url, self.default)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _db_factory(db_url: str | None, default: Path) -> Callable[[], Any]:
    return lambda: _Database(db_url, default)


def run_orders(
    orders: Sequence[Order],
    *,
    mode: str,
    api_url: str,
    journal: Any,
    db_factory: Callable[[], Any],
    audit_dir: Path,
    concurrency: int = 16,
) -> dict[str, Any]:
    """Run every order's checkout (resuming any earlier run of the same order).

    Returns ``{order_id: final Order or the FlowError}``.
    """
    flow = build_flow(mode, db_factory, _guard_store(journal))
    outcomes: dict[str, Any] = {}
    idempotency = journal  # one durable store for the journal and the HTTP nodes' keys
    outbox = data_dir(audit_dir.parent / "outbox")
    if mode == "sync":
        with (
            httpx.Client(base_url=api_url, timeout=5.0) as client,
            nk.use(http=client, audit_dir=audit_dir, outbox=outbox, idempotency_store=idempotency),
        ):
            for order in orders:
                try:
                    outcomes[order.order_id] = flow.run(
                        order, run_id=f"checkout:{order.order_id}", store=journal
                    )
                except nk.FlowError as exc:
                    outcomes[order.order_id] = exc
        return outcomes

    async def run_all() -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=api_url, timeout=5.0, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(order: Order) -> None:
                async with gate:
                    try:
                        outcomes[order.order_id] = await flow.arun(
                            order, run_id=f"checkout:{order.order_id}", store=journal
                        )
                    except nk.FlowError as exc:
                        outcomes[order.order_id] = exc

            with nk.use(
                ahttp=client, audit_dir=audit_dir, outbox=outbox, idempotency_store=idempotency
            ):
                await asyncio.gather(*(one(order) for order in orders))

    asyncio.run(run_all())
    return outcomes


def _guard_store(journal: Any) -> Any:
    """Where the guards keep their state: the journal's store if processes can share it
    (SQLite, Redis, PostgreSQL), else the guards' own memory."""
    shared = (nk.SQLiteStore, nk.RedisStore, nk.PostgresStore)
    return journal if isinstance(journal, shared) else None


# ---------------------------------------------------------------------------- progress view


class Progress:
    """An event sink that prints one line per finished node, as the run goes.

    It is a plain consumer of nodekit's one event stream: the attempts and errors it shows
    are the ``node.retrying`` events of that node in that run. With `notes`, a live view
    shows the nodes' progress: the line per node is dropped, and the lines worth reading on
    their own (a failed order, the circuit's changes, a fallback) go to `notes` instead.
    """

    def __init__(
        self,
        out: TextIO = sys.stdout,
        *,
        quiet: bool = False,
        notes: Callable[[str], None] | None = None,
    ) -> None:
        self.out = out
        self.quiet = quiet
        self.notes = notes
        self.lock = threading.Lock()
        self.retries: dict[tuple[str | None, str | None], list[str]] = defaultdict(list)
        self.faults: Counter[str] = Counter()
        self.skipped: dict[str | None, list[str]] = defaultdict(list)
        self.replayed = 0
        self.finished = 0
        # the guards, as their events tell: name -> count, and the rate limit's waits
        self.guarded: Counter[str] = Counter()
        self.waited = 0.0
        self.fallbacks: Counter[str] = Counter()

    def __call__(self, event: nk.Event) -> None:
        name = event.name
        if name == "node.retrying":
            reason = _reason(event)
            with self.lock:
                self.retries[(event.run_id, event.node)].append(reason)
                self.faults[reason] += 1
        elif name == "flow.node_finished":
            with self.lock:
                errors = self.retries.pop((event.run_id, event.node), [])
                self.finished += 1
            took = f"{(event.duration or 0.0) * 1000:6.1f} ms"
            detail = took + (
                f"  {len(errors) + 1} attempts: " + ", ".join(errors) if errors else ""
            )
            self._line(event, f"{event.node:<15} {detail}", routine=True)
        elif name == "flow.node_skipped":
            with self.lock:
                self.replayed += 1
                self.skipped[event.run_id].append(event.node or "?")
        elif name == "flow.finished":
            with self.lock:
                skipped = self.skipped.pop(event.run_id, [])
            if skipped:
                self._line(event, f"replayed from the journal: {', '.join(skipped)}", routine=True)
        elif name == "flow.failed":
            undone = event.fields.get("compensated")
            tail = f"; compensated: {', '.join(undone)}" if undone else ""
            self._line(event, f"FAILED at {event.fields.get('failed')}: {event.error}{tail}")
        elif name == "flow.compensating":
            nodes = ", ".join(event.fields.get("nodes") or ())
            self._line(event, f"{event.fields.get('failed')} failed for good: undoing {nodes}")
        elif name == "node.compensated":
            again = " (done before: replayed from the journal)" if event["replayed"] else ""
            self._line(event, f"{event.node:<15} compensated{again}")
        elif name == "node.compensation_failed":
            self._line(event, f"{event.node:<15} NOT compensated: {event.error}")
        elif name.startswith(("circuit.", "rate_limit.")):
            with self.lock:
                self.guarded[name] += 1
                if name == "rate_limit.waited":
                    self.waited += event["wait"] or 0.0
            if name in ("circuit.opened", "circuit.half_opened", "circuit.closed"):
                state = name.removeprefix("circuit.").replace("_", "-")
                self._line(event, f"circuit {event.fields.get('circuit')} {state}")
        elif name == "node.fallback":
            if refused(event.exc):  # not a fallback: `queue_receipt` lets the refusal stand
                return
            with self.lock:
                self.fallbacks[event.node or "?"] += 1
            self._line(event, f"{event.node:<15} fell back after {_reason(event)}")

    def _line(self, event: nk.Event, text: str, *, routine: bool = False) -> None:
        if self.quiet or (routine and self.notes is not None):
            return
        order = (event.run_id or "").removeprefix("checkout:")
        line = f"  {order:<7} {text}"
        if self.notes is not None:
            self.notes(line)
            return
        with self.lock:
            print(line, file=self.out, flush=True)


def _reason(event: nk.Event) -> str:
    exc = event.exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return str(status)
    if isinstance(exc, TimeoutError) or type(exc).__name__.endswith("Timeout"):
        return "timeout"  # the node's own deadline or httpx's (capped to it): one story
    if isinstance(exc, nk.CircuitOpen):
        return "circuit open"
    if isinstance(exc, nk.RateLimited):
        return "rate limited"
    if isinstance(exc, nk.IdempotencyInProgress):
        return "409 in progress"
    if type(exc).__name__ in ("RemoteProtocolError", "ReadError", "ConnectError"):
        return "connection dropped"
    return type(exc).__name__ if exc is not None else "error"


# ---------------------------------------------------------------------------- the command line


def _charges(api: Any) -> Counter[Any]:
    if api is None:
        return Counter()
    return Counter(
        entry.data.get("order_id") for entry in api.ledger.find(route="POST /charges", effect=True)
    )


def _summary(
    out: TextIO,
    outcomes: dict[str, Any],
    metrics: nk.Metrics,
    progress: Progress,
    elapsed: float,
    api: Any,
    charged_before: int,
    console: Console | None = None,
) -> None:
    ok = sum(1 for value in outcomes.values() if isinstance(value, Order))
    undone = sum(1 for value in outcomes.values() if _compensated(value))
    print(
        f"\n  {ok} of {len(outcomes)} orders completed in {elapsed:.2f} s"
        + (f", {undone} compensated (charge refunded, stock released)" if undone else ""),
        file=out,
    )
    snapshot = metrics.snapshot()
    if console is not None:
        if snapshot:
            console.print(_progress.summary_table(snapshot))
    elif any(stats.calls for stats in snapshot.values()):
        header = f"  {'node':<15} {'calls':>6} {'retries':>8} {'mean ms':>8}"
        print(header, file=out)
        for name, stats in sorted(snapshot.items()):
            print(
                f"  {name:<15} {stats.calls:>6} {stats.retries:>8} "
                f"{stats.latency_mean * 1000:>8.1f}",
                file=out,
            )
    if progress.replayed:
        print(f"  node results replayed from the journal: {progress.replayed}", file=out)
    api_calls = sum(
        stats.calls
        for name, stats in snapshot.items()
        if name in ("charge_payment", "send_receipt")
    )
    if api_calls or progress.guarded or progress.fallbacks:
        _guard_summary(out, progress)  # a pass replayed from the journal never reaches them
    if api is not None:
        faults = Counter(entry.fault for entry in api.ledger if entry.fault)
        if faults:
            met = ", ".join(f"{kind} x{count}" for kind, count in sorted(faults.items()))
            print(f"  faults the local API injected so far: {met}", file=out)
            if faults.get("drop_after"):
                print(
                    "  (drop_after: the API did the work, then dropped the connection before "
                    "answering; the retry sent the same Idempotency-Key and got the stored answer)",
                    file=out,
                )
        charged = _charges(api)
        twice = [order for order, count in charged.items() if count > 1]
        print(
            f"  charges in the API's ledger: {sum(charged.values())} for {len(charged)} orders, "
            f"{sum(charged.values()) - charged_before} new in this pass"
            f" ({'no order charged twice' if not twice else f'CHARGED TWICE: {twice}'})",
            file=out,
        )
        refunds = Counter(
            entry.data.get("order_id")
            for entry in api.ledger.find(route="POST /refunds", effect=True)
        )
        if refunds:
            again = [order for order, count in refunds.items() if count > 1]
            print(
                f"  refunds in the API's ledger: {sum(refunds.values())} for "
                f"{', '.join(sorted(map(str, refunds)))}"
                f" ({'no order refunded twice' if not again else f'REFUNDED TWICE: {again}'})",
                file=out,
            )
    failures = {order: value for order, value in outcomes.items() if not isinstance(value, Order)}
    for order, error in sorted(failures.items())[:5]:
        print(f"  {order}: {error}", file=out)


def _compensated(value: Any) -> bool:
    """An order that failed for good and was undone completely (refunded, stock released)."""
    return isinstance(value, nk.FlowError) and bool(value.compensated) and not value.not_compensated


def _settled(value: Any) -> bool:
    """An order completed, or declined and compensated: nothing left to do for it."""
    return isinstance(value, Order) or _compensated(value)


def _guard_summary(out: TextIO, progress: Progress) -> None:
    """What the payments API's rate limit, circuit breaker and the fallback did in this pass."""
    seen = progress.guarded
    print(
        f"  rate limit payments-api: {seen['rate_limit.waited']} calls waited their turn "
        f"({progress.waited:.2f} s summed over the calls), {seen['rate_limit.rejected']} rejected, "
        f"{seen['rate_limit.paused']} pauses for a Retry-After",
        file=out,
    )
    changes = [
        f"{seen[f'circuit.{state}']} {state.replace('_', '-')}"
        for state in ("opened", "half_opened", "closed")
        if seen[f"circuit.{state}"]
    ]
    print(
        f"  circuit payments-api: {', '.join(changes) if changes else 'closed throughout'}; "
        f"{seen['circuit.rejected']} calls rejected without reaching the API",
        file=out,
    )
    queued = ", ".join(f"{node} x{count}" for node, count in sorted(progress.fallbacks.items()))
    print(
        f"  fallbacks: {sum(progress.fallbacks.values())}"
        + (f" ({queued}: receipts queued in outbox/ for later)" if queued else ""),
        file=out,
    )


def _run_pass(
    title: str,
    args: argparse.Namespace,
    orders: list[Order],
    api_url: str,
    api: Any,
    journal: Any,
    out: TextIO,
    console: Console | None = None,
) -> dict[str, Any]:
    """One pass over the orders, then its summary. With a `console` (a terminal, rich
    installed, no --plain or --quiet) a live row per node replaces the line per node, and the
    per-node summary is a table; everything else is the same plain text."""
    print(f"\n{title}", file=out, flush=True)
    metrics = nk.Metrics()
    progress = Progress(out, quiet=args.quiet, notes=_progress.notes(console) if console else None)
    root = data_dir(args.data_dir)
    charged_before = sum(_charges(api).values())
    live = (
        _progress.live_view(console, total=len(orders))
        if console is not None
        else contextlib.nullcontext()
    )
    with _sink(metrics), _sink(progress), live:
        started = time.perf_counter()
        outcomes = run_orders(
            orders,
            mode=args.mode,
            api_url=api_url,
            journal=journal,
            db_factory=_db_factory(args.db_url, root / "checkout.sqlite"),
            audit_dir=data_dir(root / "audit"),
            concurrency=args.concurrency,
        )
        elapsed = time.perf_counter() - started
    _summary(out, outcomes, metrics, progress, elapsed, api, charged_before, console)
    return outcomes


def main(
    argv: Sequence[str] | None = None, *, out: TextIO = sys.stdout, console: Console | None = None
) -> int:
    """Run the command line; exit code 0 when every order completed or was compensated (a
    declined order, refunded and its stock released), else 1.

    Progress goes to `out` as plain lines, or, when `out` is a terminal and rich is installed,
    as a live view drawn on `console` (by default one writing to `out`; tests pass their own).
    ``--plain`` and ``--quiet`` always print plain lines.
    """
    cli = parser(
        "checkout", "Reserve stock, charge, send the receipt, write the audit file: once per order."
    )
    cli.add_argument(
        "--orders", type=int, default=20, help="how many orders (default: %(default)s)"
    )
    cli.add_argument(
        "--mode", choices=("sync", "async"), default="sync", help="run mode (default: %(default)s)"
    )
    cli.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="async mode: orders at once (default: %(default)s)",
    )
    cli.add_argument(
        "--stock", type=int, default=100_000, help="initial units per SKU (default: %(default)s)"
    )
    cli.add_argument(
        "--journal", help="store URL for the run journal and keys (default: sqlite in --data-dir)"
    )
    cli.add_argument(
        "--prefix", default="o", help="order id prefix; reuse it to resume the same orders"
    )
    cli.add_argument(
        "--again", action="store_true", help="run the same orders a second time (all replayed)"
    )
    cli.add_argument("--quiet", action="store_true", help="no line per node, only the summaries")
    cli.add_argument(
        "--plain",
        action="store_true",
        help="plain lines even on a terminal (no live view, no tables; the default when the "
        "output is a pipe or a file, or rich is not installed)",
    )
    cli.add_argument(
        "--outage",
        type=int,
        default=0,
        metavar="N",
        help="local API only: answer 503 to the N requests after the first charge (the breaker "
        "opens, receipts are queued); with --demo the second pass runs once it half-opens",
    )
    cli.add_argument(
        "--refuse-receipt",
        metavar="ORDER",
        help="local API only: refuse that order's receipt for good (403), so the order is "
        "compensated: its charge refunded, its stock released (--demo: the 7th order)",
    )
    cli.add_argument(
        "--demo",
        action="store_true",
        help="the newcomer's tour: faults on, a fresh --data-dir/demo, then the same orders again",
    )
    args = cli.parse_args(argv)
    plain = args.plain or args.quiet
    console = None if plain else console or _progress.terminal_console(out)
    if args.demo:
        # with an outage, the outage is the demo's fault: a random one could fail the probe
        args.faults = args.faults or (0.0 if args.outage > 0 else 0.25)
        args.again = True
        args.data_dir = args.data_dir / "demo"
        shutil.rmtree(args.data_dir, ignore_errors=True)  # a fresh tour every time
    root = data_dir(args.data_dir)
    journal = (
        nk.open_store(args.journal) if args.journal else nk.SQLiteStore(root / "journal.sqlite")
    )
    orders = make_orders(args.orders, prefix=args.prefix)
    if args.demo and args.outage <= 0 and not args.refuse_receipt and len(orders) >= DEMO_REFUSED:
        args.refuse_receipt = orders[DEMO_REFUSED - 1].order_id
    with contextlib.closing(connect(args.db_url, root / "checkout.sqlite")) as db:
        prepare_database(db, sorted({order.sku for order in orders}), args.stock)
    try:
        script = DEMO_SCRIPT if args.demo and args.outage <= 0 else ()
        with api_base(
            args.api_url,
            faults=args.faults,
            seed=args.seed,
            script=script,
            webhook_secret=WEBHOOK_SECRET,
        ) as (api_url, api):
            if api is not None and args.outage > 0:
                api.outage(args.outage, after_charges=1)
            if api is not None and args.refuse_receipt:
                api.refuse_receipts(args.refuse_receipt)
            where = "a local API" if api is not None else api_url
            faults = (
                f", failing {args.faults:.0%} of requests"
                if api is not None and args.faults
                else ""
            )
            print(
                f"nodekit checkout: {len(orders)} orders, {args.mode} mode, against {where}{faults}",
                file=out,
            )
            if api is not None and args.faults:
                print(
                    "  (503 and 429 with Retry-After, answers slower than the 0.5 s timeout, "
                    "connections dropped before and after the charge was made)",
                    file=out,
                )
            outcomes = _run_pass(
                "first pass: every node runs", args, orders, api_url, api, journal, out, console
            )
            if args.again:
                title = (
                    "second pass: the same run ids again, so every effect is replayed, not repeated"
                )
                if not all(_settled(value) for value in outcomes.values()):
                    pause = _until_half_open(journal)
                    print(f"\n  (waiting {pause:.1f} s for the circuit to half-open)", file=out)
                    time.sleep(pause)
                    title = (
                        "second pass: the same run ids again: what completed is replayed, "
                        "the rest runs"
                    )
                outcomes |= _run_pass(  # exit 1 if a replay fails too
                    title,
                    args,
                    orders,
                    api_url,
                    api,
                    journal,
                    out,
                    console,
                )
    finally:
        journal.close()
    return 0 if all(_settled(value) for value in outcomes.values()) else 1


def _until_half_open(journal: Any) -> float:
    """Seconds until the payments API's breaker lets a probe through (0 if it is closed)."""
    if guards(_guard_store(journal))[0].state != "open":
        return 0.0
    return float(BREAKER["open_for"])


@contextlib.contextmanager
def _sink(target: Any) -> Iterator[Any]:
    remove = nk.add_sink(target)
    try:
        yield target
    finally:
        remove()


if __name__ == "__main__":
    raise SystemExit(main())
