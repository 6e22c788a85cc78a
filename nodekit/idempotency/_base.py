"""Shared pieces of the built-in stores: tokens, the acquire decision, async-over-thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Self, TypeGuard, TypeVar, cast

from .._errors import IdempotencyCorruptRecord
from .._runtime import CURRENT
from ._holder import holder_text
from ._store import (
    COMPLETED,
    FORMAT_VERSION,
    IN_PROGRESS,
    Acquisition,
    NotSent,
    Record,
    RecordKey,
    SyncStore,
)

T = TypeVar("T")

__all__ = [
    "FIELDS",
    "Closing",
    "PoolTimeout",
    "ThreadedAsync",
    "Unreachable",
    "acquisition",
    "can_acquire",
    "checked_record",
    "completed",
    "fresh_record",
    "holds",
    "new_token",
    "pool_wait",
    "record_from_fields",
    "renewed",
]

# A record's fields in storage order (every store's columns, `Record`'s positional order).
FIELDS = (
    "namespace",
    "scope",
    "key_digest",
    "fingerprint",
    "state",
    "owner_token",
    "epoch",
    "lease_expires_at",
    "created_at",
    "expires_at",
    "result",
    "error",
    "format_version",
    "holder",
)
_VERSION_AT = FIELDS.index("format_version")
_TIMES = ("lease_expires_at", "created_at", "expires_at")
# a time stored as text, as nodekit writes it (ASCII decimal; never nan, inf, hex or "1_0")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_STATES = (IN_PROGRESS, COMPLETED)


class _Tokens:
    """Owner tokens: 32 hex digits, 8 random bytes per process (new after a fork), then a
    64-bit counter.

    A token must be unique among every holder of a key on every host, never secret: it
    fences, it does not authenticate. A counter behind a random prefix is unique and costs
    no system call per claim.
    """

    __slots__ = ("counter", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)


_TOKENS = _Tokens()
os.register_at_fork(after_in_child=_TOKENS.reseed)


def new_token() -> str:
    """A fresh owner token, unique across processes and hosts."""
    tokens = _TOKENS
    return tokens.prefix + format(next(tokens.counter), "016x")


def can_acquire(
    existing: Record | None,
    fingerprint: str,
    now: float,
    takeover: bool,
    dead: str | None = None,
) -> tuple[bool, bool]:
    """(acquire?, is it a takeover?) for the record as it stands.

    The rule every store applies atomically: absent or expired -> acquire; in progress with
    the same fingerprint and either an expired lease or the owner token `dead` (a holder
    known to be gone) -> take over (if allowed); anything else -> no.
    """
    if existing is None or existing.expires_at <= now:
        return True, False
    if (
        takeover
        and existing.state == IN_PROGRESS
        and (existing.lease_expires_at <= now or existing.owner_token == dead)
        and existing.fingerprint == fingerprint
    ):
        return True, True
    return False, False


def fresh_record(
    key: RecordKey,
    fingerprint: str,
    token: str,
    epoch: int,
    now: float,
    lease: float,
    ttl: float,
) -> Record:
    # positional: keyword arguments cost a slotted dataclass about three times as much
    return Record(
        key.namespace,
        key.scope,
        key.digest,
        fingerprint,
        IN_PROGRESS,
        token,
        epoch,
        now + lease,
        now,
        now + max(ttl, lease),
        None,
        None,
        FORMAT_VERSION,
        holder_text(),
    )


def acquisition(
    key: RecordKey,
    existing: Record | None,
    fingerprint: str,
    now: float,
    lease: float,
    ttl: float,
    takeover: bool,
    token: str | None = None,
    dead: str | None = None,
) -> tuple[Acquisition, Record | None]:
    """Decide an acquire against `existing`; returns the answer and the record to write."""
    ok, took_over = can_acquire(existing, fingerprint, now, takeover, dead)
    if not ok:
        assert existing is not None
        return Acquisition(False, existing, False, now), None
    epoch = (existing.epoch if existing is not None else 0) + 1
    record = fresh_record(key, fingerprint, token or new_token(), epoch, now, lease, ttl)
    return Acquisition(True, record, took_over, now), record


def holds(record: Record | None, token: str) -> TypeGuard[Record]:
    """Whether `token` still holds `record`: the fence `complete`, `release` and `renew` check."""
    return record is not None and record.owner_token == token and record.state == IN_PROGRESS


def renewed(record: Record, now: float, lease: float) -> Record:
    """`record` with its lease extended to `now + lease` (its TTL never shortened)."""
    return replace(
        record, lease_expires_at=now + lease, expires_at=max(record.expires_at, now + lease)
    )


def completed(
    record: Record, result: str | None, error: str | None, now: float, ttl: float
) -> Record:
    return Record(
        record.namespace,
        record.scope,
        record.key_digest,
        record.fingerprint,
        COMPLETED,
        record.owner_token,
        record.epoch,
        record.lease_expires_at,
        record.created_at,
        now + ttl,
        result,
        error,
        record.format_version,
        record.holder,
    )


class Closing:
    """`with store:` / `async with store:` close the store on exit (sync or async)."""

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ThreadedAsync:
    """Async twins that run the sync operation in the store's own worker threads.

    Not asyncio's default executor: it has only a few threads (cores + 4) and the sync nodes
    of an async flow run there too, so store I/O would queue behind them and they behind it.
    The threads (two: SQLite has one writer at a time anyway) start on first use.
    """

    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _sync(self) -> SyncStore:
        return cast(SyncStore, self)

    def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        executor = self._executor
        if executor is None:
            executor = self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="nodekit-store"
            )
        return asyncio.get_running_loop().run_in_executor(
            executor, functools.partial(fn, *args, **kwargs)
        )

    def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

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
    ) -> Acquisition:
        return await self._run(
            self._sync().acquire,
            key,
            fingerprint,
            lease=lease,
            ttl=ttl,
            takeover=takeover,
            token=token,
            dead=dead,
        )

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        return await self._run(
            self._sync().complete, key, token, result=result, error=error, ttl=ttl
        )

    async def arelease(self, key: RecordKey, token: str) -> bool:
        return await self._run(self._sync().release, key, token)

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        return await self._run(self._sync().renew, key, token, lease=lease)

    async def aget(self, key: RecordKey) -> Record | None:
        return await self._run(self._sync().get, key)

    async def adelete(self, key: RecordKey) -> bool:
        return await self._run(self._sync().delete, key)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._sync().close)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync().close()


# ---------------------------------------------------------------------------- pools


class PoolTimeout(NotSent, TimeoutError):
    """No connection of the store's pool came free in time; nothing was sent."""


