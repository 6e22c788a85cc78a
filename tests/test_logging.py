"""Polite logging: nodekit configures nothing, logs its events where the application listens."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import LogCapture, capture_logs

import nodekit as nk
import nodekit._events
from nodekit.testing import Flaky, instant

RETRY = nk.Retry(attempts=3, initial=0.1, jitter=0)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Every test starts and ends with structlog unconfigured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_importing_and_using_nodekit_configures_no_logging() -> None:
    """Run in a fresh interpreter so that the import itself is observed."""
    code = textwrap.dedent(
        """
        import logging
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        import structlog
        import nodekit as nk
        from nodekit.testing import instant

        @nk.node(retry=nk.Retry(attempts=2), effect=nk.Effect.READ)
        def flaky():
            raise ConnectionResetError("reset")

        with instant():
            try:
                flaky()
            except ConnectionResetError:
                pass
        assert (list(root.handlers), root.level) == before, "root logger changed"
        own = logging.getLogger("nodekit")
        assert own.level == logging.NOTSET, own.level
        assert [type(h).__name__ for h in own.handlers] == ["NullHandler"], own.handlers
        assert own.propagate
        assert not structlog.is_configured(), "structlog configured"
        print("clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
    assert result.stderr == "", "nothing is printed unless the application asks"


def test_using_nodes_leaves_logging_and_structlog_untouched() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, list(logging.getLogger("nodekit").handlers))
    call = nk.node(retry=RETRY, effect=nk.Effect.READ)(Flaky([TimeoutError], result=1))
    with instant():
        assert call() == 1
    after = (list(root.handlers), root.level, list(logging.getLogger("nodekit").handlers))
    assert after == before
    assert not structlog.is_configured()


# ---------------------------------------------------------------------------- stdlib logging


def nodekit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "nodekit"]


def test_per_call_events_are_quiet_unless_enabled(caplog: pytest.LogCaptureFixture) -> None:
    assert nk.node(lambda: 1)() == 1
    assert nodekit_records(caplog) == []


def test_events_go_to_the_nodekit_logger_when_enabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nodekit")
    call = nk.node(retry=RETRY, effect=nk.Effect.READ, name="fetch")(
        Flaky([TimeoutError("slow")], result=1)
    )
    with instant():
        assert call() == 1
    records = nodekit_records(caplog)
    assert [record.getMessage().split()[0] for record in records] == [
        "node.started",
        "node.retrying",
        "node.succeeded",
    ]
    assert [record.levelno for record in records] == [logging.DEBUG, logging.WARNING, logging.DEBUG]
    retrying = records[1]
    assert "node=fetch" in retrying.getMessage()
    assert "wait=0.1" in retrying.getMessage()
    fields: dict[str, Any] = retrying.nodekit  # type: ignore[attr-defined]
    assert fields["node"] == "fetch"
    assert fields["attempt"] == 1
    assert fields["error"] == "TimeoutError: slow"


async def test_events_go_to_the_nodekit_logger_when_enabled_async(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="nodekit")
    call = nk.node(retry=RETRY, name="fetch")(Flaky([ValueError("bad")]).async_())
    with pytest.raises(ValueError, match="bad"):
        await call()
    records = nodekit_records(caplog)
    assert [record.getMessage().split()[0] for record in records] == [
        "node.started",
        "node.failed",
    ]
    assert records[-1].levelno == logging.ERROR
    assert records[-1].nodekit["kind"] == "permanent"  # type: ignore[attr-defined]


def test_context_filter_adds_node_ids_to_the_users_own_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    caplog.handler.addFilter(nk.ContextFilter())
    log = logging.getLogger("app")

    @nk.node(retry=RETRY, effect=nk.Effect.READ, name="job")
    def job() -> str:
        log.info("working")
        if nk.context().attempt == 1:
            raise TimeoutError("slow")
        return nk.context().run_id

    try:
        with instant():
            run_id = job()
        log.info("outside")
    finally:
        caplog.handler.filters.clear()
    records = [record for record in caplog.records if record.name == "app"]
    assert [(r.node, r.run_id, r.attempt) for r in records] == [  # type: ignore[attr-defined]
        ("job", run_id, 1),
        ("job", run_id, 2),
        (None, None, None),
    ]


