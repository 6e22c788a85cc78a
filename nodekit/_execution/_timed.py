"""One attempt under a deadline: a sync attempt in a worker thread, an async one cancelled.

A sync attempt cannot be killed: the caller regains control at the deadline, the attempt is
abandoned (and reported when it finishes), and the timeout counts as ambiguous. It runs in a
worker thread only when the node has a timeout. An async attempt is cancelled at its deadline.
While an attempt runs, the context's deadline is the attempt's, so that `remaining()` inside
it (nested nodes, integrations passing the deadline down) includes the per-attempt budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any

from .._context import NodeContext
from .._errors import NodeTimeout
from .._events import emit
from .._spec import NodeSpec
from ._attempts import attempt_budget, attempt_deadline, deadline_error

__all__ = ["attempt_in_thread", "attempt_with_timeout"]


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
    if box.error is not None:
        raise box.error
    return box.result


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
