"""The errors of the libraries users call are classified as the README's table says.

Against real behaviour wherever it matters: a refused port on 127.0.0.1, a listener whose
accept queue is full (connect timeout), a slow `LocalAPI` route (read timeout), real 503/429
answers with ``Retry-After``, a connection dropped after the request was processed, a real
PostgreSQL serialization failure, deadlock and terminated backend, a locked SQLite database.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.client
import logging
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import urllib3

import nodekit as nk
from nodekit._classify import retry_after
from nodekit._runtime import RUNTIME
from nodekit.testing import FaultPlan, LocalAPI, capture_events, instant

try:
    import aiohttp
except ImportError:  # a dev dependency; its tests skip without it
    aiohttp = None

needs_aiohttp = pytest.mark.skipif(aiohttp is None, reason="aiohttp is not installed")


def raised(call: Callable[[], object]) -> BaseException:
    """The exception `call` raises (the test fails if it returns)."""
    try:
        call()
    except BaseException as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it is the response too: its headers stay readable
        return exc
    pytest.fail(f"{call} raised nothing")


async def araised(call: Callable[[], Any]) -> BaseException:
    try:
        await call()
    except BaseException as exc:
        return exc
    pytest.fail(f"{call} raised nothing")


# ---------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def api() -> Iterator[LocalAPI]:
    """A real local HTTP server (`/status/<code>?retry_after=`, `/delay/<s>`, faults)."""
    with LocalAPI(faults=FaultPlan(rate=0.0, retry_after=7)) as server:
        yield server


@pytest.fixture
def own_api() -> Iterator[LocalAPI]:
    """A server of the test's own, for counting effects (the shared one may still be
    finishing an earlier test's slow request)."""
    with LocalAPI(faults=FaultPlan(rate=0.0, retry_after=7)) as server:
        yield server


@pytest.fixture
def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound, then closed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def full_port() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full: a connect times out
    (Linux drops the SYN instead of refusing)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
    except TimeoutError:
        pass
    else:
        pytest.skip("this kernel accepts connections past a full backlog: no connect timeout")
    finally:
        probe.close()
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a server that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


# ---------------------------------------------------------------------------- HTTP: sync


def test_a_refused_port_is_safe_for_every_http_library(refused_port: int) -> None:
    """Connection refused: nothing was sent, whatever library reports it."""
    url = f"http://127.0.0.1:{refused_port}/charge"
    pool = urllib3.PoolManager(retries=False)
    errors = {
        "socket": raised(lambda: socket.create_connection(("127.0.0.1", refused_port), 1)),
        "http.client": raised(
            lambda: http.client.HTTPConnection("127.0.0.1", refused_port, timeout=1).request(
                "POST", "/"
            )
        ),
        "urllib": raised(lambda: urllib.request.urlopen(url, data=b"{}", timeout=1)),
        "urllib3": raised(lambda: pool.request("POST", url)),
        "requests": raised(lambda: requests.post(url, timeout=1)),
        "httpx": raised(lambda: httpx.post(url, timeout=1)),
    }
    assert isinstance(errors["requests"], requests.ConnectionError)
    assert isinstance(errors["urllib"], urllib.error.URLError)
    assert {name: nk.classify(exc) for name, exc in errors.items()} == dict.fromkeys(errors, "safe")


def test_requests_wraps_urllib3_max_retries_and_is_classified_by_the_cause(
    refused_port: int,
) -> None:
    """requests.ConnectionError(MaxRetryError(NewConnectionError)) is safe because its cause is."""
    adapter = requests.adapters.HTTPAdapter(max_retries=urllib3.Retry(total=1, backoff_factor=0))
    with requests.Session() as session:
        session.mount("http://", adapter)
        exc = raised(lambda: session.get(f"http://127.0.0.1:{refused_port}/", timeout=1))
    assert isinstance(exc, requests.ConnectionError)
    assert isinstance(exc.args[0], urllib3.exceptions.MaxRetryError)
    assert isinstance(exc.args[0].reason, urllib3.exceptions.NewConnectionError)
    assert nk.classify(exc) == "safe"


def test_an_unresolvable_host_is_safe() -> None:
    """DNS failure: nothing was sent (``.invalid`` never resolves, RFC 6761)."""
    host = "nodekit-test.invalid"
    errors = [
        raised(lambda: socket.getaddrinfo(host, 80)),
        raised(lambda: requests.get(f"http://{host}/", timeout=2)),
        raised(lambda: httpx.get(f"http://{host}/", timeout=2)),
        raised(lambda: urllib.request.urlopen(f"http://{host}/", timeout=2)),
    ]
    assert isinstance(errors[0], socket.gaierror)
    assert [nk.classify(exc) for exc in errors] == ["safe"] * 4


