"""Store factories and process workers for the idempotency tests.

Workers run in other processes (a multiprocessing forkserver), so they take only plain data: a
store spec, a ledger path, a results path. Effects are counted outside the process, one line
per effect appended to a ledger file opened with O_APPEND (a Python counter dies with SIGKILL).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import MemoryStore, RecordKey
from nodekit.testing import capture_events

HAVE_REDIS = importlib.util.find_spec("nodekit.idempotency.redis") is not None
HAVE_POSTGRES = importlib.util.find_spec("nodekit.idempotency.postgres") is not None

# the stores several processes can share (the parameters of the `spec` fixture, conftest.py)
DURABLE = [
    "sqlite",
    *([pytest.param("redis", marks=pytest.mark.services)] if HAVE_REDIS else []),
    *([pytest.param("postgres", marks=pytest.mark.services)] if HAVE_POSTGRES else []),
]

StoreSpec = tuple[str, ...]


def make_store(spec: StoreSpec) -> Any:
    """Open the store a spec names: ("memory",), ("sqlite", path), ("redis", url, prefix),
    ("postgres", dsn, schema)."""
    kind = spec[0]
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return nk.SQLiteStore(spec[1])
    if kind == "redis":
        from nodekit.idempotency.redis import RedisStore

        return RedisStore(spec[1], prefix=spec[2])
    if kind == "postgres":
        from nodekit.idempotency.postgres import PostgresStore

        return PostgresStore(spec[1], schema=spec[2])
    raise ValueError(f"unknown store kind {kind!r}")


# ---------------------------------------------------------------------------- ledger


def append_line(path: str | Path, text: str) -> None:
    """Append one line atomically (O_APPEND, one write) so that concurrent writers never mix."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def read_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []


def effects(ledger: str | Path) -> list[dict[str, Any]]:
    """The effect lines of a ledger, decoded."""
    return [json.loads(line) for line in read_lines(ledger)]


def wait_for_line(path: str | Path, timeout: float = 10.0) -> dict[str, Any]:
    """Block until `path` has a line (a worker's signal) and return it, decoded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = read_lines(path)
        if lines:
            return dict(json.loads(lines[0]))
        time.sleep(0.01)
    raise TimeoutError(f"no signal in {path} after {timeout}s")


# ---------------------------------------------------------------------------- the node


def charge_node(
    store: Any,
    ledger: str,
    *,
    on_conflict: str = "raise",
    lease: float = 5.0,
    wait_timeout: float | None = None,
    hold: float = 0.0,
    before_effect: Callable[[dict[str, Any]], None] | None = None,
    after_effect: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """The node every worker calls: one ledger line per execution, keyed by `order`.

    The line carries the pid, the fencing epoch and the derived downstream key, so that a test
    can check that a takeover in another process used the same downstream key.
    """
    policy = nk.Idempotency(
        key=lambda order: order,
        store=store,
        on_conflict=on_conflict,
        lease=lease,
        wait_timeout=wait_timeout,
    )

    @nk.node(name="charge", idempotency=policy)
    def charge(order: str) -> str:
        ctx = nk.context()
        info = {
            "order": order,
            "pid": os.getpid(),
            "epoch": ctx.epoch,
            "downstream": ctx.idempotency_key_for("charge"),
        }
        if before_effect is not None:
            before_effect(info)
        append_line(ledger, json.dumps(info))
        if after_effect is not None:
            after_effect(info)
        if hold:
            time.sleep(hold)
        return f"charged:{order}:{os.getpid()}"

    return charge


def record_key(order: str) -> RecordKey:
    """The record key `charge_node` uses for `order` (computed without a store)."""
    node = charge_node(MemoryStore(), os.devnull)
    key, _ = node.spec.idempotency.key_for((order,), {})
    return key


def outcome(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    try:
        return {"result": fn(*args)}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


# ---------------------------------------------------------------------------- workers


def race(spec: StoreSpec, ledger: str, results: str, barrier: Any, on_conflict: str) -> None:
    """Wait at the barrier with the others, then call `charge` once on the shared key."""
    store = make_store(spec)
    try:
        charge = charge_node(store, ledger, on_conflict=on_conflict, hold=0.3, wait_timeout=10.0)
        barrier.wait(timeout=30)
        append_line(results, json.dumps({"pid": os.getpid(), **outcome(charge, "order-race")}))
    finally:
        store.close()


def many_keys(spec: StoreSpec, ledger: str, results: str, barrier: Any, n: int, seed: int) -> None:
    """Call `charge` on n keys in this worker's own order; report what happened per key."""
    store = make_store(spec)
    try:
        charge = charge_node(store, ledger)
        orders = [f"order-{i}" for i in range(n)]
        if seed == 1:
            orders.reverse()
        elif seed > 1:
            random.Random(seed).shuffle(orders)
        tally = {"ran": 0, "replayed": 0, "in_progress": 0, "other": 0}
        mine = f":{os.getpid()}"
        barrier.wait(timeout=30)
        for order in orders:
            try:
                result = charge(order)
            except nk.IdempotencyInProgress:
                tally["in_progress"] += 1
                continue
            except Exception:
                tally["other"] += 1
                continue
            tally["ran" if result.endswith(mine) else "replayed"] += 1
        append_line(results, json.dumps(tally))
    finally:
        store.close()


