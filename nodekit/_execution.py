"""The attempt loop, written once, and the sync and async drivers that carry it out.

`Attempts` decides: after a failed attempt it either returns how long to wait before the next
one or raises what the caller must see (the original exception with a note, or
`UnsafeRetry`). It does no I/O: it never sleeps, calls or awaits. `run_sync` and `run_async`
only call, sleep or await, and hop to a worker thread for a sync attempt with a timeout; they
read line for line alike.

The success path of a node does not come here at all unless someone listens to events or the
node has a timeout: see `_node.py`. The first failure enters `retry_sync` / `retry_async`.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._context import NodeContext
from ._errors import ConfigError, NodeTimeout, UnsafeRetry
from ._events import DEBUG, HUB, emit, observed
from ._events import _is_enabled_for as _debug
from ._policies import AMBIGUOUS, PERMANENT, Effect, classify, retry_after

if TYPE_CHECKING:
    from ._node import NodeSpec

__all__ = [
    "CLOCK",
    "Attempts",
    "call_async",
    "call_sync",
    "retry_async",
    "retry_sync",
    "run_async",
    "run_sync",
]


class _Clock:
    """Where the drivers sleep; `nodekit.testing.instant()` swaps these for recorders."""

    __slots__ = ("asleep", "sleep")

    def __init__(self) -> None:
        self.sleep: Callable[[float], None] = time.sleep
        self.asleep: Callable[[float], Awaitable[None]] = asyncio.sleep


CLOCK = _Clock()


class Attempts:
    """The decisions of one logical call's retry loop (no I/O)."""

    __slots__ = ("ctx", "observed", "spec", "started", "t0")

    def __init__(self, spec: NodeSpec, ctx: NodeContext, *, announce: bool) -> None:
        self.spec = spec
        self.ctx = ctx
        self.started = time.monotonic()
        self.t0 = time.perf_counter()
        self.observed = announce
        if announce:
            emit("node.started", spec.name, ctx.run_id, ctx.attempt, effect=spec.effect.value)

    def budget(self) -> float | None:
        """Seconds the next attempt may take, or None for no limit."""
        per = self.spec.attempt_timeout
        remaining = self.ctx.remaining()
        if remaining is None:
            return per
        if per is None:
            return remaining
        return per if per < remaining else remaining

    def succeeded(self) -> None:
        if self.observed or observed():
            ctx = self.ctx
            emit(
                "node.succeeded",
                self.spec.name,
                ctx.run_id,
                ctx.attempt,
                duration=time.perf_counter() - self.t0,
                attempts=ctx.attempt,
            )

    def failed(self, exc: Exception) -> float:
        """Decide after a failed attempt: return the wait before the next, or raise."""
        spec = self.spec
        ctx = self.ctx
        plan = spec.retry
        attempt = ctx.attempt
        if isinstance(exc, NodeTimeout):
            emit(
                "node.timed_out",
                spec.name,
                ctx.run_id,
                attempt,
                exc=exc,
                timeout=exc.timeout,
                abandoned=exc.abandoned,
            )
        if plan is None or isinstance(exc, ConfigError):
            self._give_up(exc, None)
        assert plan is not None
        kind = classify(exc)
        state = None
        if plan.tenacity_retry is not None:
            state = self._tenacity_state(exc)
            retryable = bool(plan.tenacity_retry(state))
        elif plan.predicate is not None:
            retryable = bool(plan.predicate(exc))
        else:
            retryable = kind != PERMANENT
        if not retryable:
            self._give_up(exc, f"{kind} error, not retried" if not plan.explicit else "not retried")
        if plan.stop is not None:
            state = state or self._tenacity_state(exc)
            exhausted = bool(plan.stop(state))
        else:
            exhausted = attempt >= plan.attempts
        if exhausted:
            self._give_up(exc, "retries exhausted")
        hint = retry_after(exc)
        if hint is not None:
            wait = min(hint, plan.max_wait)
        elif plan.wait is not None:
            wait = float(plan.wait(state or self._tenacity_state(exc)))
        else:
            wait = plan.backoff(attempt)
        remaining = ctx.remaining()
        if remaining is not None and wait >= remaining:
            self._give_up(exc, f"deadline: {remaining:.3f}s left, next wait {wait:.3f}s")
        # Only a retry that would really happen is refused: out of attempts or of time, the
        # original error is raised, as for any other error.
        unsafe = kind == AMBIGUOUS and spec.effect is Effect.WRITE and not spec.replay_safe
        if unsafe and not plan.explicit:
            self._unsafe(exc)
        if unsafe:
            emit(
                "node.retry_unsafe",
                spec.name,
                ctx.run_id,
                attempt,
                exc=exc,
                reason="explicit Retry(on=...) retries an ambiguous error of a WRITE node "
                "without an idempotency key",
            )
        emit(
            "node.retrying",
            spec.name,
            ctx.run_id,
            attempt,
            wait=wait,
            exc=exc,
            kind=kind,
            retry_after=hint,
        )
        return wait

    def _give_up(self, exc: Exception, reason: str | None) -> None:
        spec = self.spec
        ctx = self.ctx
        attempts = ctx.attempt
        if reason is not None:
            exc.add_note(
                f"nodekit: node {spec.name!r} gave up after {attempts} "
                f"attempt{'s' if attempts != 1 else ''} ({reason})"
            )
        emit(
            "node.failed",
            spec.name,
            ctx.run_id,
            attempts,
            duration=time.perf_counter() - self.t0,
            exc=exc,
            attempts=attempts,
            kind=classify(exc),
        )
        raise exc

    def _unsafe(self, exc: Exception) -> None:
        spec = self.spec
        ctx = self.ctx
        error = UnsafeRetry(
            f"node {spec.name!r} failed with an ambiguous error ({type(exc).__name__}: {exc}) "
            "and was not retried: the effect may already have happened, and the node is a "
            "WRITE without an idempotency key. Declare effect=nk.Effect.READ (or NONE) if the "
            "call changes nothing, or add idempotency=nk.Idempotency(...) so that a retry is "
            "a replay.",
            node=spec.name,
            attempts=ctx.attempt,
        )
        error.__cause__ = exc
        emit(
            "node.failed",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            duration=time.perf_counter() - self.t0,
            exc=exc,
            attempts=ctx.attempt,
            kind=AMBIGUOUS,
            unsafe=True,
        )
        raise error

    def _tenacity_state(self, exc: BaseException) -> Any:
        import tenacity

        state = tenacity.RetryCallState(None, self.spec.fn, (), {})  # type: ignore[arg-type]
        state.attempt_number = self.ctx.attempt
        state.start_time = self.started
        state.outcome = tenacity.Future.construct(self.ctx.attempt, exc, True)
        state.outcome_timestamp = time.monotonic()
        return state


