"""The store protocol: the small contract every idempotency store keeps, sync and async.

A store holds one `Record` per `RecordKey`. Policy (TTL, lease, delivery, what to do on a
conflict) lives on the node, never on the store: a store is a plain implementation that many
nodes share. Every transition is conditional and atomic on the store:

- `acquire` inserts a fresh in-progress record if the key is absent, expired, or in progress
  with an expired lease *and the same fingerprint* (and `takeover` is allowed); it returns the
  new record with a fresh owner token and a higher epoch, or the existing record untouched.
  With ``dead=<owner token>`` it also takes over an in-progress record *held by that token*
  whose lease is still valid (its holder process is known to be gone): atomically, so of two
  callers that found the same dead holder exactly one wins. The record names its holder
  (`Record.holder`: this process's identity, written by the store).
  A caller may choose the token (``token=``): when the acquire's reply is lost or its task
  cancelled, it can still release its own claim, since it knows which token to name.
- `complete`, `release` and `renew` succeed only while ``(key, token, IN_PROGRESS)`` holds:
  a holder whose lease was taken over can never overwrite or delete the record (fencing).

Times are float seconds since the epoch. A store reads them from its own clock (PostgreSQL
``now()``, Redis ``TIME``) unless a `clock` was injected (tests). `expires_at` (the TTL) is
decided by nodekit; a store's own expiry is only garbage collection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "COMPLETED",
    "FORMAT_VERSION",
    "IN_PROGRESS",
    "Acquisition",
    "AsyncStore",
    "NotSent",
    "Record",
    "RecordKey",
    "Store",
    "SyncStore",
]

FORMAT_VERSION = 1
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

Clock = Callable[[], float]


class RecordKey(NamedTuple):
    """Where a record lives: the node's namespace (name and version), a scope, a key digest.

    `digest` is a SHA-256 (or HMAC) hex digest: a store never sees the raw key. A named
    tuple (immutable, hashed and compared in C): a keyed call builds one and looks it up
    several times.
    """

    namespace: str
    scope: str
    digest: str

    @property
    def short(self) -> str:
        """The 12-hex-digit fingerprint used in events and error messages."""
        return self.digest[:12]


@dataclass(slots=True)
class Record:
    """One idempotency record, as stored. "Expired" is computed, never stored.

    Treat it as immutable (nodekit never changes one: it builds a new record). It is not a
    frozen dataclass only because a frozen one costs several times more to create, and a
    keyed call creates two.
    """

    namespace: str
    scope: str
    key_digest: str
    fingerprint: str
    state: str
    owner_token: str
    epoch: int
    lease_expires_at: float
    created_at: float
    expires_at: float
    result: str | None = None
    error: str | None = None
    format_version: int = FORMAT_VERSION
    # who acquired it: this process's identity as compact JSON (`_holder.py`), so that a
    # caller on the same host can take over at once from a holder that died; None in records
    # written before it was recorded
    holder: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at <= now

    def lease_valid(self, now: float) -> bool:
        return self.state == IN_PROGRESS and self.lease_expires_at > now


@dataclass(slots=True)
class Acquisition:
    """What `acquire` returns: whether this caller now holds the key, and the current record.

    `takeover` is true when the caller took over an in-progress record whose lease had expired
    (its previous holder died or stalled), or whose holder was known dead (``dead=``). `now`
    is the store's time at the decision.
    """

    acquired: bool
    record: Record
    takeover: bool = False
    now: float = 0.0


@runtime_checkable
class SyncStore(Protocol):
    """The synchronous half of the store protocol."""

    def acquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition: ...

    def complete(
        self,
        key: RecordKey,
        token: str,
        *,
        result: str | None,
        error: str | None,
        ttl: float,
    ) -> bool: ...

    def release(self, key: RecordKey, token: str) -> bool: ...

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool: ...

    def get(self, key: RecordKey) -> Record | None: ...

    def delete(self, key: RecordKey) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncStore(Protocol):
    """The asynchronous half: the same operations, awaited, never blocking the event loop."""

    async def aacquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition: ...

    async def acomplete(
        self,
        key: RecordKey,
        token: str,
        *,
        result: str | None,
        error: str | None,
        ttl: float,
    ) -> bool: ...

    async def arelease(self, key: RecordKey, token: str) -> bool: ...

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool: ...

    async def aget(self, key: RecordKey) -> Record | None: ...

    async def adelete(self, key: RecordKey) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Store(SyncStore, AsyncStore, Protocol):
    """A store usable from sync and async nodes alike (every built-in store is one)."""


class NotSent(Exception):
    """A store operation that never left the process (no connection could be had in time,
    the server refused to connect): the store is unchanged.

    A store raises a subclass of it so that a caller whose acquire failed knows there is no
    claim of its own to release; any other error from an acquire may be a lost reply, which
    the caller reconciles by releasing its token.
    """


def wall_clock() -> float:
    return time.time()
