"""The claim protocol under store outages: real Redis and PostgreSQL behind a `FaultProxy`.

Every store here reaches its server through a TCP fault proxy that the test partitions
(`drop`), resets (`cut`), refuses, or makes lose one reply (`drop_replies`). Effects are
counted outside the process's Python state: the node body appends one line to a ledger file
(O_APPEND) and the test counts lines. Records are read straight from the server, around the
proxy. Real time passes (leases are real): `instant()` is not used.

What the clients do shapes the faults:
- psycopg has no client-side read timeout, so a PostgreSQL store never sees a black-hole
  `drop` end by itself: PostgreSQL outages are `cut` + `refuse`, and a lost reply is followed
  by a `cut` once the proxy has discarded it.
- redis-py takes ``socket_timeout`` / ``socket_connect_timeout`` in its URL: under `drop`, a
  Redis command fails after 0.25 s.
- A store sends a command once more on a fresh connection when its connection breaks (the
  owner token makes that safe), so a lost reply loses both sends (Redis) or is followed by a
  short refusal of new connections (PostgreSQL). Each case below gets a store of its own so
  that an earlier case's faults are not taken for this case's outage.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import COMPLETED, IN_PROGRESS, RecordKey
from nodekit.idempotency._renewer import RENEWER
from nodekit.testing import FaultProxy, capture_events

from ._outage_target import Target, drain
from ._workers import HAVE_POSTGRES, HAVE_REDIS, append_line, read_lines

pytestmark = pytest.mark.slow

SERVICES = [
    *([pytest.param("redis", marks=pytest.mark.services)] if HAVE_REDIS else []),
    *([pytest.param("postgres", marks=pytest.mark.services)] if HAVE_POSTGRES else []),
]
FLAVORS = ["sync", "async"]

LEASE = 3.0
OUTAGES = (0.3, 1.0, LEASE / 2)  # short, long, half the lease: each ends inside the lease


# ---------------------------------------------------------------------------- plumbing


async def _settled(check: Callable[[], Awaitable[bool]], bound: float) -> float:
    """Wait (at most `bound` s) until no reconciliation is pending and `check()` holds; the
    seconds waited. (`reconciling()` does not count a release the renewer is carrying out,
    so the state on the server is checked too.)"""
    start = time.monotonic()
    while time.monotonic() - start < bound:
        if RENEWER.reconciling() == 0 and await check():
            break
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _target(request: pytest.FixtureRequest, kind: str) -> Target:
    fixtures = ("redis_url", "redis_prefix") if kind == "redis" else ("postgres_url", "pg_schema")
    return Target(kind, *(request.getfixturevalue(name) for name in fixtures))


@pytest.fixture(params=SERVICES)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """Redis, then PostgreSQL, behind a fresh proxy, on records of this test only (a key
    prefix / a schema, deleted afterwards). Skips when the server is down, unless
    NODEKIT_REQUIRE_SERVICES=1."""
    made = _target(request, request.param)
    try:
        yield made
    finally:
        await made.aclose()


_THREADS: list[ThreadPoolExecutor] = []


@pytest.fixture(autouse=True)
def _sync_threads() -> Iterator[None]:
    """The threads the sync calls ran in end with the test."""
    yield
    while _THREADS:
        _THREADS.pop().shutdown(wait=True)


class Charge:
    """A keyed node, as sync and async twins, whose body appends `order` to the ledger.

    `faults[order]` runs as the body's last line: the completion write comes right after.
    Sync calls run in one thread of their own, as in a single-threaded program.
    """

    def __init__(self, store: Any, ledger: Path, *, name: str, lease: float = LEASE) -> None:
        self.ledger = ledger
        self.faults: dict[str, Callable[[], None]] = {}
        policy = nk.Idempotency(key=lambda order: order, store=store, lease=lease)

        @nk.node(name=f"{name}-sync", idempotency=policy)
        def charge(order: str) -> str:
            append_line(ledger, order)
            self._fault(order)
            return f"charged:{order}"

        @nk.node(name=f"{name}-async", idempotency=policy)
        async def acharge(order: str) -> str:
            append_line(ledger, order)
            self._fault(order)
            return f"charged:{order}"

        self.sync = charge
        self.async_ = acharge
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="outage-sync-call")
        _THREADS.append(self._thread)

    def _fault(self, order: str) -> None:
        fault = self.faults.pop(order, None)
        if fault is not None:
            fault()

    def call(self, flavor: str, order: str) -> Awaitable[str]:
        """One call, to await: a sync call runs in this node's thread (it blocks)."""
        if flavor == "sync":
            return asyncio.get_running_loop().run_in_executor(self._thread, self.sync, order)
        return self.async_(order)

    def key(self, flavor: str, order: str) -> RecordKey:
        node = self.sync if flavor == "sync" else self.async_
        return node.spec.idempotency.key_for((order,), {})[0]  # type: ignore[no-any-return]

    def ran(self) -> Counter[str]:
        """How many times each order's body ran, read from the ledger file."""
        return Counter(read_lines(self.ledger))


