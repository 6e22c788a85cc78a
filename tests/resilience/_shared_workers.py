"""A local HTTP service that logs every request, and the worker processes that call it.

The service runs in the test process and is the only witness: it records each request's
arrival time (monotonic), path, status and how many requests were in flight, so effects are
counted outside the worker processes. Workers run in a forkserver and take plain data only:
a store spec (`make_store`), the service's URL, a barrier.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

import nodekit as nk

StoreSpec = tuple[str, ...]


def make_store(spec: StoreSpec) -> Any:
    """Open the store a spec names: ("sqlite", path), ("redis", url, prefix), ("postgres",
    dsn, schema)."""
    kind = spec[0]
    if kind == "sqlite":
        return nk.SQLiteStore(spec[1])
    if kind == "redis":
        from nodekit.idempotency.redis import RedisStore

        return RedisStore(spec[1], prefix=spec[2], pool_timeout=2.0)
    from nodekit.idempotency.postgres import PostgresStore

    return PostgresStore(spec[1], schema=spec[2], pool_timeout=2.0)


# ---------------------------------------------------------------------------- the service


class _Server(ThreadingHTTPServer):
    # the default backlog (5) drops the SYNs of a burst of new connections, which the
    # clients send again a second later: a call admitted at once would arrive 1 s late
    request_queue_size = 128


@dataclass
class Hit:
    at: float  # time.monotonic() on arrival
    path: str
    status: int
    in_flight: int  # requests in flight, this one included, on arrival


@dataclass
class Service:
    """Routes: ``/fail`` (503), ``/ok`` (200), ``/slow/<ms>`` (200 after ms), ``/hang``
    (200 once `release` is set), ``/limited`` (429 with ``Retry-After: 1`` for the request
    number `limit_at`, 200 otherwise)."""

    hits: list[Hit] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    limit_at: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def paths(self, path: str) -> list[Hit]:
        with self.lock:
            return [hit for hit in self.hits if hit.path == path]

    def start(self) -> Service:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path
                with service.lock:
                    service.in_flight += 1
                    service.most_in_flight = max(service.most_in_flight, service.in_flight)
                    number = sum(1 for hit in service.hits if hit.path == path) + 1
                    status = 503 if path == "/fail" else 200
                    if path == "/limited" and number == service.limit_at:
                        status = 429
                    hit = Hit(time.monotonic(), path, status, service.in_flight)
                    service.hits.append(hit)
                try:
                    if path.startswith("/slow/"):
                        time.sleep(int(path.rsplit("/", 1)[1]) / 1000)
                    elif path == "/hang":
                        service.release.wait(20)
                finally:
                    # done before it answers: a client that has its answer (and gave its slot
                    # to the next caller) is never still counted in flight
                    with service.lock:
                        service.in_flight -= 1
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------- workers


def _get(client: httpx.Client, url: str) -> None:
    client.get(url).raise_for_status()


def breaker_worker(
    spec: StoreSpec, url: str, barrier: Any, seconds: float, options: dict[str, Any]
) -> None:
    """Call ``/fail`` through one shared breaker for `seconds`; refusals wait 5 ms."""
    store = make_store(spec)
    breaker = nk.CircuitBreaker("service", store=store, **options)
    with httpx.Client() as client:

        @nk.node(circuit=breaker, effect=nk.Effect.READ)
        def call() -> None:
            _get(client, url + "/fail")

        barrier.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                call()
            except nk.CircuitOpen:
                time.sleep(0.005)
            except httpx.HTTPStatusError:
                pass
    store.close()


def joiner(spec: StoreSpec, url: str, options: dict[str, Any], out: Any) -> None:
    """Create the shared breaker anew, report its state, and try one call."""
    store = make_store(spec)
    breaker = nk.CircuitBreaker("service", store=store, **options)
    state = breaker.state
    with httpx.Client() as client:

        @nk.node(circuit=breaker, effect=nk.Effect.READ)
        def call() -> None:
            _get(client, url + "/ok")

        try:
            call()
            outcome = "ran"
        except nk.CircuitOpen:
            outcome = "CircuitOpen"
    out.put((state, outcome))
    store.close()


def limit_worker(spec: StoreSpec, url: str, barrier: Any, seconds: float) -> None:
    """Call ``/limited`` through one shared ``RateLimit(rate=50)`` for `seconds`."""
    store = make_store(spec)
    limit = nk.RateLimit("service", 50, store=store)
    with httpx.Client() as client:

        @nk.node(rate_limit=limit, effect=nk.Effect.READ)
        def call() -> None:
            _get(client, url + "/limited")

        barrier.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(httpx.HTTPStatusError):  # the 429: it paused the limit
                call()
    store.close()


def bulkhead_worker(spec: StoreSpec, url: str, barrier: Any, calls: int) -> None:
    """Make `calls` 40 ms calls through one shared ``Bulkhead(limit=3, queue=8)``."""
    store = make_store(spec)
    bulkhead = nk.Bulkhead("service", 3, queue=8, store=store)
    with httpx.Client() as client:

        @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ)
        def call() -> None:
            _get(client, url + "/slow/40")

        barrier.wait()
        for _ in range(calls):
            call()
    store.close()


def holder(spec: StoreSpec, url: str, lease: float) -> None:
    """Take the one slot of a shared bulkhead and hang in ``/hang`` (until killed)."""
    store = make_store(spec)
    bulkhead = nk.Bulkhead("service", 1, store=store, lease=lease)
    with httpx.Client(timeout=30) as client:

        @nk.node(bulkhead=bulkhead, effect=nk.Effect.READ)
        def call() -> None:
            _get(client, url + "/hang")

        call()
