"""Policies (`Retry`, `Timeout`, `Effect`) and their compilation; the classifier is `_classify`.

Policies are small frozen value objects. They are validated and compiled into plain floats
when a node is decorated (`compile_retry`, `compile_timeout`), so that a bad value is a
`ConfigError` naming the node and the option, and the call path reads no `timedelta`.
"""

from __future__ import annotations

import enum
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeAlias

from ._errors import ConfigError, ResultRejected
from ._runtime import CURRENT

__all__ = [
    "Effect",
    "Retry",
    "RetryPlan",
    "Seconds",
    "Timeout",
    "TimeoutPlan",
    "compile_effect",
    "compile_retry",
    "compile_timeout",
    "result_checked",
    "seconds",
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

    `on_result` retries a call that *returned*: a predicate over the result (true: call again)
    or a tenacity strategy such as ``retry_if_result``. A tenacity strategy given as `on` that
    looks at results (``retry_if_result``, ``retry_if_not_result``, or one combined with
    ``|`` / ``&``) is honoured on results too. When the attempts run out on a rejected
    result, `nk.ResultRejected` is raised (`.result` holds the last one). Whatever the
    node's effect: a result-based retry is the caller's decision.
    """

    attempts: int = 3
    initial: Seconds = 0.1
    multiplier: float = 2.0
    max_wait: Seconds = 10.0
    jitter: Seconds = 0.1
    on: Any = None
    wait: Any = None
    stop: Any = None
    on_result: Any = None


@dataclass(frozen=True, slots=True)
class Timeout:
    """Time limits in seconds (or `timedelta`): per attempt and for the whole call.

    `total` bounds every attempt and every wait together. An async attempt is cancelled at its
    deadline; a sync one runs in a worker thread and is abandoned there (the caller regains
    control; the attempt counts as ambiguous).
    """

    attempt: Seconds | None = None
    total: Seconds | None = None


# ---------------------------------------------------------------------------- compilation


# The longest duration any option takes: below `threading.TIMEOUT_MAX` (a sync attempt's
# wait), `time.sleep`'s limit and every store's expiry range (Redis keeps milliseconds in a
# signed 64-bit integer), so a bad value fails at decoration, never after an effect began.
MAX_SECONDS = 1e9


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
    if result > MAX_SECONDS:
        raise ConfigError(
            f"node {node!r}: {option} is {result:.4g} s, longer than nodekit can wait or a "
            f"store can keep (at most {MAX_SECONDS:.0f} s, about 31 years); use None for "
            "no limit where the option allows it",
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
    on_result: Callable[[Any], bool] | None = None  # true: the result is rejected, call again

    def backoff(self, failures: int) -> float:
        base = self.initial * self.multiplier ** (failures - 1)
        if self.jitter:
            base += random.uniform(0.0, self.jitter)  # jitter, not security
        return min(base, self.max_wait)


def _is_exception_type(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def compile_retry(retry: Retry | bool | None, *, node: str) -> RetryPlan | None:
    """A `RetryPlan` (None: no retries); the first invalid option is a `ConfigError`."""
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
    _check_attempts(retry.attempts, node=node)
    initial, max_wait, jitter = _compile_backoff(retry, node=node)
    predicate, tenacity_retry = _compile_on(retry.on, node=node)
    _check_strategies(retry, node=node)
    on_result = _compile_on_result(retry.on_result, tenacity_retry, node=node)
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
        on_result=on_result,
    )


def _check_attempts(attempts: Any, *, node: str) -> None:
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ConfigError(
            f"node {node!r}: retry.attempts must be an int >= 1, got {attempts!r}",
            node=node,
            option="retry.attempts",
        )


def _compile_backoff(retry: Retry, *, node: str) -> tuple[float, float, float]:
    """``(initial, max_wait, jitter)`` in seconds, with `multiplier` checked alongside."""
    initial = seconds(retry.initial, node=node, option="retry.initial", allow_none=False)
    max_wait = seconds(retry.max_wait, node=node, option="retry.max_wait", allow_none=False)
    jitter = _jitter(retry.jitter, node=node)
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
    return initial, max_wait, jitter


def _jitter(value: Any, *, node: str) -> float:
    """`retry.jitter` in seconds: zero is allowed (no jitter), unlike the other times."""
    if isinstance(value, timedelta):
        jitter = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        jitter = float(value)
    else:
        jitter = -1.0
    if not 0.0 <= jitter < float("inf"):
        raise ConfigError(
            f"node {node!r}: retry.jitter must be >= 0 seconds, got {value!r}",
            node=node,
            option="retry.jitter",
        )
    return jitter


def _check_strategies(retry: Retry, *, node: str) -> None:
    """`wait` and `stop` are tenacity strategies or None (they are called, not inspected)."""
    for option, strategy in (("retry.wait", retry.wait), ("retry.stop", retry.stop)):
        if strategy is not None and not callable(strategy):
            raise ConfigError(
                f"node {node!r}: {option} must be a tenacity strategy (a callable over the "
                f"retry state), got {strategy!r}",
                node=node,
                option=option,
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
    if _is_tenacity(on):
        return None, on
    if callable(on):
        return on, None
    raise ConfigError(
        f"node {node!r}: retry.on must be exception types, a predicate or a tenacity retry "
        f"strategy, got {on!r}",
        node=node,
        option="retry.on",
    )


def _is_tenacity(value: object) -> bool:
    return type(value).__module__.partition(".")[0] == "tenacity"


def _compile_on_result(
    on_result: Any, tenacity_retry: Any, *, node: str
) -> Callable[[Any], bool] | None:
    """One predicate over a result (true: reject it, call again), or None."""
    checks: list[Callable[[Any], bool]] = []
    if on_result is not None:
        if _is_tenacity(on_result):
            _looks_at_results(on_result, node=node, option="retry.on_result")
            checks.append(_tenacity_result_check(on_result))
        elif callable(on_result) and not isinstance(on_result, type):
            checks.append(on_result)
        else:
            raise ConfigError(
                f"node {node!r}: retry.on_result must be a predicate over the result (true: "
                f"call again) or a tenacity retry strategy, got {on_result!r}",
                node=node,
                option="retry.on_result",
            )
    if tenacity_retry is not None and _looks_at_results(
        tenacity_retry, node=node, option="retry.on"
    ):
        checks.append(_tenacity_result_check(tenacity_retry))
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    return lambda result: any(check(result) for check in checks)


# tenacity strategies that would retry every successful result: refused, never half-honoured
_RETRY_EVERY_RESULT = ("_retry_always", "retry_unless_exception_type")
# tenacity strategies that look only at exceptions
_EXCEPTIONS_ONLY = (
    "_retry_never",
    "retry_if_exception",
    "retry_if_exception_type",
    "retry_if_not_exception_type",
    "retry_if_exception_cause_type",
    "retry_if_exception_message",
    "retry_if_not_exception_message",
)


def _looks_at_results(strategy: Any, *, node: str, option: str) -> bool:
    """Whether a tenacity retry strategy can retry a result (so it is asked about results).

    tenacity asks its strategy about every outcome, results included; nodekit does the same,
    except for the strategies known to look at exceptions only (asking them costs a call
    state per success). Unknown strategies are asked: never silently ignored.
    """
    name = type(strategy).__name__
    if name in _RETRY_EVERY_RESULT:
        raise ConfigError(
            f"node {node!r}: {option} got tenacity's {name.lstrip('_')}, which retries every "
            "successful result too; use Retry(on=Exception) to retry every error, or "
            "Retry(on_result=...) to say which results to retry",
            node=node,
            option=option,
        )
    if name in ("retry_any", "retry_all"):
        members = [
            _looks_at_results(member, node=node, option=option)
            for member in getattr(strategy, "retries", ())
        ]
        return any(members)
    return name not in _EXCEPTIONS_ONLY


def _tenacity_result_check(strategy: Any) -> Callable[[Any], bool]:
    def check(result: Any) -> bool:
        import tenacity

        ctx = CURRENT.get()
        attempt = ctx.attempt if ctx is not None else 1
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.start_time = time.monotonic()
        outcome: Any = tenacity.Future(attempt)
        outcome.set_result(result)
        state.outcome = outcome
        state.outcome_timestamp = time.monotonic()
        return bool(strategy(state))

    return check


def result_checked(
    fn: Callable[..., Any], check: Callable[[Any], bool], *, node: str, is_async: bool
) -> Callable[..., Any]:
    """`fn` raising `ResultRejected` for a result `check` rejects (the retry loop retries it)."""

    def rejected(result: Any) -> ResultRejected:
        ctx = CURRENT.get()
        attempt = ctx.attempt if ctx is not None else 1
        return ResultRejected(
            f"node {node!r}: Retry(on_result=...) rejected the result of attempt {attempt} "
            f"(a {type(result).__name__})",
            node=node,
            result=result,
            attempts=attempt,
        )

    if is_async:

        @functools.wraps(fn)
        async def checked_async(*args: Any, **kwargs: Any) -> Any:
            result = await fn(*args, **kwargs)
            if check(result):
                raise rejected(result)
            return result

        return checked_async

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if check(result):
            raise rejected(result)
        return result

    return checked


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
