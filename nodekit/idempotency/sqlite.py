"""`SQLiteStore`: the embedded default for anything durable.

One file, WAL mode, safe for many threads and many processes on one host: every acquire is a
``BEGIN IMMEDIATE`` transaction (one writer at a time) that reads the record, applies the same
decision as every other store, and writes. Each thread has its own connection, closed when the
thread ends (so short-lived threads, e.g. `node.map()`'s, leave no file descriptors behind);
the async methods run in the store's worker threads and never block the event loop.

A table made by an older nodekit is brought up to date when the store opens it: columns are
only ever added, nullable (``holder``, who acquired the record), so older processes sharing
the file keep working.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .._errors import ConfigError
from .._sqlite import writer_lock
from ._base import ThreadedAsync, acquisition, checked_record, completed, holds, renewed
from ._store import FORMAT_VERSION, IN_PROGRESS, Acquisition, Clock, Record, RecordKey, wall_clock

__all__ = ["SQLiteStore"]

_COLUMNS = (
    "namespace, scope, key_digest, fingerprint, state, owner_token, epoch, "
    "lease_expires_at, created_at, expires_at, result, error, format_version, holder"
)


class _Held:
    """One thread's connection, and the lock held while it runs a statement.

    Referenced strongly only from its thread's local slot: when the thread ends the slot goes,
    and the finalizer closes the connection (from whichever thread collects it, which
    ``check_same_thread=False`` allows).
    """

    __slots__ = ("__weakref__", "conn", "lock")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        weakref.finalize(self, _close_quietly, conn)


def _close_quietly(conn: sqlite3.Connection) -> None:
    with suppress(sqlite3.Error):
        conn.close()


def _add_missing_columns(conn: sqlite3.Connection, table: str) -> None:
    """Bring a table made by an older nodekit up to date: columns are only ever added, and
    nullable, so older processes on the same file keep working (they name their columns and
    leave the new ones empty). Runs inside the store's first ``BEGIN IMMEDIATE``: of many
    processes opening the file at once, one adds the column and the others see it."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if "holder" not in have:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN holder TEXT")


