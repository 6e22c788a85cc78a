"""`LocalAPI`: a real HTTP server on 127.0.0.1 that injects faults and keeps a ledger of effects.

It exists so that tests and recipes can prove what happened *on the server*, never from a
counter inside the client process: every request is written to a ledger (in memory, and
appended as JSON lines to ``ledger_path`` so another process can count the effects).

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

Endpoints: ``POST /charges``, ``POST /webhooks/<name>``, ``GET /items?page=&per_page=``,
``GET /enrich/<id>``, ``/status/<code>``, ``/delay/<seconds>``, and ``GET /_ledger`` (the
ledger as JSON, never faulted or recorded). Run it alone with
``python -m nodekit.testing._server --port 8000``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import itertools
import json
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FAULT_KINDS",
    "FaultPlan",
    "Gate",
    "Ledger",
    "LedgerEntry",
    "LocalAPI",
    "sign",
]

Fault: TypeAlias = Literal["503", "429", "slow", "drop_before", "drop_after"]
FAULT_KINDS: tuple[Fault, ...] = ("503", "429", "slow", "drop_before", "drop_after")
Script: TypeAlias = Sequence[Fault | None] | Mapping[str, Sequence[Fault | None]]

_MAX_DELAY = 30.0


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Signature`` value for a webhook body: ``sha256=<hex HMAC-SHA256>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _matches(route: str, method: str, path: str) -> bool:
    """``"POST /charges"`` or ``"/charges"`` (any method); a route matches its sub-paths too."""
    want_method, _, prefix = route.rpartition(" ")
    if want_method and want_method.upper() != method:
        return False
    prefix = prefix.rstrip("/") or "/"
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which requests fail, and how: a seeded random draw, after an optional script.

    Each request (control paths excepted) first takes the next entry of a matching `script`
    (a list for every request in order, or ``{"POST /charges": [...]}`` per route; ``None``
    means no fault); once the script is used up, it fails with probability `rate`, with a
    kind drawn from `kinds`, restricted to `routes` when given. The same seed and the same
    request order give the same faults. `retry_after` is the ``Retry-After`` (seconds) sent
    with 503 and 429; `slow` how long a slow answer is held back.
    """

    seed: int = 0
    rate: float = 0.2
    kinds: tuple[Fault, ...] = FAULT_KINDS
    script: Script = ()
    routes: tuple[str, ...] | None = None
    retry_after: float = 0.0
    slow: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"FaultPlan.rate must be within [0, 1], got {self.rate!r}")
        scripted = self.script.values() if isinstance(self.script, Mapping) else [self.script]
        for kind in [*self.kinds, *itertools.chain.from_iterable(scripted)]:
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; faults are {FAULT_KINDS}")

    @classmethod
    def scripted(cls, *faults: Fault | None, route: str | None = None, **options: Any) -> FaultPlan:
        """Exactly these faults, in order, and no random ones (``rate=0``)."""
        script: Script = {route: faults} if route is not None else faults
        return cls(rate=0.0, script=script, **options)


class _Faults:
    """A `FaultPlan`'s running state: the random generator and the script cursors."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.random = random.Random(plan.seed)
        self.lock = threading.Lock()
        script = plan.script
        self.queues: dict[str | None, list[Fault | None]] = (
            {route: list(items) for route, items in script.items()}
            if isinstance(script, Mapping)
            else {None: list(script)}
        )

    def next(self, method: str, path: str) -> Fault | None:
        plan = self.plan
        with self.lock:
            for route, queue in self.queues.items():
                if queue and (route is None or _matches(route, method, path)):
                    return queue.pop(0)
            if plan.routes is not None and not any(
                _matches(route, method, path) for route in plan.routes
            ):
                return None
            if plan.rate and plan.kinds and self.random.random() < plan.rate:
                return self.random.choice(plan.kinds)
            return None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One request as the server saw it.

    `outcome`: ``"processed"`` (the endpoint ran), ``"replayed"`` (stored response),
    ``"conflict"`` (409), ``"mismatch"`` (422), ``"fault"`` (503/429 before processing) or
    ``"dropped"`` (closed before processing). `effect` is true when the server's state changed
    (a charge made, a webhook delivered); `data` says what. `status` is None when no response
    was sent.
    """

    seq: int
    method: str
    path: str
    idempotency_key: str | None
    status: int | None
    outcome: str
    fault: str | None = None
    effect: bool = False
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LedgerEntry:
        return cls(**values)


