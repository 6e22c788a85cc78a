"""The checkout recipe end to end: nodekit's async flow beside the same work written by hand.

Against one LocalAPI (no faults), in one run:

* 1,000 orders, async, 32 at a time: wall time of ``recipes.checkout.run_orders(mode="async")``
  (the four-node ``nk.Flow`` per order with its durable SQLite journal) and of hand-written
  httpx code doing the same work with the same client (the same requests with the same
  headers, the same stock transaction in a worker thread, the same atomic audit file), best of
  the rounds, rounds interleaved (target: nodekit adds at most 5 %); and, to show where the
  difference goes, nodekit with an in-memory journal in the middle round (not durable: a
  diagnostic);
* nodekit's async mode beside its sync mode (fewer orders, one after the other), per order.

Every round has a fresh data directory and order-id prefix, and is checked afterwards (not
timed): every order charged once and sent one receipt by the server's ledger, the stock
decremented once per order, one audit file per order with the order's content.

The API runs in its own process (``python -m recipes._demo_api``), so that its request
threads do not share the benchmark's GIL; both subjects talk to the same server.

``python -m benchmarks.bench_checkout`` writes its section of BENCHMARKS.md; ``--quick`` is a
smoke run that writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import nodekit as nk
from recipes import checkout
from recipes._common import connect

from . import _common
from ._common import table

SECTION = "checkout"
CONCURRENCY = int(__import__("os").environ.get("NK_BENCH_CONCURRENCY", "32"))
OVERHEAD_TARGET = 0.05
BUSY_LOAD = 1.5
# The standalone LocalAPI, in a process of its own: the client under test does not share
# its GIL.
SERVER = """\
import sys
import recipes._demo_api as server

sys.exit(server.main(sys.argv[1:]))
"""

BASELINE = "hand-written httpx"
NODEKIT = "nodekit, SQLite journal"
NODEKIT_MEMORY = "nodekit, `memory://` journal"
SUBJECTS = (BASELINE, NODEKIT, NODEKIT_MEMORY)


@dataclass(frozen=True)
class Config:
    orders: int
    rounds: int
    sync_orders: int

    @classmethod
    def for_run(cls, quick: bool) -> Config:
        if quick:
            return cls(orders=100, rounds=1, sync_orders=30)
        return cls(orders=1_000, rounds=3, sync_orders=100)


@dataclass
class Samples:
    """One subject's rounds: wall and CPU seconds, and requests the server saw per order."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    requests: list[float] = field(default_factory=list)

    def add(self, got: tuple[float, float, float]) -> None:
        wall, cpu, requests = got
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.requests.append(requests)


# ---------------------------------------------------------------------------- the server


@contextlib.contextmanager
def local_api() -> Iterator[str]:
    """A LocalAPI in a child process (no faults, receipts' signatures checked); its URL."""
    command = [
        sys.executable,
        "-c",
        SERVER,
        *("--port", "0", "--webhook-secret", checkout.WEBHOOK_SECRET),
    ]
    with _common.served(command) as url:
        yield url


