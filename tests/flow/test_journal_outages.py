"""Durable flow journals under store outages: real Redis and PostgreSQL behind a `FaultProxy`.

A durable run journals each node's update through the claim protocol (acquire, run, complete
with retries until three quarters of the lease, the lease renewed meanwhile). Here a 3-node
flow (``reserve`` -> ``charge`` -> ``receipt``) journals through a proxy the test resets,
refuses, black-holes or makes lose one reply. Effects are counted outside the process: each
node appends its name to a ledger file (O_APPEND) and the test counts lines. Journal records
are read straight from the server, around the proxy. Real time passes (leases are real).

As in ``tests/idempotency/test_outages.py``: PostgreSQL outages are ``cut`` + ``refuse``
(psycopg has no read timeout, so a black hole never ends by itself), Redis ones also a black
hole (redis-py's ``socket_timeout`` ends each command after 0.25 s); every test has stores of
its own, and a sync run always runs in the same thread of its own.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from idempotency._outage_target import Target  # the tests/ folder is on sys.path

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.idempotency import COMPLETED, IN_PROGRESS, RecordKey
from nodekit.testing import capture_events

pytestmark = [pytest.mark.services, pytest.mark.slow]

LEASE = 3.0  # the journal lease: `nk.Flow(lease=...)` (a node's Idempotency lease is not used)
FLOW = "shop"
NODES = ("reserve", "charge", "receipt")
KINDS = ["redis", "postgres"]
T = TypeVar("T")
FLAVORS = ["sync", "async"]


# ---------------------------------------------------------------------------- plumbing


def _append_line(path: Path, text: str) -> None:
    """One effect: one line appended atomically (O_APPEND, one write)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def entry_key(node: str, run_id: str) -> RecordKey:
    """The documented key of a node's journal entry."""
    return RecordKey(f"flow:{FLOW}:{node}", "", digest(canonical_json([run_id, node, 0])))


def header_key(run_id: str) -> RecordKey:
    """The key of a run's journal header."""
    return RecordKey(f"flow:{FLOW}", "", digest(canonical_json([run_id])))


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__
    return found


@pytest.fixture(params=KINDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """Redis, then PostgreSQL, behind a fresh proxy, on records of this test only (a key
    prefix / a schema, deleted afterwards). Skips when the server is down, unless
    NODEKIT_REQUIRE_SERVICES=1."""
    fixtures = (
        ("redis_url", "redis_prefix") if request.param == "redis" else ("postgres_url", "pg_schema")
    )
    made = Target(request.param, *(request.getfixturevalue(name) for name in fixtures))
    try:
        yield made
    finally:
        await made.aclose()


class Shop:
    """The durable 3-node flow, with sync nodes (`flow.run`) or async ones (`flow.arun`).

    Each node appends its name to the ledger, then runs `faults[name]` (once) as its last
    act: the journal completion of its entry comes right after. A sync run is carried out in
    one thread of this shop's own, as a single-threaded program would.
    """

    def __init__(self, ledger: Path, flavor: str, *, lease: float = LEASE) -> None:
        self.ledger = ledger
        self.flavor = flavor
        self.faults: dict[str, Callable[[], None]] = {}
        self.flow = flow = nk.Flow(FLOW, lease=lease)
        if flavor == "sync":

            @flow.node
            def reserve(order: str) -> dict[str, str]:
                return self._effect("reserve", {"reservation": f"res:{order}"})

            @flow.node(after=reserve)
            def charge(reservation: str) -> dict[str, str]:
                return self._effect("charge", {"payment": f"paid:{reservation}"})

            @flow.node(after=charge, output="receipt")
            def receipt(payment: str) -> str:
                return self._effect("receipt", f"receipt:{payment}")

        else:

            @flow.node
            async def reserve(order: str) -> dict[str, str]:
                return self._effect("reserve", {"reservation": f"res:{order}"})

            @flow.node(after=reserve)
            async def charge(reservation: str) -> dict[str, str]:
                return self._effect("charge", {"payment": f"paid:{reservation}"})

            @flow.node(after=charge, output="receipt")
            async def receipt(payment: str) -> str:
                return self._effect("receipt", f"receipt:{payment}")

        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-outage-run")

    def _effect(self, node: str, value: T) -> T:
        _append_line(self.ledger, node)
        fault = self.faults.pop(node, None)
        if fault is not None:
            fault()
        return value

    async def run(self, run_id: str, store: Any) -> Any:
        """One run of the flow (a resume if `run_id` was run before)."""
        state = {"order": "o1"}
        if self.flavor == "sync":
            call = functools.partial(self.flow.run, state, run_id=run_id, store=store)
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        return await self.flow.arun(state, run_id=run_id, store=store)

    def ran(self) -> Counter[str]:
        """How many times each node's body ran, read from the ledger file."""
        try:
            return Counter(self.ledger.read_text("utf-8").splitlines())
        except FileNotFoundError:
            return Counter()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


@pytest.fixture(params=FLAVORS)
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shop]:
    """The flow, sync (`flow.run`) then async (`flow.arun`), with a fresh ledger."""
    made = Shop(tmp_path / "ledger.txt", request.param)
    yield made
    made.close()


