"""`LocalAPI`: a real HTTP server on 127.0.0.1 that injects faults and keeps a ledger of effects.

It exists so that tests and recipes can prove what happened *on the server*, never from a
counter inside the client process: every request is written to a ledger (in memory, and
appended as JSON lines to ``ledger_path`` so another process can count the effects).

It is generic: the routes are the caller's (`LocalAPI.route`, or ``routes=``), each a plain
function from an `APIRequest` to an `APIResponse` that says whether it made an effect. Around
every route the server adds the same machinery:

It honours ``Idempotency-Key`` as the IETF draft describes: the first request with a key is
processed and its response stored; a repeat with the same key and the same request gets the
stored response with ``Idempotent-Replayed: true``; a duplicate while the first is still in
flight gets 409; the same key with a different request gets 422.

Faults come from a seeded `FaultPlan` (or a script, or `LocalAPI.fail_next`):

- ``"503"`` / ``"429"``: answered at once with ``Retry-After``, nothing processed;
- ``"slow"``: processed and recorded, the answer held back for `FaultPlan.slow` seconds;
- ``"drop_before"``: the connection closed without a response, nothing processed;
- ``"drop_after"``: processed and recorded, then the connection closed without a response
  (the ambiguous case: the client cannot tell it from ``"drop_before"``).

Built-in routes: ``/status/<code>`` (``?retry_after=`` adds the header), ``/delay/<seconds>``,
and ``GET /_ledger`` (the ledger as JSON, never faulted or recorded). Run it alone with
``python -m nodekit.testing._server --port 8000``; `cli` and `serve` build such a command for
a server with routes of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

from ._faults import FAULT_KINDS, Fault, FaultPlan, _Faults
from ._ledger import Ledger, LedgerEntry
from ._routes import APIRequest, APIResponse, Handler, Route
from ._routes import matches as _matches

__all__ = [
    "FAULT_KINDS",
    "FaultPlan",
    "Gate",
    "Ledger",
    "LedgerEntry",
    "LocalAPI",
    "cli",
    "main",
    "plan_from",
    "serve",
]

_MAX_DELAY = 30.0


class Gate:
    """Holds requests to a route inside processing (key reserved, effect not yet made).

    `arrived` is set when a request waits at the gate; `release()` lets it (and later ones)
    through. Used to produce a duplicate while the first request is in flight (409).
    """

    def __init__(self, route: str) -> None:
        self.route = route
        self.arrived = threading.Event()
        self.opened = threading.Event()

    def release(self) -> None:
        self.opened.set()

    def __repr__(self) -> str:
        return f"Gate({self.route!r}, open={self.opened.is_set()})"


@dataclass(slots=True)
class _Stored:
    """The server's idempotency record for one key."""

    fingerprint: str
    done: bool = False
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: nothing outlives close()
    # socketserver's default backlog of 5 drops the SYNs of a burst of new connections, and
    # each dropped SYN costs its client a 1 s retransmit
    request_queue_size = 128
    api: LocalAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or vanish are the point of this server: stay quiet.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10  # idle keep-alive connections end on their own
    disable_nagle_algorithm = True  # headers and body go in separate writes: avoid 40 ms stalls

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.api._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the ledger is the log

    def do_GET(self) -> None:
        self.server.api._serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def read_body(self) -> bytes:
        """The request body; a client that went away before sending all of it is dropped.

        Processing a truncated body would store its 400 under the request's Idempotency-Key,
        and the client's retry would get 422 for good; a real API never sees such a request.
        """
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            self.close_connection = True
            raise ConnectionResetError("the client went away before its body arrived")
        return body

    def answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if body and "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


