"""Competing outbox dispatchers: each message claimed by one dispatcher at a time, under a lease.

The protocol, the same on SQLite and PostgreSQL:

1. **claim** a batch: the oldest claimable rows (pending, and unclaimed or whose claim has
   expired) get ``claimed_by = <this dispatcher>`` and ``claim_expires = now + lease``, in one
   short transaction (PostgreSQL: one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
   LOCKED)``, so claimers never wait for each other; SQLite: inside ``BEGIN IMMEDIATE``, which
   admits one writer at a time). No transaction stays open while messages are delivered.
2. **deliver** each message to the handler, with its stable key, in order. No delivery starts
   once less than half the lease is left: the dispatcher first *checkpoints* (below), which
   renews the lease of the messages it still holds and drops any it lost.
3. **settle** in one transaction: delivered messages are marked done and their claim released
   together; a failed delivery records ``attempts`` and the redacted ``last_error`` and
   releases the claim; messages not delivered (graceful stop) are released at once. Every
   statement is fenced on ``claimed_by``, so a dispatcher whose claim expired and was taken
   over can never settle a message it no longer holds.

A dispatcher that dies gives its messages back when its lease ends; sooner when a dispatcher
on the same host sees the dead one's process is gone (``claimed_by`` names host, PID namespace
and PID), since a process that no longer exists cannot be delivering anything. The lease must
therefore outlast the longest single delivery: give the handler a timeout well under half of it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .._errors import ConfigError
from .._redact import error_text
from ._message import Message

__all__ = [
    "Batch",
    "Round",
    "Settlement",
    "check_batch",
    "check_seconds",
    "gone",
    "new_owner",
]


# ---------------------------------------------------------------------------- identity


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


_HOST = socket.gethostname().replace("/", "_") or "-"
_PIDNS = _pid_namespace()


def new_owner() -> str:
    """A dispatcher's name in ``claimed_by``: ``host/pid-namespace/pid/random``."""
    return f"{_HOST}/{_PIDNS}/{os.getpid()}/{secrets.token_hex(4)}"


def gone(owner: str) -> bool:
    """True only when `owner`'s process certainly no longer exists.

    Decidable only for a process on this host, in this PID namespace; anything else (another
    host, a reused PID, a process we may not signal) counts as alive and waits for its lease.
    """
    parts = owner.rsplit("/", 3)
    if len(parts) != 4 or parts[0] != _HOST or parts[1] != _PIDNS or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid() or pid <= 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


# ---------------------------------------------------------------------------- options


def check_seconds(value: Any, option: str, *, positive: bool) -> float:
    """`value` (float seconds or timedelta) as float seconds, or a `ConfigError` naming it."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"nodekit.sql: {option} must be seconds (float) or a timedelta, got {value!r}",
            option=option,
        )
    if value < 0 or (positive and value == 0):
        raise ConfigError(
            f"nodekit.sql: {option} must be {'positive' if positive else '>= 0'}, got {value!r}",
            option=option,
        )
    return float(value)


def check_batch(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise ConfigError(
            f"nodekit.sql: {option} must be an integer from 1 to 10000, got {value!r}",
            option=option,
        )
    return value


# ---------------------------------------------------------------------------- decisions


@dataclass(slots=True)
class Settlement:
    """What one settling transaction writes; empty lists write nothing."""

    done: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (id, redacted error)
    release: list[int] = field(default_factory=list)
    extend: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.done or self.failed or self.release or self.extend)


class Batch:
    """The messages one claim returned, as they are delivered (no I/O here).

    `renew_at` is on the local monotonic clock, measured from *before* the claim was sent, so
    it is never later than the database's view of the lease.
    """

    def __init__(self, messages: Sequence[Message], lease: float, started: float) -> None:
        self._queue = deque(messages)
        self._lease = lease
        self.renew_at = started + lease / 2
        self._done: list[int] = []
        self._failed: list[tuple[int, str]] = []
        self.delivered = 0

    def due(self, now: float) -> bool:
        """Whether the lease must be renewed before the next delivery starts."""
        return bool(self._queue) and now >= self.renew_at

    def next(self) -> Message | None:
        return self._queue.popleft() if self._queue else None

    def succeeded(self, message: Message) -> None:
        self._done.append(message.id)
        self.delivered += 1

    def failed(self, message: Message, error: BaseException) -> None:
        self._failed.append((message.id, error_text(error, 500)))  # redacted, one line

    def checkpoint(self) -> Settlement:
        """Settle what is delivered so far and renew the lease of the rest."""
        return Settlement(self._done, self._failed, [], [m.id for m in self._queue])

    def renewed(self, held: set[int], started: float) -> None:
        """After a checkpoint: forget what was settled, drop what the dispatcher lost."""
        self._done, self._failed = [], []
        self._queue = deque(m for m in self._queue if m.id in held)
        self.renew_at = started + self._lease / 2

    def final(self, current: Message | None) -> Settlement:
        """Settle everything: delivered, failed, and the undelivered released at once."""
        rest = ([current.id] if current is not None else []) + [m.id for m in self._queue]
        self._queue.clear()
        return Settlement(self._done, self._failed, rest, [])


@dataclass(frozen=True, slots=True)
class Round:
    """One dispatcher's options for a round: claim a batch, deliver it, settle it."""

    owner: str
    limit: int
    lease: float
    retry_delay: float
    topic: str | None
    stop: threading.Event | None = None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()
