"""`FaultProxy` in front of real Redis and PostgreSQL: what a client sees, what the server did.

Every fault is checked from both sides: the client through the proxy gets a timeout or a
closed connection, and a direct connection to the server says whether the command ran.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import pytest

from nodekit.testing import FaultProxy

# --------------------------------------------------------------------------- helpers


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("FaultProxy:")]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every test closes its proxies: no proxy thread may outlive it."""
    yield
    assert proxy_threads() == []


def in_front_of(url: str) -> FaultProxy:
    parsed = urlparse(url)
    return FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 0)


def through(url: str, proxy: FaultProxy) -> str:
    """`url` with its host and port replaced by the proxy's (user and path kept)."""
    parsed = urlparse(url)
    user = parsed.netloc.rpartition("@")[0]
    return parsed._replace(netloc=f"{user}@{proxy.address}" if user else proxy.address).geturl()


class Call:
    """A blocking call run in a thread, for clients with no timeout of their own (psycopg)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(2.0)
        assert not self.thread.is_alive()


def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    """Wait (polling) for `condition`: what the proxy saw, not a guess at timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


class Echo(socketserver.ThreadingTCPServer):
    """A local echo server: the upstream of the tests that need no external service."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.received = bytearray()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> Echo:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class EchoHandler(socketserver.BaseRequestHandler):
    server: Echo

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.server.received += data
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[Echo]:
    with Echo() as server:
        yield server


def dial(proxy: FaultProxy, timeout: float = 0.2) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


# --------------------------------------------------------------------------- no services


def test_bytes_pass_both_ways_and_are_counted(echo: Echo) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy, dial(proxy) as conn:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        assert proxy.url("redis://{address}/0") == f"redis://127.0.0.1:{proxy.port}/0"
        stats = proxy.stats
    assert (stats.accepted, stats.bytes_up, stats.bytes_down, stats.bytes_dropped) == (1, 4, 4, 0)


def test_pattern_split_across_reads_still_fires_once(echo: Echo) -> None:
    """on_next sees a pattern cut in two by the network, and fires for one occurrence only."""
    with FaultProxy("127.0.0.1", echo.port) as proxy, dial(proxy) as conn:
        proxy.on_next(b"COMMIT", "drop_replies", count=1)
        conn.sendall(b"BEGIN; COM")
        assert conn.recv(16) == b"BEGIN; COM"
        conn.sendall(b"MIT;")  # the reply to this chunk is lost
        with pytest.raises(TimeoutError):
            conn.recv(16)
        conn.sendall(b"next")  # a new request: its reply comes back
        assert conn.recv(16) == b"next"
    assert bytes(echo.received) == b"BEGIN; COMMIT;next"


def test_invalid_options_are_value_errors() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        proxy.drop(-1)
    with pytest.raises(ValueError, match="unknown fault"):
        proxy.on_next(b"X", "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count is for 'drop_replies' only"):
        proxy.on_next(b"X", "drop", count=1)
    with pytest.raises(ValueError, match="count must be >= 1"):
        proxy.drop_replies(count=0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = proxy.port
    proxy.drop(timedelta(milliseconds=10))  # a timedelta is as good as seconds
    proxy.close()  # closing a proxy never started is a no-op


def test_unreachable_upstream_closes_the_client() -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        closed_port = spare.getsockname()[1]
    with FaultProxy("127.0.0.1", closed_port) as proxy, dial(proxy, 1.0) as conn:
        try:
            data = conn.recv(16)
        except ConnectionResetError:
            data = b""
        assert data == b""  # reset, or at least the end of the stream: never a hang
        assert proxy.stats.upstream_errors == 1


def test_close_ends_open_connections_and_joins_every_thread(echo: Echo) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    conns = [dial(proxy) for _ in range(3)]
    for conn in conns:
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
    assert proxy.stats.active == 3
    assert len(proxy_threads()) == 1 + 2 * 3  # the acceptor and two pumps per connection
    proxy.close()
    assert proxy_threads() == []
    for conn in conns:
        with conn:
            assert conn.recv(1) == b""


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    with in_front_of(redis_url) as proxy:
        yield proxy


def redis_client(url: str, timeout: float = 0.15) -> Any:
    """A redis-py client that fails at once: short socket timeouts and no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
def direct(redis_url: str) -> Iterator[Any]:
    """A client straight to Redis, to see what the server really did."""
    client = redis_client(redis_url, timeout=1.0)
    yield client
    client.close()


@pytest.fixture
def proxied(redis_proxy: FaultProxy, redis_url: str) -> Iterator[Any]:
    client = redis_client(through(redis_url, redis_proxy))
    yield client
    client.close()


