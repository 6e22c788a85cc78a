"""The decisions of one logical call's retry loop: wait how long, or give up with what.

`Attempts` does no I/O: it never sleeps, calls or awaits. After a failed attempt it returns
how long to wait before the next one, or raises what the caller must see — the original
exception with a note (PEP 678), or `UnsafeRetry` for an ambiguous failure of a WRITE that
no key guards. A keyed WRITE retries an ambiguous failure only when the attempt carried its
key downstream (`NodeContext.key_carried`); otherwise the original error is raised and the
keyed call turns it into `OutcomeUnknown`. The drivers (`_drivers.py`) carry its answers out.
"""

from __future__ import annotations

import time
from typing import Any

from .._classify import AMBIGUOUS, PERMANENT, classify, retry_after
from .._context import NodeContext
from .._errors import CircuitOpen, ConfigError, NodeTimeout, ResultRejected, UnsafeRetry
from .._events import emit, observed
from .._policies import Effect, RetryPlan
from .._redact import error_text
from .._runtime import RUNTIME
from .._spec import NodeSpec

__all__ = ["Attempts", "attempt_budget", "attempt_deadline", "deadline_error"]


class Attempts:
    """The decisions of one logical call's retry loop (no I/O)."""

    __slots__ = ("ctx", "observed", "spec", "started", "t0")

    def __init__(self, spec: NodeSpec, ctx: NodeContext, *, announce: bool = True) -> None:
        self.spec = spec
        self.ctx = ctx
        self.started = time.monotonic()
        self.t0 = time.perf_counter()
        self.observed = announce
        if announce:
            emit("node.started", spec.name, ctx.run_id, ctx.attempt, effect=spec.effect.value)

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
        spec, ctx = self.spec, self.ctx
        plan = spec.retry
        if isinstance(exc, NodeTimeout):
            emit(
                "node.timed_out",
                spec.name,
                ctx.run_id,
                ctx.attempt,
                exc=exc,
                timeout=exc.timeout,
                abandoned=exc.abandoned,
            )
        if plan is None or isinstance(exc, ConfigError):
            self._give_up(exc, None)
        assert plan is not None
        kind = classify(exc)
        state = self._check_retryable(exc, kind, plan)
        hint = retry_after(exc)
        if isinstance(exc, CircuitOpen) and (hint is None or hint > plan.max_wait):
            # the breaker would refuse the retry too: fail fast, as it means to
            self._give_up(exc, "circuit open" if hint is None else f"circuit open for {hint:.3f}s")
        if hint is not None:
            wait = min(hint, plan.max_wait)
        elif plan.wait is not None:
            wait = float(plan.wait(state or self._tenacity_state(exc)))
        else:
            wait = plan.backoff(ctx.attempt)
        remaining = ctx.remaining()
        if remaining is not None and wait >= remaining:
            self._give_up(exc, f"deadline: {remaining:.3f}s left, next wait {wait:.3f}s")
        # Only a retry that would really happen is refused: out of attempts or of time, the
        # original error is raised, as for any other error.
        if kind == AMBIGUOUS and spec.effect is Effect.WRITE and not spec.replay_safe:
            if spec.idempotency is None:
                self._unsafe_retry(exc, plan)
            elif not ctx.key_carried:
                self._uncarried(exc, plan)
        emit(
            "node.retrying",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            wait=wait,
            exc=exc,
            kind=kind,
            retry_after=hint,
        )
        return wait

    def _check_retryable(self, exc: Exception, kind: str, plan: RetryPlan) -> Any:
        """Give up unless the error is retried and attempts remain; the tenacity state, if built."""
        state = None
        if isinstance(exc, ResultRejected):
            retryable = True  # `on_result` said so: the caller's decision
        elif plan.tenacity_retry is not None:
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
            exhausted = self.ctx.attempt >= plan.attempts
        cap = RUNTIME.max_attempts  # `nodekit.testing.set_testing`: every loop capped
        if cap is not None and self.ctx.attempt >= cap:
            exhausted = True
        if exhausted:
            self._give_up(exc, "retries exhausted")
        return state

    def _unsafe_retry(self, exc: Exception, plan: RetryPlan) -> None:
        """An ambiguous error of a WRITE no key guards: refused, unless `Retry(on=...)` says so."""
        if not plan.explicit:
            self._unsafe(exc)
        self._retried_anyway(exc, "a WRITE node without an idempotency key")

    def _uncarried(self, exc: Exception, plan: RetryPlan) -> None:
        """An ambiguous error of a keyed WRITE whose attempt sent no key downstream.

        The key guards this process's claim, not the server: a function that calls a plain
        client itself would repeat the effect on a retry. Not retried (the keyed call keeps
        the key and raises `OutcomeUnknown`), unless `Retry(on=...)` says so.
        """
        if not plan.explicit:
            self._give_up(
                exc,
                "ambiguous error, not retried: the attempt sent no idempotency key downstream "
                "(nodekit.http, nodekit.sql or nk.context().idempotency_key_for(...)), so a "
                "retry could repeat the effect",
            )
        self._retried_anyway(
            exc, "a keyed WRITE node whose attempt sent no idempotency key downstream"
        )

    def _retried_anyway(self, exc: Exception, what: str) -> None:
        """The warning event for an ambiguous error an explicit `Retry(on=...)` retries."""
        emit(
            "node.retry_unsafe",
            self.spec.name,
            self.ctx.run_id,
            self.ctx.attempt,
            exc=exc,
            reason=f"explicit Retry(on=...) retries an ambiguous error of {what}",
        )

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
            f"node {spec.name!r} failed with an ambiguous error ({error_text(exc)}) "
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


def attempt_budget(spec: NodeSpec, ctx: NodeContext) -> float | None:
    """Seconds the next attempt may take (its own timeout, or less if the deadline is
    nearer), or None for no limit."""
    per = spec.attempt_timeout
    remaining = ctx.remaining()
    if remaining is None:
        return per
    if per is None:
        return remaining
    return per if per < remaining else remaining


def attempt_deadline(total: float | None, budget: float) -> float:
    """The deadline while one attempt runs: its own budget, or the call's if nearer."""
    own = time.monotonic() + budget
    return own if total is None or own < total else total


def deadline_error(spec: NodeSpec, ctx: NodeContext) -> NodeTimeout:
    """The deadline passed before an attempt could start: nothing ran, so it is safe."""
    return NodeTimeout(
        f"node {spec.name!r}: the deadline passed before attempt {ctx.attempt} could start",
        node=spec.name,
        timeout=0.0,
        nodekit_kind="safe",  # nothing ran: unlike other timeouts, not ambiguous
    )
