"""The one place where errors are classified: safe, ambiguous or permanent; and Retry-After.

*Safe* means the effect certainly did not happen, *ambiguous* that it may have; both are
transient. The classifier never imports an optional library: it recognises httpx, psycopg,
redis and sqlite3 errors by the module and name of the classes in the exception's MRO.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, TypeAlias

from ._errors import IdempotencyInProgress, IdempotencyStoreError, NodeTimeout

__all__ = [
    "AMBIGUOUS",
    "PERMANENT",
    "SAFE",
    "Kind",
    "classify",
    "classify_name",
    "parse_retry_after",
    "retry_after",
]

Kind: TypeAlias = Literal["safe", "ambiguous", "permanent"]
SAFE: Kind = "safe"
AMBIGUOUS: Kind = "ambiguous"
PERMANENT: Kind = "permanent"

_SAFE_STATUS = frozenset({408, 425, 429, 503})
_AMBIGUOUS_STATUS = frozenset({500, 502, 504})

# (top-level module, class name) -> kind, matched along the exception's MRO.
_BY_NAME: dict[tuple[str, str], Kind] = {
    # httpx: nothing was sent, or the pool never gave a connection
    ("httpx", "ConnectError"): SAFE,
    ("httpx", "ConnectTimeout"): SAFE,
    ("httpx", "PoolTimeout"): SAFE,
    # httpx: the request may have reached the server
    ("httpx", "ReadTimeout"): AMBIGUOUS,
    ("httpx", "WriteTimeout"): AMBIGUOUS,
    ("httpx", "ReadError"): AMBIGUOUS,
    ("httpx", "WriteError"): AMBIGUOUS,
    ("httpx", "RemoteProtocolError"): AMBIGUOUS,
    ("httpx", "CloseError"): AMBIGUOUS,
    ("httpx", "TransportError"): AMBIGUOUS,
    # httpx: the request was refused before it was sent, and would be refused again
    ("httpx", "UnsupportedProtocol"): PERMANENT,
    ("httpx", "LocalProtocolError"): PERMANENT,
    ("httpx", "ProxyError"): SAFE,
    # redis-py
    ("redis", "BusyLoadingError"): SAFE,
    ("redis", "TryAgainError"): SAFE,
    ("redis", "ClusterDownError"): SAFE,
    ("redis", "TimeoutError"): AMBIGUOUS,
    ("redis", "ConnectionError"): AMBIGUOUS,
    # psycopg: a connection lost mid-transaction may or may not have committed
    ("psycopg", "OperationalError"): AMBIGUOUS,
    ("psycopg_pool", "PoolTimeout"): SAFE,
}

# SQLSTATEs after which the transaction was rolled back: safe to run again.
_SAFE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


def classify(exc: BaseException) -> Kind:
    """Classify an exception: ``"safe"`` or ``"ambiguous"`` (both transient) or ``"permanent"``.

    *Safe* means the effect certainly did not happen (connect refused, 429, 503, a rolled-back
    transaction); *ambiguous* means it may have (read timeout, connection dropped after
    sending, 500, 502, 504, an abandoned sync attempt).
    """
    declared = getattr(exc, "nodekit_kind", None)
    if declared in (SAFE, AMBIGUOUS, PERMANENT):
        return declared  # type: ignore[no-any-return]
    if isinstance(exc, NodeTimeout):
        return AMBIGUOUS
    if isinstance(exc, IdempotencyInProgress | IdempotencyStoreError):
        return SAFE
    status = _status_code(exc)
    if status is not None:
        if status in _SAFE_STATUS:
            return SAFE
        if status in _AMBIGUOUS_STATUS:
            return AMBIGUOUS
        return PERMANENT
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate in _SAFE_SQLSTATES:
        return SAFE
    for cls in type(exc).__mro__:
        kind = _BY_NAME.get((cls.__module__.partition(".")[0], cls.__name__))
        if kind is not None:
            if kind == AMBIGUOUS and _refused(exc):
                return SAFE
            return kind
    if isinstance(exc, ConnectionRefusedError):
        return SAFE
    if isinstance(exc, ConnectionError | TimeoutError):
        return AMBIGUOUS
    if type(exc).__name__ == "OperationalError" and type(exc).__module__ == "sqlite3":
        message = str(exc).lower()
        if any(text in message for text in _SQLITE_TRANSIENT):
            return SAFE
    return PERMANENT


def _refused(exc: BaseException) -> bool:
    """True when a wrapped error was caused by a refused connection (nothing was sent)."""
    seen = 0
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and seen < 5:
        if isinstance(cause, ConnectionRefusedError):
            return True
        if classify_name(cause) in {("httpx", "ConnectError"), ("httpcore", "ConnectError")}:
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return "connection refused" in str(exc).lower() or "error 111" in str(exc).lower()


def classify_name(exc: BaseException) -> tuple[str, str]:
    cls = type(exc)
    return cls.__module__.partition(".")[0], cls.__name__


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def retry_after(exc: BaseException, *, now: float | None = None) -> float | None:
    """Seconds the error asks the caller to wait (``Retry-After``), or None.

    Looks for a ``retry_after`` attribute (seconds) first, then a ``Retry-After`` header on the
    error's ``response``; accepts delta-seconds and HTTP dates; negative values become 0.
    """
    value = getattr(exc, "retry_after", None)
    if value is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        if headers is None:
            return None
        try:
            value = headers.get("retry-after")
        except Exception:
            return None
        if value is None:
            return None
    return parse_retry_after(value, now=now)


def parse_retry_after(value: object, *, now: float | None = None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0.0, float(value))
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)