def test_a_connect_timeout_is_safe(full_port: int) -> None:
    url = f"http://127.0.0.1:{full_port}/"
    connect_timeouts = [
        raised(lambda: requests.get(url, timeout=(0.2, 5))),
        raised(lambda: httpx.get(url, timeout=httpx.Timeout(5, connect=0.2))),
        raised(
            lambda: urllib3.PoolManager(retries=False).request(
                "GET", url, timeout=urllib3.Timeout(connect=0.2, read=5)
            )
        ),
    ]
    assert isinstance(connect_timeouts[0], requests.ConnectTimeout)
    assert [nk.classify(exc) for exc in connect_timeouts] == ["safe"] * 3


def test_a_read_timeout_is_ambiguous(api: LocalAPI) -> None:
    """The slow server got the request and may be acting on it: ambiguous, for every library."""
    url = f"{api.url}/delay/2"
    errors = {
        "requests": raised(lambda: requests.post(url, timeout=(2, 0.2))),
        "httpx": raised(lambda: httpx.post(url, timeout=0.2)),
        "urllib3": raised(
            lambda: urllib3.PoolManager(retries=False).request(
                "POST", url, timeout=urllib3.Timeout(connect=2, read=0.2)
            )
        ),
        "urllib": raised(lambda: urllib.request.urlopen(url, data=b"{}", timeout=0.2)),
    }
    assert isinstance(errors["requests"], requests.ReadTimeout)
    assert isinstance(errors["urllib"], TimeoutError)
    assert {name: nk.classify(exc) for name, exc in errors.items()} == dict.fromkeys(
        errors, "ambiguous"
    )


def test_a_connection_dropped_after_sending_is_ambiguous(api: LocalAPI) -> None:
    """The server processed the request, then closed without answering."""
    url = f"{api.url}/status/200"
    errors = {}
    for name, call in {
        "requests": lambda: requests.post(url, timeout=2),
        "httpx": lambda: httpx.post(url, timeout=2),
        "urllib": lambda: urllib.request.urlopen(url, data=b"{}", timeout=2),
        "urllib3": lambda: urllib3.PoolManager(retries=False).request("POST", url),
    }.items():
        api.fail_next("drop_after")
        errors[name] = raised(call)
    # requests.ConnectionError(ProtocolError('Connection aborted.', RemoteDisconnected(...)))
    assert isinstance(errors["requests"], requests.ConnectionError)
    assert isinstance(errors["requests"].args[0], urllib3.exceptions.ProtocolError)
    assert isinstance(errors["urllib"], http.client.RemoteDisconnected)
    assert {name: nk.classify(exc) for name, exc in errors.items()} == dict.fromkeys(
        errors, "ambiguous"
    )


def test_a_hung_server_read_timeout_is_ambiguous_for_http_client(silent_port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", silent_port, timeout=0.2)
    exc = raised(lambda: (conn.request("POST", "/"), conn.getresponse()))
    conn.close()
    assert isinstance(exc, TimeoutError)
    assert nk.classify(exc) == "ambiguous"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (408, "safe"),
        (425, "safe"),
        (429, "safe"),
        (503, "safe"),
        (500, "ambiguous"),
        (502, "ambiguous"),
        (504, "ambiguous"),
        (400, "permanent"),
        (401, "permanent"),
        (404, "permanent"),
        (409, "permanent"),
        (422, "permanent"),
        (501, "permanent"),
    ],
)
def test_statuses_from_raise_for_status(api: LocalAPI, status: int, kind: str) -> None:
    """requests' and httpx's ``raise_for_status()`` and urllib's HTTPError, by status."""
    url = f"{api.url}/status/{status}"
    errors = [
        raised(lambda: requests.get(url, timeout=2).raise_for_status()),
        raised(lambda: httpx.get(url, timeout=2).raise_for_status()),
        raised(lambda: urllib.request.urlopen(url, timeout=2)),
    ]
    assert isinstance(errors[0], requests.HTTPError)
    assert isinstance(errors[2], urllib.error.HTTPError)
    assert [nk.classify(exc) for exc in errors] == [kind] * 3


