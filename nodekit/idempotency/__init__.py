"""Idempotency keys and the stores they live in.

The public names are re-exported from `nodekit`; this package also exposes the store protocol
(`Store`, `Record`, `RecordKey`, `Acquisition`) for people who write their own store, and
`KeyHolder` (an error's `.holder`; `holder_of(record)` for a stored record).
"""

from .._canonical import canonical_json, derive_key
from ._holder import KeyHolder, holder_of
from ._open import default_store, open_store, set_default_store
from ._policy import Codec, Idempotency, NodekitWarning
from ._resolve import aresolve, resolve
from ._store import (
    COMPLETED,
    IN_PROGRESS,
    Acquisition,
    AsyncStore,
    Record,
    RecordKey,
    Store,
    SyncStore,
)
from .memory import MemoryStore


def __getattr__(name: str) -> object:
    # the durable stores import their drivers lazily
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(name)


__all__ = [
    "COMPLETED",
    "IN_PROGRESS",
    "Acquisition",
    "AsyncStore",
    "Codec",
    "Idempotency",
    "KeyHolder",
    "MemoryStore",
    "NodekitWarning",
    "PostgresStore",
    "Record",
    "RecordKey",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "SyncStore",
    "aresolve",
    "canonical_json",
    "default_store",
    "derive_key",
    "holder_of",
    "open_store",
    "resolve",
    "set_default_store",
]
