"""`RateLimit`: at most `rate` attempts per `per` seconds, spaced by GCRA, Retry-After aware.

Each attempt reserves its start time in one GCRA step and waits for it through nodekit's
runtime (`RUNTIME.sleep` / `asleep`, so `nodekit.testing.instant()` records the waits). A wait
that would pass the call's deadline reserves nothing and raises `RateLimited` (safe: the
function did not run). When the guarded function fails with an error carrying a Retry-After
(a 429 or 503 from `nodekit.http`, or any error with a ``retry_after`` attribute), the limit
pauses for that long, so every caller sharing it slows down, not only the one that was told.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from .._classify import retry_after
from .._errors import ConfigError, RateLimited
from .._events import emit, observed
from .._policies import Seconds
from .._runtime import RUNTIME
from .._spec import AttemptWait, NodeSpec
from ._common import cell_for, check_count, check_name, check_seconds, is_refusal, state_for
from ._state import LimiterBackend, LimiterSettings, MemoryLimiter

__all__ = ["RateLimit", "RateLimitGuard"]

_KIND = "RateLimit"


class RateLimit:
    """A rate limit shared by every node that names it in ``@nk.node(rate_limit=...)``.

    `rate` calls per `per` seconds (a float or `timedelta`), as a steady pace: calls start
    ``per / rate`` seconds apart. `burst` (default 1) is how many may start at once after a
    quiet period; in any window of ``w`` seconds at most ``burst + w * rate / per`` calls
    start. `store=None` keeps the state in this object; a `MemoryStore` shares it with every
    limit of the same name on that store; a SQLite, Redis or PostgreSQL store with every
    process using it (one atomic step per attempt on the store's clock; a pause holds for
    all). A limit whose store cannot be reached refuses the attempt (`RateLimited`, safe).
    """

    __slots__ = ("_backend", "_guard", "burst", "name", "per", "rate", "store")

    def __init__(
        self,
        name: str,
        rate: float,
        per: Seconds = 1.0,
        *,
        burst: int | None = None,
        store: Any = None,
    ) -> None:
        self.name = check_name(_KIND, name)
        if (
            not isinstance(rate, int | float)
            or isinstance(rate, bool)
            or not 0.0 < rate < float("inf")
        ):
            raise ConfigError(
                f"{_KIND} {name!r}: rate must be a number > 0, got {rate!r}", option="rate"
            )
        self.rate = rate
        self.per = check_seconds(_KIND, name, "per", per)
        self.burst = 1 if burst is None else check_count(_KIND, name, "burst", burst, least=1)
        self.store = store
        settings = LimiterSettings(interval=self.per / rate, burst=self.burst)
        self._backend: LimiterBackend = state_for(
            _KIND,
            self.name,
            store,
            settings,
            lambda: MemoryLimiter(settings),
            lambda kind, store: _shared_limiter(kind, store, self.name, settings),
        )
        self._guard = RateLimitGuard(self)

    def __repr__(self) -> str:
        return f"RateLimit({self.name!r}, {self.rate}, per={self.per}, burst={self.burst})"


class RateLimitGuard:
    """The rate limit as one per-attempt layer (`_spec.AttemptGuard`).

    With a shared store, a store that fails *refuses* the attempt: `RateLimited` chained to
    the store's error (safe: the function did not run); a pause it cannot record is dropped.
    """

    __slots__ = ("awaits", "backend", "name", "shared")

    def __init__(self, limit: RateLimit) -> None:
        self.name = limit.name
        self.backend = limit._backend
        self.shared = getattr(self.backend, "shared", False)
        # a shared limit does I/O: awaited. A local one reserves in memory, and an async
        # node awaits only a wait (`AttemptWait`), never a coroutine per attempt
        self.awaits = self.shared

    def _granted(self, spec: NodeSpec, ctx: Any, granted: bool, wait: float) -> float:
        """The wait before this attempt may start (reserved), or `RateLimited`."""
        if granted:
            if wait and observed():
                emit(
                    "rate_limit.waited",
                    spec.name,
                    ctx.run_id,
                    ctx.attempt,
                    wait=wait,
                    limit=self.name,
                )
            return wait
        emit("rate_limit.rejected", spec.name, ctx.run_id, ctx.attempt, wait=wait, limit=self.name)
        raise RateLimited(
            f"node {spec.name!r}: rate limit {self.name!r} would make the call wait {wait:.3f}s, "
            "past its deadline; the function did not run",
            node=spec.name,
            limit=self.name,
            retry_after=wait,
        )

    def _store_failed(self, spec: NodeSpec, ctx: Any, exc: Exception) -> RateLimited:
        emit(
            "rate_limit.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc, limit=self.name
        )
        return RateLimited(
            f"node {spec.name!r}: rate limit {self.name!r} cannot reach its store "
            f"({type(exc).__name__}); the function did not run",
            node=spec.name,
            limit=self.name,
        )

    def enter(self, spec: NodeSpec, ctx: Any) -> AttemptWait | None:
        try:
            granted, wait = self.backend.reserve(monotonic(), ctx.remaining())
        except Exception as exc:
            raise self._store_failed(spec, ctx, exc) from exc
        if granted and not wait:  # the path of every attempt under the rate
            return None
        wait = self._granted(spec, ctx, granted, wait)
        if wait:
            if spec.is_async:
                return AttemptWait(wait)  # the async attempt loop awaits it
            RUNTIME.sleep(wait)
        return None

    async def aenter(self, spec: NodeSpec, ctx: Any) -> None:
        backend: Any = self.backend
        try:
            if self.shared:
                granted, wait = await backend.areserve(monotonic(), ctx.remaining())
            else:
                granted, wait = backend.reserve(monotonic(), ctx.remaining())
        except Exception as exc:
            raise self._store_failed(spec, ctx, exc) from exc
        wait = self._granted(spec, ctx, granted, wait)
        if wait:
            await RUNTIME.asleep(wait)

    def _pause_for(self, error: BaseException | None) -> float | None:
        if error is None or not isinstance(error, Exception) or is_refusal(error):
            return None
        return retry_after(error) or None

    def _paused(self, spec: NodeSpec, ctx: Any, error: Any, pause: float) -> None:
        emit(
            "rate_limit.paused",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            wait=pause,
            exc=error,
            limit=self.name,
        )

    def exit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None:
        if error is None:  # the path of every successful attempt
            return
        pause = self._pause_for(error)
        if pause is None:
            return
        try:
            paused = self.backend.pause(now, pause)
        except Exception as exc:  # never replaces the call's own error
            emit("rate_limit.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc)
            return
        if paused:
            self._paused(spec, ctx, error, pause)

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
        pause = self._pause_for(error)
        if pause is None:
            return
        backend: Any = self.backend
        try:
            paused = await backend.apause(now, pause)
        except Exception as exc:
            emit("rate_limit.store_failed", spec.name, ctx.run_id, ctx.attempt, exc=exc)
            return
        if paused:
            self._paused(spec, ctx, error, pause)


def _shared_limiter(
    store_kind: str, store: Any, name: str, settings: LimiterSettings
) -> LimiterBackend:
    if store_kind == "redis":
        from ._redis import RedisLimiter

        return RedisLimiter(store, name, settings)
    cell = cell_for(store_kind, store)
    if store_kind == "sqlite":
        from ._sqlite import SQLiteLimiter

        return SQLiteLimiter(cell, name, settings)
    from ._postgres import PostgresLimiter

    return PostgresLimiter(cell, name, settings)