def ledger(url: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = httpx.get(f"{url}/_ledger", timeout=60).json()
    return entries


# ---------------------------------------------------------------------------- the subjects


@dataclass
class Round:
    """One subject's run over a fresh data directory and order prefix."""

    root: Path
    orders: list[checkout.Order]
    stock: int

    @property
    def db_path(self) -> Path:
        return self.root / "checkout.sqlite"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"


def new_round(base: Path, prefix: str, count: int) -> Round:
    root = base / prefix
    (root / "audit").mkdir(parents=True)
    orders = checkout.make_orders(count, prefix=prefix)
    stock = 10 * count
    with contextlib.closing(connect(None, root / "checkout.sqlite")) as db:
        checkout.prepare_database(db, sorted({order.sku for order in orders}), stock)
    return Round(root, orders, stock)


def run_nodekit(url: str, rnd: Round, mode: str, journal_url: str | None = None) -> None:
    """`run_orders` as the recipe's command line calls it, without its progress sinks."""
    journal = (
        nk.open_store(journal_url) if journal_url else nk.SQLiteStore(rnd.root / "journal.sqlite")
    )
    try:
        outcomes = checkout.run_orders(
            rnd.orders,
            mode=mode,
            api_url=url,
            journal=journal,
            db_factory=checkout._db_factory(None, rnd.db_path),
            audit_dir=rnd.audit_dir,
            concurrency=CONCURRENCY,
        )
    finally:
        journal.close()
    failed = {
        order: value for order, value in outcomes.items() if not isinstance(value, checkout.Order)
    }
    if failed:
        order, error = next(iter(failed.items()))
        raise AssertionError(f"nodekit {mode}: {len(failed)} orders failed; {order}: {error}")


def _reserve(db_path: Path, order: checkout.Order) -> int:
    """The stock transaction: one connection per order, as the recipe's resource factory."""
    with contextlib.closing(connect(None, db_path)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "UPDATE checkout_stock SET qty = qty - ? WHERE sku = ? AND qty >= ?",
                (order.qty, order.sku, order.qty),
            )
            if cur.rowcount != 1:
                raise checkout.OutOfStock(f"order {order.order_id}: not enough {order.sku}")
            row = db.execute(
                "SELECT qty FROM checkout_stock WHERE sku = ?", (order.sku,)
            ).fetchone()
            db.commit()
        except BaseException:
            db.rollback()
            raise
    return int(row[0])


def _write_atomic(path: Path, data: bytes) -> None:
    """What `nodekit.files.put` does for a new file: temp file, fsync, rename, fsync the dir."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _audit(rnd: Round, state: checkout.Order) -> None:
    record = state.model_dump(exclude={"audit_file", "receipt"})
    text = json.dumps(record, sort_keys=True, indent=2) + "\n"
    _write_atomic(rnd.audit_dir / f"{state.order_id}.json", text.encode())


async def _baseline_all(url: str, rnd: Round) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, limits=limits) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(order: checkout.Order) -> None:
            async with gate:
                state = order.model_copy()
                state.remaining_stock = await asyncio.to_thread(_reserve, rnd.db_path, order)
                response = await client.post(
                    "/charges",
                    json={"order_id": order.order_id, "amount": order.amount_cents},
                    headers={"Idempotency-Key": f"{order.order_id}:charge"},
                )
                response.raise_for_status()
                state.charge_id = str(response.json()["id"])
                body, headers = checkout._signed(
                    {"order_id": order.order_id, "charge_id": state.charge_id}
                )
                response = await client.post(
                    "/webhooks/receipts",
                    content=body,
                    headers={**headers, "Idempotency-Key": f"{order.order_id}:receipt"},
                )
                response.raise_for_status()
                state.receipt = "delivered"
                await asyncio.to_thread(_audit, rnd, state)

        await asyncio.gather(*(one(order) for order in rnd.orders))


def run_baseline(url: str, rnd: Round) -> None:
    asyncio.run(_baseline_all(url, rnd))


# ---------------------------------------------------------------------------- checks


def verify(entries: list[dict[str, Any]], rnd: Round, what: str) -> None:
    """Every order charged once and sent one receipt (server's ledger), stock, audit files."""
    ids = {order.order_id for order in rnd.orders}
    charges = Counter(
        entry["data"]["order_id"]
        for entry in entries
        if entry["effect"] and entry["path"] == "/charges" and entry["data"]["order_id"] in ids
    )
    receipts = Counter(
        entry["data"]["event"]["order_id"]
        for entry in entries
        if entry["effect"]
        and entry["path"] == "/webhooks/receipts"
        and entry["data"]["event"]["order_id"] in ids
    )
    if charges != dict.fromkeys(ids, 1):
        raise AssertionError(f"{what}: charges per order {Counter(charges.values())}, want 1")
    if receipts != dict.fromkeys(ids, 1):
        raise AssertionError(f"{what}: receipts per order {Counter(receipts.values())}, want 1")
    with contextlib.closing(sqlite3.connect(rnd.db_path)) as db:
        stock = dict(db.execute("SELECT sku, qty FROM checkout_stock").fetchall())
    taken: Counter[str] = Counter()
    for order in rnd.orders:
        taken[order.sku] += order.qty
    want = {sku: rnd.stock - qty for sku, qty in taken.items()}
    if stock != want:
        raise AssertionError(f"{what}: stock {stock}, want {want}")
    files = sorted(path.name for path in rnd.audit_dir.glob("*.json"))
    if files != sorted(f"{order_id}.json" for order_id in ids):
        raise AssertionError(f"{what}: {len(files)} audit files for {len(ids)} orders")
    first = rnd.orders[0]
    record = json.loads((rnd.audit_dir / f"{first.order_id}.json").read_text())
    if record["order_id"] != first.order_id or not record["charge_id"].startswith("ch_"):
        raise AssertionError(f"{what}: audit record {record}")


class Bench:
    """The server, the scratch directory and the ledger position, for timed, checked rounds."""

    def __init__(self, url: str, base: Path) -> None:
        self.url = url
        self.base = base
        self.seen = len(ledger(url))

    def round(
        self, prefix: str, count: int, subject: Callable[[str, Round], None], what: str
    ) -> tuple[float, float, float]:
        """Wall seconds, CPU seconds (every thread of this process), requests per order."""
        rnd = new_round(self.base, prefix, count)
        started, cpu = time.perf_counter(), time.process_time()
        subject(self.url, rnd)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        entries = ledger(self.url)
        verify(entries, rnd, what)
        requests = (len(entries) - self.seen) / count
        self.seen = len(entries)
        shutil.rmtree(rnd.root)
        print(f"  {what}: {wall:.2f} s", file=sys.stderr, flush=True)
        return wall, cpu, requests


# ---------------------------------------------------------------------------- report


def render(
    cfg: Config,
    samples: dict[str, Samples],
    sync: Samples,
    loads: tuple[tuple[float, float, float], tuple[float, float, float]],
    notes: list[str],
) -> str:
    start, end = loads
    busy = max(start[0], end[0]) > BUSY_LOAD
    base_best = min(samples[BASELINE].wall)
    nk_best = min(samples[NODEKIT].wall)
    overhead = nk_best / base_best - 1.0
    verdict = "met" if overhead <= OVERHEAD_TARGET else "**not met**"
    median_overhead = (
        statistics.median(samples[NODEKIT].wall) / statistics.median(samples[BASELINE].wall) - 1.0
    )
    cpu_overhead = (
        statistics.median(samples[NODEKIT].cpu) / statistics.median(samples[BASELINE].cpu) - 1.0
    )
    out = [
        "## Checkout recipe: nodekit beside hand-written code, async and sync",
        "",
        "`python -m benchmarks.bench_checkout`. The flagship recipe (`recipes/checkout.py`: "
        "reserve the stock in SQLite, charge, send the signed receipt, write the audit file) "
        f"over {cfg.orders:,} orders against nodekit's LocalAPI (no faults), {CONCURRENCY} "
        "orders at a time, beside hand-written httpx code doing the same work. Every round "
        "uses a fresh data directory and order ids and is checked afterwards, outside the "
        "timing: every order charged once and sent one receipt by the server's ledger, the "
        "stock decremented once per order, one audit file per order.",
        "",
        _common.machine_markdown(),
        f"- **Load average:** {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start, "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} at the end (1 / 5 / 15 min)",
    ]
    if busy:
        out.append(
            f"- **The machine was busy** (load average above {BUSY_LOAD}, other jobs running): "
            "the figures are slower and noisier than an idle machine would give."
        )
    out += [
        "- **Server:** the LocalAPI in its own process on loopback, the same one for every "
        "round; SQLite files in a temporary directory.",
        "",
        f"### {cfg.orders:,} orders, async, {CONCURRENCY} at a time",
        "",
        f"Wall time, best and median of {cfg.rounds} rounds, the first two subjects "
        "alternating, the diagnostic third one in the middle round only. *CPU* is "
        "the benchmark process's CPU time (all its threads; the server's excluded) per order, "
        "median. *Requests* is what the server saw per order (2 when nothing was retried).",
        "",
    ]
    rows = []
    for label in SUBJECTS:
        got = samples[label]
        best = min(got.wall)
        rows.append(
            [
                label,
                f"{best:.2f} s",
                f"{statistics.median(got.wall):.2f} s",
                f"{best / cfg.orders * 1000:.2f}",
                f"{cfg.orders / best:,.0f}",
                f"{statistics.median(got.cpu) / cfg.orders * 1000:.2f}",
                f"{statistics.median(got.requests):.3f}",
                "—" if label == BASELINE else f"{best / base_best - 1.0:+.0%}",
            ]
        )
    out.append(
        table(
            [
                "subject",
                "best",
                "median",
                "ms/order",
                "orders/s",
                "CPU ms/order",
                "requests/order",
                "vs hand-written",
            ],
            rows,
            "lrrrrrrr",
        )
    )
    out += [
        "",
        f"nodekit (with its durable journal, as the recipe runs) adds **{overhead:+.0%}** to "
        f"the hand-written code's best wall time: target ≤ {OVERHEAD_TARGET:.0%}, {verdict}. "
        f"By the medians it adds {median_overhead:+.0%}, and {cpu_overhead:+.0%} CPU per "
        "order. Best and median differ this much because both subjects' wall time swings "
        f"from round to round (the hand-written code: {min(samples[BASELINE].wall):.2f} to "
        f"{max(samples[BASELINE].wall):.2f} s): httpcore checks every open connection on "
        "every request, and how many of the 32 connections a round ends up opening varies.",
        "",
        "| subject | what one order does |",
        "| --- | --- |",
        f"| {BASELINE} | `BEGIN IMMEDIATE`; `UPDATE checkout_stock`; `SELECT qty`; `COMMIT` on "
        "a new sqlite3 connection (the recipe's `connect`) in a worker thread; `POST /charges` "
        "and `POST /webhooks/receipts` (HMAC-signed), each with an `Idempotency-Key`; the audit "
        "JSON written atomically (temp file, fsync, rename, fsync of the directory) in a "
        f"worker thread. One `httpx.AsyncClient` (timeout 5 s, {CONCURRENCY} connections) and "
        f"an `asyncio.Semaphore({CONCURRENCY})`, as `run_orders` has; no retries, no journal, "
        "no record of the stock key: it cannot resume. |",
        f'| {NODEKIT} | `recipes.checkout.run_orders(mode="async")`: the same requests, '
        "statements and file through the recipe's `nk.Flow` (pydantic state, four nodes, "
        "`sql.transactional`, `nodekit.http`, `nodekit.files.put`), plus what makes it safe to "
        "repeat: the stock key's row in the stock transaction; each node's journal entry "
        "acquired and completed, and each HTTP node's key acquired and completed, in a "
        "`SQLiteStore` (a run header and 12 more write transactions per order, each in a "
        "worker thread); retries, per-attempt timeouts (0.5 s) and leases armed. |",
        f'| {NODEKIT_MEMORY} | the same, with `nk.open_store("memory://")` as the journal and '
        "key store: not durable, so not what the recipe runs; it shows what the SQLite journal "
        "costs and what the rest of nodekit costs. |",
        "",
        "### nodekit async beside sync, per order",
        "",
        f'Async: the SQLite-journal row above. Sync: `run_orders(mode="sync")` over '
        f"{cfg.sync_orders:,} orders, one after the other, best of {cfg.rounds} rounds.",
        "",
    ]
    async_per = nk_best / cfg.orders
    sync_best = min(sync.wall)
    sync_per = sync_best / cfg.sync_orders
    rows = [
        [
            f"async ({CONCURRENCY} at a time)",
            f"{cfg.orders:,}",
            f"{nk_best:.2f} s",
            f"{async_per * 1000:.2f}",
            f"{1 / async_per:,.0f}",
            f"{statistics.median(samples[NODEKIT].cpu) / cfg.orders * 1000:.2f}",
        ],
        [
            "sync (one at a time)",
            f"{cfg.sync_orders:,}",
            f"{sync_best:.2f} s",
            f"{sync_per * 1000:.2f}",
            f"{1 / sync_per:,.0f}",
            f"{statistics.median(sync.cpu) / cfg.sync_orders * 1000:.2f}",
        ],
    ]
    out.append(
        table(["mode", "orders", "best", "ms/order", "orders/s", "CPU ms/order"], rows, "lrrrrr")
    )
    out += [
        "",
        f"Async mode does **{sync_per / async_per:.2f} times** the orders per second of sync mode.",
        "",
        "### Notes",
        "",
    ]
    out += [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- main


def run(quick: bool) -> str:
    cfg = Config.for_run(quick)
    load_start = os.getloadavg()
    notes = [
        "The LocalAPI runs in a process of its own, so the client under test does not "
        "share its interpreter lock.",
        "The hand-written code sends the same requests but cannot resume: after a crash or a "
        "lost answer it charges twice or not at all. The difference between the first two "
        "rows is the price of the journal, the keys and the flow runner. The `memory://` row "
        "(one round, so noisier than the others) runs the same flow without the SQLite "
        "bookkeeping: what it keeps of the difference is the flow runner, the integrations "
        "and the extra work on the event loop, not the journal's writes.",
        "Requests per order above 2 are nodekit's retries after its 0.5 s attempt timeout: "
        "on a busy machine some answers take longer, and each costs that order 0.5 s more.",
        "Where the rest goes, from a separate `cProfile` of the event loop (not measured "
        "here): httpcore's pool bookkeeping (`_assign_requests_to_connections`, which checks "
        "every open connection, with a `getpeername` call each, on every request) takes a "
        "large share of the loop's time in both subjects, and more in nodekit's runs, which "
        f"keep more of the {CONCURRENCY} connections open (about 28 against 12) because "
        "their requests overlap more.",
    ]
    samples = {label: Samples() for label in SUBJECTS}
    sync = Samples()
    base = Path(tempfile.mkdtemp(prefix="nk-bench-checkout-"))
    subjects: dict[str, Callable[[str, Round], None]] = {
        BASELINE: run_baseline,
        NODEKIT: functools.partial(run_nodekit, mode="async"),
        NODEKIT_MEMORY: functools.partial(run_nodekit, mode="async", journal_url="memory://"),
    }
    try:
        with local_api() as url:
            bench = Bench(url, base)
            # Warm-up: imports, the server's first connections, the page cache.
            for index, label in enumerate(SUBJECTS):
                bench.round(f"w{index}", 50, subjects[label], "warm-up")
            for index in range(cfg.rounds):
                # The two subjects compared alternate; the diagnostic runs in the middle round.
                order = [BASELINE, NODEKIT] if index % 2 == 0 else [NODEKIT, BASELINE]
                if index == cfg.rounds // 2:
                    order.insert(1, NODEKIT_MEMORY)
                for label in order:
                    prefix = f"{SUBJECTS.index(label)}r{index}"
                    got = bench.round(
                        prefix, cfg.orders, subjects[label], f"{label}, round {index + 1}"
                    )
                    samples[label].add(got)
                got = bench.round(
                    f"s{index}",
                    cfg.sync_orders,
                    functools.partial(run_nodekit, mode="sync"),
                    f"nodekit sync, round {index + 1}",
                )
                sync.add(got)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if quick:
        notes.append("**Quick smoke run: too few orders and rounds for the figures to mean much.**")
    return render(cfg, samples, sync, (load_start, os.getloadavg()), notes)


def main(argv: Sequence[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
