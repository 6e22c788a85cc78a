"""Process-wide state lives in one object, `RUNTIME`, and `reset()` restores its defaults."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

import nodekit as nk
from nodekit import _events
from nodekit._runtime import CURRENT, RUNTIME
from nodekit.idempotency import default_store, set_default_store
from nodekit.testing import capture_events, instant, reset_defaults


@pytest.fixture
def saved_runtime() -> Iterator[None]:
    """Put back what the test changed, so that other tests keep their sinks and store."""
    saved = (RUNTIME.sleep, RUNTIME.asleep, RUNTIME.default_store, RUNTIME.sinks)
    try:
        yield
    finally:
        RUNTIME.sleep, RUNTIME.asleep, RUNTIME.default_store, RUNTIME.sinks = saved


def test_reset_restores_real_waits_no_sinks_and_no_default_store(saved_runtime: None) -> None:
    RUNTIME.sleep = lambda seconds: None
    nk.add_sink(lambda event: None)
    store = default_store()
    RUNTIME.reset()
    assert RUNTIME.sleep is time.sleep
    assert RUNTIME.asleep is asyncio.sleep
    assert RUNTIME.sinks == ()
    assert RUNTIME.default_store is None
    fresh = default_store()
    assert isinstance(fresh, nk.MemoryStore)
    assert fresh is not store


def test_the_default_store_is_kept_in_the_runtime(saved_runtime: None) -> None:
    store = nk.MemoryStore()
    set_default_store(store)
    assert RUNTIME.default_store is store
    assert default_store() is store


def test_reset_starts_a_new_run_id_sequence(saved_runtime: None) -> None:
    before = RUNTIME.new_run_id()
    RUNTIME.reset()
    after = RUNTIME.new_run_id()
    assert after.endswith("-1")
    assert after.split("-")[0] != before.split("-")[0]


def test_event_sinks_are_kept_in_the_runtime(saved_runtime: None) -> None:
    with capture_events() as events:
        assert len(RUNTIME.sinks) == 1
        _events.emit("node.replayed", "n")
    assert RUNTIME.sinks == ()
    assert events.names() == ["node.replayed"]


def test_instant_swaps_the_runtime_waits_and_restores_them() -> None:
    real = RUNTIME.sleep, RUNTIME.asleep
    with instant() as clock:
        RUNTIME.sleep(2.0)
        assert (RUNTIME.sleep, RUNTIME.asleep) != real
    assert (RUNTIME.sleep, RUNTIME.asleep) == real
    assert clock.sleeps == [2.0]


def test_reset_defaults_in_the_test_kit_resets_the_runtime(saved_runtime: None) -> None:
    nk.add_sink(lambda event: None)
    RUNTIME.default_store = nk.MemoryStore()
    reset_defaults()
    assert RUNTIME.sinks == ()
    assert RUNTIME.default_store is None
    assert RUNTIME.sleep is time.sleep


def test_the_log_filter_reads_the_running_node_from_the_runtime() -> None:
    record = logging.LogRecord("nodekit", logging.INFO, __file__, 1, "x", None, None)

    @nk.node
    def step() -> None:
        _events.ContextFilter().filter(record)

    step()
    assert record.node == step.name
    assert record.attempt == 1
    assert isinstance(record.run_id, str)
    assert CURRENT.get() is None
