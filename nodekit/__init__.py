"""nodekit: resilient, side-effect-aware nodes for Python.

Decorate a function with `node` to give it retries with backoff, timeouts and deadlines,
idempotency keys and structured events, chosen by what the function does to the world
(`Effect`). Compose nodes into a `Flow` and run it in sync or async mode.
"""

from typing import TYPE_CHECKING

from ._classify import classify, register_classifier
from ._context import NodeContext, context
from ._errors import (
    BulkheadFull,
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
    RateLimited,
    ResultRejected,
    UnsafeRetry,
)
from ._events import (
    ContextFilter,
    Event,
    Sink,
    add_node_context,
    add_sink,
    configure_logging,
    remove_sink,
)
from ._execution import attempts
from ._map import MapResult
from ._metrics import Metrics, NodeMetrics
from ._node import Node, node
from ._policies import Effect, Retry, Timeout
from ._redact import add_redactor
from ._resources import managed, override, resource, use
from .flow import END, Flow
from .idempotency import (
    Idempotency,
    MemoryStore,
    NodekitWarning,
    aresolve,
    open_store,
    resolve,
    set_default_store,
)
from .resilience import Bulkhead, CircuitBreaker, RateLimit

if TYPE_CHECKING:  # imported lazily at run time (see __getattr__), typed here
    from ._batch import Batch
    from .idempotency.postgres import PostgresStore
    from .idempotency.redis import RedisStore
    from .idempotency.sqlite import SQLiteStore

__version__ = "0.1.0.dev0"

__all__ = [  # noqa: RUF022 - plainly sorted (END among the capitals), as the test pins it
    "Batch",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigError",
    "ContextFilter",
    "END",
    "Effect",
    "Event",
    "Flow",
    "FlowError",
    "Idempotency",
    "IdempotencyCorruptRecord",
    "IdempotencyInProgress",
    "IdempotencyLeaseLost",
    "IdempotencyMismatch",
    "IdempotencyStoreError",
    "MapResult",
    "MemoryStore",
    "Metrics",
    "Node",
    "NodeContext",
    "NodeMetrics",
    "NodeTimeout",
    "NodekitError",
    "NodekitWarning",
    "OutcomeUnknown",
    "PostgresStore",
    "RateLimit",
    "RateLimited",
    "RedisStore",
    "ResultRejected",
    "Retry",
    "SQLiteStore",
    "Sink",
    "Timeout",
    "UnsafeRetry",
    "add_node_context",
    "add_redactor",
    "add_sink",
    "aresolve",
    "attempts",
    "classify",
    "configure_logging",
    "context",
    "managed",
    "node",
    "open_store",
    "override",
    "register_classifier",
    "remove_sink",
    "resolve",
    "resource",
    "set_default_store",
    "use",
]


def __getattr__(name: str) -> object:
    # batching is imported when first used: `import nodekit` does not pay for it
    if name == "Batch":
        from ._batch import Batch

        return Batch
    # durable stores import their drivers (sqlite3, redis, psycopg) only when asked for
    if name in ("SQLiteStore", "RedisStore", "PostgresStore"):
        from . import idempotency

        return getattr(idempotency, name)
    raise AttributeError(f"module 'nodekit' has no attribute {name!r}")
