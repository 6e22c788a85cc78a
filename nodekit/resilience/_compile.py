"""A node's resilience options compiled onto its spec: per-attempt guards and the fallback.

The guards go on in one documented order, outermost first — circuit breaker, rate limit,
bulkhead — inside the retry loop and outside the attempt timeout, so each acts per attempt:
a refused attempt never takes a rate-limit place or a slot, and a rate-limit wait never holds
a slot. The fallback wraps the whole call, idempotency included.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError
from .._spec import AttemptGuard, NodeSpec
from ._breaker import CircuitBreaker
from ._bulkhead import Bulkhead
from ._fallback import install_fallback
from ._limiter import RateLimit

__all__ = ["compile_resilience"]

_GUARDS: tuple[tuple[str, type[Any], str], ...] = (
    ("circuit", CircuitBreaker, "nk.CircuitBreaker"),
    ("rate_limit", RateLimit, "nk.RateLimit"),
    ("bulkhead", Bulkhead, "nk.Bulkhead"),
)


def compile_resilience(spec: NodeSpec, config: dict[str, Any]) -> None:
    """Set `spec.guards` and wrap its drivers in the fallback; `ConfigError` on a bad option.

    Call it after the driver is chosen (the fallback wraps a keyed call too).
    """
    guards: list[AttemptGuard] = []
    for option, cls, label in _GUARDS:
        value = config.get(option)
        if value is None:
            continue
        if not isinstance(value, cls):
            raise ConfigError(
                f"node {spec.name!r}: {option} must be a {label} or None, got {value!r}",
                node=spec.name,
                option=option,
            )
        guards.append(value._guard)
    spec.guards = tuple(guards)
    fallback = config.get("fallback")
    if fallback is not None:
        install_fallback(spec, fallback)
