"""The public surface is curated: `__all__` is sorted and pinned."""

import nodekit as nk

EXPECTED = [
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


def test_all_is_sorted_and_exported() -> None:
    assert nk.__all__ == sorted(nk.__all__)
    for name in nk.__all__:
        assert hasattr(nk, name), name


def test_core_names_from_the_design_are_public() -> None:
    for name in ["node", "Retry", "Timeout", "Effect", "context", "resource", "use", "override"]:
        assert name in nk.__all__


def test_exported_names_are_pinned() -> None:
    """Adding or removing a public name is a deliberate change: update this list with it."""
    assert nk.__all__ == EXPECTED
