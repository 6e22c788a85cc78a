"""Process-wide state in one object, `RUNTIME`, and the context variables every layer reads.

Everything nodekit keeps for the whole process lives here, so that a test can put it back with
one call (`RUNTIME.reset()`; `nodekit.testing.reset_defaults()` wraps it): where the drivers
sleep, the default idempotency store, the event sinks, the user's error classifiers and
redactors, and the seed of the run ids. This module
is the bottom layer: it imports nothing from nodekit, and the layers above read and write its
attributes (`_events` keeps its sinks here, `_classify` its classifiers, `_redact` its redactors,
`idempotency._open` its default store).

The context variables are defined here rather than in `_context` so that a lower layer
(`_events`) can read the running node without importing the layer above it. `CURRENT` holds a
`nodekit._context.NodeContext` (typed `Any` here, where that class cannot be named).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

__all__ = ["CURRENT", "LOG_ATTEMPT", "LOG_NODE", "LOG_RUN", "RUNTIME", "Runtime", "Tracer"]


class Tracer(Protocol):
    """An instrumentation hook (`nodekit.otel`) around node calls, attempts and flow runs.

    Set as `RUNTIME.tracer`, None by default. Only a node call's slow path reads it (`call_sync`,
    and the attempt loop when events are observed) and the flow drivers: a plain node's fast
    path never does, so the instrumentation also registers a sink, which sends every call
    down the slow path while it is installed.
    `call_*` runs a node's driver and `attempt_*` one attempt, each inside whatever the hook
    opens around it (a span made current, so that the code inside nests under it, in worker
    threads and tasks too); they return or raise what the callable does. `start_flow` opens a
    flow run's scope and returns what ends it (called once, in the same context).
    """

    def call_sync(
        self, drive: Callable[..., Any], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any: ...

    async def call_async(
        self, drive: Callable[..., Awaitable[Any]], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any: ...

    def attempt_sync(
        self, attempt: Callable[..., Any], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any: ...

    async def attempt_async(
        self, attempt: Callable[..., Awaitable[Any]], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any: ...

    def start_flow(self, flow: str, run_id: str, mode: str) -> Callable[[], None]: ...


class Runtime:
    """nodekit's process-wide state; `reset()` restores the defaults.

    `sleep` and `asleep` are where nodekit waits (backoff, Retry-After, polling);
    `nodekit.testing.instant()` swaps them for recorders. `default_store` is None until a keyed
    node without a store first needs one (then a `MemoryStore`). `sinks` is a tuple, replaced
    whole under `lock` and never changed in place, so that emitting an event takes no lock
    (`_events.add_sink` and `remove_sink` write it). `warned` holds what a once-per-process
    warning has been given for (e.g. a Redis server that keeps nothing on disk). Run ids are `run_prefix` (random per
    process, renewed in a forked child) followed by the next value of `run_counter`, in hex.
    `classifiers` (`nk.register_classifier`) and `redactors` (`nk.add_redactor`) are tuples kept
    like `sinks`; the default is none of the user's. `max_attempts` caps every retry loop
    (`nodekit.testing.set_testing`), None by default. `tracer` is the instrumentation hook
    (`Tracer`, set by `nodekit.otel.instrument()`), None by default.
    """

    __slots__ = (
        "asleep",
        "classifiers",
        "default_store",
        "lock",
        "max_attempts",
        "redactors",
        "run_counter",
        "run_prefix",
        "sinks",
        "sleep",
        "tracer",
        "warned",
    )

    sleep: Callable[[float], None]
    asleep: Callable[[float], Awaitable[None]]
    default_store: Any
    sinks: tuple[Callable[[Any], None], ...]
    classifiers: tuple[Callable[[BaseException], Any], ...]
    redactors: tuple[Callable[[str], str], ...]
    warned: set[str]
    max_attempts: int | None
    tracer: Tracer | None
    run_prefix: str
    run_counter: Iterator[int]

    def __init__(self) -> None:
        # guards replacing `sinks` and creating `default_store`; never held while calling out
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Restore the defaults: real waits, no sinks, no tracer, no default store, no warnings
        given, fresh run ids.

        The context variables are per thread and task, not process-wide, and are left alone.
        """
        with self.lock:
            self.sleep = time.sleep
            self.asleep = asyncio.sleep
            self.default_store = None
            self.sinks = ()
            self.classifiers = ()
            self.redactors = ()
            self.warned = set()
            self.max_attempts = None
            self.tracer = None
        self.reseed()

    def reseed(self) -> None:
        """Start a new run-id sequence with a new random prefix (after a fork, and on reset)."""
        self.run_prefix = os.urandom(5).hex() + "-"
        self.run_counter = itertools.count(1)

    def new_run_id(self) -> str:
        """A process-unique, cheap run id (random per process, then a counter)."""
        return self.run_prefix + format(next(self.run_counter), "x")

    def __repr__(self) -> str:
        return (
            f"Runtime(sleep={self.sleep!r}, asleep={self.asleep!r}, "
            f"default_store={self.default_store!r}, sinks={len(self.sinks)})"
        )


RUNTIME = Runtime()
# a forked child must not repeat its parent's run ids
os.register_at_fork(after_in_child=RUNTIME.reseed)

# The running node's context (a `nodekit._context.NodeContext`), or None outside a node.
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("nodekit_current", default=None)

# Named with structlog's prefix so that structlog.contextvars.merge_contextvars adds node,
# run_id and attempt to the user's own log lines. The default `...` means "not bound":
# nodekit binds them per call only while structlog is configured with a chain that lacks
# `nk.add_node_context` (`_events.structlog_binds`); that processor reads `CURRENT` instead.
LOG_NODE: contextvars.ContextVar[Any] = contextvars.ContextVar("structlog_node", default=...)
LOG_RUN: contextvars.ContextVar[Any] = contextvars.ContextVar("structlog_run_id", default=...)
LOG_ATTEMPT: contextvars.ContextVar[Any] = contextvars.ContextVar("structlog_attempt", default=...)
