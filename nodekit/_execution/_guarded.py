"""One attempt inside the node's per-attempt guards (circuit breaker, rate limit, bulkhead).

The guards (`_spec.AttemptGuard`, built by `nodekit.resilience`) are entered in order,
outermost first; the function runs (under its attempt timeout, the innermost layer); then
every guard that was entered is exited, innermost first, with the attempt's error, the time
and how long the function itself ran (a rate-limit wait or a bulkhead queue is not part of
it, so that a slow-call breaker judges the service, not the local queue). A guard that
refuses raises before the function runs, and the guards outside it see that refusal.
Only nodes with guards come here: the others pay nothing for this layer.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from .._context import NodeContext
from .._runtime import RUNTIME
from .._spec import AttemptWait, NodeSpec
from ._timed import attempt_in_thread, attempt_with_timeout

__all__ = ["guarded_async", "guarded_sync"]


def guarded_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run one sync attempt inside the node's guards."""
    entered: list[tuple[Any, Any]] = []
    started = 0.0
    error: BaseException | None = None
    try:
        for guard in spec.guards:
            entered.append((guard, guard.enter(spec, ctx)))
        started = monotonic()
        if spec.threaded:
            return attempt_in_thread(spec, ctx, args, kwargs)
        return spec.fn(*args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        now = monotonic()
        duration = now - started if started else 0.0
        for guard, token in reversed(entered):
            guard.exit(spec, ctx, token, error, now, duration)


async def guarded_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `guarded_sync`."""
    guards = spec.guards
    if len(guards) == 1 and not spec.threaded and not guards[0].awaits:
        # one guard that does no I/O (a local rate limit, breaker or bulkhead): the same
        # steps without the bookkeeping for several, on the path of every such attempt
        guard = guards[0]
        token = guard.enter(spec, ctx)
        if token.__class__ is AttemptWait:
            wait, token = token, None
            try:
                await RUNTIME.asleep(wait)
            except BaseException as exc:
                guard.exit(spec, ctx, None, exc, monotonic(), 0.0)
                raise
        started = monotonic()
        try:
            result = await spec.fn(*args, **kwargs)
        except BaseException as exc:
            now = monotonic()
            guard.exit(spec, ctx, token, exc, now, now - started)
            raise
        now = monotonic()
        guard.exit(spec, ctx, token, None, now, now - started)
        return result
    entered: list[tuple[Any, Any]] = []
    started = 0.0
    error: BaseException | None = None
    try:
        for guard in spec.guards:
            if guard.awaits:
                token = await guard.aenter(spec, ctx)
            else:
                token = guard.enter(spec, ctx)
                if token.__class__ is AttemptWait:
                    entered.append((guard, None))
                    await RUNTIME.asleep(token)
                    continue
            entered.append((guard, token))
        started = monotonic()
        if spec.threaded:
            return await attempt_with_timeout(spec, ctx, args, kwargs)
        return await spec.fn(*args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        now = monotonic()
        duration = now - started if started else 0.0
        for guard, token in entered[::-1]:
            if guard.awaits:
                await guard.aexit(spec, ctx, token, error, now, duration)
            else:
                guard.exit(spec, ctx, token, error, now, duration)
