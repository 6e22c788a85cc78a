"""Idempotent nodes end to end, sync and async, on every store.

Most behaviours run twice through the `flavor` fixture: once as a sync node and once as an
async node wrapping the same body. Behaviours that block (holders, heartbeats, waits) have
explicit sync and async twins. Redis and PostgreSQL join the store matrix once their modules
exist; they skip when the server is down.
"""

import asyncio
import dataclasses
import functools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit.idempotency import COMPLETED, IN_PROGRESS, MemoryStore, Record, RecordKey
from nodekit.testing import capture_events, instant

from ._workers import HAVE_POSTGRES, HAVE_REDIS, make_store, store_spec

# ---------------------------------------------------------------------------- fixtures

STORES = [
    "memory",
    "sqlite",
    *([pytest.param("redis", marks=pytest.mark.services)] if HAVE_REDIS else []),
    *([pytest.param("postgres", marks=pytest.mark.services)] if HAVE_POSTGRES else []),
]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each store in turn, empty."""
    opened = make_store(store_spec(request, request.param, tmp_path))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
async def astore(store: Any) -> AsyncIterator[Any]:
    """`store` for an async test: its asyncio clients are closed on the test's own loop."""
    yield store
    await store.aclose()


class Clock:
    """A hand-moved clock for the stores that take one."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Clock]]:
    """A store whose time only moves when the test moves it."""
    clock = Clock()
    opened: Any = (
        MemoryStore(clock=clock)
        if request.param == "memory"
        else nk.SQLiteStore(tmp_path / "clocked.db", clock=clock)
    )
    try:
        yield opened, clock
    finally:
        opened.close()


class Flavor:
    """Builds a sync node, or an async node around the same body, and calls it."""

    def __init__(self, runner: asyncio.Runner | None) -> None:
        self.runner = runner
        self.is_async = runner is not None
        self.stores: list[Any] = []

    def __repr__(self) -> str:
        return "async" if self.is_async else "sync"

    def node(self, body: Callable[..., Any], **options: Any) -> Any:
        target: Callable[..., Any] = body
        policy = options.get("idempotency")
        if policy is not None and policy.store is not None:
            self.stores.append(policy.store)
        if self.is_async:

            @functools.wraps(body)
            async def target(*args: Any, **kwargs: Any) -> Any:
                await asyncio.sleep(0)
                return body(*args, **kwargs)

        return nk.node(**options)(target)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.runner is not None:
            return self.runner.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> Iterator[Flavor]:
    """A sync node, then an async one (on one event loop for the whole test)."""
    if request.param == "sync":
        yield Flavor(None)
        return
    with asyncio.Runner() as runner:
        flavor = Flavor(runner)
        yield flavor
        for used in flavor.stores:  # asyncio clients belong to this loop: close them here
            runner.run(used.aclose())


def keyed(store: Any, **options: Any) -> nk.Idempotency:
    """An `Idempotency` keyed by the `order` argument."""
    return nk.Idempotency(key=lambda order: order, store=store, **options)


def key_of(node: Any, *args: Any, **kwargs: Any) -> tuple[RecordKey, str]:
    """The record key and payload fingerprint a node computes for a call."""
    found = node.spec.idempotency.key_for(args, kwargs)
    assert found is not None
    return found  # type: ignore[no-any-return]


def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Partitioned:
    """A store whose lease renewals are lost on the way (a holder cut off from the store)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        raise ConnectionError("renewal lost")

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        raise ConnectionError("renewal lost")


class DownStore(MemoryStore):
    """A store that cannot be reached."""

    def __init__(self) -> None:
        super().__init__()
        self.acquires = 0

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.acquires += 1
        raise ConnectionError("connection to the store failed")