FINAL = {
    "order": "o1",
    "reservation": "res:o1",
    "payment": "paid:res:o1",
    "receipt": "receipt:paid:res:o1",
}


# ---------------------------------------------------------------------------- 1. completion


OUTAGES = [  # (server, fault): a black hole on Redis only (psycopg has no read timeout)
    ("redis", "cut+refuse"),
    ("redis", "drop"),
    ("postgres", "cut+refuse"),
]


@pytest.mark.parametrize("seconds", [0.3, 1.0])
@pytest.mark.parametrize(
    ("target", "fault"), OUTAGES, indirect=["target"], ids=[f"{k}-{f}" for k, f in OUTAGES]
)
async def test_an_outage_during_a_journal_completion_keeps_every_effect_exactly_once(
    target: Target, shop: Shop, fault: str, seconds: float
) -> None:
    """An outage hitting the middle node's journal completion is outlived: the run finishes,
    each node ran once, a rerun replays everything and every entry is COMPLETED."""
    proxy = target.proxy
    if fault == "drop":  # a black hole from the completion command on (it is lost too)
        shop.faults["charge"] = functools.partial(proxy.drop, seconds)
    else:

        def cut_and_refuse() -> None:  # every connection reset, new ones refused
            proxy.cut()
            proxy.refuse(seconds)

        shop.faults["charge"] = cut_and_refuse
    store = target.store()
    key = entry_key("charge", "r1")
    with capture_events(prefix="idempotency.") as events:
        start = time.monotonic()
        assert await shop.run("r1", store) == FINAL
        took = time.monotonic() - start
    failed = {e["op"] for e in events.named("idempotency.store_error") if e["key"] == key.short}
    assert failed == {"complete"}, f"the outage missed the completion: {events.names()}"
    assert took >= seconds * 0.9, took
    assert shop.ran() == {"reserve": 1, "charge": 1, "receipt": 1}

    keys = [header_key("r1"), *(entry_key(node, "r1") for node in NODES)]
    records = await asyncio.gather(*(asyncio.to_thread(target.record, k) for k in keys))
    for k, record in zip(keys, records, strict=True):
        assert record is not None, k
        assert record.state == COMPLETED, (k, record)
        assert record.epoch == 1, (k, record)

    assert await shop.run("r1", store) == FINAL  # replayed, nothing runs
    assert shop.ran() == {"reserve": 1, "charge": 1, "receipt": 1}


# ---------------------------------------------------------------------------- 2. past the lease


