"""The one place where errors are classified: safe, ambiguous or permanent; and Retry-After.

*Safe* means the effect certainly did not happen, *ambiguous* that it may have; both are
transient. The order: the user's classifiers (`register_classifier`, newest first), a kind the
error declares (``nodekit_kind``), nodekit's own errors, then the rules for the libraries users
call (`_classifiers`: httpx, requests, urllib3, aiohttp, urllib, http.client, sockets and TLS,
psycopg, asyncpg, sqlite3, SQLAlchemy, redis-py), recognised by name: nodekit imports none of
them. Anything else is permanent. Only the failure path classifies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeAlias

from ._classifiers import AMBIGUOUS, PERMANENT, SAFE, Kind, library_kind
from ._errors import (
    BulkheadFull,
    CircuitOpen,
    IdempotencyInProgress,
    IdempotencyStoreError,
    NodeTimeout,
    RateLimited,
)
from ._runtime import RUNTIME

__all__ = [
    "AMBIGUOUS",
    "PERMANENT",
    "SAFE",
    "Classifier",
    "Kind",
    "classify",
    "classify_name",
    "parse_retry_after",
    "register_classifier",
    "retry_after",
]

#: ``classifier(exc)`` returns ``"safe"``, ``"ambiguous"``, ``"permanent"``, or None (no opinion)
Classifier: TypeAlias = Callable[[BaseException], "Kind | None"]

_KINDS = (SAFE, AMBIGUOUS, PERMANENT)
# wrappers (requests -> urllib3 -> socket, SQLAlchemy -> driver) nest a few levels at most
_MAX_DEPTH = 6
_log = logging.getLogger("nodekit")


def classify(exc: BaseException) -> Kind:
    """Classify an exception: ``"safe"`` or ``"ambiguous"`` (both transient) or ``"permanent"``.

    *Safe* means the effect certainly did not happen (connection refused, DNS failure, connect
    timeout, 408, 425, 429, 503, a transaction the database rolled back: serialization failure,
    deadlock, lock timeout); *ambiguous* means it may have (read timeout, connection dropped
    after sending, 500, 502, 504, a connection lost mid-statement or at commit, an abandoned
    sync attempt); anything else is *permanent* (other 4xx, constraints, syntax, a refused
    certificate or password). nodekit's own refusals (`CircuitOpen`, `RateLimited`,
    `BulkheadFull`, a busy key, a failing store) are safe: the function did not run.
    Classifiers given to `register_classifier` are asked first.
    """
    return _classify(exc, 0)


def _classify(exc: BaseException, depth: int) -> Kind:
    for classifier in RUNTIME.classifiers:
        kind = _ask(classifier, exc)
        if kind is not None:
            return kind
    declared = getattr(exc, "nodekit_kind", None)
    if declared in _KINDS:
        return declared  # type: ignore[no-any-return]
    if isinstance(exc, NodeTimeout):
        return AMBIGUOUS
    # refused before anything ran: a busy key, a failing store, a breaker, limit or bulkhead
    if isinstance(
        exc,
        IdempotencyInProgress | IdempotencyStoreError | CircuitOpen | RateLimited | BulkheadFull,
    ):
        return SAFE
    if depth >= _MAX_DEPTH:
        return PERMANENT
    kind = library_kind(exc, lambda inner: _classify(inner, depth + 1))
    return PERMANENT if kind is None else kind


def _ask(classifier: Classifier, exc: BaseException) -> Kind | None:
    """A user's classifier's answer; one that raises or answers nonsense is skipped, with a
    warning on the ``"nodekit"`` logger that names it (never the error's text)."""
    try:
        kind = classifier(exc)
    except Exception as error:
        _log.warning(
            "nodekit: classifier %r raised %s classifying a %s; skipped",
            classifier,
            type(error).__name__,
            type(exc).__name__,
        )
        return None
    if kind is None or kind in _KINDS:
        return kind
    _log.warning(
        "nodekit: classifier %r returned %r for a %s (expected 'safe', 'ambiguous', "
        "'permanent' or None); skipped",
        classifier,
        type(kind).__name__ if not isinstance(kind, str) else kind,
        type(exc).__name__,
    )
    return None


def register_classifier(classifier: Classifier) -> Callable[[], None]:
    """Teach nodekit the errors of your own libraries; returns a function that removes it.

    ``classifier(exc)`` returns ``"safe"`` (the effect certainly did not happen: retried by
    every node), ``"ambiguous"`` (it may have happened: retried by READ and NONE nodes, and by
    a keyed WRITE only when its attempt carried the key downstream), ``"permanent"`` (never
    retried), or None to leave the error to the next classifier and then to nodekit's rules.
    Classifiers are asked before anything else, the most recently registered first, for every
    error a node raises (and for the errors a wrapper such as SQLAlchemy's ``DBAPIError``
    wraps); they run only on the failure path, and must be fast and must not raise (one that
    raises or returns anything else is skipped, with a warning). To honour a server's
    requested wait, give the error a ``retry_after`` attribute (seconds), or a ``response``
    or ``headers`` with a ``Retry-After`` header. Process-wide; `RUNTIME.reset()`
    (``nodekit.testing.reset_defaults()``) removes every classifier::

        def classify_payments(exc):
            if isinstance(exc, payments.RateLimited):
                return "safe"
            return None

        nk.register_classifier(classify_payments)
    """
    if not callable(classifier):
        raise TypeError(f"register_classifier() takes a callable, not {classifier!r}")
    with RUNTIME.lock:
        RUNTIME.classifiers = (classifier, *RUNTIME.classifiers)

    def remove() -> None:
        with RUNTIME.lock:
            items = list(RUNTIME.classifiers)
            for index, item in enumerate(items):
                if item is classifier:
                    del items[index]
                    break
            RUNTIME.classifiers = tuple(items)

    return remove


def classify_name(exc: BaseException) -> tuple[str, str]:
    """The (top-level module, class name) the library rules know an error by."""
    cls = type(exc)
    return cls.__module__.partition(".")[0], cls.__name__


def retry_after(exc: BaseException, *, now: float | None = None) -> float | None:
    """Seconds the error asks the caller to wait (``Retry-After``), or None.

    Looks for a ``retry_after`` attribute (seconds) first, then a ``Retry-After`` header on the
    error's ``response`` (httpx, requests) or on the error itself (aiohttp's
    ``ClientResponseError``, ``urllib.error.HTTPError``); accepts delta-seconds and HTTP dates;
    negative values become 0.
    """
    value = getattr(exc, "retry_after", None)
    if value is None:
        response = getattr(exc, "response", None)
        value = _header(getattr(response, "headers", None) if response is not None else None)
        if value is None:
            value = _header(getattr(exc, "headers", None))
        if value is None:
            return None
    return parse_retry_after(value, now=now)


def _header(headers: object) -> object:
    """The ``Retry-After`` value of a headers mapping (any case), or None."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    try:
        value = get("retry-after")
        if value is None:
            value = get("Retry-After")
    except Exception:
        return None
    return value


def parse_retry_after(value: object, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date; never negative."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0.0, float(value))
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime  # an HTTP date: rare, and slow to import

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)
