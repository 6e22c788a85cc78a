"""Compensation: when a run fails for good, the completed nodes' compensations undo them.

``flow.add(node, compensate=undo)``: `undo` binds its parameters by name like a node (state
fields, ``state``, resources) plus ``result``, what the node contributed (its ``output=``
value, else its update; None if it returned nothing). When a run fails for good — a node's
*permanent* error ends it (after the node's retries; `nk.classify` says ``"permanent"``: a 4xx,
a business error, any error nodekit does not know as transient) — the compensations of the
nodes that completed (replayed ones included) run one at a time, in reverse completion order. Each runs as a node call whose idempotency key is derived from the
run id and the node (``nk.context().idempotency_key``: `nodekit.http` sends it, and
``idempotency_key_for`` derives stable downstream keys from it), so a resume sends the same
keys. A compensation that fails is reported in the `FlowError` (`compensated`,
`not_compensated`) and by ``node.compensation_failed``; the others still run.

In async mode a flow with compensations lets the nodes still running when one fails finish
(whatever `on_error` says; no new node starts): a sync node in a worker thread cannot be
cancelled, its effect happens all the same, so it must complete to be compensated. A flow
without compensations cancels them as `on_error` says.

Durable runs journal the compensation: first the plan (the failure and the completion order,
one record), then one record per compensation, completed once it ran or failed with a
*permanent* error. A compensation that fails with a *safe* error (the refund API is down: it
did not happen) releases its record, so a resume runs it again; an *ambiguous* one (it may
have happened) keeps its record's lease and is reported as `OutcomeUnknown`, and a resume
after the lease runs it again under the same idempotency key. Either way the first run's
`FlowError` lists it in `not_compensated`.
From the plan on, the run is being compensated: a resume of the same ``run_id`` runs no node,
replays what completed, runs the compensations not yet journaled (a crash mid-compensation
is resumed) and raises the same `FlowError`; a compensated run stays compensated.

Nothing here runs on a run's success path: a run pays for compensation only when it fails.
A transient error (*safe* or *ambiguous*: an API that is down, a breaker that is open, a
timeout), and the errors a resume may settle (the node is in progress in another run, its
outcome is unknown, the journal's store or lease failed, the journal diverges), end the run
without compensating it: running it again may complete it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._classify import PERMANENT, classify
from .._errors import (
    ConfigError,
    FlowError,
    IdempotencyCorruptRecord,
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyMismatch,
    IdempotencyStoreError,
    NodekitError,
    OutcomeUnknown,
)
from .._events import emit, short_error
from .._spec import NodeSpec
from ..idempotency._claim import drive_async as claim_async
from ..idempotency._claim import drive_sync as claim_sync
from ..idempotency._store import COMPLETED, Record, RecordKey
from ._graph import Entry, FlowOptions, Plan, Step, as_node, bind_plan
from ._journal import Journal
from ._run import Run, replay_update
from ._undo import PlanEntry, Undo, UndoCall, UndoEntry, plan_key, plan_text, resolve, undo_key

__all__ = [
    "JournaledError",
    "check_compensations",
    "compile_compensations",
    "make_undo",
    "resume_async",
    "resume_sync",
    "settle_async",
    "settle_sync",
]
# errors a resume may still settle (whatever their kind): a run ending on one is not compensated
_UNSETTLED = (
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    OutcomeUnknown,
    IdempotencyStoreError,
    IdempotencyCorruptRecord,
    IdempotencyMismatch,
)


class JournaledError(NodekitError):
    """The error that ended a compensated run, as the run's journal recorded it: a resume has
    its text (type and message, redacted), not the object; the resumed `FlowError`'s cause."""


# ---------------------------------------------------------------------------- building


def make_undo(flow: str, node: str, undo: Any) -> Any:
    """`undo` as a node (a plain function wrapped with `nk.node` defaults), else `ConfigError`."""
    if undo is None:
        return None
    if not callable(undo) or isinstance(undo, type):
        raise ConfigError(
            f"flow {flow!r}: node {node!r}: compensate must be a function "
            f"undo(result, ...fields or resources), got {undo!r}",
            node=node,
            option="compensate",
        )
    if isinstance(getattr(undo, "spec", None), NodeSpec):
        return undo
    try:
        return as_node(undo, f"{node}.compensate", {})
    except ConfigError as exc:
        raise ConfigError(
            f"flow {flow!r}: node {node!r}: compensate: {exc}", node=node, option="compensate"
        ) from exc


