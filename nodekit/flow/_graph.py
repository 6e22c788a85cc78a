"""Graph building and checks: a flow's declared nodes compiled into a plan.

Everything that can be decided before a run is decided once, when the flow is first run or
checked (`Flow.check`): the dependency graph (unknown dependencies, cycles), a canonical
topological order (declaration order wherever dependencies allow), each node's binding plan
(which parameter takes the whole state, a state field or a resource), the ancestors of every
node as a bit mask, and which declared outputs two unordered nodes both write. A run then
binds, calls, merges and moves on; events are built only when someone listens.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from .._errors import ConfigError
from .._node import build
from .._resources import Resource, has_resource
from .._spec import NodeSpec
from ..idempotency._policy import default_lease
from ._schema import Schema

FIELD, STATE, RESOURCE = 0, 1, 2


class FlowOptions(Protocol):
    """What compiling, running and journaling read of a flow (`Flow` has all of it)."""

    @property
    def name(self) -> str: ...
    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def on_error(self) -> str: ...
    @property
    def lease(self) -> float | None: ...
    @property
    def ttl(self) -> float: ...
    @property
    def strict(self) -> bool: ...
    @property
    def _schema(self) -> Schema: ...
    @property
    def _resources(self) -> Mapping[str, Callable[[], Any]]: ...


class Entry:
    """A node as added to the flow (before the flow is compiled)."""

    __slots__ = ("after", "call", "compensate", "decl", "name", "output", "spec", "version")

    def __init__(
        self,
        name: str,
        call: Any,
        spec: NodeSpec,
        after: tuple[str, ...],
        output: str | None,
        version: str | int | None,
        decl: int,
        compensate: Any = None,
    ) -> None:
        self.name = name
        self.call = call
        self.spec = spec
        self.after = after
        self.output = output
        self.version = version
        self.decl = decl
        # the node's compensation (`nk.node`-wrapped), compiled by `_compensate`
        self.compensate = compensate


class Step:
    """One node of a compiled flow: everything a run needs, decided once."""

    __slots__ = (
        "ancestors",
        "binds",
        "call",
        "candidates",
        "compensate",
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

    def __init__(self, entry: Entry, index: int) -> None:
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
        # (param, kind, key, optional): kind FIELD / STATE / RESOURCE
        self.binds: tuple[tuple[str, int, str, bool], ...] = ()
        # parameters resolved per run: (param, has_default)
        self.candidates: tuple[tuple[str, bool], ...] = ()
        self.positional: tuple[str, ...] = ()
        self.needs: tuple[tuple[str, str], ...] = entry.spec.resources
        self.open_writes = entry.output is None
        self.undeclared_upstream = False
        self.lease = 60.0
        self.ttl: float | None = None
        # its compensation (`_undo.Undo`), None for most: read only when a run fails
        self.compensate: Any = None

    def __repr__(self) -> str:
        return f"<flow step {self.name!r} #{self.index}>"


class Plan:
    __slots__ = ("compensable", "journal", "order", "outputs", "routes", "static", "subflows")

    def __init__(self, order: list[Step], outputs: frozenset[str]) -> None:
        self.order = order
        self.outputs = outputs
        # a durable run's run-independent fingerprints (graph, nodes), computed on first use
        self.journal: tuple[str, list[str]] | None = None
        # nothing to resolve per run: no parameter depends on the input or on nk.use()
        self.static = all(not step.candidates and not step.needs for step in order)
        # some node has a compensation (`_compensate.compile_compensations` sets it)
        self.compensable = False
        # the routes (`_routes.Routing`), None without: a plain flow keeps its plain drivers
        self.routes: Any = None
        # some node is a subflow: a run makes its store and id known to it (`_run.SCOPE`)
        self.subflows = False


# ---------------------------------------------------------------------------- compiling


def compile_plan(
    flow: FlowOptions, entries: list[Entry], routes: Sequence[tuple[str, str]] = ()
) -> Plan:
    """The plan of a flow's nodes (in declaration order); raises `ConfigError`.

    `routes` are the (node, target) edges of the flow's routes (checked by `_routes`): a
    target runs after its route's node, which orders them like ``after=`` does.
    """
    deps = _dependency_indices(flow.name, entries)
    order, dependants = _canonical_order(flow.name, entries, deps)
    steps = _link(entries, order, deps, dependants)
    exclusive: set[int] = set()
    if routes:
        _widen(steps, routes)
        position = {step.name: step.index for step in steps}
        exclusive = {position[target] for _, target in routes}
    outputs = frozenset(step.output for step in steps if step.output is not None)
    check_writers(flow, steps, exclusive)
    for step in steps:
        bind_plan(flow, step, outputs)
        step.lease = flow.lease or default_lease(step.spec)
        plan_idem = step.spec.idempotency
        step.ttl = getattr(plan_idem, "ttl", None) if plan_idem is not None else None
    return Plan(steps, outputs)


def _dependency_indices(flow: str, entries: list[Entry]) -> list[list[int]]:
    """Each entry's dependencies as declaration indices; an unknown one is a `ConfigError`."""
    index = {entry.name: i for i, entry in enumerate(entries)}
    deps: list[list[int]] = []
    for entry in entries:
        found = []
        for dep in entry.after:
            if dep not in index:
                raise ConfigError(
                    f"flow {flow!r}: node {entry.name!r} runs after {dep!r}, which is "
                    f"not a node of this flow (nodes: {list(index)})",
                    node=entry.name,
                    option="after",
                )
            found.append(index[dep])
        deps.append(found)
    return deps