def test_redis_traffic_passes(
    proxied: Any, direct: Any, redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    proxied.set(redis_prefix + "k", "v")
    assert proxied.get(redis_prefix + "k") == b"v"
    assert direct.get(redis_prefix + "k") == b"v"
    assert redis_proxy.stats.bytes_up > 0
    assert redis_proxy.stats.bytes_down > 0


def test_redis_drop_times_commands_out_and_heals_by_itself(
    proxied: Any, redis_proxy: FaultProxy
) -> None:
    import redis

    assert proxied.ping()
    redis_proxy.drop(0.3)
    healed = time.monotonic() + 0.3
    with pytest.raises(redis.TimeoutError):
        proxied.ping()
    assert redis_proxy.stats.dropped_up > 0
    time.sleep(max(0.0, healed - time.monotonic()))
    assert proxied.ping()  # redis-py reconnects; the proxy forwards again


def test_redis_cut_fails_the_command_in_flight_and_a_reconnect_succeeds(
    redis_proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    """A cut during a BLPOP fails it; the client's next command reconnects.

    (redis-py checks a pooled connection before reusing it, so a cut between two commands
    would go unnoticed: the command in flight is the one a cut breaks.)
    """
    import redis

    client = redis_client(through(redis_url, redis_proxy), timeout=2.0)
    try:
        assert client.ping()
        sent = redis_proxy.stats.bytes_up
        pop = Call(lambda: client.blpop([redis_prefix + "queue"], timeout=1))
        until(lambda: redis_proxy.stats.bytes_up > sent)
        redis_proxy.cut()
        pop.join()
        assert isinstance(pop.error, redis.ConnectionError)
        assert client.ping()
        assert (redis_proxy.stats.cut, redis_proxy.stats.accepted) == (1, 2)
    finally:
        client.close()


def test_redis_refuse_refuses_new_connections_until_healed(
    redis_proxy: FaultProxy, redis_url: str
) -> None:
    import redis

    redis_proxy.refuse()
    client = redis_client(through(redis_url, redis_proxy))
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert redis_proxy.stats.refused >= 1
        redis_proxy.heal()
        assert client.ping()
    finally:
        client.close()


def test_redis_reply_lost_after_the_server_ran_the_command(
    proxied: Any, direct: Any, redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """drop_replies on the SET: the key exists on the server, the client only saw a timeout."""
    import redis

    key = redis_prefix + "charged"
    assert proxied.ping()
    redis_proxy.on_next(key.encode(), "drop_replies", count=1)
    with pytest.raises(redis.TimeoutError):
        proxied.set(key, "once")
    assert direct.get(key) == b"once"
    assert redis_proxy.stats.dropped_down > 0
    assert proxied.get(key) == b"once"  # only that reply was lost


def test_redis_drop_on_next_loses_the_command_itself(
    proxied: Any, direct: Any, redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    import redis

    key = redis_prefix + "never"
    assert proxied.ping()
    redis_proxy.on_next(key.encode(), "drop")
    with pytest.raises(redis.TimeoutError):
        proxied.set(key, "x")
    assert direct.exists(key) == 0
    redis_proxy.heal()
    assert proxied.ping()


def test_redis_cut_on_next_resets_before_the_command_reaches_the_server(
    proxied: Any, direct: Any, redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    import redis

    key = redis_prefix + "reset"
    assert proxied.ping()
    redis_proxy.on_next(key.encode(), "cut")
    with pytest.raises(redis.ConnectionError):
        proxied.set(key, "x")
    assert direct.exists(key) == 0
    assert proxied.set(key, "y")


# --------------------------------------------------------------------------- PostgreSQL
# psycopg has no client-side timeout for a query: a query the proxy starves runs in a
# thread, the test sees that it does not finish, then `cut()` ends it.


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[FaultProxy]:
    with in_front_of(postgres_url) as proxy:
        yield proxy


def pg_connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, sslmode="disable", connect_timeout=2)


def test_postgres_traffic_passes(pg_proxy: FaultProxy, postgres_url: str) -> None:
    with pg_connect(through(postgres_url, pg_proxy)) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
    assert pg_proxy.stats.accepted == 1


def test_postgres_drop_starves_a_query_and_new_connections_work_once_healed(
    pg_proxy: FaultProxy, postgres_url: str
) -> None:
    import psycopg

    url = through(postgres_url, pg_proxy)
    with pg_connect(url) as conn:
        pg_proxy.drop(0.3)
        healed = time.monotonic() + 0.3
        query = Call(lambda: conn.execute("SELECT 1"))
        assert not query.done.wait(0.2)  # no answer: the query is lost in the partition
        time.sleep(max(0.0, healed - time.monotonic()))
        with pg_connect(url) as fresh:
            assert fresh.execute("SELECT 2").fetchone() == (2,)
        pg_proxy.cut()
        query.join()
        assert isinstance(query.error, psycopg.OperationalError)


def test_postgres_cut_fails_the_next_query_and_a_reconnect_succeeds(
    pg_proxy: FaultProxy, postgres_url: str
) -> None:
    import psycopg

    url = through(postgres_url, pg_proxy)
    with pg_connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg_proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pg_connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_refuse_refuses_new_connections(pg_proxy: FaultProxy, postgres_url: str) -> None:
    import psycopg

    pg_proxy.refuse(timedelta(seconds=5))
    with pytest.raises(psycopg.OperationalError):
        pg_connect(through(postgres_url, pg_proxy))
    assert pg_proxy.stats.refused >= 1
    assert pg_proxy.stats.accepted == 0


def test_postgres_reply_lost_after_the_row_was_committed(
    pg_proxy: FaultProxy, postgres_url: str, pg_schema: str
) -> None:
    """drop_replies on the INSERT: the row is committed, the client never hears back."""
    import psycopg

    marker = f"charge-{uuid.uuid4().hex[:8]}"
    with pg_connect(postgres_url) as admin:
        admin.execute(f'CREATE TABLE "{pg_schema}".charges (id TEXT PRIMARY KEY)')
    with pg_connect(through(postgres_url, pg_proxy)) as conn:
        pg_proxy.on_next(marker.encode(), "drop_replies", count=1)
        insert = Call(
            lambda: conn.execute(f'INSERT INTO "{pg_schema}".charges VALUES (%s)', (marker,))
        )
        assert not insert.done.wait(0.3)
        with pg_connect(postgres_url) as admin:
            rows = admin.execute(f'SELECT id FROM "{pg_schema}".charges').fetchall()
        assert rows == [(marker,)]
        pg_proxy.cut()
        insert.join()
        assert isinstance(insert.error, psycopg.OperationalError)