def compile_compensations(flow: FlowOptions, plan: Plan, entries: Mapping[str, Entry]) -> None:
    """Give each step with a compensation its compiled `Undo`; mark the plan compensable."""
    for step in plan.order:
        undo = entries[step.name].compensate
        if undo is None:
            continue
        spec: NodeSpec = undo.spec
        shadow = Step(Entry(step.name, undo, spec, (), None, None, 0), step.index)
        bind_plan(flow, shadow, plan.outputs)
        compiled = Undo(undo, spec)
        compiled.binds = tuple(b for b in shadow.binds if b[0] != "result")
        compiled.candidates = tuple(c for c in shadow.candidates if c[0] != "result")
        compiled.positional = shadow.positional
        compiled.result = len(compiled.binds) + len(compiled.candidates) < len(shadow.binds) + len(
            shadow.candidates
        )
        step.compensate = compiled
        plan.compensable = True


def check_compensations(flow: FlowOptions, plan: Plan, values: Mapping[str, Any]) -> None:
    """Every compensation's parameters can be bound (as `resolve_binds` checks a node's)."""
    if plan.compensable:
        for step in plan.order:
            if step.compensate is not None:
                resolve(flow, step, step.compensate, values)


# ---------------------------------------------------------------------------- the run's end


class _Saga:
    """The compensation of one failed run: which nodes, and what became of each."""

    def __init__(self, run: Run, error: FlowError) -> None:
        self.run = run
        self.error = error
        by_name = {step.name: step for step in run.plan.order}
        seen: dict[str, int] = {}
        done: list[tuple[Step, int]] = []  # (node, which of its completions) in order
        for name in error.completed:
            step = by_name.get(name)
            if step is not None and step.compensate is not None:
                done.append((step, seen.get(name, 0)))
                seen[name] = seen.get(name, 0) + 1
        self.steps = done[::-1]
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def wanted(self) -> bool:
        """Whether the run failed for good: a permanent error, not one a resume may settle."""
        cause = self.error.__cause__
        if not self.steps or isinstance(cause, _UNSETTLED):
            return False
        return cause is None or classify(cause) == PERMANENT

    def begin(self) -> None:
        emit(
            "flow.compensating",
            None,
            self.run.run_id,
            flow=self.run.flow.name,
            failed=self.error.failed,
            nodes=tuple(step.name for step, _ in self.steps),
        )

    def unplanned(self, exc: BaseException) -> None:
        """The plan could not be journaled: nothing is compensated (a resume may)."""
        why = f"the compensation plan could not be journaled: {short_error(exc, 300)}"
        for step, call in self.steps:
            self.failed[_label(step, call)] = why

    def outcome(
        self, step: Step, call: int, kind: str, error: str | None, exc: BaseException | None
    ) -> None:
        replayed = kind == "replayed"
        name = step.name
        duration = None if replayed else time.perf_counter() - self.t0
        if error is None and exc is None:
            self.done.append(name)
            emit(
                "node.compensated",
                name,
                self.run.run_id,
                duration=duration,
                flow=self.run.flow.name,
                replayed=replayed,
            )
            return
        why = error if error is not None else short_error(exc or Exception(), 300)
        self.failed[_label(step, call)] = why
        emit(
            "node.compensation_failed",
            name,
            self.run.run_id,
            exc=exc if exc is not None else NodekitError(why, node=name),
            duration=duration,
            flow=self.run.flow.name,
            replayed=replayed,
        )

    def finish(self) -> None:
        """Say in the `FlowError` what was compensated and what was not; ``flow.failed``."""
        error, run = self.error, self.run
        error.compensated = tuple(self.done)
        error.not_compensated = dict(self.failed)
        if self.steps:
            text = str(error.args[0]) if error.args else ""
            if self.done:
                text += f"; compensated: {', '.join(self.done)}"
            if self.failed:
                text += "; NOT compensated: " + "; ".join(
                    f"{name} ({why})" for name, why in self.failed.items()
                )
            error.args = (text, *error.args[1:])
        run.failed_event(
            error, compensated=error.compensated, not_compensated=tuple(error.not_compensated)
        )


def _label(step: Step, call: int) -> str:
    """How `not_compensated` names a compensation: the node (its nth completion after the
    first, in a loop: ``node#2``)."""
    return step.name if call == 0 else f"{step.name}#{call + 1}"


def _begin_saga(run: Run, error: FlowError) -> _Saga | None:
    run.deferred = None
    saga = _Saga(run, error)
    if not saga.wanted():
        saga.steps = []
        saga.finish()
        return None
    saga.begin()
    return saga


