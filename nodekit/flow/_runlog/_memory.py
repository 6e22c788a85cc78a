"""The run log of a MemoryStore: a dict beside the store, for one process."""

from __future__ import annotations

import threading
from typing import Any

from ._model import CANCELLED, RUNNING, RunInfo, _Backend, _events, _nodes, _routes


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
                    _routes(row["nodes"]),
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