class FlakyComplete(MemoryStore):
    """A store whose first `failures` completion writes fail."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.completes = 0

    def complete(self, *args: Any, **kwargs: Any) -> bool:
        self.completes += 1
        if self.completes <= self.failures:
            raise ConnectionError("write failed")
        return super().complete(*args, **kwargs)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.acquires = 0

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.acquires += 1
        return super().acquire(*args, **kwargs)


class CardDeclined(Exception):
    """A business error worth remembering."""


class StolenCard(CardDeclined):
    pass


class Payment(BaseModel):
    id: str
    amount: Decimal
    captured: bool


@dataclasses.dataclass
class Receipt:
    number: int
    lines: list[str]


# ---------------------------------------------------------------------------- replay fidelity


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        pytest.param(None, None, id="None"),
        pytest.param(0, int, id="zero"),
        pytest.param(False, bool, id="False"),
        pytest.param("", str, id="empty-str"),
        pytest.param([], list[int], id="empty-list"),
        pytest.param(Payment(id="p1", amount=Decimal("9.90"), captured=True), Payment, id="model"),
        pytest.param(Receipt(7, ["a", "b"]), Receipt, id="dataclass"),
    ],
)
def test_replay_is_equal_in_value_and_type(
    flavor: Flavor, store: Any, value: Any, annotation: Any
) -> None:
    """A duplicate gets the first result back, falsy or typed, and the body ran once."""
    ran: list[str] = []
    replays: list[nk.NodeContext] = []

    def body(order: str) -> Any:
        ran.append(order)
        return value

    body.__annotations__["return"] = annotation
    charge = flavor.node(body, name="charge", idempotency=keyed(store, on_replay=replays.append))

    first = flavor.call(charge, "o-1")
    with capture_events() as events:
        second = flavor.call(charge, "o-1")

    assert ran == ["o-1"]
    assert first == value
    assert type(first) is type(value)
    assert second == value
    assert type(second) is type(value)
    assert [ctx.replayed for ctx in replays] == [True]
    assert "idempotency.replayed" in events.names()
    assert "node.replayed" in events.names()


def test_a_result_that_cannot_be_stored_replays_as_an_error_saying_it_ran(
    flavor: Flavor, store: Any
) -> None:
    """A class defined in a function cannot be found again by name: the record says it ran,
    never released, and the first call warns."""
    ran: list[str] = []

    class Local:
        pass

    value = Local()

    def body(order: str):  # type: ignore[no-untyped-def]
        ran.append(order)
        return value

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with pytest.warns(nk.NodekitWarning, match="cannot be stored"):
        assert flavor.call(charge, "o-1") is value
    with pytest.raises(nk.NodekitError, match="already ran"):
        flavor.call(charge, "o-1")
    assert ran == ["o-1"]
    record = store.get(key_of(charge, "o-1")[0])
    assert record is not None
    assert record.state == COMPLETED


def test_a_return_type_that_cannot_be_json_is_a_config_error_at_decoration() -> None:
    with pytest.raises(nk.ConfigError, match="cannot be stored as JSON"):

        @nk.node(name="lock", idempotency=keyed(MemoryStore()))
        def lock(order: str) -> threading.Event:
            return threading.Event()


def test_write_node_without_a_name_warns_at_decoration() -> None:
    with pytest.warns(nk.NodekitWarning, match="no explicit name"):

        @nk.node(idempotency=keyed(MemoryStore()))
        def charge(order: str) -> str:
            return order

    @nk.node(effect=nk.Effect.READ, idempotency=keyed(MemoryStore()))
    def lookup(order: str) -> str:
        return order


def test_an_async_node_needs_a_store_with_the_async_half() -> None:
    class SyncOnly:
        def __init__(self) -> None:
            self.inner = MemoryStore()

        def __getattr__(self, name: str) -> Any:
            if name.startswith("a") and hasattr(MemoryStore, name[1:]):
                raise AttributeError(name)  # aacquire, acomplete, ...
            return getattr(self.inner, name)

    @nk.node(name="charge", idempotency=keyed(SyncOnly()))
    def charge(order: str) -> str:
        return order

    with pytest.raises(nk.ConfigError, match="aacquire"):

        @nk.node(name="charge", idempotency=keyed(SyncOnly()))
        async def acharge(order: str) -> str:
            return order


def test_the_default_lease_covers_the_time_budget_and_the_ttl_a_day() -> None:
    @nk.node(name="total", timeout=nk.Timeout(total=30), idempotency=keyed(MemoryStore()))
    def total(order: str) -> None:
        return None

    @nk.node(
        name="attempts",
        timeout=nk.Timeout(attempt=2),
        retry=nk.Retry(attempts=3, max_wait=1),
        idempotency=keyed(MemoryStore()),
    )
    def attempts(order: str) -> None:
        return None

    assert total.spec.idempotency.lease > 30
    assert attempts.spec.idempotency.lease > 3 * 2 + 2 * 1
    assert total.spec.idempotency.ttl >= 24 * 3600
    assert nk.classify(nk.IdempotencyInProgress("busy")) == "safe"  # an outer retry may retry


def test_a_corrupt_record_is_never_executed_nor_overwritten(flavor: Flavor) -> None:
    store = MemoryStore()
    ran: list[str] = []

    def body(order: str) -> int:
        ran.append(order)
        return 1

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    key, fp = key_of(charge, "o-1")
    now = time.time()
    planted = Record(
        key.namespace, key.scope, key.digest, fp, COMPLETED, "t", 1, now, now, now + 60,
        result="gASVBQAAAAAAAACMAXiULg==",  # a pickle, base64: never unpickled
    )  # fmt: skip
    store._put(planted)
    with pytest.raises(nk.IdempotencyCorruptRecord):
        flavor.call(charge, "o-1")
    assert ran == []
    assert store.get(key) == planted


# ---------------------------------------------------------------------------- payload binding


def _amount_node(flavor: Flavor, store: Any, ran: list[int], **options: Any) -> Any:
    def body(order: str, amount: int) -> int:
        ran.append(amount)
        return amount

    return flavor.node(body, name="charge", idempotency=keyed(store, **options))


def test_mismatch_on_a_completed_record_runs_nothing_and_keeps_the_record(
    flavor: Flavor, store: Any
) -> None:
    ran: list[int] = []
    charge = _amount_node(flavor, store, ran)
    assert flavor.call(charge, "o-1", 10) == 10
    key, _ = key_of(charge, "o-1", 10)
    before = store.get(key)

    with capture_events() as events, pytest.raises(nk.IdempotencyMismatch) as info:
        flavor.call(charge, "o-1", 20)

    assert ran == [10]
    assert store.get(key) == before
    assert info.value.key_fingerprint == key.short
    assert "idempotency.mismatch" in events.names()
    assert flavor.call(charge, "o-1", 10) == 10  # the original payload still replays


@pytest.mark.parametrize("on_conflict", ["raise", "wait"])
def test_mismatch_on_an_in_progress_record_runs_nothing_and_keeps_the_record(
    flavor: Flavor, store: Any, on_conflict: str
) -> None:
    """Mismatch is checked first: even a waiting caller is refused at once."""
    ran: list[int] = []
    charge = _amount_node(flavor, store, ran, on_conflict=on_conflict)
    key, other = key_of(charge, "o-1", 10)
    assert store.acquire(key, other, lease=30, ttl=60).acquired
    before = store.get(key)

    started = time.monotonic()
    with pytest.raises(nk.IdempotencyMismatch):
        flavor.call(charge, "o-1", 20)

    assert time.monotonic() - started < 1.0
    assert ran == []
    assert store.get(key) == before


def test_mismatch_on_an_expired_lease_is_not_a_takeover(flavor: Flavor, store: Any) -> None:
    ran: list[int] = []
    charge = _amount_node(flavor, store, ran)
    key, other = key_of(charge, "o-1", 10)
    assert store.acquire(key, other, lease=0.05, ttl=60).acquired
    time.sleep(0.1)
    before = store.get(key)

    with pytest.raises(nk.IdempotencyMismatch):
        flavor.call(charge, "o-1", 20)

    assert ran == []
    assert store.get(key) == before


# ---------------------------------------------------------------------------- namespaces


def test_two_nodes_with_the_same_key_are_independent(flavor: Flavor, store: Any) -> None:
    ran: list[str] = []

    def body(order: str) -> str:
        ran.append(order)
        return order

    first = flavor.node(body, name="charge", idempotency=keyed(store))
    second = flavor.node(body, name="refund", idempotency=keyed(store))
    flavor.call(first, "o-1")
    flavor.call(second, "o-1")
    flavor.call(first, "o-1")
    assert ran == ["o-1", "o-1"]
    assert key_of(first, "o-1")[0].digest != key_of(second, "o-1")[0].digest


def test_bumping_the_version_re_executes_completed_keys(flavor: Flavor, store: Any) -> None:
    ran: list[str] = []

    def body(order: str) -> str:
        ran.append(order)
        return f"{order}#{len(ran)}"

    v1 = flavor.node(body, name="charge", idempotency=keyed(store, version=1))
    v2 = flavor.node(body, name="charge", idempotency=keyed(store, version=2))
    assert flavor.call(v1, "o-1") == "o-1#1"
    assert flavor.call(v1, "o-1") == "o-1#1"
    assert flavor.call(v2, "o-1") == "o-1#2"
    assert flavor.call(v2, "o-1") == "o-1#2"
    assert flavor.call(v1, "o-1") == "o-1#1"
    assert len(ran) == 2


def test_scope_keeps_equal_keys_of_two_tenants_apart(flavor: Flavor, store: Any) -> None:
    ran: list[tuple[str, str]] = []

    def body(tenant: str, order: str) -> str:
        ran.append((tenant, order))
        return tenant

    charge = flavor.node(body, name="charge", idempotency=keyed(store, scope=lambda tenant: tenant))
    assert flavor.call(charge, "acme", "o-1") == "acme"
    assert flavor.call(charge, "globex", "o-1") == "globex"
    assert flavor.call(charge, "acme", "o-1") == "acme"
    assert ran == [("acme", "o-1"), ("globex", "o-1")]
    acme, globex = key_of(charge, "acme", "o-1")[0], key_of(charge, "globex", "o-1")[0]
    assert acme.scope != globex.scope
    assert "acme" not in acme.scope  # the scope is stored as a digest too


def test_a_fixed_scope_separates_two_deployments(flavor: Flavor, store: Any) -> None:
    ran: list[str] = []

    def body(order: str) -> str:
        ran.append(order)
        return order

    eu = flavor.node(body, name="charge", idempotency=keyed(store, scope="eu"))
    us = flavor.node(body, name="charge", idempotency=keyed(store, scope="us"))
    flavor.call(eu, "o-1")
    flavor.call(us, "o-1")
    flavor.call(eu, "o-1")
    assert ran == ["o-1", "o-1"]


# ---------------------------------------------------------------------------- TTL


def test_a_completed_key_re_executes_after_its_ttl(
    flavor: Flavor, clocked: tuple[Any, Clock]
) -> None:
    store, clock = clocked
    epochs: list[int | None] = []

    def body(order: str) -> int:
        epochs.append(nk.context().epoch)
        return len(epochs)

    charge = flavor.node(body, name="charge", idempotency=keyed(store, ttl=60))
    assert flavor.call(charge, "o-1") == 1
    clock.now += 59
    assert flavor.call(charge, "o-1") == 1
    clock.now += 2
    assert flavor.call(charge, "o-1") == 2
    assert epochs == [1, 2]


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize("error", [ValueError, ConnectionRefusedError])
def test_a_safe_failure_releases_the_key(
    flavor: Flavor, store: Any, error: type[Exception]
) -> None:
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        if len(calls) == 1:
            raise error("nothing happened")
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with capture_events() as events, pytest.raises(error):
        flavor.call(charge, "o-1")
    assert "idempotency.released" in events.names()
    assert store.get(key_of(charge, "o-1")[0]) is None

    assert flavor.call(charge, "o-1") == "charged"
    assert flavor.call(charge, "o-1") == "charged"
    assert len(calls) == 2


def test_an_ambiguous_failure_keeps_the_lease(flavor: Flavor, store: Any) -> None:
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        raise ConnectionResetError("connection reset by peer")

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with capture_events() as events, pytest.raises(nk.OutcomeUnknown) as info:
        flavor.call(charge, "o-1")
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert "idempotency.outcome_unknown" in events.names()

    with pytest.raises(nk.IdempotencyInProgress):
        flavor.call(charge, "o-1")
    assert calls == ["o-1"]
    record = store.get(key_of(charge, "o-1")[0])
    assert record is not None
    assert record.state == IN_PROGRESS


def test_an_abandoned_sync_attempt_keeps_the_lease_and_may_complete_later(store: Any) -> None:
    """Rule 18: the abandoned attempt finishes while it still holds the lease and completes."""
    calls: list[str] = []
    finish = threading.Event()

    @nk.node(name="charge", timeout=0.1, idempotency=keyed(store))
    def charge(order: str) -> str:
        calls.append(order)
        finish.wait(5)
        return "late but done"

    with pytest.raises(nk.OutcomeUnknown) as info:
        charge("o-1")
    cause = info.value.__cause__
    assert isinstance(cause, nk.NodeTimeout)
    assert cause.abandoned
    with pytest.raises(nk.IdempotencyInProgress):
        charge("o-1")

    finish.set()
    key = key_of(charge, "o-1")[0]
    until(lambda: (r := store.get(key)) is not None and r.state == COMPLETED)
    assert charge("o-1") == "late but done"
    assert calls == ["o-1"]


def test_an_abandoned_attempt_that_finishes_after_a_retry_completed_changes_nothing(
    store: Any,
) -> None:
    """The retry completed the record; the late attempt's completion is refused quietly."""
    calls: list[int] = []
    finish = threading.Event()

    @nk.node(
        name="charge",
        timeout=nk.Timeout(attempt=0.1),
        retry=nk.Retry(attempts=2),
        idempotency=keyed(store),
    )
    def charge(order: str) -> str:
        nk.context().idempotency_key_for("charge")  # the key goes downstream: a retry replays
        calls.append(nk.context().attempt)
        if len(calls) == 1:
            finish.wait(5)
            return "first attempt"
        return "second attempt"

    with instant(), capture_events() as events:
        assert charge("o-1") == "second attempt"
        finish.set()
        until(lambda: "node.abandoned_finished" in events.names())
    assert calls == [1, 2]
    assert _decoded(store, key_of(charge, "o-1")[0]) == ("second attempt", 1)
    assert "idempotency.lease_lost" not in events.names()


