"""The shared state's decisions, over a plain JSON document, with no I/O.

A SQL store (SQLite, PostgreSQL) keeps each primitive's shared state as one JSON document in
one row and runs one of these functions on it inside a transaction that holds the row (SQLite
``BEGIN IMMEDIATE``, PostgreSQL ``SELECT … FOR UPDATE``); Redis runs the same rules as Lua
scripts (`_redis.py`, written line for line alike). Each function changes the document in
place and returns its answer; the caller writes the document back only when it changed.

Breaker document: ``s`` state, ``o`` when it opened, ``f`` the last fencing token, ``p`` the
probe reservations (token -> expiry), ``n`` probes that succeeded in this half-open period,
``b`` the window's buckets ``[bucket id, calls, failures]``. Bulkhead document: ``h`` the
held slots and ``q`` the queued waiters (token -> lease expiry). Times are the store's.
"""

from __future__ import annotations

import math
from typing import Any

from ._state import CLOSED, FULL, HALF_OPEN, ISOLATED, OPEN, SLOT, BreakerSettings

__all__ = [
    "WAIT",
    "breaker_admit",
    "breaker_force",
    "breaker_read",
    "breaker_record",
    "breaker_release",
    "gcra_pause",
    "gcra_reserve",
    "slots_acquire",
    "slots_in_use",
    "slots_release",
    "slots_renew",
]

WAIT = "wait"  # a queued waiter: ask again soon
_BUCKETS = 10

Doc = dict[str, Any]


# ---------------------------------------------------------------------------- breaker


def _window(doc: Doc, settings: BreakerSettings, now: float, calls: int, fails: int) -> None:
    """Add outcomes to the bucket `now` is in, forgetting buckets older than the window."""
    bucket = math.floor(now / (settings.window / _BUCKETS))
    kept = [b for b in doc.get("b") or [] if b[0] > bucket - _BUCKETS]
    for entry in kept:
        if entry[0] == bucket:
            entry[1] += calls
            entry[2] += fails
            break
    else:
        kept.append([bucket, calls, fails])
    doc["b"] = kept


def _healthy(doc: Doc) -> bool:
    return doc.get("s", CLOSED) == CLOSED and not any(b[2] for b in doc.get("b") or [])


def _clear(doc: Doc, state: str, now: float) -> None:
    doc.update(s=state, o=now, p={}, n=0, b=[])


def breaker_admit(
    doc: Doc, settings: BreakerSettings, now: float, successes: int
) -> tuple[bool, str, int | None, float | None, bool, bool]:
    """``(allowed, state, probe token, retry_after, half_opened, healthy)``; `successes`
    are a process's batched successes, added to the window first."""
    state = doc.get("s", CLOSED)
    if state == CLOSED:
        if successes:
            _window(doc, settings, now, successes, 0)
        return True, CLOSED, None, None, False, _healthy(doc)
    if state == ISOLATED:
        return False, ISOLATED, None, None, False, False
    half_opened = False
    if state == OPEN:
        until = doc.get("o", 0.0) + settings.open_for
        if now < until:
            return False, OPEN, None, until - now, False, False
        _clear(doc, HALF_OPEN, doc.get("o", now))
        half_opened = True
    probes = {t: e for t, e in doc.get("p", {}).items() if e > now}  # expired: free again
    doc["p"] = probes
    if len(probes) + doc.get("n", 0) >= settings.half_open_calls:
        return False, HALF_OPEN, None, None, half_opened, False
    fence = doc.get("f", 0) + 1
    doc["f"] = fence
    probes[str(fence)] = now + settings.probe_lease
    return True, HALF_OPEN, fence, None, half_opened, False


