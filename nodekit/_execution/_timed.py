"""One attempt under a deadline: a sync attempt in a worker thread, an async one cancelled.

A sync attempt cannot be killed: the caller regains control at the deadline, the attempt is
abandoned (and reported when it finishes), and the timeout counts as ambiguous. It runs in a
worker thread only when the node has a timeout. An async attempt is cancelled at its deadline.
While an attempt runs, the context's deadline is the attempt's, so that `remaining()` inside
it (nested nodes, integrations passing the deadline down) includes the per-attempt budget.
An object bound to the thread that made it (a sqlite3 connection) fails in the worker thread:
that failure becomes a `ConfigError` that says how to fix it (`thread_bound_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any

from .._context import NodeContext
from .._errors import ConfigError, NodeTimeout
from .._events import emit
from .._spec import NodeSpec
from ._attempts import attempt_budget, attempt_deadline, deadline_error

__all__ = ["attempt_in_thread", "attempt_with_timeout", "thread_bound_error"]


class _Box:
    __slots__ = ("abandoned", "done", "error", "finished", "lock", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None
        # run when an abandoned attempt's thread finishes (`NodeTimeout.when_finished`)
        self.finished: list[Callable[[], None]] = []

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the worker thread has finished (now, if it already has)."""
        with self.lock:
            if not self.done.is_set():
                self.finished.append(callback)
                return
        callback()


def attempt_in_thread(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run one sync attempt; in a worker thread given back at its budget when there is one."""
    budget = attempt_budget(spec, ctx)
    if budget is None:
        return spec.fn(*args, **kwargs)
    if budget <= 0.0:
        raise deadline_error(spec, ctx)
    box = _Box()
    copied = contextvars.copy_context()
    worker = threading.Thread(
        target=_target,
        args=(spec, ctx, ctx.attempt, box, copied, args, kwargs),
        name=f"nodekit:{spec.name}",
        daemon=True,
    )
    saved = ctx.deadline
    ctx.deadline = attempt_deadline(saved, budget)
    try:
        worker.start()
        finished = box.done.wait(budget)
    finally:
        ctx.deadline = saved
    if not finished:
        with box.lock:
            if not box.done.is_set():
                box.abandoned = True
        if box.abandoned:
            raise NodeTimeout(
                f"node {spec.name!r}: attempt {ctx.attempt} did not finish within {budget:.3f}s; "
                "it was abandoned and may still complete in its worker thread",
                node=spec.name,
                timeout=budget,
                abandoned=True,
                when_finished=box.when_finished,
            )
    error = box.error
    if error is not None:
        bound = thread_bound_error(spec.name, kwargs, error)
        if bound is not None:
            raise bound from error
        raise error
    return box.result


def thread_bound_error(
    node: str,
    kwargs: Any,
    exc: BaseException,
    *,
    where: str = "timeout= runs the node in a worker thread",
    instead: str = "drop timeout=",
) -> ConfigError | None:
    """The `ConfigError` for a thread-bound object used in a worker thread, or None.

    Only sqlite3's "objects created in a thread can only be used in that same thread" is
    recognised (checked by name, on the failure path only). It is a `ConfigError`, so the
    attempt loop does not retry it: every attempt runs in a new thread and would fail alike.
    `where` says why the node ran in a worker thread, `instead` the way to avoid it.
    """
    if type(exc).__module__ != "sqlite3" or "same thread" not in str(exc):
        return None
    params = [p for p, v in kwargs.items() if type(v).__module__ == "sqlite3"]
    what = f"parameter {params[0]!r} is a sqlite3 object" if params else "it uses a sqlite3 object"
    return ConfigError(
        f"node {node!r}: {what} made in another thread, but {where} and sqlite3 objects "
        f"work only in their own thread. Open the connection inside the node, or {instead}, "
        "or connect with check_same_thread=False and guard the connection with a lock (an "
        "abandoned attempt may still be using it)",
        node=node,
        option=params[0] if params else None,
    )


def _target(
    spec: NodeSpec,
    ctx: NodeContext,
    attempt: int,
    box: _Box,
    copied: contextvars.Context,
    args: Any,
    kwargs: Any,
) -> None:
    try:
        box.result = copied.run(spec.fn, *args, **kwargs)
    except BaseException as exc:
        box.error = exc
    with box.lock:
        box.done.set()
        late = box.abandoned
        finished, box.finished = box.finished, []
    for callback in finished:
        with contextlib.suppress(Exception):  # a guard's release; it never raises
            callback()
    if late:
        emit(
            "node.abandoned_finished",
            spec.name,
            ctx.run_id,
            attempt,
            exc=box.error,
            ok=box.error is None,
        )
        hook = spec.on_abandoned_finish
        if hook is not None:
            hook(ctx, box.error is None, box.result, box.error)


async def attempt_with_timeout(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run one async attempt; cancel it at its budget when there is one."""
    budget = attempt_budget(spec, ctx)
    if budget is None:
        return await spec.fn(*args, **kwargs)
    if budget <= 0.0:
        raise deadline_error(spec, ctx)
    timer = asyncio.timeout(budget)
    saved = ctx.deadline
    ctx.deadline = attempt_deadline(saved, budget)
    try:
        async with timer:
            return await spec.fn(*args, **kwargs)
    except TimeoutError as exc:
        if not timer.expired():
            raise
        raise NodeTimeout(
            f"node {spec.name!r}: attempt {ctx.attempt} did not finish within {budget:.3f}s "
            "and was cancelled",
            node=spec.name,
            timeout=budget,
        ) from exc
    finally:
        ctx.deadline = saved
