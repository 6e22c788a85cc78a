"""`Flow`: nodes, their dependencies, a state, run in sync or async mode.

The flow is a builder (`add`, `node`) and a runner (`run`, `stream`, `arun`, `astream`):
compiling its nodes into a plan is `_graph`'s, the state's validation `_schema`'s, one run's
state `_run`'s, driving it `_scheduler`'s and journaling a durable run `_journal`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import typing
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from datetime import timedelta
from typing import Any, Literal, ParamSpec, TypeVar, overload

from .. import _events
from .._context import new_run_id
from .._errors import ConfigError
from .._node import Node, NodeSpec
from .._policies import Seconds, seconds
from ._graph import Entry, Plan, as_node, compile_plan, resolve_binds
from ._scheduler import drive_flow_async, drive_flow_sync
from ._schema import Schema

__all__ = ["Flow"]

P = ParamSpec("P")
R = TypeVar("R")

_ON_ERROR = ("cancel", "finish")
_DEFAULT_TTL = timedelta(days=7)


class Flow:
    """Nodes with dependencies over a shared state, run in sync or async mode.

    ``Flow(name, state=None)``: `state` is None (a plain dict), a `TypedDict` or a pydantic
    model class. `max_concurrency` bounds the nodes running at once in async mode.
    `on_error` says what happens to nodes still running when one fails in async mode:
    ``"cancel"`` (default) cancels them, ``"finish"`` lets them finish and keeps their
    updates; no new node starts either way. `resources` maps names to zero-argument factories
    called at the start of every run (a context manager, sync or async, is entered and closed
    at the end; any other value is used as it is). `reducers` maps a field to
    ``fn(old, update) -> new``. Durable runs: `lease` is how long a crashed run's node blocks a
    resume (renewed while the node runs; default: the node's time budget, else 60 s), `ttl`
    how long the journal is kept (default 7 days); `strict=True` refuses to resume from a
    journal older than a node's TTL instead of warning.
    """

    def __init__(
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
        self._entries: dict[str, Entry] = {}
        self._names: dict[int, str] = {}
        self._plan: Plan | None = None

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, nodes={list(self._entries)})"

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node names, in the order they were added."""
        return tuple(self._entries)

    # ------------------------------------------------------------------ building

    def add(
        self,
        node: Callable[P, R],
        /,
        *,
        after: Any = (),
        output: str | None = None,
        name: str | None = None,
        version: str | int | None = None,
    ) -> Node[P, R]:
        """Add a node (or a plain function, wrapped with `nk.node` defaults); returns the node.

        `after` lists the nodes this one runs after (node objects or names; a single one
        needs no list). `output` stores the node's return value under that state field.
        `name` defaults to the node's explicit name, else the function's ``__name__``; it is
        what `after`, events and the journal use. Bumping `version` makes a durable resume
        run the node again instead of replaying it.
        """
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
        deps = self._dependencies(step_name, after)
        self._entries[step_name] = Entry(
            step_name, call, spec, deps, output, version, len(self._entries)
        )
        self._names[id(call)] = step_name
        self._names.setdefault(id(node), step_name)
        self._names.setdefault(id(spec.fn), step_name)
        self._plan = None
        return typing.cast(Node[P, R], call)

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
            return self.add(made, after=after, output=output, name=name, version=version)

        return decorate(fn) if fn is not None else decorate

    # ------------------------------------------------------------------ compiling

    def _compile(self) -> Plan:
        plan = self._plan
        if plan is None:
            plan = self._plan = compile_plan(self, list(self._entries.values()))
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

    # ------------------------------------------------------------------ sync mode

    def run(self, state: Any = None, *, run_id: str | None = None, store: Any = None) -> Any:
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
            return done.value

    def stream(
        self, state: Any = None, *, run_id: str | None = None, store: Any = None
    ) -> Iterator[_events.Event]:
        """Run the flow as `run` does, node by node as it is iterated, yielding its events.

        The events are the run's own (`flow.*`, `node.*`, `idempotency.*` with this run's
        id), the same objects every sink receives. The last is ``flow.finished`` (its
        ``state`` field holds the final state) or ``flow.failed``, after which the
        `FlowError` is raised. Closing the iterator early abandons the run (a durable run can
        be resumed).
        """
        rid = run_id or new_run_id()
        buffer: deque[_events.Event] = deque()

        def sink(event: _events.Event) -> None:
            if event.run_id == rid:
                buffer.append(event)

        context = contextvars.copy_context()
        remove = _events.add_sink(sink)
        steps = context.run(self._steps, state, rid, store)
        try:
            while True:
                try:
                    context.run(next, steps)
                except StopIteration:
                    break
                except BaseException:
                    while buffer:
                        yield buffer.popleft()
                    raise
                while buffer:
                    yield buffer.popleft()
            while buffer:
                yield buffer.popleft()
        finally:
            remove()
            context.run(steps.close)

    def _steps(self, state: Any, run_id: str | None, store: Any) -> Generator[None, None, Any]:
        """The sync driver: a generator that runs one node per step, returning the state."""
        # compiled on the first step, like everything else a run checks (see `stream`)
        return (yield from drive_flow_sync(self, self._compile(), state, run_id, store))

    # ------------------------------------------------------------------ async mode

    async def arun(self, state: Any = None, *, run_id: str | None = None, store: Any = None) -> Any:
        """Run the flow on the running event loop; returns the final state.

        Independent nodes run concurrently (at most `max_concurrency`), async nodes as tasks,
        sync nodes in worker threads (`asyncio.to_thread`), so the loop is never blocked.
        `run_id` and `store` as for `run`. Raises `FlowError` if a node fails; running
        siblings are cancelled or finish as `on_error` says.
        """
        return await drive_flow_async(self, self._compile(), state, run_id, store)

    async def astream(
        self, state: Any = None, *, run_id: str | None = None, store: Any = None
    ) -> AsyncIterator[_events.Event]:
        """Run the flow as `arun` does and yield its events as they happen (see `stream`)."""
        rid = run_id or new_run_id()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def sink(event: _events.Event) -> None:
            if event.run_id == rid:
                # events come from worker threads too: hand them to the loop in order
                loop.call_soon_threadsafe(queue.put_nowait, event)

        remove = _events.add_sink(sink)
        task = loop.create_task(self.arun(state, run_id=rid, store=store))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, end))
        try:
            while True:
                item = await queue.get()
                if item is end:
                    break
                yield item
            await task
        finally:
            remove()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):  # the consumer stopped listening
                    await task


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
