"""`resolve`: forget the record of one call, so that the next call runs its effect again.

The way out of `OutcomeUnknown` for an at-most-once node, once you have checked whether the
effect happened: if it did not, resolve the key and call again; if it did, leave the record.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError
from .._events import emit

__all__ = ["aresolve", "resolve"]


def _target(node: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    spec = getattr(node, "spec", None)
    plan = getattr(spec, "idempotency", None)
    if plan is None:
        name = getattr(node, "name", node)
        raise ConfigError(
            f"nk.resolve: {name!r} is not a node with idempotency=nk.Idempotency(...)",
            option="node",
        )
    found = plan.key_for(args, kwargs)
    if found is None:
        raise ConfigError(
            f"node {plan.node!r}: this call has no key (optional=True), so nothing to resolve",
            node=plan.node,
            option="idempotency.key",
        )
    return plan, plan.store(), found[0]


def resolve(node: Any, /, *args: Any, **kwargs: Any) -> bool:
    """Delete the record of ``node(*args, **kwargs)``'s key; True if there was one.

    The key is computed exactly as the call computes it (the key function, scope and version),
    and the record is deleted from the node's store, whatever its state.
    """
    plan, store, key = _target(node, args, kwargs)
    gone = bool(store.delete(key))
    emit("idempotency.resolved", plan.node, None, 0, key=key.short, deleted=gone)
    return gone


async def aresolve(node: Any, /, *args: Any, **kwargs: Any) -> bool:
    """The async twin of `resolve`, for stores used from async code."""
    plan, store, key = _target(node, args, kwargs)
    gone = bool(await store.adelete(key))
    emit("idempotency.resolved", plan.node, None, 0, key=key.short, deleted=gone)
    return gone
