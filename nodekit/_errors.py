"""The exception tree: every error nodekit raises itself derives from `NodekitError`.

User exceptions are never wrapped: after the last attempt the user's own exception is raised
with a PEP 678 note. nodekit's own errors carry context (`.node`, `.attempts`, the key's short
fingerprint) so that a handler can act on them without parsing messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
    "FlowError",
    "IdempotencyCorruptRecord",
    "IdempotencyInProgress",
    "IdempotencyLeaseLost",
    "IdempotencyMismatch",
    "IdempotencyStoreError",
    "NodeTimeout",
    "NodekitError",
    "NodekitWarning",
    "OutcomeUnknown",
    "RateLimited",
    "ResultRejected",
    "UnsafeRetry",
]


class NodekitError(Exception):
    """Root of every error nodekit raises itself."""

    node: str | None = None

    def __init__(self, message: str, *, node: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.node = node
        for name, value in context.items():
            setattr(self, name, value)


class ConfigError(NodekitError, ValueError):
    """A node, policy, store or flow is configured wrongly; raised before anything runs.

    `.option` names the offending option or parameter where there is one.
    """

    option: str | None = None


class NodeTimeout(NodekitError, TimeoutError):
    """An attempt, or the whole call, ran past its deadline.

    `.abandoned` is true for a sync attempt that could not be stopped and still runs in its
    worker thread: its effect may yet happen, so the timeout counts as ambiguous.
    """

    timeout: float | None = None
    abandoned: bool = False
    # for an abandoned attempt: registers a callback run once its worker thread finishes
    # (a bulkhead gives its slot back then, not at the timeout)
    when_finished: Callable[[Callable[[], None]], None] | None = None


class ResultRejected(NodekitError):
    """`Retry(on_result=...)` (or a tenacity `retry_if_result`) rejected every result.

    Raised when the attempts run out; `.result` is the last result, `.attempts` the attempts
    made. The message never shows the result (it may hold anything). Permanent: a keyed call
    releases its key, a fallback may replace it.
    """

    result: Any = None
    attempts: int = 0
    nodekit_kind = "permanent"


class UnsafeRetry(NodekitError):
    """A WRITE node without an idempotency key met an ambiguous error and was not retried."""

    attempts: int = 0


class IdempotencyInProgress(NodekitError):
    """Another caller holds the key's lease; transient, so an outer retry may retry it."""

    key_fingerprint: str | None = None


class IdempotencyMismatch(NodekitError):
    """The key was used before with a different payload; nothing ran."""

    key_fingerprint: str | None = None


class IdempotencyLeaseLost(NodekitError):
    """This caller's lease was taken over and no recorded outcome exists to return."""

    key_fingerprint: str | None = None


class OutcomeUnknown(NodekitError):
    """The effect may or may not have happened; the key stays locked until its lease expires."""

    key_fingerprint: str | None = None


class IdempotencyStoreError(NodekitError):
    """The idempotency store could not be reached or written; the store fails closed."""


class IdempotencyCorruptRecord(NodekitError):
    """A stored record cannot be decoded; the node does not run and the record is kept.

    Permanent: never retried, never replayed, never overwritten. `.store` names the store,
    `.key_fingerprint` the key (12 hex digits) and `.field` the field that failed; `.fields`
    holds the record's stored fields as text (result and error payloads left out), so that
    `nodekit store show` can display it.
    """

    key_fingerprint: str | None = None
    store: str | None = None
    field: str | None = None
    fields: dict[str, str] | None = None


class NodekitWarning(UserWarning):
    """A configuration that works but is likely to hurt later (e.g. a store that keeps nothing
    on disk)."""


class CircuitOpen(NodekitError):
    """A circuit breaker refused the call; the function did not run, so it is *safe*.

    `.circuit` names the breaker and `.state` says why (``"open"``, ``"half_open"`` with every
    probe taken, or ``"isolated"``). `.retry_after` is the seconds until the breaker lets a
    probe through (`Retry` honours it like a ``Retry-After``), or None when that is unknown
    (isolated, or waiting on a probe in flight).
    """

    circuit: str | None = None
    state: str | None = None
    retry_after: float | None = None


class RateLimited(NodekitError):
    """A rate limit would make the call wait past its deadline; the function did not run.

    *Safe*. `.limit` names the `RateLimit`; `.retry_after` is the wait the call would have
    needed, in seconds.
    """

    limit: str | None = None
    retry_after: float | None = None


class BulkheadFull(NodekitError):
    """A bulkhead had no free slot (and no queue place, or none freed before the deadline);
    the function did not run, so it is *safe*.

    `.bulkhead` names it; `.limit` and `.queue` are its sizes.
    """

    bulkhead: str | None = None
    limit: int = 0
    queue: int = 0


class FlowError(NodekitError):
    """A flow failed: carries the state as it stood, the completed nodes and the failing node.

    `field` names the state field at fault when the failure was an invalid update. In a flow
    with compensations (``flow.add(node, compensate=undo)``), `compensated` names the nodes
    undone (in the order their compensations ran) and `not_compensated` maps each node whose
    compensation failed to why; the node's error stays the cause.
    """

    state: Any = None
    completed: tuple[str, ...] = ()
    failed: str | None = None
    field: str | None = None
    run_id: str | None = None
    compensated: tuple[str, ...] = ()
    not_compensated: Mapping[str, str] = MappingProxyType({})
