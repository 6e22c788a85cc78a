"""The run log: what `nodekit runs` lists and shows of durable runs.

The journal (`_journal.py`) holds digests only, so runs cannot be listed from it, and it keeps
no trace of attempts, waits or faults. A durable run therefore also keeps a *run log* in the
same store: one row per run with its run id and flow name (in clear: identifiers the user
chose, never keys or payloads), its status, start and end times, the holder (this process,
as `_holder.py` records it), the journal namespaces of its nodes (so that `runs forget` can
delete its journal), and its events.

The events are the run's own: a durable run sets `_events.RUN_SINK` in its own context, so
only its node calls, tasks and worker threads reach the log, and a plain node's success path
asks nothing more (successful steps show through the run's ``flow.node_started`` and
``flow.node_finished``; failures, retries and guards emit directly). Kept are the ``flow.*``
events of the run and the ``node.*``/guard/idempotency events of its own steps (not those of
nodes a step calls), at most `MAX_EVENTS` per run (a ``runlog.dropped`` event counts the
rest). They are stored as JSON lines of ``{**as_dict(), "t": time, "name": name}``:
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
from collections.abc import Sequence
from typing import Any

from ..._events import Event
from ...idempotency._holder import holder_text
from .._schema import Problem
from ._model import (
    CANCELLED,
    COMPENSATED,
    CRASHED,
    FAILED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    RunInfo,
    _Backend,
    derived_status,
    forget_keys,
    journal_keys,
)

__all__ = [
    "CANCELLED",
    "COMPENSATED",
    "CRASHED",
    "DROPPED",
    "FAILED",
    "FLUSH_EVERY",
    "MAX_EVENTS",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "RunInfo",
    "RunLog",
    "backend_for",
    "derived_status",
    "forget_keys",
    "journal_keys",
]

# the least time between two writes of a run's events at node completions (seconds)
FLUSH_EVERY = 1.0

# the most events one run log keeps (per start or resume of the run); the rest are counted
MAX_EVENTS = 10_000

# the event that records how many were not kept (its ``dropped`` field)
DROPPED = "runlog.dropped"

_log = logging.getLogger("nodekit")

# terminal events of a run, and the status each means (a ``flow.failed`` whose
# compensations all ran, ``compensated``)
_OUTCOMES = {"flow.finished": SUCCEEDED, "flow.failed": FAILED}

# the events of the run's own steps that its log keeps (by name prefix); ``flow.*`` events
# are kept when they are the run's
_STEP_EVENTS = ("node.", "idempotency.", "circuit.", "rate_limit.", "bulkhead.")

# ---------------------------------------------------------------------- which backend

# one backend per store object (its table made once), kept on the store itself (the
# backend refers to its store weakly), so that it goes with the store; a store that takes
# no attribute (`__slots__`) is remembered by weak reference, and one that cannot be
# weakly referenced either gets a new backend each time
_ATTR = "_nodekit_runlog"
_BACKENDS: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _make(store: Any) -> _Backend | None:
    from ...idempotency.memory import MemoryStore
    from ...idempotency.sqlite import SQLiteStore

    if isinstance(store, MemoryStore):
        from ._memory import _Memory

        return _Memory()
    if isinstance(store, SQLiteStore):
        from ._sqlite import _SQLite

        return _SQLite(store)
    module = type(store).__module__
    if module == "nodekit.idempotency.redis" or _is(store, "redis", "RedisStore"):
        from ._redis import _Redis

        return _Redis(store)
    if module == "nodekit.idempotency.postgres" or _is(store, "postgres", "PostgresStore"):
        from ._postgres import _Postgres

        return _Postgres(store)
    return None


def _is(store: Any, module: str, name: str) -> bool:
    """Whether `store` is an instance of that store class, if its module is loaded."""
    import sys

    loaded = sys.modules.get(f"nodekit.idempotency.{module}")
    return loaded is not None and isinstance(store, getattr(loaded, name))


def backend_for(store: Any) -> _Backend | None:
    """The run log of `store` (None for a store that keeps none: not one of nodekit's)."""
    found: _Backend | None = getattr(store, _ATTR, None)
    if found is not None:
        return found
    with _BACKENDS_LOCK:
        found = getattr(store, _ATTR, None)
        if found is None:
            try:
                found = _BACKENDS.get(store)
            except TypeError:
                return _make(store)
            if found is None:
                found = _make(store)
                if found is None:
                    return None
                try:
                    setattr(store, _ATTR, found)
                except (AttributeError, TypeError):
                    _BACKENDS[store] = found
    return found


# ---------------------------------------------------------------------------- one run


class RunLog:
    """One durable run's log: its events buffered, written at node completions (at most
    once every `FLUSH_EVERY` seconds) and at the run's end."""

    __slots__ = (
        "backend",
        "begun",
        "buffer",
        "cancelled",
        "dropped",
        "flow",
        "kept",
        "last",
        "lease",
        "names",
        "nodes",
        "outcome",
        "run_id",
    )

    def __init__(
        self,
        backend: _Backend,
        flow: str,
        run_id: str,
        nodes: Sequence[tuple[str, str]],
        lease: float,
        routes: Sequence[Sequence[str]] | None = None,
    ) -> None:
        self.backend = backend
        self.flow = flow
        self.run_id = run_id
        routes = routes or [[] for _ in nodes]
        self.nodes = json.dumps(
            [
                [*node, list(names)] if names else list(node)
                for node, names in zip(nodes, routes, strict=False)
            ],
            separators=(",", ":"),
        )
        self.names = frozenset(name for name, _ in nodes)
        self.lease = lease
        self.buffer: list[Event] = []
        self.outcome: str | None = None
        self.begun = False
        self.cancelled = False
        self.last = 0.0
        self.kept = 0
        self.dropped = 0

    def seen(self, event: Event) -> None:
        """The run's scoped sink (`_events.RUN_SINK`): keep what the story needs."""
        name = event.name
        if name.startswith("flow."):
            if event.run_id != self.run_id:
                return
            outcome = _OUTCOMES.get(name)
            if outcome is not None:
                fields = event.fields
                if (
                    outcome == FAILED
                    and fields.get("compensated")
                    and not fields.get("not_compensated")
                ):
                    outcome = COMPENSATED  # every completed node's compensation ran
                self.outcome = outcome
        elif event.node not in self.names or not name.startswith(_STEP_EVENTS):
            return  # an inner node's, or not a step's
        if self.kept >= MAX_EVENTS and self.outcome is None:
            self.dropped += 1
            return
        # the run's last events (its end) are kept past the cap
        self.kept += 1
        # no lock: list appends are atomic, and `_lines` takes and deletes a counted prefix
        self.buffer.append(event)

    def _lines(self) -> str:
        """The buffered events as one JSON line (an array: one encoder call per write)."""
        buffer = self.buffer
        count = len(buffer)
        items = []
        if count:
            events = buffer[:count]
            del buffer[:count]  # events appended meanwhile stay for the next write
            # `t` and `name` last: no field of the event can stand in for them
            items = [{**event.as_dict(), "t": event.time, "name": event.name} for event in events]
        dropped, self.dropped = self.dropped, 0
        if dropped:
            items.append({"node": None, "dropped": dropped, "t": time.time(), "name": DROPPED})
        if not items:
            return ""
        return json.dumps(items, default=str, separators=(",", ":")) + "\n"

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

    # the writes, synchronous (an async run calls them in a worker thread, or the backend's
    # async twins)

    def _opened(self, previous: str | None) -> bool:
        # `last` stays 0: the first node's completion writes, so that even a run that
        # crashes within its first second shows how far it got
        if previous == CANCELLED:
            return False
        self.begun = True
        return True

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
        return self._opened(previous)

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
        """The run ended: write its status and its last events."""
        if self.begun:
            self.flush(self.outcome or FAILED)

    # async twins

    async def aopen(self) -> bool:
        backend = self.backend
        if backend.asynchronous_inline:
            return self.open()
        if not backend.native_async:
            return await asyncio.to_thread(self.open)
        now = time.time()
        try:
            previous = await backend.abegin(
                self.flow, self.run_id, now, now + self.lease, holder_text(), self.nodes
            )
        except Exception:
            _log.debug("nodekit: run log of run %s not written", self.run_id, exc_info=True)
            return True
        return self._opened(previous)

    async def aflush(self, status: str | None = None) -> None:
        backend = self.backend
        if backend.asynchronous_inline:
            self.flush(status)
            return
        if not backend.native_async:
            await asyncio.to_thread(self.flush, status)
            return
        lines = self._lines()
        now = time.time()
        self.last = time.monotonic()
        try:
            after = await backend.aappend(
                self.flow, self.run_id, lines, now, now + self.lease, status
            )
        except Exception:
            _log.debug("nodekit: run log of run %s not written", self.run_id, exc_info=True)
            return
        if after == CANCELLED:
            self.cancelled = True

    async def aclose(self) -> None:
        if self.begun:
            await self.aflush(self.outcome or FAILED)


def start(
    store: Any,
    flow: str,
    run_id: str,
    nodes: Sequence[tuple[str, str]],
    lease: float,
    routes: Sequence[Sequence[str]] | None = None,
) -> RunLog | None:
    """The run log of a durable run in `store` (None: the store keeps none). `routes`: the
    names of the routes after each node (their decisions are journaled: `forget_keys`)."""
    try:
        backend = backend_for(store)
    except Exception:
        _log.debug("nodekit: no run log for run %s", run_id, exc_info=True)
        return None
    if backend is None:
        return None
    return RunLog(backend, flow, run_id, nodes, lease, routes)
