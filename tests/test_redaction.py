"""Nothing secret in events or logs: exception text passes one redactor, on one line, bounded."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from pydantic import BaseModel
from structlog.testing import LogCapture

import nodekit as nk
from nodekit._redact import error_text, redact
from nodekit._runtime import RUNTIME
from nodekit.testing import Events, FaultPlan, LocalAPI, capture_events, instant

SECRET = "SECRET123"
CARD = "4242424242424242"


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def api() -> Iterator[LocalAPI]:
    with LocalAPI(faults=FaultPlan(rate=0.0)) as server:
        yield server


def event_text(events: Events) -> str:
    """Everything the events would log: their error text and loggable fields."""
    return "\n".join(f"{event.name} {event.error} {event.as_dict()}" for event in events)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        f"{record.getMessage()} {getattr(record, 'nodekit', '')}"
        for record in caplog.records
        if record.name == "nodekit"
    )


def failing_read(url: str) -> Any:
    @nk.node(name="quote", effect=nk.Effect.READ, retry=nk.Retry(attempts=2, jitter=0))
    def quote() -> int:
        response = httpx.get(url, timeout=2)
        response.raise_for_status()
        return response.status_code

    return quote


# ---------------------------------------------------------------------------- URLs


def test_an_api_key_in_an_httpx_error_url_never_reaches_events_or_stdlib_logs(
    api: LocalAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx's own ``raise_for_status()`` message names the URL with its query string."""
    caplog.set_level(logging.DEBUG, logger="nodekit")
    quote = failing_read(f"{api.url}/status/503?api_key={SECRET}&currency=EUR")
    with instant(), capture_events() as events, pytest.raises(httpx.HTTPStatusError) as info:
        quote()
    assert SECRET in str(info.value), "the user's own exception is untouched"
    assert [e.name for e in events if e.level >= logging.WARNING] == [
        "node.retrying",
        "node.failed",
    ]
    failed = events.named("node.failed")[0]
    assert failed.error is not None
    assert "api_key=***&currency=EUR" in failed.error
    assert "\n" not in failed.error
    assert SECRET not in event_text(events)
    logged = log_text(caplog)
    assert "node.failed" in logged
    assert SECRET not in logged


def test_an_api_key_in_an_httpx_error_url_never_reaches_structlog(api: LocalAPI) -> None:
    capture = LogCapture()
    structlog.configure(processors=[capture])
    quote = failing_read(f"{api.url}/status/404?token={SECRET}")
    with instant(), pytest.raises(httpx.HTTPStatusError):
        quote()
    failed = [entry for entry in capture.entries if entry["event"] == "node.failed"]
    assert len(failed) == 1
    assert "token=***" in failed[0]["error"]
    assert SECRET not in repr(capture.entries)


