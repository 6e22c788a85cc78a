"""The drivers of a routed flow, and its decisions journaled (see `_routes` for routing).

`walk_sync` runs a routed flow in the calling thread, one node per step of a generator;
`RoutedScheduler` runs it on the event loop (at most ``max_concurrency`` nodes at once,
results applied in canonical order within a batch). After a node completes, each route after
it is decided (`decide_sync`, `decide_async`): a durable run journals the decision through
the claim protocol before any picked node starts, so a resume takes the same path even if the
route's function would now decide otherwise.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from .._canonical import canonical_json, digest
from .._errors import IdempotencyInProgress
from .._events import emit, wanted
from ..idempotency._claim import MISMATCH, REPLAY, Claim, Holder, drive_async, drive_sync
from ..idempotency._store import Acquisition, Record, RecordKey
from ._graph import FlowOptions, Step
from ._journal import Journal, _journal_problem, _journal_store_error
from ._routes import Route, Routing, Walk
from ._run import Run, apply_outcome, call_step
from ._schema import Problem

__all__ = ["CALL", "RoutedScheduler", "decide_async", "decide_sync", "walk_sync"]

# the call index of the node running now, in a routed flow with subflows (a loop runs a
# subflow again: its child run id says which execution it is)
CALL: contextvars.ContextVar[int] = contextvars.ContextVar("nodekit_flow_call", default=0)


# ---------------------------------------------------------------------------- decisions


def _routed_event(
    run: Run, step: Step, route: Route, names: tuple[str, ...], replayed: bool
) -> None:
    if wanted("flow.routed"):
        emit(
            "flow.routed",
            step.name,
            run.run_id,
            flow=run.flow.name,
            route=route.name,
            to=names,
            replayed=replayed,
            **run.tags,
        )


def _view(run: Run) -> Any:
    return run.schema.view(run.values, run.public)


def decide_sync(
    run: Run, journal: Journal | None, routing: Routing, step: Step, route: Route, call: int
) -> tuple[str, ...]:
    """Evaluate (or replay) one route after `step` completed; returns the picked nodes."""
    if journal is not None:
        decided: tuple[bool, tuple[str, ...]] = drive_sync(
            _Decision(journal, routing, route, step, call)
        )
        replayed, names = decided
    else:
        value = route.fn(_view(run))
        if inspect.isawaitable(value):  # an async route function: on the run's loop
            value = run.loop().run(_awaited(value))
        replayed, names = False, route.pick(value, routing.ids)
    _routed_event(run, step, route, names, replayed)
    return names


async def decide_async(
    run: Run, journal: Journal | None, routing: Routing, step: Step, route: Route, call: int
) -> tuple[str, ...]:
    if journal is not None:
        decided: tuple[bool, tuple[str, ...]] = await drive_async(
            _Decision(journal, routing, route, step, call)
        )
        replayed, names = decided
    else:
        value = route.fn(_view(run))
        if inspect.isawaitable(value):
            value = await value
        replayed, names = False, route.pick(value, routing.ids)
    _routed_event(run, step, route, names, replayed)
    return names


async def _awaited(value: Any) -> Any:
    return await value


class _Decision(Holder):
    """One routing decision's journal entry: replayed if journaled, else decided and written.

    ``RecordKey(namespace=f"flow:{flow}:{node}[@v{version}]:route:{route}", scope="",
    digest=digest(canonical_json([run_id, node, route, call_index])))``, its result
    ``{"to": [node, ...]}``: the nodes picked after the node's `call_index`-th execution.
    """

    def __init__(
        self, journal: Journal, routing: Routing, route: Route, step: Step, call: int
    ) -> None:
        self.journal = journal
        self.routing = routing
        self.route = route
        self.step = step
        run = journal.run
        flow = journal.flow.name
        key = RecordKey(
            f"flow:{flow}:{step.namespace}:route:{route.name}",
            "",
            digest(canonical_json([run.run_id, step.name, route.name, call])),
        )
        fingerprint = digest(
            canonical_json(["flow-route", flow, step.name, route.name, sorted(route.targets)])
        )
        self.claim = Claim(
            journal.store,
            key,
            fingerprint,
            lease=step.lease,
            ttl=journal.flow.ttl,
            takeover=True,
            node=step.name,
            run_id=run.run_id,
            source="journal",
        )

    def refused(self, reason: str, got: Acquisition) -> Any:
        route, key = self.route, self.claim.key
        if reason == MISMATCH:
            raise _journal_problem(
                f"the journal entry {key.short} of its route {route.name!r} belongs to another "
                "route; the journal diverges from the flow"
            )
        if reason == REPLAY:
            try:
                names = tuple(json.loads(got.record.result or "")["to"])
            except (ValueError, KeyError, TypeError):
                raise _journal_problem(
                    f"the journal entry {key.short} of its route {route.name!r} does not decode"
                ) from None
            if not all(isinstance(name, str) and name in route.targets for name in names):
                raise _journal_problem(
                    f"its route {route.name!r} journaled a decision for nodes that are no "
                    "longer among its targets; the journal diverges from the flow"
                )
            return True, names
        hint = "resume once that run ends or the lease ends"
        raise Problem(
            f"its route {route.name!r} is being decided by another run with the same run_id "
            f"(journal entry {key.short} is in progress); {hint}",
            None,
            IdempotencyInProgress(
                f"flow {self.journal.flow.name!r}: route {route.name!r} after node "
                f"{self.step.name!r} is in progress in another run; {hint}",
                node=self.step.name,
                key_fingerprint=key.short,
                holder=self.found,
            ),
        )

    def body_sync(self) -> Any:
        run = self.journal.run
        value = self.route.fn(_view(run))
        if inspect.isawaitable(value):
            value = run.loop().run(_awaited(value))
        return self.route.pick(value, self.routing.ids)

    async def body_async(self) -> Any:
        value = self.route.fn(_view(self.journal.run))
        if inspect.isawaitable(value):
            value = await value
        return self.route.pick(value, self.routing.ids)

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        return json.dumps({"to": list(result)}, separators=(",", ":")), None

    def completed(self, result: Any) -> Any:
        return False, result

    def lost(self, record: Record | None, result: Any) -> Any:
        raise Problem(
            f"its route {self.route.name!r} lost its journal lease to another run before the "
            "decision was journaled"
        )

    def store_error(self, op: str, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, self.step, op, exc)

    def unrecorded(self, exc: Exception) -> Exception:
        return _journal_store_error(self.journal, self.step, "complete", exc, self.claim)


# ---------------------------------------------------------------------------- sync driver


def walk_sync(routing: Routing, run: Run, journal: Journal | None) -> Generator[None, None, None]:
    """Run a routed flow's nodes in the calling thread, one per step of the generator."""
    walk = Walk(routing, run)
    subflows = routing.subflows
    while walk.ready:
        step = walk.pop()
        try:
            call = walk.begin(step)
        except Problem as problem:
            raise run.fail(step.name, problem)  # noqa: B904 - fail() sets the cause
        token = CALL.set(call) if subflows else None
        try:
            if journal is None:
                run.step_sync(step)
            else:
                journal.step_sync(step, call)
        finally:
            if token is not None:
                CALL.reset(token)
        for route in routing.after[step.index]:
            try:
                names = decide_sync(run, journal, routing, step, route, call)
            except Exception as exc:
                raise run.fail(step.name, exc)  # noqa: B904 - fail() sets the cause
            walk.routed(names)
        walk.release(step)
        yield


