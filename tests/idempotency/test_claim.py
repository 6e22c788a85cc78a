"""The claim protocol's own guarantees, with stores that misbehave on cue (the behaviour is
ours, so fakes around a `MemoryStore` are enough; `test_outages.py` does the same against
real Redis and PostgreSQL behind a fault proxy)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import IN_PROGRESS, MemoryStore
from nodekit.idempotency._renewer import RENEWER
from nodekit.testing import capture_events


def _settled(timeout: float = 2.0) -> None:
    """Wait for the renewer's background settlements (reconcile, late completion) to end."""
    deadline = time.monotonic() + timeout
    while RENEWER.reconciling() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert RENEWER.reconciling() == 0


class LostReply(MemoryStore):
    """The acquire lands in the store, but its caller hears a connection error."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = 1

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        got = super().acquire(*args, **kwargs)
        if self.lose:
            self.lose -= 1
            raise ConnectionError("reply lost")
        return got


class Replayed(MemoryStore):
    """A client library that sends an acquire twice: the second answer is "already held"."""

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        super().acquire(*args, **kwargs)
        return super().acquire(*args, **kwargs)


class SlowComplete(MemoryStore):
    """`acomplete` waits until the test lets it go (so a task can be cancelled mid-write)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def acomplete(self, *args: Any, **kwargs: Any) -> bool:
        self.entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("never reached")  # pragma: no cover


def _charge(store: Any, ran: list[str], **options: Any) -> Any:
    @nk.node(
        name="charge", idempotency=nk.Idempotency(key=lambda order: order, store=store, **options)
    )
    def charge(order: str) -> str:
        ran.append(order)
        return f"charged:{order}"

    return charge


def test_an_acquire_whose_reply_is_lost_is_released_by_its_own_token() -> None:
    """The store recorded the claim but the caller never heard: it releases its own claim at
    once (token-conditional), nothing ran, and the next call runs."""
    store = LostReply()
    ran: list[str] = []
    charge = _charge(store, ran)
    with capture_events() as events, pytest.raises(nk.IdempotencyStoreError, match="did not run"):
        charge("o-1")
    assert ran == []
    assert [e.fields.get("reconciled") for e in events if e.name == "idempotency.released"] == [
        True
    ]
    assert charge("o-1") == "charged:o-1"
    assert ran == ["o-1"]


async def test_an_async_acquire_whose_reply_is_lost_is_released_by_its_own_token() -> None:
    """The async twin: the claim is released before the error reaches the caller."""
    store = LostReply()
    ran: list[str] = []

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order, store=store))
    async def charge(order: str) -> str:
        ran.append(order)
        return f"charged:{order}"

    with pytest.raises(nk.IdempotencyStoreError):
        await charge("o-1")
    assert await charge("o-1") == "charged:o-1"
    assert ran == ["o-1"]


def test_an_acquire_answered_with_our_own_claim_proceeds() -> None:
    """A client that sent the acquire twice finds the record held by its own token: that is
    its claim, not somebody else's (no `IdempotencyInProgress`, no key left locked)."""
    store = Replayed()
    ran: list[str] = []
    charge = _charge(store, ran)
    assert charge("o-1") == "charged:o-1"
    assert charge("o-1") == "charged:o-1"  # replayed
    assert ran == ["o-1"]


async def test_a_task_cancelled_while_recording_its_result_still_records_it() -> None:
    """The body returned, so its outcome is known: a cancellation during the completion write
    hands the write to the renewer, and the next call replays instead of finding the key
    locked for a whole lease (or, after it, running the effect again)."""
    store = SlowComplete()
    ran: list[str] = []

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order, store=store))
    async def charge(order: str) -> str:
        ran.append(order)
        return f"charged:{order}"

    task = asyncio.ensure_future(charge("o-1"))
    await asyncio.wait_for(store.entered.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(_settled)
    records = list(store._records.values())
    assert [r.state for r in records] == ["COMPLETED"]
    plain = _charge(store, ran)  # the sync half of the same store, same node name and key
    assert plain("o-1") == "charged:o-1"
    assert ran == ["o-1"]


async def test_a_task_cancelled_while_acquiring_leaves_no_claim() -> None:
    """A SQLite store's async acquire runs in a worker thread that finishes after the task
    was cancelled: the renewer releases the claim it left, so the key is free."""
    import tempfile

    from nodekit.idempotency.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteStore(f"{folder}/keys.db")
        ran: list[str] = []

        @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order, store=store))
        async def charge(order: str) -> str:
            ran.append(order)
            return f"charged:{order}"

        for attempt in range(20):
            task = asyncio.ensure_future(charge(f"o-{attempt}"))
            await asyncio.sleep(0)  # the acquire is on its way to the store's thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.to_thread(_settled)
        for attempt in range(20):
            assert await charge(f"o-{attempt}") == f"charged:o-{attempt}"
        assert sorted(ran) == sorted(f"o-{attempt}" for attempt in range(20))
        await store.aclose()


def test_a_long_call_keeps_its_lease_through_the_renewer() -> None:
    """A call that runs past its lease is renewed by the process's one renewer: a second
    caller meanwhile is refused, and the first completes."""
    store = MemoryStore()
    seen: list[Any] = []

    @nk.node(
        name="slow", idempotency=nk.Idempotency(key=lambda order: order, store=store, lease=0.3)
    )
    def slow(order: str) -> str:
        time.sleep(0.8)
        seen.append(next(iter(store._records.values())).state)
        return order

    with capture_events() as events:
        assert slow("o-1") == "o-1"
    assert seen == [IN_PROGRESS]
    beats = [e for e in events if e.name == "idempotency.heartbeat"]
    assert len(beats) >= 2
    assert not [e for e in events if e.name == "idempotency.lease_lost"]
