"""The run log: what `nodekit runs` lists and shows of durable runs.

The journal (`_journal.py`) holds digests only, so runs cannot be listed from it, and it keeps
no trace of attempts, waits or faults. A durable run therefore also keeps a *run log* in the
same store: one row per run with its run id and flow name (in clear: identifiers the user
chose, never keys or payloads), its status, start and end times, the holder (this process,
as `_holder.py` records it), the journal namespaces of its nodes (so that `runs forget` can
delete its journal), and its events.

The events are the run's own (a process-wide sink keyed by run id, registered only while a
durable run is active), stored as JSON lines of ``{"t": time, "name": name, **as_dict()}``:
`Event.as_dict` is the loggable, redacted form (no exception object, no state). They are
buffered in memory and written at points the journal writes anyway: at the first node's
completion, at a later node's completion when the last write is at least `FLUSH_EVERY`
seconds old, and at the end of the run. So a run of fast nodes writes its log three times
(start, first node, end) whatever its length, and a crashed run loses at most the last second
of its events (the journal still has every completed node: `nodekit runs show` lists it).

Statuses: ``running``, ``succeeded``, ``failed``, ``compensated``, ``cancelled``; ``crashed``
is never stored but derived (`derived_status`): a run still ``running`` whose holder process
is gone, or whose lease ended with no node entry still held. ``nodekit runs cancel`` marks a
run cancelled: a resume is refused (`Journal.open_*`), and a run still going stops before its
next node once its next log write sees the mark.

Storage per store (tables created like the stores create theirs, SQL parameterized):
SQLite and PostgreSQL: a table ``{table}_runs`` beside the records table; Redis: a hash
``{prefix}~run~:{len(flow)}:{flow}:{run_id}``, its events in a string key
``{prefix}~run-events~:…`` and a sorted set ``{prefix}~runs~`` (by start time);
MemoryStore: a dict beside the store, for one process. Any other store has no run log.

A run log write never fails a run: an error is logged (``nodekit`` logger, DEBUG) and the run
goes on; the journal is what resumes rely on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .._canonical import canonical_json, digest
from .._events import Event, add_sink, remove_sink
from .._runtime import RUNTIME
from ..idempotency._holder import DEAD, holder_text, state_of
from ..idempotency._store import IN_PROGRESS, Record, RecordKey
from ._schema import Problem

__all__ = [
    "CANCELLED",
    "COMPENSATED",
    "CRASHED",
    "FAILED",
    "FLUSH_EVERY",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "RunInfo",
    "RunLog",
    "backend_for",
    "derived_status",
    "journal_keys",
]

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
COMPENSATED = "compensated"
CANCELLED = "cancelled"
CRASHED = "crashed"  # derived, never stored
STATUSES = (RUNNING, SUCCEEDED, FAILED, COMPENSATED, CANCELLED, CRASHED)

# the least time between two writes of a run's events at node completions (seconds)
FLUSH_EVERY = 1.0

_log = logging.getLogger("nodekit")

# terminal events of a run, and the status each means (a ``flow.failed`` whose
# compensations all ran, ``compensated``)
_OUTCOMES = {"flow.finished": SUCCEEDED, "flow.failed": FAILED}


@dataclass
class RunInfo:
    """One run as the run log holds it (times in seconds since the epoch)."""

    flow: str
    run_id: str
    status: str
    started_at: float
    ended_at: float | None
    updated_at: float
    lease_expires_at: float
    holder: str | None
    nodes: list[tuple[str, str]]  # (node, journal namespace), in the flow's order
    events: list[dict[str, Any]] | None = field(default=None, repr=False)

    def as_run(self, status: str | None = None) -> dict[str, Any]:
        """The run as `nodekit._story.build_story` takes it."""
        return {
            "run_id": self.run_id,
            "flow": self.flow,
            "status": status or self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


def _nodes(text: str | None) -> list[tuple[str, str]]:
    try:
        items = json.loads(text or "[]")
        return [(str(name), str(namespace)) for name, namespace in items]
    except (ValueError, TypeError):
        return []


def _events(text: str | None) -> list[dict[str, Any]]:
    """The stored events: JSON lines, each an array of events (one write) or one event."""
    out: list[dict[str, Any]] = []
    for line in (text or "").splitlines():
        if line.strip():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            for event in item if isinstance(item, list) else [item]:
                if isinstance(event, dict):
                    out.append(event)
    return out


def _float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def journal_keys(info: RunInfo) -> list[RecordKey]:
    """The run's journal records: its header, then one entry per node (as `Journal` keys
    them; a node's first call only)."""
    keys = [RecordKey(f"flow:{info.flow}", "", digest(canonical_json([info.run_id])))]
    for name, namespace in info.nodes:
        keys.append(RecordKey(namespace, "", digest(canonical_json([info.run_id, name, 0]))))
    return keys