# ---------------------------------------------------------------------------- sync driver


class _Box:
    __slots__ = ("abandoned", "done", "error", "lock", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None


def _attempt_in_thread(
    spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any, budget: float
) -> Any:
    """Run one sync attempt in a worker thread; give control back at `budget` seconds."""
    box = _Box()
    copied = contextvars.copy_context()
    fn = spec.fn
    attempt = ctx.attempt

    def target() -> None:
        try:
            box.result = copied.run(fn, *args, **kwargs)
        except BaseException as exc:
            box.error = exc
        with box.lock:
            box.done.set()
            late = box.abandoned
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

    worker = threading.Thread(target=target, name=f"nodekit:{spec.name}", daemon=True)
    # The attempt's deadline is the context's while it runs, so that remaining() inside it
    # (nested nodes, integrations passing it down) includes the per-attempt budget.
    saved = ctx.deadline
    ctx.deadline = _attempt_deadline(saved, budget)
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
                f"node {spec.name!r}: attempt {attempt} did not finish within {budget:.3f}s; "
                "it was abandoned and may still complete in its worker thread",
                node=spec.name,
                timeout=budget,
                abandoned=True,
            )
    if box.error is not None:
        raise box.error
    return box.result


def run_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run a sync node's attempts until one succeeds or the loop gives up."""
    loop = Attempts(spec, ctx, announce=observed())
    fn = spec.fn
    threaded = spec.threaded
    while True:
        try:
            if threaded:
                budget = loop.budget()
                if budget is not None and budget <= 0.0:
                    raise _deadline_error(spec, ctx)
                result = (
                    fn(*args, **kwargs)
                    if budget is None
                    else _attempt_in_thread(spec, ctx, args, kwargs, budget)
                )
            else:
                result = fn(*args, **kwargs)
        except Exception as exc:
            wait = loop.failed(exc)
            CLOCK.sleep(wait)
            ctx.next_attempt()
            continue
        loop.succeeded()
        return result


