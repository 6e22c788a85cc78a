"""One compensation, journaled: its compiled form, its keys, its call and its journal entries.

`_compensate` orchestrates a failed run's compensation (which nodes, in what order, what is
reported, how a resume goes on); this module has what each step of it uses: `Undo` (how a
compensation's parameters bind), `UndoCall` (one call: arguments bound, context keyed),
`UndoEntry` (its journal entry, held while it runs through the claim protocol, settled as the
error's kind says), and `PlanEntry` (the run's compensation plan, written once).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from .._canonical import canonical_json, digest
from .._classify import AMBIGUOUS, SAFE, classify
from .._errors import (
    ConfigError,
    FlowError,
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyMismatch,
    IdempotencyStoreError,
    OutcomeUnknown,
)
from .._events import short_error
from .._node import call_in_context_async, call_in_context_sync, new_context
from .._resources import has_resource, lookup_slot
from .._spec import NodeSpec
from ..idempotency._claim import KEEP, MISMATCH, RELEASE, REPLAY, STORE, Claim, Holder
from ..idempotency._store import COMPLETED, Acquisition, Record, RecordKey
from ._graph import FIELD, RESOURCE, STATE, FlowOptions, Step
from ._journal import Journal
from ._run import Run

__all__ = [
    "PlanEntry",
    "Undo",
    "UndoCall",
    "UndoEntry",
    "plan_key",
    "plan_text",
    "resolve",
    "undo_key",
]

_PLAN_LEASE = 2.0
_DONE = '{"compensated":true}'


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


def resolve(
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


def undo_key(run: Run, step: Step, call: int) -> RecordKey:
    """The compensation's journal entry, and so its idempotency key: run id and node (and,
    for a node a loop ran again, which of its completions it undoes)."""
    parts: list[Any] = [run.run_id, step.name, "compensate"]
    if call:
        parts.append(call)
    return RecordKey(
        f"flow:{run.flow.name}:{step.namespace}:compensate", "", digest(canonical_json(parts))
    )


def plan_key(run: Run) -> RecordKey:
    return RecordKey(f"flow:{run.flow.name}:compensation", "", digest(canonical_json([run.run_id])))


def _fingerprint(run: Run, step: Step | None) -> str:
    name = None if step is None else step.name
    version = None if step is None else step.version
    return digest(canonical_json(["flow-compensate", run.flow.name, name, version]))


# ---------------------------------------------------------------------------- one compensation


class UndoCall:
    """One compensation's call: its arguments bound, its context keyed."""

    def __init__(self, run: Run, step: Step, call: int) -> None:
        undo = step.compensate
        assert isinstance(undo, Undo)
        self.run, self.step, self.undo, self.index = run, step, undo, call
        self.t0 = 0.0

    def bind(self, resources: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        run, undo = self.run, self.undo
        kwargs: dict[str, Any] = {}
        for param, kind, key, optional in resolve(run.flow, self.step, undo, run.values):
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
        binds = resolve(self.run.flow, self.step, self.undo, self.run.values)
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


class UndoEntry(Holder):
    """A compensation's journal entry: replayed if it ran, else held while it runs."""

    def __init__(self, journal: Journal, call: UndoCall) -> None:
        self.call = call
        run, step = call.run, call.step
        self.record: Record | None = None
        self.claim = Claim(
            journal.store,
            undo_key(run, step, call.index),
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
            f"its compensation's journal entry {key.short} is in progress: another run with "
            "the same run_id is compensating it, or an earlier attempt failed with an "
            "ambiguous error and holds it until its lease expires",
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
        # as a keyed call settles its key: only a permanent error is the compensation's final
        # outcome; a safe one (it did not happen) is released, so a resume runs it again; an
        # ambiguous one (it may have happened) keeps the lease, and a resume after the lease
        # runs it again under the same idempotency key
        if not isinstance(exc, Exception):  # interrupted: a resume runs it again
            return RELEASE, None
        if isinstance(exc, OutcomeUnknown | IdempotencyLeaseLost):
            return KEEP, None
        kind = classify(exc)
        if kind == SAFE:
            return RELEASE, None
        if kind == AMBIGUOUS:
            return KEEP, None
        return STORE, json.dumps({"error": short_error(exc, 300)}, sort_keys=True)

    def failed(self, exc: BaseException, action: str) -> BaseException:
        if action != KEEP or not isinstance(exc, Exception):
            return exc
        self.claim.event("idempotency.outcome_unknown", exc=exc)
        return OutcomeUnknown(
            f"its compensation failed with an ambiguous error ({short_error(exc, 200)}); it may "
            f"have taken effect, so its journal entry {self.claim.key.short} stays locked until "
            "its lease expires, then a resume runs it again with the same idempotency key",
            node=self.call.step.name,
            key_fingerprint=self.claim.key.short,
        )

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


class PlanEntry(Holder):
    """The run's compensation plan: written once, before the first compensation runs."""

    def __init__(self, journal: Journal, run: Run, text: str) -> None:
        self.text = text
        self.claim = Claim(
            journal.store,
            plan_key(run),
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


def plan_text(error: FlowError) -> str:
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
