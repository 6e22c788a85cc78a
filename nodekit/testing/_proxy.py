"""`FaultProxy`: a TCP proxy on 127.0.0.1 that partitions, cuts and refuses on command.

Put it between a client and a real server (Redis, PostgreSQL, any TCP service) to test what
the client does when the network misbehaves. It knows nothing of the protocol: it forwards
bytes, and a fault decides, chunk by chunk (one ``recv()``, up to 64 KiB), whether a chunk
goes through. Bytes a fault discards are lost, as on a real network: the client's protocol
state is then broken, and it must reconnect — which is the behaviour under test.

Faults are proxy-wide (every connection, open or new) and end on their own after `seconds`
(measured with the monotonic clock when the next chunk arrives: no timer threads), or at
`heal()`. One thread accepts, and each connection has one thread per direction; `close()`
ends every connection and joins every thread.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Literal, Self, TypeAlias

__all__ = ["FaultProxy", "ProxyFault", "ProxyStats"]

ProxyFault: TypeAlias = Literal["drop", "drop_replies", "cut"]
PROXY_FAULTS: tuple[ProxyFault, ...] = ("drop", "drop_replies", "cut")
Seconds: TypeAlias = float | timedelta

_CHUNK = 65536


def _seconds(value: Seconds | None, option: str) -> float:
    """A duration in seconds (`None`: forever, as ``inf``); a negative one is a `ValueError`."""
    if value is None:
        return math.inf
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds >= 0.0:
        raise ValueError(f"FaultProxy: {option} must be >= 0 seconds, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of a `FaultProxy`'s counters since it was created (bytes are payload bytes).

    `bytes_up` / `bytes_down` were forwarded client->server / server->client;
    `dropped_up` / `dropped_down` were read and discarded by a fault. `refused` connections
    were closed at accept, `cut` ones closed by `FaultProxy.cut()`, `upstream_errors` could
    not reach the upstream server.
    """

    accepted: int = 0
    active: int = 0
    refused: int = 0
    cut: int = 0
    upstream_errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_up: int = 0
    dropped_down: int = 0

    @property
    def bytes_dropped(self) -> int:
        """Every byte a fault discarded, both ways."""
        return self.dropped_up + self.dropped_down


@dataclass(slots=True)
class _Trigger:
    """A fault armed by `FaultProxy.on_next`, fired by the next client chunk holding `pattern`."""

    pattern: bytes
    fault: ProxyFault
    seconds: float
    count: int | None


@dataclass(slots=True)
class _Counters:
    accepted: int = 0
    refused: int = 0
    cut: int = 0
    upstream_errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_up: int = 0
    dropped_down: int = 0


