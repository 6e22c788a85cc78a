"""The drivers of a run: the sync stepping loop and the async scheduler.

Sync mode runs the nodes in canonical order in the calling thread, one per step of a
generator (so `Flow.stream` can yield between nodes). Async mode starts every ready node
(at most ``max_concurrency`` at once), applies results as they finish, in canonical order
within a batch, and on a failure cancels or lets finish the nodes still running, as
``on_error`` says.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any

from .. import _context
from .._context import new_run_id
from .._executors import offloader
from .._runtime import LOG_RUN, RUNTIME
from ._compensate import (
    check_compensations,
    resume_async,
    resume_sync,
    settle_async,
    settle_sync,
)
from ._graph import RESOURCE, FlowOptions, Plan, Step
from ._journal import Journal
from ._routed import RoutedScheduler, walk_sync
from ._run import (
    SCOPE,
    Run,
    Scope,
    apply_outcome,
    call_step,
    close_resources_async,
    close_resources_sync,
)


def _begin(
    flow: FlowOptions,
    plan: Plan,
    state: Any,
    run_id: str | None,
    store: Any,
    asynchronous: bool,
    parent: Mapping[str, Any] | None = None,
) -> tuple[Run, Journal | None, tuple[Any, ...]]:
    """A run's state, its journal (durable runs) and its run id bound for the nodes and logs
    (and, when instrumented, the run's span made current: `_runtime.Tracer.start_flow`).
    `parent`: the fields a subflow's events carry (`_subflow`)."""
    run = Run(flow, plan, run_id or new_run_id(), asynchronous=asynchronous)
    if parent:
        run.tags = dict(parent)
    run.start(state)
    if plan.compensable:
        check_compensations(flow, plan, run.values)
    journal = Journal(flow, run, store) if store is not None else None
    tracer = RUNTIME.tracer
    end = None
    if tracer is not None:
        end = tracer.start_flow(flow.name, run.run_id, "async" if asynchronous else "sync")
    scope = None
    if plan.subflows:  # its subflow nodes run in this run's store, under its id
        scope = SCOPE.set(Scope(flow.name, run.run_id, None if journal is None else journal.store))
    return run, journal, (_context.set_run_id(run.run_id), LOG_RUN.set(run.run_id), end, scope)


def _unbind(tokens: tuple[Any, ...]) -> None:
    if tokens[3] is not None:
        SCOPE.reset(tokens[3])
    if tokens[2] is not None:
        tokens[2]()
    LOG_RUN.reset(tokens[1])
    _context.reset_run_id(tokens[0])


def drive_flow_sync(
    flow: FlowOptions,
    plan: Plan,
    state: Any,
    run_id: str | None,
    store: Any,
    *,
    parent: Mapping[str, Any] | None = None,
) -> Generator[None, None, Any]:
    """The sync driver: a generator that runs one node per step, returning the state."""
    run, journal, tokens = _begin(flow, plan, state, run_id, store, False, parent)
    exits: list[Callable[..., Any]] = []
    try:
        run.provide_sync(exits)
        run.started(journal is not None)
        if journal is not None:
            journal.open_sync()
            if plan.compensable:
                resume_sync(run, journal)  # a run being compensated goes on compensating
        if plan.routes is None:
            step_sync = run.step_sync if journal is None else journal.step_sync
            for step in plan.order:
                step_sync(step)
                yield
        else:
            yield from walk_sync(plan.routes, run, journal)
        return run.finish()
    except BaseException as exc:
        if run.deferred is not None and exc is run.deferred:
            settle_sync(run, journal, run.deferred)  # its compensations, then flow.failed
        run.aborted(exc)
        raise
    finally:
        try:
            run.close_loop()
            if journal is not None:
                journal.close_sync()
        finally:
            close_resources_sync(exits)
            _unbind(tokens)


async def drive_flow_async(
    flow: FlowOptions,
    plan: Plan,
    state: Any,
    run_id: str | None,
    store: Any,
    *,
    parent: Mapping[str, Any] | None = None,
) -> Any:
    """The async driver: one run on the running event loop, returning the final state."""
    run, journal, tokens = _begin(flow, plan, state, run_id, store, True, parent)
    exits: list[Callable[..., Any]] = []
    try:
        await run.provide_async(exits)
        run.started(journal is not None)
        if journal is not None:
            await journal.open_async()
            if plan.compensable:
                await resume_async(run, journal)
        if plan.routes is None:
            await Scheduler(flow, run, journal).drive()
        else:
            executor = getattr(flow, "executor", None)
            offload = None if executor is None else _on_executor(executor, plan.order)
            await RoutedScheduler(flow, run, journal, plan.routes, offload).drive()
        return run.finish()
    except BaseException as exc:
        if run.deferred is not None and exc is run.deferred:
            await settle_async(run, journal, run.deferred)
        run.aborted(exc)
        raise
    finally:
        try:
            if journal is not None:
                await journal.close_async()
        finally:
            await close_resources_async(exits)
            _unbind(tokens)


def _on_executor(executor: Any, order: Any) -> Callable[..., Any]:
    """`await run(step, args, kwargs)`: a sync node on the flow's executor, unless it takes a
    resource (a live object of this process: such a node runs in a thread here)."""
    remote = offloader(executor)
    local = {
        step.index
        for step in order
        if step.spec.resources or any(kind == RESOURCE for _, kind, _, _ in step.binds)
    }

    def run(step: Step, args: Any, kwargs: Any) -> Any:
        if step.index in local:
            return asyncio.to_thread(step.call, *args, **kwargs)
        return remote(step.call, args, kwargs)

    return run


class Scheduler:
    """The async driver: starts ready nodes (bounded), applies results as they finish."""

    __slots__ = (
        "executor",
        "failure",
        "finished",
        "flow",
        "journal",
        "ready",
        "run",
        "running",
        "stop_starting",
        "waiting",
        "wake",
    )

    def __init__(self, flow: FlowOptions, run: Run, journal: Journal | None) -> None:
        self.flow = flow
        self.run = run
        self.journal = journal
        self.running: dict[asyncio.Task[Any], Step] = {}
        self.finished: deque[asyncio.Task[Any]] = deque()
        self.wake = asyncio.Event()
        order = run.plan.order
        self.waiting = [len(step.deps) for step in order]
        self.ready = [step.index for step in order if not step.deps]
        heapq.heapify(self.ready)
        self.failure: tuple[str | None, BaseException] | None = None
        self.stop_starting = False
        # Flow(executor=...): sync nodes run there (those taking a resource stay here)
        executor = getattr(flow, "executor", None)
        self.executor = None if executor is None else _on_executor(executor, order)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.finished.append(task)
        self.wake.set()

    def node(self, step: Step) -> Coroutine[Any, Any, tuple[int, Any, float]]:
        """Run one node (journaled or not): the coroutine itself, no frame of its own; it
        returns what `apply_outcome` applies."""
        if self.journal is not None:
            return self.journal.step_async(step)
        return call_step(self.run, step, self.executor)

    async def drive(self) -> None:
        """Run every node; raises the run's `FlowError` for the first node that failed."""
        running = self.running
        try:
            while True:
                if not self.stop_starting:
                    if not running and len(self.ready) == 1:
                        # a lone ready node (a chain): await it here, no task needed
                        if not await self._await_lone():
                            break
                        continue
                    self._start_ready()
                if not running:
                    break
                await self.wake.wait()
                self.wake.clear()
                self._collect()
        except BaseException:
            await self._cancel_all()
            raise
        if self.failure is not None:
            raise self.run.fail(*self.failure)

    def _release(self, step: Step) -> None:
        waiting = self.waiting
        for index in step.dependants:
            waiting[index] -= 1
            if waiting[index] == 0:
                heapq.heappush(self.ready, index)

    async def _await_lone(self) -> bool:
        """Run the one ready node in place; False if it failed (the run stops)."""
        step = self.run.plan.order[heapq.heappop(self.ready)]
        try:
            apply_outcome(self.run, step, await self.node(step))
        except Exception as exc:
            self.failure = (step.name, exc)
            return False
        self._release(step)
        return True

    def _start_ready(self) -> None:
        """Start ready nodes as tasks, in canonical order, up to `max_concurrency` running."""
        order = self.run.plan.order
        limit = self.flow.max_concurrency
        ready = self.ready
        running = self.running
        loop = asyncio.get_running_loop()
        while ready and (limit is None or len(running) < limit):
            step = order[heapq.heappop(ready)]
            task = loop.create_task(self.node(step))
            task.add_done_callback(self._done)
            running[task] = step

    def _collect(self) -> None:
        """Apply the nodes that finished (canonical order); the first failure stops starting."""
        running = self.running
        batch = sorted(self.finished, key=lambda t: running[t].index)
        self.finished.clear()
        for task in batch:
            step = running.pop(task)
            if task.cancelled():
                continue
            problem = task.exception()
            if problem is None:
                try:
                    apply_outcome(self.run, step, task.result())
                except Exception as error:
                    problem = error
                else:
                    if not self.stop_starting:
                        self._release(step)
                    continue
            if not isinstance(problem, Exception):
                raise problem
            if self.failure is None:
                self.failure = (step.name, problem)
                self.stop_starting = True
                # a flow with compensations waits for its in-flight nodes: a sync node in a
                # worker thread cannot be cancelled (its effect happens all the same), and
                # one that completes must be compensated (`_compensate`)
                if self.flow.on_error == "cancel" and not self.run.plan.compensable:
                    for other in running:
                        other.cancel()

    async def _cancel_all(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()