def derived_status(info: RunInfo, store: Any, now: float | None = None) -> str:
    """The status to show: the stored one, or ``crashed`` for a ``running`` run whose holder
    is gone (known on its own host), or whose lease ended and no node entry is held."""
    if info.status != RUNNING:
        return info.status
    if state_of(info.holder) == DEAD:
        return CRASHED
    now = time.time() if now is None else now
    for key in journal_keys(info)[1:]:
        record: Record | None = store.get(key)
        if record is not None and record.state == IN_PROGRESS and record.lease_valid(now):
            return CRASHED if state_of(record.holder) == DEAD else RUNNING
    return CRASHED if info.lease_expires_at <= now else RUNNING


# ---------------------------------------------------------------------------- backends


class _Backend:
    """One store's run log table (or keys): the operations, all synchronous."""

    asynchronous_inline = False  # the async flow may call it on the loop (no I/O)

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        """Mark the run running (a new row, or the old one on a resume); the previous
        status, unchanged if it was ``cancelled``."""
        raise NotImplementedError

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        """Append event lines; with `status`, end the run (a cancelled one stays so). The
        status after the write, or None if the run has no row."""
        raise NotImplementedError

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        raise NotImplementedError

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        raise NotImplementedError

    def delete(self, flow: str, run_id: str) -> bool:
        raise NotImplementedError


# ---------------------------------------------------------------------- memory


class _Memory(_Backend):
    asynchronous_inline = True

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        with self.lock:
            row = self.rows.get((flow, run_id))
            if row is None:
                self.rows[(flow, run_id)] = {
                    "status": RUNNING,
                    "started_at": now,
                    "ended_at": None,
                    "updated_at": now,
                    "lease": lease,
                    "holder": holder,
                    "nodes": nodes,
                    "events": [],
                }
                return None
            previous: str = row["status"]
            if previous != CANCELLED:
                row.update(
                    status=RUNNING,
                    ended_at=None,
                    updated_at=now,
                    lease=lease,
                    holder=holder,
                    nodes=nodes,
                )
            return previous

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        with self.lock:
            row = self.rows.get((flow, run_id))
            if row is None:
                return None
            if lines:
                row["events"].append(lines)
            row.update(updated_at=now, lease=lease)
            if status is not None and row["status"] != CANCELLED:
                row.update(status=status, ended_at=now)
            return str(row["status"])

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        with self.lock:
            items = list(self.rows.items())
        out = []
        for (f, r), row in items:
            if (flow is not None and f != flow) or (run_id is not None and r != run_id):
                continue
            if since is not None and row["started_at"] < since:
                continue
            out.append(
                RunInfo(
                    f,
                    r,
                    row["status"],
                    row["started_at"],
                    row["ended_at"],
                    row["updated_at"],
                    row["lease"],
                    row["holder"],
                    _nodes(row["nodes"]),
                    _events("".join(row["events"])) if events else None,
                )
            )
        return sorted(out, key=lambda info: info.started_at)

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        with self.lock:
            row = self.rows.get((flow, run_id))
            if row is None:
                return False
            row["status"] = status
            return True

    def delete(self, flow: str, run_id: str) -> bool:
        with self.lock:
            return self.rows.pop((flow, run_id), None) is not None


# ---------------------------------------------------------------------- SQLite

_SQL_COLUMNS = (
    "flow, run_id, status, started_at, ended_at, updated_at, lease_expires_at, holder, nodes"
)


