"""RedisStore under load and faults: bounded pools, broken connections, restarts, bad records.

Effects are counted outside the store: the node body appends a line to a ledger file
(O_APPEND) and the test counts lines. Connections are counted on the server (``CLIENT LIST``,
by the client name each store sets through its URL). The suite's Redis is shared with other
tests, so a test only ever kills its own connections; the tests that restart a server, or need
one that keeps data on disk, start a private ``redis-server`` on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import nodekit as nk
from nodekit._runtime import RUNTIME
from nodekit.idempotency import RecordKey
from nodekit.idempotency import _redis_scripts as redis_scripts
from nodekit.idempotency.redis import RedisStore
from nodekit.testing import FaultProxy

from ._workers import append_line, read_lines

pytestmark = pytest.mark.services

FLAVORS = ["sync", "async"]


# ---------------------------------------------------------------------------- plumbing


def with_query(url: str, **params: Any) -> str:
    """`url` with query parameters added."""
    parts = urlsplit(url)
    query = "&".join([*filter(None, [parts.query]), *(f"{k}={v}" for k, v in params.items())])
    return parts._replace(query=query).geturl()


def new_name() -> str:
    return f"nk-pool-{uuid.uuid4().hex[:10]}"


def admin(url: str) -> Any:
    """A plain redis-py client, around the store (its connections carry no name)."""
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def connections(url: str, name: str) -> list[dict[str, Any]]:
    """The server's connections whose client name is `name`."""
    client = admin(url)
    try:
        return [c for c in client.client_list() if c.get("name") == name]
    finally:
        client.close()


def kill(url: str, name: str) -> set[str]:
    """Kill the connections named `name` (only those: the server is shared); their ids."""
    client = admin(url)
    try:
        ids = {c["id"] for c in client.client_list() if c.get("name") == name}
        for cid in ids:
            client.client_kill_filter(_id=cid)
        return ids
    finally:
        client.close()


def states(url: str, prefix: str) -> Counter[str]:
    """How many records of this test's stores are in each state, read from the server."""
    client = admin(url)
    try:
        names = [
            n
            for n in client.scan_iter(match=prefix + "store:*", count=1000)
            if not n.endswith(":meta")
        ]
        return Counter(client.hget(name, "state") for name in names)
    finally:
        client.close()


class Peak:
    """Samples, in a thread, how many connections named `name` the server has; `.most`."""

    def __init__(self, url: str, name: str) -> None:
        self.client = admin(url)
        self.name = name
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            count = sum(1 for c in self.client.client_list() if c.get("name") == self.name)
            self.most = max(self.most, count)
            self.samples += 1

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


class Charge:
    """A keyed WRITE node, sync and async twins, appending each order it charges to a ledger."""

    def __init__(self, store: RedisStore, ledger: Path, **policy: Any) -> None:
        self.ledger = ledger
        options = {k: policy.pop(k) for k in ("timeout",) if k in policy}
        idem = nk.Idempotency(key=lambda order: order, store=store, **policy)

        @nk.node(name="charge", effect=nk.Effect.WRITE, idempotency=idem, **options)
        def charge(order: str) -> str:
            append_line(ledger, order)
            return f"charged:{order}"

        @nk.node(name="acharge", effect=nk.Effect.WRITE, idempotency=idem, **options)
        async def acharge(order: str) -> str:
            append_line(ledger, order)
            return f"charged:{order}"

        self.sync, self.async_ = charge, acharge

    async def call(self, flavor: str, order: str) -> str:
        """One call, sync (in this thread: sync code has no loop to block) or async."""
        if flavor == "sync":
            return self.sync(order)
        return await self.async_(order)

    def ran(self) -> Counter[str]:
        return Counter(read_lines(self.ledger))