def test_retry_after_in_seconds_and_as_an_http_date(api: LocalAPI) -> None:
    when = time.time() + 120
    date = email.utils.formatdate(when, usegmt=True)
    seconds = f"{api.url}/status/503?retry_after=7"
    dated = f"{api.url}/status/429?retry_after={urllib.parse.quote(date)}"
    for url, expected in ((seconds, 7.0), (dated, 120.0)):
        errors = [
            raised(lambda url=url: requests.get(url, timeout=2).raise_for_status()),
            raised(lambda url=url: httpx.get(url, timeout=2).raise_for_status()),
            raised(lambda url=url: urllib.request.urlopen(url, timeout=2)),
        ]
        for exc in errors:
            assert nk.classify(exc) == "safe"
            wait = retry_after(exc, now=when - expected if url is dated else None)
            assert wait == pytest.approx(expected, abs=1.0)


def test_permanent_requests_errors() -> None:
    """A URL, schema or header nothing will fix is permanent; so is a bad certificate."""
    errors = [
        raised(lambda: requests.get("not a url")),
        raised(lambda: requests.get("ftp://127.0.0.1/")),
        raised(lambda: requests.get("http://")),
        requests.exceptions.SSLError(
            urllib3.exceptions.MaxRetryError(
                None,  # type: ignore[arg-type]
                "/",
                urllib3.exceptions.SSLError(
                    ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] failed")
                ),
            )
        ),
    ]
    assert [nk.classify(exc) for exc in errors] == ["permanent"] * 4


# ---------------------------------------------------------------------------- HTTP: aiohttp


async def _aiohttp(method: str, url: str, **timeout: float) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, timeout=aiohttp.ClientTimeout(**timeout)) as response,
    ):
        response.raise_for_status()
        return str(await response.text())


@needs_aiohttp
async def test_aiohttp_refused_and_connect_timeout_are_safe(
    refused_port: int, full_port: int
) -> None:
    refused = await araised(lambda: _aiohttp("POST", f"http://127.0.0.1:{refused_port}/"))
    timed_out = await araised(
        lambda: _aiohttp("POST", f"http://127.0.0.1:{full_port}/", sock_connect=0.2)
    )
    assert isinstance(refused, aiohttp.ClientConnectorError)
    assert isinstance(timed_out, aiohttp.ServerTimeoutError)
    assert nk.classify(refused) == "safe"
    assert nk.classify(timed_out) == "safe"


@needs_aiohttp
async def test_aiohttp_read_timeouts_and_disconnects_are_ambiguous(api: LocalAPI) -> None:
    sock_read = await araised(lambda: _aiohttp("POST", f"{api.url}/delay/2", sock_read=0.2))
    total = await araised(lambda: _aiohttp("POST", f"{api.url}/delay/2", total=0.2))
    api.fail_next("drop_after")
    dropped = await araised(lambda: _aiohttp("POST", f"{api.url}/status/200"))
    assert isinstance(sock_read, aiohttp.ServerTimeoutError)
    assert isinstance(total, asyncio.TimeoutError)
    assert isinstance(dropped, aiohttp.ServerDisconnectedError)
    assert [nk.classify(exc) for exc in (sock_read, total, dropped)] == ["ambiguous"] * 3


@needs_aiohttp
async def test_aiohttp_statuses_and_retry_after(api: LocalAPI) -> None:
    too_many = await araised(lambda: _aiohttp("GET", f"{api.url}/status/429?retry_after=3"))
    unavailable = await araised(lambda: _aiohttp("GET", f"{api.url}/status/503"))
    bad_gateway = await araised(lambda: _aiohttp("GET", f"{api.url}/status/502"))
    not_found = await araised(lambda: _aiohttp("GET", f"{api.url}/status/404"))
    assert isinstance(too_many, aiohttp.ClientResponseError)
    assert nk.classify(too_many) == "safe"
    assert retry_after(too_many) == 3.0
    assert nk.classify(unavailable) == "safe"
    assert retry_after(unavailable) is None
    assert nk.classify(bad_gateway) == "ambiguous"
    assert nk.classify(not_found) == "permanent"


# ---------------------------------------------------------------------------- through a node


