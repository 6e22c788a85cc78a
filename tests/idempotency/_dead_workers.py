"""Workers and helpers for the dead-holder tests: a durable flow killed mid-node, holders
planted in a store as another process (dead, alive, on another host) would leave them.

Workers run in other processes (a multiprocessing forkserver), so they take only plain data.
Effects are counted in a ledger file outside the process (one O_APPEND line per effect).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import nodekit as nk
from nodekit.idempotency import IN_PROGRESS, Record, RecordKey
from nodekit.idempotency._holder import identity

from ._workers import StoreSpec, append_line, make_store

FLOW_LEASE = 60.0  # far longer than any test: only a dead-holder takeover lets a resume in


def build_flow(ledger: str, signal: str | None = None) -> nk.Flow:
    """Two nodes; `second` signals and hangs before its effect when `signal` is given."""
    flow = nk.Flow("dead", lease=FLOW_LEASE)

    def effect(node: str) -> None:
        ctx = nk.context()
        line = {"node": node, "pid": os.getpid(), "key": ctx.idempotency_key_for("ledger")}
        append_line(ledger, json.dumps(line))

    @flow.node
    def first(seed: int) -> dict[str, Any]:
        effect("first")
        return {"a": seed + 1}

    @flow.node(after=first)
    def second(a: int) -> dict[str, Any]:
        if signal is not None:
            append_line(signal, json.dumps({"pid": os.getpid(), "epoch": nk.context().epoch}))
            time.sleep(60)
        effect("second")
        return {"b": a * 2}

    return flow


def flow_victim(spec: StoreSpec, ledger: str, signal: str, run_id: str) -> None:
    """Run the flow until `second` holds its journal entry, then hang until SIGKILLed."""
    store = make_store(spec)
    build_flow(ledger, signal).run({"seed": 1}, run_id=run_id, store=store)


# ---------------------------------------------------------------------------- planted holders


def holder_json(**fields: Any) -> str:
    """A holder as a claim records it: this process's identity with `fields` replaced."""
    me = identity()
    recorded: dict[str, Any] = {
        "host": me.host,
        "pid": me.pid,
        "start": me.start,
        "boot": me.boot,
        "pidns": me.pidns,
    }
    recorded.update(fields)
    return json.dumps(recorded, separators=(",", ":"))


def gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_of(pid: int) -> int:
    """A process's start time in clock ticks, as `/proc/<pid>/stat` gives it."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        return int(file.read().rpartition(")")[2].split()[19])


def held_record(
    key: RecordKey, fingerprint: str, holder: str | None, *, lease: float = 60.0
) -> Record:
    """An in-progress record with a valid lease, held by `holder` (as if it had acquired)."""
    now = time.time()
    return Record(
        key.namespace,
        key.scope,
        key.digest,
        fingerprint,
        IN_PROGRESS,
        "feedfacefeedface" + os.urandom(8).hex(),
        1,
        now + lease,
        now - 1.0,
        now + 3600.0,
        None,
        None,
        1,
        holder,
    )
