"""Test kit: instant waits, event capture, resource overrides, fakes for flaky calls, and
real servers and proxies that inject faults (`LocalAPI`, `FaultProxy`).

Everything here is plain library code; the pytest plugin (`nodekit.testing._plugin`, loaded
through the ``pytest11`` entry point) only wraps it in fixtures: `nk_instant`, `nk_events`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .._events import Event, add_sink
from .._resources import override
from .._runtime import RUNTIME
from ._ledger import Ledger, LedgerEntry
from ._proxy import FaultProxy, ProxyStats
from ._routes import APIRequest, APIResponse
from ._server import FaultPlan, LocalAPI

__all__ = [
    "APIRequest",
    "APIResponse",
    "Events",
    "FaultPlan",
    "FaultProxy",
    "Flaky",
    "Instant",
    "Ledger",
    "LedgerEntry",
    "LocalAPI",
    "ProxyStats",
    "capture_events",
    "fresh_state",
    "instant",
    "override",
    "reset_defaults",
    "set_testing",
]


class Instant:
    """The handle `instant()` yields: `.sleeps` lists every wait nodekit asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def _record(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)

    def _sleep(self, seconds: float) -> None:
        self._record(seconds)

    async def _asleep(self, seconds: float) -> None:
        self._record(seconds)
        await asyncio.sleep(0)

    @property
    def total(self) -> float:
        """The sum of the waits requested: the time a real run would have slept."""
        return sum(self.sleeps)


@contextmanager
def instant() -> Iterator[Instant]:
    """Make nodekit's waits (backoff, Retry-After, polling) zero inside the block.

    The waits that would have happened are recorded in the handle's `.sleeps`, in order.
    Only nodekit's own waits change: the code under test still sleeps if it sleeps itself.
    """
    handle = Instant()
    saved = RUNTIME.sleep, RUNTIME.asleep
    RUNTIME.sleep, RUNTIME.asleep = handle._sleep, handle._asleep
    try:
        yield handle
    finally:
        RUNTIME.sleep, RUNTIME.asleep = saved


def set_testing(enabled: bool = True, *, attempts: int = 1) -> None:
    """The global test switch: every retry loop makes at most `attempts` attempts, and
    nodekit waits for nothing (as in `instant()`), until ``set_testing(False)``.

    For a whole test session: ``pytest --nodekit-testing`` (or ``nodekit_testing = true`` in
    the pytest ini options) calls it before the first test. Nodes, flows and `nk.attempts`
    blocks all obey it; what a test sets with `instant()` still wins inside its block.
    """
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f"set_testing(attempts=) must be an int >= 1, got {attempts!r}")
    with RUNTIME.lock:
        if enabled:
            RUNTIME.max_attempts = attempts
            RUNTIME.sleep, RUNTIME.asleep = _no_sleep, _no_asleep
        else:
            RUNTIME.max_attempts = None
            RUNTIME.sleep, RUNTIME.asleep = time.sleep, asyncio.sleep


def _no_sleep(seconds: float) -> None:
    pass


async def _no_asleep(seconds: float) -> None:
    await asyncio.sleep(0)


@contextmanager
def fresh_state() -> Iterator[None]:
    """Run the block with a fresh default store and no once-per-process warnings given, then
    put back every piece of nodekit's process-wide state as it was before the block.

    The pytest plugin wraps every test in it, so that a keyed node without a store gets a new
    `MemoryStore` in each test (a parametrized test never sees the previous case's result),
    and an event sink, classifier, redactor, `instant()`, `set_testing` or an instrumentation
    (`nodekit.otel.instrument()`) a test leaves behind does not leak into the next. What a
    session-wide fixture set up before the test stays as it was.
    """
    with RUNTIME.lock:
        saved = [getattr(RUNTIME, name) for name in _KEPT]
        RUNTIME.default_store = None
        RUNTIME.warned = set()
    try:
        yield
    finally:
        with RUNTIME.lock:
            for name, value in zip(_KEPT, saved, strict=True):
                setattr(RUNTIME, name, value)


# the process-wide state `fresh_state` puts back after its block
_KEPT = (
    "sleep",
    "asleep",
    "default_store",
    "sinks",
    "classifiers",
    "redactors",
    "warned",
    "max_attempts",
    "tracer",
)


def reset_defaults() -> None:
    """Put nodekit's process-wide state back as it was at import.

    Real waits, no event sinks, no default idempotency store (the next keyed node without a
    store gets a fresh `MemoryStore`), and a new run-id sequence. For test isolation; not safe
    while nodes run in other threads.
    """
    RUNTIME.reset()


class Events(list[Event]):
    """The events captured by `capture_events()`, in order, with small query helpers."""

    def names(self) -> list[str]:
        return [event.name for event in self]

    def named(self, name: str) -> list[Event]:
        return [event for event in self if event.name == name]

    def for_node(self, node: str) -> Events:
        return Events(event for event in self if event.node == node)


@contextmanager
def capture_events(*, prefix: str | None = None) -> Iterator[Events]:
    """Collect every event emitted, in any thread, while the block runs.

    `prefix` keeps only the events whose name starts with it (``"node."``, ``"flow."``).
    """
    events = Events()
    lock = threading.Lock()

    def sink(event: Event) -> None:
        if prefix is None or event.name.startswith(prefix):
            with lock:
                events.append(event)

    remove = add_sink(sink)
    try:
        yield events
    finally:
        remove()


class Flaky:
    """A fake callable that raises the given errors in turn, then returns `result`.

    ``Flaky([ConnectionResetError(), TimeoutError()], result=42)`` fails twice and succeeds on
    the third call. `calls` counts the calls; `args` records what each call received.
    Use `Flaky.async_()` for a coroutine function. An error may be an exception class (a new
    instance is raised each time) or an instance.
    """

    def __init__(
        self,
        errors: Iterable[BaseException | type[BaseException]] = (),
        *,
        result: Any = None,
        times: int | None = None,
    ) -> None:
        items = list(errors)
        if times is not None:
            if len(items) != 1:
                raise ValueError("Flaky(times=N) takes exactly one error")
            items = items * times
        self.errors = items
        self.result = result
        self.calls = 0
        self.args: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _next(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            index = self.calls
            self.calls += 1
            self.args.append((args, kwargs))
        if index < len(self.errors):
            error = self.errors[index]
            raise error() if isinstance(error, type) else error
        result = self.result
        return result(*args, **kwargs) if callable(result) else result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._next(args, kwargs)

    def async_(self) -> Callable[..., Any]:
        """A coroutine function sharing this fake's script and counters."""

        async def call(*args: Any, **kwargs: Any) -> Any:
            return self._next(args, kwargs)

        call.__name__ = call.__qualname__ = "flaky_async"
        return call

    @property
    def failures(self) -> int:
        return min(self.calls, len(self.errors))