@dataclass(eq=False, slots=True)
class _Link:
    """One proxied connection: the client's socket, the upstream one, and their two pumps."""

    client: socket.socket
    server: socket.socket | None = None
    ended: bool = False
    muted: bool = False  # the replies to the client's last chunk are discarded
    tail: bytes = b""  # the end of the last client chunk, to find patterns split over reads
    thread: threading.Thread | None = None  # client->server; it also joins the other pump
    lock: threading.Lock = field(default_factory=threading.Lock)

    def end(self, *, reset: bool) -> bool:
        """Shut both sockets down, which wakes both pumps; `reset` makes it an RST, not a FIN.

        Returns whether this call ended the link (false if it had ended already).
        """
        with self.lock:
            if self.ended:
                return False
            self.ended = True
            sockets = [s for s in (self.client, self.server) if s is not None]
        for sock in sockets:
            with contextlib.suppress(OSError):
                if reset:  # linger 0: the close that follows sends an RST and no FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                sock.shutdown(socket.SHUT_RDWR)
        return True


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``host:port``, with faults turned on by the test.

    ``with FaultProxy("127.0.0.1", 6379) as proxy:`` starts it on an ephemeral port (or
    `listen_port`); point the client at `proxy.address` (or ``proxy.url("redis://{address}/0")``).
    The faults — `drop`, `drop_replies`, `cut`, `refuse`, and `on_next` to fire one exactly
    when a given command goes by — apply to every connection. `connect_timeout` (seconds)
    bounds each connection's attempt to reach the upstream server; a connection that cannot
    is closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        listen_port: int = 0,
        connect_timeout: Seconds = 5.0,
    ) -> None:
        self.upstream = (host, port)
        self.host = "127.0.0.1"
        self._listen_port = listen_port
        self._connect_timeout = _seconds(connect_timeout, "connect_timeout")
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._counters = _Counters()
        self._triggers: list[_Trigger] = []
        self._drop_until = 0.0  # monotonic deadlines; 0: not in force, inf: until heal()
        self._replies_until = 0.0
        self._refuse_until = 0.0
        self._reply_budget = 0  # drop_replies(count=N): client chunks whose replies go
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------------ lifetime

    def start(self) -> Self:
        """Bind and accept in a background thread; returns self (a no-op when running)."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._listen_port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._wake = socket.socketpair()
        self._closing = False
        self._acceptor = threading.Thread(
            target=self._accept_loop,
            args=(listener, self._wake[0]),
            name=f"FaultProxy:{self.port}:accept",
            daemon=True,
        )
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, end every connection (RST) and join every thread it started.

        A connection still connecting upstream is waited for, up to `connect_timeout`.
        """
        listener, wake, acceptor = self._listener, self._wake, self._acceptor
        if listener is None or wake is None or acceptor is None:
            return
        with self._lock:
            self._closing = True
        wake[1].send(b"x")
        acceptor.join()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.end(reset=True)
        for link in links:
            if link.thread is not None:
                link.thread.join()
        listener.close()
        for sock in wake:
            sock.close()
        self._listener = self._wake = self._acceptor = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port the proxy listens on (on 127.0.0.1)."""
        if self._listener is None:
            raise RuntimeError("FaultProxy is not running: use `with FaultProxy(...) as proxy:`")
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``: where clients connect instead of the upstream server."""
        return f"{self.host}:{self.port}"

    def url(self, template: str) -> str:
        """`template` with ``{address}``, ``{host}`` and ``{port}`` filled in with the proxy's.

        ``proxy.url("postgresql://postgres@{address}/test")``.
        """
        return template.format(address=self.address, host=self.host, port=self.port)

    @property
    def stats(self) -> ProxyStats:
        """The counters so far (a snapshot)."""
        with self._lock:
            c = self._counters
            return ProxyStats(
                accepted=c.accepted,
                active=len(self._links),
                refused=c.refused,
                cut=c.cut,
                upstream_errors=c.upstream_errors,
                bytes_up=c.bytes_up,
                bytes_down=c.bytes_down,
                dropped_up=c.dropped_up,
                dropped_down=c.dropped_down,
            )

    def __repr__(self) -> str:
        where = self.address if self._listener is not None else "stopped"
        host, port = self.upstream
        return f"FaultProxy({where} -> {host}:{port})"

    # ------------------------------------------------------------------------ faults

    def drop(self, seconds: Seconds | None = None) -> None:
        """From now on, read and discard every byte, both ways: a network partition.

        Connections stay open and new ones are accepted, but nothing reaches the other side,
        so clients wait until their own timeouts. Ends after `seconds`, or at `heal()` when
        `seconds` is None.
        """
        until = time.monotonic() + _seconds(seconds, "drop(seconds)")
        with self._lock:
            self._drop_until = until

    def drop_replies(self, seconds: Seconds | None = None, *, count: int | None = None) -> None:
        """Forward client->server bytes but discard server->client ones: the reply is lost.

        The server does the work and the client never hears of it — the ambiguous outcome
        idempotency exists for. With `count`, the replies to the next `count` client chunks
        (each usually one command) are discarded, each until its connection sends again;
        otherwise every reply for `seconds`, or until `heal()` when `seconds` is None.
        """
        with self._lock:
            self._drop_replies(seconds, count)

    def cut(self) -> None:
        """Close every open connection now, with an RST; new connections are still accepted."""
        with self._lock:
            links = list(self._links)
        ended = sum(link.end(reset=True) for link in links)
        with self._lock:
            self._counters.cut += ended

    def refuse(self, seconds: Seconds | None = None) -> None:
        """Close new connections as soon as they are accepted (RST), for `seconds` or until
        `heal()`. Open connections are left alone."""
        until = time.monotonic() + _seconds(seconds, "refuse(seconds)")
        with self._lock:
            self._refuse_until = until

    def heal(self) -> None:
        """Back to a healthy network: end `drop`, `drop_replies` and `refuse`, disarm
        `on_next`. Bytes discarded meanwhile stay lost."""
        with self._lock:
            self._drop_until = self._replies_until = self._refuse_until = 0.0
            self._reply_budget = 0
            self._triggers.clear()
            for link in self._links:
                link.muted = False

    def on_next(
        self,
        pattern: bytes,
        fault: ProxyFault,
        seconds: Seconds | None = None,
        *,
        count: int | None = None,
    ) -> None:
        """Apply `fault` when the next client->server chunk containing `pattern` goes by.

        Fires once, on any connection: ``"drop"`` starts `drop(seconds)` and discards that
        chunk too (the server never sees the command); ``"drop_replies"`` forwards the chunk
        and starts `drop_replies(seconds, count=count)` — ``count=1`` loses exactly that
        command's reply; ``"cut"`` discards the chunk and cuts every connection. A pattern
        split across two reads is still found.
        """
        if fault not in PROXY_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; faults are {PROXY_FAULTS}")
        if not pattern:
            raise ValueError("FaultProxy.on_next needs a non-empty pattern")
        if count is not None and fault != "drop_replies":
            raise ValueError("FaultProxy.on_next: count is for 'drop_replies' only")
        if count is not None and count < 1:
            raise ValueError(f"FaultProxy.on_next: count must be >= 1, got {count!r}")
        trigger = _Trigger(bytes(pattern), fault, _seconds(seconds, "on_next(seconds)"), count)
        with self._lock:
            self._triggers.append(trigger)

    def _drop_replies(self, seconds: Seconds | None, count: int | None) -> None:
        """`drop_replies`, with the lock held."""
        if count is not None:
            if count < 1:
                raise ValueError(f"FaultProxy.drop_replies: count must be >= 1, got {count!r}")
            self._reply_budget += count
        else:
            until = time.monotonic() + _seconds(seconds, "drop_replies(seconds)")
            self._replies_until = until

    # ------------------------------------------------------------------------ serving

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue  # the client gave up before we accepted it
                self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        link = _Link(client)
        with self._lock:
            refused = self._closing or time.monotonic() < self._refuse_until
            if refused:
                self._counters.refused += 1
            else:
                self._counters.accepted += 1
                self._links.add(link)
        if refused:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()
            return
        link.thread = threading.Thread(
            target=self._run, args=(link,), name=f"FaultProxy:{self.port}:up", daemon=True
        )
        link.thread.start()

    def _run(self, link: _Link) -> None:
        """The client->server pump, after connecting upstream; it owns the link's sockets."""
        down: threading.Thread | None = None
        try:
            try:
                server = socket.create_connection(self.upstream, timeout=self._connect_timeout)
            except OSError:
                with self._lock:
                    self._counters.upstream_errors += 1
                link.end(reset=True)
                return
            server.settimeout(None)
            for sock in (server, link.client):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with link.lock:
                link.server = server
                if link.ended:  # cut or closed while connecting
                    return
                down = threading.Thread(
                    target=self._pump_down,
                    args=(link, server),
                    name=f"FaultProxy:{self.port}:down",
                    daemon=True,
                )
                down.start()
            self._pump_up(link, server)
        finally:
            if down is not None:
                down.join()
            for end in (link.client, link.server):
                if end is not None:
                    end.close()
            with self._lock:
                self._links.discard(link)

    def _pump_up(self, link: _Link, server: socket.socket) -> None:
        while data := _recv(link.client):
            forward, cut = self._upstream(link, data)
            if cut:
                self.cut()
                break
            if forward and not _send(server, data):
                break
        link.end(reset=False)

    def _pump_down(self, link: _Link, server: socket.socket) -> None:
        while data := _recv(server):
            with self._lock:
                discard = link.muted or time.monotonic() < self._replies_until
                discard = discard or time.monotonic() < self._drop_until
                if discard:
                    self._counters.dropped_down += len(data)
                else:
                    self._counters.bytes_down += len(data)
            if not discard and not _send(link.client, data):
                break
        link.end(reset=False)

    def _upstream(self, link: _Link, data: bytes) -> tuple[bool, bool]:
        """Decide one client chunk's fate: (forward it, cut every connection)."""
        with self._lock:
            window = link.tail + data
            start = len(link.tail)  # only matches that end in `data` count: no double fire
            fired = next(
                (
                    t
                    for t in self._triggers
                    if window.find(t.pattern, max(0, start - len(t.pattern) + 1)) >= 0
                ),
                None,
            )
            longest = max((len(t.pattern) for t in self._triggers), default=1)
            link.tail = window[-(longest - 1) :] if longest > 1 else b""
            if fired is not None:
                self._triggers.remove(fired)
                if fired.fault == "cut":
                    self._counters.dropped_up += len(data)
                    return False, True
                if fired.fault == "drop":
                    self._drop_until = time.monotonic() + fired.seconds
                else:
                    self._drop_replies(fired.seconds, fired.count)
            if time.monotonic() < self._drop_until:
                self._counters.dropped_up += len(data)
                return False, False
            link.muted = self._reply_budget > 0
            if link.muted:
                self._reply_budget -= 1
            self._counters.bytes_up += len(data)
            return True, False


def _recv(sock: socket.socket) -> bytes:
    """The next chunk, or ``b""`` at the end of the stream or on any socket error."""
    try:
        return sock.recv(_CHUNK)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True
