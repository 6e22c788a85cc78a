"""Routing: ``flow.route(after=node, to=fn)`` decides, on the state, which nodes run next.

A route is evaluated each time its node completes: ``fn(state)`` returns a node (or its
name), a list of nodes, or `END`. A node a route can lead to (a *target*) does not start with
the run: it runs each time a route picks it, and, if it has ``after=`` nodes, once they all
completed (the way into a loop). Loops go only through routes, and a run of a routed flow
stops at ``Flow(max_steps=...)`` node executions.

This module declares and compiles routes, and decides without I/O: everything is checked
when the flow is compiled (`check_routes`, `compile_routes`: unknown nodes, undeclared
targets), what a route's return value means is `Route.pick`, and which nodes are ready is a
`Walk`. A flow without routes never reaches it: the drivers of `_scheduler` keep their plain
path, and a routed flow is driven by `_routed`.
"""

from __future__ import annotations

import heapq
import typing
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, Final, Literal

from .._errors import ConfigError
from ._graph import Plan, Step
from ._run import Run
from ._schema import Problem

__all__ = ["END", "Route", "Routing", "Walk", "check_routes", "compile_routes", "declare"]

#: What a route returns to end its branch (LangGraph's ``END``, the same string).
END: Final = "__end__"

DEFAULT_MAX_STEPS = 100

_SAFE_REPR = (str, int, bool, type(None))


class Route:
    """A route as declared: after which node, the function, and the targets it may pick."""

    __slots__ = ("after", "fn", "name", "paths", "targets")

    def __init__(
        self,
        name: str,
        after: str,
        fn: Callable[[Any], Any],
        targets: tuple[str, ...],
        paths: dict[Hashable, str] | None,
    ) -> None:
        self.name = name
        self.after = after
        self.fn = fn
        self.targets = targets  # node names, END included
        self.paths = paths  # fn's return value -> target name (targets= given as a mapping)

    def __repr__(self) -> str:
        return f"<route {self.name!r} after {self.after!r} -> {list(self.targets)}>"

    def pick(self, value: Any, ids: Mapping[int, str]) -> tuple[str, ...]:
        """The target names `value` (what ``fn`` returned) means, END left out; else `Problem`."""
        if isinstance(value, list | tuple | set | frozenset):
            items = list(value)
            if isinstance(value, set | frozenset):
                items.sort(key=lambda item: str(self._name(item, ids)))
        else:
            items = [value]
        names: list[str] = []
        for item in items:
            name = self._name(item, ids)
            if name is None or name not in self.targets:
                raise Problem(
                    f"its route {self.name!r} returned {_show(item)}, which is not among the "
                    f"route's targets {list(self.paths or self.targets)}: declare it in "
                    f"flow.route(after={self.after!r}, targets=...)"
                )
            if name != END and name not in names:
                names.append(name)
        return tuple(names)

    def _name(self, item: Any, ids: Mapping[int, str]) -> str | None:
        if self.paths is not None:
            try:
                return self.paths.get(item)
            except TypeError:  # unhashable
                return None
        if isinstance(item, str):
            return item
        return ids.get(id(item))


def _show(value: Any) -> str:
    """A returned value as an error shows it: a name, else only its type (no payload)."""
    if isinstance(value, _SAFE_REPR) and len(repr(value)) <= 60:
        return repr(value)
    return f"a {type(value).__qualname__}"


# ---------------------------------------------------------------------------- declaring