async def test_a_cancelled_async_attempt_keeps_the_lease(astore: Any) -> None:
    calls: list[str] = []

    @nk.node(name="charge", timeout=0.1, idempotency=keyed(astore))
    async def charge(order: str) -> str:
        calls.append(order)
        await asyncio.sleep(5)
        return "never"

    with pytest.raises(nk.OutcomeUnknown) as info:
        await charge("o-1")
    assert isinstance(info.value.__cause__, nk.NodeTimeout)
    with pytest.raises(nk.IdempotencyInProgress):
        await charge("o-1")
    assert calls == ["o-1"]


def test_a_cached_business_error_replays_without_running(flavor: Flavor, store: Any) -> None:
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        raise CardDeclined(f"card declined for {order}: insufficient funds")

    charge = flavor.node(
        body, name="charge", idempotency=keyed(store, cache_errors=(CardDeclined,))
    )
    with pytest.raises(CardDeclined) as first:
        flavor.call(charge, "o-1")
    with capture_events() as events, pytest.raises(CardDeclined) as second:
        flavor.call(charge, "o-1")

    assert calls == ["o-1"]
    assert type(second.value) is CardDeclined
    assert str(second.value) == str(first.value) == "card declined for o-1: insufficient funds"
    assert "idempotency.replayed" in events.names()


