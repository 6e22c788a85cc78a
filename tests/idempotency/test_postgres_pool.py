"""PostgresStore's connections: pooled and bounded, replaced when broken, closed on close.

Real PostgreSQL (skips when it is down, unless NODEKIT_REQUIRE_SERVICES=1), one schema per
test. Each store connects with an `application_name` of its own, so the test counts exactly
its connections in ``pg_stat_activity`` and can terminate them as a server restart would.
Effects are counted outside the process: one line per effect appended (O_APPEND) to a ledger
file.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import COMPLETED, RecordKey
from nodekit.idempotency.postgres import PostgresStore

from ._workers import append_line, read_lines

pytestmark = pytest.mark.services

FLAVORS = ["sync", "async"]


class Server:
    """The test's PostgreSQL, seen around the store: its connections, its rows."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self.app = f"nkpool{uuid.uuid4().hex[:10]}"

    def dsn(self) -> str:
        """The server's URL, tagged with this test's application_name."""
        return self.url + ("&" if "?" in self.url else "?") + f"application_name={self.app}"

    def store(self, **options: Any) -> PostgresStore:
        return PostgresStore(self.dsn(), schema=self.schema, **options)

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def connections(self) -> int:
        """The store's connections, as the server counts them."""
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        return int(self._sql(query, (self.app,))[0][0])

    def settled_connections(self, at_most: int, bound: float = 3.0) -> int:
        """The count once it is at most `at_most` (a closed socket leaves the view shortly
        after), or whatever it is after `bound` seconds."""
        deadline = time.monotonic() + bound
        while (count := self.connections()) > at_most and time.monotonic() < deadline:
            time.sleep(0.02)
        return count

    def terminate(self) -> int:
        """Kill the store's server connections, as a server restart does to its clients."""
        query = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s"
        )
        return int(self._sql(query, (self.app,))[0][0])

    def row(self) -> tuple[str, ...]:
        """The one stored record as the server's text, compared exactly (NaN included)."""
        rows = self._sql(f'SELECT t::text FROM "{self.schema}".nodekit_idempotency t')
        assert len(rows) == 1, rows
        return rows[0]

    def update(self, sets: str) -> None:
        self._sql(f'UPDATE "{self.schema}".nodekit_idempotency SET {sets}')