def declare(
    flow: str,
    names: Mapping[int, str],
    routes: Sequence[Route],
    after: Any,
    to: Any,
    targets: Any,
    name: str | None,
) -> Route:
    """A route as `Flow.route` declares it; a `ConfigError` for anything already wrong."""
    if isinstance(after, str):
        source = after
    elif callable(after) and id(after) in names:
        source = names[id(after)]
    else:
        label = getattr(after, "__name__", None) or repr(after)
        raise ConfigError(
            f"flow {flow!r}: flow.route(after=...) takes one node of this flow (a node or its "
            f"name), got {label!r}" + ("" if not callable(after) else ", which was not added"),
            option="after",
        )
    if not callable(to):
        raise ConfigError(
            f"flow {flow!r}: the route after {source!r} needs to=fn, a function of the state "
            f"that returns the next node(s) or nk.END, got {to!r}",
            node=source,
            option="to",
        )
    if name is None:
        fn_name = getattr(to, "__name__", "")
        name = fn_name if fn_name.isidentifier() else "route"
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"flow {flow!r}: a route's name must be a non-empty string, got {name!r}",
            node=source,
            option="name",
        )
    label = f"route {name!r} after {source!r}"
    if any(route.after == source and route.name == name for route in routes):
        raise ConfigError(
            f"flow {flow!r}: a {label} was already declared; pass name= to add another one",
            node=source,
            option="name",
        )
    if targets is None:
        targets = _annotated_targets(to)
        if targets is None:
            raise ConfigError(
                f"flow {flow!r}: {label}: declare the nodes it can lead to, "
                "targets=[node, ..., nk.END] (or a mapping of what it returns to nodes), or "
                "annotate its return type as Literal['node', ...]",
                node=source,
                option="targets",
            )
    paths: dict[Hashable, str] | None = None
    if isinstance(targets, Mapping):
        paths = {}
        for key, target in targets.items():
            paths[key] = _target_name(flow, label, source, names, target)
        declared = tuple(dict.fromkeys(paths.values()))
    else:
        items = [targets] if isinstance(targets, str) or callable(targets) else list(targets)
        declared = tuple(dict.fromkeys(_target_name(flow, label, source, names, t) for t in items))
    if not declared:
        raise ConfigError(f"flow {flow!r}: {label} has no targets", node=source, option="targets")
    return Route(name, source, to, declared, paths)


def _target_name(flow: str, label: str, source: str, names: Mapping[int, str], item: Any) -> str:
    if isinstance(item, str):
        return item
    found = names.get(id(item))
    if found is None:
        what = getattr(item, "__name__", None) or type(item).__qualname__
        raise ConfigError(
            f"flow {flow!r}: {label} lists target {what!r}, which was not added to this flow "
            "(add it first, or name it)",
            node=source,
            option="targets",
        )
    return found


def _annotated_targets(fn: Any) -> list[str] | None:
    """The names in ``fn``'s return annotation (``Literal['a', 'b']``, lists and unions of
    them), or None when it does not say."""
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:
        return None
    found: list[str] = []

    def collect(tp: Any) -> bool:
        origin = typing.get_origin(tp)
        if origin is Literal:
            args = typing.get_args(tp)
            if not all(isinstance(arg, str) for arg in args):
                return False
            found.extend(args)
            return True
        if origin is not None and typing.get_args(tp):
            return all(collect(arg) for arg in typing.get_args(tp))
        return False

    return found if hint is not None and collect(hint) and found else None


# ---------------------------------------------------------------------------- compiling


def check_routes(
    flow: str, routes: Sequence[Route], nodes: Collection[str]
) -> list[tuple[str, str]]:
    """The routes' (node, target) edges; an unknown node or target is a `ConfigError`."""
    if END in nodes:
        raise ConfigError(
            f"flow {flow!r}: a node may not be named {END!r} (nk.END, the end of a route)",
            node=END,
            option="name",
        )
    edges: list[tuple[str, str]] = []
    for route in routes:
        label = f"route {route.name!r} after {route.after!r}"
        if route.after not in nodes:
            raise ConfigError(
                f"flow {flow!r}: {label}: {route.after!r} is not a node of this flow "
                f"(nodes: {list(nodes)})",
                node=route.after,
                option="after",
            )
        for target in route.targets:
            if target == END:
                continue
            if target not in nodes:
                raise ConfigError(
                    f"flow {flow!r}: {label}: target {target!r} is not a node of this flow "
                    f"(nodes: {list(nodes)})",
                    node=route.after,
                    option="targets",
                )
            edges.append((route.after, target))
    return edges


class Routing:
    """A routed flow's plan: the routes of each node, where a run starts, its loops."""

    __slots__ = (
        "after",
        "fingerprint",
        "ids",
        "loops",
        "max_steps",
        "position",
        "start",
        "subflows",
    )

    def __init__(
        self,
        after: list[tuple[Route, ...]],
        start: list[int],
        loops: list[tuple[str, ...]],
        max_steps: int,
        ids: dict[int, str],
        position: dict[str, int],
    ) -> None:
        self.after = after  # by step index: the routes evaluated when it completes
        self.start = start  # the steps that start with the run (no after=, not a target)
        self.loops = loops  # by step index: the nodes of its loop (empty: in none)
        self.max_steps = max_steps
        self.ids = ids  # id(node object) -> its name, for what a route returns
        self.position = position  # node name -> step index
        self.subflows = False
        self.fingerprint = sorted(
            [route.after, route.name, sorted(route.targets)] for routes in after for route in routes
        )