def settle_sync(run: Run, journal: Journal | None, error: FlowError) -> None:
    """Compensate the failed run (sync mode), then emit ``flow.failed``."""
    saga = _begin_saga(run, error)
    if saga is None:
        return
    try:
        if journal is not None and getattr(error, "_planned", None) is None:
            try:
                claim_sync(PlanEntry(journal, run, plan_text(error)))
            except Exception as exc:
                saga.unplanned(exc)
                return
        for step, index in saga.steps:
            call = UndoCall(run, step, index)
            saga.t0 = time.perf_counter()
            try:
                if journal is None:
                    call.call_sync(undo_key(run, step, index).digest, 0)
                    kind, failed = "ran", None
                else:
                    kind, failed = claim_sync(UndoEntry(journal, call))
            except Exception as exc:
                saga.outcome(step, index, "ran", None, exc)
            else:
                saga.outcome(step, index, kind, failed, None)
    finally:
        saga.finish()


async def settle_async(run: Run, journal: Journal | None, error: FlowError) -> None:
    """The async twin of `settle_sync`."""
    saga = _begin_saga(run, error)
    if saga is None:
        return
    try:
        if journal is not None and getattr(error, "_planned", None) is None:
            try:
                await claim_async(PlanEntry(journal, run, plan_text(error)))
            except Exception as exc:
                saga.unplanned(exc)
                return
        for step, index in saga.steps:
            call = UndoCall(run, step, index)
            saga.t0 = time.perf_counter()
            try:
                if journal is None:
                    await call.call_async(undo_key(run, step, index).digest, 0)
                    kind, failed = "ran", None
                else:
                    kind, failed = await claim_async(UndoEntry(journal, call))
            except Exception as exc:
                saga.outcome(step, index, "ran", None, exc)
            else:
                saga.outcome(step, index, kind, failed, None)
    finally:
        saga.finish()


# ---------------------------------------------------------------------------- resuming


def resume_sync(run: Run, journal: Journal) -> None:
    """A durable run already being compensated: replay, and raise its `FlowError` (which the
    driver settles: the compensations not yet journaled run). Nothing if it is not."""
    _resume(run, journal, journal.store.get(plan_key(run)), journal.store.get)


async def resume_async(run: Run, journal: Journal) -> None:
    """The async twin of `resume_sync`."""
    record = await journal.store.aget(plan_key(run))
    if record is None or record.state != COMPLETED:
        return
    found: dict[RecordKey, Record | None] = {}
    for step, call in _completions(run, _planned(record)):
        key = journal.entry(step, call)[0]
        found[key] = await journal.store.aget(key)
    _resume(run, journal, record, found.get)


def _completions(run: Run, plan: Mapping[str, Any]) -> list[tuple[Step, int]]:
    """The plan's completed nodes, in order, each with which of its completions it is."""
    seen: dict[str, int] = {}
    found = []
    for name in plan["completed"]:
        step = _step(run, name)
        if step is not None:
            found.append((step, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1
    return found


def _planned(record: Record) -> dict[str, Any]:
    try:
        data = json.loads(record.result or "")
        if isinstance(data, dict) and isinstance(data.get("completed"), list):
            return data
    except ValueError:
        pass
    return {"failed": None, "field": None, "message": "", "completed": []}


def _step(run: Run, name: str) -> Step | None:
    for step in run.plan.order:
        if step.name == name:
            return step
    return None


def _resume(
    run: Run,
    journal: Journal,
    record: Record | None,
    get: Callable[[RecordKey], Record | None],
) -> None:
    if record is None or record.state != COMPLETED:
        return
    plan = _planned(record)
    for step, call in _completions(run, plan):
        entry = get(journal.entry(step, call)[0])
        if entry is None or entry.state != COMPLETED or entry.result is None:
            # its journal entry is gone: its compensation still runs, with ``result=None``;
            # a placeholder keeps `run.results` aligned with the completions (`UndoCall.bind`)
            if step.compensate is not None:
                run.results.setdefault(step.name, []).append(None)
            continue
        replay_update(run, step, run.schema.decode(entry.result))
    message = plan["message"] or (
        f"flow {run.flow.name!r} (run {run.run_id}) failed at node {plan['failed']!r}"
    )
    error = FlowError(
        message,
        node=plan["failed"],
        state=run.public,
        completed=tuple(plan["completed"]),
        failed=plan["failed"],
        run_id=run.run_id,
        field=plan["field"],
    )
    if plan.get("error"):
        error.__cause__ = JournaledError(str(plan["error"]), node=plan["failed"])
    error._planned = plan  # type: ignore[attr-defined]
    run.deferred = error
    raise error
