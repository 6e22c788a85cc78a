"""Orders through the SQLAlchemy ORM, exactly once, each announced once through an outbox.

Two steps, each with its own guarantee:

- ``place_order`` is a `nodekit.sql.transactional` node over a SQLAlchemy ``Session``: it adds
  the ``Order`` row and queues an ``order.placed`` message in the outbox, and the node's key
  (the order id) commits in the same transaction. A second run — or a retry after a lost
  commit — replays the order instead of writing it again.
- a `nodekit.sql.Dispatcher` then delivers the outbox to the API's ``POST /webhooks/orders``,
  each message under its stable key (the ``publish_order`` node derives the request's
  ``Idempotency-Key`` from it), so a delivery retried after a dropped answer is recognised by
  the API, and a dispatcher that crashes hands its messages over with the same key.

The database says what was written (an order row per order; its ``writes`` column counts how
often it was written) and the API's ledger what was announced (one delivery per order).

    python -m recipes.orders_orm --faults 0.3
    python -m recipes.orders_orm --db-url postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import nodekit as nk
from nodekit import http as nkhttp
from nodekit.sql import Dispatcher, Outbox, transactional

from ._common import api_base, data_dir, parser

__all__ = ["Order", "main", "place_order", "publish_order"]

OUTBOX = Outbox()
TOPIC = "order.placed"
RETRY = nk.Retry(attempts=6, initial=0.05, multiplier=2.0, max_wait=1.0, jitter=0.05)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orm_orders"
    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(80))
    cents: Mapped[int]
    writes: Mapped[int] = mapped_column(default=1)


# ---------------------------------------------------------------------------- nodes


@transactional(name="place_order", key=lambda order: order["id"], connection="session")
def place_order(order: dict[str, Any], *, session: Session = nk.resource()) -> str:
    """Write the order and queue its announcement: one transaction, with the key."""
    existing = session.get(Order, order["id"])
    if existing is not None:  # written by another key (never by this one: it replays)
        existing.writes += 1
    else:
        session.add(Order(id=order["id"], customer=order["customer"], cents=order["cents"]))
    OUTBOX.add(session, TOPIC, {"order_id": order["id"], "cents": order["cents"]})
    return str(order["id"])


@nk.node(
    name="publish_order",
    retry=RETRY,
    timeout=nk.Timeout(attempt=2, total=20),
    # keyed by the message's key, in the process's default (in-memory) store: what matters
    # is the Idempotency-Key derived from it, which the API honours across processes
    idempotency=nk.Idempotency(key=lambda key, payload: key),
)
def publish_order(key: str, payload: dict[str, Any], *, http: httpx.Client = nk.resource()) -> int:
    """POST the event; the request's Idempotency-Key derives from the message's key, so a
    retry after a dropped answer is a replay the API recognises."""
    response = nkhttp.post(http, "/webhooks/orders", json=payload, step="publish")
    return response.status_code


# ---------------------------------------------------------------------------- the program


def orders(count: int, seed: int) -> list[dict[str, Any]]:
    return [
        {"id": f"ord-{seed}-{n:04d}", "customer": f"customer-{n % 7}", "cents": 100 * (n + 1)}
        for n in range(count)
    ]


def _driver_connection(engine: sa.Engine) -> Any:
    """A plain driver connection to the same database, for the dispatcher."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return sqlite3.connect(url.database or ":memory:", timeout=10.0, check_same_thread=False)
    import psycopg

    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(plain, autocommit=True)


def _replays(metrics: nk.Metrics) -> int:
    stats = metrics.snapshot().get(place_order.name)
    return stats.replays if stats is not None else 0


def written(engine: sa.Engine) -> dict[int, int]:
    """``{writes: orders written that many times}``, read from the database."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(Order.writes, sa.func.count()).group_by(Order.writes).order_by(Order.writes)
        ).all()
    return {int(writes): int(n) for writes, n in found}


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser("orders_orm", "Write orders through the SQLAlchemy ORM exactly once.")
    cli.add_argument("--orders", type=int, default=20, help="how many (default: %(default)s)")
    args = cli.parse_args(argv)
    root = data_dir(args.data_dir)
    url = args.db_url or f"sqlite+pysqlite:///{Path(root) / 'orders_orm.sqlite'}"
    if "+" not in url.partition("://")[0]:
        raise SystemExit(f"--db-url must be a SQLAlchemy URL (dialect+driver://...), got {url!r}")
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    started = time.perf_counter()
    placed = replayed = 0
    metrics = nk.Metrics()
    remove_sink = nk.add_sink(metrics)
    try:
        with (
            api_base(args.api_url, faults=args.faults, seed=args.seed) as (base, _api),
            httpx.Client(base_url=base, timeout=5.0) as client,
            contextlib.closing(_driver_connection(engine)) as raw,
            nk.use(session=sessionmaker(engine), http=client),
        ):
            print(f"orders_orm: {len(orders(args.orders, args.seed))} orders -> {engine.url!r}")
            for order in orders(args.orders, args.seed):
                before = _replays(metrics)
                place_order(order)
                if _replays(metrics) > before:
                    replayed += 1
                else:
                    placed += 1
            dispatcher = Dispatcher(
                raw,
                lambda message: publish_order(message.key, message.payload),
                outbox=OUTBOX,
                topic=TOPIC,
                retry_delay=0.0,
            )
            delivered = 0
            for _ in range(50):  # rounds until the outbox is empty (a failure waits a round)
                count = dispatcher.run_once()
                delivered += count
                if not OUTBOX.pending(raw):
                    break
            pending = len(OUTBOX.pending(raw))
        counts = written(engine)
    finally:
        remove_sink()
        engine.dispose()
    print(f"  orders placed     {placed:>5}   (one transaction each: order row, message, key)")
    print(f"  orders replayed   {replayed:>5}   (already placed by an earlier run)")
    print(f"  events delivered  {delivered:>5}   (POST /webhooks/orders, Idempotency-Key sent)")
    shown = ", ".join(f"{n} orders written {w}x" for w, n in counts.items()) or "empty"
    print(f"  table {Order.__tablename__}: {sum(counts.values())} orders ({shown})")
    print(f"  took {time.perf_counter() - started:.2f} s")
    if pending:
        print(f"FAILED: {pending} messages still pending; run it again to deliver them")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