def test_a_cached_subclass_replays_as_the_listed_type(flavor: Flavor, store: Any) -> None:
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        raise StolenCard("card reported stolen")

    charge = flavor.node(
        body, name="charge", idempotency=keyed(store, cache_errors=(CardDeclined,))
    )
    with pytest.raises(StolenCard):
        flavor.call(charge, "o-1")
    with pytest.raises(CardDeclined, match="card reported stolen"):
        flavor.call(charge, "o-1")
    assert calls == ["o-1"]


# ---------------------------------------------------------------------------- delivery


def _crashed_holder(store: Any, node: Any, *args: Any) -> tuple[RecordKey, Record]:
    """Plant an in-progress record whose holder vanished (its lease has expired)."""
    key, fp = key_of(node, *args)
    got = store.acquire(key, fp, lease=0.05, ttl=60)
    assert got.acquired
    time.sleep(0.1)
    return key, got.record


def test_at_most_once_refuses_to_take_over_a_vanished_holder(flavor: Flavor, store: Any) -> None:
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store, delivery="at_most_once"))
    key, _ = _crashed_holder(store, charge, "o-1")
    before = store.get(key)
    with capture_events() as events, pytest.raises(nk.OutcomeUnknown):
        flavor.call(charge, "o-1")
    assert calls == []
    assert store.get(key) == before
    assert "idempotency.outcome_unknown" in events.names()

    store.delete(key)  # the operator resolved the key: the effect did not happen
    assert flavor.call(charge, "o-1") == "charged"
    assert calls == ["o-1"]