def _canonical_order(
    flow: str, entries: list[Entry], deps: list[list[int]]
) -> tuple[list[int], list[list[int]]]:
    """(the canonical order, each entry's dependants); a cycle is a `ConfigError`."""
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
        cycle = find_cycle(deps, [i for i, count in enumerate(waiting) if count > 0])
        names = " -> ".join(entries[i].name for i in cycle)
        raise ConfigError(
            f"flow {flow!r}: dependency cycle {names}",
            node=entries[cycle[0]].name,
            option="after",
        )
    return order, dependants


def _link(
    entries: list[Entry],
    order: list[int],
    deps: list[list[int]],
    dependants: list[list[int]],
) -> list[Step]:
    """The steps in canonical order, with dependencies, dependants and ancestor masks."""
    position = {decl: pos for pos, decl in enumerate(order)}
    steps = [Step(entries[decl], pos) for pos, decl in enumerate(order)]
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
    return steps


def _widen(steps: list[Step], routes: Sequence[tuple[str, str]]) -> None:
    """Ancestors through routes too (loops included): a route's target runs after its node."""
    position = {step.name: step.index for step in steps}
    preds = [set(step.deps) for step in steps]
    for source, target in routes:
        preds[position[target]].add(position[source])
    changed = True
    while changed:  # a fixpoint: routes may form cycles
        changed = False
        for step in steps:
            mask = step.ancestors
            for pos in preds[step.index]:
                mask |= steps[pos].ancestors | (1 << pos)
            if mask != step.ancestors:
                step.ancestors = mask
                changed = True
    for step in steps:
        if any((step.ancestors >> other.index) & 1 and other.open_writes for other in steps):
            step.undeclared_upstream = True


def check_writers(flow: FlowOptions, steps: list[Step], exclusive: Collection[int] = ()) -> None:
    """Two nodes that may run concurrently and declare one output without a reducer: refused.

    Two route targets (`exclusive`) are usually alternatives (one route picks one of them):
    their writes are checked when they run instead (`Run.merge`).
    """
    by_field: dict[str, list[Step]] = {}
    for step in steps:
        if step.output is not None and step.output not in flow._schema.reducers:
            by_field.setdefault(step.output, []).append(step)
    for field, writers in by_field.items():
        for i, first in enumerate(writers):
            for second in writers[i + 1 :]:
                if not (second.ancestors >> first.index) & 1:
                    if first.index in exclusive and second.index in exclusive:
                        continue
                    raise ConfigError(
                        f"flow {flow.name!r}: nodes {first.name!r} and {second.name!r} may "
                        f"run concurrently and both write field {field!r}: order them with "
                        f"after=, or give {field!r} a reducer (Flow(reducers=...) or "
                        "Annotated[..., reducer] on the state)",
                        node=second.name,
                        option=field,
                    )


def bind_plan(flow: FlowOptions, step: Step, outputs: frozenset[str]) -> None:
    """How each parameter of a step is bound, as far as the flow's declarations decide it."""
    signature = step.spec.signature
    if signature is None:
        return
    fields = flow._schema.fields
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
            binds.append((name, STATE, name, False))
        elif (fields is not None and name in fields) or (fields is None and name in outputs):
            binds.append((name, FIELD, name, optional))
        elif fields is not None and name in flow._resources:
            binds.append((name, RESOURCE, name, False))
        else:
            candidates.append((name, optional))
    step.binds = tuple(binds)
    step.candidates = tuple(candidates)
    step.positional = tuple(positional)


def resolve_binds(
    flow: FlowOptions, plan: Plan, values: Mapping[str, Any]
) -> list[tuple[tuple[str, int, str, bool], ...]]:
    """Per-run binding: parameters that depend on the input or the active resources."""
    untyped = flow._schema.fields is None
    result = []
    for step in plan.order:
        for param, resource in step.needs:
            if resource not in flow._resources and not has_resource(resource):
                raise ConfigError(
                    f"flow {flow.name!r}: node {step.name!r}: resource {resource!r} "
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
                binds.append((param, FIELD, param, optional))
            elif param in flow._resources or has_resource(param):
                binds.append((param, RESOURCE, param, False))
            elif optional:
                continue
            elif untyped and step.undeclared_upstream:
                binds.append((param, FIELD, param, False))  # checked when the node runs
            else:
                where = (
                    "the input state, any node's output="
                    if untyped
                    else f"the state's fields {sorted(flow._schema.fields or ())}"
                )
                raise ConfigError(
                    f"flow {flow.name!r}: node {step.name!r}: parameter {param!r} matches "
                    f"no state field ({where}), resource or default",
                    node=step.name,
                    option=param,
                )
        result.append(tuple(binds))
    return result


def as_node(fn: Callable[..., Any], name: str | None, options: dict[str, Any]) -> Any:
    """A plain function made a node, named after its step (else its ``__name__``)."""
    label = name or getattr(fn, "__name__", None)
    return build(fn, {"name": label, **options} if label else dict(options))


def find_cycle(deps: list[list[int]], stuck: list[int]) -> list[int]:
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