def breaker_record(
    doc: Doc,
    settings: BreakerSettings,
    now: float,
    successes: int,
    probe: int | None,
    failed: bool,
) -> tuple[str | None, int, int, bool]:
    """``(transition or None, calls, failures, healthy)`` after one outcome (and `successes`
    batched ones). A probe's outcome counts only while its reservation holds."""
    state = doc.get("s", CLOSED)
    if probe is not None:
        probes = doc.get("p", {})
        if state != HALF_OPEN or probes.pop(str(probe), None) is None:
            return None, 0, 0, _healthy(doc)  # fenced off
        passed = doc.get("n", 0)
        if failed:
            _clear(doc, OPEN, now)
            return OPEN, passed + 1, 1, False
        passed += 1
        doc["n"] = passed
        if passed >= settings.half_open_calls:
            _clear(doc, CLOSED, now)
            return CLOSED, passed, 0, True
        return None, 0, 0, False
    if state != CLOSED:
        return None, 0, 0, False  # admitted before it opened: the window restarted since
    _window(doc, settings, now, successes + 1, int(failed))
    if not failed:
        return None, 0, 0, _healthy(doc)
    calls = sum(b[1] for b in doc["b"])
    failures = sum(b[2] for b in doc["b"])
    if calls >= settings.min_calls and failures >= settings.failure_rate * calls:
        _clear(doc, OPEN, now)
        return OPEN, calls, failures, False
    return None, calls, failures, False


def breaker_release(doc: Doc, probe: int) -> bool:
    """A probe that ended without an outcome gives its place back; whether it held one."""
    return doc.get("p", {}).pop(str(probe), None) is not None


def breaker_force(doc: Doc, now: float, state: str) -> bool:
    """Isolate or reset; whether the state changed."""
    if doc.get("s", CLOSED) == state:
        return False
    _clear(doc, state, now)
    return True


def breaker_read(doc: Doc, settings: BreakerSettings, now: float) -> str:
    state: str = doc.get("s", CLOSED)
    if state == OPEN and now >= doc.get("o", 0.0) + settings.open_for:
        return HALF_OPEN
    return state


# ---------------------------------------------------------------------------- bulkhead


def _live(doc: Doc, now: float) -> tuple[dict[str, float], dict[str, float]]:
    held = {t: e for t, e in (doc.get("h") or {}).items() if e > now}
    queued = {t: e for t, e in (doc.get("q") or {}).items() if e > now}
    doc["h"], doc["q"] = held, queued
    return held, queued


def slots_acquire(doc: Doc, now: float, token: str, limit: int, queue: int, lease: float) -> str:
    """`SLOT` (held by `token` until ``now + lease``), `WAIT` (queued: ask again) or `FULL`.

    Expired slots and queue places (their holder died) are dropped first.
    """
    held, queued = _live(doc, now)
    if len(held) < limit:
        queued.pop(token, None)
        held[token] = now + lease
        return SLOT
    if token in queued or len(queued) < queue:
        queued[token] = now + lease
        return WAIT
    return FULL


def slots_renew(doc: Doc, now: float, token: str, lease: float) -> bool:
    held = doc.get("h") or {}
    if token not in held:
        return False
    held[token] = now + lease
    return True


def slots_release(doc: Doc, token: str) -> bool:
    held = (doc.get("h") or {}).pop(token, None)
    queued = (doc.get("q") or {}).pop(token, None)
    return held is not None or queued is not None


def slots_in_use(doc: Doc, now: float) -> int:
    return sum(1 for e in (doc.get("h") or {}).values() if e > now)


# ---------------------------------------------------------------------------- rate limit


def gcra_reserve(
    tat: float, now: float, interval: float, tolerance: float, budget: float | None
) -> tuple[bool, float, float]:
    """One GCRA step: ``(granted, wait, new tat)`` (the tat unchanged when refused).

    The same step as `MemoryLimiter.reserve`, the Lua script and the PostgreSQL statement.
    """
    tat = max(tat, now)
    wait = tat - tolerance - now
    if wait <= 0.0:
        wait = 0.0
    elif budget is not None and wait > budget:
        return False, wait, tat
    return True, wait, tat + interval


def gcra_pause(tat: float, now: float, seconds: float, tolerance: float) -> float | None:
    """The tat that lets no call start for `seconds` (then one per interval), or None when
    a longer pause already holds."""
    paused = now + seconds + tolerance
    return paused if paused > tat else None
