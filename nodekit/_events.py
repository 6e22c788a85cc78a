"""One event model: every output (logs, metrics, streams, journals) is a sink of one stream.

An `Event` is emitted only when someone listens: a registered sink, an active capture, a
``"nodekit"`` logger enabled for the event's level, or (off the success path) the run log of
the durable run the caller runs in (`RUN_SINK`, scoped to that run's context). The success
path of a node asks one cheap question (`observed()`) and does no event work when the answer
is no.

nodekit never configures logging. Events go to structlog when the application configured it,
else to the standard ``logging`` logger ``"nodekit"``; the level gate for both is that stdlib
logger's effective level, so ``logging.getLogger("nodekit").setLevel(logging.DEBUG)`` turns on
the per-call events, and the application's own configuration decides where they are printed.
The user's own lines inside a node carry its ids through `ContextFilter` (stdlib) or the
`add_node_context` processor (structlog; `merge_contextvars` chains get them bound per call).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._redact import error_text
from ._runtime import CURRENT, RUNTIME

__all__ = [
    "RUN_SINK",
    "Event",
    "Sink",
    "add_node_context",
    "add_sink",
    "configure_logging",
    "emit",
    "observed",
    "remove_sink",
    "structlog_binds",
]

logger = logging.getLogger("nodekit")
# The logging HOWTO's advice for libraries: no output unless the application configures it.
logger.addHandler(logging.NullHandler())

DEBUG = logging.DEBUG
INFO = logging.INFO
WARNING = logging.WARNING
ERROR = logging.ERROR

_LEVELS: dict[str, int] = {
    "node.started": DEBUG,
    "node.succeeded": DEBUG,
    "node.replayed": INFO,
    "node.retrying": WARNING,
    "node.retry_unsafe": WARNING,
    "node.timed_out": WARNING,
    "node.abandoned_finished": INFO,
    "node.failed": ERROR,
    "node.fallback": WARNING,
    "node.progress": INFO,
    "circuit.opened": ERROR,
    "circuit.half_opened": INFO,
    "circuit.closed": INFO,
    "circuit.rejected": INFO,
    "rate_limit.waited": DEBUG,
    "rate_limit.rejected": WARNING,
    "rate_limit.paused": WARNING,
    "bulkhead.rejected": WARNING,
    "flow.started": INFO,
    "flow.node_started": DEBUG,
    "flow.node_finished": DEBUG,
    "flow.node_skipped": INFO,
    "flow.finished": INFO,
    "flow.failed": ERROR,
    "flow.compensating": WARNING,
    "node.compensated": INFO,
    "node.compensation_failed": ERROR,
    "idempotency.acquired": DEBUG,
    "idempotency.completed": DEBUG,
    "idempotency.replayed": INFO,
    "idempotency.waited": INFO,
    "idempotency.released": INFO,
    "idempotency.takeover": WARNING,
    "idempotency.in_progress": WARNING,
    "idempotency.mismatch": ERROR,
    "idempotency.lease_lost": ERROR,
    "idempotency.outcome_unknown": ERROR,
    "idempotency.store_error": ERROR,
    "idempotency.heartbeat": DEBUG,
    "idempotency.resolved": WARNING,
    "http.response": DEBUG,
    "files.put": DEBUG,
    "files.write": DEBUG,
}


# fields that stay in process: a flow's state and a node's update hold the user's payload
_UNLOGGED = frozenset({"state", "update"})


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, with a dotted `name` and structured fields.

    `error` is the error's type and message, redacted, on one line and shortened (see
    `short_error`); `exc` is the exception object itself for in-process sinks and is never
    logged. `fields` holds event-specific values; none of them
    is ever a raw idempotency key, payload or secret.
    """

    name: str
    node: str | None = None
    run_id: str | None = None
    attempt: int = 0
    time: float = 0.0
    level: int = INFO
    duration: float | None = None
    wait: float | None = None
    error: str | None = None
    exc: BaseException | None = field(default=None, repr=False, compare=False)
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """Look a value up among the event's attributes and its `fields`."""
        if name in self.fields:
            return self.fields[name]
        if name in Event.__dataclass_fields__:
            return getattr(self, name)
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """The event's loggable fields: without the exception object, and without values that
        may carry payloads (a flow's final ``state``), which in-process sinks still get."""
        out: dict[str, Any] = {"node": self.node}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        if self.attempt:
            out["attempt"] = self.attempt
        if self.duration is not None:
            out["duration"] = round(self.duration, 6)
        if self.wait is not None:
            out["wait"] = round(self.wait, 6)
        if self.error is not None:
            out["error"] = self.error
        for name, value in self.fields.items():
            if name not in _UNLOGGED:
                out[name] = value
        return out