def test_a_read_node_retries_a_requests_503_honouring_retry_after(own_api: LocalAPI) -> None:
    @nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=3, max_wait=60, jitter=0))
    def balance() -> int:
        response = requests.get(f"{own_api.url}/status/200", timeout=2)
        response.raise_for_status()
        return response.status_code

    own_api.fail_next("503")  # answered at once with Retry-After: 7, nothing processed
    with instant() as clock, capture_events(prefix="node.retrying") as events:
        assert balance() == 200
    assert clock.sleeps == [7.0]
    assert events[0]["kind"] == "safe"
    assert events[0]["retry_after"] == 7.0
    assert [e.outcome for e in own_api.ledger.entries] == ["fault", "processed"]


@needs_aiohttp
async def test_an_async_read_node_retries_an_aiohttp_429_honouring_retry_after(
    own_api: LocalAPI,
) -> None:
    @nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=3, max_wait=60, jitter=0))
    async def balance() -> str:
        return await _aiohttp("GET", f"{own_api.url}/status/200")

    own_api.fail_next("429")
    with instant() as clock:
        assert "200" in await balance()
    assert clock.sleeps == [7.0]


def test_a_write_node_without_a_key_does_not_retry_an_ambiguous_requests_error(
    own_api: LocalAPI,
) -> None:
    """The charge went through, the answer was lost: retrying could charge twice."""

    @nk.node(retry=nk.Retry(attempts=3, jitter=0))
    def charge() -> int:
        return requests.post(f"{own_api.url}/status/201", timeout=2).status_code

    own_api.fail_next("drop_after")
    with instant() as clock, pytest.raises(nk.UnsafeRetry) as info:
        charge()
    assert isinstance(info.value.__cause__, requests.ConnectionError)
    assert clock.sleeps == []
    assert [e.outcome for e in own_api.ledger.entries] == ["processed"]


def test_a_write_node_without_a_key_retries_a_refused_connection(refused_port: int) -> None:
    calls = []

    @nk.node(retry=nk.Retry(attempts=3, jitter=0))
    def charge() -> int:
        calls.append(1)
        return requests.post(f"http://127.0.0.1:{refused_port}/", timeout=1).status_code

    with instant(), pytest.raises(requests.ConnectionError):
        charge()
    assert len(calls) == 3


# ---------------------------------------------------------------------------- sockets, TLS


def test_socket_and_tls_errors() -> None:
    """The OSError family: only network failures are transient; files are not."""
    cases: list[tuple[BaseException, str]] = [
        (ConnectionRefusedError(111, "Connection refused"), "safe"),
        (socket.gaierror(-2, "Name or service not known"), "safe"),
        (OSError(101, "Network is unreachable"), "safe"),
        (ConnectionResetError(104, "Connection reset by peer"), "ambiguous"),
        (BrokenPipeError(32, "Broken pipe"), "ambiguous"),
        (ConnectionAbortedError(), "ambiguous"),
        (TimeoutError("timed out"), "ambiguous"),
        (asyncio.IncompleteReadError(b"", 10), "ambiguous"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "ambiguous"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "permanent"),
        (FileNotFoundError(2, "No such file"), "permanent"),
        (PermissionError(13, "Permission denied"), "permanent"),
        (http.client.CannotSendRequest(), "permanent"),
        (http.client.IncompleteRead(b"", 10), "ambiguous"),
    ]
    assert [(type(exc).__name__, nk.classify(exc)) for exc, _ in cases] == [
        (type(exc).__name__, kind) for exc, kind in cases
    ]


def test_wrapped_error_shapes() -> None:
    """Wrappers take the kind of what they wrap: urllib's URLError, urllib3's MaxRetryError and
    ProtocolError (built as the libraries build them)."""
    u3 = urllib3.exceptions
    cases: list[tuple[BaseException, str]] = [
        (urllib.error.URLError(TimeoutError("timed out")), "safe"),  # connect or send
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), "safe"),
        (urllib.error.URLError(ConnectionResetError(104, "reset")), "ambiguous"),
        (urllib.error.URLError("unknown url type: 'htp'"), "permanent"),
        (urllib.error.URLError(ssl.SSLCertVerificationError(1, "verify failed")), "permanent"),
        (u3.MaxRetryError(None, "/", u3.ReadTimeoutError(None, "/", "read")), "ambiguous"),  # type: ignore[arg-type]
        (u3.MaxRetryError(None, "/", u3.ResponseError("too many 503s")), "ambiguous"),  # type: ignore[arg-type]
        (u3.MaxRetryError(None, "/", None), "ambiguous"),  # type: ignore[arg-type]
        (u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "x")), "ambiguous"),
        (requests.ConnectionError(u3.ProtocolError("Connection aborted.", OSError())), "ambiguous"),
    ]
    assert [nk.classify(exc) for exc, _ in cases] == [kind for _, kind in cases]


