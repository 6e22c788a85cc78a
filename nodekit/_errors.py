"""The exception tree: every error nodekit raises itself derives from `NodekitError`.

User exceptions are never wrapped: after the last attempt the user's own exception is raised
with a PEP 678 note. nodekit's own errors carry context (`.node`, `.attempts`, the key's short
fingerprint) so that a handler can act on them without parsing messages.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "FlowError",
    "IdempotencyCorruptRecord",
    "IdempotencyInProgress",
    "IdempotencyLeaseLost",
    "IdempotencyMismatch",
    "IdempotencyStoreError",
    "NodeTimeout",
    "NodekitError",
    "OutcomeUnknown",
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
    """A stored record cannot be decoded; the node does not run and the record is kept."""

    key_fingerprint: str | None = None


class FlowError(NodekitError):
    """A flow failed: carries the state as it stood, the completed nodes and the failing node.

    `field` names the state field at fault when the failure was an invalid update.
    """

    state: Any = None
    completed: tuple[str, ...] = ()
    failed: str | None = None
    field: str | None = None
    run_id: str | None = None
