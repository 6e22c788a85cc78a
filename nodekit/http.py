"""HTTP calls inside nodes, over an httpx client the caller injects.

Guarantee: a keyed POST or PATCH takes effect **effectively once when the server honours the
`Idempotency-Key` header**, because every attempt, process and resume of the node sends the
same key, derived from the node's own idempotency key.

The helpers turn a response into what the node's attempt loop understands: a retryable status
(408, 425, 429, 500, 502, 503, 504) raises `HTTPStatusError` carrying ``retry_after`` from the
``Retry-After`` header, so the loop classifies it (safe or ambiguous) and waits as the server
asked; other 4xx and 5xx raise too unless ``raise_for_status=False``. When a key was sent, 409
raises `KeyInProgress` (an `nk.IdempotencyInProgress`: retried) and 422 raises `KeyMismatch`
(an `nk.IdempotencyMismatch`: not retried). All of them are `httpx.HTTPStatusError`, so
existing ``except`` clauses keep working.

The request's httpx timeout is capped by the node's remaining deadline
(`nk.context().remaining()`), so a deadline is propagated, not only enforced. Each response is
reported as an ``http.response`` event (method, URL with secret query values redacted,
status, ``Idempotent-Replayed``); headers are never reported, so ``Authorization``,
``Cookie`` and API keys stay out of events and logs.

The client is never created per call and never closed here: its owner (usually a resource,
``with nk.use(http=client)``) decides its lifetime.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

try:
    import httpx
except ImportError as exc:
    raise ImportError(
        "nodekit.http needs httpx: pip install 'nodekit[http]'", name=exc.name
    ) from exc

from ._classify import parse_retry_after
from ._context import NodeContext, current_or_none
from ._errors import IdempotencyInProgress, IdempotencyMismatch, NodeTimeout
from ._events import emit
from ._redact import MASK, SECRET_NAME

__all__ = [
    "IDEMPOTENCY_HEADER",
    "KEYED_METHODS",
    "RETRYABLE_STATUS",
    "HTTPStatusError",
    "KeyInProgress",
    "KeyMismatch",
    "adelete",
    "aget",
    "apatch",
    "apost",
    "aput",
    "arequest",
    "delete",
    "get",
    "patch",
    "post",
    "put",
    "redact_url",
    "replayed",
    "request",
]

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
#: Methods that get an ``Idempotency-Key`` by default: the ones HTTP does not make idempotent.
KEYED_METHODS = frozenset({"POST", "PATCH"})
#: Statuses that are raised (with ``retry_after``) whatever ``raise_for_status`` says.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# Keyword arguments of `Client.request` that belong to `send()`, not `build_request()`.
_SEND_OPTIONS = ("auth", "follow_redirects")


class HTTPStatusError(httpx.HTTPStatusError):
    """A 4xx or 5xx response, raised by nodekit's helpers; an `httpx.HTTPStatusError`.

    `status_code` is the response's status and `retry_after` the seconds its ``Retry-After``
    header asked for (delta-seconds or an HTTP date), or None: the node's attempt loop reads
    both to classify the error and to wait.
    """

    def __init__(self, message: str, *, request: httpx.Request, response: httpx.Response) -> None:
        super().__init__(message, request=request, response=response)
        self.status_code: int = response.status_code
        self.retry_after: float | None = parse_retry_after(response.headers.get("retry-after"))


class KeyInProgress(HTTPStatusError, IdempotencyInProgress):
    """409 to a keyed request: the server is still processing that key. Transient: retried."""


class KeyMismatch(HTTPStatusError, IdempotencyMismatch):
    """422 to a keyed request: the key was used before with another request. Not retried."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What `_prepare` decided for one call (no I/O)."""

    request: httpx.Request
    send: dict[str, Any]
    key: str | None
    url: str
    ctx: NodeContext | None


# ---------------------------------------------------------------------------- decisions


