"""Events to lanes: `build_story` (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._text import format_duration

__all__ = ["build_story"]

# the fields every event has; what is left is the event's own detail
_COMMON = frozenset(
    {"t", "name", "node", "run_id", "attempt", "duration", "wait", "error", "level", "flow"}
)
# events that only say the machinery works: kept in the event list, never a mark
_QUIET = frozenset(
    {
        "idempotency.acquired",
        "idempotency.completed",
        "idempotency.heartbeat",
        "idempotency.replayed",  # node.replayed tells the same
        "flow.node_started",
        "flow.node_finished",
        "flow.started",
        "flow.finished",
        "http.response",
        "files.put",
        "files.write",
    }
)
_FAULT_MARKS = frozenset(
    {
        "circuit.opened",
        "circuit.rejected",
        "rate_limit.rejected",
        "bulkhead.rejected",
        "idempotency.mismatch",
        "idempotency.lease_lost",
        "idempotency.outcome_unknown",
        "idempotency.store_error",
        "node.retry_unsafe",
    }
)
# the events of a node's call (its attempts): a step with any is timed by them
_CALL_EVENTS = frozenset(
    {"node.started", "node.retrying", "node.timed_out", "node.succeeded", "node.failed"}
)

_ENDED = ("succeeded", "failed", "compensated", "cancelled", "crashed")


class _Call:
    """One logical call of a node: its attempts and the waits between them."""

    __slots__ = ("attempt", "attempts", "open", "segments", "wait_for", "wait_from")

    def __init__(self, attempt: int, start: float) -> None:
        self.attempt = attempt  # the attempt now running
        self.attempts = 0
        self.open: dict[str, Any] | None = _segment("attempt", start, None, attempt=attempt)
        self.segments: list[dict[str, Any]] = []
        self.wait_from: float | None = None  # a retry's wait runs from here ...
        self.wait_for = 0.0  # ... for this long (asked for; instant mode sleeps less)

    def begin(self, at: float) -> dict[str, Any]:
        """The running attempt; after a wait, it starts when the wait ended (at the latest `at`)."""
        if self.open is None:
            start = at
            if self.wait_from is not None:
                start = min(self.wait_from + self.wait_for, at)
                self.segments.append(
                    _segment(
                        "wait",
                        self.wait_from,
                        start,
                        wait=self.wait_for,
                        before_attempt=self.attempt,
                    )
                )
                self.wait_from = None
            self.open = _segment("attempt", start, None, attempt=self.attempt)
        return self.open

    def end(self, at: float, outcome: str, event: Mapping[str, Any]) -> dict[str, Any]:
        segment = self.begin(at)
        segment["end"] = at
        segment["outcome"] = outcome
        if event.get("error") is not None:
            segment["error"] = str(event["error"])
        if event.get("kind") is not None:
            segment["kind"] = str(event["kind"])
        self.segments.append(segment)
        self.attempts += 1
        self.open = None
        return segment


def _segment(kind: str, start: float, end: float | None, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "start": start, "end": end, **fields}


class _Lane:
    __slots__ = ("calls", "done", "marks", "name", "outcomes", "seen", "segments", "step")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[_Call] = []  # the open ones
        self.done: list[_Call] = []
        self.segments: list[dict[str, Any]] = []  # replays, compensations, skips
        self.marks: list[dict[str, Any]] = []
        self.outcomes: list[str] = []  # each finished call's outcome, in order
        # the flow's last node_started (None once finished), and whether a node event of
        # that step came (a successful step in a durable run has none: its log keeps no
        # node.started/succeeded, the flow's own events time it)
        self.step: float | None = None
        self.seen = False

    def call_for(self, attempt: int, at: float, event: Mapping[str, Any]) -> _Call:
        """The open call whose running attempt is `attempt` (else any open one, else a call
        whose start the events never told: it started `duration` before `at`)."""
        for call in self.calls:
            if call.attempt == attempt:
                return call
        if self.calls:
            return self.calls[0]
        duration = event.get("duration")
        start = at - float(duration) if isinstance(duration, int | float) else at
        if self.step is not None and attempt <= 1:
            start = max(min(start, at), self.step)
        call = _Call(max(attempt, 1), start)
        self.calls.append(call)
        return call

    def close(self, call: _Call, outcome: str) -> None:
        self.calls.remove(call)
        self.done.append(call)
        self.outcomes.append(outcome)


def build_story(run: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The story of one run, as plain data: its lanes of segments and its summary.

    `run` is ``{"run_id", "flow", "status", "started_at", "ended_at"}``; `events` are the run's
    stored events in any order (sorted here by time, stable). The result is
    ``{"run": {...}, "start", "end", "lanes": [...], "marks": [...], "summary": {...},
    "events": [...]}``; times are epoch seconds, durations seconds.
    """
    ordered = sorted(events, key=lambda event: float(event.get("t") or 0.0))
    lanes: dict[str, _Lane] = {}
    run_marks: list[dict[str, Any]] = []
    status = str(run.get("status") or "running")

    def lane(name: str) -> _Lane:
        found = lanes.get(name)
        if found is None:
            found = lanes[name] = _Lane(name)
        return found

    for event in ordered:
        name, at = str(event.get("name", "")), float(event.get("t") or 0.0)
        node = event.get("node")
        attempt = int(event.get("attempt") or 0)
        if node is None:
            if name not in _QUIET:
                run_marks.append(_mark(event, at))
            if name == "flow.failed":
                _fallback_raised(lanes, event)
            continue
        here = lane(str(node))
        if name in _CALL_EVENTS:
            here.seen = True
        if name == "node.started":
            here.calls.append(_Call(max(attempt, 1), at))
        elif name == "node.retrying":
            call = here.call_for(attempt, at, event)
            call.end(at, "retried", event)
            call.wait_from, call.wait_for = at, float(event.get("wait") or 0.0)
            call.attempt = attempt + 1
        elif name == "node.timed_out":
            here.call_for(attempt, at, event).begin(at)["timed_out"] = True
        elif name in ("node.succeeded", "node.failed"):
            outcome = name.removeprefix("node.")
            call = here.call_for(attempt, at, event)
            call.end(at, outcome, event)
            here.close(call, outcome)
        elif name == "node.replayed":
            source = event.get("source") or ("key" if event.get("key") else "journal")
            replay = _segment("replay", at, at, source=str(source))
            if event.get("key"):
                replay["key"] = str(event["key"])
            if event.get("error"):
                replay["outcome"] = "error"  # a keyed replay of a recorded failure
            here.segments.append(replay)
        elif name in ("node.compensated", "node.compensation_failed"):
            duration = event.get("duration")
            start = at - float(duration) if isinstance(duration, int | float) else at
            outcome = "compensated" if name == "node.compensated" else "failed"
            if event.get("replayed"):  # a resume met it in the journal: done before, not again
                outcome = "replayed"
            segment = _segment("compensation", start, at, outcome=outcome)
            if event.get("error") is not None:
                segment["error"] = str(event["error"])
            here.segments.append(segment)
        elif name == "flow.node_started":
            here.step, here.seen = at, False
        elif name == "flow.node_finished":
            if here.calls:  # its last attempt succeeded (a retried step of a durable run)
                call = here.calls[0]
                call.end(at, "succeeded", {})
                here.close(call, "succeeded")
            elif not here.seen and here.step is not None:  # one attempt, no node events
                call = _Call(1, here.step)
                here.calls.append(call)
                call.end(at, "succeeded", {})
                here.close(call, "succeeded")
            here.step = None
        elif name == "flow.node_skipped":
            if event.get("reason") != "replayed":  # a journal replay says node.replayed too
                here.segments.append(
                    _segment("skipped", at, at, reason=str(event.get("reason") or ""))
                )
        elif name == "flow.failed":
            run_marks.append(_mark(event, at))
            _fallback_raised(lanes, event)
        elif name not in _QUIET:
            if name == "node.fallback" and here.outcomes:
                here.outcomes[-1] = "fallback"
            here.marks.append(_mark(event, at))
    last = max([float(event.get("t") or 0.0) for event in ordered], default=None)
    start = _number(run.get("started_at"), ordered[0].get("t") if ordered else 0.0)
    ended = run.get("ended_at")
    end = float(ended) if isinstance(ended, int | float) else max(last or start, start)
    return _assemble(run, status, start, end, lanes, run_marks, ordered)


