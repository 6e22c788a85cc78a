"""`MemoryStore`: idempotency records in a dict, for tests and single processes."""

from __future__ import annotations

import threading

from ._base import acquisition, completed, holds, renewed
from ._store import Acquisition, Clock, Record, RecordKey, wall_clock

__all__ = ["MemoryStore"]


class MemoryStore:
    """Records in this process's memory, shared by its threads and tasks.

    Atomic under one lock; nothing survives the process. `clock` is injectable for tests.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._records: dict[RecordKey, Record] = {}
        self._lock = threading.Lock()
        self._clock = clock or wall_clock

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} records)"

    def acquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
    ) -> Acquisition:
        with self._lock:
            now = self._clock()
            answer, record = acquisition(
                key, self._records.get(key), fingerprint, now, lease, ttl, takeover, token
            )
            if record is not None:
                self._records[key] = record
            return answer

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        with self._lock:
            record = self._records.get(key)
            if not holds(record, token):
                return False
            self._records[key] = completed(record, result, error, self._clock(), ttl)
            return True

    def release(self, key: RecordKey, token: str) -> bool:
        with self._lock:
            if not holds(self._records.get(key), token):
                return False
            del self._records[key]
            return True

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        with self._lock:
            record = self._records.get(key)
            if not holds(record, token):
                return False
            self._records[key] = renewed(record, self._clock(), lease)
            return True

    def get(self, key: RecordKey) -> Record | None:
        with self._lock:
            return self._records.get(key)

    def delete(self, key: RecordKey) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None

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
    ) -> Acquisition:
        return self.acquire(key, fingerprint, lease=lease, ttl=ttl, takeover=takeover, token=token)

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
            key = RecordKey(record.namespace, record.scope, record.key_digest)
            self._records[key] = record