def redact_url(url: httpx.URL | str) -> str:
    """The URL without user info, with the values of secret-looking query parameters hidden."""
    url = httpx.URL(url)
    host = f"[{url.host}]" if ":" in url.host else url.host  # IPv6
    text = f"{url.scheme}://{host}" if host else ""
    if url.port is not None:
        text += f":{url.port}"
    text += url.path
    if url.query:
        parts = []
        for name, value in url.params.multi_items():
            shown = MASK if SECRET_NAME.search(name) else value
            parts.append(f"{name}={shown}")
        text += "?" + "&".join(parts)
    return text


def replayed(response: httpx.Response) -> bool:
    """Whether the server answered from its idempotency store (``Idempotent-Replayed: true``)."""
    return response.headers.get(REPLAYED_HEADER, "").strip().lower() in ("true", "1", "?1")


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _capped(timeout: httpx.Timeout, remaining: float | None) -> httpx.Timeout:
    """`timeout` with every phase at most `remaining` seconds (the node's deadline)."""
    if remaining is None:
        return timeout

    def cap(value: float | None) -> float:
        return remaining if value is None or value > remaining else value

    return httpx.Timeout(
        connect=cap(timeout.connect),
        read=cap(timeout.read),
        write=cap(timeout.write),
        pool=cap(timeout.pool),
    )


def _resolve_key(
    ctx: NodeContext | None,
    method: str,
    request: httpx.Request,
    explicit: str | None,
    step: str | None,
    methods: Collection[str],
) -> str | None:
    """The Idempotency-Key to send: given, or derived from the node's key for keyed methods."""
    present: str | None = request.headers.get(IDEMPOTENCY_HEADER)
    if present is not None:
        return present
    if explicit is not None:
        return explicit
    if method not in methods or ctx is None or ctx.idempotency_key is None:
        return None
    return ctx.idempotency_key_for(step if step is not None else f"{method} {request.url.path}")


def _prepare(
    client: httpx.Client | httpx.AsyncClient,
    method: str,
    url: httpx.URL | str,
    idempotency_key: str | None,
    step: str | None,
    keyed_methods: Collection[str],
    options: dict[str, Any],
) -> _Prepared:
    method = method.upper()
    ctx = current_or_none()
    remaining = ctx.remaining() if ctx is not None else None
    if remaining is not None and remaining <= 0.0:
        raise NodeTimeout(
            f"{method} {redact_url(url)}: the node's deadline passed before the request was sent",
            node=ctx.node if ctx is not None else None,
            timeout=0.0,
            nodekit_kind="safe",  # nothing was sent: the classifier may retry even a write
        )
    send = {name: options.pop(name) for name in _SEND_OPTIONS if name in options}
    given = options.pop("timeout", httpx.USE_CLIENT_DEFAULT)
    base = client.timeout if given is httpx.USE_CLIENT_DEFAULT else given
    options["timeout"] = _capped(httpx.Timeout(base), remaining)
    request = client.build_request(method, url, **options)
    key = _resolve_key(ctx, method, request, idempotency_key, step, keyed_methods)
    if key is not None:
        request.headers[IDEMPOTENCY_HEADER] = key
    return _Prepared(request, send, key, redact_url(request.url), ctx)


def _check(
    prepared: _Prepared, response: httpx.Response, raise_for_status: bool, started: float
) -> httpx.Response:
    """Report the response, and raise what the attempt loop must see."""
    ctx = prepared.ctx
    status = response.status_code
    was_replayed = replayed(response)
    short = None if prepared.key is None else _fingerprint(prepared.key)
    emit(
        "http.response",
        ctx.node if ctx is not None else None,
        ctx.run_id if ctx is not None else None,
        ctx.attempt if ctx is not None else 0,
        duration=time.perf_counter() - started,
        method=prepared.request.method,
        url=prepared.url,
        status=status,
        replayed=was_replayed,
        key=short,
    )
    if status < 400:
        return response
    keyed = prepared.key is not None
    error: type[HTTPStatusError]
    if keyed and status == 409:
        error, what = KeyInProgress, "the Idempotency-Key is still being processed"
    elif keyed and status == 422:
        error, what = KeyMismatch, "the Idempotency-Key was used with a different request"
    elif status in RETRYABLE_STATUS or raise_for_status:
        error, what = HTTPStatusError, response.reason_phrase
    else:
        return response
    message = f"{prepared.request.method} {prepared.url}: {status} {what}"
    exc = error(message, request=prepared.request, response=response)
    if isinstance(exc, KeyInProgress | KeyMismatch):
        exc.node = ctx.node if ctx is not None else None
        exc.key_fingerprint = short
    raise exc