def _fallback_raised(lanes: Mapping[str, _Lane], event: Mapping[str, Any]) -> None:
    """The run failed at a step whose last call fell back: its fallback raised, so the step
    failed all the same (not "fallback")."""
    failed = lanes.get(str(event.get("failed")))
    if failed is not None and failed.outcomes and failed.outcomes[-1] == "fallback":
        failed.outcomes[-1] = "failed"


def _number(value: Any, default: Any) -> float:
    return float(value) if isinstance(value, int | float) else float(default or 0.0)


def _mark(event: Mapping[str, Any], at: float) -> dict[str, Any]:
    name = str(event.get("name", ""))
    kind = "note"
    if name in _FAULT_MARKS or name == "flow.failed":
        kind = "fault"
    elif name.startswith(("circuit.", "rate_limit.", "bulkhead.", "idempotency.")):
        kind = "guard"
    elif name == "node.fallback":
        kind = "fallback"
    elif name == "flow.compensating":
        kind = "compensation"
    mark: dict[str, Any] = {"t": at, "name": name, "kind": kind, "detail": _detail(event)}
    if event.get("error") is not None:
        mark["error"] = str(event["error"])
    return mark


def _detail(event: Mapping[str, Any]) -> str:
    """The event's own fields as ``key=value`` text (what the common columns do not show)."""
    parts = []
    for key, value in event.items():
        if key in _COMMON or value is None or value == () or value == []:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)
        parts.append(f"{key}={value}")
    if event.get("wait") is not None:
        parts.append(f"wait={format_duration(float(event['wait']))}")
    if event.get("duration") is not None:
        parts.append(f"duration={format_duration(float(event['duration']))}")
    return " ".join(parts)


