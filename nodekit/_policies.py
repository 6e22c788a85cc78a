"""Policies (`Retry`, `Timeout`, `Effect`) and the one place where errors are classified.

Policies are small frozen value objects. They are validated and compiled into plain floats
when a node is decorated (`compile_retry`, `compile_timeout`), so that a bad value is a
`ConfigError` naming the node and the option, and the call path reads no `timedelta`.

The classifier never imports an optional library: it recognises httpx, psycopg, redis and
sqlite3 errors by the module and name of the classes in the exception's MRO.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeAlias

from ._errors import (
    ConfigError,
    IdempotencyInProgress,
    IdempotencyStoreError,
    NodeTimeout,
)

__all__ = [
    "AMBIGUOUS",
    "PERMANENT",
    "SAFE",
    "Effect",
    "Retry",
    "Timeout",
    "classify",
    "retry_after",
]

Seconds: TypeAlias = float | int | timedelta
ExceptionTypes: TypeAlias = type[BaseException] | tuple[type[BaseException], ...]


class Effect(enum.Enum):
    """What a node does to the world; drives which errors are safe to retry.

    `NONE` and `READ` retry every transient error. `WRITE` (the default: an unknown effect is
    treated as a write) retries only errors after which the effect certainly did not happen,
    unless the node has an idempotency key, which makes a retry a harmless replay.
    """

    NONE = "none"
    READ = "read"
    WRITE = "write"

    def __repr__(self) -> str:
        return f"Effect.{self.name}"


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how patiently a node retries transient errors.

    Waits grow as ``initial * multiplier ** (n - 1)`` plus up to `jitter` seconds of random
    jitter, capped at `max_wait`. A ``Retry-After`` the error carries (seconds or an HTTP date)
    replaces the computed wait, clamped to `max_wait` and to the remaining deadline.

    `on` chooses the errors to retry: exception types, a predicate over the exception, or a
    tenacity retry strategy. Left unset, nodekit's classifier decides (transient errors) and
    the effect rules apply; set explicitly, it wins, with a warning event when it retries an
    ambiguous error of a WRITE node without a key. `wait` and `stop` accept tenacity
    strategies in place of the built-in backoff and attempt count.
    """

    attempts: int = 3
    initial: Seconds = 0.1
    multiplier: float = 2.0
    max_wait: Seconds = 10.0
    jitter: Seconds = 0.1
    on: Any = None
    wait: Any = None
    stop: Any = None


@dataclass(frozen=True, slots=True)
class Timeout:
    """Time limits in seconds (or `timedelta`): per attempt and for the whole call.

    `total` bounds every attempt and every wait together. An async attempt is cancelled at its
    deadline; a sync one runs in a worker thread and is abandoned there (the caller regains
    control; the attempt counts as ambiguous).
    """

    attempt: Seconds | None = None
    total: Seconds | None = None


# ---------------------------------------------------------------------------- classification

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


# ---------------------------------------------------------------------------- compilation


