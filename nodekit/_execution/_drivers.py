"""The attempt loop, one sync and one async driver, and a node call in its context.

`run_sync` / `run_async` are the whole retry loop. While nobody listens to events, no retry
state exists until an attempt fails. The decorated function makes the loop's first attempt
itself (one `try` around the call, `_node.py`) and hands a failure to the loop, which goes on
from there: so a call that succeeds costs little more than the function itself. They only call, sleep, await
and hop to a worker thread; every decision is `Attempts`'s. They read line for line alike.

`call_sync` / `call_async` are one node call once its context is set — by the decorated
function or by a flow running the node: node, run id and attempt bound for structlog's
`merge_contextvars` when its chain needs them, resources injected, then the node's driver (the attempt loop, or a keyed call around it).

When instrumented (`RUNTIME.tracer`, set by `nodekit.otel.instrument()`), the driver runs
inside the tracer's call span and, when events are observed, each attempt inside its attempt
span (`attempt_sync` / `attempt_async`); only this slow path reads the hook.
"""

from __future__ import annotations

import sys
from typing import Any

from .._context import NodeContext, bind_run_id
from .._events import observed, structlog_binds
from .._resources import ainject, inject
from .._runtime import LOG_ATTEMPT, LOG_NODE, LOG_RUN, RUNTIME, Tracer
from .._spec import NodeSpec
from ._attempts import Attempts
from ._guarded import guarded_async, guarded_sync
from ._timed import attempt_in_thread, attempt_with_timeout

__all__ = [
    "attempt_async",
    "attempt_sync",
    "bind_log",
    "call_async",
    "call_sync",
    "run_async",
    "run_sync",
    "unbind_log",
]


def run_sync(
    spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any, failed: Exception | None = None
) -> Any:
    """Run a sync node's attempts until one succeeds or `Attempts` gives up.

    `failed` is the error of a first attempt the caller already made (the decorated
    function's success path tries once before it comes here): the loop goes on from it.
    """
    fn = spec.fn
    attempts: Attempts | None = None
    tracer: Tracer | None = None
    if failed is None and observed():
        attempts = Attempts(spec, ctx)
        tracer = RUNTIME.tracer
    while True:
        if failed is None:
            try:
                if tracer is not None:  # nodekit.otel: the attempt inside its span
                    result = tracer.attempt_sync(attempt_sync, spec, ctx, args, kwargs)
                elif spec.guards:
                    result = guarded_sync(spec, ctx, args, kwargs)
                elif spec.threaded:
                    result = attempt_in_thread(spec, ctx, args, kwargs)
                else:
                    result = fn(*args, **kwargs)
            except Exception as exc:
                failed = exc
            else:
                if attempts is not None:
                    attempts.succeeded()
                return result
        if attempts is None:
            if spec.retry is None:
                raise failed
            attempts = Attempts(spec, ctx, announce=False)
        RUNTIME.sleep(attempts.failed(failed))
        failed = None
        ctx.next_attempt()


async def run_async(
    spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any, failed: Exception | None = None
) -> Any:
    """Await an async node's attempts until one succeeds or `Attempts` gives up."""
    fn = spec.fn
    attempts: Attempts | None = None
    tracer: Tracer | None = None
    if failed is None and observed():
        attempts = Attempts(spec, ctx)
        tracer = RUNTIME.tracer
    while True:
        if failed is None:
            try:
                if tracer is not None:  # nodekit.otel: the attempt inside its span
                    result = await tracer.attempt_async(attempt_async, spec, ctx, args, kwargs)
                elif spec.guards:
                    result = await guarded_async(spec, ctx, args, kwargs)
                elif spec.threaded:
                    result = await attempt_with_timeout(spec, ctx, args, kwargs)
                else:
                    result = await fn(*args, **kwargs)
            except Exception as exc:
                failed = exc
            else:
                if attempts is not None:
                    attempts.succeeded()
                return result
        if attempts is None:
            if spec.retry is None:
                raise failed
            attempts = Attempts(spec, ctx, announce=False)
        await RUNTIME.asleep(attempts.failed(failed))
        failed = None
        ctx.next_attempt()


def attempt_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """One attempt as `run_sync` makes it, for a tracer to wrap: inside the node's guards, in
    a worker thread under its timeout, or the plain call (the loop inlines the same three)."""
    if spec.guards:
        return guarded_sync(spec, ctx, args, kwargs)
    if spec.threaded:
        return attempt_in_thread(spec, ctx, args, kwargs)
    return spec.fn(*args, **kwargs)


async def attempt_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `attempt_sync`."""
    if spec.guards:
        return await guarded_async(spec, ctx, args, kwargs)
    if spec.threaded:
        return await attempt_with_timeout(spec, ctx, args, kwargs)
    return await spec.fn(*args, **kwargs)


def bind_log(ctx: NodeContext, node: str) -> tuple[Any, ...]:
    """Bind node, run id and attempt for structlog's `merge_contextvars` (callers bind only
    while `_events.structlog_binds()` says a configured chain lacks `nk.add_node_context`)."""
    return LOG_NODE.set(node), LOG_RUN.set(bind_run_id(ctx)), LOG_ATTEMPT.set(ctx.attempt)


def unbind_log(tokens: tuple[Any, ...] | None) -> None:
    if tokens is not None:
        LOG_ATTEMPT.reset(tokens[2])
        LOG_RUN.reset(tokens[1])
        LOG_NODE.reset(tokens[0])


def call_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """One sync node call in its context (set by the caller): log ids, resources, driver."""
    tokens = bind_log(ctx, spec.name) if "structlog" in sys.modules and structlog_binds() else None
    try:
        if spec.resources:
            kwargs = dict(kwargs)
            inject(spec.name, spec.resources, kwargs)
        tracer = RUNTIME.tracer
        if tracer is not None:  # nodekit.otel: the call inside its span
            return tracer.call_sync(spec.drive_sync, spec, ctx, args, kwargs)
        return spec.drive_sync(spec, ctx, args, kwargs)
    finally:
        unbind_log(tokens)


async def call_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `call_sync` (async resources are opened on the loop)."""
    tokens = bind_log(ctx, spec.name) if "structlog" in sys.modules and structlog_binds() else None
    try:
        if spec.resources:
            kwargs = dict(kwargs)
            await ainject(spec.name, spec.resources, kwargs)
        tracer = RUNTIME.tracer
        if tracer is not None:
            return await tracer.call_async(spec.drive_async, spec, ctx, args, kwargs)
        return await spec.drive_async(spec, ctx, args, kwargs)
    finally:
        unbind_log(tokens)