class LocalAPI:
    """A fault-injecting HTTP API on 127.0.0.1 (ephemeral port), served from a thread.

    ``with LocalAPI(faults=FaultPlan(seed=1), routes={"POST /orders": create}) as api:``
    starts it; `url` is its base URL and `ledger` every request it saw. `ledger_path` also
    appends each entry as a JSON line, for tests that count effects from another process.
    Routes are added with `route` or ``routes=``; a subclass adds its own in ``__init__`` and
    may set `ledger_type` to a `Ledger` subclass with queries in its terms.
    """

    #: The ledger class of `ledger` and `read_ledger`.
    ledger_type: ClassVar[type[Ledger]] = Ledger

    def __init__(
        self,
        *,
        faults: FaultPlan | None = None,
        routes: Mapping[str, Handler] | None = None,
        ledger_path: str | PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.faults = faults
        self.ledger = self.ledger_type()
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None
        self._host, self._port = host, port
        self._faults = _Faults(faults or FaultPlan(rate=0.0))
        self._queued: list[tuple[str | None, Fault | None]] = []
        self._gates: list[Gate] = []
        self._routes: list[Route] = []
        self._keys: dict[str, _Stored] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._file: Any = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.route("/status/{code}", _status)
        self.route("/delay/{seconds}", self._delay)
        for spec, handler in (routes or {}).items():
            self.route(spec, handler)

    # ------------------------------------------------------------------------ lifetime

    def start(self) -> Self:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            return self
        if self.ledger_path is not None:
            self._file = self.ledger_path.open("a", encoding="utf-8")
        server = _Server((self._host, self._port), _Handler)
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving: end held and slow requests, close every connection, join threads."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._stop.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalAPI is not running: use `with LocalAPI() as api:`")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self._host}:{self.port}"

    @property
    def stopping(self) -> threading.Event:
        """Set when the server closes: a handler that waits should wait on it, to end then."""
        return self._stop

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"{type(self).__name__}({where}, faults={self.faults!r})"

    # ------------------------------------------------------------------------ routes

    def route(self, route: str, handler: Handler) -> None:
        """Serve `route` with `handler`, from now on (also while serving).

        `route` is ``"POST /charges"``, ``"GET /items/{id}"`` (``{id}`` matches one path
        segment, passed in `APIRequest.params`) or ``"/ping"`` (any method). Faults, gates,
        ``Idempotency-Key`` handling and the ledger apply to it as to every route. Routes are
        tried in the order they were added; adding the same route again replaces its
        handler. A request no route serves gets 404.
        """
        new = Route.parse(route, handler)
        with self._lock:
            for index, old in enumerate(self._routes):
                if old.spec == new.spec:
                    self._routes[index] = new
                    return
            self._routes.append(new)

    # ------------------------------------------------------------------------ controls

    def fail_next(self, *faults: Fault | None, route: str | None = None) -> None:
        """Queue faults for the next requests (to `route`), before the plan's own."""
        for kind in faults:
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; faults are {FAULT_KINDS}")
        with self._lock:
            self._queued.extend((route, kind) for kind in faults)

    def gate(self, route: str) -> Gate:
        """Hold requests to `route` inside processing until the returned gate is released."""
        gate = Gate(route)
        with self._lock:
            self._gates.append(gate)
        return gate

    @classmethod
    def read_ledger(cls, path: str | PathLike[str]) -> Ledger:
        """The ledger a `LocalAPI` (maybe in another process) appended to `path`."""
        return cls.ledger_type.load(path)

    # ------------------------------------------------------------------------ serving

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _next_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for index, (route, kind) in enumerate(self._queued):
                if route is None or _matches(route, method, path):
                    del self._queued[index]
                    return kind
        return self._faults.next(method, path)

    def _record(
        self,
        request: APIRequest,
        key: str | None,
        status: int | None,
        outcome: str,
        fault: Fault | None,
        answer: APIResponse | None = None,
    ) -> None:
        with self._lock:  # one order for the memory ledger, the file and `seq`
            entry = LedgerEntry(
                seq=next(self._seq),
                method=request.method,
                path=request.path,
                idempotency_key=key,
                status=status,
                outcome=outcome,
                fault=fault,
                effect=answer.effect if answer is not None else False,
                data=dict(answer.data) if answer is not None else {},
                time=time.time(),
            )
            self.ledger.append(entry)
            if self._file is not None:
                self._file.write(json.dumps(asdict(entry)) + "\n")
                self._file.flush()

    def _serve(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        request = APIRequest(
            method=handler.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={name.lower(): value for name, value in handler.headers.items()},
            body=handler.read_body(),
        )
        method, path = request.method, request.path
        if path.startswith("/_"):
            if path == "/_ledger":
                entries = [asdict(entry) for entry in self.ledger]
                handler.answer(200, json.dumps(entries).encode(), {})
            else:
                handler.answer(404, b'{"error": "not found"}', {})
            return
        key = handler.headers.get("Idempotency-Key")
        fault = self._next_fault(method, path)
        plan = self._faults.plan
        if fault in ("503", "429"):
            status = int(fault)
            self._record(request, key, status, "fault", fault)
            payload = json.dumps({"error": "injected fault", "status": status}).encode()
            handler.answer(status, payload, {"Retry-After": _seconds(plan.retry_after)})
            return
        if fault == "drop_before":
            self._record(request, key, None, "dropped", fault)
            handler.close_connection = True
            return
        if key is not None:
            status, headers, payload, outcome, answer = self._keyed(request, key)
        else:
            answer = self._process(request)
            status, headers, payload = answer.status, answer.headers, answer.encode()
            outcome = "processed"
        if fault == "drop_after":
            self._record(request, key, None, outcome, fault, answer)
            handler.close_connection = True
            return
        self._record(request, key, status, outcome, fault, answer)
        if fault == "slow":
            self._stop.wait(plan.slow)
        handler.answer(status, payload, headers)

    def _keyed(
        self, request: APIRequest, key: str
    ) -> tuple[int, Mapping[str, str], bytes, str, APIResponse | None]:
        """Process a request carrying an Idempotency-Key, as the IETF draft describes."""
        fingerprint = hashlib.sha256(
            b"%s %s\n%s" % (request.method.encode(), request.path.encode(), request.body)
        )
        digest = fingerprint.hexdigest()
        with self._lock:
            stored = self._keys.get(key)
            if stored is None:
                self._keys[key] = _Stored(digest)
        if stored is not None:
            if stored.fingerprint != digest:
                error = {"error": "Idempotency-Key reused with a different request"}
                return 422, {}, json.dumps(error).encode(), "mismatch", None
            if not stored.done:
                error = {"error": "a request with this Idempotency-Key is in progress"}
                return 409, {"Retry-After": "1"}, json.dumps(error).encode(), "conflict", None
            headers = {**stored.headers, "Idempotent-Replayed": "true"}
            return stored.status, headers, stored.body, "replayed", None
        try:
            answer = self._process(request)
        except BaseException:
            with self._lock:
                self._keys.pop(key, None)
            raise
        payload = answer.encode()
        with self._lock:
            if answer.status >= 500:
                self._keys.pop(key, None)  # a server error is not an outcome to replay
            else:
                self._keys[key] = _Stored(
                    digest, True, answer.status, dict(answer.headers), payload
                )
        return answer.status, answer.headers, payload, "processed", answer

    def _wait_at_gates(self, method: str, path: str) -> None:
        with self._lock:
            gates = [g for g in self._gates if _matches(g.route, method, path)]
        for gate in gates:
            gate.arrived.set()
            while not gate.opened.wait(0.05):
                if self._stop.is_set():
                    return

    def _process(self, request: APIRequest) -> APIResponse:
        """Wait at the gates, then run the first route that serves the request."""
        self._wait_at_gates(request.method, request.path)
        with self._lock:
            routes = list(self._routes)
        for route in routes:
            params = route.match(request.method, request.path)
            if params is not None:
                return route.handler(
                    APIRequest(
                        request.method,
                        request.path,
                        params,
                        request.query,
                        request.headers,
                        request.body,
                    )
                )
        return APIResponse(404, {"error": f"no endpoint {request.method} {request.path}"})

    def _delay(self, request: APIRequest) -> APIResponse:
        try:
            seconds = min(max(float(request.params["seconds"]), 0.0), _MAX_DELAY)
        except ValueError:
            return APIResponse(400, {"error": "delay takes seconds"})
        self._stop.wait(seconds)
        return APIResponse(200, {"delay": seconds})


def _status(request: APIRequest) -> APIResponse:
    code = request.params["code"]
    if not code.isdigit():
        return APIResponse(404, {"error": f"no endpoint {request.method} {request.path}"})
    status = int(code)
    headers = {}
    if "retry_after" in request.query:
        headers["Retry-After"] = request.query["retry_after"][0]
    return APIResponse(status, {"status": status}, headers)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------- standalone


def cli(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The flags of a standalone server: address, fault plan, ledger file (add your own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="fault probability per request")
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated faults")
    parser.add_argument("--retry-after", type=float, default=0.0)
    parser.add_argument("--slow", type=float, default=2.0)
    parser.add_argument("--ledger", help="append every request to this JSON-lines file")
    return parser


def plan_from(args: argparse.Namespace) -> FaultPlan:
    """The `FaultPlan` the `cli` flags describe."""
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    return FaultPlan(
        seed=args.seed,
        rate=args.rate,
        kinds=kinds,  # checked by FaultPlan
        retry_after=args.retry_after,
        slow=args.slow,
    )


def serve(api: LocalAPI) -> int:
    """Serve `api` until SIGINT or SIGTERM; its URL ends the first line printed. Returns 0."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with api:
        print(f"{type(api).__name__} listening on {api.url}", flush=True)
        while not stop.wait(0.2):
            pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a `LocalAPI` (built-in routes only) until interrupted; prints its URL first."""
    args = cli("python -m nodekit.testing._server", main.__doc__).parse_args(argv)
    api = LocalAPI(faults=plan_from(args), ledger_path=args.ledger, host=args.host, port=args.port)
    return serve(api)


if __name__ == "__main__":
    raise SystemExit(main())