async def test_context_filter_adds_node_ids_to_the_users_own_records_async(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    caplog.handler.addFilter(nk.ContextFilter())

    @nk.node(name="job")
    async def job() -> str:
        logging.getLogger("app").info("working")
        return nk.context().run_id

    try:
        run_id = await job()
    finally:
        caplog.handler.filters.clear()
    (record,) = [record for record in caplog.records if record.name == "app"]
    assert (record.node, record.run_id, record.attempt) == ("job", run_id, 1)  # type: ignore[attr-defined]


def test_configure_logging_prints_events_for_applications() -> None:
    own = logging.getLogger("nodekit")
    saved = (list(own.handlers), own.level)
    stream = io.StringIO()
    try:
        nk.configure_logging(logging.DEBUG, stream=stream)
        nk.configure_logging(logging.DEBUG, stream=stream)  # idempotent: one handler
        nk.node(name="shown")(lambda: 1)()
    finally:
        own.handlers[:] = saved[0]
        own.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "node.started" in lines[0]
    assert "node=shown" in lines[1]


# ---------------------------------------------------------------------------- structlog

# The two ways a structlog chain gets node ids: nodekit's processor, which reads the running
# node's context when a line is logged (nothing per call), and structlog's merge_contextvars,
# for which nodekit binds the ids into contextvars on every call while the chain lacks the
# processor.
CHAINS: dict[str, list[Any]] = {
    "add_node_context": [nk.add_node_context],
    "merge_contextvars": [merge_contextvars],
    "both": [merge_contextvars, nk.add_node_context],
}


@pytest.fixture(params=list(CHAINS))
def chain(request: pytest.FixtureRequest) -> list[Any]:
    return CHAINS[request.param]


def ids(logs: list[dict[str, Any]], event: str = "charging") -> list[tuple[Any, ...]]:
    return [
        (entry.get("node"), entry.get("run_id"), entry.get("attempt"))
        for entry in logs
        if entry["event"] == event
    ]


def charge_node() -> Any:
    @nk.node(retry=RETRY, effect=nk.Effect.READ, name="charge")
    def charge() -> str:
        structlog.get_logger().info("charging")
        if nk.context().attempt == 1:
            raise TimeoutError("slow")
        return nk.context().run_id

    return charge


def acharge_node() -> Any:
    @nk.node(retry=RETRY, effect=nk.Effect.READ, name="charge")
    async def charge() -> str:
        structlog.get_logger().info("charging")
        if nk.context().attempt == 1:
            raise TimeoutError("slow")
        return nk.context().run_id

    return charge


@pytest.mark.parametrize("observed", [False, True])
def test_structlog_lines_inside_a_node_carry_node_run_id_and_attempt(
    chain: list[Any], observed: bool
) -> None:
    charge = charge_node()
    with instant(), capture_logs(processors=chain) as logs:
        if observed:
            with nk.testing.capture_events():
                run_id = charge()
        else:
            run_id = charge()
        structlog.get_logger().info("charging")
    assert ids(logs) == [("charge", run_id, 1), ("charge", run_id, 2), (None, None, None)]


@pytest.mark.parametrize("observed", [False, True])
async def test_structlog_lines_inside_a_node_carry_node_run_id_and_attempt_async(
    chain: list[Any], observed: bool
) -> None:
    charge = acharge_node()
    with instant(), capture_logs(processors=chain) as logs:
        if observed:
            with nk.testing.capture_events():
                run_id = await charge()
        else:
            run_id = await charge()
        structlog.get_logger().info("charging")
    assert ids(logs) == [("charge", run_id, 1), ("charge", run_id, 2), (None, None, None)]


def test_nested_nodes_log_their_own_node_and_attempt_under_one_run_id(chain: list[Any]) -> None:
    inner = charge_node()

    @nk.node(name="outer")
    def outer() -> str:
        structlog.get_logger().info("charging")
        inner()
        structlog.get_logger().info("charging")
        return nk.context().run_id

    with instant(), capture_logs(processors=chain) as logs:
        run_id = outer()
    assert ids(logs) == [
        ("outer", run_id, 1),
        ("charge", run_id, 1),
        ("charge", run_id, 2),
        ("outer", run_id, 1),
    ]


async def test_nested_nodes_log_their_own_node_and_attempt_under_one_run_id_async(
    chain: list[Any],
) -> None:
    inner = acharge_node()

    @nk.node(name="outer")
    async def outer() -> str:
        structlog.get_logger().info("charging")
        await inner()
        structlog.get_logger().info("charging")
        return nk.context().run_id

    with instant(), capture_logs(processors=chain) as logs:
        run_id = await outer()
    assert ids(logs) == [
        ("outer", run_id, 1),
        ("charge", run_id, 1),
        ("charge", run_id, 2),
        ("outer", run_id, 1),
    ]


async def test_concurrent_tasks_each_log_their_own_node(chain: list[Any]) -> None:
    def make(name: str) -> Any:
        @nk.node(name=name)
        async def step() -> str:
            structlog.get_logger().info("charging")
            await asyncio.sleep(0)
            structlog.get_logger().info("charging")
            return nk.context().run_id

        return step

    with capture_logs(processors=chain) as logs:
        a, b = await asyncio.gather(make("a")(), make("b")())
    assert sorted(ids(logs)) == [("a", a, 1), ("a", a, 1), ("b", b, 1), ("b", b, 1)]
    assert a != b


def _logging_flow() -> tuple[nk.Flow, list[str]]:
    seen: list[str] = []
    flow = nk.Flow("logged")

    @flow.node(retry=RETRY, effect=nk.Effect.READ)
    def fetch() -> dict[str, int]:
        structlog.get_logger().info("charging")
        seen.append(nk.context().run_id)
        if nk.context().attempt == 1:
            raise TimeoutError("slow")
        return {"x": 1}

    @flow.node(after=fetch)
    def store(x: int) -> dict[str, int]:
        structlog.get_logger().info("charging")
        seen.append(nk.context().run_id)
        return {"y": x + 1}

    return flow, seen


def test_flow_nodes_log_their_node_attempt_and_the_flows_run_id(chain: list[Any]) -> None:
    flow, seen = _logging_flow()
    with instant(), capture_logs(processors=chain) as logs:
        assert flow.run({}) == {"x": 1, "y": 2}
    run_id = seen[0]
    assert set(seen) == {run_id}
    assert ids(logs) == [("fetch", run_id, 1), ("fetch", run_id, 2), ("store", run_id, 1)]


async def test_flow_nodes_log_their_node_attempt_and_the_flows_run_id_async(
    chain: list[Any],
) -> None:
    flow, seen = _logging_flow()
    with instant(), capture_logs(processors=chain) as logs:
        assert await flow.arun({}) == {"x": 1, "y": 2}
    run_id = seen[0]
    assert set(seen) == {run_id}
    assert ids(logs) == [("fetch", run_id, 1), ("fetch", run_id, 2), ("store", run_id, 1)]


def test_structlog_context_reaches_a_sync_node_in_its_timeout_thread(chain: list[Any]) -> None:
    @nk.node(timeout=1, name="threaded")
    def threaded() -> str:
        structlog.get_logger().info("charging")
        return nk.context().run_id

    with capture_logs(processors=chain) as logs:
        run_id = threaded()
    assert ids(logs) == [("threaded", run_id, 1)]


def test_the_processor_keeps_values_the_line_already_has() -> None:
    with capture_logs(processors=[nk.add_node_context]) as logs:
        nk.node(name="n")(lambda: structlog.get_logger().info("charging", node="mine"))()
    assert logs[0]["node"] == "mine"
    assert logs[0]["attempt"] == 1


def bound_inside_a_node() -> dict[str, Any]:
    return nk.node(name="n")(structlog.contextvars.get_contextvars)()


def test_no_contextvars_are_bound_per_call_while_structlog_is_unconfigured() -> None:
    """structlog imported (by the application or a dependency) but not configured: the success
    path binds nothing."""
    assert not structlog.is_configured()
    assert bound_inside_a_node() == {}


def test_no_contextvars_are_bound_per_call_once_the_processor_is_in_the_chain() -> None:
    structlog.configure(processors=[merge_contextvars, nk.add_node_context, LogCapture()])
    assert bound_inside_a_node() == {}
    structlog.configure(processors=[merge_contextvars, LogCapture()])
    assert bound_inside_a_node() == {"node": "n", "run_id": ANY, "attempt": 1}
    structlog.reset_defaults()
    assert bound_inside_a_node() == {}


def test_the_binding_decision_reads_structlogs_public_api_when_its_internals_move() -> None:
    binds = nodekit._events._Binding()
    binds.config = nodekit._events._PublicConfig(structlog)
    assert binds() is False
    structlog.configure(processors=[merge_contextvars, LogCapture()])
    assert binds() is True
    structlog.configure(processors=[nk.add_node_context, LogCapture()])
    assert binds() is False


def test_nodekit_events_go_to_structlog_when_the_application_configured_it(
    caplog: pytest.LogCaptureFixture, chain: list[Any]
) -> None:
    capture = LogCapture()
    structlog.configure(processors=[*chain, capture])
    with instant():
        charge_node()()
    retrying = [entry for entry in capture.entries if entry["event"] == "node.retrying"]
    assert len(retrying) == 1
    assert retrying[0]["log_level"] == "warning"
    assert retrying[0]["node"] == "charge"
    assert retrying[0]["attempt"] == 1
    assert retrying[0]["wait"] == 0.1
    assert retrying[0]["error"] == "TimeoutError: slow"
    assert nodekit_records(caplog) == [], "not logged twice"


async def test_nodekit_events_go_to_structlog_when_configured_async(chain: list[Any]) -> None:
    capture = LogCapture()
    structlog.configure(processors=[*chain, capture])
    with instant():
        await acharge_node()()
    assert [entry["event"] for entry in capture.entries].count("node.retrying") == 1


def test_a_configured_structlog_chain_gets_node_ids_in_user_lines(chain: list[Any]) -> None:
    structlog.configure(processors=[*chain, capture := LogCapture()])
    with instant():
        run_id = charge_node()()
    assert ids(capture.entries) == [("charge", run_id, 1), ("charge", run_id, 2)]


async def test_a_configured_structlog_chain_gets_node_ids_in_user_lines_async(
    chain: list[Any],
) -> None:
    structlog.configure(processors=[*chain, capture := LogCapture()])
    with instant():
        run_id = await acharge_node()()
    assert ids(capture.entries) == [("charge", run_id, 1), ("charge", run_id, 2)]


def test_users_own_contextvars_are_kept_and_restored(chain: list[Any]) -> None:
    with capture_logs(processors=[merge_contextvars, *chain]) as logs:
        structlog.contextvars.bind_contextvars(request_id="r1")
        try:
            nk.node(name="n")(lambda: structlog.get_logger().info("charging"))()
            structlog.get_logger().info("after")
        finally:
            structlog.contextvars.clear_contextvars()
    inside, after = logs
    assert (inside["request_id"], inside["node"]) == ("r1", "n")
    assert after["request_id"] == "r1"
    assert "node" not in after