def _assemble(
    run: Mapping[str, Any],
    status: str,
    start: float,
    end: float,
    lanes: Mapping[str, _Lane],
    run_marks: list[dict[str, Any]],
    ordered: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    ended = status in _ENDED
    out_lanes = []
    totals = {"attempts": 0, "retries": 0, "replays": 0, "faults": 0, "compensations": 0}
    waited = 0.0
    for item in lanes.values():
        for call in list(item.calls):  # still open when the events end
            call.begin(end)
            if call.open is not None:
                call.open["outcome"] = "interrupted" if ended else "running"
                call.open["end"] = end
                call.segments.append(call.open)
                call.attempts += 1
            item.close(call, "interrupted" if ended else "running")
        if item.step is not None and not item.seen:  # a step still running, never timed
            call = _Call(1, item.step)
            item.calls.append(call)
            call.end(end, "interrupted" if ended else "running", {})
            item.close(call, "interrupted" if ended else "running")
        groups = [call.segments for call in item.done] + [[s] for s in item.segments]
        segments = _pack(groups)
        if not segments and not item.marks:
            continue
        attempts = [s for s in segments if s["type"] == "attempt"]
        faults = [s for s in attempts if s.get("outcome") in ("retried", "failed")]
        waits = [s for s in segments if s["type"] == "wait"]
        replays = [s for s in segments if s["type"] == "replay"]
        compensations = [
            s for s in segments if s["type"] == "compensation" and s.get("outcome") != "replayed"
        ]
        errors = [s["error"] for s in segments if s.get("error")]
        times = [s["start"] for s in segments] + [m["t"] for m in item.marks]
        ends = [s["end"] for s in segments] + [m["t"] for m in item.marks]
        lane_status = _lane_status(item, segments)
        totals["attempts"] += len(attempts)
        totals["retries"] += len(waits)
        totals["replays"] += len(replays)
        totals["faults"] += len(faults)
        totals["compensations"] += len(compensations)
        waited += sum(float(s.get("wait") or 0.0) for s in waits)
        out_lanes.append(
            {
                "node": item.name,
                "status": lane_status,
                "start": min(times),
                "end": max(ends),
                "calls": len(item.done),
                "attempts": len(attempts),
                "retries": len(waits),
                "faults": len(faults),
                "replays": len(replays),
                "compensations": len(compensations),
                "busy": sum(s["end"] - s["start"] for s in attempts),
                "error": errors[-1] if errors else None,
                "rows": 1 + max((s["row"] for s in segments), default=0),
                "segments": segments,
                "marks": item.marks,
            }
        )
    out_lanes.sort(key=lambda lane: lane["start"])
    first = min([start] + [lane["start"] for lane in out_lanes])
    last = max([end] + [lane["end"] for lane in out_lanes] + [m["t"] for m in run_marks])
    counts: dict[str, int] = {}
    for lane in out_lanes:
        counts[lane["status"]] = counts.get(lane["status"], 0) + 1
    summary = {
        "status": status,
        "duration": end - start,
        "nodes": len(out_lanes),
        "by_status": counts,
        **totals,
        "waited": waited,
        "events": len(ordered),
        # events the run log did not keep (past its cap: `runlog.dropped` counts them)
        "dropped": sum(
            int(event.get("dropped") or 0)
            for event in ordered
            if event.get("name") == "runlog.dropped"
        ),
    }
    return {
        "run": {
            "run_id": str(run.get("run_id") or ""),
            "flow": str(run.get("flow") or ""),
            "status": status,
            "started_at": start,
            "ended_at": run.get("ended_at"),
        },
        "start": first,
        "end": last,
        "lanes": out_lanes,
        "marks": run_marks,
        "summary": summary,
        "events": [_event_row(event) for event in ordered],
    }


def _pack(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Give each group (a call's attempts and waits, a replay, ...) the first row where it
    overlaps no other: concurrent calls of one node sit on rows of their own."""
    rows: list[float] = []  # each row's end
    out: list[dict[str, Any]] = []
    for group in sorted((g for g in groups if g), key=lambda g: g[0]["start"]):
        begin = min(s["start"] for s in group)
        finish = max(s["end"] for s in group)
        for index, row_end in enumerate(rows):
            if begin >= row_end:
                rows[index] = finish
                break
        else:
            index = len(rows)
            rows.append(finish)
        for segment in group:
            segment["row"] = index
            out.append(segment)
    out.sort(key=lambda s: (s["start"], s["end"]))
    return out


def _lane_status(lane: _Lane, segments: Sequence[Mapping[str, Any]]) -> str:
    kinds = {s["type"] for s in segments}
    if "compensation" in kinds:
        failed = any(s.get("outcome") == "failed" for s in segments if s["type"] == "compensation")
        return "compensation failed" if failed else "compensated"
    if lane.outcomes:
        return lane.outcomes[-1]
    if "replay" in kinds:
        return "replayed"
    if "skipped" in kinds:
        return "skipped"
    return "succeeded" if "attempt" in kinds else "noted"


def _event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "t": float(event.get("t") or 0.0),
        "name": str(event.get("name", "")),
        "node": None if event.get("node") is None else str(event["node"]),
        "attempt": int(event.get("attempt") or 0),
        "error": None if event.get("error") is None else str(event["error"]),
        "detail": _detail(event),
    }
