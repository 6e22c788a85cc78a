"""Shared pieces of the built-in stores: tokens, the acquire decision, async-over-thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Self, TypeGuard, TypeVar, cast

from ._store import COMPLETED, IN_PROGRESS, Acquisition, Record, RecordKey, SyncStore

T = TypeVar("T")

__all__ = [
    "Closing",
    "ThreadedAsync",
    "acquisition",
    "can_acquire",
    "completed",
    "fresh_record",
    "holds",
    "new_token",
    "renewed",
]


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
    existing: Record | None, fingerprint: str, now: float, takeover: bool
) -> tuple[bool, bool]:
    """(acquire?, is it a takeover of an expired lease?) for the record as it stands.

    The rule every store applies atomically: absent or expired -> acquire; in progress with
    an expired lease and the same fingerprint -> take over (if allowed); anything else -> no.
    """
    if existing is None or existing.expires_at <= now:
        return True, False
    if (
        takeover
        and existing.state == IN_PROGRESS
        and existing.lease_expires_at <= now
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
    return Record(
        namespace=key.namespace,
        scope=key.scope,
        key_digest=key.digest,
        fingerprint=fingerprint,
        state=IN_PROGRESS,
        owner_token=token,
        epoch=epoch,
        lease_expires_at=now + lease,
        created_at=now,
        expires_at=now + max(ttl, lease),
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
) -> tuple[Acquisition, Record | None]:
    """Decide an acquire against `existing`; returns the answer and the record to write."""
    ok, took_over = can_acquire(existing, fingerprint, now, takeover)
    if not ok:
        assert existing is not None
        return Acquisition(False, existing, now=now), None
    epoch = (existing.epoch if existing is not None else 0) + 1
    record = fresh_record(key, fingerprint, token or new_token(), epoch, now, lease, ttl)
    return Acquisition(True, record, takeover=took_over, now=now), record


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
    ) -> Acquisition:
        return await self._run(
            self._sync().acquire,
            key,
            fingerprint,
            lease=lease,
            ttl=ttl,
            takeover=takeover,
            token=token,
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