def _info(row: Sequence[Any], events: bool) -> RunInfo:
    return RunInfo(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        float(row[3]),
        _float(row[4]),
        float(row[5]),
        float(row[6]),
        row[7],
        _nodes(row[8]),
        _events(row[9]) if events else None,
    )


def _where(
    flow: str | None, run_id: str | None, since: float | None, mark: str
) -> tuple[str, list[Any]]:
    """A WHERE clause (placeholders `mark`) and its parameters."""
    parts: list[str] = []
    params: list[Any] = []
    for clause, value in (("flow = ", flow), ("run_id = ", run_id), ("started_at >= ", since)):
        if value is not None:
            parts.append(clause + mark)
            params.append(value)
    return (" WHERE " + " AND ".join(parts)) if parts else "", params


class _SQLite(_Backend):
    def __init__(self, store: Any) -> None:
        self.store = store
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
        with store._use() as conn, store._writer:
            rows = conn.execute(
                f"UPDATE {self.t} SET events = events || ?, updated_at = ?, "
                "lease_expires_at = ?, "
                "ended_at = CASE WHEN ? IS NULL OR status = ? THEN ended_at ELSE ? END, "
                "status = CASE WHEN ? IS NULL OR status = ? THEN status ELSE ? END "
                "WHERE flow = ? AND run_id = ? RETURNING status",
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
            ).fetchall()
        return str(rows[0][0]) if rows else None

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
        from ..idempotency._base import checked_record
        from ..idempotency.sqlite import _COLUMNS

        # a hex prefix (checked by the caller): a range on the primary key's digest column
        with self.store._use() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM {self.store.table} WHERE key_digest LIKE ? "
                "ORDER BY namespace, scope, key_digest",
                (prefix + "%",),
            ).fetchall()
        return [checked_record(row, repr(self.store)) for row in rows]


# ---------------------------------------------------------------------- PostgreSQL


