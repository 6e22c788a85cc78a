"""One in-process writer at a time per SQLite file, without SQLite's sleeping busy handler.

SQLite lets one writer in at a time. When threads of one process collide on the write lock,
SQLite's busy handler makes the loser *sleep* (1, 2, 5, 10, ... up to 100 ms) before it tries
again, so a few concurrent writers turn microsecond transactions into milliseconds of waiting.
Taking a plain lock per database file first queues the threads of this process fairly and
wakes the next one the moment the write finishes; other processes still meet SQLite's own
locking. Used by `SQLiteStore` and `nodekit.sql` around their write transactions.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["database_file", "writer_lock"]

# Re-entrant: a transactional function may call a keyed node whose store file shares a stripe.
_STRIPES = tuple(threading.RLock() for _ in range(64))


def writer_lock(path: str) -> threading.RLock:
    """The lock that serialises this process's write transactions on the file at `path`."""
    return _STRIPES[hash(os.path.realpath(path)) % len(_STRIPES)] if path else _STRIPES[0]


def database_file(conn: Any) -> str:
    """The file behind a sqlite3 connection's main database ("" for an in-memory one)."""
    row = conn.execute("PRAGMA database_list").fetchone()
    return str(row[2] or "") if row is not None else ""
