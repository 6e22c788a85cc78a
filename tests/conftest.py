"""Shared fixtures: real services (PostgreSQL, Redis) with a clean namespace per test."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

POSTGRES_URL = os.environ.get(
    "NODEKIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("NODEKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("NODEKIT_REQUIRE_SERVICES") == "1"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1
        ):
            return True
    except OSError:
        return False


def _need(url: str, what: str) -> None:
    if _reachable(url):
        return
    message = f"{what} is not reachable at {url}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and NODEKIT_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"{message} (set NODEKIT_TEST_* to point at one)")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server's URL (skips, or fails in CI, when it is down)."""
    _need(POSTGRES_URL, "PostgreSQL")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis server's URL (skips, or fails in CI, when it is down)."""
    _need(REDIS_URL, "Redis")
    return REDIS_URL


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    import psycopg

    schema = f"nk_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh Redis key prefix for one test; its keys are deleted afterwards."""
    import redis

    prefix = f"nk-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture(autouse=True)
def _no_abandoned_attempts_leak() -> Iterator[None]:
    """Wait (briefly) for sync attempts a test abandoned at their timeout to finish.

    Their late `node.abandoned_finished` events would otherwise land in the next test's
    `capture_events()`: event capture is process-wide, by design.
    """
    import threading
    import time

    yield
    deadline = time.monotonic() + 5.0
    for thread in threading.enumerate():
        if thread.name.startswith("nodekit:") and thread.name != "nodekit:heartbeat":
            thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------- secret scan

# Secrets the tests plant in URLs, DSNs, headers, payloads and error messages. Every event
# nodekit builds (what sinks, stdlib logging and structlog receive) and every log record of
# the whole session is scanned for them; the session fails if one shows.
PLANTED_SECRETS = (
    "hunter2",
    "s3cret",
    "s3cr3t",
    "sk_live_4242",
    "SECRET123",
    "4242424242424242",
    "nk-canary-7f3a",
)


class _SecretScan(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.found: list[str] = []
        self.current = "(collection)"

    def check(self, where: str, text: str) -> None:
        for secret in PLANTED_SECRETS:
            if secret in text:
                self.found.append(f"{self.current}: {where}: {secret!r} in {text[:300]!r}")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            return
        self.check(f"log {record.name}", text)


SCAN = _SecretScan()


def pytest_sessionstart(session: pytest.Session) -> None:
    import nodekit._events as events

    class Scanned(events.Event):
        __slots__ = ()

        def __init__(self, **fields: Any) -> None:
            super().__init__(**fields)
            SCAN.check(f"event {self.name}", json.dumps(self.as_dict(), default=str))

    events.Event = Scanned  # type: ignore[misc]  # emit() builds its events through it
    logging.getLogger().addHandler(SCAN)


def pytest_runtest_setup(item: pytest.Item) -> None:
    SCAN.current = item.nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(SCAN)
    if SCAN.found:
        lines = "\n".join(SCAN.found[:20])
        sys.stderr.write(f"\nplanted secrets reached events or logs:\n{lines}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
