"""Durable runs: the journal of a run, kept through the idempotency store protocol.

Durable runs (``store=``) journal each node's update, as canonical JSON, through the
idempotency store protocol, after the node succeeds and before any dependant starts: the
journal is idempotency at node granularity. Running the same ``run_id`` again replays what was
journaled and runs the rest, so which nodes run depends only on journaled values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from collections.abc import Awaitable, Mapping
from typing import Any

from .._canonical import canonical_json, digest
from .._context import NodeContext
from .._errors import (
    ConfigError,
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyStoreError,
    OutcomeUnknown,
)
from .._events import RUN_SINK
from .._node import call_in_context_async, call_in_context_sync, new_context
from .._redact import error_text
from ..idempotency._claim import MISMATCH, REPLAY, Claim, Holder, drive_async, drive_sync
from ..idempotency._open import open_store
from ..idempotency._policy import NodekitWarning
from ..idempotency._store import Acquisition, Record, RecordKey
from ._graph import FlowOptions, Step
from ._run import REPLAYED, UPDATED, Run, in_worker, replay_update
from ._runlog import start as start_runlog
from ._schema import Problem

_HEADER_LEASE = 2.0


class Journal:
    """A durable run's journal, kept through the idempotency store protocol.

    One record per run (the header: the input state's fingerprint and the flow's shape) and
    one per node: ``RecordKey(namespace=f"flow:{flow}:{node}[@v{version}]", scope="",
    digest=digest(canonical_json([run_id, node, call_index])))``. A node's record is acquired
    (with a lease, renewed while the node runs), and completed with the node's update as
    canonical JSON once the node succeeded, before any dependant starts; a failed node's
    record is released so that a resume runs it again. The decisions are made in I/O-free
    methods; the sync and async methods only talk to the store.
    """

    __slots__ = (
        "flow",
        "header_fp",
        "header_key",
        "header_text",
        "keys",
        "log",
        "owned",
        "run",
        "sink",
        "store",
    )

    def __init__(self, flow: FlowOptions, run: Run, store: Any) -> None:
        self.flow = flow
        self.run = run
        self.owned = isinstance(store, str)
        if self.owned:
            store = open_store(store)
        if not all(
            callable(getattr(store, op, None)) for op in ("acquire", "complete", "release", "get")
        ):
            raise ConfigError(
                f"flow {flow.name!r}: store must be a store (MemoryStore, SQLiteStore, "
                f"RedisStore, PostgresStore) or a URL, got {store!r}",
                option="store",
            )
        self.store = store
        run_id = run.run_id
        try:
            input_fp = digest(canonical_json(run.schema.fingerprint_json(run.values, run.public)))
        except TypeError as exc:
            raise ConfigError(
                f"flow {flow.name!r}: a durable run fingerprints its input state, and it "
                f"cannot: {exc}",
                option="state",
            ) from exc
        if run.plan.journal is None:
            graph = [
                [step.name, step.version, sorted(run.plan.order[d].name for d in step.deps)]
                for step in sorted(run.plan.order, key=lambda s: s.name)
            ]
            if run.plan.routes is not None:  # a routed flow: its routes are its shape too
                graph.append(["routes", run.plan.routes.fingerprint])
            run.plan.journal = (
                digest(canonical_json(graph)),
                [
                    digest(canonical_json(["flow-node", flow.name, step.name, step.version]))
                    for step in run.plan.order
                ],
            )
        graph_fp, node_fps = run.plan.journal
        self.header_key = RecordKey(f"flow:{flow.name}", "", digest(canonical_json([run_id])))
        self.header_fp = digest(canonical_json({"graph": graph_fp, "input": input_fp}))
        self.header_text = json.dumps(
            {"graph": graph_fp, "input": input_fp, "nodes": [s.name for s in run.plan.order]},
            sort_keys=True,
            separators=(",", ":"),
        )
        self.keys: list[tuple[RecordKey, str]] = [
            (
                RecordKey(
                    f"flow:{flow.name}:{step.namespace}",
                    "",
                    digest(canonical_json([run_id, step.name, 0])),
                ),
                node_fps[step.index],
            )
            for step in run.plan.order
        ]
        # the run log (`_runlog.py`): what `nodekit runs` lists and shows
        self.log = start_runlog(
            store,
            flow.name,
            run_id,
            [
                (step.name, key.namespace)
                for step, (key, _) in zip(run.plan.order, self.keys, strict=True)
            ],
            max((step.lease for step in run.plan.order), default=60.0),
            _route_names(run),
        )
        # its events reach the run log through a sink of this run's context only (node
        # calls, tasks and worker threads of the run inherit it): `_events.RUN_SINK`
        self.sink: Any = None
        if self.log is not None:
            run.logged = True
            self.sink = RUN_SINK.set(self.log.seen)

    # ------------------------------------------------------------------ decisions

    def _diverged(self, record: Record) -> Problem:
        what = "differs from"
        try:
            old = json.loads(record.result or "{}")
            new = json.loads(self.header_text)
            if old.get("input") != new.get("input"):
                what = "was started with a different input state than"
            elif old.get("graph") != new.get("graph"):
                what = (
                    f"was journaled by a flow with other nodes or dependencies "
                    f"(journaled nodes: {old.get('nodes')}) than"
                )
        except ValueError:
            pass
        return Problem(
            f"the journal of run {self.run.run_id!r} {what} this run: resume with the same "
            "flow and input, or start a new run_id"
        )

    def _stale(self, step: Step | None, what: str) -> None:
        self._doubt(
            f"flow {self.flow.name!r} (run {self.run.run_id}): {what} expired (older than its "
            "TTL), so it cannot be replayed: "
            + ("the run starts again" if step is None else f"node {step.name!r} runs again")
        )

    def _doubt(self, message: str) -> None:
        """A journal that may no longer be trusted: refused (`strict=True`) or a warning."""
        if self.flow.strict:
            raise _journal_problem(message)
        # stacklevel: past _doubt and the check that called it, to the step being run
        warnings.warn(message, NodekitWarning, stacklevel=3)

    def entry(self, step: Step, call: int) -> tuple[RecordKey, str]:
        """The key and fingerprint of a node's `call`-th execution in this run (a node runs
        more than once only in a loop through routes)."""
        if call == 0:
            return self.keys[step.index]
        key = self.keys[step.index][0]
        digest_ = digest(canonical_json([self.run.run_id, step.name, call]))
        return RecordKey(key.namespace, key.scope, digest_), self.keys[step.index][1]

    def _lost(self, step: Step, key: RecordKey | None = None) -> Problem:
        key = key or self.keys[step.index][0]
        return Problem(
            f"it lost its journal lease (entry {key.short}) to another run before it finished; "
            "its update was not journaled",
            None,
            IdempotencyLeaseLost(
                f"flow {self.flow.name!r}: journal lease of node {step.name!r} was taken over",
                node=step.name,
                key_fingerprint=key.short,
            ),
        )

    def _prepare(self, step: Step, result: Any) -> tuple[Mapping[str, Any] | None, Any, str]:
        run = self.run
        update = run.normalize(step, result)
        if not update:
            return None, None, run.schema.encode({}, run.values)
        merged = run.merge(step, update)
        return update, merged, run.schema.encode(update, merged[0])

    # ------------------------------------------------------------------ the drivers

    def open_sync(self) -> None:
        """Write the run's header, or check it against this run's (a resume)."""
        try:
            if self.log is not None and not self.log.open():
                raise self.log.refusal()
            drive_sync(_Header(self))
        except Problem as problem:
            raise self.run.fail(None, problem)  # noqa: B904 - fail() sets the cause

    async def open_async(self) -> None:
        try:
            if self.log is not None and not await self.log.aopen():
                raise self.log.refusal()
            await drive_async(_Header(self))
        except Problem as problem:
            raise self.run.fail(None, problem)  # noqa: B904 - fail() sets the cause

    def step_sync(self, step: Step, call: int = 0) -> None:
        """Replay a journaled node, or run it holding its entry and journal its update."""
        run, log = self.run, self.log
        try:
            if log is not None and log.cancelled:
                raise log.refusal(running=True)
            kind, payload, duration = drive_sync(_NodeEntry(self, step, call, asynchronous=False))
            if kind == REPLAYED:
                replay_update(run, step, payload)
                return
        except Exception as exc:
            raise run.fail(step.name, exc)  # noqa: B904 - fail() sets the cause
        update, merged = payload
        run.install(step, update, merged, duration)
        if log is not None and log.due():
            log.flush()

    async def step_async(self, step: Step, call: int = 0) -> tuple[int, Any, float]:
        """The async twin: returns what the scheduler applies (`REPLAYED` or `UPDATED`)."""
        log = self.log
        if log is not None and log.cancelled:
            raise log.refusal(running=True)
        kind, payload, duration = await drive_async(_NodeEntry(self, step, call, asynchronous=True))
        if log is not None and log.due():
            await log.aflush()
        return kind, payload if kind == REPLAYED else payload[0], duration

    def _unsink(self) -> None:
        token, self.sink = self.sink, None
        if token is not None:
            # closed from another context (a collected generator): nothing to reset there
            with contextlib.suppress(ValueError):
                RUN_SINK.reset(token)

    def close_sync(self) -> None:
        try:
            if self.log is not None:
                self.log.close()
        finally:
            self._unsink()
        if self.owned:
            self.store.close()

    async def close_async(self) -> None:
        try:
            if self.log is not None:
                await self.log.aclose()
        finally:
            self._unsink()
        if self.owned:
            await self.store.aclose()


def _route_names(run: Run) -> list[list[str]]:
    """The routes after each node (by step index): their decisions are journaled too."""
    routing = run.plan.routes
    if routing is None:
        return [[] for _ in run.plan.order]
    return [[route.name for route in routes] for routes in routing.after]


class _Header(Holder):
    """The run's header record: written by a new run, checked by a resume."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        run = journal.run
        self.claim = Claim(
            journal.store,
            journal.header_key,
            journal.header_fp,
            lease=_HEADER_LEASE,
            ttl=journal.flow.ttl,
            takeover=True,
            node=None,
            run_id=run.run_id,
            source="journal",
        )
        # another caller writing the same header right now: wait for it a little
        self.wait_until = time.monotonic() + _HEADER_LEASE * 2

    def refused(self, reason: str, got: Acquisition) -> Any:
        if reason == MISMATCH:
            raise self.journal._diverged(got.record)
        return "resume"  # completed, or still being written after the wait: go on

    def acquired(self, got: Acquisition) -> None:
        if got.record.epoch > 1 and not got.takeover:
            self.journal._stale(None, "the run's journal")

    def body_sync(self) -> Any:
        return None

    def body_async(self) -> Awaitable[Any]:
        return asyncio.sleep(0)  # nothing to run: the header is the record itself

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        return self.journal.header_text, None

    def lost(self, record: Record | None, result: Any) -> Any:
        return "resume"

    def store_error(self, op: str, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, None, op, exc)

    def unrecorded(self, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, None, "complete", exc, self.claim)


