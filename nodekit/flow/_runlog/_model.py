"""The run log's model: statuses, `RunInfo`, the journal keys of a run, the backend API."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..._canonical import canonical_json, digest
from ...idempotency._holder import DEAD, state_of
from ...idempotency._store import IN_PROGRESS, Record, RecordKey

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
COMPENSATED = "compensated"
CANCELLED = "cancelled"
CRASHED = "crashed"  # derived, never stored
STATUSES = (RUNNING, SUCCEEDED, FAILED, COMPENSATED, CANCELLED, CRASHED)


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
    routes: list[list[str]] = field(default_factory=list)  # the route names after each node

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
    """The run's nodes: ``[name, namespace]`` or ``[name, namespace, [route, ...]]`` each."""
    try:
        items = json.loads(text or "[]")
        return [(str(item[0]), str(item[1])) for item in items]
    except (ValueError, TypeError, IndexError, KeyError):
        return []


def _routes(text: str | None) -> list[list[str]]:
    """The names of the routes after each node (their decisions are journaled)."""
    try:
        items = json.loads(text or "[]")
        return [[str(r) for r in item[2]] if len(item) > 2 else [] for item in items]
    except (ValueError, TypeError, IndexError, KeyError):
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


# the most calls of one node (a loop) or of one subflow `forget_keys` looks for
_MAX_CALLS = 100_000


def forget_keys(info: RunInfo, store: Any) -> list[RecordKey]:
    """Every journal record the run may have made, as its keys are derived: the header,
    each node's entry of every call (a loop runs a node again: call k exists only once call
    k-1 completed, so they are looked up in order until one is missing), the routing
    decisions after each call, the compensation plan and each node's undo records. Records
    that do not exist are left out. A subflow's runs are runs of their own (`forget`)."""
    run_id = info.run_id
    keys = [
        key
        for key in (
            RecordKey(f"flow:{info.flow}", "", digest(canonical_json([run_id]))),
            RecordKey(f"flow:{info.flow}:compensation", "", digest(canonical_json([run_id]))),
        )
        if store.get(key) is not None
    ]
    routes = info.routes or [[] for _ in info.nodes]
    for (name, namespace), names in zip(info.nodes, routes, strict=False):
        for call in range(_MAX_CALLS):
            entry = RecordKey(namespace, "", digest(canonical_json([run_id, name, call])))
            undo_parts: list[Any] = [run_id, name, "compensate"] + ([call] if call else [])
            undo = RecordKey(f"{namespace}:compensate", "", digest(canonical_json(undo_parts)))
            decisions = [
                RecordKey(
                    f"{namespace}:route:{route}",
                    "",
                    digest(canonical_json([run_id, name, route, call])),
                )
                for route in names
            ]
            found = [key for key in (entry, undo, *decisions) if store.get(key) is not None]
            if not found:
                break
            keys.extend(found)
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
    _ref: Callable[[], Any] | None = None  # its store, weakly: the backend is kept on it

    @property
    def store(self) -> Any:
        store = None if self._ref is None else self._ref()
        if store is None:
            raise RuntimeError("nodekit: the run log's store was closed and collected")
        return store

    def _keep(self, store: Any) -> None:
        try:
            self._ref = weakref.ref(store)
        except TypeError:  # a store that cannot be weakly referenced: held
            self._ref = lambda: store

    native_async = False  # it has `abegin`/`aappend` (an async run awaits them on its loop)

    async def abegin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        raise NotImplementedError

    async def aappend(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        raise NotImplementedError

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
        _routes(row[8]),
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
