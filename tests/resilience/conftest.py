"""Helpers for the resilience tests: sync and async twins of a node, and a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

import nodekit as nk


class Clock:
    """A `time.monotonic` stand-in that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The breaker's, the rate limit's and the attempt loop's clock, moved by the test."""
    fake = Clock()
    monkeypatch.setattr("nodekit.resilience._breaker.monotonic", fake)
    monkeypatch.setattr("nodekit.resilience._limiter.monotonic", fake)
    monkeypatch.setattr("nodekit._execution._guarded.monotonic", fake)
    return fake


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test with a sync node and with an async one."""
    return str(request.param)


class Service:
    """A fake dependency: counts the calls that reach it and follows a script of outcomes.

    Each item of `script` is an exception (raised) or a value (returned); past its end the
    service returns `"ok"`.
    """

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            index = self.calls
            self.calls += 1
        item = self.script[index] if index < len(self.script) else "ok"
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            return item()
        return item


def make_node(mode: str, body: Callable[..., Any], **options: Any) -> Any:
    """A sync or async node whose function calls `body`."""
    if mode == "sync":

        def call(*args: Any, **kwargs: Any) -> Any:
            return body(*args, **kwargs)

        return nk.node(**options)(call)

    async def acall(*args: Any, **kwargs: Any) -> Any:
        return body(*args, **kwargs)

    return nk.node(**options)(acall)


def make_fallback(mode: str, body: Callable[..., Any]) -> Any:
    """A fallback of the node's kind that calls `body`."""
    if mode == "sync":
        return body

    async def fallback(*args: Any, **kwargs: Any) -> Any:
        return body(*args, **kwargs)

    return fallback


def run(mode: str, node: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the node: directly, or on a fresh event loop for an async node."""
    if mode == "sync":
        return node(*args, **kwargs)
    return asyncio.run(node(*args, **kwargs))
