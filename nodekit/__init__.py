"""nodekit: resilient, side-effect-aware nodes for Python.

Decorate a function with `node` to give it retries with backoff, timeouts and deadlines,
idempotency keys and structured events, chosen by what the function does to the world
(`Effect`). Compose nodes into a `Flow` and run it in sync or async mode.
"""

from ._context import NodeContext, context, managed, override, resource, use
from ._errors import (
    CircuitOpen,
    ConfigError,
    FlowError,
    IdempotencyCorruptRecord,
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyMismatch,
    IdempotencyStoreError,
    NodekitError,
    NodeTimeout,
    OutcomeUnknown,
    UnsafeRetry,
)
from ._events import (
    ContextFilter,
    Event,
    Metrics,
    NodeMetrics,
    Sink,
    add_sink,
    configure_logging,
    remove_sink,
)
from ._node import Node, node
from ._policies import Effect, Retry, Timeout, classify

__version__ = "0.1.0.dev0"

__all__ = [
    "CircuitOpen",
    "ConfigError",
    "ContextFilter",
    "Effect",
    "Event",
    "FlowError",
    "IdempotencyCorruptRecord",
    "IdempotencyInProgress",
    "IdempotencyLeaseLost",
    "IdempotencyMismatch",
    "IdempotencyStoreError",
    "Metrics",
    "Node",
    "NodeContext",
    "NodeMetrics",
    "NodeTimeout",
    "NodekitError",
    "OutcomeUnknown",
    "Retry",
    "Sink",
    "Timeout",
    "UnsafeRetry",
    "add_sink",
    "classify",
    "configure_logging",
    "context",
    "managed",
    "node",
    "override",
    "remove_sink",
    "resource",
    "use",
]