class Sink(Protocol):
    """Anything called with each event; must be fast and must not raise."""

    def __call__(self, event: Event, /) -> None: ...


# The sink of the durable run this context runs in (its run log, `flow/_runlog.py`): set by
# the run in its own context, so its node calls, tasks and worker threads (which run in
# copies of that context) reach it, and nothing else in the process does. `observed()` does
# not ask it: a node's success path stays as it is, and only `emit` (off that path) delivers
# to it.
RUN_SINK: ContextVar[Callable[[Event], None] | None] = ContextVar("nodekit_run_sink", default=None)


# The sinks are `RUNTIME.sinks`: a tuple replaced whole under `RUNTIME.lock`, so that emit never
# takes a lock; `RUNTIME.reset()` drops every sink.
is_enabled_for = logger.isEnabledFor


def wanted(name: str) -> bool:
    """Whether an event of this name would reach anyone (a sink, or the log at its level):
    callers that build costly fields ask first (off a node's success path: a durable run's
    scoped sink counts)."""
    return (
        bool(RUNTIME.sinks) or RUN_SINK.get() is not None or is_enabled_for(_LEVELS.get(name, INFO))
    )


def observed() -> bool:
    """Whether anyone listens to per-call (DEBUG) events: the hot path's one question."""
    return bool(RUNTIME.sinks) or is_enabled_for(DEBUG)


def add_sink(sink: Sink) -> Callable[[], None]:
    """Register a sink for every event in this process; returns a function that removes it."""
    with RUNTIME.lock:
        RUNTIME.sinks = (*RUNTIME.sinks, sink)

    def remove() -> None:
        remove_sink(sink)

    return remove


def remove_sink(sink: Sink) -> None:
    """Unregister a sink added with `add_sink` (no error if it is not registered)."""
    with RUNTIME.lock:
        sinks = list(RUNTIME.sinks)
        for index, item in enumerate(sinks):
            if item is sink:
                del sinks[index]
                break
        RUNTIME.sinks = tuple(sinks)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """The error's type and message as events and logs show it: redacted (`_redact`: URL
    secrets, passwords, tokens, pydantic's ``input_value``, the user's redactors), on one
    line, at most `limit` characters. Only failures pay for it."""
    return error_text(exc, limit)


def emit(
    name: str,
    node: str | None = None,
    run_id: str | None = None,
    attempt: int = 0,
    *,
    duration: float | None = None,
    wait: float | None = None,
    exc: BaseException | None = None,
    **fields: Any,
) -> None:
    """Build and deliver one event, if anyone listens to its level."""
    level = _LEVELS.get(name, INFO)
    sinks = RUNTIME.sinks
    log = is_enabled_for(level)
    scoped = RUN_SINK.get()
    if not sinks and not log and scoped is None:
        return
    event = Event(
        name=name,
        node=node,
        run_id=run_id,
        attempt=attempt,
        time=time.time(),
        level=level,
        duration=duration,
        wait=wait,
        error=None if exc is None else short_error(exc),
        exc=exc,
        fields=fields,
    )
    for target in sinks:
        try:
            target(event)
        except Exception:  # a broken sink must never break a node
            logger.debug("nodekit: event sink %r failed", target, exc_info=True)
    if scoped is not None:
        try:
            scoped(event)
        except Exception:
            logger.debug("nodekit: event sink %r failed", scoped, exc_info=True)
    if log:
        _log(event)


# ---------------------------------------------------------------------------- structlog