class Unreachable(NotSent, ConnectionError):
    """The store could not connect to its server; nothing was sent."""


def pool_wait(limit: float, *, bounded: bool = True) -> float:
    """How long a store may wait for a free connection: `limit` seconds, or, when `bounded`,
    less if the running node's deadline comes sooner (0.0 once it has passed).

    Acquire and reads are bounded: a call that cannot get a connection before its deadline
    fails with a store error *before* anything ran. Completion, release and renewal are not:
    the effect already happened and its outcome must be recorded if at all possible.
    """
    if bounded:
        ctx = CURRENT.get()
        if ctx is not None and ctx.deadline is not None:
            left: float = ctx.remaining()
            if left < limit:
                return left
    return limit


# ---------------------------------------------------------------------------- corrupt records


def checked_record(values: Sequence[Any], store: str) -> Record:
    """A `Record` from a store's raw values in `FIELDS` order, checked field by field.

    Anything a store can hold but nodekit never writes (an unknown state, a time that is not a
    finite number, an epoch that is not a positive integer, a missing field, a newer format)
    raises `IdempotencyCorruptRecord` naming the store, the key's fingerprint and the field:
    a corrupt record is never treated as absent, expired or acquirable.
    """
    if len(values) != len(FIELDS):
        raise _corrupt(values, store, "record", f"{len(values)} fields, expected {len(FIELDS)}")
    (
        namespace,
        scope,
        key_digest,
        fingerprint,
        state,
        owner_token,
        epoch,
        lease_expires_at,
        created_at,
        expires_at,
        result,
        error,
        format_version,
        holder,
    ) = values
    for name, text in (
        ("namespace", namespace),
        ("scope", scope),
        ("key_digest", key_digest),
        ("fingerprint", fingerprint),
        ("owner_token", owner_token),
    ):
        if type(text) is not str or (not text and name != "scope"):
            raise _corrupt(values, store, name, "missing or not text")
    if state != IN_PROGRESS and state != COMPLETED:
        raise _corrupt(values, store, "state", f"{state!r} is not one of {_STATES}")
    epoch = _whole(epoch)
    if epoch is None or epoch < 1:
        raise _corrupt(values, store, "epoch", "not a positive integer")
    times = []
    for name, value in zip(_TIMES, (lease_expires_at, created_at, expires_at), strict=True):
        seconds = _seconds(value)
        if seconds is None:
            raise _corrupt(values, store, name, "not a finite number of seconds")
        times.append(seconds)
    for name, payload in (("result", result), ("error", error)):
        if payload is not None and type(payload) is not str:
            raise _corrupt(values, store, name, "not text")
    version = _whole(format_version)
    if version is None or not 1 <= version <= FORMAT_VERSION:
        raise _corrupt(
            values, store, "format_version", f"this nodekit reads versions 1 to {FORMAT_VERSION}"
        )
    return Record(
        namespace,
        scope,
        key_digest,
        fingerprint,
        state,
        owner_token,
        epoch,
        times[0],
        times[1],
        times[2],
        result,
        error,
        version,
        # a holder is only ever trusted to be dead when it parses (`_holder.parse`), so an
        # unreadable one is kept as None rather than refused: it only costs the wait
        holder if type(holder) is str else None,
    )


def record_from_fields(fields: Mapping[str, Any], store: str) -> Record:
    """`checked_record` for a store that keeps a record as named fields (a Redis hash)."""
    values = [fields.get(name) for name in FIELDS]
    if values[_VERSION_AT] is None and "format_version" not in fields:
        values[_VERSION_AT] = FORMAT_VERSION  # records from before the field existed
    return checked_record(values, store)


def _whole(value: Any) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _seconds(value: Any) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return float(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    return None


def _corrupt(values: Sequence[Any], store: str, field: str, why: str) -> IdempotencyCorruptRecord:
    shown = {}
    for name, value in zip(FIELDS, values, strict=False):
        if name in ("result", "error"):
            shown[name] = "<none>" if value is None else f"<{len(str(value))} characters>"
        else:
            shown[name] = str(value)[:80]
    digest = values[2] if len(values) > 2 and isinstance(values[2], str) else ""
    short = digest[:12] or "?"
    return IdempotencyCorruptRecord(
        f"{store}: the record of key {short} is corrupt: field {field!r} ({why}); nothing was "
        "run and the record was kept (inspect it with `nodekit store show`, remove it with "
        "`nodekit store resolve`)",
        key_fingerprint=short,
        store=store,
        field=field,
        fields=shown,
    )
