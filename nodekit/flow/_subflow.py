"""Subflows: ``flow.add(inner_flow, name=..., after=...)`` runs a whole flow as one node.

The inner flow's state is mapped in and out by field name: the outer fields the inner state
has (every outer field, for an inner dict state) are its input, and the fields the inner run
added or changed update the outer state (those the outer state has, for a typed outer
state). With ``output=``, the inner flow's final state is stored whole under that field.

The inner run is a run of its own, with a child run id derived from the parent's run id and
the node's name (``f"{parent_run_id}/{name}"``, plus ``#k`` for the k-th re-run in a loop).
In a durable parent run it journals in the parent's store, so a resume of the parent resumes
the inner run where it stopped; its ``flow.*`` events carry ``parent_flow``,
``parent_run_id`` and ``parent_node``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._context import new_run_id
from .._node import build
from .._runtime import CURRENT
from ._routed import CALL
from ._run import SCOPE
from ._scheduler import drive_flow_async, drive_flow_sync

__all__ = ["subflow_node"]

_NO_VALUE = object()


def subflow_node(
    inner: Any, name: str | None, output: str | None, outer_fields: frozenset[str] | None
) -> Any:
    """The node that runs `inner` (a `Flow`) as one step of another flow.

    `outer_fields` are the outer state's fields (None: any field, a dict state). The node is
    async if any inner node is, so that an async parent runs the inner flow on its own loop;
    a sync one runs it in the thread the parent gives it.
    """
    label = name or inner.name
    inner_fields: frozenset[str] | None = inner._schema.fields
    if inner._schema.extra:
        inner_fields = None
    asynchronous = any(entry.spec.is_async for entry in inner._entries.values())

    def begin(state: Any) -> tuple[dict[str, Any], str, Any, dict[str, Any]]:
        values = _values(state)
        passed = (
            dict(values)
            if inner_fields is None
            else {key: value for key, value in values.items() if key in inner_fields}
        )
        scope = SCOPE.get()
        if scope is None:  # called outside a flow: a run of its own
            return passed, new_run_id(), None, {}
        call = CALL.get()
        child = f"{scope.run_id}/{label}" + (f"#{call}" if call else "")
        parent = {
            "parent_flow": scope.flow,
            "parent_run_id": scope.run_id,
            "parent_node": label,
        }
        return passed, child, scope.store, parent

    def end(passed: Mapping[str, Any], final: Any) -> Any:
        if output is not None:
            return final
        update: dict[str, Any] = {}
        for key, value in _values(final).items():
            if outer_fields is not None and key not in outer_fields:
                continue
            before = passed.get(key, _NO_VALUE)
            try:
                same = before is value or (before is not _NO_VALUE and bool(before == value))
            except Exception:
                same = False
            if not same:
                update[key] = value
        return update

    if asynchronous:

        async def run_subflow(state: Any) -> Any:
            passed, child, store, parent = begin(state)
            # the inner run's nodes count their own calls, and are no calls of this node: they
            # run under the child run id
            token, current = CALL.set(0), CURRENT.set(None)
            try:
                final = await drive_flow_async(
                    inner, inner._compile(), passed, child, store, parent=parent
                )
            finally:
                CURRENT.reset(current)
                CALL.reset(token)
            return end(passed, final)

        fn: Any = run_subflow
    else:

        def run_subflow_sync(state: Any) -> Any:
            passed, child, store, parent = begin(state)
            token, current = CALL.set(0), CURRENT.set(None)
            try:
                steps = drive_flow_sync(
                    inner, inner._compile(), passed, child, store, parent=parent
                )
                try:
                    while True:
                        next(steps)
                except StopIteration as done:
                    final = done.value
            finally:
                CURRENT.reset(current)
                CALL.reset(token)
            return end(passed, final)

        fn = run_subflow_sync
    fn.__name__ = fn.__qualname__ = label if label.isidentifier() else "subflow"
    node = build(fn, {"name": label})
    node.subflow = inner
    return node


def _values(state: Any) -> Mapping[str, Any]:
    """A state's fields and values: a pydantic model's (extras included), or the mapping."""
    if isinstance(state, Mapping):
        return state
    extra = getattr(state, "__pydantic_extra__", None)
    return {**(extra or {}), **state.__dict__}
