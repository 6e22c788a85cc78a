"""`MemoryStore`: idempotency records in a dict, for tests and single processes."""

from __future__ import annotations

import threading
import time
from typing import Any

from ._base import FIELDS, acquisition, checked_record, completed, holds, renewed
from ._store import COMPLETED, Acquisition, Clock, Record, RecordKey

__all__ = ["MemoryStore"]

# A record's place in the dict: `RecordKey`'s fields as a tuple, hashed and compared in C (a
# `RecordKey` hashes through a generated Python `__hash__`, several times a keyed call).
_Slot = tuple[str, str, str]


class MemoryStore:
    """Records in this process's memory, shared by its threads and tasks.

    Atomic under one lock; nothing survives the process. `clock` is injectable for tests.
    """

    # whether `replay_record` may answer for `acquire` (not when a subclass overrides it)
    _inline_replay = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._inline_replay = (
            cls.acquire is MemoryStore.acquire and cls.aacquire is MemoryStore.aacquire
        )

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._records: dict[_Slot, Record] = {}
        # keys whose record was planted by `_put` (tests), not written by nodekit: checked
        # on every read, so a corrupt one raises like on every other store
        self._planted: set[_Slot] = set()
        self._lock = threading.Lock()
        # `time.time` itself rather than `wall_clock`, which only calls it: one call less
        self._clock: Clock = clock or time.time

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} records)"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a MemoryStore lives in one process and cannot be sent to another (an executor's "
            "worker would get an empty one): use a shared store (PostgreSQL, Redis, SQLite)"
        )

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
    ) -> Acquisition:
        slot = (key.namespace, key.scope, key.digest)
        with self._lock:
            now = self._clock()
            existing = self._records.get(slot)
            if self._planted:
                existing = self._read(slot)
            answer, record = acquisition(
                key, existing, fingerprint, now, lease, ttl, takeover, token, dead
            )
            if record is not None:
                self._records[slot] = record
                if self._planted:
                    self._planted.discard(slot)
            return answer

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        slot = (key.namespace, key.scope, key.digest)
        with self._lock:
            record = self._records.get(slot)
            if not holds(record, token):
                return False
            self._records[slot] = completed(record, result, error, self._clock(), ttl)
            return True

    def release(self, key: RecordKey, token: str) -> bool:
        slot = (key.namespace, key.scope, key.digest)
        with self._lock:
            if not holds(self._records.get(slot), token):
                return False
            del self._records[slot]
            return True

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        slot = (key.namespace, key.scope, key.digest)
        with self._lock:
            record = self._records.get(slot)
            if not holds(record, token):
                return False
            self._records[slot] = renewed(record, self._clock(), lease)
            return True

    def get(self, key: RecordKey) -> Record | None:
        with self._lock:
            return self._read((key.namespace, key.scope, key.digest))

    def replay_record(self, key: RecordKey, fingerprint: str) -> Record | None:
        """The record an acquire would refuse as a replay right now, read in process.

        A completed, unexpired record of `key` for this `fingerprint` (IDEMPOTENCY.md rule 23:
        this store *is* the in-process cache of completed records, so a `delete` or `resolve`
        is seen at once). Anything else — absent, expired, in progress, another payload, a
        planted record, a subclass that overrides `acquire` — is None: the claim protocol
        decides, through `acquire`. No lock: a dict read is atomic and a record is replaced,
        never changed in place, so the read sees the record as an acquire would, before or
        after any concurrent write.
        """
        if not self._inline_replay:
            return None
        slot = (key.namespace, key.scope, key.digest)
        record = self._records.get(slot)
        if (
            record is None
            or record.state != COMPLETED
            or record.fingerprint != fingerprint
            or (self._planted and slot in self._planted)
            or record.expires_at <= self._clock()
        ):
            return None
        return record

    def _read(self, slot: _Slot) -> Record | None:
        record = self._records.get(slot)
        if self._planted and slot in self._planted and record is not None:
            checked_record([getattr(record, name) for name in FIELDS], repr(self))
        return record

    def delete(self, key: RecordKey) -> bool:
        with self._lock:
            return self._records.pop((key.namespace, key.scope, key.digest), None) is not None

    def close(self) -> None:
        pass

    # async twins: no I/O, so they run inline
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
        return self.acquire(
            key, fingerprint, lease=lease, ttl=ttl, takeover=takeover, token=token, dead=dead
        )

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        return self.complete(key, token, result=result, error=error, ttl=ttl)

    async def arelease(self, key: RecordKey, token: str) -> bool:
        return self.release(key, token)

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        return self.renew(key, token, lease=lease)

    async def aget(self, key: RecordKey) -> Record | None:
        return self.get(key)

    async def adelete(self, key: RecordKey) -> bool:
        return self.delete(key)

    async def aclose(self) -> None:
        pass

    def _put(self, record: Record) -> None:
        """Write a record as is (tests use it to plant corrupt or foreign records)."""
        with self._lock:
            slot = (record.namespace, record.scope, record.key_digest)
            self._records[slot] = record
            self._planted.add(slot)