@pytest.fixture
def store_factory(redis_url: str, redis_prefix: str) -> Iterator[Callable[..., RedisStore]]:
    """Stores on this test's prefix, closed afterwards (the records and the ledger apart)."""
    made: list[RedisStore] = []

    def make(url: str | None = None, **options: Any) -> RedisStore:
        store = RedisStore(url or redis_url, prefix=redis_prefix + "store:", **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# ---------------------------------------------------------------------------- a private server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A private ``redis-server`` on a loopback port, stopped and started by the test."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.options = options
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # waiting for a process, not a timed behaviour
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start private Redis servers (options as on redis-server's command line); skips when
    redis-server is not installed (NODEKIT_REQUIRE_SERVICES is about the shared services)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    servers: list[Server] = []

    def start(*options: str) -> Server:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = Server(directory, *options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "20", None])
def test_pool_size_must_be_a_whole_number_of_one_or_more(size: Any) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        RedisStore("redis://127.0.0.1:6379/0", pool_size=size)
    assert raised.value.option == "pool_size"


@pytest.mark.parametrize(
    ("option", "value"),
    [("pool_timeout", -1), ("pool_timeout", None), ("socket_timeout", float("nan"))],
)
def test_time_options_are_checked(option: str, value: Any) -> None:
    with pytest.raises(nk.ConfigError) as raised:
        RedisStore("redis://127.0.0.1:6379/0", **{option: value})
    assert raised.value.option == option


def test_the_pool_is_bounded_and_has_timeouts_that_the_url_may_override() -> None:
    from datetime import timedelta

    store = RedisStore("redis://127.0.0.1:6379/0", pool_size=7, pool_timeout=timedelta(seconds=2))
    pool = store._scripts().client.connection_pool
    assert pool.max_connections == 7
    assert pool.timeout == 2.0
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (10.0, 5.0)
    assert kwargs["health_check_interval"] > 0
    store.close()
    url = "redis://127.0.0.1:6379/0?socket_timeout=0.25&max_connections=500"
    store = RedisStore(url, pool_size=3)
    pool = store._scripts().client.connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 0.25  # the URL wins
    assert pool.max_connections == 3  # ... but pool_size counts the slots: it sizes the pool
    store.close()


# ---------------------------------------------------------------------------- load


async def test_500_concurrent_async_calls_share_20_connections_and_each_key_runs_once(
    redis_url: str, store_factory: Callable[..., RedisStore], tmp_path: Path
) -> None:
    name = new_name()
    store = store_factory(with_query(redis_url, client_name=name), pool_size=20)
    charge = Charge(store, tmp_path / "ledger", on_conflict="wait", wait_timeout=60)
    keys = [f"o-{i}" for i in range(1000)]
    calls = 0
    with Peak(redis_url, name) as peak:
        start = time.perf_counter()
        for round_ in range(6):  # 500 at a time; each key runs in one round, replays in two
            batch = keys[(round_ % 2) * 500 :][:500]
            results = await asyncio.gather(
                *(charge.async_(order) for order in batch), return_exceptions=True
            )
            calls += len(batch)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors == [], f"{len(errors)} errors, first: {errors[0]!r}"
            assert results == [f"charged:{order}" for order in batch]
        elapsed = time.perf_counter() - start
    assert charge.ran() == Counter(keys)
    assert peak.samples > 0
    assert 0 < peak.most <= 20, peak.most
    print(f"async: {calls} calls in {elapsed:.2f}s, {calls / elapsed:.0f}/s; peak {peak.most}")
    await store.aclose()


def test_50_threads_share_20_connections_and_each_key_runs_once(
    redis_url: str, store_factory: Callable[..., RedisStore], tmp_path: Path
) -> None:
    name = new_name()
    store = store_factory(with_query(redis_url, client_name=name), pool_size=20)
    charge = Charge(store, tmp_path / "ledger", on_conflict="wait", wait_timeout=60)
    keys = [f"o-{i}" for i in range(1000)]
    orders = [order for round_ in range(3) for order in keys]  # each key: one run, two replays

    def call(order: str) -> str | BaseException:
        try:
            return charge.sync(order)
        except BaseException as exc:  # counted, not raised: every error must show
            return exc

    with Peak(redis_url, name) as peak, ThreadPoolExecutor(50) as pool:
        start = time.perf_counter()
        results = list(pool.map(call, orders))
        elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], f"{len(errors)} errors, first: {errors[0]!r}"
    assert charge.ran() == Counter(keys)
    assert 0 < peak.most <= 20, peak.most
    print(f"sync: {len(orders)} calls in {elapsed:.2f}s, {len(orders) / elapsed:.0f}/s")