def test_psycopg_operational_error_shapes() -> None:
    """Without an SQLSTATE, psycopg's message says whether a connect failed or a statement was
    cut: these are libpq's own words."""
    import psycopg

    cases = {
        'connection failed: connection to server at "db", port 5432 failed: timeout expired': (
            "safe"
        ),
        'connection failed: could not translate host name "db" to address': "safe",
        "connection failed: FATAL:  the database system is starting up": "safe",
        "connection failed: FATAL:  sorry, too many clients already": "safe",
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: server '
        "closed the connection unexpectedly": "safe",
        'connection to server at "db" (10.1.1.1), port 5432 failed: Connection reset by peer': (
            "safe"
        ),
        'connection failed: FATAL:  password authentication failed for user "app"': "permanent",
        "connection failed: FATAL:  no pg_hba.conf entry for host": "permanent",
        "consuming input failed: server closed the connection unexpectedly": "ambiguous",
        "sending query failed: SSL SYSCALL error: EOF detected": "ambiguous",
        "the connection is closed": "permanent",
    }
    assert {m: nk.classify(psycopg.OperationalError(m)) for m in cases} == cases


def test_a_real_connection_reset_is_ambiguous() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=2)
    conn, _ = server.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.sendall(b"POST / HTTP/1.1\r\n\r\n")
    conn.close()  # linger 0: an RST
    exc = raised(lambda: client.recv(10) or client.sendall(b"x" * 10) or client.recv(10))
    client.close()
    server.close()
    assert isinstance(exc, ConnectionResetError)
    assert nk.classify(exc) == "ambiguous"


# ---------------------------------------------------------------------------- databases


def test_sqlite_locked_is_safe_and_other_errors_permanent(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, timeout=0)
    other = sqlite3.connect(path, timeout=0)
    try:
        holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        holder.commit()
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO t VALUES (1)")
        locked = raised(lambda: other.execute("INSERT INTO t VALUES (2)"))
        holder.commit()
        duplicate = raised(lambda: other.execute("INSERT INTO t VALUES (1)"))
        missing = raised(lambda: other.execute("SELECT * FROM nowhere"))
    finally:
        holder.close()
        other.close()
    assert isinstance(locked, sqlite3.OperationalError)
    assert "locked" in str(locked)
    assert nk.classify(locked) == "safe"
    assert nk.classify(duplicate) == "permanent"
    assert nk.classify(missing) == "permanent"


@pytest.fixture
def pg_table(postgres_url: str) -> Iterator[str]:
    import psycopg

    table = f"nk_classify_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    try:
        yield table
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.services
def test_psycopg_serialization_failure_and_deadlock_are_safe(
    postgres_url: str, pg_table: str
) -> None:
    """The database rolled the transaction back: running it again is safe."""
    import psycopg

    with psycopg.connect(postgres_url) as a, psycopg.connect(postgres_url) as b:
        for conn in (a, b):
            conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            conn.execute(f"SELECT v FROM {pg_table} WHERE id = 1").fetchall()
        a.execute(f"UPDATE {pg_table} SET v = v + 1 WHERE id = 1")
        a.commit()
        serialization = raised(lambda: b.execute(f"UPDATE {pg_table} SET v = v + 1 WHERE id = 1"))
        b.rollback()

        a.execute(f"UPDATE {pg_table} SET v = 1 WHERE id = 1")
        b.execute(f"UPDATE {pg_table} SET v = 1 WHERE id = 2")
        errors: list[BaseException] = []

        def cross() -> None:
            try:
                b.execute(f"UPDATE {pg_table} SET v = 2 WHERE id = 1")
            except psycopg.Error as exc:
                errors.append(exc)

        thread = threading.Thread(target=cross)
        thread.start()
        time.sleep(0.1)  # let b wait on a's lock before a waits on b's
        try:
            a.execute(f"UPDATE {pg_table} SET v = 2 WHERE id = 2")
        except psycopg.Error as exc:
            errors.append(exc)
        thread.join()
        a.rollback()
        b.rollback()
    assert serialization.sqlstate == "40001"  # type: ignore[attr-defined]
    assert nk.classify(serialization) == "safe"
    assert [exc.sqlstate for exc in errors] == ["40P01"]  # type: ignore[attr-defined]
    assert nk.classify(errors[0]) == "safe"


