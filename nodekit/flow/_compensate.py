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

Durable runs journal the compensation: first the plan (the failure and the completion order,
one record), then one record per compensation, completed once it ran (or with its error).
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

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .._canonical import canonical_json, digest
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
from .._node import call_in_context_async, call_in_context_sync, new_context
from .._resources import has_resource, lookup_slot
from .._spec import NodeSpec
from ..idempotency._claim import MISMATCH, RELEASE, REPLAY, STORE, Claim, Holder
from ..idempotency._claim import drive_async as claim_async
from ..idempotency._claim import drive_sync as claim_sync
from ..idempotency._store import COMPLETED, Acquisition, Record, RecordKey
from ._graph import FIELD, RESOURCE, STATE, Entry, FlowOptions, Plan, Step, as_node, bind_plan
from ._journal import Journal
from ._run import Run, replay_update

__all__ = [
    "JournaledError",
    "Undo",
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
_PLAN_LEASE = 2.0
_DONE = '{"compensated":true}'


class JournaledError(NodekitError):
    """The error that ended a compensated run, as the run's journal recorded it: a resume has
    its text (type and message, redacted), not the object; the resumed `FlowError`'s cause."""


class Undo:
    """A node's compensation, compiled: the call and how its parameters bind."""

    __slots__ = ("binds", "call", "candidates", "needs", "positional", "result", "spec")

    def __init__(self, call: Any, spec: NodeSpec) -> None:
        self.call = call
        self.spec = spec
        self.binds: tuple[tuple[str, int, str, bool], ...] = ()
        self.candidates: tuple[tuple[str, bool], ...] = ()
        self.positional: tuple[str, ...] = ()
        self.needs: tuple[tuple[str, str], ...] = spec.resources
        self.result = False  # takes `result`


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
                _resolve(flow, step, step.compensate, values)


def _resolve(
    flow: FlowOptions, step: Step, undo: Undo, values: Mapping[str, Any]
) -> tuple[tuple[str, int, str, bool], ...]:
    """An undo's bindings for this run; a parameter nothing can bind is a `ConfigError`."""
    where = f"flow {flow.name!r}: node {step.name!r}: compensate"
    for param, resource in undo.needs:
        if resource not in flow._resources and not has_resource(resource):
            raise ConfigError(
                f"{where}: resource {resource!r} (parameter {param!r}) is not provided: pass "
                f"it in Flow(resources=...) or run the flow inside `with nk.use({resource}=...)`",
                node=step.name,
                option="compensate",
            )
    if not undo.candidates:
        return undo.binds
    untyped = flow._schema.fields is None
    binds = list(undo.binds)
    for param, optional in undo.candidates:
        if param in flow._resources or has_resource(param):
            binds.append((param, RESOURCE, param, False))
        elif untyped:
            binds.append((param, FIELD, param, optional))  # any node may write it
        elif not optional:
            raise ConfigError(
                f"{where}: parameter {param!r} matches no state field (the state's fields "
                f"{sorted(flow._schema.fields or ())}), resource, default or `result`",
                node=step.name,
                option="compensate",
            )
    return tuple(binds)


# ---------------------------------------------------------------------------- the keys


def _undo_key(run: Run, step: Step, call: int) -> RecordKey:
    """The compensation's journal entry, and so its idempotency key: run id and node (and,
    for a node a loop ran again, which of its completions it undoes)."""
    parts: list[Any] = [run.run_id, step.name, "compensate"]
    if call:
        parts.append(call)
    return RecordKey(
        f"flow:{run.flow.name}:{step.namespace}:compensate", "", digest(canonical_json(parts))
    )


def _plan_key(run: Run) -> RecordKey:
    return RecordKey(f"flow:{run.flow.name}:compensation", "", digest(canonical_json([run.run_id])))


def _fingerprint(run: Run, step: Step | None) -> str:
    name = None if step is None else step.name
    version = None if step is None else step.version
    return digest(canonical_json(["flow-compensate", run.flow.name, name, version]))


# ---------------------------------------------------------------------------- one compensation


class _Call:
    """One compensation's call: its arguments bound, its context keyed."""

    def __init__(self, run: Run, step: Step, call: int) -> None:
        undo = step.compensate
        assert isinstance(undo, Undo)
        self.run, self.step, self.undo, self.index = run, step, undo, call
        self.t0 = 0.0

    def bind(self, resources: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        run, undo = self.run, self.undo
        kwargs: dict[str, Any] = {}
        for param, kind, key, optional in _resolve(run.flow, self.step, undo, run.values):
            if kind == FIELD:
                if key in run.values:
                    kwargs[param] = run.values[key]
                elif not optional:
                    raise ConfigError(
                        f"flow {run.flow.name!r}: node {self.step.name!r}: its compensation's "
                        f"parameter {param!r} has no value: the state has no field {key!r}",
                        node=self.step.name,
                        option="compensate",
                    )
            elif kind == STATE:
                kwargs[param] = run.schema.view(run.values, run.public)
            else:
                kwargs[param] = resources[key]
        if undo.result:
            results = run.results.get(self.step.name, [])
            kwargs["result"] = results[self.index] if self.index < len(results) else None
        args = []
        for param in undo.positional:
            if param not in kwargs:
                break
            args.append(kwargs.pop(param))
        return tuple(args), kwargs

    def resource_names(self) -> list[str]:
        binds = _resolve(self.run.flow, self.step, self.undo, self.run.values)
        return [key for _, kind, key, _ in binds if kind == RESOURCE]

    def context(self, key: str, epoch: int) -> Any:
        ctx = new_context(self.undo.spec)
        ctx.idempotency_key = key
        ctx.epoch = epoch
        return ctx

    def resources_sync(self) -> dict[str, Any]:
        run = self.run
        return {
            name: run.resources[name]
            if name in run.resources
            else lookup_slot(run.flow.name, name).get()
            for name in self.resource_names()
        }

    async def resources_async(self) -> dict[str, Any]:
        run = self.run
        found: dict[str, Any] = {}
        for name in self.resource_names():
            found[name] = (
                run.resources[name]
                if name in run.resources
                else await lookup_slot(run.flow.name, name).aget()
            )
        return found

    def call_sync(self, key: str, epoch: int) -> None:
        """Run the compensation in this thread (an async one on the run's event loop)."""
        self.t0 = time.perf_counter()
        args, kwargs = self.bind(self.resources_sync())
        ctx = self.context(key, epoch)
        spec = self.undo.spec
        if spec.is_async:
            self.run.loop().run(call_in_context_async(spec, ctx, args, kwargs))
        else:
            call_in_context_sync(spec, ctx, args, kwargs)

    async def call_async(self, key: str, epoch: int) -> None:
        """Run it on the running loop (a sync one in a worker thread)."""
        self.t0 = time.perf_counter()
        args, kwargs = self.bind(await self.resources_async())
        ctx = self.context(key, epoch)
        spec = self.undo.spec
        if spec.is_async:
            await call_in_context_async(spec, ctx, args, kwargs)
        else:
            await asyncio.to_thread(call_in_context_sync, spec, ctx, args, kwargs)


class _UndoEntry(Holder):
    """A compensation's journal entry: replayed if it ran, else held while it runs."""

    def __init__(self, journal: Journal, call: _Call) -> None:
        self.call = call
        run, step = call.run, call.step
        self.record: Record | None = None
        self.claim = Claim(
            journal.store,
            _undo_key(run, step, call.index),
            _fingerprint(run, step),
            lease=step.lease,
            ttl=journal.flow.ttl,
            takeover=True,
            node=step.name,
            run_id=run.run_id,
            source="journal",
        )

    def refused(self, reason: str, got: Acquisition) -> Any:
        key = self.claim.key
        if reason == MISMATCH:
            raise IdempotencyMismatch(
                f"its journal entry {key.short} belongs to another node or version",
                node=self.call.step.name,
                key_fingerprint=key.short,
            )
        if reason == REPLAY:
            return ("replayed", _error_of(got.record))
        raise IdempotencyInProgress(
            f"it is being compensated by another run with the same run_id (journal entry "
            f"{key.short} is in progress)",
            node=self.call.step.name,
            key_fingerprint=key.short,
        )

    def acquired(self, got: Acquisition) -> None:
        self.record = got.record

    def _key(self) -> tuple[str, int]:
        assert self.record is not None
        return self.record.key_digest, self.record.epoch

    def body_sync(self) -> Any:
        self.call.call_sync(*self._key())

    def body_async(self) -> Awaitable[Any]:
        return self.call.call_async(*self._key())

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        return _DONE, None

    def completed(self, result: Any) -> Any:
        return ("ran", None)

    def failure(self, exc: BaseException) -> tuple[str, str | None]:
        if not isinstance(exc, Exception):  # interrupted: a resume runs it again
            return RELEASE, None
        return STORE, json.dumps({"error": short_error(exc, 300)}, sort_keys=True)

    def lost(self, record: Record | None, result: Any) -> Any:
        raise IdempotencyLeaseLost(
            "its journal entry was taken over by another run before it was recorded",
            node=self.call.step.name,
            key_fingerprint=self.claim.key.short,
        )

    def store_error(self, op: str, exc: Exception) -> Exception:
        return IdempotencyStoreError(
            f"the journal's store failed at {op} ({type(exc).__name__}); it did not run",
            node=self.call.step.name,
        )

    def unrecorded(self, exc: Exception) -> Exception:
        return OutcomeUnknown(
            f"it ran, but the journal's store failed to record it ({type(exc).__name__})",
            node=self.call.step.name,
        )


def _error_of(record: Record) -> str | None:
    """A journaled compensation's error text (None: it ran)."""
    if record.error is None:
        return None
    try:
        return str(json.loads(record.error)["error"])
    except (ValueError, KeyError, TypeError):
        return "its journaled error cannot be read"


# ---------------------------------------------------------------------------- the plan record


class _PlanEntry(Holder):
    """The run's compensation plan: written once, before the first compensation runs."""

    def __init__(self, journal: Journal, run: Run, text: str) -> None:
        self.text = text
        self.claim = Claim(
            journal.store,
            _plan_key(run),
            _fingerprint(run, None),
            lease=_PLAN_LEASE,
            ttl=journal.flow.ttl,
            takeover=True,
            node=None,
            run_id=run.run_id,
            source="journal",
        )
        self.wait_until = time.monotonic() + _PLAN_LEASE * 2

    def refused(self, reason: str, got: Acquisition) -> Any:
        if reason == REPLAY and got.record.result is not None:
            return got.record.result  # another attempt of this run wrote it first
        raise IdempotencyInProgress(
            "another run with the same run_id is writing its compensation plan",
            key_fingerprint=self.claim.key.short,
        )

    def body_sync(self) -> Any:
        return None

    async def _nothing(self) -> None:
        return None

    def body_async(self) -> Awaitable[Any]:
        return self._nothing()

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        return self.text, None

    def completed(self, result: Any) -> Any:
        return self.text

    def lost(self, record: Record | None, result: Any) -> Any:
        if record is not None and record.state == COMPLETED and record.result is not None:
            return record.result
        raise IdempotencyLeaseLost(
            "the compensation plan's journal entry was taken over",
            key_fingerprint=self.claim.key.short,
        )

    def store_error(self, op: str, exc: Exception) -> Exception:
        return IdempotencyStoreError(
            f"the journal's store failed at {op} of the compensation plan ({type(exc).__name__})"
        )

    def unrecorded(self, exc: Exception) -> Exception:
        return OutcomeUnknown(f"the compensation plan could not be recorded ({type(exc).__name__})")


def _plan_text(error: FlowError) -> str:
    return json.dumps(
        {
            "failed": error.failed,
            "field": error.field,
            "message": str(error.args[0]) if error.args else "",
            "error": None if error.__cause__ is None else short_error(error.__cause__, 300),
            "completed": list(error.completed),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


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
                claim_sync(_PlanEntry(journal, run, _plan_text(error)))
            except Exception as exc:
                saga.unplanned(exc)
                return
        for step, index in saga.steps:
            call = _Call(run, step, index)
            saga.t0 = time.perf_counter()
            try:
                if journal is None:
                    call.call_sync(_undo_key(run, step, index).digest, 0)
                    kind, failed = "ran", None
                else:
                    kind, failed = claim_sync(_UndoEntry(journal, call))
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
                await claim_async(_PlanEntry(journal, run, _plan_text(error)))
            except Exception as exc:
                saga.unplanned(exc)
                return
        for step, index in saga.steps:
            call = _Call(run, step, index)
            saga.t0 = time.perf_counter()
            try:
                if journal is None:
                    await call.call_async(_undo_key(run, step, index).digest, 0)
                    kind, failed = "ran", None
                else:
                    kind, failed = await claim_async(_UndoEntry(journal, call))
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
    _resume(run, journal, journal.store.get(_plan_key(run)), journal.store.get)


async def resume_async(run: Run, journal: Journal) -> None:
    """The async twin of `resume_sync`."""
    record = await journal.store.aget(_plan_key(run))
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
            continue  # its journal entry is gone: it is not compensated (reported)
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
