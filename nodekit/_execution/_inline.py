"""`nk.attempts(...)`: the retry loop as an inline block, for code that is not a function.

    for attempt in nk.attempts(effect=nk.Effect.READ, attempts=5):
        with attempt:
            response = httpx.get(url)

    async for attempt in nk.attempts(on=httpx.HTTPError):
        with attempt:
            response = await client.get(url)

The block shares everything with a node's loop: the classifier and the effect rules (a WRITE
block refuses to retry an ambiguous error: `UnsafeRetry`), `Retry`'s options, the events
(named after `name`), the deadline (`timeout=` bounds the attempts and the waits together),
`nodekit.testing.instant()` and `set_testing`. `with attempt:` marks one attempt: an error
inside it is retried (suppressed, then the next attempt comes after the wait) or raised. A
block is not a node: it sets no `nk.context()`, has no key and runs no guards.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

from .._context import NodeContext
from .._errors import ConfigError
from .._events import observed
from .._policies import Effect, Retry, Seconds, seconds
from .._runtime import CURRENT, RUNTIME
from .._spec import NodeSpec
from ._attempts import Attempts

__all__ = ["Attempt", "AttemptBlock", "attempts"]


def _block() -> None:  # the function a block's spec is named after; never called
    """An inline retry block."""


@functools.lru_cache(maxsize=256)
def _spec(name: str, retry: Retry, effect: Effect) -> NodeSpec:
    return NodeSpec(
        _block,
        {"name": name, "retry": retry, "effect": effect},
        drive_sync=_unused,
        drive_async=_unused,
    )


def _unused(*args: Any) -> Any:  # pragma: no cover - a block has no driver
    raise AssertionError("an attempts block is not called")


class Attempt:
    """One attempt of an `attempts` block: use it as ``with attempt:`` around the attempt."""

    __slots__ = ("_block", "number")

    def __init__(self, block: AttemptBlock, number: int) -> None:
        self._block = block
        self.number = number  # from 1

    def __enter__(self) -> Attempt:
        self._block.entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._block.settle(exc)

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of {self._block.spec.name!r}>"


class AttemptBlock:
    """The iterator `attempts()` returns: iterate it once, with ``for`` or ``async for``."""

    __slots__ = ("ctx", "decisions", "done", "entered", "spec", "started", "timeout", "wait")

    def __init__(self, spec: NodeSpec, timeout: float | None) -> None:
        self.spec = spec
        self.timeout = timeout
        self.started = False
        self.done = False
        self.entered = False
        self.wait = 0.0
        self.decisions: Attempts | None = None
        self.ctx: NodeContext | None = None

    def _start(self) -> NodeContext:
        if self.started:
            raise ConfigError(
                f"nk.attempts block {self.spec.name!r} was iterated twice: make a new one "
                "for each loop",
                node=self.spec.name,
            )
        self.started = True
        parent = CURRENT.get()
        deadline = None if parent is None else parent.deadline
        if self.timeout is not None:
            own = time.monotonic() + self.timeout
            deadline = own if deadline is None or own < deadline else deadline
        ctx = self.ctx = NodeContext(self.spec, parent, deadline)
        self.decisions = Attempts(self.spec, ctx, announce=observed())
        return ctx

    def settle(self, exc: BaseException | None) -> bool:
        """An attempt ended: True to suppress its error (a retry follows), else False."""
        decisions = self.decisions
        assert decisions is not None
        if exc is None:
            self.done = True
            decisions.succeeded()
            return False
        if not isinstance(exc, Exception):  # interrupted, cancelled: never retried
            self.done = True
            return False
        try:
            self.wait = decisions.failed(exc)
        except BaseException as raised:
            self.done = True
            if raised is exc:
                return False  # the error itself, with nodekit's note: let it propagate
            raise  # `UnsafeRetry`, chained to it
        return True

    def __iter__(self) -> Iterator[Attempt]:
        ctx = self._start()
        while True:
            self.entered = False
            yield Attempt(self, ctx.attempt)
            if self.done or not self.entered:
                return
            RUNTIME.sleep(self.wait)
            ctx.next_attempt()

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        ctx = self._start()
        while True:
            self.entered = False
            yield Attempt(self, ctx.attempt)
            if self.done or not self.entered:
                return
            await RUNTIME.asleep(self.wait)
            ctx.next_attempt()


def attempts(
    retry: Retry | None = None,
    *,
    name: str = "attempts",
    effect: Effect = Effect.WRITE,
    timeout: Seconds | None = None,
    **options: Any,
) -> AttemptBlock:
    """An inline retry block: ``for attempt in nk.attempts(...): with attempt: ...``.

    Give a `nk.Retry`, or its options as keywords (``attempts=5, on=httpx.HTTPError``).
    `effect` defaults to WRITE, as for a node: declare READ (or NONE) for a block that
    changes nothing, so that ambiguous errors are retried too. `timeout` bounds the whole
    block (attempts and waits); `name` names the block in events. Works with ``async for``.
    """
    if retry is not None and options:
        raise ConfigError(
            f"nk.attempts({name!r}): give a nk.Retry or its options as keywords, not both",
            node=name,
            option=sorted(options)[0],
        )
    if retry is None:
        try:
            retry = Retry(**options)
        except TypeError as exc:
            raise ConfigError(
                f"nk.attempts({name!r}): {exc}; options are those of nk.Retry",
                node=name,
                option="retry",
            ) from None
    if retry.on_result is not None:
        raise ConfigError(
            f"nk.attempts({name!r}): a block has no result for retry.on_result to judge; "
            "raise an error inside `with attempt:` to retry instead",
            node=name,
            option="retry.on_result",
        )
    total = seconds(timeout, node=name, option="timeout")
    try:
        spec = _spec(name, retry, effect)
    except TypeError:  # an unhashable option (a list of types): compiled for this block only
        spec = _spec.__wrapped__(name, retry, effect)
    return AttemptBlock(spec, total)
