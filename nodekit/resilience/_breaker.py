"""`CircuitBreaker`: stop calling a service that keeps failing, and probe it now and then.

Closed, the breaker counts every attempt of the nodes it guards in a sliding time window:
transient failures (`_classify`: safe or ambiguous) and, with `slow_call`, attempts slower than
that count as failed; permanent errors (the service answered: a 404, a validation error) count
as healthy. Once at least `min_calls` attempts are in the window and the failed share reaches
`failure_rate`, it opens: for `open_for` seconds every attempt is refused with `CircuitOpen`
before the function runs. Then it half-opens and lets exactly `half_open_calls` probes through:
any failed probe opens it again, and when they all succeed it closes. Refusals of other layers
(a rate limit, a bulkhead) are not outcomes: they say nothing about the service.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from .._classify import PERMANENT, classify
from .._errors import CircuitOpen, ConfigError
from .._events import emit
from .._policies import Seconds
from .._spec import NodeSpec
from ._common import cell_for, check_count, check_name, check_seconds, is_refusal, state_for
from ._state import (
    CLOSED,
    ISOLATED,
    OPEN,
    PASS,
    Admission,
    BreakerBackend,
    BreakerSettings,
    MemoryBreaker,
    Transition,
)

__all__ = ["CircuitBreaker", "CircuitGuard"]

_KIND = "CircuitBreaker"


class CircuitBreaker:
    """A circuit breaker shared by every node that names it in ``@nk.node(circuit=...)``.

    `failure_rate` (0 < rate <= 1) of the attempts in the last `window` seconds, once there
    are at least `min_calls` of them, opens it for `open_for` seconds; then `half_open_calls`
    probes decide whether it closes. `slow_call` (seconds) counts slower attempts as failed.
    Times are seconds or `timedelta`. `store=None` keeps the state in this object; a
    `MemoryStore` shares it with every breaker of the same name on that store; a SQLite, Redis
    or PostgreSQL store shares it with every process using that store (a new breaker joins
    the shared state, never resets it; half-open admits `half_open_calls` probes across all
    of them). A shared breaker caches its healthy closed state for up to
    `_shared.SYNC_EVERY` seconds, and admits calls when its store cannot be reached.
    `state` is ``"closed"``, ``"open"``, ``"half_open"`` or ``"isolated"``.
    """

    __slots__ = (
        "_backend",
        "_guard",
        "failure_rate",
        "half_open_calls",
        "min_calls",
        "name",
        "open_for",
        "slow_call",
        "store",
        "window",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float = 0.5,
        min_calls: int = 10,
        window: Seconds = 30.0,
        open_for: Seconds = 30.0,
        half_open_calls: int = 1,
        slow_call: Seconds | None = None,
        store: Any = None,
    ) -> None:
        self.name = check_name(_KIND, name)
        if (
            not isinstance(failure_rate, int | float)
            or isinstance(failure_rate, bool)
            or not 0.0 < failure_rate <= 1.0
        ):
            raise ConfigError(
                f"{_KIND} {name!r}: failure_rate must be a number in (0, 1], got {failure_rate!r}",
                option="failure_rate",
            )
        self.failure_rate = float(failure_rate)
        self.min_calls = check_count(_KIND, name, "min_calls", min_calls, least=1)
        self.window = check_seconds(_KIND, name, "window", window)
        self.open_for = check_seconds(_KIND, name, "open_for", open_for)
        self.half_open_calls = check_count(_KIND, name, "half_open_calls", half_open_calls, least=1)
        self.slow_call = (
            None if slow_call is None else check_seconds(_KIND, name, "slow_call", slow_call)
        )
        self.store = store
        settings = BreakerSettings(
            failure_rate=self.failure_rate,
            min_calls=self.min_calls,
            window=self.window,
            open_for=self.open_for,
            half_open_calls=self.half_open_calls,
            # a probe that never reports frees its place after this long
            probe_lease=max(self.open_for, self.slow_call or 0.0),
        )
        self._backend: BreakerBackend = state_for(
            _KIND,
            self.name,
            store,
            settings,
            lambda: MemoryBreaker(settings),
            lambda kind, store: _shared_breaker(kind, store, self.name, settings),
        )
        self._guard = CircuitGuard(self)

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"``, ``"half_open"`` (the next call is a probe) or ``"isolated"``."""
        return self._backend.read(monotonic())

    def isolate(self) -> None:
        """Hold the breaker open until `reset()`: every call is refused (`CircuitOpen`)."""
        self._force(ISOLATED)

    def reset(self) -> None:
        """Close the breaker and forget its window (after `isolate()`, or to end an outage)."""
        self._force(CLOSED)

    def _force(self, state: str) -> None:
        transition = self._backend.force(monotonic(), state)
        if transition is not None:
            name = "circuit.closed" if state == CLOSED else "circuit.opened"
            emit(name, None, circuit=self.name, manual=True)

    def __repr__(self) -> str:
        slow = "" if self.slow_call is None else f", slow_call={self.slow_call}"
        return (
            f"CircuitBreaker({self.name!r}, failure_rate={self.failure_rate}, "
            f"min_calls={self.min_calls}, window={self.window}, open_for={self.open_for}, "
            f"half_open_calls={self.half_open_calls}{slow}, {self._where()})"
        )

    def _where(self) -> str:
        # a shared state is not read for a repr: that would be I/O, and it may fail
        if getattr(self._backend, "shared", False):
            return f"store={self.store!r}"
        return f"state={self.state!r}"