class _Postgres(_Backend):
    def __init__(self, store: Any) -> None:
        from psycopg import sql

        from ..idempotency._pgsql import COLUMNS, DDL_LOCK

        self.store = store
        schema, table = store.schema, f"{store.table}_runs"

        def name(obj: str) -> sql.Identifier:
            return sql.Identifier(schema, obj) if schema else sql.Identifier(obj)

        t = name(table)
        records = name(store.table)
        self.tname = t.as_string()
        create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (flow text NOT NULL, run_id text NOT NULL, "
            "status text NOT NULL, started_at double precision NOT NULL, "
            "ended_at double precision, updated_at double precision NOT NULL, "
            "lease_expires_at double precision NOT NULL, holder text, nodes text NOT NULL, "
            "events text NOT NULL DEFAULT '', PRIMARY KEY (flow, run_id))"
        ).format(t)
        index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (started_at)").format(
            sql.Identifier(f"{table}_started"), t
        )
        self.ddl = [create.as_string(), index.as_string()]
        self.lock_id = DDL_LOCK
        f = {"t": t}
        self.begin_sql = (
            sql.SQL(
                "INSERT INTO {t} AS r (" + _SQL_COLUMNS + ", events) VALUES (%(flow)s, "
                "%(run_id)s, %(running)s, %(now)s, NULL, %(now)s, %(lease)s, %(holder)s, "
                "%(nodes)s, '') ON CONFLICT (flow, run_id) DO UPDATE SET status = %(running)s, "
                "ended_at = NULL, updated_at = %(now)s, lease_expires_at = %(lease)s, "
                "holder = %(holder)s, nodes = %(nodes)s WHERE r.status <> %(cancelled)s "
                "RETURNING (xmax = 0) AS inserted"
            )
            .format(**f)
            .as_string()
        )
        self.status_sql = (
            sql.SQL("SELECT status FROM {t} WHERE flow = %(flow)s AND run_id = %(run_id)s")
            .format(**f)
            .as_string()
        )
        self.append_sql = (
            sql.SQL(
                "UPDATE {t} SET events = events || %(lines)s, updated_at = %(now)s, "
                "lease_expires_at = %(lease)s, ended_at = CASE WHEN %(status)s::text IS NULL "
                "OR status = %(cancelled)s THEN ended_at ELSE %(now)s END, "
                "status = CASE WHEN %(status)s::text IS NULL OR status = %(cancelled)s "
                "THEN status ELSE %(status)s END "
                "WHERE flow = %(flow)s AND run_id = %(run_id)s RETURNING status"
            )
            .format(**f)
            .as_string()
        )
        self.set_sql = (
            sql.SQL(
                "UPDATE {t} SET status = %(status)s WHERE flow = %(flow)s AND run_id = %(run_id)s"
            )
            .format(**f)
            .as_string()
        )
        self.delete_sql = (
            sql.SQL("DELETE FROM {t} WHERE flow = %(flow)s AND run_id = %(run_id)s")
            .format(**f)
            .as_string()
        )
        self.select = sql.SQL("SELECT " + _SQL_COLUMNS + ", {} FROM {}")
        self.t = t
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
        self.stats_sql = (
            sql.SQL("SELECT namespace, state, COUNT(*) FROM {} GROUP BY namespace, state")
            .format(records)
            .as_string()
        )
        self.find_sql = (
            sql.SQL(
                "SELECT {} FROM {} WHERE key_digest LIKE %s ORDER BY namespace, scope, key_digest"
            )
            .format(cols, records)
            .as_string()
        )
        store._run(self._create, bounded=False)

    def _create(self, conn: Any) -> None:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.tname,)).fetchone()
        if row and row[0]:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_id,))
            for statement in self.ddl:
                conn.execute(statement)

    def _do(self, statement: str, params: Any, fetch: str = "") -> Any:
        def op(conn: Any) -> Any:
            cur = conn.execute(statement, params)
            if fetch == "one":
                return cur.fetchone()
            if fetch == "all":
                return cur.fetchall()
            return cur.rowcount

        return self.store._run(op, bounded=False)

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        params = {
            "flow": flow,
            "run_id": run_id,
            "now": now,
            "lease": lease,
            "holder": holder,
            "nodes": nodes,
            "running": RUNNING,
            "cancelled": CANCELLED,
        }

        def op(conn: Any) -> str | None:
            with conn.transaction():
                before = conn.execute(self.status_sql, params).fetchone()
                conn.execute(self.begin_sql, params).fetchone()
            return None if before is None else str(before[0])

        result: str | None = self.store._run(op, bounded=False)
        return result

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        params = {
            "flow": flow,
            "run_id": run_id,
            "lines": lines,
            "now": now,
            "lease": lease,
            "status": status,
            "cancelled": CANCELLED,
        }
        row = self._do(self.append_sql, params, "one")
        return None if row is None else str(row[0])

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        from psycopg import sql

        where, params = _where(flow, run_id, since, "%s")
        statement = (
            self.select.format(sql.SQL("events" if events else "NULL"), self.t).as_string()
            + where
            + " ORDER BY started_at"
        )
        rows = self._do(statement, params, "all")
        return [_info(row, events) for row in rows]

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        params = {"flow": flow, "run_id": run_id, "status": status}
        return bool(self._do(self.set_sql, params) == 1)

    def delete(self, flow: str, run_id: str) -> bool:
        return bool(self._do(self.delete_sql, {"flow": flow, "run_id": run_id}) == 1)

    def stats(self) -> dict[tuple[str, str], int]:
        rows = self._do(self.stats_sql, (), "all")
        return {(str(ns), str(state)): int(count) for ns, state, count in rows}

    def find(self, prefix: str) -> list[Record]:
        from ..idempotency._base import checked_record

        rows = self._do(self.find_sql, (prefix + "%",), "all")
        return [checked_record(row, self.store._label) for row in rows]


# ---------------------------------------------------------------------- Redis

_BEGIN_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == ARGV[8] then return s end
if not s then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[3], KEYS[1])
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'flow', ARGV[1], 'run_id', ARGV[2], 'status', ARGV[7],
  'updated_at', ARGV[3], 'lease_expires_at', ARGV[4], 'holder', ARGV[5], 'nodes', ARGV[6])
