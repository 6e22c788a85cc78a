"""A process that runs a `nodekit.sql` node or an outbox dispatch, to be SIGKILLed mid-way.

The test starts it (``python tests/integrations/_sql_worker.py ...``), reads the stages it
reports on stdout (``stage:<name>``, one line each) and kills it at the one it asked for: the
worker stops there and waits, so the kill lands exactly at that point. Everything it does is
counted from the database afterwards, never from memory (which SIGKILL takes with it).

Crash points of `node`: ``before_write`` (transaction open, key row inserted, nothing else
written), ``before_commit`` (the write done, COMMIT not sent), ``during_commit`` (SQLite:
the COMMIT statement has started; on PostgreSQL the test watches ``pg_stat_activity`` for the
worker's COMMIT instead), ``after_commit`` (committed, the node has not returned).
`dispatch` stops at ``after_handler`` (delivered, not yet marked dispatched).

The nodes are importable, so the test re-runs the very same node (name, key, return type) in
its own process after the kill.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

import nodekit as nk
from nodekit.sql import Message, Outbox, transactional

OUTBOX = Outbox()
# What to do at a named stage: nothing in the test process; report and stop in the worker.
HOOK: list[Callable[[str], None]] = [lambda stage: None]


class Receipt(BaseModel):
    """The stored result of `place_order`: a replay rebuilds this model."""

    order_id: str
    amount: int


def q(db: Any, text: str) -> str:
    """`text` with the connection's placeholder: sqlite3 takes ``?``, psycopg ``%s``."""
    return text if isinstance(db, sqlite3.Connection) else text.replace("?", "%s")


def create_tables(db: Any) -> None:
    """The effect table; no unique constraint, so a second run would show as a second row."""
    db.execute("CREATE TABLE IF NOT EXISTS orders (order_id TEXT NOT NULL, amount INTEGER)")


@transactional(name="worker.place_order", key=lambda order_id: order_id)
def place_order(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    """Write one order row (the effect) in the node's transaction."""
    HOOK[0]("before_write")
    db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount))
    HOOK[0]("before_commit")
    return Receipt(order_id=order_id, amount=amount)


@transactional(name="worker.place_order_and_notify", key=lambda order_id: order_id)
def place_order_and_notify(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    """Write one order row and queue an ``order.placed`` message in the same transaction."""
    db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount))
    key = OUTBOX.add(db, "order.placed", {"order_id": order_id, "amount": amount})
    report(f"key:{key}")
    return Receipt(order_id=order_id, amount=amount)


def record_delivery(receiver: str) -> Callable[[Message], None]:
    """An outbox handler that records each delivery in another SQLite file (the "API")."""

    def handler(message: Message) -> None:
        with sqlite3.connect(receiver) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS deliveries (key TEXT NOT NULL, topic TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT INTO deliveries (key, topic) VALUES (?, ?)", (message.key, message.topic)
            )
        conn.close()
        HOOK[0]("after_handler")

    return handler


# ---------------------------------------------------------------------------- worker side


def report(line: str) -> None:
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def stop_at(crash: str, gate: str | None) -> Callable[[str], None]:
    """A hook that reports every stage and, at `crash`, waits to be killed."""

    def hook(stage: str) -> None:
        report(f"stage:{stage}")
        if stage != crash:
            return
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if gate is not None and os.path.exists(gate):
                return
            time.sleep(0.01)
        report("error:not killed")
        os._exit(3)

    return hook


def connect(args: argparse.Namespace) -> Any:
    if args.sqlite:
        return sqlite3.connect(args.sqlite, timeout=10.0)
    import psycopg

    return psycopg.connect(
        args.postgres,
        autocommit=True,
        options=f"-csearch_path={args.schema}",
        application_name="nk-sql-worker",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["node", "notify", "dispatch"])
    parser.add_argument("--sqlite")
    parser.add_argument("--postgres")
    parser.add_argument("--schema")
    parser.add_argument("--order-id", default="o-1")
    parser.add_argument("--amount", type=int, default=10)
    parser.add_argument("--crash", default="none")
    parser.add_argument("--gate")
    parser.add_argument("--receiver")
    args = parser.parse_args(argv)
    HOOK[0] = stop_at(args.crash, args.gate)
    db = connect(args)
    try:
        if args.sqlite and args.crash == "during_commit":
            db.set_trace_callback(
                lambda statement: HOOK[0]("during_commit") if statement == "COMMIT" else None
            )
        # "After commit, before returning": the node reports completion after COMMIT.
        nk.add_sink(
            lambda event: HOOK[0]("after_commit") if event.name == "idempotency.completed" else None
        )
        if args.mode == "node":
            place_order(args.order_id, args.amount, db=db)
        elif args.mode == "notify":
            place_order_and_notify(args.order_id, args.amount, db=db)
        else:
            OUTBOX.dispatch(db, record_delivery(args.receiver))
        report("stage:done")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
