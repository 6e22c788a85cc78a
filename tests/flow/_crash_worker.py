"""A five-node durable flow, run in a subprocess that the crash tests SIGKILL at random points.

``python _crash_worker.py STORE RUN_ID LEDGER``: STORE is a store URL, or ``DSN|SCHEMA`` for
PostgreSQL. Every node appends one line to LEDGER (``O_APPEND``, one ``write``) between two
short sleeps: the run id, its name and its downstream key, ``nk.context().idempotency_key_for("ledger")``,
which a durable flow derives from the node's journal entry and so is the same on every resume.
The line stands for a keyed effect (a payment with an ``Idempotency-Key``): a consumer that
deduplicates by key applies it once however often it is sent. The worker prints ``ready``
before running and the final state (JSON) when the run completes. A node still leased by a
killed predecessor makes the run fail with `IdempotencyInProgress`: the worker retries then.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import nodekit as nk

PAUSE = 0.02  # before and after each node's effect
LEASE = 0.3  # how long a killed run's node blocks the next run

EXPECTED = {"seed": 1, "a": 2, "b": 4, "c": 6, "d": 10, "e": 100}


def effect(ledger: str, node: str) -> None:
    time.sleep(PAUSE)
    ctx = nk.context()
    line = f"{ctx.run_id} {node} {ctx.idempotency_key_for('ledger')} {os.getpid()}\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    time.sleep(PAUSE)


def build(ledger: str) -> nk.Flow:
    flow = nk.Flow("crash", lease=LEASE)

    @flow.node
    def extract(seed: int) -> dict[str, Any]:
        effect(ledger, "extract")
        return {"a": seed + 1}

    @flow.node(after=extract)
    def left(a: int) -> dict[str, Any]:
        effect(ledger, "left")
        return {"b": a * 2}

    @flow.node(after=extract)
    def right(a: int) -> dict[str, Any]:
        effect(ledger, "right")
        return {"c": a * 3}

    @flow.node(after=[left, right])
    def join(b: int, c: int) -> dict[str, Any]:
        effect(ledger, "join")
        return {"d": b + c}

    @flow.node(after=join)
    def load(d: int) -> dict[str, Any]:
        effect(ledger, "load")
        return {"e": d * 10}

    return flow


def open_store(spec: str) -> Any:
    if "|" in spec:
        from nodekit.idempotency.postgres import PostgresStore

        dsn, schema = spec.split("|", 1)
        return PostgresStore(dsn, schema=schema)
    return nk.open_store(spec)


def main() -> int:
    spec, run_id, ledger = sys.argv[1:4]
    store = open_store(spec)
    flow = build(ledger)
    print("ready", flush=True)
    while True:
        try:
            state = flow.run({"seed": 1}, run_id=run_id, store=store)
        except nk.FlowError as exc:
            if isinstance(exc.__cause__, nk.IdempotencyInProgress):
                time.sleep(0.05)  # a killed run's lease has not expired yet
                continue
            raise
        break
    print(json.dumps(state, sort_keys=True), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