def test_at_least_once_takes_over_a_vanished_holder(flavor: Flavor, store: Any) -> None:
    seen: list[tuple[int | None, str]] = []

    def body(order: str) -> str:
        ctx = nk.context()
        seen.append((ctx.epoch, ctx.idempotency_key_for("charge")))
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    key, crashed = _crashed_holder(store, charge, "o-1")
    with capture_events() as events:
        assert flavor.call(charge, "o-1") == "charged"
    assert seen == [(crashed.epoch + 1, nk.idempotency.derive_key(key.digest, "charge"))]
    assert "idempotency.takeover" in events.names()
    record = store.get(key)
    assert record is not None
    assert record.state == COMPLETED
    assert record.epoch == crashed.epoch + 1


# ---------------------------------------------------------------------------- concurrency


def test_wait_returns_the_other_holders_result_sync(store: Any) -> None:
    calls: list[str] = []
    entered, finish = threading.Event(), threading.Event()

    @nk.node(name="charge", idempotency=keyed(store, on_conflict="wait", wait_timeout=5))
    def charge(order: str) -> str:
        calls.append(threading.current_thread().name)
        entered.set()
        finish.wait(5)
        return f"charged {order}"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "o-1")
        assert entered.wait(5)
        timer = threading.Timer(0.1, finish.set)
        timer.start()
        with capture_events() as events:
            second = charge("o-1")
        assert first.result(5) == second == "charged o-1"
    assert len(calls) == 1
    assert "idempotency.waited" in events.names()


async def test_wait_returns_the_other_holders_result_async(astore: Any) -> None:
    calls: list[str] = []
    entered, finish = asyncio.Event(), asyncio.Event()

    @nk.node(name="charge", idempotency=keyed(astore, on_conflict="wait", wait_timeout=5))
    async def charge(order: str) -> str:
        calls.append(order)
        entered.set()
        await finish.wait()
        return f"charged {order}"

    first = asyncio.create_task(charge("o-1"))
    await entered.wait()
    with capture_events() as events:
        second = asyncio.create_task(charge("o-1"))
        await asyncio.sleep(0.1)
        finish.set()
        results = await asyncio.gather(first, second)
    assert results == ["charged o-1", "charged o-1"]
    assert calls == ["o-1"]
    assert "idempotency.waited" in events.names()


def test_a_waiter_runs_itself_when_the_holder_releases_sync(store: Any) -> None:
    calls: list[str] = []
    entered, finish = threading.Event(), threading.Event()

    @nk.node(name="charge", idempotency=keyed(store, on_conflict="wait", wait_timeout=5))
    def charge(order: str) -> str:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            finish.wait(5)
            raise ConnectionRefusedError("gateway refused")
        return "charged by the waiter"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "o-1")
        assert entered.wait(5)
        threading.Timer(0.1, finish.set).start()
        assert charge("o-1") == "charged by the waiter"
        with pytest.raises(ConnectionRefusedError):
            first.result(5)
    assert len(calls) == 2


async def test_a_waiter_runs_itself_when_the_holder_releases_async(astore: Any) -> None:
    calls: list[str] = []
    entered, finish = asyncio.Event(), asyncio.Event()

    @nk.node(name="charge", idempotency=keyed(astore, on_conflict="wait", wait_timeout=5))
    async def charge(order: str) -> str:
        calls.append(order)
        if len(calls) == 1:
            entered.set()
            await finish.wait()
            raise ConnectionRefusedError("gateway refused")
        return "charged by the waiter"

    first = asyncio.create_task(charge("o-1"))
    await entered.wait()
    second = asyncio.create_task(charge("o-1"))
    await asyncio.sleep(0.1)
    finish.set()
    assert await second == "charged by the waiter"
    with pytest.raises(ConnectionRefusedError):
        await first
    assert len(calls) == 2


def test_a_waiter_gives_up_after_wait_timeout(store: Any) -> None:
    entered, finish = threading.Event(), threading.Event()

    @nk.node(name="charge", idempotency=keyed(store, on_conflict="wait", wait_timeout=0.2))
    def charge(order: str) -> str:
        entered.set()
        finish.wait(5)
        return "charged"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "o-1")
        assert entered.wait(5)
        started = time.monotonic()
        with pytest.raises(nk.IdempotencyInProgress):
            charge("o-1")
        assert 0.15 < time.monotonic() - started < 2.0
        finish.set()
        assert first.result(5) == "charged"