def compile_routes(
    flow: str,
    plan: Plan,
    routes: Sequence[Route],
    names: Mapping[int, str],
    max_steps: int | None,
) -> Routing:
    """The routing plan of a compiled flow (its routes checked by `check_routes`)."""
    order = plan.order
    index = {step.name: step.index for step in order}
    after: list[list[Route]] = [[] for _ in order]
    targeted: set[int] = set()
    successors: list[set[int]] = [set(step.dependants) for step in order]
    for route in routes:
        source = index[route.after]
        after[source].append(route)
        for target in route.targets:
            if target != END:
                targeted.add(index[target])
                successors[source].add(index[target])
    start = [step.index for step in order if not step.deps and step.index not in targeted]
    if not start:
        raise ConfigError(
            f"flow {flow!r}: no node starts the run: every node is a route's target or runs "
            "after another; leave the first node out of the routes' targets",
            option="targets",
        )
    wanted_names = {route_target for route in routes for route_target in route.targets}
    ids = {key: name for key, name in names.items() if name in wanted_names}
    return Routing(
        [tuple(found) for found in after],
        start,
        _loops(order, successors),
        max_steps if max_steps is not None else max(DEFAULT_MAX_STEPS, len(order)),
        ids,
        index,
    )


def _loops(order: list[Step], successors: list[set[int]]) -> list[tuple[str, ...]]:
    """Each step's loop: the nodes that reach it and that it reaches (its cycle), if any."""
    reach: list[int] = []
    for step in order:  # the steps each one reaches, as a bit mask
        mask, todo = 0, list(successors[step.index])
        while todo:
            nxt = todo.pop()
            if not (mask >> nxt) & 1:
                mask |= 1 << nxt
                todo.extend(successors[nxt])
        reach.append(mask)
    loops: list[tuple[str, ...]] = []
    for step in order:
        i = step.index
        if not (reach[i] >> i) & 1:
            loops.append(())
            continue
        loops.append(
            tuple(
                other.name
                for other in order
                if (reach[i] >> other.index) & 1 and (reach[other.index] >> i) & 1
            )
        )
    return loops


# ---------------------------------------------------------------------------- a run's walk


class Walk:
    """Which nodes of a routed run are ready, and how many times each ran (no I/O)."""

    __slots__ = ("calls", "got", "queued", "ready", "routing", "run", "steps")

    def __init__(self, routing: Routing, run: Run) -> None:
        self.routing = routing
        self.run = run
        self.ready = list(routing.start)
        heapq.heapify(self.ready)
        self.queued = set(self.ready)  # ready and not started: picked twice, it runs once
        self.calls = [0] * len(run.plan.order)
        # the dependencies that completed since a step last ran (its after= barrier)
        self.got: list[set[int]] = [set() for _ in run.plan.order]
        self.steps = 0

    def pop(self) -> Step:
        index = heapq.heappop(self.ready)
        self.queued.discard(index)
        return self.run.plan.order[index]

    def push(self, index: int) -> None:
        if index not in self.queued:
            self.queued.add(index)
            heapq.heappush(self.ready, index)

    def begin(self, step: Step) -> int:
        """Count one step of the run; returns the node's call index. Raises `Problem`."""
        limit = self.routing.max_steps
        if self.steps >= limit:
            loop = self.routing.loops[step.index] or tuple(
                other.name for other in self.run.plan.order if self.calls[other.index] > 1
            )
            raise Problem(
                f"the run reached the flow's max_steps={limit} (one step is one node "
                f"execution) in the loop through nodes {list(loop)}: its routes keep leading "
                "back; end the loop with nk.END, or raise Flow(max_steps=...)"
            )
        self.steps += 1
        call = self.calls[step.index]
        self.calls[step.index] = call + 1
        return call

    def routed(self, names: tuple[str, ...]) -> None:
        """A route picked these nodes: each runs (once, if it is already waiting)."""
        position = self.routing.position
        for name in names:
            self.push(position[name])

    def release(self, step: Step) -> None:
        """`step` completed: a dependant whose after= nodes all completed since it last ran
        runs (again)."""
        got, order, index = self.got, self.run.plan.order, step.index
        for dependant in step.dependants:
            done = got[dependant]
            done.add(index)
            if len(done) == len(order[dependant].deps):
                done.clear()
                self.push(dependant)
