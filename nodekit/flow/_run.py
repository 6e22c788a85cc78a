"""One run of a flow: its state, the decisions made on it, and its resources.

Sync runs of one thread share one event loop for their async nodes and async resources
(`thread_loop`): an async client opened in one ``flow.run`` (an ``httpx.AsyncClient`` given
with ``nk.use``) is bound to that loop, and still works in the next run of that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from .._errors import ConfigError, FlowError
from .._events import emit, observed, short_error
from .._execution import thread_bound_error
from .._loops import ThreadLoop, thread_loop
from .._resources import lookup_slot, open_awaited, use
from ._graph import FIELD, RESOURCE, STATE, FlowOptions, Plan, Step, resolve_binds
from ._schema import Problem

# what an async step hands the scheduler to apply: a node's result, an update, a replay
RESULT, UPDATED, REPLAYED = 0, 1, 2

T = TypeVar("T")

_NO_TAGS: dict[str, Any] = {}


class Scope(NamedTuple):
    """The run a subflow node runs in: its flow, id and journal store (None: not durable)."""

    flow: str
    run_id: str
    store: Any


# set by the driver of a plan with subflows, read by its subflow nodes (`_subflow`)
SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "nodekit_flow_scope", default=None
)


class Run:
    """The state of one run and the decisions made on it (no I/O but the node calls)."""

    __slots__ = (
        "_loop",
        "asynchronous",
        "base",
        "binds",
        "completed",
        "contrib",
        "deferred",
        "dirty",
        "failed_emitted",
        "flow",
        "logged",
        "plan",
        "public",
        "resources",
        "results",
        "run_id",
        "schema",
        "t0",
        "tags",
        "values",
        "writers",
    )

    def __init__(self, flow: FlowOptions, plan: Plan, run_id: str, *, asynchronous: bool) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(
                f"flow {flow.name!r}: run_id must be a non-empty string, got {run_id!r}",
                option="run_id",
            )
        self.flow = flow
        self.plan = plan
        self.schema = flow._schema
        self.run_id = run_id
        self.asynchronous = asynchronous
        self.values: dict[str, Any] = {}
        self.public: Any = None
        self.completed: list[str] = []
        self.writers: dict[str, int] = {}
        self.resources: dict[str, Any] = {}
        self.binds: list[tuple[tuple[str, int, str, bool], ...]] = []
        self.contrib: dict[str, list[tuple[int, Any]]] = {}
        self.dirty: set[str] = set()
        self.base: dict[str, Any] = {}
        self.failed_emitted = False
        # a durable run keeping a run log: its node_started/node_finished events go out
        # (to the run's scoped sink, `_events.RUN_SINK`) even when nobody else listens
        self.logged = False
        # a flow with compensations: what its compensable nodes contributed, by name (one
        # per completion: a loop may run a node again), and the run's `FlowError` while its
        # compensations run (`_compensate`)
        self.results: dict[str, list[Any]] = {}
        self.deferred: FlowError | None = None
        self._loop: ThreadLoop | None = None
        self.t0 = time.perf_counter()
        # the fields every flow.* event of the run carries: a subflow's parent_run_id, ...
        self.tags = _NO_TAGS

    # ------------------------------------------------------------------ start

    def start(self, state: Any) -> None:
        self.values, self.public = self.schema.initial(state)
        self.binds = (
            [step.binds for step in self.plan.order]
            if self.plan.static
            else resolve_binds(self.flow, self.plan, self.values)
        )
        if self.asynchronous and self.schema.reducers:
            self.base = {k: self.values[k] for k in self.schema.reducers if k in self.values}

    def provide_sync(self, exits: list[Callable[..., Any]]) -> None:
        made: dict[str, Any] = {}
        for name, factory in self.flow._resources.items():
            value = factory()
            if hasattr(value, "__enter__"):
                exits.append(value.__exit__)
                value = value.__enter__()
            elif hasattr(value, "__aenter__") or inspect.isawaitable(value):
                # opened, and closed at the end of the run, on the loop its async nodes use
                loop = self.loop()
                value, exit = loop.run(_open_async(value))
                if exit is not None:
                    exits.append(functools.partial(_exit_on, loop, exit))
            made[name] = value
        if made:
            provide = use(**made)
            provide.__enter__()
            exits.append(provide.__exit__)
        for name in self._bound_resources():
            self.resources[name] = lookup_slot(self.flow.name, name).get()

    async def provide_async(self, exits: list[Callable[..., Any]]) -> None:
        made: dict[str, Any] = {}
        for name, factory in self.flow._resources.items():
            value = factory()
            if hasattr(value, "__aenter__"):
                exits.append(value.__aexit__)
                value = await value.__aenter__()
            elif hasattr(value, "__enter__"):
                # a sync resource may block to open or close (a database connection): like a
                # sync node, it does so in a worker thread, never on the event loop
                exits.append(functools.partial(_exit_in_thread, value.__exit__))
                value = await asyncio.to_thread(value.__enter__)
            elif inspect.isawaitable(value):
                value, exit = await open_awaited(value)
                if exit is not None:
                    exits.append(exit)
            made[name] = value
        if made:
            provide = use(**made)
            await provide.__aenter__()
            exits.append(provide.__aexit__)
        for name in self._bound_resources():
            self.resources[name] = await lookup_slot(self.flow.name, name).aget()

    def _bound_resources(self) -> list[str]:
        return sorted(
            {key for binds in self.binds for _, kind, key, _ in binds if kind == RESOURCE}
        )

    def started(self, durable: bool) -> None:
        emit(
            "flow.started",
            None,
            self.run_id,
            flow=self.flow.name,
            **self.tags,
            nodes=len(self.plan.order),
            mode="async" if self.asynchronous else "sync",
            durable=durable,
        )

    # ------------------------------------------------------------------ binding

    def bind(self, step: Step) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = self.values
        kwargs: dict[str, Any] = {}
        for param, kind, key, optional in self.binds[step.index]:
            if kind == FIELD:
                try:
                    kwargs[param] = values[key]
                except KeyError:
                    if not optional:
                        raise Problem(
                            f"its parameter {param!r} has no value: the state has no field "
                            f"{key!r} (no node before it wrote one)",
                            key,
                        ) from None
            elif kind == STATE:
                kwargs[param] = self.schema.view(values, self.public)
            else:
                kwargs[param] = self.resources[key]
        if not step.positional:
            return (), kwargs
        args = []
        for param in step.positional:
            if param not in kwargs:
                break
            args.append(kwargs.pop(param))
        return tuple(args), kwargs

    # ------------------------------------------------------------------ updates

    def normalize(self, step: Step, result: Any) -> Mapping[str, Any] | None:
        """The update a node's return value means (None: no change)."""
        if result is None:
            return None
        if step.output is not None:
            return {step.output: result}
        if type(result) is dict:
            update: Mapping[str, Any] = result
        elif isinstance(result, Mapping):
            update = dict(result)
        elif hasattr(type(result), "model_fields") and hasattr(result, "model_fields_set"):
            update = {key: getattr(result, key) for key in result.model_fields_set}
        else:
            raise Problem(
                f"it returned a {type(result).__qualname__}: a node returns a dict of state "
                "updates, a pydantic model, or None; declare output= to store a plain value",
                None,
                TypeError(f"node {step.name!r} returned {type(result).__qualname__}"),
            )
        for key in update:
            if not isinstance(key, str):
                raise Problem(f"it returned an update with a non-string key {key!r}", None)
        return update

    def merge(self, step: Step, update: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The state after `update`, validated; the writer check included. Raises `Problem`."""
        writers = self.writers
        if writers:
            reducers = self.schema.reducers
            for key in update:
                prev = writers.get(key)
                if (
                    prev is not None
                    and prev != step.index
                    and not (step.ancestors >> prev) & 1
                    and key not in reducers
                ):
                    other = self.plan.order[prev].name
                    raise Problem(
                        f"it writes field {key!r}, which {other!r} also wrote, and the two may run "
                        f"concurrently: order them with after=, or give {key!r} a reducer",
                        key,
                        ConfigError(
                            f"flow {self.flow.name!r}: nodes {other!r} and {step.name!r} both "
                            f"write field {key!r} without a reducer",
                            node=step.name,
                            option=key,
                        ),
                    )
        return self.schema.merge(self.values, self.public, update)

    def install(
        self,
        step: Step,
        update: Mapping[str, Any] | None,
        merged: tuple[dict[str, Any], Any] | None,
        duration: float | None,
        replayed: bool = False,
    ) -> None:
        if update:
            assert merged is not None
            self.values, self.public = merged
            writers = self.writers
            index = step.index
            for key in update:
                writers[key] = index
            if self.asynchronous and self.schema.reducers:
                for key in update:
                    if key in self.schema.reducers:
                        entries = self.contrib.setdefault(key, [])
                        if entries and entries[-1][0] > index:
                            self.dirty.add(key)
                        entries.append((index, update[key]))
        self.completed.append(step.name)
        if step.compensate is not None:  # what its compensation receives as `result`
            self.results.setdefault(step.name, []).append(
                update[step.output] if update and step.output is not None else update
            )
        if not replayed and not observed() and not self.logged:
            return
        if replayed:
            emit(
                "flow.node_skipped",
                step.name,
                self.run_id,
                flow=self.flow.name,
                **self.tags,
                reason="replayed",
                updated=tuple(update or ()),
                update=update,  # the values (and `state`) stay in process: see `_UNLOGGED`
                state=self.public,
            )
        else:
            emit(
                "flow.node_finished",
                step.name,
                self.run_id,
                duration=duration,
                flow=self.flow.name,
                **self.tags,
                updated=tuple(update or ()),
                update=update,
                state=self.public,
            )

    def commit(self, step: Step, result: Any, duration: float | None) -> None:
        """Apply a node's result: normalize, merge, install. Raises `Problem`."""
        self.apply(step, self.normalize(step, result), duration)

    def apply(self, step: Step, update: Mapping[str, Any] | None, duration: float | None) -> None:
        """Merge and install an update (None or empty: no change). Raises `Problem`."""
        if not update:
            self.install(step, None, None, duration)
            return
        self.install(step, update, self.merge(step, update), duration)

    def node_started(self, step: Step) -> None:
        if observed() or self.logged:
            emit("flow.node_started", step.name, self.run_id, flow=self.flow.name, **self.tags)

    # ------------------------------------------------------------------ sync step

    def step_sync(self, step: Step) -> None:
        t0 = time.perf_counter()
        try:
            args, kwargs = self.bind(step)
            self.node_started(step)
            result = step.call(*args, **kwargs)
            if step.is_async:
                result = self.loop().run(result)
            self.commit(step, result, time.perf_counter() - t0)
        except Exception as exc:
            raise self.fail(step.name, exc)  # noqa: B904 - fail() sets the cause

    def loop(self) -> ThreadLoop:
        """The event loop of this run's async nodes: its thread's (one run, one loop)."""
        runner = self._loop
        if runner is None:
            runner = self._loop = thread_loop()
        return runner

    def close_loop(self) -> None:
        # the loop is the thread's, kept for its next run (closed when the thread ends)
        self._loop = None

    # ------------------------------------------------------------------ end

    def finish(self) -> Any:
        if self.dirty:
            self.refold()
        emit(
            "flow.finished",
            None,
            self.run_id,
            duration=time.perf_counter() - self.t0,
            flow=self.flow.name,
            **self.tags,
            completed=tuple(self.completed),
            state=self.public,
        )
        return self.public

    def refold(self) -> None:
        """Fold the reducer fields again in canonical order (parallel nodes finished out of it)."""
        values = dict(self.values)
        for key in sorted(self.dirty):
            reducer = self.schema.reducers[key]
            entries = sorted(self.contrib[key], key=lambda entry: entry[0])
            if key in self.base:
                value = self.base[key]
                rest = entries
            else:
                value, rest = entries[0][1], entries[1:]
            for _, item in rest:
                value = reducer(value, item)
            values[key] = value
        keys, self.dirty = self.dirty, set()
        self.values, self.public = self.schema.revalidate(values, self.public, keys)

    def fail(self, node: str | None, exc: BaseException) -> FlowError:
        """The `FlowError` for a failure (emits ``flow.failed``); the caller raises it."""
        if self.dirty:
            with contextlib.suppress(Exception):  # report the state as it stood
                self.refold()
        field = None
        if isinstance(exc, Problem):
            why, field, cause = exc.message, exc.field, exc.cause
        else:
            why, cause = f"{short_error(exc, 300)}", exc
        where = f"at node {node!r}" if node is not None else "before any node ran"
        error = FlowError(
            f"flow {self.flow.name!r} (run {self.run_id}) failed {where}: {why}",
            node=node,
            state=self.public,
            completed=tuple(self.completed),
            failed=node,
            run_id=self.run_id,
            field=field,
        )
        if cause is not None:
            error.__cause__ = cause
        if self.plan.compensable and node is not None and not getattr(exc, "journal", False):
            # a node failed: its compensations run first, then `failed_event` (`_compensate`)
            self.deferred = error
            return error
        self.failed_event(error)
        return error

    def failed_event(self, error: FlowError, **fields: Any) -> None:
        """Emit ``flow.failed`` for the run's `FlowError`."""
        self.failed_emitted = True
        cause = error.__cause__
        emit(
            "flow.failed",
            error.failed,
            self.run_id,
            exc=cause if cause is not None else error,
            flow=self.flow.name,
            **self.tags,
            failed=error.failed,
            completed=error.completed,
            duration=time.perf_counter() - self.t0,
            **fields,
        )

    def aborted(self, exc: BaseException) -> None:
        """Anything else ended the run (cancellation, KeyboardInterrupt, a closed stream)."""
        if self.failed_emitted or isinstance(exc, GeneratorExit | ConfigError):
            return
        self.failed_emitted = True
        emit(
            "flow.failed",
            None,
            self.run_id,
            exc=exc,
            flow=self.flow.name,
            **self.tags,
            failed=None,
            completed=tuple(self.completed),
            duration=time.perf_counter() - self.t0,
        )


def replay_update(run: Run, step: Step, update: Mapping[str, Any]) -> None:
    """Apply a journaled update without running the node (a divergence is a `Problem`)."""
    try:
        merged = run.merge(step, update) if update else None
    except Problem as problem:
        diverged = Problem(
            f"its journaled update no longer applies to this flow's state ({problem.message}); "
            "the journal diverges from the flow: resume with the flow that wrote it, or start "
            "a new run_id",
            problem.field,
            problem.cause,
        )
        diverged.journal = True  # type: ignore[attr-defined]  # not the node's failure
        raise diverged from problem
    run.install(step, update or None, merged, None, replayed=True)
    emit("node.replayed", step.name, run.run_id, flow=run.flow.name, source="journal", **run.tags)


async def call_step(
    run: Run, step: Step, offload: Callable[[Step, Any, Any], Any] | None
) -> tuple[int, Any, float]:
    """Run one node of an async run that keeps no journal: an async node awaited here, a
    sync one in a worker thread (or on the flow's executor through `offload`). Returns what
    `apply_outcome` applies: ``(RESULT, the node's return value, duration)``."""
    t0 = time.perf_counter()
    args, kwargs = run.bind(step)
    run.node_started(step)
    if step.is_async:
        result = await step.call(*args, **kwargs)
    else:
        try:
            if offload is None:
                result = await asyncio.to_thread(step.call, *args, **kwargs)
            else:
                result = await offload(step, args, kwargs)
        except Exception as exc:
            bound = in_worker(step.name, kwargs, exc)
            if bound is None:
                raise
            raise bound from exc
    return RESULT, result, time.perf_counter() - t0


def apply_outcome(run: Run, step: Step, outcome: tuple[int, Any, float]) -> None:
    """Apply what `call_step` or the journal returned for a node, on the run's own loop."""
    kind, payload, duration = outcome
    if kind == RESULT:
        run.commit(step, payload, duration)
    elif kind == UPDATED:
        run.apply(step, payload, duration)
    else:
        replay_update(run, step, payload)


# ---------------------------------------------------------------------------- resources


def close_resources_sync(exits: list[Callable[..., Any]]) -> None:
    error: BaseException | None = None
    for close in reversed(exits):
        try:
            close(None, None, None)
        except BaseException as exc:
            error = error or exc
    exits.clear()
    if error is not None:
        raise error


async def _exit_in_thread(exit: Callable[..., Any], *exc: Any) -> Any:
    return await asyncio.to_thread(exit, *exc)


async def _open_async(value: Any) -> tuple[Any, Callable[..., Any] | None]:
    """Open an async resource of a sync run: enter an async context manager, or await."""
    if hasattr(value, "__aenter__"):
        return await value.__aenter__(), value.__aexit__
    return await open_awaited(value)


async def _wait(result: Any) -> Any:
    return (await result) if inspect.isawaitable(result) else result


def _exit_on(loop: ThreadLoop, exit: Callable[..., Any], *exc: Any) -> Any:
    """Close an async resource of a sync run on the loop that opened it."""
    return loop.run(_wait(exit(*exc)))


async def close_resources_async(exits: list[Callable[..., Any]]) -> None:
    error: BaseException | None = None
    for close in reversed(exits):
        try:
            result = close(None, None, None)
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            error = error or exc
    exits.clear()
    if error is not None:
        raise error


def in_worker(node: str, kwargs: Any, exc: Exception) -> ConfigError | None:
    """For a sync node's error in `arun`'s worker thread: the `ConfigError` that says how to
    fix a sqlite3 object made in another thread, or None for any other error."""
    return thread_bound_error(
        node,
        kwargs,
        exc,
        where="flow.arun runs sync nodes in worker threads",
        instead="run the flow with flow.run (sync mode)",
    )