class _NodeEntry(Holder):
    """One node's journal entry: replayed if completed, else held while the node runs."""

    def __init__(self, journal: Journal, step: Step, call: int, *, asynchronous: bool) -> None:
        self.journal = journal
        self.step = step
        self.asynchronous = asynchronous
        self.record: Record | None = None
        self.t0 = 0.0
        key, fingerprint = journal.entry(step, call)
        self.claim = Claim(
            journal.store,
            key,
            fingerprint,
            lease=step.lease,
            ttl=journal.flow.ttl,
            takeover=True,
            node=step.name,
            run_id=journal.run.run_id,
            source="journal",
        )

    def refused(self, reason: str, got: Acquisition) -> Any:
        journal, step, key = self.journal, self.step, self.claim.key
        if reason == MISMATCH:
            raise _journal_problem(
                f"its journal entry {key.short} belongs to another node or version; the "
                "journal diverges from the flow"
            )
        record = got.record
        if reason == REPLAY:
            if record.result is None:
                raise _journal_problem(f"its journal entry {key.short} has no update")
            ttl = step.ttl
            if ttl is not None and time.time() - record.created_at > ttl:
                journal._doubt(
                    f"flow {journal.flow.name!r} (run {journal.run.run_id}): the journal entry of "
                    f"node {step.name!r} is older than the node's idempotency TTL ({ttl:.0f} s): "
                    "its keys may have expired downstream"
                )
            return REPLAYED, journal.run.schema.decode(record.result), 0.0
        self.claim.epoch = record.epoch
        self.claim.event("idempotency.in_progress")
        who = self.found
        held = "" if who is None else f", {who.describe(got.now)}"
        hint = (
            "resume once that run ends or the lease ends (a run whose process is gone on this "
            "host is taken over at once)"
        )
        raise Problem(
            f"it is being run by another run with the same run_id (journal entry {key.short} is "
            f"in progress{held}); {hint}",
            None,
            IdempotencyInProgress(
                f"flow {journal.flow.name!r}: node {step.name!r} of run {journal.run.run_id!r} "
                f"is in progress in another run{held}; {hint}",
                node=step.name,
                key_fingerprint=key.short,
                holder=who,
            ),
        )

    def acquired(self, got: Acquisition) -> None:
        self.record = got.record
        if got.record.epoch > 1 and not got.takeover:
            self.journal._stale(self.step, f"the journal entry of node {self.step.name!r}")
        if got.takeover:
            self.claim.event("idempotency.takeover")

    def _start(self) -> tuple[tuple[Any, ...], dict[str, Any], Record]:
        """Bind the node's arguments and announce it; the clock of its duration starts."""
        run, step = self.journal.run, self.step
        self.t0 = time.perf_counter()
        args, kwargs = run.bind(step)
        run.node_started(step)
        assert self.record is not None
        return args, kwargs, self.record

    def body_sync(self) -> Any:
        step = self.step
        args, kwargs, record = self._start()
        if step.is_async:  # on the run's private event loop
            coro = _call_journaled_async(step, args, kwargs, record)
            return self.journal._prepare(step, self.journal.run.loop().run(coro))
        return self.journal._prepare(step, _call_journaled_sync(step, args, kwargs, record))

    async def body_async(self) -> Any:
        step = self.step
        args, kwargs, record = self._start()
        if step.is_async:
            result = await _call_journaled_async(step, args, kwargs, record)
        else:  # a sync node in a worker thread, never blocking the loop
            try:
                result = await asyncio.to_thread(_call_journaled_sync, step, args, kwargs, record)
            except Exception as exc:
                bound = in_worker(step.name, kwargs, exc)
                if bound is None:
                    raise
                raise bound from exc
        return self.journal._prepare(step, result)

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        return result[2], None

    def completed(self, result: Any) -> Any:
        update, merged, _ = result
        return UPDATED, (update, merged), time.perf_counter() - self.t0

    def lost(self, record: Record | None, result: Any) -> Any:
        raise self.journal._lost(self.step, self.claim.key)

    def store_error(self, op: str, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, self.step, op, exc)

    def unrecorded(self, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, self.step, "complete", exc, self.claim)