def test_a_waiter_re_raises_the_holders_cached_error(store: Any) -> None:
    calls: list[str] = []
    entered, finish = threading.Event(), threading.Event()
    policy = keyed(store, on_conflict="wait", wait_timeout=5, cache_errors=(CardDeclined,))

    @nk.node(name="charge", idempotency=policy)
    def charge(order: str) -> str:
        calls.append(order)
        entered.set()
        finish.wait(5)
        raise CardDeclined("insufficient funds")

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "o-1")
        assert entered.wait(5)
        threading.Timer(0.1, finish.set).start()
        with pytest.raises(CardDeclined, match="insufficient funds"):
            charge("o-1")
        with pytest.raises(CardDeclined):
            first.result(5)
    assert calls == ["o-1"]


def test_heartbeat_keeps_a_long_calls_lease_sync(store: Any) -> None:
    calls: list[str] = []

    @nk.node(name="charge", idempotency=keyed(store, lease=0.5))
    def charge(order: str) -> str:
        calls.append(order)
        time.sleep(1.0)
        return "done"

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(charge, "o-1")
        time.sleep(0.8)
        with pytest.raises(nk.IdempotencyInProgress):
            charge("o-1")
        assert first.result(5) == "done"
    assert calls == ["o-1"]


async def test_heartbeat_keeps_a_long_calls_lease_async(astore: Any) -> None:
    calls: list[str] = []

    @nk.node(name="charge", idempotency=keyed(astore, lease=0.5))
    async def charge(order: str) -> str:
        calls.append(order)
        await asyncio.sleep(1.0)
        return "done"

    first = asyncio.create_task(charge("o-1"))
    await asyncio.sleep(0.8)
    with pytest.raises(nk.IdempotencyInProgress):
        await charge("o-1")
    assert await first == "done"
    assert calls == ["o-1"]


def _decoded(store: Any, key: RecordKey) -> tuple[str, int]:
    record = store.get(key)
    assert record is not None
    assert record.state == COMPLETED
    assert record.result is not None
    return json.loads(record.result), record.epoch


@pytest.mark.parametrize("second_ends", ["completes", "releases"])
def test_a_late_holder_cannot_overwrite_a_takeover_sync(store: Any, second_ends: str) -> None:
    """The first holder stalls past its lease (its renewals are lost); the second takes over.

    The late completion is refused: the first returns the recorded result, or raises
    `IdempotencyLeaseLost` when there is none.
    """
    calls: list[str] = []
    entered, second_done = threading.Event(), threading.Event()

    @nk.node(name="charge", idempotency=keyed(Partitioned(store), lease=0.2))
    def charge(order: str) -> str:
        calls.append(order)
        if len(calls) == 1:
            entered.set()
            time.sleep(0.6)
            second_done.wait(5)  # under load, still finish only after the second caller
            return "first"
        if second_ends == "releases":
            raise ValueError("declined before charging")
        return "second"

    key = key_of(charge, "o-1")[0]
    with capture_events() as events, ThreadPoolExecutor(1) as pool:
        late = pool.submit(charge, "o-1")
        assert entered.wait(5)
        time.sleep(0.3)
        if second_ends == "completes":
            assert charge("o-1") == "second"
            second_done.set()
            assert late.result(5) == "second"
            assert _decoded(store, key) == ("second", 2)
        else:
            with pytest.raises(ValueError, match="declined"):
                charge("o-1")
            second_done.set()
            with pytest.raises(nk.IdempotencyLeaseLost):
                late.result(5)
            assert store.get(key) is None
    assert len(calls) == 2
    assert "idempotency.takeover" in events.names()
    assert events.names().count("idempotency.lease_lost") == 1


@pytest.mark.parametrize("second_ends", ["completes", "releases"])
async def test_a_late_holder_cannot_overwrite_a_takeover_async(
    astore: Any, second_ends: str
) -> None:
    calls: list[str] = []
    entered, second_done = asyncio.Event(), asyncio.Event()

    @nk.node(name="charge", idempotency=keyed(Partitioned(astore), lease=0.2))
    async def charge(order: str) -> str:
        calls.append(order)
        if len(calls) == 1:
            entered.set()
            await asyncio.sleep(0.6)
            await second_done.wait()  # under load, still finish only after the second caller
            return "first"
        if second_ends == "releases":
            raise ValueError("declined before charging")
        return "second"

    key = key_of(charge, "o-1")[0]
    with capture_events() as events:
        late = asyncio.create_task(charge("o-1"))
        await entered.wait()
        await asyncio.sleep(0.3)
        if second_ends == "completes":
            assert await charge("o-1") == "second"
            second_done.set()
            assert await late == "second"
            assert _decoded(astore, key) == ("second", 2)
        else:
            with pytest.raises(ValueError, match="declined"):
                await charge("o-1")
            second_done.set()
            with pytest.raises(nk.IdempotencyLeaseLost):
                await late
            assert astore.get(key) is None
    assert len(calls) == 2
    assert "idempotency.takeover" in events.names()
    assert events.names().count("idempotency.lease_lost") == 1


# ---------------------------------------------------------------------------- retries