# ---------------------------------------------------------------------------- 1. completion


def _outage(target: Target, proxy: FaultProxy, fault: str, seconds: float) -> Callable[[], None]:
    """Arm `fault` so that it hits the completion write; returns what the body calls last."""
    if fault == "drop":  # a black hole from the completion command on (it is lost too)
        proxy.on_next(target.complete_pattern, "drop", seconds)
        return lambda: None

    def cut_and_refuse() -> None:  # every connection reset, new ones refused
        proxy.cut()
        proxy.refuse(seconds)

    return cut_and_refuse


async def test_an_outage_during_completion_still_records_exactly_one_effect(
    target: Target, tmp_path: Path
) -> None:
    """An outage of 0.3 s, 1 s or half the lease hitting the completion write is outlived: the
    call returns its value, and later calls, even past the lease, replay it (one effect)."""
    ledger = tmp_path / "ledger.txt"
    name = f"outage-{target.kind}"
    faults = ["drop", "cut+refuse"] if target.kind == "redis" else ["cut+refuse"]
    cases = [
        (fault, flavor, seconds) for fault in faults for flavor in FLAVORS for seconds in OUTAGES
    ]
    took: dict[str, float] = {}

    async def case(fault: str, flavor: str, seconds: float) -> None:
        # a proxy and a store of its own: the cases of one fault run at once
        order = f"{fault}-{flavor}-{seconds}"
        proxy = target.new_proxy()
        charge = Charge(target.store(proxy), ledger, name=name)
        charge.faults[order] = _outage(target, proxy, fault, seconds)
        key = charge.key(flavor, order)
        with capture_events(prefix="idempotency.") as events:
            start = time.monotonic()
            assert await charge.call(flavor, order) == f"charged:{order}", order
            took[order] = time.monotonic() - start
        mine = [e for e in events if e.fields.get("key") == key.short]
        failed = {e["op"] for e in mine if e.name == "idempotency.store_error"}
        assert failed == {"complete"}, f"{order}: the outage missed the completion: {failed}"
        assert took[order] >= seconds * 0.9, (order, took[order])
        record = await asyncio.to_thread(target.record, key)
        assert record is not None, order
        assert record.state == COMPLETED, (order, record)
        assert await charge.call(flavor, order) == f"charged:{order}", order  # a replay
        assert charge.ran()[order] == 1, order

    for fault in faults:
        await asyncio.gather(*(case(*c) for c in cases if c[0] == fault))

    await asyncio.sleep(LEASE + 0.5)  # past every lease: its expiry must not let a call re-run

    later = Charge(target.store(), ledger, name=name)  # the earlier stores' links were reset
    for fault, flavor, seconds in cases:
        order = f"{fault}-{flavor}-{seconds}"
        assert await later.call(flavor, order) == f"charged:{order}", order
    assert later.ran() == {f"{fault}-{flavor}-{seconds}": 1 for fault, flavor, seconds in cases}
    print({order: round(seconds, 2) for order, seconds in sorted(took.items())})


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_an_outage_outlasting_the_lease_raises_outcome_unknown_and_keeps_the_record(
    target: Target, tmp_path: Path, flavor: str
) -> None:
    """A completion the store refuses until the lease runs out raises `OutcomeUnknown` chained
    to the store error while the key is still held, never released: an immediate retry is
    refused, not run again."""
    lease = 1.0
    charge = Charge(target.store(), tmp_path / "ledger.txt", name="outlast", lease=lease)
    key = charge.key(flavor, "order")
    proxy = target.proxy

    def cut_and_refuse() -> None:
        proxy.cut()
        proxy.refuse(lease + 1.0)

    charge.faults["order"] = cut_and_refuse
    start = time.monotonic()
    with pytest.raises(nk.OutcomeUnknown) as raised:
        await charge.call(flavor, "order")
    took = time.monotonic() - start
    assert isinstance(raised.value.__cause__, target.client_errors()), repr(raised.value.__cause__)
    # given up a quarter lease before the lease ends, so the key is still held
    assert lease * 0.5 <= took <= lease, took
    record = target.record(key)  # around the proxy, which still refuses
    assert record is not None  # not released
    assert record.state == IN_PROGRESS, record
    assert record.epoch == 1
    assert record.lease_expires_at > target.server_now()
    assert charge.ran()["order"] == 1

    proxy.heal()
    with pytest.raises(nk.IdempotencyInProgress):  # refused, not run again
        await charge.call(flavor, "order")
    assert charge.ran()["order"] == 1