def _journal_store_error(
    journal: Journal, step: Step | None, op: str, exc: Exception, claim: Claim | None = None
) -> Exception:
    """The journal's store failed at `op`: before anything ran (acquire, or the run's header),
    or after a node ran (complete: its update is not journaled, its entry stays in progress
    until the lease ends, like any outcome that could not be recorded)."""
    where = "the run's header" if step is None else f"the journal entry of node {step.name!r}"
    ran = op != "acquire" and step is not None
    after = (
        "the node ran, but its update is not journaled; a resume after the lease runs it "
        "again under the same keys"
        if ran
        else ("the node did not run" if step is not None else "no node ran")
    )
    kind = OutcomeUnknown if ran else IdempotencyStoreError
    context: dict[str, Any] = {}
    held = ""
    if ran and claim is not None:
        who = context["holder"] = claim.held_here()
        held = (
            f" (the entry is {who.describe()}; a run resumed by another process on this host "
            "once this one has exited goes through at once)"
        )
    cause = kind(
        f"flow {journal.flow.name!r}: the store failed at {op} of {where} "
        f"({error_text(exc)}); {after}{held}",
        node=None if step is None else step.name,
        **context,
    )
    cause.__cause__ = exc
    return Problem(f"the journal store failed at {op} ({type(exc).__name__}); {after}", None, cause)


def _journal_problem(message: str) -> Problem:
    """A failure of the journal, not of the node: a run that ends on it is not compensated
    (resume with the flow that wrote the journal)."""
    problem = Problem(message)
    problem.journal = True  # type: ignore[attr-defined]
    return problem


def _journaled_context(step: Step, record: Record) -> NodeContext:
    """A node's context with the journal entry as its default key.

    ``nk.context().idempotency_key`` is the journal entry's key digest, so
    ``idempotency_key_for(step)`` gives downstream keys that are stable across resumes.
    A node with its own `Idempotency` uses its own key instead.
    """
    ctx = new_context(step.spec)
    ctx.idempotency_key = record.key_digest
    ctx.epoch = record.epoch
    return ctx


def _call_journaled_sync(step: Step, args: Any, kwargs: Any, record: Record) -> Any:
    """Call a node the way its wrapper does, in its journaled context."""
    return call_in_context_sync(step.spec, _journaled_context(step, record), args, kwargs)


async def _call_journaled_async(step: Step, args: Any, kwargs: Any, record: Record) -> Any:
    return await call_in_context_async(step.spec, _journaled_context(step, record), args, kwargs)