def test_retries_run_inside_one_acquisition(flavor: Flavor, store: Any) -> None:
    attempts: list[tuple[int, int | None, str]] = []

    def body(order: str) -> str:
        ctx = nk.context()
        attempts.append((ctx.attempt, ctx.epoch, ctx.idempotency_key_for("charge")))
        if ctx.attempt < 3:
            raise ConnectionResetError("reset after sending")
        return "charged"

    charge = flavor.node(body, name="charge", retry=nk.Retry(attempts=3), idempotency=keyed(store))
    with instant(), capture_events() as events:
        assert flavor.call(charge, "o-1") == "charged"

    assert [a for a, _, _ in attempts] == [1, 2, 3]
    assert len({(epoch, down) for _, epoch, down in attempts}) == 1
    assert events.names().count("idempotency.acquired") == 1
    assert events.names().count("node.retrying") == 2


# ---------------------------------------------------------------------------- store faults


def test_a_store_down_at_acquire_fails_closed(flavor: Flavor) -> None:
    store = DownStore()
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with capture_events() as events, pytest.raises(nk.IdempotencyStoreError) as info:
        flavor.call(charge, "o-1")
    assert calls == []
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "idempotency.store_error" in events.names()
    assert nk.classify(info.value) == "safe"


@pytest.mark.skipif(not HAVE_REDIS, reason="nodekit.idempotency.redis is not there yet")
def test_a_redis_store_on_a_closed_port_fails_closed(flavor: Flavor) -> None:
    from nodekit.idempotency.redis import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0", prefix="nk-closed:")
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    try:
        with pytest.raises(nk.IdempotencyStoreError):
            flavor.call(charge, "o-1")
    finally:
        store.close()
    assert calls == []


def test_a_failed_completion_write_is_retried_within_the_lease(flavor: Flavor) -> None:
    store = FlakyComplete(failures=2)
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with instant():
        assert flavor.call(charge, "o-1") == "charged"
    assert store.completes == 3
    assert flavor.call(charge, "o-1") == "charged"
    assert calls == ["o-1"]


def test_a_completion_that_keeps_failing_keeps_the_lease(flavor: Flavor) -> None:
    store = FlakyComplete(failures=100)
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return "charged"

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with instant() as clock, pytest.raises(nk.OutcomeUnknown) as caught:
        flavor.call(charge, "o-1")
    # retried with backoff for three quarters of the lease (60 s by default), then given up
    # while the key is still held
    assert 44.0 <= sum(clock.sleeps) <= 45.0
    assert isinstance(caught.value.__cause__, ConnectionError)
    with pytest.raises(nk.IdempotencyInProgress):  # never released: the effect happened
        flavor.call(charge, "o-1")
    assert calls == ["o-1"]


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize("missing", [None, ""])
def test_a_missing_key_fails_closed(flavor: Flavor, missing: str | None) -> None:
    store = CountingStore()
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return order

    charge = flavor.node(
        body, name="charge", idempotency=nk.Idempotency(key=lambda order: missing, store=store)
    )
    with pytest.raises(nk.ConfigError, match=r"optional=True"):
        flavor.call(charge, "o-1")
    assert calls == []
    assert store.acquires == 0


def test_an_optional_key_runs_unkeyed(flavor: Flavor) -> None:
    store = CountingStore()
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return order

    charge = flavor.node(
        body,
        name="charge",
        idempotency=nk.Idempotency(key=lambda order: None, store=store, optional=True),
    )
    flavor.call(charge, "o-1")
    flavor.call(charge, "o-1")
    assert calls == ["o-1", "o-1"]
    assert store.acquires == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("k" * 256, id="too-long"),
        pytest.param("line\nbreak", id="newline"),
        pytest.param("nul\x00byte", id="nul"),
        pytest.param("bell\x07", id="control"),
        pytest.param(" padded ", id="surrounding-spaces"),
        pytest.param("caf\u00e9", id="non-ascii"),
    ],
)
def test_a_user_key_string_is_validated_before_the_store(flavor: Flavor, bad: str) -> None:
    store = CountingStore()
    calls: list[str] = []

    def body(order: str) -> str:
        calls.append(order)
        return order

    charge = flavor.node(body, name="charge", idempotency=keyed(store))
    with pytest.raises(nk.ConfigError) as info:
        flavor.call(charge, bad)
    assert bad not in str(info.value)
    assert calls == []
    assert store.acquires == 0
    flavor.call(charge, "k" * 255)  # the longest valid key
    assert store.acquires == 1


# ---------------------------------------------------------------------------- events & privacy

EMAIL = "alice.liddell@example.com"
OUTCOMES = {
    "idempotency.acquired",
    "idempotency.replayed",
    "idempotency.mismatch",
    "idempotency.in_progress",
    "idempotency.released",
    "idempotency.outcome_unknown",
    "idempotency.takeover",
    "idempotency.lease_lost",
    "idempotency.store_error",
}