redis.call('HDEL', KEYS[1], 'ended_at')
return s or ''
"""

_APPEND_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return '' end
if ARGV[1] ~= '' then redis.call('APPEND', KEYS[2], ARGV[1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2], 'lease_expires_at', ARGV[3])
if ARGV[4] ~= '' and s ~= ARGV[5] then
  redis.call('HSET', KEYS[1], 'status', ARGV[4], 'ended_at', ARGV[2])
  s = ARGV[4]
end
return s
"""


def _glob(text: str) -> str:
    """`text` escaped for a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class _Redis(_Backend):
    def __init__(self, store: Any) -> None:
        self.store = store
        prefix = store.prefix
        self.index = f"{prefix}~runs~"
        self.begin_script: Any = None
        self.append_script: Any = None

    @contextmanager
    def _client(self) -> Iterator[Any]:
        scripts = self.store._enter(False)
        try:
            yield scripts.client
        finally:
            scripts.slots.release()

    def _keys(self, flow: str, run_id: str) -> list[str]:
        tail = f"{len(flow)}:{flow}:{run_id}"
        prefix = self.store.prefix
        return [f"{prefix}~run~:{tail}", f"{prefix}~run-events~:{tail}", self.index]

    def _script(self, client: Any, which: str) -> Any:
        if which == "begin":
            if self.begin_script is None:
                self.begin_script = client.register_script(_BEGIN_LUA)
            return self.begin_script
        if self.append_script is None:
            self.append_script = client.register_script(_APPEND_LUA)
        return self.append_script

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        from ..idempotency._redis_clients import text

        with self._client() as client:
            reply = self._script(client, "begin")(
                keys=self._keys(flow, run_id),
                args=[flow, run_id, repr(now), repr(lease), holder, nodes, RUNNING, CANCELLED],
                client=client,
            )
        previous = text(reply)
        return previous or None

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        from ..idempotency._redis_clients import text

        with self._client() as client:
            reply = self._script(client, "append")(
                keys=self._keys(flow, run_id)[:2],
                args=[lines, repr(now), repr(lease), status or "", CANCELLED],
                client=client,
            )
        return text(reply) or None

    def _read(self, client: Any, row_keys: list[str], events: bool) -> list[RunInfo]:
        from ..idempotency._redis_clients import text

        with client.pipeline(transaction=False) as pipe:
            for key in row_keys:
                pipe.hgetall(key)
            rows = pipe.execute()
        out = []
        gone = []
        for key, raw in zip(row_keys, rows, strict=True):
            if not raw:
                gone.append(key)
                continue
            row = {text(k): text(v) for k, v in raw.items()}
            info = RunInfo(
                row.get("flow", ""),
                row.get("run_id", ""),
                row.get("status", ""),
                float(row.get("started_at", 0.0)),
                _float(row.get("ended_at")),
                float(row.get("updated_at", 0.0)),
                float(row.get("lease_expires_at", 0.0)),
                row.get("holder"),
                _nodes(row.get("nodes")),
            )
            if events:
                raw_events = client.get(self._keys(info.flow, info.run_id)[1])
                info.events = _events(None if raw_events is None else text(raw_events))
            out.append(info)
        if gone:
            client.zrem(self.index, *gone)
        return out

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        from ..idempotency._redis_clients import text

        with self._client() as client:
            if flow is not None and run_id is not None:
                keys = [self._keys(flow, run_id)[0]]
            else:
                low = "-inf" if since is None else repr(since)
                keys = [text(k) for k in client.zrangebyscore(self.index, low, "+inf")]
            infos = self._read(client, keys, events)
        return [
            info
            for info in infos
            if (flow is None or info.flow == flow) and (run_id is None or info.run_id == run_id)
        ]

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        key = self._keys(flow, run_id)[0]
        with self._client() as client:
            if not client.exists(key):
                return False
            client.hset(key, "status", status)
            return True

    def delete(self, flow: str, run_id: str) -> bool:
        row, events, index = self._keys(flow, run_id)
        with self._client() as client:
            gone = int(client.delete(row, events))
            client.zrem(index, row)
        return gone > 0

    def _records(self, client: Any) -> Iterator[tuple[str, dict[str, str]]]:
        """Every record hash under the store's prefix (not the run log's keys, nor meta)."""
        from ..idempotency._redis_clients import text

        prefix = self.store.prefix
        skip = (f"{prefix}~run", f"{prefix}meta")
        keys = [
            k
            for k in (text(raw) for raw in client.scan_iter(match=_glob(prefix) + "*", count=1000))
            if not k.startswith(skip)
        ]
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            with client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hgetall(key)
                replies = pipe.execute(raise_on_error=False)
            for key, raw in zip(chunk, replies, strict=True):
                if isinstance(raw, dict) and raw:
                    fields = {text(k): text(v) for k, v in raw.items()}
                    if "key_digest" in fields:
                        yield key, fields

    def stats(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        with self._client() as client:
            for _, fields in self._records(client):
                slot = (fields.get("namespace", "?"), fields.get("state", "?"))
                counts[slot] = counts.get(slot, 0) + 1
        return counts

    def find(self, prefix: str) -> list[Record]:
        from ..idempotency._base import record_from_fields

        out = []
        with self._client() as client:
            for _, fields in self._records(client):
                if fields["key_digest"].startswith(prefix):
                    out.append(record_from_fields(fields, self.store._name))
        return sorted(out, key=lambda r: (r.namespace, r.scope, r.key_digest))


# ---------------------------------------------------------------------- which backend

# one backend per store object (its table made once); a store that cannot be weakly
# referenced gets a new one each time
_BACKENDS: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _make(store: Any) -> _Backend | None:
    from ..idempotency.memory import MemoryStore
    from ..idempotency.sqlite import SQLiteStore

    if isinstance(store, MemoryStore):
        return _Memory()
    if isinstance(store, SQLiteStore):
        return _SQLite(store)
    module = type(store).__module__
    if module == "nodekit.idempotency.redis" or _is(store, "redis", "RedisStore"):
        return _Redis(store)
    if module == "nodekit.idempotency.postgres" or _is(store, "postgres", "PostgresStore"):
        return _Postgres(store)
    return None


def _is(store: Any, module: str, name: str) -> bool:
    """Whether `store` is an instance of that store class, if its module is loaded."""
    import sys

    loaded = sys.modules.get(f"nodekit.idempotency.{module}")
    return loaded is not None and isinstance(store, getattr(loaded, name))


def backend_for(store: Any) -> _Backend | None:
    """The run log of `store` (None for a store that keeps none: not one of nodekit's)."""
    try:
        found = _BACKENDS.get(store)
    except TypeError:
        return _make(store)
    if found is None:
        with _BACKENDS_LOCK:
            found = _BACKENDS.get(store)
            if found is None:
                found = _make(store)
                if found is not None:
                    _BACKENDS[store] = found
    return found


# ---------------------------------------------------------------------------- one run

_ACTIVE: dict[str, list[RunLog]] = {}
_ACTIVE_LOCK = threading.Lock()


def _sink(event: Event) -> None:
    """The process-wide sink of every active run log: its run's events, by run id."""
    run_id = event.run_id
    if run_id is None:
        return
    logs = _ACTIVE.get(run_id)
    if logs:
        for log in logs:
            log.seen(event)


def _register(log: RunLog) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.setdefault(log.run_id, []).append(log)
        # checked on every registration: `RUNTIME.reset()` (a test's fresh state) drops sinks
        if not any(sink is _sink for sink in RUNTIME.sinks):
            add_sink(_sink)


def _unregister(log: RunLog) -> None:
    with _ACTIVE_LOCK:
        logs = _ACTIVE.get(log.run_id, [])
        for index, item in enumerate(logs):
            if item is log:
                del logs[index]
                break
        if not logs:
            _ACTIVE.pop(log.run_id, None)
        if not _ACTIVE:
            remove_sink(_sink)


class RunLog:
    """One durable run's log: its events buffered, written at node completions (at most
    once every `FLUSH_EVERY` seconds) and at the run's end."""

    __slots__ = (
        "backend",
        "begun",
        "buffer",
        "cancelled",
        "flow",
        "last",
        "lease",
        "nodes",
        "outcome",
        "registered",
        "run_id",
    )

    def __init__(
        self,
        backend: _Backend,
        flow: str,
        run_id: str,
        nodes: Sequence[tuple[str, str]],
        lease: float,
    ) -> None:
        self.backend = backend
        self.flow = flow
        self.run_id = run_id
        self.nodes = json.dumps([list(node) for node in nodes], separators=(",", ":"))
        self.lease = lease
        self.buffer: list[Event] = []
        self.outcome: str | None = None
        self.begun = False
        self.cancelled = False
        self.last = 0.0
        self.registered = True
        _register(self)

    def seen(self, event: Event) -> None:
        # no lock: list appends are atomic, and `_lines` takes and deletes a counted prefix
        self.buffer.append(event)
        outcome = _OUTCOMES.get(event.name)
        if outcome is not None:
            fields = event.fields
            if (
                outcome == FAILED
                and fields.get("compensated")
                and not fields.get("not_compensated")
            ):
                outcome = COMPENSATED  # every completed node's compensation ran
            self.outcome = outcome

    def _lines(self) -> str:
        """The buffered events as one JSON line (an array: one encoder call per write)."""
        buffer = self.buffer
        count = len(buffer)
        if not count:
            return ""
        events = buffer[:count]
        del buffer[:count]  # events appended meanwhile stay for the next write
        return (
            json.dumps(
                [{"t": event.time, "name": event.name, **event.as_dict()} for event in events],
                default=str,
                separators=(",", ":"),
            )
            + "\n"
        )

    def refusal(self, *, running: bool = False) -> Problem:
        """Why a cancelled run stops: refused at its start (a resume), or before a node."""
        if running:
            return Problem(
                f"run {self.run_id!r} was cancelled (nodekit runs cancel) while it ran; it "
                "stopped before this node"
            )
        return Problem(
            f"run {self.run_id!r} was cancelled (nodekit runs cancel), so it is not resumed: "
            "start a new run_id, or `nodekit runs forget` it first"
        )

    # the writes, synchronous (an async run calls them in a worker thread)

    def open(self) -> bool:
        """Mark the run running; False if it was cancelled (the run must not go on)."""
        now = time.time()
        try:
            previous = self.backend.begin(
                self.flow, self.run_id, now, now + self.lease, holder_text(), self.nodes
            )
        except Exception:
            _log.debug("nodekit: run log of run %s not written", self.run_id, exc_info=True)
            return True
        # `last` stays 0: the first node's completion writes, so that even a run that
        # crashes within its first second shows how far it got
        if previous == CANCELLED:
            return False
        self.begun = True
        return True

    def flush(self, status: str | None = None) -> None:
        lines = self._lines()
        now = time.time()
        self.last = time.monotonic()
        try:
            after = self.backend.append(
                self.flow, self.run_id, lines, now, now + self.lease, status
            )
        except Exception:
            _log.debug("nodekit: run log of run %s not written", self.run_id, exc_info=True)
            return
        if after == CANCELLED:
            self.cancelled = True

    def due(self) -> bool:
        """Whether a node's completion should write the buffered events now."""
        return self.begun and time.monotonic() - self.last >= FLUSH_EVERY

    def close(self) -> None:
        """The run ended: write its status and its last events; stop listening."""
        try:
            if self.begun:
                self.flush(self.outcome or FAILED)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.registered:
            self.registered = False
            _unregister(self)

    # async twins

    async def aopen(self) -> bool:
        if self.backend.asynchronous_inline:
            return self.open()
        return await asyncio.to_thread(self.open)

    async def aflush(self) -> None:
        if self.backend.asynchronous_inline:
            self.flush()
        else:
            await asyncio.to_thread(self.flush)

    async def aclose(self) -> None:
        try:
            if self.begun:
                status = self.outcome or FAILED
                if self.backend.asynchronous_inline:
                    self.flush(status)
                else:
                    await asyncio.to_thread(self.flush, status)
        finally:
            self.stop()


def start(
    store: Any, flow: str, run_id: str, nodes: Sequence[tuple[str, str]], lease: float
) -> RunLog | None:
    """The run log of a durable run in `store` (None: the store keeps none)."""
    try:
        backend = backend_for(store)
    except Exception:
        _log.debug("nodekit: no run log for run %s", run_id, exc_info=True)
        return None
    if backend is None:
        return None
    return RunLog(backend, flow, run_id, nodes, lease)
