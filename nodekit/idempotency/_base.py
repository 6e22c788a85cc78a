"""Shared pieces of the built-in stores: tokens, the acquire decision, async-over-thread."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from ._store import COMPLETED, IN_PROGRESS, Acquisition, Record, RecordKey, SyncStore

__all__ = ["ThreadedAsync", "can_acquire", "fresh_record", "new_token"]


def new_token() -> str:
    return os.urandom(16).hex()


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
) -> tuple[Acquisition, Record | None]:
    """Decide an acquire against `existing`; returns the answer and the record to write."""
    ok, took_over = can_acquire(existing, fingerprint, now, takeover)
    if not ok:
        assert existing is not None
        return Acquisition(False, existing, now=now), None
    epoch = (existing.epoch if existing is not None else 0) + 1
    record = fresh_record(key, fingerprint, new_token(), epoch, now, lease, ttl)
    return Acquisition(True, record, takeover=took_over, now=now), record


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


class ThreadedAsync:
    """Async twins that run the sync operation in a worker thread (SQLite's async path)."""

    def _sync(self) -> SyncStore:
        return cast(SyncStore, self)

    async def aacquire(
        self, key: RecordKey, fingerprint: str, *, lease: float, ttl: float, takeover: bool = True
    ) -> Acquisition:
        return await asyncio.to_thread(
            self._sync().acquire, key, fingerprint, lease=lease, ttl=ttl, takeover=takeover
        )

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        return await asyncio.to_thread(
            self._sync().complete, key, token, result=result, error=error, ttl=ttl
        )

    async def arelease(self, key: RecordKey, token: str) -> bool:
        return await asyncio.to_thread(self._sync().release, key, token)

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        return await asyncio.to_thread(self._sync().renew, key, token, lease=lease)

    async def aget(self, key: RecordKey) -> Record | None:
        return await asyncio.to_thread(self._sync().get, key)

    async def adelete(self, key: RecordKey) -> bool:
        return await asyncio.to_thread(self._sync().delete, key)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._sync().close)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync().close()