def victim(spec: StoreSpec, ledger: str, signal: str, lease: float, when: str) -> None:
    """Acquire the key, signal the test, then hang until SIGKILLed.

    `when` is "after_acquire" (killed before the effect) or "after_effect" (killed after the
    effect, before the result was stored).
    """
    store = make_store(spec)

    def hang(info: dict[str, Any]) -> None:
        append_line(signal, json.dumps(info))
        time.sleep(60)

    charge = charge_node(
        store,
        ledger,
        lease=lease,
        before_effect=hang if when == "after_acquire" else None,
        after_effect=hang if when == "after_effect" else None,
    )
    charge("order-crash")


def taker(spec: StoreSpec, ledger: str, results: str, lease: float) -> None:
    """Call `charge` on the crash key, waiting out the other holder's lease; report events."""
    store = make_store(spec)
    try:
        charge = charge_node(store, ledger, lease=lease, on_conflict="wait", wait_timeout=10.0)
        with capture_events(prefix="idempotency.") as events:
            out = outcome(charge, "order-crash")
        out["events"] = events.names()
        out["pid"] = os.getpid()
        append_line(results, json.dumps(out))
    finally:
        store.close()


def stalled_holder(
    spec: StoreSpec, ledger: str, signal: str, results: str, lease: float, ending: str
) -> None:
    """Acquire, signal, work for a while (the test SIGSTOPs us meanwhile), then end.

    `ending` is "return" (try to complete) or "raise" (a safe failure: try to release).
    """
    store = make_store(spec)

    def work(info: dict[str, Any]) -> None:
        append_line(signal, json.dumps(info))
        time.sleep(0.5)  # stopped in here, past the lease
        if ending == "raise":
            raise ValueError("late safe failure")

    try:
        charge = charge_node(store, ledger, lease=lease, after_effect=work)
        with capture_events(prefix="idempotency.") as events:
            out = outcome(charge, "order-crash")
        out["events"] = events.names()
        out["pid"] = os.getpid()
        append_line(results, json.dumps(out))
    finally:
        store.close()


def store_spec(request: Any, kind: str, tmp_path: Path) -> StoreSpec:
    """How a test (or a worker process) opens a store of `kind`: a file, a prefix, a schema."""
    if kind == "sqlite":
        return ("sqlite", str(tmp_path / "idempotency.db"))
    if kind == "redis":
        return (
            "redis",
            request.getfixturevalue("redis_url"),
            request.getfixturevalue("redis_prefix"),
        )
    if kind == "postgres":
        return (
            "postgres",
            request.getfixturevalue("postgres_url"),
            request.getfixturevalue("pg_schema"),
        )
    return ("memory",)
