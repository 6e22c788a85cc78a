"""Policies are validated at decoration time, and errors are classified in one place."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import psycopg.errors
import pytest
import redis.exceptions

import nodekit as nk
from nodekit._classify import parse_retry_after, retry_after


def target(x: int) -> int:
    return x


# ---------------------------------------------------------------------------- configuration

BAD_OPTIONS = [
    pytest.param({"retry": nk.Retry(attempts=0)}, "retry.attempts", id="attempts-zero"),
    pytest.param({"retry": nk.Retry(attempts=-1)}, "retry.attempts", id="attempts-negative"),
    pytest.param({"retry": nk.Retry(attempts=2.5)}, "retry.attempts", id="attempts-float"),  # type: ignore[arg-type]
    pytest.param({"retry": nk.Retry(attempts=True)}, "retry.attempts", id="attempts-bool"),
    pytest.param({"retry": nk.Retry(initial=0)}, "retry.initial", id="initial-zero"),
    pytest.param({"retry": nk.Retry(initial=-1)}, "retry.initial", id="initial-negative"),
    pytest.param(
        {"retry": nk.Retry(initial=timedelta(seconds=-1))}, "retry.initial", id="initial-td"
    ),
    pytest.param({"retry": nk.Retry(max_wait=0)}, "retry.max_wait", id="max-wait-zero"),
    pytest.param(
        {"retry": nk.Retry(initial=5, max_wait=1)}, "retry.max_wait", id="max-wait-below-initial"
    ),
    pytest.param({"retry": nk.Retry(jitter=-0.1)}, "retry.jitter", id="jitter-negative"),
    pytest.param({"retry": nk.Retry(multiplier=0.5)}, "retry.multiplier", id="multiplier-low"),
    pytest.param({"retry": nk.Retry(on=int)}, "retry.on", id="on-int"),
    pytest.param({"retry": nk.Retry(on=(ValueError, "x"))}, "retry.on", id="on-mixed-tuple"),
    pytest.param({"retry": nk.Retry(on=())}, "retry.on", id="on-empty"),
    pytest.param({"retry": nk.Retry(on="ValueError")}, "retry.on", id="on-string"),
    pytest.param({"retry": nk.Retry(wait=5)}, "retry.wait", id="wait-not-strategy"),
    pytest.param({"retry": nk.Retry(stop=3)}, "retry.stop", id="stop-not-strategy"),
    pytest.param({"retry": 3}, "retry", id="retry-int"),
    pytest.param({"timeout": -1}, "timeout.attempt", id="timeout-negative"),
    pytest.param({"timeout": 0}, "timeout.attempt", id="timeout-zero"),
    pytest.param({"timeout": float("inf")}, "timeout.attempt", id="timeout-inf"),
    pytest.param({"timeout": float("nan")}, "timeout.attempt", id="timeout-nan"),
    pytest.param({"timeout": "5"}, "timeout", id="timeout-string"),
    pytest.param({"timeout": True}, "timeout", id="timeout-bool"),
    pytest.param({"timeout": nk.Timeout(total=0)}, "timeout.total", id="total-zero"),
    pytest.param(
        {"timeout": nk.Timeout(attempt=5, total=1)}, "timeout.total", id="total-below-attempt"
    ),
    pytest.param(
        {"timeout": nk.Timeout(attempt=timedelta(0))}, "timeout.attempt", id="attempt-td-zero"
    ),
    pytest.param({"effect": "delete"}, "effect", id="effect-unknown"),
    pytest.param({"effect": 1}, "effect", id="effect-int"),
    pytest.param({"effect": None}, "effect", id="effect-none"),
    pytest.param({"retires": 3}, "retires", id="unknown-option"),
]


@pytest.mark.parametrize(("options", "option"), BAD_OPTIONS)
def test_bad_configuration_is_a_config_error_naming_node_and_option(
    options: dict[str, Any], option: str
) -> None:
    decorate = nk.node(name="charge_card", **options)
    with pytest.raises(nk.ConfigError) as info:
        decorate(target)
    assert info.value.option == option
    assert info.value.node == "charge_card"
    assert "'charge_card'" in str(info.value)
    assert option.rpartition(".")[2] in str(info.value)


@pytest.mark.parametrize(("options", "option"), BAD_OPTIONS[:3])
def test_bad_configuration_of_an_async_node_names_its_qualified_name(
    options: dict[str, Any], option: str
) -> None:
    async def charge(x: int) -> int:
        return x

    with pytest.raises(nk.ConfigError) as info:
        nk.node(**options)(charge)
    assert info.value.node is not None
    assert info.value.node.endswith("<locals>.charge")
    assert info.value.option == option


def test_config_error_is_a_value_error_and_a_nodekit_error() -> None:
    assert issubclass(nk.ConfigError, ValueError)
    assert issubclass(nk.ConfigError, nk.NodekitError)


def test_empty_name_is_refused() -> None:
    with pytest.raises(nk.ConfigError) as info:
        nk.node(name="")(target)
    assert info.value.option == "name"


def test_resource_parameter_must_be_keyword_only() -> None:
    def fetch(url: str, http: Any = nk.resource()) -> None:
        pass

    with pytest.raises(nk.ConfigError, match="keyword-only") as info:
        nk.node(fetch)
    assert info.value.option == "http"
    assert info.value.node is not None
    assert info.value.node.endswith("fetch")


def test_times_accept_seconds_and_timedelta() -> None:
    spec = nk.node(
        retry=nk.Retry(initial=timedelta(milliseconds=250), max_wait=timedelta(seconds=3)),
        timeout=nk.Timeout(attempt=timedelta(seconds=2), total=10),
    )(target).spec
    assert spec.retry is not None
    assert (spec.retry.initial, spec.retry.max_wait) == (0.25, 3.0)
    assert (spec.attempt_timeout, spec.total_timeout) == (2.0, 10.0)
    assert nk.node(timeout=timedelta(seconds=1.5))(target).spec.attempt_timeout == 1.5
    assert nk.node(timeout=2)(target).spec.attempt_timeout == 2.0


def test_none_disables_and_an_empty_timeout_is_no_timeout() -> None:
    spec = nk.node(retry=None, timeout=nk.Timeout())(target).spec
    assert spec.retry is None
    assert spec.timeout is None
    assert nk.node(retry=False)(target).spec.retry is None


def test_effect_accepts_its_value_as_a_string() -> None:
    assert nk.node(effect="read")(target).effect is nk.Effect.READ  # type: ignore[arg-type]
    assert nk.node(effect="NONE")(target).effect is nk.Effect.NONE  # type: ignore[arg-type]


def test_policies_are_frozen_values_with_a_readable_repr() -> None:
    retry = nk.Retry(attempts=5, initial=0.5)
    assert retry == nk.Retry(attempts=5, initial=0.5)
    assert "attempts=5" in repr(retry)
    assert "initial=0.5" in repr(retry)
    assert repr(nk.Timeout(attempt=2.5)) == "Timeout(attempt=2.5, total=None)"
    assert repr(nk.Effect.READ) == "Effect.READ"
    with pytest.raises(AttributeError):
        retry.attempts = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------- classification


def status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://example.com/")
    response = httpx.Response(status, request=request)
    return httpx.HTTPStatusError(str(status), request=request, response=response)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(ConnectionRefusedError(), "safe", id="refused"),
        pytest.param(ConnectionResetError(), "ambiguous", id="reset"),
        pytest.param(ConnectionAbortedError(), "ambiguous", id="aborted"),
        pytest.param(BrokenPipeError(), "ambiguous", id="broken-pipe"),
        pytest.param(TimeoutError(), "ambiguous", id="timeout"),
        pytest.param(ValueError(), "permanent", id="value"),
        pytest.param(TypeError(), "permanent", id="type"),
        pytest.param(KeyError("k"), "permanent", id="key"),
        pytest.param(LookupError(), "permanent", id="lookup"),
        pytest.param(FileNotFoundError(), "permanent", id="file-not-found"),
        pytest.param(RuntimeError(), "permanent", id="runtime"),
    ],
)
def test_classify_stdlib_errors(error: BaseException, kind: str) -> None:
    assert nk.classify(error) == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(httpx.ConnectError("x"), "safe", id="connect-error"),
        pytest.param(httpx.ConnectTimeout("x"), "safe", id="connect-timeout"),
        pytest.param(httpx.PoolTimeout("x"), "safe", id="pool-timeout"),
        pytest.param(httpx.ReadTimeout("x"), "ambiguous", id="read-timeout"),
        pytest.param(httpx.WriteTimeout("x"), "ambiguous", id="write-timeout"),
        pytest.param(httpx.ReadError("x"), "ambiguous", id="read-error"),
        pytest.param(httpx.WriteError("x"), "ambiguous", id="write-error"),
        pytest.param(httpx.RemoteProtocolError("x"), "ambiguous", id="remote-protocol"),
        pytest.param(httpx.TooManyRedirects("x"), "permanent", id="redirects"),
        pytest.param(httpx.InvalidURL("x"), "permanent", id="invalid-url"),
    ],
)
def test_classify_httpx_transport_errors(error: BaseException, kind: str) -> None:
    assert nk.classify(error) == kind


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        *[(status, "safe") for status in (408, 425, 429, 503)],
        *[(status, "ambiguous") for status in (500, 502, 504)],
        *[(status, "permanent") for status in (400, 401, 403, 404, 409, 422, 501)],
    ],
)
def test_classify_http_status_errors(status: int, kind: str) -> None:
    assert nk.classify(status_error(status)) == kind


def test_classify_a_status_code_attribute() -> None:
    class ApiError(Exception):
        status_code = 503

    assert nk.classify(ApiError()) == "safe"


def test_an_ambiguous_transport_error_caused_by_a_refused_connection_is_safe() -> None:
    error = httpx.ReadError("wrapped")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert nk.classify(error) == "safe"
    assert nk.classify(httpx.ReadError("wrapped")) == "ambiguous"


def test_classify_sqlite_locked_database_from_a_real_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x INTEGER)")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match="locked") as info:
            other.execute("INSERT INTO t VALUES (1)")
        assert nk.classify(info.value) == "safe"
        holder.execute("ROLLBACK")
        with pytest.raises(sqlite3.OperationalError, match="no such table") as missing:
            other.execute("SELECT * FROM nowhere")
        assert nk.classify(missing.value) == "permanent"
    finally:
        holder.close()
        other.close()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(sqlite3.OperationalError("database is locked"), "safe", id="locked"),
        pytest.param(sqlite3.OperationalError("database table is locked"), "safe", id="table"),
        pytest.param(sqlite3.OperationalError("disk I/O error"), "permanent", id="io"),
        pytest.param(sqlite3.IntegrityError("UNIQUE constraint failed"), "permanent", id="unique"),
    ],
)
def test_classify_sqlite_errors(error: BaseException, kind: str) -> None:
    assert nk.classify(error) == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(psycopg.errors.SerializationFailure("x"), "safe", id="serialization"),
        pytest.param(psycopg.errors.DeadlockDetected("x"), "safe", id="deadlock"),
        pytest.param(psycopg.errors.LockNotAvailable("x"), "safe", id="lock-not-available"),
        pytest.param(psycopg.OperationalError("connection lost"), "ambiguous", id="operational"),
        pytest.param(psycopg.errors.UniqueViolation("x"), "permanent", id="unique"),
        pytest.param(psycopg.errors.UndefinedTable("x"), "permanent", id="undefined-table"),
    ],
)
def test_classify_psycopg_errors(error: BaseException, kind: str) -> None:
    assert nk.classify(error) == kind


def test_classify_by_sqlstate_and_module_without_importing_the_driver() -> None:
    class SerializationFailure(Exception):
        sqlstate = "40001"

    class OperationalError(Exception):
        sqlstate = None

    OperationalError.__module__ = "psycopg.errors"
    assert nk.classify(SerializationFailure()) == "safe"
    assert nk.classify(OperationalError()) == "ambiguous"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(redis.exceptions.ConnectionError("lost"), "ambiguous", id="connection"),
        pytest.param(
            redis.exceptions.ConnectionError("Error 111 connecting to localhost:6379."),
            "safe",
            id="connection-refused",
        ),
        pytest.param(redis.exceptions.TimeoutError("x"), "ambiguous", id="timeout"),
        pytest.param(redis.exceptions.BusyLoadingError("x"), "safe", id="busy-loading"),
        pytest.param(redis.exceptions.TryAgainError("x"), "safe", id="try-again"),
        pytest.param(redis.exceptions.ResponseError("WRONGTYPE"), "permanent", id="response"),
    ],
)
def test_classify_redis_errors(error: BaseException, kind: str) -> None:
    assert nk.classify(error) == kind


def test_an_exception_may_declare_its_own_kind() -> None:
    class Throttled(Exception):
        nodekit_kind = "safe"

    class Maybe(ValueError):
        nodekit_kind = "ambiguous"

    assert nk.classify(Throttled()) == "safe"
    assert nk.classify(Maybe()) == "ambiguous"


def test_nodekit_timeouts_and_busy_keys_are_classified() -> None:
    assert nk.classify(nk.NodeTimeout("x")) == "ambiguous"
    assert nk.classify(nk.IdempotencyInProgress("x")) == "safe"
    assert nk.classify(nk.IdempotencyStoreError("x")) == "safe"
    assert nk.classify(nk.UnsafeRetry("x")) == "permanent"


# ---------------------------------------------------------------------------- Retry-After


def test_parse_retry_after_values() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(3) == 3.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == 20.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(True) is None
    assert parse_retry_after(None) is None


def test_retry_after_reads_the_attribute_then_the_response_header() -> None:
    request = httpx.Request("GET", "https://example.com/")
    response = httpx.Response(429, headers={"retry-after": "9"}, request=request)
    error = httpx.HTTPStatusError("429", request=request, response=response)
    assert retry_after(error) == 9.0
    assert retry_after(status_error(429)) is None
    assert retry_after(ValueError()) is None

    class Slow(Exception):
        retry_after = 4

    assert retry_after(Slow()) == 4.0


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"timeout": nk.Timeout(attempt=1e10)}, "timeout.attempt"),
        ({"timeout": nk.Timeout(total=1e10)}, "timeout.total"),
        ({"retry": nk.Retry(max_wait=1e12)}, "retry.max_wait"),
        ({"idempotency": nk.Idempotency(ttl=1e16)}, "idempotency.ttl"),
        ({"idempotency": nk.Idempotency(lease=1e16)}, "idempotency.lease"),
    ],
)
def test_a_duration_no_platform_or_store_can_hold_fails_at_decoration(
    options: dict[str, Any], option: str
) -> None:
    """`Timeout(attempt=1e10)` used to pass decoration and overflow after the effect began;
    a TTL of 1e16 s made a Redis key expire at once: both are `ConfigError`s up front."""
    with pytest.raises(nk.ConfigError, match="longer than nodekit can wait") as caught:
        nk.node(name="charge", **options)(lambda order: order)
    assert caught.value.option == option
    assert caught.value.node == "charge"
