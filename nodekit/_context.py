"""The running node's context (`NodeContext`, `context()`) and run ids.

`context()` reads one context variable (`_runtime.CURRENT`) set for the duration of a node
call, so it works in worker threads (the timeout thread runs in a copy of the caller's
context) and in tasks. Resources and their injection live in `_resources`.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Protocol

from . import _events
from ._canonical import derive_key
from ._errors import ConfigError, NodekitError
from ._redact import redact_fields

# Re-exported for `nodekit.flow`, which still imports them from here; new code imports them
# from `_resources`.
from ._runtime import CURRENT, LOG_ATTEMPT, RUNTIME

__all__ = [
    "NodeContext",
    "bind_run_id",
    "context",
    "current_or_none",
    "new_run_id",
    "reset_run_id",
    "set_run_id",
]

# the fields of a `node.progress` event that `NodeContext.emit` sets itself (or `Event` has),
# and ``t``/``name``: a stored event's time and name (the run log's lines)
_RESERVED = frozenset({"progress", "t", "name", *_events.Event.__dataclass_fields__})

# A run id set by a flow (or by `run_id()`) for every node called inside it.
_RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("nodekit_run_id", default=None)


class NamedSpec(Protocol):
    """What a context needs of its node's spec (`nodekit._node.NodeSpec` satisfies it)."""

    @property
    def name(self) -> str: ...


def new_run_id() -> str:
    """A process-unique, cheap run id (random per process, then a counter)."""
    return RUNTIME.new_run_id()


def bind_run_id(ctx: NodeContext) -> str:
    """`ctx.run_id`, computed inline (bound for structlog's `merge_contextvars` on every call
    while its chain lacks `nk.add_node_context`)."""
    parent = ctx.parent
    run_id = parent.run_id if parent is not None else _RUN_ID.get()
    if run_id is None:
        runtime = RUNTIME
        run_id = runtime.run_prefix + format(next(runtime.run_counter), "x")
    ctx._run_id = run_id
    return run_id


class NodeContext:
    """What a running node can know about its own call.

    `attempt` counts from 1; `deadline` is a `time.monotonic()` instant or None, and
    `remaining()` the seconds left before it (the smaller of this node's budget and any
    enclosing node's). `idempotency_key` is the key's digest (never the raw key) and `epoch`
    the fencing epoch of the lease, when the node is keyed; `replayed` is true when the result
    came from the store. `key_carried` is true once the current attempt derived a downstream
    key (`idempotency_key_for`, which `nodekit.http` and the outbox call): only then may a
    keyed WRITE retry an ambiguous error.
    """

    __slots__ = (
        "_run_id",
        "_spec",
        "attempt",
        "deadline",
        "epoch",
        "idempotency_key",
        "key_carried",
        "lease",
        "parent",
        "replayed",
    )

    # What holds this call's key (the keyed call, `idempotency._keyed`), set once the key is
    # acquired; unset on an unkeyed call, so that the hot path does not pay for it.
    lease: Any

    def __init__(self, spec: NamedSpec, parent: NodeContext | None, deadline: float | None) -> None:
        self._spec = spec
        self.parent = parent
        self.attempt = 1
        self.deadline = deadline
        self._run_id: str | None = None
        self.idempotency_key: str | None = None
        self.key_carried = False
        self.epoch: int | None = None
        self.replayed = False

    @property
    def node(self) -> str:
        return self._spec.name

    @property
    def run_id(self) -> str:
        run_id = self._run_id
        if run_id is None:
            parent = self.parent
            run_id = self._run_id = (
                parent.run_id if parent is not None else (_RUN_ID.get() or new_run_id())
            )
        return run_id

    def next_attempt(self) -> None:
        """Count the next attempt (and show it in structlog's context when bound)."""
        self.attempt += 1
        self.key_carried = False
        if LOG_ATTEMPT.get() is not ...:
            LOG_ATTEMPT.set(self.attempt)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def batch_keys(self) -> tuple[str | None, ...] | None:
        """In a batch node's call (`nk.Batch`), the items' key digests aligned with the items
        (None for an unkeyed item); None in any other call. Set by `nodekit._batch`."""
        return None

    def idempotency_key_for(self, step: str) -> str:
        """A downstream key derived from this call's key: the same on every attempt and resume."""
        if self.idempotency_key is None:
            raise NodekitError(
                f"node {self.node!r} has no idempotency key to derive {step!r} from: "
                "add idempotency=nk.Idempotency(...) to the node",
                node=self.node,
            )
        self.key_carried = True  # this attempt sends the key downstream: a retry is a replay
        return derive_key(self.idempotency_key, step)

    def emit(self, name: str, /, **fields: Any) -> None:
        """Report progress: a ``node.progress`` event with ``progress=name`` and `fields`.

        It carries this call's node, run id and attempt, reaches every sink (logs at INFO,
        metrics, `Flow.stream` in ``"events"`` mode, as it happens) and costs one check when
        nobody listens. Fields pass the redactor: one named like a secret (``password``,
        ``api_key``) is masked, secrets in strings hidden (see `nodekit.add_redactor`).
        Raises `NodekitError` outside a running node, `ConfigError` for a field name the
        event uses itself (``progress``, ``node``, ``run_id``, ``attempt``, ...).
        """
        if CURRENT.get() is None:
            raise NodekitError(
                f"nk.context().emit({name!r}) was called outside a running node: node "
                f"{self.node!r} has ended, or this thread or task does not run it",
                node=self.node,
            )
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"node {self.node!r}: emit() takes a non-empty event name, got {name!r}",
                node=self.node,
                option="name",
            )
        if not _RESERVED.isdisjoint(fields):
            taken = sorted(_RESERVED.intersection(fields))
            raise ConfigError(
                f"node {self.node!r}: emit({name!r}) got field(s) {taken}, which the event "
                "uses itself: rename them",
                node=self.node,
                option=taken[0],
            )
        if _events.wanted("node.progress"):
            _events.emit(
                "node.progress",
                self.node,
                self.run_id,
                self.attempt,
                progress=name,
                **redact_fields(fields),
            )

    def __repr__(self) -> str:
        return (
            f"NodeContext(node={self.node!r}, attempt={self.attempt}, "
            f"remaining={self.remaining()!r}, replayed={self.replayed})"
        )


def context() -> NodeContext:
    """The context of the node running in this thread or task."""
    ctx: NodeContext | None = CURRENT.get()
    if ctx is None:
        raise NodekitError("nk.context() is only available while a node runs")
    return ctx


def current_or_none() -> NodeContext | None:
    """The context of the node running in this thread or task, or None outside a node."""
    ctx: NodeContext | None = CURRENT.get()
    return ctx


def set_run_id(run_id: str | None) -> contextvars.Token[str | None]:
    return _RUN_ID.set(run_id)


def reset_run_id(token: contextvars.Token[str | None]) -> None:
    _RUN_ID.reset(token)