class Watch:
    """Samples the store's server connections in a thread, every few milliseconds."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-watch", daemon=True)

    def _run(self) -> None:
        import psycopg

        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(query, (self.server.app,)).fetchone()
                self.samples.append(int(row[0]) if row else 0)
                time.sleep(0.005)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def server(postgres_url: str, pg_schema: str) -> Server:
    return Server(postgres_url, pg_schema)


@pytest.fixture
def stores(server: Server) -> Iterator[Callable[..., PostgresStore]]:
    """Makes stores on this test's schema and application_name; closes them afterwards."""
    made: list[PostgresStore] = []

    def make(**options: Any) -> PostgresStore:
        store = server.store(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def charge_node(store: Any, ledger: Path, *, flavor: str, name: str = "charge", **opts: Any) -> Any:
    """A keyed WRITE node whose body appends its order to the ledger (one line, one effect)."""
    faults: dict[str, Callable[[], None]] = {}
    idem = nk.Idempotency(key=lambda order: order, store=store)
    if flavor == "sync":

        @nk.node(name=name, effect=nk.Effect.WRITE, idempotency=idem, **opts)
        def charge(order: str) -> str:
            append_line(ledger, order)
            if order in faults:
                faults.pop(order)()
            return f"charged:{order}"

    else:

        @nk.node(name=name, effect=nk.Effect.WRITE, idempotency=idem, **opts)
        async def charge(order: str) -> str:
            append_line(ledger, order)
            if order in faults:
                faults.pop(order)()
            return f"charged:{order}"

    charge.faults = faults
    return charge


def call(node: Any, flavor: str, order: str) -> Any:
    """One call of the node, sync or async, from sync code (an async one on a fresh loop)."""
    if flavor == "sync":
        return node(order)
    return asyncio.run(node(order))


def ran(ledger: Path) -> Counter[str]:
    return Counter(read_lines(ledger)) if ledger.exists() else Counter()


# ---------------------------------------------------------------------------- bounded


async def test_five_hundred_concurrent_async_calls_run_at_once_on_a_bounded_pool(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """500 keyed async calls gathered at once all succeed, each effect once, through at most
    `pool_size` server connections."""
    ledger = tmp_path / "ledger.txt"
    store = stores()
    charge = charge_node(store, ledger, flavor="async")
    assert await charge("warm") == "charged:warm"  # the table exists, one connection is open
    latencies: list[float] = []

    async def timed(order: str) -> str:
        start = time.perf_counter()
        try:
            return await charge(order)  # type: ignore[no-any-return]
        finally:
            latencies.append(time.perf_counter() - start)

    orders = [f"order-{i}" for i in range(500)]
    with Watch(server) as watch:
        start = time.perf_counter()
        results = await asyncio.gather(*(timed(order) for order in orders))
        took = time.perf_counter() - start
    assert results == [f"charged:{order}" for order in orders]
    counts = ran(ledger)
    assert len(counts) == 501
    assert set(counts.values()) == {1}
    assert max(watch.samples) <= store.pool_size, Counter(watch.samples)
    assert server.connections() <= store.pool_size
    latencies.sort()
    print(
        f"500 concurrent async calls: {took * 1000:.0f} ms in all, "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
        f"connections seen at most {max(watch.samples)}"
    )


def test_event_loops_that_come_and_go_leave_no_connections_behind(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """Thirty `asyncio.run` calls in a row, each with its own loop: a closed loop's
    connections are closed when the next loop uses the store, so they never pile up."""
    ledger = tmp_path / "ledger.txt"
    store = stores(pool_size=3)
    charge = charge_node(store, ledger, flavor="async")

    async def burst(run: int) -> None:
        await asyncio.gather(*(charge(f"{run}-{i}") for i in range(6)))

    counts = []
    for run in range(30):
        asyncio.run(burst(run))
        counts.append(server.connections())
    # this loop's connections, and the ones its predecessor left until this one started
    assert max(counts) <= 2 * store.pool_size, counts
    assert len(ran(ledger)) == 180
    store.close()
    assert server.settled_connections(0) == 0


# ---------------------------------------------------------------------------- broken


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_connection_killed_while_idle_is_replaced_without_failing_the_call(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path, flavor: str
) -> None:
    """After the server killed every connection of the store (a restart), the next call
    succeeds on a fresh connection, its effect once."""
    ledger = tmp_path / "ledger.txt"
    store = stores()
    charge = charge_node(store, ledger, flavor=flavor)
    if flavor == "async":  # one loop throughout: its connections are the ones killed
        runner = asyncio.Runner()
        run: Callable[[str], Any] = lambda order: runner.run(charge(order))  # noqa: E731
    else:
        run = charge
    try:
        assert run("before") == "charged:before"
        assert server.terminate() >= 1
        assert server.settled_connections(0) == 0
        assert run("after") == "charged:after"
        assert run("after") == "charged:after"  # a replay
        assert run("again") == "charged:again"
    finally:
        if flavor == "async":
            runner.close()
    assert ran(ledger) == {"before": 1, "after": 1, "again": 1}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_connection_killed_between_acquire_and_complete_still_records_one_effect(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path, flavor: str
) -> None:
    """The server kills the store's connections while the body runs: the completion finds its
    connection dead, is sent again on a fresh one, and the call returns; a later call
    replays it (the body ran once)."""
    ledger = tmp_path / "ledger.txt"
    store = stores()
    charge = charge_node(store, ledger, flavor=flavor)
    killed: list[int] = []
    charge.faults["order"] = lambda: killed.append(server.terminate())
    assert call(charge, flavor, "order") == "charged:order"
    assert killed
    assert killed[0] >= 1
    record = store.get(RecordKey(*_key(charge, "order")))
    assert record is not None
    assert record.state == COMPLETED
    assert call(charge, flavor, "order") == "charged:order"
    assert ran(ledger) == {"order": 1}


def _key(node: Any, order: str) -> tuple[str, str, str]:
    key = node.spec.idempotency.key_for((order,), {})[0]
    return key.namespace, key.scope, key.digest


# ---------------------------------------------------------------------------- exhausted


def test_an_exhausted_pool_fails_the_call_before_anything_ran(
    stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """With its only connection held, a keyed call with a 0.3 s budget fails with a store
    error within that budget, and its body never ran."""
    ledger = tmp_path / "ledger.txt"
    store = stores(pool_size=1)
    charge = charge_node(store, ledger, flavor="sync", timeout=nk.Timeout(total=0.3))
    assert charge("warm") == "charged:warm"
    pool = store._pool()
    held = pool.getconn()
    try:
        start = time.monotonic()
        with pytest.raises(nk.IdempotencyStoreError) as raised:
            charge("order")
        took = time.monotonic() - start
    finally:
        pool.putconn(held)
    assert took < 2.0, took
    assert isinstance(raised.value.__cause__, TimeoutError), repr(raised.value.__cause__)
    assert "no free connection" in str(raised.value.__cause__)
    assert ran(ledger) == {"warm": 1}
    assert charge("order") == "charged:order"  # the connection is back: the call runs


async def test_an_exhausted_async_pool_fails_the_call_before_anything_ran(
    stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """The async twin: this loop's only connection slot held, a keyed call with a 0.3 s budget
    fails with a store error in time, its body never ran."""
    ledger = tmp_path / "ledger.txt"
    store = stores(pool_size=1)
    charge = charge_node(store, ledger, flavor="async", timeout=nk.Timeout(total=0.3))
    assert await charge("warm") == "charged:warm"
    pool = store._conns.loop_pool(asyncio.get_running_loop(), store.pool_size)
    await pool.slots.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(nk.IdempotencyStoreError) as raised:
            await charge("order")
        took = time.monotonic() - start
    finally:
        pool.slots.release()
    assert took < 2.0, took
    assert isinstance(raised.value.__cause__, TimeoutError), repr(raised.value.__cause__)
    assert ran(ledger) == {"warm": 1}
    assert await charge("order") == "charged:order"


# ---------------------------------------------------------------------------- corrupt rows


def test_a_corrupt_row_is_refused_by_the_acquire_statement_itself(
    server: Server, stores: Callable[..., PostgresStore]
) -> None:
    """An expired-looking corrupt row (expires_at -Infinity, unknown state) is not taken:
    the acquire raises and the row keeps its owner and epoch."""
    store = stores()
    key = RecordKey("pool@v1", "", uuid.uuid4().hex * 2)
    got = store.acquire(key, "fp", lease=10, ttl=100)
    assert got.acquired
    server.update("state = 'WEIRD', expires_at = '-Infinity'")
    planted = server.row()
    with pytest.raises(nk.IdempotencyCorruptRecord):
        store.acquire(key, "fp", lease=10, ttl=100)
    with pytest.raises(nk.IdempotencyCorruptRecord):
        store.get(key)
    assert server.row() == planted


# ---------------------------------------------------------------------------- lifetime


def test_close_closes_every_connection_of_the_store(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """After sync calls, async calls on a loop that has ended and a store closed, the server
    holds none of the store's connections, and the store refuses further calls."""
    ledger = tmp_path / "ledger.txt"
    store = stores(pool_size=4)
    sync = charge_node(store, ledger, flavor="sync", name="sync")
    asynchronous = charge_node(store, ledger, flavor="async", name="async")
    sync.map([f"s-{i}" for i in range(8)])

    async def some() -> None:
        await asyncio.gather(*(asynchronous(f"a-{i}") for i in range(8)))

    asyncio.run(some())
    assert server.connections() >= 2
    store.close()
    assert server.settled_connections(0) == 0
    with pytest.raises(nk.IdempotencyStoreError):
        sync("later")
    assert "later" not in ran(ledger)


async def test_aclose_closes_this_loops_connections(
    server: Server, stores: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    store = stores(pool_size=4)
    charge = charge_node(store, tmp_path / "ledger.txt", flavor="async")
    await asyncio.gather(*(charge(f"o-{i}") for i in range(8)))
    assert server.connections() >= 1
    await store.aclose()
    assert await asyncio.to_thread(server.settled_connections, 0) == 0


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "3", None])
def test_pool_size_must_be_a_positive_int(size: Any) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        PostgresStore("postgresql://localhost/db", pool_size=size)
    assert raised.value.option == "pool_size"
    assert "pool_size" in str(raised.value)


@pytest.mark.parametrize("wait", [-1, "1", None, float("nan")])
def test_pool_timeout_must_be_seconds(wait: Any) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        PostgresStore("postgresql://localhost/db", pool_timeout=wait)
    assert raised.value.option == "pool_timeout"


def test_repr_shows_the_pool_but_never_the_password() -> None:
    store = PostgresStore("postgresql://app:s3cret@db.internal:5433/shop", pool_size=3)
    try:
        shown = repr(store)
    finally:
        store.close()
    assert "s3cret" not in shown
    assert "db.internal" in shown
    assert "pool_size=3" in shown


# ---------------------------------------------------------------------------- lost replies


@pytest.fixture
async def proxied(postgres_url: str, pg_schema: str) -> Any:
    """The test's PostgreSQL behind a `FaultProxy` (stores through it, reads around it)."""
    from ._outage_target import Target

    target = Target("postgres", postgres_url, pg_schema)
    try:
        yield target
    finally:
        await target.aclose()


def _twins(store: Any, ledger: Path) -> dict[str, Any]:
    return {
        "sync": charge_node(store, ledger, flavor="sync", name="lost-sync"),
        "async": charge_node(store, ledger, flavor="async", name="lost-async"),
    }


async def _call(node: Any, flavor: str, order: str) -> Any:
    if flavor == "sync":
        return await asyncio.to_thread(node, order)
    return await node(order)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_an_acquire_whose_reply_is_lost_is_sent_again_and_runs_once(
    proxied: Any, tmp_path: Path, flavor: str
) -> None:
    """The server ran the acquire but the connection died before its reply: the acquire is
    sent again on a fresh connection, with the same owner token, finds its own claim, and the
    call runs its body once."""
    ledger = tmp_path / "ledger.txt"
    charge = _twins(proxied.store(), ledger)[flavor]
    assert await _call(charge, flavor, "warm") == "charged:warm"
    proxied.lose_next_reply(proxied.acquire_pattern, cut=True, resend=True)
    assert await _call(charge, flavor, "order") == "charged:order"
    assert proxied.proxy.stats.dropped_down > 0  # the server answered: it ran the acquire
    record = await asyncio.to_thread(proxied.record, RecordKey(*_key(charge, "order")))
    assert record is not None
    assert record.state == COMPLETED
    assert record.epoch == 1
    assert ran(ledger) == {"warm": 1, "order": 1}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_lost_acquire_reply_with_the_server_gone_runs_nothing_and_frees_the_key(
    proxied: Any, tmp_path: Path, flavor: str
) -> None:
    """The acquire's reply is lost and new connections are refused for 0.5 s: the one retry
    cannot connect, so the call fails closed (nothing ran), and the claim that had landed is
    released once the server is back; the next call runs once."""

    ledger = tmp_path / "ledger.txt"
    charge = _twins(proxied.store(), ledger)[flavor]
    assert await _call(charge, flavor, "warm") == "charged:warm"
    proxy = proxied.proxy
    before = proxy.stats.dropped_down
    proxy.on_next(proxied.acquire_pattern, "drop_replies", count=1)

    def cut_once_lost() -> None:
        deadline = time.monotonic() + 5.0
        while proxy.stats.dropped_down == before and time.monotonic() < deadline:
            time.sleep(0.001)
        proxy.refuse(0.5)
        proxy.cut()

    cutter = threading.Thread(target=cut_once_lost, daemon=True)
    cutter.start()
    with pytest.raises(nk.IdempotencyStoreError) as raised:
        await _call(charge, flavor, "order")
    cutter.join()
    # the resend could not connect: the first send may have landed, so not "never sent"
    assert isinstance(raised.value.__cause__, ConnectionError), repr(raised.value.__cause__)
    assert "order" not in ran(ledger)
    key = RecordKey(*_key(charge, "order"))
    deadline = time.monotonic() + 3.0
    while await asyncio.to_thread(proxied.record, key) is not None:
        assert time.monotonic() < deadline, "the landed claim was never released"
        await asyncio.sleep(0.02)
    assert await _call(charge, flavor, "order") == "charged:order"
    assert ran(ledger) == {"warm": 1, "order": 1}


def test_a_store_never_closed_does_not_keep_the_process_alive(server: Server) -> None:
    """A program that used a store (sync and async) and exits without closing it exits at
    once, and the server sees its connections go."""
    import subprocess
    import sys
    import textwrap

    program = textwrap.dedent(
        f"""
        import asyncio
        import nodekit as nk
        store = nk.PostgresStore({server.dsn()!r}, schema={server.schema!r})
        policy = nk.Idempotency(key=lambda order: order, store=store)

        @nk.node(name="exit-sync", idempotency=policy)
        def charge(order: str) -> str:
            return order

        @nk.node(name="exit-async", idempotency=policy)
        async def acharge(order: str) -> str:
            return order

        charge("a")
        asyncio.run(acharge("b"))
        print("done", flush=True)
        """
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert took < 10.0, took
    assert server.settled_connections(0) == 0