# ---------------------------------------------------------------------------- no free connection


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_no_free_connection_before_the_deadline_fails_closed_and_runs_nothing(
    store_factory: Callable[..., RedisStore], tmp_path: Path, flavor: str
) -> None:
    store = store_factory(pool_size=1)  # pool_timeout stays 30 s: the deadline is what ends it
    charge = Charge(store, tmp_path / "ledger", timeout=nk.Timeout(total=0.3))
    if flavor == "sync":
        slots = store._scripts().slots
        slots.acquire()
    else:
        slots = (await store._ascripts()).slots
        await slots.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(nk.IdempotencyStoreError) as raised:
            await charge.call(flavor, "o-1")
        elapsed = time.monotonic() - start
    finally:
        slots.release()
    assert charge.ran() == Counter()
    assert 0.2 < elapsed < 2.0, elapsed
    cause = raised.value.__cause__
    assert isinstance(cause, TimeoutError)
    assert "no free connection among 1" in str(cause)
    # nothing was sent, so nothing was left locked: the next call runs at once
    assert await charge.call(flavor, "o-1") == "charged:o-1"
    assert charge.ran() == Counter({"o-1": 1})


# ---------------------------------------------------------------------------- broken connections


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_killed_connection_is_replaced_without_failing_the_next_call(
    redis_url: str, store_factory: Callable[..., RedisStore], tmp_path: Path, flavor: str
) -> None:
    name = new_name()
    store = store_factory(with_query(redis_url, client_name=name))
    charge = Charge(store, tmp_path / "ledger")
    assert await charge.call(flavor, "o-1") == "charged:o-1"
    killed = await asyncio.to_thread(kill, redis_url, name)
    assert killed  # the store's idle connection, reset under it
    assert await charge.call(flavor, "o-2") == "charged:o-2"
    assert await charge.call(flavor, "o-1") == "charged:o-1"  # a replay
    assert charge.ran() == Counter({"o-1": 1, "o-2": 1})
    now = {c["id"] for c in await asyncio.to_thread(connections, redis_url, name)}
    assert now
    assert not now & killed


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("script", ["ACQUIRE", "COMPLETE"])
async def test_a_lost_reply_is_answered_by_sending_once_more(
    redis_url: str,
    redis_prefix: str,
    store_factory: Callable[..., RedisStore],
    tmp_path: Path,
    flavor: str,
    script: str,
) -> None:
    """The server ran the script but its reply was lost (the read times out): the store
    sends it again on a fresh connection, the owner token tells the call its own claim or
    completion apart, and the call succeeds with one effect."""
    parts = urlsplit(redis_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        url = with_query(
            proxy.url(redis_url.replace(parts.netloc, "{address}")), socket_timeout=0.25
        )
        store = store_factory(url)
        charge = Charge(store, tmp_path / "ledger")
        assert await charge.call(flavor, "warm") == "charged:warm"
        sha = hashlib.sha1(getattr(redis_scripts, script).encode()).hexdigest().encode()
        proxy.on_next(sha, "drop_replies", count=1)
        assert await charge.call(flavor, "o-1") == "charged:o-1"
        assert proxy.stats.dropped_down > 0  # the reply was indeed lost
        assert charge.ran() == Counter({"warm": 1, "o-1": 1})
        await store.aclose()
    assert states(redis_url, redis_prefix) == Counter({"COMPLETED": 2})


async def test_a_restarted_server_is_used_again_and_its_scripts_reloaded(
    private_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = private_server(*NO_PERSISTENCE)
    store = RedisStore(server.url, prefix="nk:")
    charge = Charge(store, tmp_path / "ledger")
    try:
        assert await charge.call("sync", "before-sync") == "charged:before-sync"
        assert await charge.call("async", "before-async") == "charged:before-async"
        server.stop()
        server.start()  # same port; empty (no persistence): no scripts, no records
        assert await charge.call("sync", "after-sync") == "charged:after-sync"
        assert await charge.call("async", "after-async") == "charged:after-async"
    finally:
        await store.aclose()
    assert charge.ran() == Counter(["before-sync", "before-async", "after-sync", "after-async"])


# ---------------------------------------------------------------------------- durability


@pytest.fixture
def durability(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process has asked no server about persistence yet."""
    monkeypatch.setattr(RUNTIME, "warned", set())


def _keeps_nothing(url: str) -> bool:
    client = admin(url)
    try:
        return bool(
            client.config_get("appendonly")["appendonly"] == "no"
            and client.config_get("save")["save"] == ""
        )
    finally:
        client.close()


async def test_a_server_that_keeps_nothing_on_disk_warns_once(
    redis_url: str,
    store_factory: Callable[..., RedisStore],
    tmp_path: Path,
    durability: None,
) -> None:
    if not _keeps_nothing(redis_url):
        pytest.skip("the test Redis keeps data on disk")

    async def two_stores_three_calls() -> None:
        first = Charge(store_factory(), tmp_path / "ledger")
        assert await first.call("sync", "o-1") == "charged:o-1"
        assert await first.call("async", "o-2") == "charged:o-2"
        second = Charge(store_factory(), tmp_path / "ledger")  # another store, same server
        assert await second.call("sync", "o-1") == "charged:o-1"

    with pytest.warns(nk.NodekitWarning, match="RedisStore") as record:
        await two_stores_three_calls()
    (warning,) = [w for w in record if issubclass(w.category, nk.NodekitWarning)]
    message = str(warning.message)
    assert message.startswith("RedisStore")
    assert "will not survive a Redis restart" in message
    assert "appendonly yes" in message
    assert warning.filename == __file__  # points at the caller, not into nodekit


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--save", "", "--appendonly", "yes"), id="aof"),
        pytest.param((*NO_PERSISTENCE, "--rename-command", "CONFIG", ""), id="config-refused"),
    ],
)
async def test_a_server_that_keeps_its_data_or_hides_config_does_not_warn(
    private_server: Callable[..., Server], tmp_path: Path, durability: None, options: tuple[str]
) -> None:
    server = private_server(*options)
    store = RedisStore(server.url, prefix="nk:")
    charge = Charge(store, tmp_path / "ledger")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert await charge.call("sync", "o-1") == "charged:o-1"
        assert await charge.call("async", "o-2") == "charged:o-2"
    await store.aclose()
    assert [w for w in record if issubclass(w.category, nk.NodekitWarning)] == []


# ---------------------------------------------------------------------------- round trips


async def test_a_keyed_call_costs_one_round_trip_to_acquire_and_one_to_complete(
    private_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = private_server(*NO_PERSISTENCE)
    store = RedisStore(server.url, prefix="nk:")
    charge = Charge(store, tmp_path / "ledger")
    assert await charge.call("sync", "warm") == "charged:warm"  # first use: meta, CONFIG
    assert await charge.call("async", "warm") == "charged:warm"
    client = admin(server.url)
    client.config_resetstat()
    for i in range(20):
        assert await charge.call("sync", f"s-{i}") == f"charged:s-{i}"
        assert await charge.call("async", f"a-{i}") == f"charged:a-{i}"
    stats = client.info("commandstats")
    client.close()
    await store.aclose()
    calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    # commandstats also counts the commands the scripts run (HGETALL in acquire, HSET, ...):
    # the client sent one EVALSHA per step, and nothing else (no ping, no reload, no meta)
    assert calls["evalsha"] == 80  # 40 calls x (acquire, complete)
    assert calls["hgetall"] == 40  # inside the acquire script only: no separate read
    client_only = {"hsetnx", "config|get", "script|load", "ping", "eval", "client|setinfo", "hget"}
    assert client_only.isdisjoint(calls), calls


# ---------------------------------------------------------------------------- corrupt records


# what only a Redis hash can hold (text anywhere, missing fields); the corruptions every store
# can hold are in test_corrupt_records.py
CORRUPTIONS = [
    *(
        pytest.param({"expires_at": value}, "expires_at", id=f"expires_at={value!r}")
        for value in ("", "0x7fffffff")
    ),
    pytest.param({"fingerprint": None}, "fingerprint", id="no-fingerprint"),
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize(("fields", "field"), CORRUPTIONS)
async def test_a_corrupt_record_raises_and_is_neither_run_nor_touched(
    redis_url: str,
    redis_prefix: str,
    store_factory: Callable[..., RedisStore],
    tmp_path: Path,
    flavor: str,
    fields: dict[str, str | None],
    field: str,
) -> None:
    store = store_factory()
    charge = Charge(store, tmp_path / "ledger")
    assert await charge.call(flavor, "o-1") == "charged:o-1"
    client = admin(redis_url)
    (name,) = [
        n
        for n in client.scan_iter(match=redis_prefix + "store:*", count=1000)
        if not n.endswith(":meta")
    ]
    digest = client.hget(name, "key_digest")
    for key, value in fields.items():
        if value is None:
            client.hdel(name, key)
        else:
            client.hset(name, key, value)
    before = client.hgetall(name)
    with pytest.raises(nk.IdempotencyCorruptRecord) as raised:
        await charge.call(flavor, "o-1")
    error = raised.value
    assert error.field == field
    assert error.store == repr(store)
    assert error.key_fingerprint == digest[:12]
    assert charge.ran() == Counter({"o-1": 1})
    assert client.hgetall(name) == before
    with pytest.raises(nk.IdempotencyCorruptRecord):
        store.get(RecordKey(before["namespace"], before["scope"], digest))
    client.close()


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_time_that_python_reads_but_nodekit_never_writes_is_corrupt_to_acquire(
    redis_url: str,
    redis_prefix: str,
    store_factory: Callable[..., RedisStore],
    tmp_path: Path,
    flavor: str,
) -> None:
    """``1_0`` is 10.0 to Python's float() but not a number nodekit writes: the acquire script
    refuses it, and the call raises naming the field, rather than take the record for expired."""
    store = store_factory()
    charge = Charge(store, tmp_path / "ledger")
    assert await charge.call(flavor, "o-1") == "charged:o-1"
    client = admin(redis_url)
    (name,) = [
        n
        for n in client.scan_iter(match=redis_prefix + "store:*", count=1000)
        if not n.endswith(":meta")
    ]
    client.hset(name, "expires_at", "1_0")
    before = client.hgetall(name)
    with pytest.raises(nk.IdempotencyCorruptRecord) as raised:
        await charge.call(flavor, "o-1")
    assert raised.value.field == "expires_at"
    assert charge.ran() == Counter({"o-1": 1})
    assert client.hgetall(name) == before
    client.close()


# ---------------------------------------------------------------------------- event loops


def test_an_asyncio_client_closes_with_its_event_loop(
    redis_url: str, store_factory: Callable[..., RedisStore], tmp_path: Path
) -> None:
    name = new_name()
    store = store_factory(with_query(redis_url, client_name=name))
    charge = Charge(store, tmp_path / "ledger")
    for i in range(3):  # a new loop each time, as a program calling asyncio.run() repeatedly
        assert asyncio.run(charge.async_(f"o-{i}")) == f"charged:o-{i}"
        assert store._clients.loops == {}
        assert connections(redis_url, name) == []
    assert charge.ran() == Counter(["o-0", "o-1", "o-2"])


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_clients_of_loops_closed_without_shutdown_are_dropped_by_the_next_loop(
    store_factory: Callable[..., RedisStore], tmp_path: Path
) -> None:
    """A loop closed by hand (no `shutdown_asyncgens`) cannot close its client; the next
    loop's first call forgets it, so clients never pile up. (Its sockets are left to the
    garbage collector, which warns about them: hence the filters.)"""
    store = store_factory()
    charge = Charge(store, tmp_path / "ledger")
    loops = []
    for i in range(3):
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(charge.async_(f"o-{i}")) == f"charged:o-{i}"
        loop.close()
        loops.append(loop)
        assert list(store._clients.loops) == [loop]  # the one before it was dropped
    assert asyncio.run(charge.async_("o-0")) == "charged:o-0"
    assert store._clients.loops == {}
    gc.collect()  # the dropped clients' sockets go now, under this test's filters


# ---------------------------------------------------------------------------- interpreter exit


EXIT_SCRIPT = """
import asyncio, sys, warnings
import nodekit as nk
warnings.simplefilter("ignore", nk.NodekitWarning)
store = nk.RedisStore(sys.argv[1], prefix=sys.argv[2])
policy = nk.Idempotency(key=lambda order: order, store=store)
charge = nk.node(name="charge", idempotency=policy)(lambda order: order)

async def acharge(order):
    return order

assert charge("o-1") == "o-1"
assert asyncio.run(nk.node(name="acharge", idempotency=policy)(acharge)("o-2")) == "o-2"
print("done")  # and exit without closing the store
"""


def test_a_process_that_never_closes_its_store_exits_at_once_without_noise(
    redis_url: str, redis_prefix: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", EXIT_SCRIPT, redis_url, redis_prefix + "exit:"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")


def test_a_store_that_is_garbage_collected_closes_its_pool(
    redis_url: str, redis_prefix: str
) -> None:
    name = new_name()
    store = RedisStore(with_query(redis_url, client_name=name), prefix=redis_prefix + "store:")
    assert store.acquire(RecordKey("ns", "", "d" * 64), "fp", lease=10, ttl=100).acquired
    assert len(connections(redis_url, name)) == 1
    del store
    gc.collect()
    assert connections(redis_url, name) == []