async def test_an_outage_outlasting_the_lease_leaves_the_entry_held_then_taken_over(
    target: Target, shop: Shop
) -> None:
    """A completion the store refuses past the lease fails the run with the update not
    journaled, the entry held; a resume is refused until the lease ends, then re-runs it."""
    proxy = target.proxy

    def cut_and_refuse() -> None:
        proxy.cut()
        proxy.refuse(LEASE + 1.0)

    shop.faults["charge"] = cut_and_refuse
    store = target.store()
    key = entry_key("charge", "r2")
    start = time.monotonic()
    with pytest.raises(nk.FlowError) as raised:
        await shop.run("r2", store)
    took = time.monotonic() - start
    error = raised.value
    assert error.failed == "charge", error
    assert error.completed == ("reserve",), error
    causes = chain(error)
    unknown = [e for e in causes if isinstance(e, nk.OutcomeUnknown)]
    assert unknown, causes  # the node ran; its update could not be journaled
    assert "not journaled" in str(unknown[0]), unknown[0]
    assert isinstance(unknown[0].__cause__, target.client_errors()), causes
    # given up a quarter lease before the lease ends: the entry is still held
    assert LEASE * 0.5 <= took <= LEASE + 0.5, took
    assert "payment" not in error.state  # the unjournaled update is not in the run's state
    assert shop.ran() == {"reserve": 1, "charge": 1}

    record = target.record(key)  # around the proxy, which still refuses
    assert record is not None  # never released: the effect happened
    assert record.state == IN_PROGRESS, record
    assert record.epoch == 1, record
    assert record.lease_expires_at > target.server_now(), record

    proxy.heal()
    with pytest.raises(nk.FlowError, match="in progress") as raised:  # refused, not run again
        await shop.run("r2", store)
    assert raised.value.failed == "charge"
    assert any(isinstance(e, nk.IdempotencyInProgress) for e in chain(raised.value))
    assert shop.ran() == {"reserve": 1, "charge": 1}

    left = record.lease_expires_at - target.server_now()
    await asyncio.sleep(max(0.0, left) + 0.1)
    with capture_events(prefix="idempotency.") as events:
        assert await shop.run("r2", store) == FINAL
    assert [e["key"] for e in events.named("idempotency.takeover")] == [key.short]
    # at least once: the unjournaled node ran again; the journaled one never did
    assert shop.ran() == {"reserve": 1, "charge": 2, "receipt": 1}
    record = target.record(key)
    assert record is not None
    assert record.state == COMPLETED, record
    assert record.epoch == 2, record


# ---------------------------------------------------------------------------- 3. acquire reply


async def test_a_journal_acquire_whose_reply_is_lost_runs_nothing_and_frees_the_entry(
    target: Target, shop: Shop
) -> None:
    """The server ran the middle node's journal acquire but its reply was lost: the run fails
    before the node ran, and a resume right away (no lease wait) runs it once."""
    # armed by the first node, as its last act: the next acquire on the wire is the middle's
    shop.faults["reserve"] = functools.partial(
        target.lose_next_reply, target.acquire_pattern, cut=target.kind == "postgres"
    )
    store = target.store()
    key = entry_key("charge", "r3")
    with pytest.raises(nk.FlowError) as raised:
        await shop.run("r3", store)
    error = raised.value
    assert error.failed == "charge", error
    assert error.completed == ("reserve",), error
    store_errors = [e for e in chain(error) if isinstance(e, nk.IdempotencyStoreError)]
    assert store_errors, chain(error)
    assert "did not run" in str(store_errors[0]), store_errors[0]
    assert target.proxy.stats.dropped_down > 0  # the server answered: it ran the acquire
    assert shop.ran() == {"reserve": 1}
    # the claim that landed is released as soon as the store answers again (PostgreSQL:
    # once the proxy stops refusing new connections)
    deadline = time.monotonic() + 3.0
    while target.record(key) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert target.record(key) is None

    start = time.monotonic()
    assert await shop.run("r3", store) == FINAL
    assert time.monotonic() - start < LEASE / 2  # no lease wait
    assert shop.ran() == {"reserve": 1, "charge": 1, "receipt": 1}


# ---------------------------------------------------------------------------- 4. completion reply


async def test_a_journal_completion_whose_reply_is_lost_counts_as_journaled(
    target: Target, shop: Shop
) -> None:
    """The server ran the middle node's journal completion but its reply was lost: the
    refused retry finds its own completed entry, so the run finishes, each node ran once."""
    # armed by the middle node as its last act: the next completion on the wire is its own
    shop.faults["charge"] = functools.partial(
        target.lose_next_reply, target.complete_pattern, cut=target.kind == "postgres"
    )
    store = target.store()
    key = entry_key("charge", "r4")
    with capture_events(prefix="idempotency.") as events:
        assert await shop.run("r4", store) == FINAL
    failed = {e["op"] for e in events.named("idempotency.store_error") if e["key"] == key.short}
    assert failed == {"complete"}, f"the lost reply missed the completion: {events.names()}"
    assert target.proxy.stats.dropped_down > 0  # the server answered: it ran the completion
    assert shop.ran() == {"reserve": 1, "charge": 1, "receipt": 1}
    record = target.record(key)
    assert record is not None
    assert record.state == COMPLETED, record
    assert record.epoch == 1, record
    assert await shop.run("r4", store) == FINAL  # replayed, nothing runs
    assert shop.ran() == {"reserve": 1, "charge": 1, "receipt": 1}