class Ledger:
    """The requests a `LocalAPI` received, in order, with queries for the tests."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries = list(entries)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Ledger:
        """Read a ledger file written by a `LocalAPI` (possibly in another process)."""
        text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
        return cls(
            LedgerEntry.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()
        )

    def append(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    @property
    def entries(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        return f"Ledger({len(self)} requests)"

    def find(
        self,
        *,
        method: str | None = None,
        route: str | None = None,
        outcome: str | None = None,
        fault: str | None = None,
        effect: bool | None = None,
    ) -> list[LedgerEntry]:
        """The entries matching every given criterion (`route` as in `FaultPlan.script`)."""
        return [
            entry
            for entry in self.entries
            if (method is None or entry.method == method.upper())
            and (route is None or _matches(route, entry.method, entry.path))
            and (outcome is None or entry.outcome == outcome)
            and (fault is None or entry.fault == fault)
            and (effect is None or entry.effect == effect)
        ]

    def charges_for(self, order_id: Any) -> list[LedgerEntry]:
        """The charges actually made for `order_id` (replays and faults excluded)."""
        return [
            entry
            for entry in self.find(route="POST /charges", effect=True)
            if entry.data.get("order_id") == order_id
        ]

    def deliveries(self, target: str) -> list[LedgerEntry]:
        """The webhook deliveries accepted for `target`."""
        return self.find(route=f"POST /webhooks/{target}", effect=True)

    def keys(self, route: str | None = None) -> list[str | None]:
        """The ``Idempotency-Key`` of every request (to `route`), in order."""
        return [entry.idempotency_key for entry in self.find(route=route)]


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


@dataclass(slots=True)
class _Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    effect: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


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

    ``with LocalAPI(faults=FaultPlan(seed=1)) as api:`` starts it; `url` is its base URL and
    `ledger` every request it saw. `ledger_path` also appends each entry as a JSON line, for
    tests that count effects from another process. `webhook_secret` makes ``POST
    /webhooks/<name>`` verify ``X-Signature`` (see `sign`); `items` and `seed` shape the
    ``/items`` dataset.
    """

    def __init__(
        self,
        *,
        faults: FaultPlan | None = None,
        ledger_path: str | PathLike[str] | None = None,
        webhook_secret: str | bytes | None = None,
        items: int = 50,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.faults = faults
        self.ledger = Ledger()
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None
        self.webhook_secret = (
            webhook_secret.encode() if isinstance(webhook_secret, str) else webhook_secret
        )
        self._host, self._port = host, port
        self._faults = _Faults(faults or FaultPlan(rate=0.0))
        self._queued: list[tuple[str | None, Fault | None]] = []
        self._gates: list[Gate] = []
        self._gone: set[str] = set()
        self._keys: dict[str, _Stored] = {}
        self._charges: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._file: Any = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        rng = random.Random(seed)
        categories = ("books", "games", "music", "tools", "garden")
        self.items = [
            {
                "id": i,
                "name": f"item-{i:03d}",
                "price": round(rng.uniform(1, 100), 2),
                "category": rng.choice(categories),
            }
            for i in range(1, items + 1)
        ]

    # ------------------------------------------------------------------------ lifetime

    def start(self) -> LocalAPI:
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

    def __enter__(self) -> LocalAPI:
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

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"LocalAPI({where}, faults={self.faults!r})"

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

    def gone(self, target: str) -> None:
        """Make ``POST /webhooks/<target>`` answer 410 Gone from now on."""
        with self._lock:
            self._gone.add(target)

    def charges_for(self, order_id: Any) -> list[LedgerEntry]:
        """The charges actually made for `order_id` (see `Ledger.charges_for`)."""
        return self.ledger.charges_for(order_id)

    #: ``LocalAPI.sign(secret, body)``: the ``X-Signature`` a webhook sender must send.
    sign = staticmethod(sign)

    @staticmethod
    def read_ledger(path: str | PathLike[str]) -> Ledger:
        """The ledger a `LocalAPI` (maybe in another process) appended to `path`."""
        return Ledger.load(path)

    def deliveries(self, target: str) -> list[LedgerEntry]:
        """The webhook deliveries accepted for `target`."""
        return self.ledger.deliveries(target)

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
        method: str,
        path: str,
        key: str | None,
        status: int | None,
        outcome: str,
        fault: Fault | None,
        answer: _Answer | None = None,
    ) -> None:
        with self._lock:  # one order for the memory ledger, the file and `seq`
            entry = LedgerEntry(
                seq=next(self._seq),
                method=method,
                path=path,
                idempotency_key=key,
                status=status,
                outcome=outcome,
                fault=fault,
                effect=answer.effect if answer is not None else False,
                data=answer.data if answer is not None else {},
                time=time.time(),
            )
            self.ledger.append(entry)
            if self._file is not None:
                self._file.write(json.dumps(asdict(entry)) + "\n")
                self._file.flush()

    def _serve(self, handler: _Handler) -> None:
        method = handler.command
        parts = urlsplit(handler.path)
        path, query = parts.path, parse_qs(parts.query)
        body = handler.read_body()
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
            self._record(method, path, key, status, "fault", fault)
            payload = json.dumps({"error": "injected fault", "status": status}).encode()
            handler.answer(status, payload, {"Retry-After": _seconds(plan.retry_after)})
            return
        if fault == "drop_before":
            self._record(method, path, key, None, "dropped", fault)
            handler.close_connection = True
            return
        if key is not None:
            status, headers, payload, outcome, answer = self._keyed(
                method, path, query, body, handler, key
            )
        else:
            answer = self._process(method, path, query, body, handler)
            status, headers, payload = answer.status, answer.headers, answer.encode()
            outcome = "processed"
        if fault == "drop_after":
            self._record(method, path, key, None, outcome, fault, answer)
            handler.close_connection = True
            return
        self._record(method, path, key, status, outcome, fault, answer)
        if fault == "slow":
            self._stop.wait(plan.slow)
        handler.answer(status, payload, headers)

    def _keyed(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: bytes,
        handler: _Handler,
        key: str,
    ) -> tuple[int, dict[str, str], bytes, str, _Answer | None]:
        """Process a request carrying an Idempotency-Key, as the IETF draft describes."""
        fingerprint = hashlib.sha256(b"%s %s\n%s" % (method.encode(), path.encode(), body))
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
            answer = self._process(method, path, query, body, handler)
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

    # ------------------------------------------------------------------------ endpoints

    def _process(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, handler: _Handler
    ) -> _Answer:
        self._wait_at_gates(method, path)
        segments = [part for part in path.split("/") if part]
        head = segments[0] if segments else ""
        rest = segments[1:]
        if head == "charges" and not rest and method == "POST":
            return self._charge(body)
        if head == "webhooks" and len(rest) == 1 and method == "POST":
            return self._webhook(rest[0], body, handler.headers.get("X-Signature"))
        if head == "items" and not rest and method == "GET":
            return self._items(query)
        if head == "enrich" and len(rest) == 1 and method == "GET":
            return _enrich(rest[0])
        if head == "status" and len(rest) == 1 and rest[0].isdigit():
            status = int(rest[0])
            headers = {}
            if "retry_after" in query:
                headers["Retry-After"] = query["retry_after"][0]
            return _Answer(status, {"status": status}, headers)
        if head == "delay" and len(rest) == 1:
            try:
                seconds = min(max(float(rest[0]), 0.0), _MAX_DELAY)
            except ValueError:
                return _Answer(400, {"error": "delay takes seconds"})
            self._stop.wait(seconds)
            return _Answer(200, {"delay": seconds})
        return _Answer(404, {"error": f"no endpoint {method} {path}"})

    def _charge(self, body: bytes) -> _Answer:
        try:
            payload = json.loads(body or b"null")
            order_id, amount = payload["order_id"], payload["amount"]
        except (ValueError, TypeError, KeyError):
            return _Answer(400, {"error": 'body must be {"order_id": ..., "amount": ...}'})
        with self._lock:
            charge = {
                "id": f"ch_{len(self._charges) + 1:06d}",
                "order_id": order_id,
                "amount": amount,
            }
            self._charges[charge["id"]] = charge
        return _Answer(201, charge, effect=True, data=dict(charge))

    def _webhook(self, target: str, body: bytes, signature: str | None) -> _Answer:
        with self._lock:
            gone = target in self._gone
        if gone:
            return _Answer(410, {"error": f"webhook target {target!r} is gone"})
        if self.webhook_secret is not None and not hmac.compare_digest(
            signature or "", sign(self.webhook_secret, body)
        ):
            return _Answer(401, {"error": "bad or missing X-Signature"})
        try:
            event = json.loads(body) if body else None
        except ValueError:
            return _Answer(400, {"error": "body must be JSON"})
        count = len(self.ledger.deliveries(target)) + 1
        return _Answer(
            200,
            {"target": target, "delivery": count},
            effect=True,
            data={"target": target, "event": event},
        )

    def _items(self, query: dict[str, list[str]]) -> _Answer:
        try:
            page = int(query.get("page", ["1"])[0])
            per_page = int(query.get("per_page", ["10"])[0])
        except ValueError:
            return _Answer(400, {"error": "page and per_page are integers"})
        if page < 1 or not 1 <= per_page <= 100:
            return _Answer(400, {"error": "page >= 1 and 1 <= per_page <= 100"})
        start = (page - 1) * per_page
        chunk = self.items[start : start + per_page]
        more = start + per_page < len(self.items)
        next_url = f"{self.url}/items?page={page + 1}&per_page={per_page}" if more else None
        headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else {}
        return _Answer(
            200,
            {
                "items": chunk,
                "page": page,
                "per_page": per_page,
                "total": len(self.items),
                "next": next_url,
            },
            headers,
        )


