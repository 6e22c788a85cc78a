"""`fallback=`: a substitute result when a node finally fails without having done anything.

The fallback is the outermost layer: it sees the node's final error, after every retry and
after the idempotency layer. It runs only when that error says the effect did not happen or
will not happen — a *safe* error (`CircuitOpen`, `RateLimited`, `BulkheadFull`, a refused
connection, a 503), a *permanent* one, or an ambiguous error of a node that changes nothing
(`Effect.NONE` / `READ`). It never runs for `OutcomeUnknown`, `IdempotencyLeaseLost`,
`UnsafeRetry` or any ambiguous error of a WRITE node: the effect may have happened, and a
substitute result would hide exactly what nodekit exists to show. Nor for a `ConfigError` or
a corrupt idempotency record: those are bugs to fix, not outages to ride out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._classify import AMBIGUOUS, classify
from .._errors import (
    ConfigError,
    IdempotencyCorruptRecord,
    IdempotencyLeaseLost,
    OutcomeUnknown,
    UnsafeRetry,
)
from .._events import emit
from .._policies import Effect
from .._spec import NodeSpec, is_async_callable

__all__ = ["check_fallback", "falls_back", "install_fallback"]

# the effect may have happened (or an earlier one did), or the node is misconfigured
_NEVER = (OutcomeUnknown, IdempotencyLeaseLost, UnsafeRetry, IdempotencyCorruptRecord, ConfigError)


def falls_back(exc: Exception, spec: NodeSpec) -> bool:
    """Whether the node's final error `exc` may be replaced by the fallback's result."""
    if isinstance(exc, _NEVER):
        return False
    return not (spec.effect is Effect.WRITE and classify(exc) == AMBIGUOUS)


def check_fallback(fallback: object, spec: NodeSpec) -> Callable[..., Any]:
    """The fallback, if it is callable and of the node's kind (sync or async)."""
    if not callable(fallback) or isinstance(fallback, type):
        raise ConfigError(
            f"node {spec.name!r}: fallback must be a function fn(error, *args, **kwargs), "
            f"got {fallback!r}",
            node=spec.name,
            option="fallback",
        )
    if is_async_callable(fallback) != spec.is_async:
        want, got = ("async", "sync") if spec.is_async else ("sync", "async")
        raise ConfigError(
            f"node {spec.name!r}: the node is {want}, so its fallback must be {want} too; "
            f"got an {got} one ({getattr(fallback, '__qualname__', fallback)!r})",
            node=spec.name,
            option="fallback",
        )
    return fallback


def _announce(spec: NodeSpec, ctx: Any, exc: Exception) -> None:
    emit(
        "node.fallback",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        exc=exc,
        kind=classify(exc),
        attempts=ctx.attempt,
    )


def install_fallback(spec: NodeSpec, fallback: object) -> None:
    """Wrap the node's drivers (the attempt loop, or a keyed call around it) in its fallback."""
    fn = check_fallback(fallback, spec)
    inner_sync, inner_async = spec.drive_sync, spec.drive_async

    def drive_sync(spec: NodeSpec, ctx: Any, args: Any, kwargs: Any) -> Any:
        try:
            return inner_sync(spec, ctx, args, kwargs)
        except Exception as exc:
            if not falls_back(exc, spec):
                raise
            _announce(spec, ctx, exc)
            return fn(exc, *args, **kwargs)

    async def drive_async(spec: NodeSpec, ctx: Any, args: Any, kwargs: Any) -> Any:
        try:
            return await inner_async(spec, ctx, args, kwargs)
        except Exception as exc:
            if not falls_back(exc, spec):
                raise
            _announce(spec, ctx, exc)
            return await fn(exc, *args, **kwargs)

    spec.drive_sync = drive_sync
    spec.drive_async = drive_async