class SQLiteStore(ThreadedAsync):
    """Idempotency records in a SQLite file (created with its schema if missing).

    `synchronous` is SQLite's durability setting: ``"NORMAL"`` (default) survives any process
    crash, SIGKILL included; ``"FULL"`` also survives power loss. `clock` is injectable.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "nodekit_idempotency",
        synchronous: str = "NORMAL",
        busy_timeout: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if not table.replace("_", "").isalnum():
            raise ConfigError(
                f"SQLiteStore table name {table!r} must be alphanumeric", option="table"
            )
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(
                f"SQLiteStore synchronous={synchronous!r} is not a SQLite level",
                option="synchronous",
            )
        self.path = os.fspath(path)
        self.table = table
        self._synchronous = synchronous.upper()
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = clock or wall_clock
        self._local = threading.local()
        self._writer = writer_lock(self.path)
        # every open connection, weakly: a thread's connection lives in its thread-local
        # slot only, so it is closed when the thread ends; `close()` closes those still open
        self._all: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        with self._tx() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                "namespace TEXT NOT NULL, scope TEXT NOT NULL, key_digest TEXT NOT NULL, "
                "fingerprint TEXT NOT NULL, state TEXT NOT NULL, owner_token TEXT NOT NULL, "
                "epoch INTEGER NOT NULL, lease_expires_at REAL NOT NULL, created_at REAL NOT NULL, "
                "expires_at REAL NOT NULL, result TEXT, error TEXT, format_version INTEGER NOT NULL, "
                "holder TEXT, PRIMARY KEY (namespace, scope, key_digest)) WITHOUT ROWID"
            )
            _add_missing_columns(conn, table)
            conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires_at)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS nodekit_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT OR IGNORE INTO nodekit_meta (name, value) VALUES ('format_version', ?)",
                (str(FORMAT_VERSION),),
            )

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its path and options: another process (an executor's worker on this
        machine) re-opens the same file."""
        options: dict[str, Any] = {
            "table": self.table,
            "synchronous": self._synchronous,
            "busy_timeout": self._busy_ms / 1000,
        }
        if self._clock is not wall_clock:
            options["clock"] = self._clock
        return (functools.partial(SQLiteStore, self.path, **options), ())

    # ------------------------------------------------------------------ connections

    def _conn(self) -> _Held:
        """This thread's connection and its lock (held while the connection is in use)."""
        held: _Held | None = getattr(self._local, "conn", None)
        if held is None:
            if self._closed:
                raise sqlite3.ProgrammingError("SQLiteStore is closed")
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_ms / 1000,
            )
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            for _ in range(50):
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.02)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            held = _Held(conn)
            self._local.conn = held
            with self._lock:
                self._all.add(held)
        return held

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        # Each thread has its own connection; the lock only stops `close()` (from another
        # thread) from closing a connection in the middle of a statement.
        held = self._conn()
        with held.lock:
            if self._closed:
                raise sqlite3.ProgrammingError("SQLiteStore is closed")
            yield held.conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._use() as conn, self._writer:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, conn: sqlite3.Connection, key: RecordKey) -> Record | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE namespace = ? AND scope = ? AND key_digest = ?",
            (key.namespace, key.scope, key.digest),
        ).fetchone()
        return None if row is None else checked_record(row, repr(self))

    def _write(self, conn: sqlite3.Connection, record: Record) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {self.table} ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                record.namespace,
                record.scope,
                record.key_digest,
                record.fingerprint,
                record.state,
                record.owner_token,
                record.epoch,
                record.lease_expires_at,
                record.created_at,
                record.expires_at,
                record.result,
                record.error,
                record.format_version,
                record.holder,
            ),
        )

    # ------------------------------------------------------------------ protocol

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
        with self._tx() as conn:
            now = self._clock()
            answer, record = acquisition(
                key, self._read(conn, key), fingerprint, now, lease, ttl, takeover, token, dead
            )
            if record is not None:
                self._write(conn, record)
            return answer

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        with self._tx() as conn:
            record = self._read(conn, key)
            if not holds(record, token):
                return False
            self._write(conn, completed(record, result, error, self._clock(), ttl))
            return True

    def release(self, key: RecordKey, token: str) -> bool:
        with self._use() as conn, self._writer:
            cur = conn.execute(
                f"DELETE FROM {self.table} WHERE namespace = ? AND scope = ? AND key_digest = ? "
                "AND owner_token = ? AND state = ?",
                (key.namespace, key.scope, key.digest, token, IN_PROGRESS),
            )
            return cur.rowcount == 1

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        with self._tx() as conn:
            record = self._read(conn, key)
            if not holds(record, token):
                return False
            self._write(conn, renewed(record, self._clock(), lease))
            return True

    def get(self, key: RecordKey) -> Record | None:
        with self._use() as conn:
            return self._read(conn, key)

    def delete(self, key: RecordKey) -> bool:
        with self._use() as conn, self._writer:
            cur = conn.execute(
                f"DELETE FROM {self.table} WHERE namespace = ? AND scope = ? AND key_digest = ?",
                (key.namespace, key.scope, key.digest),
            )
            return cur.rowcount == 1

    def stats(self) -> dict[tuple[str, str], int]:
        """How many records each namespace holds, per state (for the command line)."""
        with self._use() as conn:
            rows = conn.execute(
                f"SELECT namespace, state, COUNT(*) FROM {self.table} GROUP BY namespace, state"
            ).fetchall()
        return {(namespace, state): count for namespace, state, count in rows}

    def purge_expired(self) -> int:
        """Delete expired records (garbage collection); returns how many went."""
        now = self._clock()
        with self._use() as conn, self._writer:
            cur = conn.execute(
                f"DELETE FROM {self.table} WHERE expires_at <= ? "
                "AND NOT (state = ? AND lease_expires_at > ?)",
                (now, IN_PROGRESS, now),
            )
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._closed = True
            held, self._all = list(self._all), weakref.WeakSet()
        for each in held:
            with each.lock, suppress(sqlite3.Error):  # waits for a statement in flight to finish
                each.conn.close()
        self._local = threading.local()
        self._shutdown()

    def _put(self, record: Record) -> None:
        """Write a record as is (tests use it to plant corrupt or foreign records)."""
        with self._tx() as conn:
            self._write(conn, record)