def _enrich(item_id: str) -> _Answer:
    digest = hashlib.sha256(item_id.encode()).digest()
    tiers = ("bronze", "silver", "gold")
    return _Answer(
        200,
        {
            "id": item_id,
            "score": digest[0] % 100,
            "tier": tiers[digest[1] % len(tiers)],
            "tags": sorted({f"tag-{b % 7}" for b in digest[2:5]}),
        },
    )


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------- standalone


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a `LocalAPI` until interrupted; prints its URL on the first line."""
    parser = argparse.ArgumentParser(
        prog="python -m nodekit.testing._server", description=main.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="fault probability per request")
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated faults")
    parser.add_argument("--retry-after", type=float, default=0.0)
    parser.add_argument("--slow", type=float, default=2.0)
    parser.add_argument("--ledger", help="append every request to this JSON-lines file")
    parser.add_argument("--webhook-secret")
    parser.add_argument("--items", type=int, default=50)
    args = parser.parse_args(argv)
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    plan = FaultPlan(
        seed=args.seed,
        rate=args.rate,
        kinds=kinds,  # checked by FaultPlan
        retry_after=args.retry_after,
        slow=args.slow,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    api = LocalAPI(
        faults=plan,
        ledger_path=args.ledger,
        webhook_secret=args.webhook_secret,
        items=args.items,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    with api:
        print(f"LocalAPI listening on {api.url}", flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