class CircuitGuard:
    """The breaker as one per-attempt layer (`_spec.AttemptGuard`).

    With a shared store, a store that fails *opens the gate*: the attempt runs as if the
    breaker were closed (event ``circuit.store_failed``) and its outcome is not recorded.
    """

    __slots__ = ("awaits", "backend", "breaker", "name", "shared", "slow")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.name = breaker.name
        self.backend = breaker._backend
        self.slow = breaker.slow_call
        self.shared = getattr(self.backend, "shared", False)
        # in memory, entering and exiting never wait: an async node calls them directly
        self.awaits = self.shared

    def enter(self, spec: NodeSpec, ctx: Any) -> Any:
        try:
            admission = self.backend.admit(monotonic())
        except Exception as exc:
            return self._store_failed(spec, ctx, exc)
        if admission is PASS:
            return None
        return self._admitted(admission, spec, ctx)

    async def aenter(self, spec: NodeSpec, ctx: Any) -> Any:
        backend = self.backend
        try:
            if self.shared:
                admission = await backend.aadmit(monotonic())  # type: ignore[attr-defined]
            else:
                admission = backend.admit(monotonic())
        except Exception as exc:
            return self._store_failed(spec, ctx, exc)
        if admission is PASS:
            return None
        return self._admitted(admission, spec, ctx)

    def _store_failed(self, spec: NodeSpec, ctx: Any, exc: Exception) -> None:
        emit("circuit.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc, circuit=self.name)

    def _admitted(self, admission: Admission, spec: NodeSpec, ctx: Any) -> int | None:
        """A probe's fencing token, or `CircuitOpen`."""
        if admission.half_opened:
            emit("circuit.half_opened", spec.name, ctx.run_id, ctx.attempt, circuit=self.name)
        if admission.allowed:
            return admission.probe
        retry_after = admission.retry_after
        emit(
            "circuit.rejected",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            circuit=self.name,
            state=admission.state,
            retry_after=retry_after,
        )
        when = (
            "it is isolated until reset()"
            if admission.state == ISOLATED
            else "its half-open probes are in flight"
            if retry_after is None
            else f"it half-opens in {retry_after:.3f}s"
        )
        raise CircuitOpen(
            f"node {spec.name!r}: circuit {self.name!r} is open ({when}); the function did not run",
            node=spec.name,
            circuit=self.name,
            state=admission.state,
            retry_after=retry_after,
        )

    def _failed(self, error: BaseException | None, duration: float) -> bool | None:
        """Whether the attempt failed; None when it is no outcome (refused, interrupted)."""
        slow = self.slow
        if error is None:
            return slow is not None and duration > slow
        if isinstance(error, Exception) and not is_refusal(error):
            return classify(error) != PERMANENT or (slow is not None and duration > slow)
        return None

    def exit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None:
        failed = self._failed(error, duration)
        try:
            if failed is None:
                if token is not None:
                    self.backend.release(token)
                return
            transition = self.backend.record(now, token, failed)
        except Exception as exc:  # a store error never replaces the call's own outcome
            self._store_failed(spec, ctx, exc)
            return
        if transition is not None:
            self._announce(transition, spec, ctx, error)

    async def aexit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None:
        if not self.shared:
            self.exit(spec, ctx, token, error, now, duration)
            return
        backend: Any = self.backend
        failed = self._failed(error, duration)
        try:
            if failed is None:
                if token is not None:
                    await backend.arelease(token)
                return
            transition = await backend.arecord(now, token, failed)
        except Exception as exc:
            self._store_failed(spec, ctx, exc)
            return
        if transition is not None:
            self._announce(transition, spec, ctx, error)

    def _announce(
        self, transition: Transition, spec: NodeSpec, ctx: Any, error: BaseException | None
    ) -> None:
        if transition.to == OPEN:
            emit(
                "circuit.opened",
                spec.name,
                ctx.run_id,
                ctx.attempt,
                exc=error,
                circuit=self.name,
                calls=transition.calls,
                failures=transition.failures,
                open_for=self.breaker.open_for,
            )
        else:
            emit(
                "circuit.closed",
                spec.name,
                ctx.run_id,
                ctx.attempt,
                circuit=self.name,
                probes=transition.calls,
            )


def _shared_breaker(
    store_kind: str, store: Any, name: str, settings: BreakerSettings
) -> BreakerBackend:
    """A breaker on a shared store: the store's atomic steps behind the local cache."""
    from ._shared import SharedBreaker

    steps: Any
    if store_kind == "redis":
        from ._redis import RedisBreaker

        steps = RedisBreaker(store, name, settings)
    else:
        from ._docs import DocBreaker

        steps = DocBreaker(cell_for(store_kind, store), name, settings)
    return SharedBreaker(settings, steps)