@pytest.mark.services
def test_psycopg_connection_errors(postgres_url: str, pg_table: str, refused_port: int) -> None:
    """Refused at connect: safe; a backend killed mid-statement: ambiguous; a constraint, a
    syntax error, an unknown database: permanent."""
    import psycopg

    refused = raised(lambda: psycopg.connect(f"postgresql://postgres@127.0.0.1:{refused_port}/x"))
    no_database = raised(lambda: psycopg.connect(postgres_url.rsplit("/", 1)[0] + "/nk_no_such_db"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        duplicate = raised(lambda: conn.execute(f"INSERT INTO {pg_table} VALUES (1, 0)"))
        syntax = raised(lambda: conn.execute("SELEC 1"))
        conn.execute("SET statement_timeout = '50ms'")
        statement_timeout = raised(lambda: conn.execute("SELECT pg_sleep(2)"))
    victim = psycopg.connect(postgres_url, autocommit=True)
    pid = victim.info.backend_pid

    def terminate() -> None:
        time.sleep(0.2)
        with psycopg.connect(postgres_url, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))

    thread = threading.Thread(target=terminate)
    thread.start()
    terminated = raised(lambda: victim.execute("SELECT pg_sleep(5)"))
    thread.join()
    victim.close()
    assert nk.classify(refused) == "safe"
    assert nk.classify(no_database) == "permanent"
    assert nk.classify(duplicate) == "permanent"
    assert nk.classify(syntax) == "permanent"
    assert nk.classify(statement_timeout) == "safe"
    assert nk.classify(terminated) == "ambiguous"


@pytest.mark.services
async def test_asyncpg_errors(postgres_url: str, pg_table: str, refused_port: int) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    a = await asyncpg.connect(postgres_url)
    b = await asyncpg.connect(postgres_url)
    try:
        ta, tb = a.transaction(isolation="serializable"), b.transaction(isolation="serializable")
        await ta.start()
        await tb.start()
        for conn in (a, b):
            await conn.fetch(f"SELECT v FROM {pg_table} WHERE id = 1")
        await a.execute(f"UPDATE {pg_table} SET v = v + 1 WHERE id = 1")
        await ta.commit()
        serialization = await araised(
            lambda: b.execute(f"UPDATE {pg_table} SET v = v + 1 WHERE id = 1")
        )
        await tb.rollback()
        duplicate = await araised(lambda: a.execute(f"INSERT INTO {pg_table} VALUES (1, 0)"))
        pid = b.get_server_pid()

        async def terminate() -> None:
            await asyncio.sleep(0.2)
            await a.execute("SELECT pg_terminate_backend($1)", pid)

        killer = asyncio.create_task(terminate())
        terminated = await araised(lambda: b.execute("SELECT pg_sleep(5)"))
        await killer
    finally:
        await a.close()
        b.terminate()
    refused = await araised(
        lambda: asyncpg.connect(f"postgresql://postgres@127.0.0.1:{refused_port}/x")
    )
    assert isinstance(serialization, asyncpg.SerializationError)
    assert nk.classify(serialization) == "safe"
    assert nk.classify(duplicate) == "permanent"
    assert nk.classify(terminated) == "ambiguous"
    assert nk.classify(refused) == "safe"


def test_sqlalchemy_is_classified_by_the_driver_error_it_wraps(tmp_path: Path) -> None:
    sa = pytest.importorskip("sqlalchemy")
    path = tmp_path / "db.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    holder = sqlite3.connect(path, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        locked = raised(lambda: _sa_execute(engine, sa.text("INSERT INTO t VALUES (2)")))
    finally:
        holder.rollback()
        holder.close()
    duplicate = raised(lambda: _sa_execute(engine, sa.text("INSERT INTO t VALUES (1)")))
    engine.dispose()
    assert isinstance(locked, sa.exc.OperationalError)
    assert isinstance(locked.orig, sqlite3.OperationalError)
    assert nk.classify(locked) == "safe"
    assert isinstance(duplicate, sa.exc.IntegrityError)
    assert nk.classify(duplicate) == "permanent"


def _sa_execute(engine: Any, statement: Any) -> None:
    with engine.begin() as conn:
        conn.execute(statement)


@pytest.mark.services
def test_sqlalchemy_wrapping_a_psycopg_serialization_failure_is_safe(
    postgres_url: str, pg_table: str
) -> None:
    sa = pytest.importorskip("sqlalchemy")
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url, isolation_level="SERIALIZABLE")
    select = sa.text(f"SELECT v FROM {pg_table} WHERE id = 1")
    update = sa.text(f"UPDATE {pg_table} SET v = v + 1 WHERE id = 1")
    try:
        with engine.connect() as a, engine.connect() as b:
            a.execute(select)
            b.execute(select)
            a.execute(update)
            a.commit()
            exc = raised(lambda: b.execute(update))
            b.rollback()
    finally:
        engine.dispose()
    assert isinstance(exc, sa.exc.OperationalError)
    assert nk.classify(exc) == "safe"