def seconds(
    value: Seconds | None, *, node: str, option: str, allow_none: bool = True
) -> float | None:
    """Normalise a time option to float seconds; `ConfigError` naming node and option."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"node {node!r}: {option} is required", node=node, option=option)
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        raise ConfigError(
            f"node {node!r}: {option} must be seconds (float) or a timedelta, got {value!r}",
            node=node,
            option=option,
        )
    if not result > 0 or result != result or result == float("inf"):
        raise ConfigError(
            f"node {node!r}: {option} must be a positive, finite time, got {value!r}",
            node=node,
            option=option,
        )
    return result


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """A validated `Retry`, in floats, with `on` turned into one predicate."""

    attempts: int
    initial: float
    multiplier: float
    max_wait: float
    jitter: float
    predicate: Callable[[BaseException], bool] | None  # None: the classifier decides
    explicit: bool
    tenacity_retry: Any = None
    wait: Any = None
    stop: Any = None

    def backoff(self, failures: int) -> float:
        base = self.initial * self.multiplier ** (failures - 1)
        if self.jitter:
            base += random.uniform(0.0, self.jitter)  # jitter, not security
        return min(base, self.max_wait)


def _is_exception_type(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def compile_retry(retry: Retry | bool | None, *, node: str) -> RetryPlan | None:
    if retry is None or retry is False:
        return None
    if retry is True:
        retry = Retry()
    if not isinstance(retry, Retry):
        raise ConfigError(
            f"node {node!r}: retry must be a nk.Retry, True or None, got {retry!r}",
            node=node,
            option="retry",
        )
    if (
        not isinstance(retry.attempts, int)
        or isinstance(retry.attempts, bool)
        or retry.attempts < 1
    ):
        raise ConfigError(
            f"node {node!r}: retry.attempts must be an int >= 1, got {retry.attempts!r}",
            node=node,
            option="retry.attempts",
        )
    initial = seconds(retry.initial, node=node, option="retry.initial", allow_none=False)
    max_wait = seconds(retry.max_wait, node=node, option="retry.max_wait", allow_none=False)
    if isinstance(retry.jitter, timedelta):
        jitter = retry.jitter.total_seconds()
    elif isinstance(retry.jitter, int | float) and not isinstance(retry.jitter, bool):
        jitter = float(retry.jitter)
    else:
        jitter = -1.0
    if not 0.0 <= jitter < float("inf"):
        raise ConfigError(
            f"node {node!r}: retry.jitter must be >= 0 seconds, got {retry.jitter!r}",
            node=node,
            option="retry.jitter",
        )
    if (
        not isinstance(retry.multiplier, int | float)
        or isinstance(retry.multiplier, bool)
        or not 1.0 <= retry.multiplier < float("inf")
    ):
        raise ConfigError(
            f"node {node!r}: retry.multiplier must be a number >= 1, got {retry.multiplier!r}",
            node=node,
            option="retry.multiplier",
        )
    assert initial is not None
    assert max_wait is not None
    if max_wait < initial:
        raise ConfigError(
            f"node {node!r}: retry.max_wait ({max_wait}) is shorter than retry.initial ({initial})",
            node=node,
            option="retry.max_wait",
        )
    predicate, tenacity_retry = _compile_on(retry.on, node=node)
    for option, strategy in (("retry.wait", retry.wait), ("retry.stop", retry.stop)):
        if strategy is not None and not callable(strategy):
            raise ConfigError(
                f"node {node!r}: {option} must be a tenacity strategy (a callable over the "
                f"retry state), got {strategy!r}",
                node=node,
                option=option,
            )
    return RetryPlan(
        attempts=retry.attempts,
        initial=initial,
        multiplier=float(retry.multiplier),
        max_wait=max_wait,
        jitter=jitter,
        predicate=predicate,
        explicit=retry.on is not None,
        tenacity_retry=tenacity_retry,
        wait=retry.wait,
        stop=retry.stop,
    )


def _compile_on(on: Any, *, node: str) -> tuple[Callable[[BaseException], bool] | None, Any]:
    if on is None:
        return None, None
    if _is_exception_type(on):
        types: tuple[type[BaseException], ...] = (on,)
        return (lambda exc: isinstance(exc, types)), None
    if isinstance(on, tuple | list | frozenset | set):
        bad = [item for item in on if not _is_exception_type(item)]
        if bad or not on:
            raise ConfigError(
                f"node {node!r}: retry.on must hold exception types only, got {bad or on!r}",
                node=node,
                option="retry.on",
            )
        types = tuple(on)
        return (lambda exc: isinstance(exc, types)), None
    if isinstance(on, type):
        raise ConfigError(
            f"node {node!r}: retry.on got {on.__name__}, which is not an exception type",
            node=node,
            option="retry.on",
        )
    if type(on).__module__.partition(".")[0] == "tenacity":
        return None, on
    if callable(on):
        return on, None
    raise ConfigError(
        f"node {node!r}: retry.on must be exception types, a predicate or a tenacity retry "
        f"strategy, got {on!r}",
        node=node,
        option="retry.on",
    )


@dataclass(frozen=True, slots=True)
class TimeoutPlan:
    attempt: float | None
    total: float | None


def compile_timeout(timeout: Timeout | Seconds | None, *, node: str) -> TimeoutPlan | None:
    if timeout is None:
        return None
    if not isinstance(timeout, Timeout):
        if isinstance(timeout, bool) or not isinstance(timeout, int | float | timedelta):
            raise ConfigError(
                f"node {node!r}: timeout must be seconds, a timedelta or a nk.Timeout, "
                f"got {timeout!r}",
                node=node,
                option="timeout",
            )
        timeout = Timeout(attempt=timeout)
    attempt = seconds(timeout.attempt, node=node, option="timeout.attempt")
    total = seconds(timeout.total, node=node, option="timeout.total")
    if attempt is None and total is None:
        return None
    if attempt is not None and total is not None and total < attempt:
        raise ConfigError(
            f"node {node!r}: timeout.total ({total}) is shorter than timeout.attempt ({attempt})",
            node=node,
            option="timeout.total",
        )
    return TimeoutPlan(attempt=attempt, total=total)


def compile_effect(effect: Any, *, node: str) -> Effect:
    if isinstance(effect, Effect):
        return effect
    if isinstance(effect, str):
        try:
            return Effect(effect.lower())
        except ValueError:
            pass
    raise ConfigError(
        f"node {node!r}: effect must be nk.Effect.NONE, READ or WRITE, got {effect!r}",
        node=node,
        option="effect",
    )
