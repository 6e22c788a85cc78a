"""The run log of a SQLiteStore: a table ``{table}_runs`` beside its records."""

from __future__ import annotations

from typing import Any

from ...idempotency._store import Record
from ._model import _SQL_COLUMNS, CANCELLED, RUNNING, RunInfo, _Backend, _info, _where


class _SQLite(_Backend):
    def __init__(self, store: Any) -> None:
        self._keep(store)
        self.t = t = f"{store.table}_runs"
        with store._tx() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t} (flow TEXT NOT NULL, run_id TEXT NOT NULL, "
                "status TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL, "
                "updated_at REAL NOT NULL, lease_expires_at REAL NOT NULL, holder TEXT, "
                "nodes TEXT NOT NULL, events TEXT NOT NULL DEFAULT '', "
                "PRIMARY KEY (flow, run_id))"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_started ON {t} (started_at)")

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        t = self.t
        with self.store._tx() as conn:
            row = conn.execute(
                f"SELECT status FROM {t} WHERE flow = ? AND run_id = ?", (flow, run_id)
            ).fetchone()
            if row is None:
                conn.execute(
                    f"INSERT INTO {t} ({_SQL_COLUMNS}, events) VALUES (?,?,?,?,?,?,?,?,?,'')",
                    (flow, run_id, RUNNING, now, None, now, lease, holder, nodes),
                )
                return None
            if row[0] != CANCELLED:
                conn.execute(
                    f"UPDATE {t} SET status = ?, ended_at = NULL, updated_at = ?, "
                    "lease_expires_at = ?, holder = ?, nodes = ? WHERE flow = ? AND run_id = ?",
                    (RUNNING, now, lease, holder, nodes, flow, run_id),
                )
            return str(row[0])

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        store = self.store
        # no RETURNING (SQLite 3.35+): the status read back in the same transaction
        with store._tx() as conn:
            conn.execute(
                f"UPDATE {self.t} SET events = events || ?, updated_at = ?, "
                "lease_expires_at = ?, "
                "ended_at = CASE WHEN ? IS NULL OR status = ? THEN ended_at ELSE ? END, "
                "status = CASE WHEN ? IS NULL OR status = ? THEN status ELSE ? END "
                "WHERE flow = ? AND run_id = ?",
                (
                    lines,
                    now,
                    lease,
                    status,
                    CANCELLED,
                    now,
                    status,
                    CANCELLED,
                    status,
                    flow,
                    run_id,
                ),
            )
            row = conn.execute(
                f"SELECT status FROM {self.t} WHERE flow = ? AND run_id = ?", (flow, run_id)
            ).fetchone()
        return None if row is None else str(row[0])

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        where, params = _where(flow, run_id, since, "?")
        cols = _SQL_COLUMNS + (", events" if events else ", NULL")
        with self.store._use() as conn:
            rows = conn.execute(
                f"SELECT {cols} FROM {self.t}{where} ORDER BY started_at", params
            ).fetchall()
        return [_info(row, events) for row in rows]

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        store = self.store
        with store._use() as conn, store._writer:
            cur = conn.execute(
                f"UPDATE {self.t} SET status = ? WHERE flow = ? AND run_id = ?",
                (status, flow, run_id),
            )
            return bool(cur.rowcount == 1)

    def delete(self, flow: str, run_id: str) -> bool:
        store = self.store
        with store._use() as conn, store._writer:
            cur = conn.execute(
                f"DELETE FROM {self.t} WHERE flow = ? AND run_id = ?", (flow, run_id)
            )
            return bool(cur.rowcount == 1)

    # records (for the command line)

    def stats(self) -> dict[tuple[str, str], int]:
        result: dict[tuple[str, str], int] = self.store.stats()
        return result

    def find(self, prefix: str) -> list[Record]:
        from ...idempotency._base import checked_record
        from ...idempotency.sqlite import _COLUMNS

        # a hex prefix (checked by the caller): a range on the primary key's digest column
        with self.store._use() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM {self.store.table} WHERE key_digest LIKE ? "
                "ORDER BY namespace, scope, key_digest",
                (prefix + "%",),
            ).fetchall()
        return [checked_record(row, repr(self.store)) for row in rows]