def _fake(module: str, name: str, base: type[BaseException] = Exception) -> type[BaseException]:
    """An exception class named and placed as a library places its own."""
    return type(name, (base,), {"__module__": module})


def test_sqlalchemy_shapes_without_sqlalchemy() -> None:
    """Built as SQLAlchemy builds them (``.orig``, ``.connection_invalidated``): matched by
    name, so the rules hold whether or not SQLAlchemy is installed."""
    dbapi_error = _fake("sqlalchemy.exc", "DBAPIError")
    operational = type("OperationalError", (dbapi_error,), {"__module__": "sqlalchemy.exc"})
    pool_timeout = _fake("sqlalchemy.exc", "TimeoutError")

    def wrapped(orig: BaseException | None, invalidated: bool = False) -> BaseException:
        exc = operational("(driver) ...")
        exc.orig = orig  # type: ignore[attr-defined]
        exc.connection_invalidated = invalidated  # type: ignore[attr-defined]
        return exc

    serialization = _fake("psycopg.errors", "SerializationFailure")("could not serialize")
    serialization.sqlstate = "40001"  # type: ignore[attr-defined]
    adapted = _fake("sqlalchemy.dialects.postgresql.asyncpg", "Error")("adapted")
    adapted.__cause__ = _fake("asyncpg.exceptions", "ConnectionDoesNotExistError")("closed")
    adapted.__cause__.sqlstate = "08003"  # type: ignore[attr-defined]
    assert nk.classify(wrapped(serialization)) == "safe"
    assert nk.classify(wrapped(adapted)) == "ambiguous"
    assert nk.classify(wrapped(ValueError("x"), invalidated=True)) == "ambiguous"
    assert nk.classify(wrapped(ValueError("x"))) == "permanent"
    assert nk.classify(pool_timeout("QueuePool limit reached")) == "safe"


def test_asyncpg_shapes_without_asyncpg() -> None:
    """asyncpg errors carry a class-level ``sqlstate``; the client-side closed connection is
    08003 (ambiguous), a closed-connection InterfaceError is permanent."""
    cases = {
        "SerializationError": ("40001", "safe"),
        "DeadlockDetectedError": ("40P01", "safe"),
        "ConnectionDoesNotExistError": ("08003", "ambiguous"),
        "UniqueViolationError": ("23505", "permanent"),
        "TooManyConnectionsError": ("53300", "safe"),
        "CannotConnectNowError": ("57P03", "safe"),
    }
    for name, (sqlstate, kind) in cases.items():
        cls = type(name, (Exception,), {"__module__": "asyncpg.exceptions", "sqlstate": sqlstate})
        assert nk.classify(cls("x")) == kind, name
    interface = _fake("asyncpg.exceptions._base", "InterfaceError")("connection is closed")
    assert nk.classify(interface) == "permanent"


def test_redis_refused_is_safe_and_a_read_timeout_ambiguous(
    refused_port: int, silent_port: int
) -> None:
    import redis

    refused = raised(lambda: redis.Redis(port=refused_port, socket_timeout=1).ping())
    hung = raised(lambda: redis.Redis(port=silent_port, socket_timeout=0.2).set("k", "v"))
    assert isinstance(refused, redis.ConnectionError)
    assert isinstance(hung, redis.TimeoutError)
    assert nk.classify(refused) == "safe"
    assert nk.classify(hung) == "ambiguous"


def test_redis_error_shapes() -> None:
    import redis

    cases: list[tuple[BaseException, str]] = [
        (redis.TimeoutError("Timeout connecting to server"), "safe"),
        (redis.ConnectionError("Connection closed by server."), "ambiguous"),
        (redis.AuthenticationError("invalid password"), "permanent"),
        (redis.exceptions.MaxConnectionsError("Too many connections"), "safe"),
        (redis.exceptions.BusyLoadingError("loading"), "safe"),
        (redis.exceptions.ReadOnlyError("READONLY replica"), "safe"),
        (redis.ResponseError("WRONGTYPE"), "permanent"),
    ]
    assert [nk.classify(exc) for exc, _ in cases] == [kind for _, kind in cases]


