"""`Flow`: nodes, their dependencies, a state, run in sync or async mode.

The flow is a builder (`add`, `node`) and a runner (`run`, `stream`, `arun`, `astream`):
compiling its nodes into a plan is `_graph`'s, the state's validation `_schema`'s, one run's
state `_run`'s, driving it `_scheduler`'s and journaling a durable run `_journal`'s.
"""

from __future__ import annotations

import typing
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from .. import _events
from .._context import new_run_id
from .._errors import ConfigError
from .._executors import check_executor
from .._node import Node, NodeSpec
from .._policies import Seconds, seconds
from ._compensate import check_compensations, compile_compensations, make_undo
from ._graph import Entry, Plan, as_node, compile_plan, resolve_binds
from ._routes import Route, check_routes, compile_routes, declare
from ._scheduler import drive_flow_async, drive_flow_sync
from ._schema import Schema
from ._stream import Mode, check_mode, stream_async, stream_sync
from ._subflow import subflow_node

__all__ = ["Flow"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")  # the state: a dict, a TypedDict or a pydantic model

_ON_ERROR = ("cancel", "finish")
_DEFAULT_TTL = timedelta(days=7)


class Flow(Generic[S]):
    """Nodes with dependencies over a shared state, run in sync or async mode.

    ``Flow(name, state=None)``: `state` is None (a plain dict), a `TypedDict` or a pydantic
    model class. `max_concurrency` bounds the nodes running at once in async mode.
    `on_error` says what happens to nodes still running when one fails in async mode:
    ``"cancel"`` (default) cancels them, ``"finish"`` lets them finish and keeps their
    updates; no new node starts either way. A flow with compensations always lets them finish
    (a sync node in a worker thread cannot be stopped), then compensates what completed. `resources` maps names to zero-argument factories
    called at the start of every run (a context manager, sync or async, is entered and closed
    at the end; any other value is used as it is). `reducers` maps a field to
    ``fn(old, update) -> new``. Durable runs: `lease` is how long a crashed run's node blocks a
    resume (renewed while the node runs; default: the node's time budget, else 60 s), `ttl`
    how long the journal is kept (default 7 days); `strict=True` refuses to resume from a
    journal older than a node's TTL instead of warning. `executor` (any
    `concurrent.futures.Executor`, e.g. a Dask client's ``get_executor()``): `arun` and
    `astream` run the sync nodes on it instead of in threads (a node taking a resource still
    runs here; `run` and durable runs do not use it).

    Typed: ``Flow("checkout", OrderState)`` is a ``Flow[OrderState]`` (``Flow("x")`` a
    ``Flow[dict[str, Any]]``), and `run`/`arun` return an ``OrderState``.
    """

    @overload
    def __init__(
        self: Flow[dict[str, Any]],
        name: str,
        state: None = None,
        *,
        max_concurrency: int | None = None,
        on_error: Literal["cancel", "finish"] = "cancel",
        resources: Mapping[str, Callable[[], Any]] | None = None,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
        lease: Seconds | None = None,
        ttl: Seconds = _DEFAULT_TTL,
        strict: bool = False,
        max_steps: int | None = None,
        executor: Executor | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        name: str,
        state: type[S],
        *,
        max_concurrency: int | None = None,
        on_error: Literal["cancel", "finish"] = "cancel",
        resources: Mapping[str, Callable[[], Any]] | None = None,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
        lease: Seconds | None = None,
        ttl: Seconds = _DEFAULT_TTL,
        strict: bool = False,
        max_steps: int | None = None,
        executor: Executor | None = None,
    ) -> None: ...

    def __init__(  # a new option goes in the two overloads above too (typed callers see them)
        self,
        name: str,
        state: Any = None,
        *,
        max_concurrency: int | None = None,
        on_error: Literal["cancel", "finish"] = "cancel",
        resources: Mapping[str, Callable[[], Any]] | None = None,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
        lease: Seconds | None = None,
        ttl: Seconds = _DEFAULT_TTL,
        strict: bool = False,
        max_steps: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"flow name must be a non-empty string, got {name!r}", option="name")
        self.name = name
        label = f"flow {name}"
        _check_concurrency(name, max_concurrency, on_error)
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self._schema = Schema(name, state, reducers)
        self._resources: dict[str, Callable[[], Any]] = _factories(name, resources)
        self.lease = seconds(lease, node=label, option="lease")
        ttl_s = seconds(ttl, node=label, option="ttl", allow_none=False)
        assert ttl_s is not None
        self.ttl = ttl_s
        self.strict = bool(strict)
        self.max_steps = _check_max_steps(name, max_steps)
        self.executor = (
            None if executor is None else check_executor(executor, None, where=f"flow {name!r}")
        )
        self._entries: dict[str, Entry] = {}
        self._names: dict[int, str] = {}
        self._plan: Plan | None = None
        self._routes: list[Route] = []

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, nodes={list(self._entries)})"

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node names, in the order they were added."""
        return tuple(self._entries)

    # ------------------------------------------------------------------ building

    @overload
    def add(
        self,
        node: Flow[Any],
        /,
        *,
        after: Any = (),
        output: str | None = None,
        name: str | None = None,
        version: str | int | None = None,
        compensate: Callable[..., Any] | None = None,
    ) -> Node[..., Any]: ...

    @overload
    def add(
        self,
        node: Callable[P, R],
        /,
        *,
        after: Any = (),
        output: str | None = None,
        name: str | None = None,
        version: str | int | None = None,
        compensate: Callable[..., Any] | None = None,
    ) -> Node[P, R]: ...

    def add(
        self,
        node: Any,
        /,
        *,
        after: Any = (),
        output: str | None = None,
        name: str | None = None,
        version: str | int | None = None,
        compensate: Callable[..., Any] | None = None,
    ) -> Any:
        """Add a node (or a plain function, wrapped with `nk.node` defaults); returns the node.

        `after` lists the nodes this one runs after (node objects or names; a single one
        needs no list). `output` stores the node's return value under that state field.
        `name` defaults to the node's explicit name, else the function's ``__name__``; it is
        what `after`, events and the journal use. Bumping `version` makes a durable resume
        run the node again instead of replaying it. `compensate` undoes the node when a later
        node's error ends the run: ``undo(result, ...)`` binds its parameters like a node,
        plus `result`, what the node contributed (see ``nodekit.flow._compensate``).

        A `Flow` added as `node` is a subflow: it runs whole, as one node (see
        ``nodekit.flow._subflow``); `name` defaults to its flow name.
        """
        if isinstance(node, Flow):  # a subflow: the whole inner flow runs as one node
            if node is self:
                raise ConfigError(
                    f"flow {self.name!r}: a flow cannot run itself as a subflow", option="node"
                )
            fields = None if self._schema.extra else self._schema.fields
            node = subflow_node(node, name, output, fields)
        spec = getattr(node, "spec", None)
        if isinstance(spec, NodeSpec) and callable(node):
            call: Any = node
            default_name = spec.name if spec.named else getattr(spec.fn, "__name__", spec.name)
        else:
            call = as_node(node, name, {})
            spec = call.spec
            default_name = spec.name
        assert isinstance(spec, NodeSpec)
        step_name = default_name if name is None else name
        if not isinstance(step_name, str) or not step_name:
            raise ConfigError(
                f"flow {self.name!r}: node name must be a non-empty string, got {step_name!r}",
                option="name",
            )
        if step_name in self._entries:
            raise ConfigError(
                f"flow {self.name!r}: a node named {step_name!r} was already added; pass "
                "name= to add another one",
                node=step_name,
                option="name",
            )
        self._check_options(step_name, output, version)
        undo = make_undo(self.name, step_name, compensate)
        deps = self._dependencies(step_name, after)
        self._entries[step_name] = Entry(
            step_name, call, spec, deps, output, version, len(self._entries), undo
        )
        self._names[id(call)] = step_name
        self._names.setdefault(id(node), step_name)
        self._names.setdefault(id(spec.fn), step_name)
        self._plan = None
        return call

    def _check_options(self, step_name: str, output: str | None, version: Any) -> None:
        """`output` and `version` as `add` accepts them, else a `ConfigError`."""
        if output is not None:
            if not isinstance(output, str) or not output.isidentifier():
                raise ConfigError(
                    f"flow {self.name!r}: node {step_name!r}: output must be a field name, "
                    f"got {output!r}",
                    node=step_name,
                    option="output",
                )
            fields = self._schema.fields
            if fields is not None and output not in fields and not self._schema.extra:
                raise ConfigError(
                    f"flow {self.name!r}: node {step_name!r}: output {output!r} is not a state "
                    f"field (fields: {sorted(fields)})",
                    node=step_name,
                    option="output",
                )
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, str | int)
        ):
            raise ConfigError(
                f"flow {self.name!r}: node {step_name!r}: version must be a str or an int",
                node=step_name,
                option="version",
            )

    def _dependencies(self, node: str, after: Any) -> tuple[str, ...]:
        if after is None:
            return ()
        items = [after] if isinstance(after, str) or callable(after) else list(after)
        names: list[str] = []
        for item in items:
            if isinstance(item, str):
                dep = item
            else:
                found = self._names.get(id(item))
                if found is None:
                    label = getattr(item, "__name__", repr(item))
                    raise ConfigError(
                        f"flow {self.name!r}: node {node!r} runs after {label!r}, which was not "
                        "added to this flow (add it first, or name it)",
                        node=node,
                        option="after",
                    )
                dep = found
            if dep == node:
                raise ConfigError(
                    f"flow {self.name!r}: node {node!r} cannot run after itself",
                    node=node,
                    option="after",
                )
            if dep not in names:
                names.append(dep)
        return tuple(names)

    @overload
    def node(self, fn: Callable[P, R], /) -> Node[P, R]: ...

    @overload
    def node(
        self,
        *,
        after: Any = ...,
        output: str | None = ...,
        name: str | None = ...,
        version: str | int | None = ...,
        compensate: Callable[..., Any] | None = ...,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Node[P, R]]: ...

    def node(  # type: ignore[misc]  # options may not be named fn: it is positional-only
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        after: Any = (),
        output: str | None = None,
        name: str | None = None,
        version: str | int | None = None,
        compensate: Callable[..., Any] | None = None,
        **options: Any,
    ) -> Any:
        """Decorator form of `add`: ``@flow.node`` or ``@flow.node(after=..., output=...)``.

        Other keyword options (`retry`, `timeout`, `effect`, `idempotency`) are `nk.node`'s.
        Returns the node, so it can be called, tested and named in a later `after=`.
        """

        def decorate(target: Callable[..., Any]) -> Any:
            made: Any = target
            if options:
                if isinstance(getattr(target, "spec", None), NodeSpec):
                    made = typing.cast(Any, target).options(**options)
                else:
                    made = as_node(target, name, options)
            return self.add(
                made, after=after, output=output, name=name, version=version, compensate=compensate
            )

        return decorate(fn) if fn is not None else decorate

    def route(
        self,
        *,
        after: Any,
        to: Callable[[Any], Any],
        targets: Any = None,
        name: str | None = None,
    ) -> None:
        """After `after` completes, run the node(s) that ``to(state)`` returns, or none.

        ``to`` (sync or async) receives the state as a node's ``state`` parameter does and
        returns a node (or its name), a list of them, or `nk.END`. `targets` declares what
        it may return: a list of nodes (`nk.END` included), or a mapping from what it
        returns to nodes (LangGraph's ``path_map``); without `targets`, the names of a
        ``Literal[...]`` return annotation. A target does not start with the run: it runs
        each time a route picks it, and, with ``after=`` nodes, once they all completed
        (the way into a loop). Loops go through routes only (an ``after=`` cycle stays a
        `ConfigError`) and are bounded by ``Flow(max_steps=...)``. A durable run journals
        each decision: a resume takes the same path. Unknown nodes or targets are a
        `ConfigError` when the flow is checked; a returned node outside `targets` fails
        the run with a `FlowError` naming the route. `name` (default: the function's name)
        tells two routes after one node apart.
        """
        route = declare(self.name, self._names, self._routes, after, to, targets, name)
        self._routes.append(route)
        self._plan = None

    # ------------------------------------------------------------------ compiling

    def _compile(self) -> Plan:
        plan = self._plan
        if plan is None:
            routes = self._routes
            edges = check_routes(self.name, routes, self._entries) if routes else ()
            plan = compile_plan(self, list(self._entries.values()), edges)
            plan.subflows = any(
                getattr(entry.call, "subflow", None) is not None for entry in self._entries.values()
            )
            if routes:
                plan.routes = compile_routes(self.name, plan, routes, self._names, self.max_steps)
                plan.routes.subflows = plan.subflows
            compile_compensations(self, plan, self._entries)
            self._plan = plan
        return plan

    def check(self, state: Any = None) -> None:
        """Raise `ConfigError` for anything a run would refuse before running a node.

        Unknown dependencies, cycles, two unordered nodes declaring one output without a
        reducer, and parameters that match no state field (of `state`, for a dict flow),
        resource (the flow's or an active `nk.use`) or default; `state`, if given, is
        validated as a run would. Every run makes the same checks.
        """
        plan = self._compile()
        values = {} if state is None else self._schema.initial(state)[0]
        resolve_binds(self, plan, values)
        check_compensations(self, plan, values)

    # ------------------------------------------------------------------ sync mode

    def run(
        self,
        state: S | Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        store: Any = None,
    ) -> S:
        """Run the flow in the calling thread, in dependency order; returns the final state.

        Async nodes run on a private event loop (in a helper thread if this thread already
        runs a loop). `run_id` names the run (nodes see it as ``nk.context().run_id``);
        with `store` (a store or a URL) the run is durable: each node's update is journaled,
        and running the same `run_id` again resumes. Raises `FlowError` if a node fails.
        """
        steps = self._steps(state, run_id, store)
        try:
            while True:
                next(steps)
        except StopIteration as done:
            final: S = done.value
            return final

    @overload
    def stream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["events"] = ...,
        run_id: str | None = ...,
        store: Any = ...,
    ) -> Generator[_events.Event, None, None]: ...

    @overload
    def stream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["updates"],
        run_id: str | None = ...,
        store: Any = ...,
    ) -> Generator[dict[str, dict[str, Any]], None, None]: ...

    @overload
    def stream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["values"],
        run_id: str | None = ...,
        store: Any = ...,
    ) -> Generator[S, None, None]: ...

    def stream(
        self,
        state: S | Mapping[str, Any] | None = None,
        *,
        mode: Mode = "events",
        run_id: str | None = None,
        store: Any = None,
    ) -> Generator[Any, None, None]:
        """Run the flow as `run` does, yielding as it goes what `mode` asks for.

        ``"events"`` (default): the run's own events (`flow.*`, `node.*`, `idempotency.*` and
        the nodes' ``node.progress`` with this run's id), the same objects every sink
        receives, as they happen; the last is ``flow.finished`` (its ``state`` field holds the
        final state) or ``flow.failed``. ``"updates"``: ``{node: update}`` for each node that
        completed (replayed ones of a resumed run too; ``{}`` when it changed nothing).
        ``"values"``: a copy of the whole state after each node, the final state last. A
        failed run raises its `FlowError` at the end in every mode. The flow runs in a worker
        thread (in a copy of this context), one node per request for more: closing the
        stream early starts no other node, waits for the one in progress and abandons the
        run (a durable run can be resumed).
        """
        check_mode(self.name, mode)
        rid = run_id or new_run_id()
        return stream_sync(lambda: self._steps(state, rid, store), rid, mode)

    def _steps(self, state: Any, run_id: str | None, store: Any) -> Generator[None, None, Any]:
        """The sync driver: a generator that runs one node per step, returning the state."""
        # compiled on the first step, like everything else a run checks (see `stream`)
        return (yield from drive_flow_sync(self, self._compile(), state, run_id, store))

    # ------------------------------------------------------------------ async mode

    async def arun(
        self,
        state: S | Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        store: Any = None,
    ) -> S:
        """Run the flow on the running event loop; returns the final state.

        Independent nodes run concurrently (at most `max_concurrency`), async nodes as tasks,
        sync nodes in worker threads (`asyncio.to_thread`), so the loop is never blocked.
        `run_id` and `store` as for `run`. Raises `FlowError` if a node fails; running
        siblings are cancelled or finish as `on_error` says (a flow with compensations lets
        them finish, to compensate them).
        """
        if store is not None and self.executor is not None:
            raise ConfigError(
                f"flow {self.name!r}: a durable run (store=) does not run its nodes on an "
                "executor; run it without store=, or build the flow without executor=",
                option="executor",
            )
        final: S = await drive_flow_async(self, self._compile(), state, run_id, store)
        return final

    @overload
    def astream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["events"] = ...,
        run_id: str | None = ...,
        store: Any = ...,
    ) -> AsyncGenerator[_events.Event, None]: ...

    @overload
    def astream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["updates"],
        run_id: str | None = ...,
        store: Any = ...,
    ) -> AsyncGenerator[dict[str, dict[str, Any]], None]: ...

    @overload
    def astream(
        self,
        state: S | Mapping[str, Any] | None = ...,
        *,
        mode: Literal["values"],
        run_id: str | None = ...,
        store: Any = ...,
    ) -> AsyncGenerator[S, None]: ...

    def astream(
        self,
        state: S | Mapping[str, Any] | None = None,
        *,
        mode: Mode = "events",
        run_id: str | None = None,
        store: Any = None,
    ) -> AsyncGenerator[Any, None]:
        """Run the flow as `arun` does and yield what `mode` asks for as it happens (see
        `stream`); closing it early cancels the run."""
        check_mode(self.name, mode)
        rid = run_id or new_run_id()
        return stream_async(lambda: self.arun(state, run_id=rid, store=store), rid, mode)


def _check_max_steps(name: str, max_steps: Any) -> int | None:
    """`max_steps` as `Flow` accepts it (a positive int, or None: the default), else a
    `ConfigError`."""
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ConfigError(
            f"flow {name!r}: max_steps must be a positive int or None, got {max_steps!r}",
            option="max_steps",
        )
    return max_steps


def _check_concurrency(name: str, max_concurrency: Any, on_error: Any) -> None:
    """`max_concurrency` and `on_error` as `Flow` accepts them, else a `ConfigError`."""
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or max_concurrency < 1
    ):
        raise ConfigError(
            f"flow {name!r}: max_concurrency must be a positive int or None, got "
            f"{max_concurrency!r}",
            option="max_concurrency",
        )
    if on_error not in _ON_ERROR:
        raise ConfigError(
            f"flow {name!r}: on_error must be 'cancel' or 'finish', got {on_error!r}",
            option="on_error",
        )


def _factories(
    name: str, resources: Mapping[str, Callable[[], Any]] | None
) -> dict[str, Callable[[], Any]]:
    """The flow's resource factories, by name, each checked."""
    factories: dict[str, Callable[[], Any]] = {}
    for key, factory in (resources or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(
                f"flow {name!r}: resource name {key!r} is not an identifier", option=str(key)
            )
        if not callable(factory):
            raise ConfigError(
                f"flow {name!r}: resource {key!r} must be a factory (a zero-argument "
                f"callable), got {factory!r}; to pass a ready value use `lambda: value` "
                "or `with nk.use(...)` around the run",
                option=key,
            )
        factories[key] = factory
    return factories