def call_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The attempt loop, entered only on the first failure when nothing needs the full one."""
    if spec.threaded or HUB.sinks or _debug(DEBUG):
        return run_sync(spec, ctx, args, kwargs)
    try:
        return spec.fn(*args, **kwargs)
    except Exception as exc:
        if spec.retry is None:
            raise
        return retry_sync(spec, ctx, args, kwargs, exc)


def retry_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any, exc: Exception) -> Any:
    """Continue the loop after the fast path's first attempt failed."""
    loop = Attempts(spec, ctx, announce=False)
    wait = loop.failed(exc)
    CLOCK.sleep(wait)
    ctx.next_attempt()
    fn = spec.fn
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            wait = loop.failed(error)
            CLOCK.sleep(wait)
            ctx.next_attempt()
            continue
        loop.succeeded()
        return result


# ---------------------------------------------------------------------------- async driver


async def _attempt_with_timeout(
    fn: Any, args: Any, kwargs: Any, budget: float, spec: NodeSpec, ctx: NodeContext
) -> Any:
    """Run one async attempt; cancel it at `budget` seconds."""
    if budget <= 0.0:
        raise _deadline_error(spec, ctx)
    timer = asyncio.timeout(budget)
    saved = ctx.deadline
    ctx.deadline = _attempt_deadline(saved, budget)  # see _attempt_in_thread
    try:
        async with timer:
            return await fn(*args, **kwargs)
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


async def run_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run an async node's attempts until one succeeds or the loop gives up."""
    loop = Attempts(spec, ctx, announce=observed())
    fn = spec.fn
    threaded = spec.threaded
    while True:
        try:
            if threaded:
                budget = loop.budget()
                result = await (
                    fn(*args, **kwargs)
                    if budget is None
                    else _attempt_with_timeout(fn, args, kwargs, budget, spec, ctx)
                )
            else:
                result = await fn(*args, **kwargs)
        except Exception as exc:
            wait = loop.failed(exc)
            await CLOCK.asleep(wait)
            ctx.next_attempt()
            continue
        loop.succeeded()
        return result


async def call_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `call_sync`."""
    if spec.threaded or HUB.sinks or _debug(DEBUG):
        return await run_async(spec, ctx, args, kwargs)
    try:
        return await spec.fn(*args, **kwargs)
    except Exception as exc:
        if spec.retry is None:
            raise
        return await retry_async(spec, ctx, args, kwargs, exc)


async def retry_async(
    spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any, exc: Exception
) -> Any:
    """Continue the loop after the fast path's first attempt failed."""
    loop = Attempts(spec, ctx, announce=False)
    wait = loop.failed(exc)
    await CLOCK.asleep(wait)
    ctx.next_attempt()
    fn = spec.fn
    while True:
        try:
            result = await fn(*args, **kwargs)
        except Exception as error:
            wait = loop.failed(error)
            await CLOCK.asleep(wait)
            ctx.next_attempt()
            continue
        loop.succeeded()
        return result


def _attempt_deadline(total: float | None, budget: float) -> float:
    own = time.monotonic() + budget
    return own if total is None or own < total else total


def _deadline_error(spec: NodeSpec, ctx: NodeContext) -> NodeTimeout:
    return NodeTimeout(
        f"node {spec.name!r}: the deadline passed before attempt {ctx.attempt} could start",
        node=spec.name,
        timeout=0.0,
        nodekit_kind="safe",  # nothing ran: unlike other timeouts, not ambiguous
    )