# ---------------------------------------------------------------------------- async driver


class RoutedScheduler:
    """The async driver of a routed flow: starts ready nodes (bounded), applies results as
    they finish (in canonical order within a batch), then evaluates the routes of each."""

    __slots__ = (
        "failure",
        "flow",
        "journal",
        "offload",
        "routing",
        "run",
        "running",
        "stop",
        "walk",
    )

    def __init__(
        self,
        flow: FlowOptions,
        run: Run,
        journal: Journal | None,
        routing: Routing,
        offload: Callable[[Step, Any, Any], Awaitable[Any]] | None = None,
    ) -> None:
        self.flow = flow
        # Flow(executor=...): `await offload(step, args, kwargs)` runs a sync node there
        self.offload = offload
        self.run = run
        self.journal = journal
        self.routing = routing
        self.walk = Walk(routing, run)
        self.running: dict[asyncio.Task[Any], tuple[Step, int]] = {}
        self.failure: tuple[str | None, BaseException] | None = None
        self.stop = False

    async def drive(self) -> None:
        """Run the routed flow; raises the run's `FlowError` for the first failure."""
        running = self.running
        try:
            while True:
                if not self.stop:
                    self._start_ready()
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: running[t][0].index):
                    step, call = running.pop(task)
                    if task.cancelled():
                        continue
                    problem = task.exception()
                    if problem is None:
                        try:
                            self._apply(step, task.result())
                            if not self.stop:
                                await self._route(step, call)
                        except Exception as error:
                            problem = error
                        else:
                            continue
                    if not isinstance(problem, Exception):
                        raise problem
                    self._failed(step.name, problem)
        except BaseException:
            tasks = list(running)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            running.clear()
            raise
        if self.failure is not None:
            raise self.run.fail(*self.failure)

    def _failed(self, node: str, problem: Exception) -> None:
        if self.failure is None:
            self.failure = (node, problem)
            self.stop = True
            # a flow with compensations waits for its in-flight nodes (see `_scheduler`)
            if self.flow.on_error == "cancel" and not self.run.plan.compensable:
                for other in self.running:
                    other.cancel()

    def _start_ready(self) -> None:
        walk, running = self.walk, self.running
        limit = self.flow.max_concurrency
        loop = asyncio.get_running_loop()
        while walk.ready and (limit is None or len(running) < limit):
            step = walk.pop()
            try:
                call = walk.begin(step)
            except Problem as problem:
                self._failed(step.name, problem)
                return
            task = loop.create_task(self._node(step, call))
            running[task] = (step, call)

    async def _node(self, step: Step, call: int) -> tuple[int, Any, float]:
        if self.routing.subflows:
            CALL.set(call)  # in this task's own context
        if self.journal is not None:
            return await self.journal.step_async(step, call)
        return await call_step(self.run, step, self.offload)

    def _apply(self, step: Step, outcome: tuple[int, Any, float]) -> None:
        apply_outcome(self.run, step, outcome)
        # a node may run several times: reducers fold in the order the updates were applied
        self.run.dirty.clear()

    async def _route(self, step: Step, call: int) -> None:
        walk = self.walk
        for route in self.routing.after[step.index]:
            walk.routed(await decide_async(self.run, self.journal, self.routing, step, route, call))
        walk.release(step)
