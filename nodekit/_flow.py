"""The flow runner: nodes, their dependencies, a state, run in sync or async mode.

Everything that can be decided before a run is decided once, when the flow is first run or
checked (`Flow.check`): the dependency graph (unknown dependencies, cycles), a canonical
topological order (declaration order wherever dependencies allow), each node's binding plan
(which parameter takes the whole state, a state field or a resource), the ancestors of every
node as a bit mask, and which declared outputs two unordered nodes both write. A run then
binds, calls, merges and moves on; events are built only when someone listens.

State is a dict (``state=None``), a `TypedDict` or a pydantic model, validated on the way in
and after every update; the state is never mutated in place (each update makes a new dict or
model), so a node always sees the state as it stood when it started, and an update that fails
validation changes nothing. A field with a reducer (``Annotated[list[int], operator.add]``,
or ``Flow(reducers={"field": fn})``) combines every update with the value before it; at the
end of an async run the reducers are folded again in the flow's canonical order, so the final
state does not depend on which of two parallel nodes finished first.

Durable runs (``store=``) journal each node's update, as canonical JSON, through the
idempotency store protocol, after the node succeeds and before any dependant starts (rule 31);
running the same ``run_id`` again replays what was journaled and runs the rest (rule 32).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import inspect
import json
import threading
import time
import typing
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from . import _context, _events
from ._context import _LOG_RUN, NodeContext, Resource, has_resource, lookup_slot, new_run_id
from ._errors import ConfigError, FlowError, IdempotencyInProgress, IdempotencyLeaseLost
from ._events import emit, observed, short_error
from ._map import LoopRunner
from ._node import (
    Node,
    NodeSpec,
    _build,
    call_in_context_async,
    call_in_context_sync,
    new_context,
)
from ._policies import Seconds, seconds
from .idempotency._policy import NodekitWarning, default_lease

if TYPE_CHECKING:
    from .idempotency._store import Acquisition, Record, RecordKey

__all__ = ["Flow"]

P = ParamSpec("P")
R = TypeVar("R")

_FIELD, _STATE, _RESOURCE = 0, 1, 2
_UNTYPED, _TYPEDDICT, _MODEL = "dict", "TypedDict", "model"
_ON_ERROR = ("cancel", "finish")
_HEADER_LEASE = 2.0
_DEFAULT_TTL = timedelta(days=7)
_FAIL = object()


class _Problem(Exception):
    """Internal: why a node's step failed other than by raising (never escapes the module)."""

    def __init__(self, message: str, field: str | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.cause = cause


def _error_field(exc: BaseException) -> str | None:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            loc = errors()[0]["loc"]
        except Exception:
            return None
        if loc:
            return str(loc[0])
    return None


# ---------------------------------------------------------------------------- state schema


class _Schema:
    """What a flow knows about its state: kind, fields, reducers, validation and its codec."""

    __slots__ = ("_adapters", "annotations", "cls", "extra", "fields", "flow", "kind", "reducers")

    def __init__(
        self, flow: str, state: Any, reducers: Mapping[str, Callable[[Any, Any], Any]] | None
    ) -> None:
        self.flow = flow
        self.cls = state
        self.extra = False
        self._adapters: dict[str, Any] = {}
        found: dict[str, Callable[[Any, Any], Any]] = {}
        if state is None:
            self.kind = _UNTYPED
            self.fields: frozenset[str] | None = None
            self.annotations: dict[str, Any] = {}
        elif isinstance(state, type) and typing.is_typeddict(state):
            self.kind = _TYPEDDICT
            self.annotations = typing.get_type_hints(state, include_extras=True)
            self.fields = frozenset(self.annotations)
            for name, hint in self.annotations.items():
                reducer = _reducer_in(getattr(hint, "__metadata__", ()))
                if reducer is not None:
                    found[name] = reducer
        elif (
            isinstance(state, type)
            and hasattr(state, "model_fields")
            and hasattr(state, "model_validate")
        ):
            self.kind = _MODEL
            infos = state.model_fields
            self.annotations = dict(infos)
            self.fields = frozenset(infos)
            self.extra = (getattr(state, "model_config", {}) or {}).get("extra") == "allow"
            for name, info in infos.items():
                reducer = _reducer_in(info.metadata)
                if reducer is not None:
                    found[name] = reducer
        else:
            raise ConfigError(
                f"flow {flow!r}: state must be None (a dict), a TypedDict or a pydantic model "
                f"class, got {state!r}",
                option="state",
            )
        for name, reducer in (reducers or {}).items():
            if not callable(reducer):
                raise ConfigError(
                    f"flow {flow!r}: the reducer of field {name!r} must be a callable "
                    f"(old, update) -> new, got {reducer!r}",
                    option=name,
                )
            if self.fields is not None and name not in self.fields:
                raise ConfigError(
                    f"flow {flow!r}: reducers names field {name!r}, which the state does not "
                    f"have (fields: {sorted(self.fields)})",
                    option=name,
                )
            found[name] = reducer
        self.reducers = found

    # ------------------------------------------------------------------ validation

    def initial(self, state: Any) -> tuple[dict[str, Any], Any]:
        """Validate the input state: (values by field, the public state object)."""
        if self.kind == _MODEL:
            cls = self.cls
            if state is None:
                data: Any = {}
            elif isinstance(state, cls):
                data = {**(state.__pydantic_extra__ or {}), **state.__dict__}
            elif isinstance(state, Mapping):
                data = dict(state)
            else:
                raise ConfigError(
                    f"flow {self.flow!r}: the input state must be a {cls.__qualname__} or a "
                    f"dict, got {type(state).__qualname__}",
                    option="state",
                )
            model = cls.model_validate(data, by_name=True)
            return model.__dict__, model
        if state is None:
            values: dict[str, Any] = {}
        elif isinstance(state, Mapping):
            values = dict(state)
        else:
            raise ConfigError(
                f"flow {self.flow!r}: the input state must be a dict, got {type(state).__qualname__}",
                option="state",
            )
        if self.kind == _TYPEDDICT:
            # field by field: pydantic validates a whole typing.TypedDict only on 3.12+
            assert self.fields is not None
            unknown = sorted(set(values) - self.fields)
            missing = sorted(set(self.cls.__required_keys__) - set(values))
            if unknown or missing:
                raise ConfigError(
                    f"flow {self.flow!r}: the input state "
                    + (f"lacks required field(s) {missing}" if missing else "")
                    + (" and " if unknown and missing else "")
                    + (f"has unknown field(s) {unknown}" if unknown else ""),
                    option=(missing or unknown)[0],
                )
            values = {key: self.adapter(key).validate_python(v) for key, v in values.items()}
        return values, values

    def adapter(self, field: str) -> Any:
        """The field's TypeAdapter (typed states only), built on first use."""
        adapter = self._adapters.get(field)
        if adapter is None:
            if self.fields is None or field not in self.fields:
                return None
            from pydantic import TypeAdapter

            hint = self.annotations[field]
            if self.kind == _MODEL:
                hint = hint.rebuild_annotation()
            adapter = self._adapters[field] = TypeAdapter(hint)
        return adapter

    def any_adapter(self) -> Any:
        adapter = self._adapters.get("$any")
        if adapter is None:
            from pydantic import TypeAdapter

            adapter = self._adapters["$any"] = TypeAdapter(Any)
        return adapter

    def merge(
        self, values: dict[str, Any], public: Any, update: Mapping[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """The state after `update` (reducers applied, validated); raises `_Problem`."""
        fields = self.fields
        reducers = self.reducers
        if self.kind == _MODEL and public.__pydantic_extra__:
            new = {**public.__pydantic_extra__, **values}
        else:
            new = values.copy()
        for key, value in update.items():
            if fields is not None and key not in fields and not self.extra:
                raise _Problem(
                    f"it updates field {key!r}, which the state does not have "
                    f"(fields: {sorted(fields)})",
                    key,
                )
            if reducers:
                reducer = reducers.get(key)
                if reducer is not None and key in new:
                    try:
                        value = reducer(new[key], value)
                    except Exception as exc:
                        raise _Problem(
                            f"the reducer of field {key!r} failed: {short_error(exc)}", key, exc
                        ) from exc
            new[key] = value
        if self.kind == _UNTYPED:
            return new, new
        if self.kind == _TYPEDDICT:
            for key in update:
                try:
                    new[key] = self.adapter(key).validate_python(new[key])
                except Exception as exc:
                    raise _Problem(
                        f"it returned an invalid value for field {key!r}: {short_error(exc, 400)}",
                        key,
                        exc,
                    ) from exc
            return new, new
        try:
            model = self.cls.model_validate(new, by_name=True)
        except Exception as exc:
            field = _error_field(exc)
            if field is None and len(update) == 1:
                field = next(iter(update))
            raise _Problem(
                f"it returned an invalid update for field {field!r}: {short_error(exc, 400)}",
                field,
                exc,
            ) from exc
        return model.__dict__, model

    def revalidate(
        self, values: dict[str, Any], public: Any, keys: Iterable[str]
    ) -> tuple[dict[str, Any], Any]:
        """Validate a state whose reducer fields `keys` were folded again (async runs)."""
        if self.kind == _UNTYPED:
            return values, values
        if self.kind == _TYPEDDICT:
            for key in keys:
                values[key] = self.adapter(key).validate_python(values[key])
            return values, values
        model = self.cls.model_validate(
            {**(public.__pydantic_extra__ or {}), **values}, by_name=True
        )
        return model.__dict__, model

    def view(self, values: dict[str, Any], public: Any) -> Any:
        """What a node's ``state`` parameter receives: the model, or a read-only mapping."""
        return public if self.kind == _MODEL else MappingProxyType(values)

    # ------------------------------------------------------------------ fingerprints, journal

    def fingerprint_json(self, values: dict[str, Any], public: Any) -> Any:
        """The input state as JSON data, for the durable run's input fingerprint."""
        from .idempotency._keys import canonical

        if self.kind == _MODEL:
            return public.model_dump(mode="json")
        if self.kind == _TYPEDDICT:
            return {k: self.adapter(k).dump_python(v, mode="json") for k, v in values.items()}
        return canonical(values)

    def _round_trip(self, adapter: Any, value: Any) -> Any:
        try:
            data = adapter.dump_python(value, mode="json", warnings="error")
            back = adapter.validate_json(json.dumps(data, allow_nan=False))
        except Exception:
            return _FAIL
        if type(back) is not type(value) or back != value:
            return _FAIL
        return data

    def encode(self, update: Mapping[str, Any], values: dict[str, Any]) -> str:
        """A journal entry: the update as canonical JSON that decodes to equal, typed values.

        Fields without a reducer are journaled as validated (`values`, the state after the
        update); a reducer field's contribution as the node returned it. A value that would
        not come back equal in value and type is refused (`_Problem`): a resume must replay
        exactly what the node returned.
        """
        out: dict[str, Any] = {}
        untyped: list[str] = []
        for key, raw in update.items():
            value = raw if key in self.reducers or key not in values else values[key]
            adapter = self.adapter(key)
            data = _FAIL if adapter is None else self._round_trip(adapter, value)
            if data is _FAIL:
                data = self._round_trip(self.any_adapter(), value)
                if data is _FAIL:
                    raise _Problem(
                        f"its update of field {key!r} (a {type(value).__qualname__}) cannot be "
                        "journaled: it does not survive JSON unchanged in value and type. "
                        "Declare the field's type on a TypedDict or pydantic state, or return "
                        "JSON-friendly values",
                        key,
                    )
                untyped.append(key)
            out[key] = data
        return json.dumps(
            {"any": sorted(untyped), "update": out},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )

    def decode(self, text: str) -> dict[str, Any]:
        """The update a journal entry holds; raises `_Problem` when it no longer decodes."""
        key: str | None = None
        try:
            data = json.loads(text)
            untyped = set(data["any"])
            update: dict[str, Any] = {}
            for key, value in data["update"].items():
                adapter = None if key in untyped else self.adapter(key)
                adapter = adapter or self.any_adapter()
                update[key] = adapter.validate_json(json.dumps(value))
        except Exception as exc:
            raise _Problem(
                f"its journaled update no longer decodes ({short_error(exc, 300)})",
                key,
                exc,
            ) from exc
        return update


def _reducer_in(metadata: Iterable[Any]) -> Callable[[Any, Any], Any] | None:
    for item in metadata:
        if callable(item) and not isinstance(item, type):
            return typing.cast(Callable[[Any, Any], Any], item)
    return None


# ---------------------------------------------------------------------------- plan


class _Entry:
    """A node as added to the flow (before the flow is compiled)."""

    __slots__ = ("after", "call", "decl", "name", "output", "spec", "version")

    def __init__(
        self,
        name: str,
        call: Any,
        spec: NodeSpec,
        after: tuple[str, ...],
        output: str | None,
        version: str | int | None,
        decl: int,
    ) -> None:
        self.name = name
        self.call = call
        self.spec = spec
        self.after = after
        self.output = output
        self.version = version
        self.decl = decl


class _Step:
    """One node of a compiled flow: everything a run needs, decided once."""

    __slots__ = (
        "ancestors",
        "binds",
        "call",
        "candidates",
        "dependants",
        "deps",
        "index",
        "is_async",
        "lease",
        "name",
        "namespace",
        "needs",
        "open_writes",
        "output",
        "positional",
        "spec",
        "ttl",
        "undeclared_upstream",
        "version",
    )

    def __init__(self, entry: _Entry, index: int) -> None:
        self.name = entry.name
        self.index = index
        self.call = entry.call
        self.spec = entry.spec
        self.is_async = entry.spec.is_async
        self.output = entry.output
        self.version = entry.version
        self.namespace = (
            f"{entry.name}@v{entry.version}" if entry.version is not None else entry.name
        )
        self.deps: tuple[int, ...] = ()
        self.dependants: tuple[int, ...] = ()
        self.ancestors = 0
        # (param, kind, key, optional): kind _FIELD / _STATE / _RESOURCE
        self.binds: tuple[tuple[str, int, str, bool], ...] = ()
        # parameters resolved per run: (param, has_default)
        self.candidates: tuple[tuple[str, bool], ...] = ()
        self.positional: tuple[str, ...] = ()
        self.needs: tuple[tuple[str, str], ...] = entry.spec.resources
        self.open_writes = entry.output is None
        self.undeclared_upstream = False
        self.lease = 60.0
        self.ttl: float | None = None

    def __repr__(self) -> str:
        return f"<flow step {self.name!r} #{self.index}>"


class _Plan:
    __slots__ = ("journal", "order", "outputs", "static")

    def __init__(self, order: list[_Step], outputs: frozenset[str]) -> None:
        self.order = order
        self.outputs = outputs
        # a durable run's run-independent fingerprints (graph, nodes), computed on first use
        self.journal: tuple[str, list[str]] | None = None
        # nothing to resolve per run: no parameter depends on the input or on nk.use()
        self.static = all(not step.candidates and not step.needs for step in order)


# ---------------------------------------------------------------------------- the flow


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
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self._schema = _Schema(name, state, reducers)
        self._resources: dict[str, Callable[[], Any]] = {}
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
            self._resources[key] = factory
        self.lease = seconds(lease, node=label, option="lease")
        ttl_s = seconds(ttl, node=label, option="ttl", allow_none=False)
        assert ttl_s is not None
        self.ttl = ttl_s
        self.strict = bool(strict)
        self._entries: dict[str, _Entry] = {}
        self._names: dict[int, str] = {}
        self._plan: _Plan | None = None

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
            call = _as_node(node, name, {})
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
        deps = self._dependencies(step_name, after)
        self._entries[step_name] = _Entry(
            step_name, call, spec, deps, output, version, len(self._entries)
        )
        self._names[id(call)] = step_name
        self._names.setdefault(id(node), step_name)
        self._names.setdefault(id(spec.fn), step_name)
        self._plan = None
        return typing.cast(Node[P, R], call)

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
                    made = _as_node(target, name, options)
            return self.add(made, after=after, output=output, name=name, version=version)

        return decorate(fn) if fn is not None else decorate

    # ------------------------------------------------------------------ compiling

    def _compile(self) -> _Plan:
        plan = self._plan
        if plan is not None:
            return plan
        entries = list(self._entries.values())
        index = {entry.name: i for i, entry in enumerate(entries)}
        deps: list[list[int]] = []
        for entry in entries:
            found = []
            for dep in entry.after:
                if dep not in index:
                    raise ConfigError(
                        f"flow {self.name!r}: node {entry.name!r} runs after {dep!r}, which is "
                        f"not a node of this flow (nodes: {list(index)})",
                        node=entry.name,
                        option="after",
                    )
                found.append(index[dep])
            deps.append(found)
        # Kahn's algorithm; ties broken by declaration order: the canonical order
        waiting = [len(d) for d in deps]
        dependants: list[list[int]] = [[] for _ in entries]
        for i, d in enumerate(deps):
            for j in d:
                dependants[j].append(i)
        heap = [i for i, count in enumerate(waiting) if count == 0]
        heapq.heapify(heap)
        order: list[int] = []
        while heap:
            i = heapq.heappop(heap)
            order.append(i)
            for j in dependants[i]:
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(heap, j)
        if len(order) < len(entries):
            cycle = _find_cycle(deps, [i for i, count in enumerate(waiting) if count > 0])
            names = " -> ".join(entries[i].name for i in cycle)
            raise ConfigError(
                f"flow {self.name!r}: dependency cycle {names}",
                node=entries[cycle[0]].name,
                option="after",
            )
        position = {decl: pos for pos, decl in enumerate(order)}
        steps = [_Step(entries[decl], pos) for pos, decl in enumerate(order)]
        for step, decl in zip(steps, order, strict=True):
            step.deps = tuple(sorted(position[j] for j in deps[decl]))
            step.dependants = tuple(sorted(position[j] for j in dependants[decl]))
        for step in steps:  # canonical order: every dependency's mask is complete already
            mask = 0
            for pos in step.deps:
                mask |= steps[pos].ancestors | (1 << pos)
                if steps[pos].open_writes or steps[pos].undeclared_upstream:
                    step.undeclared_upstream = True
            step.ancestors = mask
        outputs = frozenset(step.output for step in steps if step.output is not None)
        self._check_writers(steps)
        for step in steps:
            self._bind_plan(step, outputs)
            step.lease = self.lease or default_lease(step.spec)
            plan_idem = step.spec.idempotency
            step.ttl = getattr(plan_idem, "ttl", None) if plan_idem is not None else None
        plan = self._plan = _Plan(steps, outputs)
        return plan

    def _check_writers(self, steps: list[_Step]) -> None:
        by_field: dict[str, list[_Step]] = {}
        for step in steps:
            if step.output is not None and step.output not in self._schema.reducers:
                by_field.setdefault(step.output, []).append(step)
        for field, writers in by_field.items():
            for i, first in enumerate(writers):
                for second in writers[i + 1 :]:
                    if not (second.ancestors >> first.index) & 1:
                        raise ConfigError(
                            f"flow {self.name!r}: nodes {first.name!r} and {second.name!r} may "
                            f"run concurrently and both write field {field!r}: order them with "
                            f"after=, or give {field!r} a reducer (Flow(reducers=...) or "
                            "Annotated[..., reducer] on the state)",
                            node=second.name,
                            option=field,
                        )

    def _bind_plan(self, step: _Step, outputs: frozenset[str]) -> None:
        signature = step.spec.signature
        if signature is None:
            return
        fields = self._schema.fields
        binds: list[tuple[str, int, str, bool]] = []
        candidates: list[tuple[str, bool]] = []
        positional: list[str] = []
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if isinstance(param.default, Resource):
                continue  # the node injects its own nk.resource() parameters
            optional = param.default is not param.empty
            if param.kind is param.POSITIONAL_ONLY:
                positional.append(param.name)
            name = param.name
            if name == "state":
                binds.append((name, _STATE, name, False))
            elif (fields is not None and name in fields) or (fields is None and name in outputs):
                binds.append((name, _FIELD, name, optional))
            elif fields is not None and name in self._resources:
                binds.append((name, _RESOURCE, name, False))
            else:
                candidates.append((name, optional))
        step.binds = tuple(binds)
        step.candidates = tuple(candidates)
        step.positional = tuple(positional)

    def _resolve(
        self, plan: _Plan, values: Mapping[str, Any]
    ) -> list[tuple[tuple[str, int, str, bool], ...]]:
        """Per-run binding: parameters that depend on the input or the active resources."""
        untyped = self._schema.fields is None
        result = []
        for step in plan.order:
            for param, resource in step.needs:
                if resource not in self._resources and not has_resource(resource):
                    raise ConfigError(
                        f"flow {self.name!r}: node {step.name!r}: resource {resource!r} "
                        f"(parameter {param!r}) is not provided: pass it in Flow(resources=...) "
                        f"or run the flow inside `with nk.use({resource}=...)`",
                        node=step.name,
                        option=param,
                    )
            if not step.candidates:
                result.append(step.binds)
                continue
            binds = list(step.binds)
            for param, optional in step.candidates:
                if untyped and param in values:
                    binds.append((param, _FIELD, param, optional))
                elif param in self._resources or has_resource(param):
                    binds.append((param, _RESOURCE, param, False))
                elif optional:
                    continue
                elif untyped and step.undeclared_upstream:
                    binds.append((param, _FIELD, param, False))  # checked when the node runs
                else:
                    where = (
                        "the input state, any node's output="
                        if untyped
                        else f"the state's fields {sorted(self._schema.fields or ())}"
                    )
                    raise ConfigError(
                        f"flow {self.name!r}: node {step.name!r}: parameter {param!r} matches "
                        f"no state field ({where}), resource or default",
                        node=step.name,
                        option=param,
                    )
            result.append(tuple(binds))
        return result

    def check(self, state: Any = None) -> None:
        """Raise `ConfigError` for anything a run would refuse before running a node.

        Unknown dependencies, cycles, two unordered nodes declaring one output without a
        reducer, and parameters that match no state field (of `state`, for a dict flow),
        resource (the flow's or an active `nk.use`) or default; `state`, if given, is
        validated as a run would. Every run makes the same checks.
        """
        plan = self._compile()
        values = {} if state is None else self._schema.initial(state)[0]
        self._resolve(plan, values)

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
        plan = self._compile()
        run = _Run(self, plan, run_id or new_run_id(), asynchronous=False)
        run.start(state)
        journal = _Journal(self, run, store) if store is not None else None
        t_run = _context.set_run_id(run.run_id)
        t_log = _LOG_RUN.set(run.run_id)
        exits: list[Callable[..., Any]] = []
        try:
            run.provide_sync(exits)
            run.started(journal is not None)
            if journal is not None:
                journal.open_sync()
                for step in plan.order:
                    journal.step_sync(step)
                    yield
            else:
                for step in plan.order:
                    run.step_sync(step)
                    yield
            return run.finish()
        except BaseException as exc:
            run.aborted(exc)
            raise
        finally:
            try:
                run.close_loop()
                if journal is not None:
                    journal.close_sync()
            finally:
                _close_sync(exits)
                _LOG_RUN.reset(t_log)
                _context.reset_run_id(t_run)

    # ------------------------------------------------------------------ async mode

    async def arun(self, state: Any = None, *, run_id: str | None = None, store: Any = None) -> Any:
        """Run the flow on the running event loop; returns the final state.

        Independent nodes run concurrently (at most `max_concurrency`), async nodes as tasks,
        sync nodes in worker threads (`asyncio.to_thread`), so the loop is never blocked.
        `run_id` and `store` as for `run`. Raises `FlowError` if a node fails; running
        siblings are cancelled or finish as `on_error` says.
        """
        plan = self._compile()
        run = _Run(self, plan, run_id or new_run_id(), asynchronous=True)
        run.start(state)
        journal = _Journal(self, run, store) if store is not None else None
        t_run = _context.set_run_id(run.run_id)
        t_log = _LOG_RUN.set(run.run_id)
        exits: list[Callable[..., Any]] = []
        try:
            await run.provide_async(exits)
            run.started(journal is not None)
            if journal is not None:
                await journal.open_async()
            await _Scheduler(self, run, journal).drive()
            return run.finish()
        except BaseException as exc:
            run.aborted(exc)
            raise
        finally:
            try:
                if journal is not None:
                    await journal.close_async()
            finally:
                await _close_async(exits)
                _LOG_RUN.reset(t_log)
                _context.reset_run_id(t_run)

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


def _as_node(fn: Callable[..., Any], name: str | None, options: dict[str, Any]) -> Any:
    """A plain function made a node, named after its step (else its ``__name__``)."""
    label = name or getattr(fn, "__name__", None)
    return _build(fn, {"name": label, **options} if label else dict(options))


def _find_cycle(deps: list[list[int]], stuck: list[int]) -> list[int]:
    """One dependency cycle among the nodes Kahn's algorithm could not order."""
    members = set(stuck)
    node = stuck[0]
    seen: dict[int, int] = {}
    path: list[int] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in members)
    cycle = path[seen[node] :]
    cycle.reverse()  # dependencies first: a -> b means b runs after a
    first = cycle.index(min(cycle))  # start at the node added first
    cycle = cycle[first:] + cycle[:first]
    return [*cycle, cycle[0]]


def _close_sync(exits: list[Callable[..., Any]]) -> None:
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


async def _close_async(exits: list[Callable[..., Any]]) -> None:
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


# ---------------------------------------------------------------------------- one run


class _Run:
    """The state of one run and the decisions made on it (no I/O but the node calls)."""

    __slots__ = (
        "_loop",
        "asynchronous",
        "base",
        "binds",
        "completed",
        "contrib",
        "dirty",
        "failed_emitted",
        "flow",
        "plan",
        "public",
        "resources",
        "run_id",
        "schema",
        "t0",
        "values",
        "writers",
    )

    def __init__(self, flow: Flow, plan: _Plan, run_id: str, *, asynchronous: bool) -> None:
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
        self._loop: LoopRunner | None = None
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ start

    def start(self, state: Any) -> None:
        self.values, self.public = self.schema.initial(state)
        self.binds = (
            [step.binds for step in self.plan.order]
            if self.plan.static
            else self.flow._resolve(self.plan, self.values)
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
            elif hasattr(value, "__aenter__"):
                raise ConfigError(
                    f"flow {self.flow.name!r}: resource {name!r} is an async context manager: "
                    "run the flow with arun() or astream()",
                    option=name,
                )
            made[name] = value
        if made:
            provide = _context.use(**made)
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
            made[name] = value
        if made:
            provide = _context.use(**made)
            await provide.__aenter__()
            exits.append(provide.__aexit__)
        for name in self._bound_resources():
            self.resources[name] = await lookup_slot(self.flow.name, name).aget()

    def _bound_resources(self) -> list[str]:
        return sorted(
            {key for binds in self.binds for _, kind, key, _ in binds if kind == _RESOURCE}
        )

    def started(self, durable: bool) -> None:
        emit(
            "flow.started",
            None,
            self.run_id,
            flow=self.flow.name,
            nodes=len(self.plan.order),
            mode="async" if self.asynchronous else "sync",
            durable=durable,
        )

    # ------------------------------------------------------------------ binding

    def bind(self, step: _Step) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = self.values
        kwargs: dict[str, Any] = {}
        for param, kind, key, optional in self.binds[step.index]:
            if kind == _FIELD:
                try:
                    kwargs[param] = values[key]
                except KeyError:
                    if not optional:
                        raise _Problem(
                            f"its parameter {param!r} has no value: the state has no field "
                            f"{key!r} (no node before it wrote one)",
                            key,
                        ) from None
            elif kind == _STATE:
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

    def normalize(self, step: _Step, result: Any) -> Mapping[str, Any] | None:
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
            raise _Problem(
                f"it returned a {type(result).__qualname__}: a node returns a dict of state "
                "updates, a pydantic model, or None; declare output= to store a plain value",
                None,
                TypeError(f"node {step.name!r} returned {type(result).__qualname__}"),
            )
        for key in update:
            if not isinstance(key, str):
                raise _Problem(f"it returned an update with a non-string key {key!r}", None)
        return update

    def merge(self, step: _Step, update: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The state after `update`, validated; the writer check included. Raises `_Problem`."""
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
                    raise _Problem(
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
        step: _Step,
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
        if not replayed and not observed():
            return
        if replayed:
            emit(
                "flow.node_skipped",
                step.name,
                self.run_id,
                flow=self.flow.name,
                reason="replayed",
                updated=tuple(update or ()),
            )
        else:
            emit(
                "flow.node_finished",
                step.name,
                self.run_id,
                duration=duration,
                flow=self.flow.name,
                updated=tuple(update or ()),
            )

    def commit(self, step: _Step, result: Any, duration: float | None) -> None:
        """Apply a node's result: normalize, merge, install. Raises `_Problem`."""
        self.apply(step, self.normalize(step, result), duration)

    def apply(self, step: _Step, update: Mapping[str, Any] | None, duration: float | None) -> None:
        """Merge and install an update (None or empty: no change). Raises `_Problem`."""
        if not update:
            self.install(step, None, None, duration)
            return
        self.install(step, update, self.merge(step, update), duration)

    def node_started(self, step: _Step) -> None:
        if observed():
            emit("flow.node_started", step.name, self.run_id, flow=self.flow.name)

    # ------------------------------------------------------------------ sync step

    def step_sync(self, step: _Step) -> None:
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

    def loop(self) -> LoopRunner:
        runner = self._loop
        if runner is None:
            runner = self._loop = LoopRunner()
        return runner

    def close_loop(self) -> None:
        runner, self._loop = self._loop, None
        if runner is not None:
            runner.close()

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
        if isinstance(exc, _Problem):
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
        self.failed_emitted = True
        emit(
            "flow.failed",
            node,
            self.run_id,
            exc=cause if cause is not None else error,
            flow=self.flow.name,
            failed=node,
            completed=tuple(self.completed),
            duration=time.perf_counter() - self.t0,
        )
        return error

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
            failed=None,
            completed=tuple(self.completed),
            duration=time.perf_counter() - self.t0,
        )


# ---------------------------------------------------------------------------- async scheduler

_RESULT, _UPDATE, _REPLAY = 0, 1, 2


class _Scheduler:
    """The async driver: starts ready nodes (bounded), applies results as they finish."""

    __slots__ = ("finished", "flow", "journal", "run", "running", "wake")

    def __init__(self, flow: Flow, run: _Run, journal: _Journal | None) -> None:
        self.flow = flow
        self.run = run
        self.journal = journal
        self.running: dict[asyncio.Task[Any], _Step] = {}
        self.finished: deque[asyncio.Task[Any]] = deque()
        self.wake = asyncio.Event()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.finished.append(task)
        self.wake.set()

    async def node(self, step: _Step) -> tuple[int, Any, float]:
        """Run one node (journaled or not); returns what the main loop applies."""
        if self.journal is not None:
            return await self.journal.step_async(step)
        run = self.run
        t0 = time.perf_counter()
        args, kwargs = run.bind(step)
        run.node_started(step)
        if step.is_async:
            result = await step.call(*args, **kwargs)
        else:
            result = await asyncio.to_thread(step.call, *args, **kwargs)
        return _RESULT, result, time.perf_counter() - t0

    def apply(self, step: _Step, outcome: tuple[int, Any, float]) -> None:
        kind, payload, duration = outcome
        run = self.run
        if kind == _RESULT:
            run.commit(step, payload, duration)
        elif kind == _UPDATE:
            run.apply(step, payload, duration)
        else:
            _replay(run, step, payload)

    async def drive(self) -> None:
        run = self.run
        order = run.plan.order
        limit = self.flow.max_concurrency
        waiting = [len(step.deps) for step in order]
        ready = [step.index for step in order if not step.deps]
        heapq.heapify(ready)
        running = self.running
        failure: tuple[str | None, BaseException] | None = None
        stop_starting = False
        loop = asyncio.get_running_loop()

        def release(step: _Step) -> None:
            for index in step.dependants:
                waiting[index] -= 1
                if waiting[index] == 0:
                    heapq.heappush(ready, index)

        try:
            while True:
                if not stop_starting:
                    if not running and len(ready) == 1:
                        # a lone ready node (a chain): await it here, no task needed
                        step = order[heapq.heappop(ready)]
                        try:
                            self.apply(step, await self.node(step))
                        except Exception as exc:
                            failure = (step.name, exc)
                            break
                        release(step)
                        continue
                    while ready and (limit is None or len(running) < limit):
                        step = order[heapq.heappop(ready)]
                        task = loop.create_task(self.node(step))
                        task.add_done_callback(self._done)
                        running[task] = step
                if not running:
                    break
                await self.wake.wait()
                self.wake.clear()
                batch = sorted(self.finished, key=lambda t: running[t].index)
                self.finished.clear()
                for task in batch:
                    step = running.pop(task)
                    if task.cancelled():
                        continue
                    problem = task.exception()
                    if problem is None:
                        try:
                            self.apply(step, task.result())
                        except Exception as error:
                            problem = error
                        else:
                            if not stop_starting:
                                release(step)
                            continue
                    if not isinstance(problem, Exception):
                        raise problem
                    if failure is None:
                        failure = (step.name, problem)
                        stop_starting = True
                        if self.flow.on_error == "cancel":
                            for other in running:
                                other.cancel()
        except BaseException:
            await self._cancel_all()
            raise
        if failure is not None:
            raise run.fail(*failure)

    async def _cancel_all(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()


def _replay(run: _Run, step: _Step, update: Mapping[str, Any]) -> None:
    """Apply a journaled update without running the node (a divergence is a `_Problem`)."""
    try:
        merged = run.merge(step, update) if update else None
    except _Problem as problem:
        raise _Problem(
            f"its journaled update no longer applies to this flow's state ({problem.message}); "
            "the journal diverges from the flow: resume with the flow that wrote it, or start "
            "a new run_id",
            problem.field,
            problem.cause,
        ) from problem
    run.install(step, update or None, merged, None, replayed=True)
    emit("node.replayed", step.name, run.run_id, flow=run.flow.name, source="journal")


# ---------------------------------------------------------------------------- journal


class _Renewals:
    """The process's one daemon thread renewing the leases of running durable nodes.

    Every lease is renewed every third of its length while its node runs, so a crashed run's
    node blocks a resume for at most one lease, and a slow node never loses its entry. A
    renewal the store refuses (the lease was taken over) stops renewing that entry; the
    node's completion then fails and the run reports the lost lease. One thread serves every
    run: starting (and joining) a thread per run would cost more than the run itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[tuple[int, RecordKey], tuple[Any, str, float, float]] = {}
        self._thread: threading.Thread | None = None
        self._waking_at = float("inf")  # when the thread wakes next (inf: when told)

    def hold(self, owner: int, store: Any, key: RecordKey, token: str, lease: float) -> None:
        due = time.monotonic() + lease / 3
        with self._cond:
            self._held[(owner, key)] = (store, token, lease, due)
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._thread = threading.Thread(
                    target=self._loop, name="nodekit-flow-lease", daemon=True
                )
                self._thread.start()
            elif due < self._waking_at:  # wake the thread only if this lease is due first
                self._cond.notify()

    def drop(self, owner: int, key: RecordKey) -> None:
        with self._cond:
            self._held.pop((owner, key), None)

    def drop_all(self, owner: int) -> None:
        with self._cond:
            for entry in [entry for entry in self._held if entry[0] == owner]:
                del self._held[entry]

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._held:
                    self._waking_at = float("inf")
                    self._cond.wait()
                    continue
                entry, (store, token, lease, due) = min(
                    self._held.items(), key=lambda item: item[1][3]
                )
                delay = due - time.monotonic()
                if delay > 0:
                    self._waking_at = due
                    self._cond.wait(delay)
                    continue
                self._held[entry] = (store, token, lease, time.monotonic() + lease / 3)
            try:
                ok = store.renew(entry[1], token, lease=lease)
            except Exception:
                ok = True  # a passing store fault: try again at the next beat
            if not ok:
                self.drop(*entry)


_RENEWALS = _Renewals()


class _Renewer:
    """One durable run's view of the shared renewals: the keys it holds, dropped at close."""

    __slots__ = ("store",)

    def __init__(self, store: Any) -> None:
        self.store = store

    def hold(self, key: RecordKey, token: str, lease: float) -> None:
        _RENEWALS.hold(id(self), self.store, key, token, lease)

    def drop(self, key: RecordKey) -> None:
        _RENEWALS.drop(id(self), key)

    def close(self) -> None:
        _RENEWALS.drop_all(id(self))


class _Journal:
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
        "owned",
        "renewer",
        "run",
        "store",
    )

    def __init__(self, flow: Flow, run: _Run, store: Any) -> None:
        from .idempotency._keys import canonical_json, digest
        from .idempotency._store import RecordKey

        self.flow = flow
        self.run = run
        self.owned = isinstance(store, str)
        if self.owned:
            from .idempotency._open import open_store

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
        self.renewer = _Renewer(store)
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

    # ------------------------------------------------------------------ decisions

    def _header(self, got: Acquisition) -> str:
        """'write' (new run), 'resume', or 'wait' (another caller is writing it right now)."""
        if got.acquired:
            if got.record.epoch > 1 and not got.takeover:
                self._stale(None, "the run's journal")
            return "write"
        record = got.record
        if record.fingerprint != self.header_fp:
            raise self._diverged(record)
        if record.state == "COMPLETED":
            return "resume"
        return "wait"

    def _diverged(self, record: Record) -> _Problem:
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
        return _Problem(
            f"the journal of run {self.run.run_id!r} {what} this run: resume with the same "
            "flow and input, or start a new run_id"
        )

    def _stale(self, step: _Step | None, what: str) -> None:
        self._doubt(
            f"flow {self.flow.name!r} (run {self.run.run_id}): {what} expired (older than its "
            "TTL), so it cannot be replayed: "
            + ("the run starts again" if step is None else f"node {step.name!r} runs again")
        )

    def _doubt(self, message: str) -> None:
        """A journal that may no longer be trusted: refused (`strict=True`) or a warning."""
        if self.flow.strict:
            raise _Problem(message)
        # stacklevel: past _doubt and the check that called it, to the step being run
        warnings.warn(message, NodekitWarning, stacklevel=3)

    def _node(self, step: _Step, got: Acquisition) -> str:
        """'run', 'replay', or raises (`_Problem`: in progress elsewhere, corrupt, diverged)."""
        key, fp = self.keys[step.index]
        if got.acquired:
            if got.record.epoch > 1 and not got.takeover:
                self._stale(step, f"the journal entry of node {step.name!r}")
            if got.takeover:
                emit(
                    "idempotency.takeover",
                    step.name,
                    self.run.run_id,
                    key=key.short,
                    epoch=got.record.epoch,
                    source="journal",
                )
            return "run"
        record = got.record
        if record.fingerprint != fp:
            raise _Problem(
                f"its journal entry {key.short} belongs to another node or version; the "
                "journal diverges from the flow",
                None,
            )
        if record.state == "COMPLETED":
            if record.result is None:
                raise _Problem(f"its journal entry {key.short} has no update", None)
            ttl = step.ttl
            if ttl is not None and time.time() - record.created_at > ttl:
                self._doubt(
                    f"flow {self.flow.name!r} (run {self.run.run_id}): the journal entry of node "
                    f"{step.name!r} is older than the node's idempotency TTL ({ttl:.0f} s): its "
                    "keys may have expired downstream"
                )
            return "replay"
        emit(
            "idempotency.in_progress",
            step.name,
            self.run.run_id,
            key=key.short,
            epoch=record.epoch,
            source="journal",
        )
        raise _Problem(
            f"it is being run by another run with the same run_id (journal entry {key.short} is "
            "in progress); retry once that run ends or its lease expires",
            None,
            IdempotencyInProgress(
                f"flow {self.flow.name!r}: node {step.name!r} of run {self.run.run_id!r} is "
                "in progress elsewhere",
                node=step.name,
                key_fingerprint=key.short,
            ),
        )

    def _lost(self, step: _Step) -> _Problem:
        key = self.keys[step.index][0]
        return _Problem(
            f"it lost its journal lease (entry {key.short}) to another run before it finished; "
            "its update was not journaled",
            None,
            IdempotencyLeaseLost(
                f"flow {self.flow.name!r}: journal lease of node {step.name!r} was taken over",
                node=step.name,
                key_fingerprint=key.short,
            ),
        )

    def _prepare(self, step: _Step, result: Any) -> tuple[Mapping[str, Any] | None, Any, str]:
        run = self.run
        update = run.normalize(step, result)
        if not update:
            return None, None, run.schema.encode({}, run.values)
        merged = run.merge(step, update)
        return update, merged, run.schema.encode(update, merged[0])

    # ------------------------------------------------------------------ sync I/O

    def open_sync(self) -> None:
        deadline = time.monotonic() + _HEADER_LEASE * 2
        while True:
            got = self.store.acquire(
                self.header_key, self.header_fp, lease=_HEADER_LEASE, ttl=self.flow.ttl
            )
            try:
                outcome = self._header(got)
            except _Problem as problem:
                raise self.run.fail(None, problem)  # noqa: B904 - fail() sets the cause
            if outcome == "write":
                self.store.complete(
                    self.header_key,
                    got.record.owner_token,
                    result=self.header_text,
                    error=None,
                    ttl=self.flow.ttl,
                )
                return
            if outcome == "resume" or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def step_sync(self, step: _Step) -> None:
        run = self.run
        key, fp = self.keys[step.index]
        try:
            got = self.store.acquire(key, fp, lease=step.lease, ttl=self.flow.ttl)
            if self._node(step, got) == "replay":
                assert got.record.result is not None
                _replay(run, step, run.schema.decode(got.record.result))
                return
        except Exception as exc:
            raise run.fail(step.name, exc)  # noqa: B904 - fail() sets the cause
        record = got.record
        t0 = time.perf_counter()
        self.renewer.hold(key, record.owner_token, step.lease)
        try:
            args, kwargs = run.bind(step)
            run.node_started(step)
            if step.is_async:
                result = run.loop().run(_call_journaled_async(step, args, kwargs, record))
            else:
                result = _call_journaled_sync(step, args, kwargs, record)
            self.renewer.drop(key)
            update, merged, text = self._prepare(step, result)
        except BaseException as exc:
            self.renewer.drop(key)
            self._abandon_sync(key, record.owner_token)
            if isinstance(exc, Exception):
                raise run.fail(step.name, exc)  # noqa: B904 - fail() sets the cause
            raise
        try:
            ok = self.store.complete(
                key, record.owner_token, result=text, error=None, ttl=self.flow.ttl
            )
        except Exception as exc:
            raise run.fail(step.name, exc)  # noqa: B904 - fail() sets the cause
        if not ok:
            raise run.fail(step.name, self._lost(step))
        run.install(step, update, merged, time.perf_counter() - t0)

    def _abandon_sync(self, key: RecordKey, token: str) -> None:
        with contextlib.suppress(Exception):  # else the lease expires on its own
            self.store.release(key, token)

    def close_sync(self) -> None:
        self.renewer.close()
        if self.owned:
            self.store.close()

    # ------------------------------------------------------------------ async I/O

    async def open_async(self) -> None:
        deadline = time.monotonic() + _HEADER_LEASE * 2
        while True:
            got = await self.store.aacquire(
                self.header_key, self.header_fp, lease=_HEADER_LEASE, ttl=self.flow.ttl
            )
            try:
                outcome = self._header(got)
            except _Problem as problem:
                raise self.run.fail(None, problem)  # noqa: B904 - fail() sets the cause
            if outcome == "write":
                await self.store.acomplete(
                    self.header_key,
                    got.record.owner_token,
                    result=self.header_text,
                    error=None,
                    ttl=self.flow.ttl,
                )
                return
            if outcome == "resume" or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)

    async def step_async(self, step: _Step) -> tuple[int, Any, float]:
        run = self.run
        key, fp = self.keys[step.index]
        got = await self.store.aacquire(key, fp, lease=step.lease, ttl=self.flow.ttl)
        if self._node(step, got) == "replay":
            assert got.record.result is not None
            return _REPLAY, run.schema.decode(got.record.result), 0.0
        record = got.record
        t0 = time.perf_counter()
        self.renewer.hold(key, record.owner_token, step.lease)
        try:
            args, kwargs = run.bind(step)
            run.node_started(step)
            if step.is_async:
                result = await _call_journaled_async(step, args, kwargs, record)
            else:
                result = await asyncio.to_thread(_call_journaled_sync, step, args, kwargs, record)
            self.renewer.drop(key)
            update, _, text = self._prepare(step, result)
        except BaseException:
            self.renewer.drop(key)
            await self._abandon_async(key, record.owner_token)
            raise
        if not await self.store.acomplete(
            key, record.owner_token, result=text, error=None, ttl=self.flow.ttl
        ):
            raise self._lost(step)
        return _UPDATE, update, time.perf_counter() - t0

    async def _abandon_async(self, key: RecordKey, token: str) -> None:
        with contextlib.suppress(Exception):  # else the lease expires on its own
            await self.store.arelease(key, token)

    async def close_async(self) -> None:
        await asyncio.to_thread(self.renewer.close)
        if self.owned:
            await self.store.aclose()


def _journaled_context(step: _Step, record: Record) -> NodeContext:
    """A node's context with the journal entry as its default key.

    ``nk.context().idempotency_key`` is the journal key's digest (rule 31), so
    ``idempotency_key_for(step)`` gives downstream keys that are stable across resumes.
    A node with its own `Idempotency` uses its own key instead.
    """
    ctx = new_context(step.spec)
    ctx.idempotency_key = record.key_digest
    ctx.epoch = record.epoch
    return ctx


def _call_journaled_sync(step: _Step, args: Any, kwargs: Any, record: Record) -> Any:
    """Call a node the way its wrapper does, in its journaled context."""
    return call_in_context_sync(step.spec, _journaled_context(step, record), args, kwargs)


async def _call_journaled_async(step: _Step, args: Any, kwargs: Any, record: Record) -> Any:
    return await call_in_context_async(step.spec, _journaled_context(step, record), args, kwargs)