@pytest.mark.parametrize(
    ("message", "hidden", "shown"),
    [
        (
            "could not connect to postgresql://app:hunter2@db.internal:5432/orders",
            "hunter2",
            "postgresql://app:***@db.internal:5432/orders",
        ),
        ("dsn postgresql://app:p@ss@db/x failed", "p@ss", "postgresql://app:***@db/x"),
        ("redis://:hunter2@cache:6379/0 is down", "hunter2", "redis://:***@cache:6379/0"),
        ("host=db user=app password=hunter2 dbname=x", "hunter2", "password=*** dbname=x"),
        ("conninfo: password='hunter 2' host=db", "hunter 2", "password=*** host=db"),
        ("GET https://x.io/cb?code=abc123&state=ok", "abc123", "code=***&state=ok"),
        ("https://s3/o?X-Amz-Signature=deadbeef01&x-id=Get", "deadbeef01", "Signature=***&x-id"),
        ("headers {'Authorization': 'Bearer tok-123'}", "tok-123", "'Authorization': 'Bearer ***"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("Authorization: Token abcdef", "abcdef", "Authorization: Token ***"),
        ("upstream said bearer abc.def-ghi", "abc.def-ghi", "bearer ***"),
        ("{'api_key': 'k-123', 'n': 1}", "k-123", "'api_key': ***, 'n': 1"),
        ("client_secret=s3cr3t&grant_type=x", "s3cr3t", "client_secret=***&grant_type=x"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "eyJzdWIiOiIxIn0", "jwt ***"),
    ],
)
def test_secrets_in_error_text_are_masked(message: str, hidden: str, shown: str) -> None:
    text = error_text(RuntimeError(message))
    assert hidden not in text
    assert shown in text


def test_plain_words_are_left_alone() -> None:
    """The patterns need a secret's shape: ordinary error text stays readable."""
    message = 'password authentication failed for user "app"; token expired; key not found'
    assert redact(message) == message


def test_a_dsn_password_in_a_node_error_is_masked_in_events_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nodekit")

    @nk.node(name="connect", retry=None)
    def connect() -> None:
        raise ConnectionError("cannot reach postgresql://app:hunter2@db:5432/orders")

    with capture_events() as events, pytest.raises(ConnectionError):
        connect()
    assert "postgresql://app:***@db:5432/orders" in (events.named("node.failed")[0].error or "")
    assert "hunter2" not in event_text(events)
    assert "hunter2" not in log_text(caplog)


# ---------------------------------------------------------------------------- pydantic


class Payment(BaseModel):
    amount: int = 0
    card: int = 0


def test_a_flow_validation_error_never_shows_the_input_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nodekit")
    flow = nk.Flow("pay", state=Payment)
    flow.add(lambda: {"card": f"bad-{CARD}"}, name="read_card")
    with capture_events() as events, pytest.raises(nk.FlowError) as info:
        flow.run({"amount": 3})
    failed = events.named("flow.failed")
    assert failed
    assert "input_value=<redacted>" in (failed[0].error or "")
    assert CARD not in event_text(events)
    assert CARD not in log_text(caplog)
    assert CARD not in str(info.value), "nodekit's own FlowError message is redacted too"
    assert "\n" not in str(info.value)


def test_pydantic_input_values_of_any_shape_are_redacted() -> None:
    from pydantic import ValidationError

    class Model(BaseModel):
        n: int
        tags: list[int]

    with pytest.raises(ValidationError) as info:
        Model.model_validate({"n": {"pan": CARD}, "tags": [f"x{CARD}"]})
    text = error_text(info.value, limit=1000)
    assert CARD not in text
    assert text.count("input_value=<redacted>") == 2
    assert "errors.pydantic.dev" not in text


# ---------------------------------------------------------------------------- shape


def test_multi_line_messages_become_one_line() -> None:
    text = error_text(ValueError("first line\n  second line\r\n\nthird"))
    assert text == "ValueError: first line; second line; third"


def test_error_text_is_bounded() -> None:
    text = error_text(ValueError("x" * 10_000))
    assert len(text) == 200
    assert text.endswith("…")


def test_a_secret_past_the_cut_never_shows() -> None:
    """Text is cut before the patterns run on a huge message; a cut secret is not shown."""
    message = "input_value=" + "a" * 9000 + " postgresql://u:" + "hunter2" * 50 + "@db/x"
    text = error_text(ValueError(message), limit=100_000)
    assert "hunter2" not in text


def test_an_unprintable_exception_still_has_a_line() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_text(Odd()) == "Odd: <unprintable message>"


# ---------------------------------------------------------------------------- add_redactor


def test_a_users_redactor_applies_and_reset_removes_it() -> None:
    nk.add_redactor(lambda text: re.sub(r"acct_\d+", "acct_***", text))
    try:

        @nk.node(name="bill", retry=None)
        def bill() -> None:
            raise RuntimeError("account acct_991122 is frozen")

        with capture_events() as events, pytest.raises(RuntimeError):
            bill()
        assert events.named("node.failed")[0].error == "RuntimeError: account acct_*** is frozen"
    finally:
        RUNTIME.reset()
    assert RUNTIME.redactors == ()
    assert error_text(RuntimeError("acct_991122")) == "RuntimeError: acct_991122"


def test_add_redactor_returns_a_remover() -> None:
    remove = nk.add_redactor(lambda text: text.replace("blue", "****"))
    try:
        assert redact("blue sky") == "**** sky"
    finally:
        remove()
    assert redact("blue sky") == "blue sky"


def test_a_broken_redactor_withholds_the_whole_message() -> None:
    def broken(text: str) -> str:
        raise KeyError(text)

    remove = nk.add_redactor(broken)
    try:
        text = error_text(RuntimeError("customer 42 secret stuff"))
    finally:
        remove()
    assert "customer 42" not in text
    assert "withheld" in text
    assert "broken" in text


def test_add_redactor_refuses_a_non_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        nk.add_redactor("acct_")  # type: ignore[arg-type]


def test_redaction_runs_only_on_the_failure_path() -> None:
    calls: list[str] = []

    def counting(text: str) -> str:
        calls.append(text)
        return text

    @nk.node(name="fine", effect=nk.Effect.READ)
    def fine() -> int:
        return 1

    @nk.node(name="broken", retry=None)
    def broken() -> int:
        raise ValueError("nope")

    remove = nk.add_redactor(counting)
    try:
        with capture_events():
            assert fine() == 1
        assert calls == []
        with capture_events(), pytest.raises(ValueError, match="nope"):
            broken()
        assert calls
    finally:
        remove()


def test_an_unknown_store_url_is_refused_without_its_password() -> None:
    with pytest.raises(nk.ConfigError) as raised:
        nk.open_store("mysql://app:hunter2@db.internal/orders")
    assert "hunter2" not in str(raised.value)
    assert "mysql://app:***@db.internal/orders" in str(raised.value)


def test_nodekits_own_error_messages_redact_the_error_they_quote() -> None:
    """An error nodekit raises itself (here `UnsafeRetry`, quoting the ambiguous error that
    stopped a WRITE) carries the quoted text redacted and on one line."""

    @nk.node(name="charge-plain", effect=nk.Effect.WRITE, retry=nk.Retry(attempts=3))
    def charge() -> None:
        raise ConnectionResetError("reset by https://pay.example/charge?api_key=SECRET123\nline 2")

    with pytest.raises(nk.UnsafeRetry) as raised:
        charge()
    text = str(raised.value)
    assert "SECRET123" not in text
    assert "api_key=***" in text
    assert "\n" not in text