def add_node_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: add the running node's ``node``, ``run_id`` and ``attempt``.

    Put it in your processor chain (``structlog.configure(processors=[..., nk.add_node_context,
    ...])``) and every line logged inside a node carries them, in worker threads and tasks too.
    It reads the node's context when a line is logged, so a node call pays nothing for it; with
    it in the chain nodekit stops binding the ids into contextvars for ``merge_contextvars``
    (see `structlog_binds`). Values the line or the context already has are kept.
    """
    ctx = CURRENT.get()
    if ctx is not None:
        event_dict.setdefault("node", ctx.node)
        event_dict.setdefault("run_id", ctx.run_id)
        event_dict.setdefault("attempt", ctx.attempt)
    return event_dict


class _PublicConfig:
    """structlog's configuration read through its public functions (slower): the fallback for
    a structlog without the `_config._CONFIG` object every version since 2013 has had."""

    __slots__ = ("_structlog",)

    def __init__(self, structlog: Any) -> None:
        self._structlog = structlog

    @property
    def is_configured(self) -> bool:
        return bool(self._structlog.is_configured())

    @property
    def default_processors(self) -> Any:
        return self._structlog.get_config()["processors"]


class _Binding:
    """Whether node calls bind node, run id and attempt into contextvars for structlog.

    The binding keeps ``merge_contextvars`` chains showing the ids, at about a microsecond a
    call; `add_node_context` gives the same ids for nothing. So nodekit binds only while
    structlog is configured with a processor chain that lacks `add_node_context`: not while
    structlog is unconfigured (imported by a dependency, or printing its development defaults),
    and not once the processor is in the chain. The answer is cached per chain (structlog
    replaces the list on every ``configure`` and ``reset_defaults``; a list changed in place
    keeps its answer until the next of those), so asking costs two attribute reads and an
    identity test.
    """

    __slots__ = ("config", "seen")

    def __init__(self) -> None:
        self.config: Any = None
        self.seen: tuple[Any, bool] = (None, False)

    def __call__(self) -> bool:
        config = self.config
        if config is None:
            structlog = sys.modules.get("structlog")
            if structlog is None:
                return False
            config = getattr(getattr(structlog, "_config", None), "_CONFIG", None)
            config = self.config = config or _PublicConfig(structlog)
        if not config.is_configured:
            return False
        processors = config.default_processors
        seen = self.seen
        if seen[0] is processors:
            return seen[1]
        binds = not any(processor is add_node_context for processor in processors)
        self.seen = (processors, binds)  # one tuple: a racing reader sees a consistent pair
        return binds


# Callers ask only once structlog is loaded (``"structlog" in sys.modules``); the bound method,
# which a call reaches faster than an instance's __call__ (the node's success path asks).
structlog_binds = _Binding().__call__


def _log(event: Event) -> None:
    structlog = sys.modules.get("structlog")
    if structlog is not None and structlog.is_configured():
        structlog.get_logger("nodekit").log(event.level, event.name, **event.as_dict())
        return
    values = event.as_dict()
    text = " ".join(f"{key}={value}" for key, value in values.items() if value is not None)
    logger.log(event.level, "%s %s", event.name, text, extra={"nodekit": values})


def configure_logging(level: int | str = logging.INFO, *, stream: Any = None) -> None:
    """Print nodekit's events to stderr (or `stream`): for applications and the command line.

    Library code never calls this. It attaches one handler to the ``"nodekit"`` logger only.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    handler.addFilter(ContextFilter())
    for existing in list(logger.handlers):
        if getattr(existing, "_nodekit_handler", False):
            logger.removeHandler(existing)
    handler._nodekit_handler = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


class ContextFilter(logging.Filter):
    """A logging filter that adds the running node's ids to every record.

    Add it to your handlers so your own log lines inside a node carry ``node``, ``run_id``
    and ``attempt`` (for structlog, put `add_node_context` in the processor chain).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # read by attribute: events sit below the node context and never import it
        ctx = CURRENT.get()
        record.node = ctx.node if ctx is not None else None
        record.run_id = ctx.run_id if ctx is not None else None
        record.attempt = ctx.attempt if ctx is not None else None
        return True