# ---------------------------------------------------------------------------- 2. acquire reply


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_an_acquire_whose_reply_is_lost_frees_the_key_at_once(
    target: Target, tmp_path: Path, flavor: str
) -> None:
    """The store ran the acquire but its reply was lost: the call fails closed (nothing ran)
    and releases its own claim, so a new call runs at once, without waiting for the lease."""
    charge = Charge(target.store(), tmp_path / "ledger.txt", name="lost-reply")
    assert await charge.call(flavor, "warm") == "charged:warm"  # connections, scripts, table
    key = charge.key(flavor, "order")
    with capture_events(prefix="idempotency.") as events:
        # Redis: the socket timeout ends the wait; PostgreSQL: the connection dies mid-reply
        target.lose_next_reply(target.acquire_pattern, cut=target.kind == "postgres")
        with pytest.raises(nk.IdempotencyStoreError) as raised:
            await charge.call(flavor, "order")
        assert isinstance(raised.value.__cause__, target.client_errors())
        assert charge.ran()["order"] == 0
        assert target.proxy.stats.dropped_down > 0  # the server answered: it ran the acquire

        async def free() -> bool:
            return await asyncio.to_thread(target.record, key) is None

        waited = await _settled(free, bound=1.0)
    assert target.record(key) is None, f"still held after {waited:.2f}s"
    released = [e for e in events.named("idempotency.released") if e["reconciled"]]
    assert [e["key"] for e in released] == [key.short], events.names()  # the claim had landed
    assert await charge.call(flavor, "order") == "charged:order"
    assert charge.ran()["order"] == 1


# ---------------------------------------------------------------------------- 3. cancellation


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "in the store's thread"), id="sqlite"),
        *(
            pytest.param((kind.values[0], mode), marks=kind.marks, id=f"{kind.values[0]}-{mode}")
            for kind in SERVICES
            for mode in ("unsent", "unanswered")
        ),
    ]
)
async def cancelled_in(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Any, Target | None, str]]:
    """(store, target, mode): SQLite (its async ops run in a thread pool), or a proxied Redis
    or PostgreSQL whose acquire is held up before it reaches the server ("unsent") or after
    the server ran it ("unanswered")."""
    kind, mode = request.param
    if kind == "sqlite":
        store = nk.SQLiteStore(tmp_path / "idempotency.db")
        try:
            yield store, None, mode
        finally:
            await drain(3.0)
            await store.aclose()
        return
    made = _target(request, kind)
    try:
        yield made.store(), made, mode
    finally:
        await made.aclose()