@pytest.mark.services
def test_a_real_redis_command_error_is_permanent(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        exc = raised(lambda: client.execute_command("NODEKIT-NO-SUCH-COMMAND"))
    finally:
        client.close()
    assert isinstance(exc, redis.ResponseError)
    assert nk.classify(exc) == "permanent"


# ---------------------------------------------------------------------------- register_classifier


class PaymentsDeclined(Exception):
    pass


class PaymentsBusy(Exception):
    pass


def test_a_registered_classifier_is_asked_first_and_can_be_removed() -> None:
    def payments(exc: BaseException) -> str | None:
        if isinstance(exc, PaymentsBusy):
            return "safe"
        if isinstance(exc, TimeoutError):
            return "permanent"  # overrides nodekit's rule
        return None

    assert nk.classify(PaymentsBusy()) == "permanent"
    remove = nk.register_classifier(payments)
    try:
        assert nk.classify(PaymentsBusy()) == "safe"
        assert nk.classify(TimeoutError()) == "permanent"
        assert nk.classify(ConnectionRefusedError()) == "safe"  # None: nodekit's rules
    finally:
        remove()
    assert nk.classify(PaymentsBusy()) == "permanent"
    assert nk.classify(TimeoutError()) == "ambiguous"


def test_the_newest_classifier_wins_and_reset_removes_them_all() -> None:
    nk.register_classifier(lambda exc: "ambiguous")
    nk.register_classifier(lambda exc: "safe")
    try:
        assert nk.classify(PaymentsDeclined()) == "safe"
    finally:
        RUNTIME.reset()
    assert RUNTIME.classifiers == ()
    assert nk.classify(PaymentsDeclined()) == "permanent"


def test_a_registered_classifier_sees_errors_inside_wrappers() -> None:
    """SQLAlchemy's wrapper is decided by its ``.orig``, and the user's rules apply there."""
    operational = _fake("sqlalchemy.exc", "DBAPIError")("(payments) busy")
    operational.orig = PaymentsBusy()  # type: ignore[attr-defined]
    remove = nk.register_classifier(lambda exc: "safe" if isinstance(exc, PaymentsBusy) else None)
    try:
        assert nk.classify(operational) == "safe"
    finally:
        remove()


def test_a_broken_classifier_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken(exc: BaseException) -> Any:
        raise AttributeError("no .status on this one")

    def confused(exc: BaseException) -> Any:
        return "transient"

    caplog.set_level(logging.WARNING, logger="nodekit")
    remove_broken = nk.register_classifier(broken)
    remove_confused = nk.register_classifier(confused)
    try:
        assert nk.classify(ConnectionRefusedError("secret-in-message")) == "safe"
    finally:
        remove_broken()
        remove_confused()
    messages = [record.getMessage() for record in caplog.records if record.name == "nodekit"]
    assert any("broken" in m and "AttributeError" in m for m in messages)
    assert any("confused" in m and "'transient'" in m for m in messages)
    assert not any("secret-in-message" in m for m in messages)


def test_a_write_node_retries_the_users_own_safe_error() -> None:
    calls = []

    @nk.node(retry=nk.Retry(attempts=3, jitter=0))
    def pay() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise PaymentsBusy("try again")
        return "paid"

    remove = nk.register_classifier(lambda exc: "safe" if isinstance(exc, PaymentsBusy) else None)
    try:
        with instant():
            assert pay() == "paid"
    finally:
        remove()
    assert len(calls) == 3


def test_register_classifier_refuses_a_non_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        nk.register_classifier("safe")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- no imports


def test_classifying_imports_none_of_the_libraries() -> None:
    """nodekit recognises the libraries' errors by name: it never imports one itself."""
    code = (
        "import sys, nodekit as nk\n"
        "for exc in (ConnectionRefusedError(), TimeoutError(), ValueError(), OSError(2, 'x')):\n"
        "    nk.classify(exc)\n"
        "libs = ('requests', 'urllib3', 'aiohttp', 'httpx', 'psycopg', 'asyncpg', 'redis',\n"
        "        'sqlalchemy', 'sqlite3')\n"
        "print(sorted(name for name in libs if name in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