def test_events_logs_and_rows_carry_a_fingerprint_never_the_raw_key(
    flavor: Flavor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An email used as key material shows up in no event, no log line and no store row."""
    caplog.set_level(logging.DEBUG, logger="nodekit")
    db = tmp_path / "private.db"
    store = nk.SQLiteStore(db)
    script: list[str] = []
    nodes: dict[str, Any] = {}

    def body(email: str, amount: int) -> int:
        ctx = nk.context()
        step = script.pop(0) if script else "ok"
        if step == "safe":
            raise ValueError("bad amount")
        if step == "ambiguous":
            raise ConnectionResetError("reset by peer")
        if step == "stolen":  # another holder takes the key while we run
            key, fp = key_of(nodes[ctx.node], email, amount)
            store.delete(key)
            assert store.acquire(key, fp, lease=30, ttl=60).acquired
        assert ctx.idempotency_key is not None
        assert EMAIL not in ctx.idempotency_key
        return amount

    policy = nk.Idempotency(key=lambda email: email, fields=["amount"], store=store)
    charge = flavor.node(body, name="charge", idempotency=policy)
    other = flavor.node(body, name="refund", idempotency=policy)
    stolen = flavor.node(body, name="adjust", idempotency=policy)
    taken = flavor.node(body, name="capture", idempotency=policy)
    down = flavor.node(
        body, name="void", idempotency=nk.Idempotency(key=lambda email: email, store=DownStore())
    )
    nodes.update((node.name, node) for node in (charge, other, stolen, taken, down))

    with capture_events() as events:
        flavor.call(charge, EMAIL, 10)  # acquired
        flavor.call(charge, EMAIL, 10)  # replayed
        with pytest.raises(nk.IdempotencyMismatch):
            flavor.call(charge, EMAIL, 20)
        script.append("safe")
        with pytest.raises(ValueError, match="bad amount"):
            flavor.call(other, EMAIL, 10)  # released
        script.append("ambiguous")
        with pytest.raises(nk.OutcomeUnknown):
            flavor.call(other, EMAIL, 10)
        with pytest.raises(nk.IdempotencyInProgress):
            flavor.call(other, EMAIL, 10)
        script.append("stolen")
        with pytest.raises(nk.IdempotencyLeaseLost):
            flavor.call(stolen, EMAIL, 10)
        _crashed_holder(store, taken, EMAIL, 10)
        flavor.call(taken, EMAIL, 10)  # takeover
        with pytest.raises(nk.IdempotencyStoreError):
            flavor.call(down, EMAIL, 10)

    outcome_events = [e for e in events if e.name in OUTCOMES]
    assert {e.name for e in outcome_events} == OUTCOMES
    for event in events:
        assert EMAIL not in repr(event)
        assert EMAIL not in json.dumps(event.as_dict(), default=str)
        if event.name.startswith("idempotency."):
            assert re.fullmatch(r"[0-9a-f]{12}", event["key"]), event
    for event in outcome_events:
        if event.name != "idempotency.store_error":  # nothing was acquired: no epoch exists
            assert isinstance(event["epoch"], int), event
            assert event["epoch"] >= 1, event

    assert caplog.records
    assert all(EMAIL not in record.getMessage() for record in caplog.records)
    assert all(EMAIL not in repr(vars(record)) for record in caplog.records)
    assert EMAIL not in caplog.text

    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("private.db"))
    assert b"alice" not in raw
    assert EMAIL.encode() not in raw


def test_no_store_row_holds_the_raw_key_or_payload(backend: Any) -> None:
    """Completed and in-progress rows, on every store, read around the store."""
    store = backend.make()

    @nk.node(name="notify", idempotency=nk.Idempotency(key=lambda email: email, store=store))
    def notify(email: str, note: str) -> str:
        return "sent"

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda email: email, store=store))
    def charge(email: str, note: str) -> str:
        raise ConnectionResetError("reset by peer")

    notify(EMAIL, f"welcome {EMAIL}")
    with pytest.raises(nk.OutcomeUnknown):
        charge(EMAIL, f"receipt for {EMAIL}")

    rows = backend.rows()
    assert len(rows) == 2
    dump = json.dumps(rows, default=str)
    assert "alice" not in dump
    assert "example.com" not in dump


# ---------------------------------------------------------------------------- context


def test_the_context_exposes_the_digest_epoch_and_stable_downstream_keys(
    flavor: Flavor, store: Any
) -> None:
    inside: list[tuple[str | None, int | None, bool, str, str]] = []
    replays: list[tuple[str | None, int | None, bool]] = []

    def body(email: str) -> str:
        ctx = nk.context()
        inside.append(
            (
                ctx.idempotency_key,
                ctx.epoch,
                ctx.replayed,
                ctx.idempotency_key_for("charge"),
                ctx.idempotency_key_for("email"),
            )
        )
        return "sent"

    def on_replay(ctx: nk.NodeContext) -> None:
        replays.append((ctx.idempotency_key, ctx.epoch, ctx.replayed))

    send = flavor.node(
        body,
        name="send",
        idempotency=nk.Idempotency(key=lambda email: email, store=store, on_replay=on_replay),
    )
    flavor.call(send, EMAIL)
    flavor.call(send, EMAIL)

    [(digest, epoch, replayed, charge_key, email_key)] = inside
    assert digest is not None
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == key_of(send, EMAIL)[0].digest
    assert (epoch, replayed) == (1, False)
    assert charge_key != email_key
    assert charge_key == nk.idempotency.derive_key(digest, "charge")
    assert replays == [(digest, 1, True)]