async def test_a_task_cancelled_during_acquire_runs_nothing_and_leaves_the_key_free(
    cancelled_in: tuple[Any, Target | None, str], tmp_path: Path
) -> None:
    """A task cancelled while its acquire is in flight runs nothing, and once the claim is
    reconciled (well inside the lease) the key is free: a new call runs the body once."""
    store, target, mode = cancelled_in
    charge = Charge(store, tmp_path / "ledger.txt", name="cancelled")
    assert await charge.async_("warm") == "charged:warm"
    key = charge.key("async", "order")
    with capture_events(prefix="idempotency.") as events:
        if target is not None:
            proxy = target.proxy
            if mode == "unanswered":  # the acquire reaches the server; no reply comes back
                proxy.drop_replies()
            else:  # the acquire never reaches the server
                proxy.drop()
            task = asyncio.create_task(charge.async_("order"))
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            # back to health, and reset the stalled connections: on a black hole psycopg
            # would wait 5 s for its cancel request, then 5 s for the query to end
            proxy.heal()
            proxy.cut()
        else:
            task = asyncio.create_task(charge.async_("order"))
            await asyncio.sleep(0)  # the task starts: its acquire is in the store's thread
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert charge.ran()["order"] == 0
        read = target.record if target is not None else store.get

        async def free() -> bool:
            return await asyncio.to_thread(read, key) is None

        waited = await _settled(free, bound=2.0)
    assert read(key) is None, f"still held after {waited:.2f}s"
    if mode == "unanswered":  # the acquire had landed: the renewer released it
        released = [e for e in events.named("idempotency.released") if e["reconciled"]]
        assert [e["key"] for e in released] == [key.short], events.names()
    assert await charge.async_("order") == "charged:order"
    assert charge.ran()["order"] == 1


# ---------------------------------------------------------------------------- 4. 1,000 cancels


async def test_a_thousand_cancellations_mid_acquire_leave_no_key_locked(
    target: Target, tmp_path: Path
) -> None:
    """1,000 calls on distinct keys, each cancelled 0-3 ms after it starts (before, during or
    after its acquire): once reconciled, no key whose body did not run is locked, and a fresh
    call on every key runs each body exactly once overall."""
    n, batch = 1000, 4
    store = target.direct()  # no proxy: the cancellations are the fault
    charge = Charge(store, tmp_path / "ledger.txt", name="thousand", lease=30.0)
    assert await charge.async_("warm") == "charged:warm"
    rng = random.Random(20240601)
    orders = [f"order-{i}" for i in range(n)]
    digests = {charge.key("async", order).digest: order for order in orders}
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    with capture_events(prefix="idempotency.") as events:
        for first in range(0, n, batch):
            tasks = []
            for order in orders[first : first + batch]:
                task = asyncio.create_task(charge.async_(order))
                loop.call_later(rng.uniform(0.0, 0.003), task.cancel)
                tasks.append(task)
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                outcomes[type(result).__name__] += 1
        spent = time.monotonic() - start
        ran = charge.ran()

        async def unlocked() -> bool:
            return all(digests.get(d) in ran for d in await target.locked())

        waited = await _settled(unlocked, bound=3.0)
    locked = await target.locked()
    stuck = sorted(digests[d] for d in locked if d in digests and digests[d] not in ran)
    assert stuck == [], f"{len(stuck)} keys locked though nothing ran, e.g. {stuck[:5]}"
    assert set(outcomes) <= {"str", "CancelledError"}, outcomes
    assert outcomes["CancelledError"] > 0
    reconciled = [e for e in events.named("idempotency.released") if e.fields.get("reconciled")]
    assert reconciled, "no cancellation landed between the acquire and its reply"

    # every key: a fresh call runs the body iff it never ran; one that ran is never re-run
    for first in range(0, n, 100):
        chunk = orders[first : first + 100]
        got = await asyncio.gather(*(charge.async_(o) for o in chunk), return_exceptions=True)
        for order, result in zip(chunk, got, strict=True):
            if isinstance(result, nk.IdempotencyInProgress):  # cancelled after its body ran
                assert ran[order] == 1, order
            else:
                assert result == f"charged:{order}", (order, result)
    final = charge.ran()
    assert Counter(final[order] for order in orders) == {1: n}
    print(
        f"{target.kind}: {dict(outcomes)}, bodies run before the cancel: "
        f"{sum(ran[o] for o in orders)}, claims released by reconciliation: {len(reconciled)}, "
        f"kept locked after their body ran: {len(locked)}; {spent:.2f}s, drained in {waited:.2f}s"
    )