# ---------------------------------------------------------------------------- sync


def request(
    client: httpx.Client,
    method: str,
    url: httpx.URL | str,
    *,
    idempotency_key: str | None = None,
    step: str | None = None,
    raise_for_status: bool = True,
    keyed_methods: Collection[str] = KEYED_METHODS,
    **options: Any,
) -> httpx.Response:
    """Send one request with `client` and turn its status into the node's retry decision.

    `options` are `httpx.Client.request`'s (``json``, ``params``, ``headers``, ``timeout``,
    ``auth``, ...). A POST or PATCH (`keyed_methods`) inside a keyed node sends the
    ``Idempotency-Key`` ``nk.context().idempotency_key_for(step)``, `step` defaulting to
    ``"<METHOD> <path>"``: give each distinct request of one node its own `step`. An explicit
    `idempotency_key` (or header) is sent as given; an unkeyed node sends none.
    Raises `HTTPStatusError` (or `KeyInProgress`, `KeyMismatch`) as the module describes, and
    `nk.NodeTimeout` (safe) when the node's deadline passed before sending.
    """
    prepared = _prepare(client, method, url, idempotency_key, step, keyed_methods, options)
    started = time.perf_counter()
    response = client.send(prepared.request, **prepared.send)
    return _check(prepared, response, raise_for_status, started)


def get(client: httpx.Client, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`request` with GET."""
    return request(client, "GET", url, **options)


def post(client: httpx.Client, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`request` with POST (keyed in a keyed node)."""
    return request(client, "POST", url, **options)


def put(client: httpx.Client, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`request` with PUT."""
    return request(client, "PUT", url, **options)


def patch(client: httpx.Client, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`request` with PATCH (keyed in a keyed node)."""
    return request(client, "PATCH", url, **options)


def delete(client: httpx.Client, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`request` with DELETE."""
    return request(client, "DELETE", url, **options)


# ---------------------------------------------------------------------------- async


async def arequest(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL | str,
    *,
    idempotency_key: str | None = None,
    step: str | None = None,
    raise_for_status: bool = True,
    keyed_methods: Collection[str] = KEYED_METHODS,
    **options: Any,
) -> httpx.Response:
    """The async twin of `request`, over an `httpx.AsyncClient`."""
    prepared = _prepare(client, method, url, idempotency_key, step, keyed_methods, options)
    started = time.perf_counter()
    response = await client.send(prepared.request, **prepared.send)
    return _check(prepared, response, raise_for_status, started)


async def aget(client: httpx.AsyncClient, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`arequest` with GET."""
    return await arequest(client, "GET", url, **options)


async def apost(client: httpx.AsyncClient, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`arequest` with POST (keyed in a keyed node)."""
    return await arequest(client, "POST", url, **options)


async def aput(client: httpx.AsyncClient, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`arequest` with PUT."""
    return await arequest(client, "PUT", url, **options)


async def apatch(client: httpx.AsyncClient, url: httpx.URL | str, **options: Any) -> httpx.Response:
    """`arequest` with PATCH (keyed in a keyed node)."""
    return await arequest(client, "PATCH", url, **options)


async def adelete(
    client: httpx.AsyncClient, url: httpx.URL | str, **options: Any
) -> httpx.Response:
    """`arequest` with DELETE."""
    return await arequest(client, "DELETE", url, **options)
