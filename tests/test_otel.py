"""OpenTelemetry: spans for calls, attempts and flow runs, nested where they ran; metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import nodekit as nk
from nodekit import otel
from nodekit import testing as nk_testing
from nodekit._runtime import RUNTIME
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import Flaky, LocalAPI, instant

RETRY = nk.Retry(attempts=5, initial=0.1, multiplier=2, jitter=0)


class Telemetry:
    """An SDK tracer and meter provider with in-memory exporters, instrumented."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.named(name)
        return span

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [
            span
            for span in self.spans
            if span.parent is not None and span.parent.span_id == parent.context.span_id
        ]

    def points(self, metric: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """Each data point of `metric` by its attributes: a counter's value, a histogram's
        (count, sum)."""
        data = self.reader.get_metrics_data()
        out: dict[frozenset[tuple[str, Any]], Any] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for found in scope.metrics:
                    if found.name != metric:
                        continue
                    for point in found.data.data_points:
                        labels = frozenset((point.attributes or {}).items())
                        if hasattr(point, "value"):
                            out[labels] = point.value
                        else:
                            out[labels] = (point.count, point.sum)
        return out


def labels(**values: Any) -> frozenset[tuple[str, Any]]:
    return frozenset((f"nodekit.{key.replace('_', '.')}", value) for key, value in values.items())


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    kit = Telemetry()
    otel.instrument(tracer_provider=kit.tracer_provider, meter_provider=kit.meter_provider)
    try:
        yield kit
    finally:
        otel.uninstrument()


# ---------------------------------------------------------------------------- install


def test_importing_nodekit_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, nodekit, nodekit.http\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_instrument_installs_a_hook_and_a_sink_and_uninstrument_removes_both() -> None:
    kit = Telemetry()
    sinks = RUNTIME.sinks
    otel.instrument(tracer_provider=kit.tracer_provider, meter_provider=kit.meter_provider)
    assert otel.instrumented()
    assert RUNTIME.tracer is not None
    assert len(RUNTIME.sinks) == len(sinks) + 1
    # instrumenting again replaces, never stacks
    otel.instrument(tracer_provider=kit.tracer_provider, meter_provider=kit.meter_provider)
    assert len(RUNTIME.sinks) == len(sinks) + 1
    otel.uninstrument()
    assert not otel.instrumented()
    assert RUNTIME.tracer is None
    assert RUNTIME.sinks == sinks
    otel.uninstrument()  # twice is harmless


def test_uninstrument_stops_spans_and_metrics(telemetry: Telemetry) -> None:
    @nk.node(name="ping", effect=nk.Effect.READ)
    def ping() -> str:
        return "pong"

    ping()
    assert [span.name for span in telemetry.spans] == ["ping attempt", "ping"]
    otel.uninstrument()
    ping()
    ping()
    assert len(telemetry.spans) == 2
    assert telemetry.points("nodekit.node.calls") == {labels(node="ping", effect="read"): 1}


def test_reset_defaults_ends_the_instrumentation(telemetry: Telemetry) -> None:
    nk_testing.reset_defaults()
    assert not otel.instrumented()


class RecordingTracer:
    """A hook that records what the drivers ask of it and runs what it is given."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def call_sync(self, drive: Any, spec: Any, ctx: Any, args: Any, kwargs: Any) -> Any:
        self.asked.append("call")
        return drive(spec, ctx, args, kwargs)

    async def call_async(self, drive: Any, spec: Any, ctx: Any, args: Any, kwargs: Any) -> Any:
        self.asked.append("call")
        return await drive(spec, ctx, args, kwargs)

    def attempt_sync(self, attempt: Any, spec: Any, ctx: Any, args: Any, kwargs: Any) -> Any:
        self.asked.append("attempt")
        return attempt(spec, ctx, args, kwargs)

    async def attempt_async(self, attempt: Any, spec: Any, ctx: Any, args: Any, kwargs: Any) -> Any:
        self.asked.append("attempt")
        return await attempt(spec, ctx, args, kwargs)

    def start_flow(self, flow: str, run_id: str, mode: str) -> Any:
        self.asked.append("flow")
        return lambda: None


async def test_a_plain_node_never_reads_the_hook_while_nobody_listens() -> None:
    """The fast path of an uninstrumented node stays as it was: the hook alone does nothing;
    `instrument()` works because it also adds a sink."""
    hook = RecordingTracer()
    RUNTIME.tracer = hook

    @nk.node(name="plain", effect=nk.Effect.READ)
    def plain() -> int:
        return 1

    @nk.node(name="plain_async", effect=nk.Effect.READ)
    async def plain_async() -> int:
        return 1

    assert plain() == 1
    assert await plain_async() == 1
    assert hook.asked == []
    with nk_testing.capture_events():
        assert plain() == 1
        assert await plain_async() == 1
    assert hook.asked == ["call", "attempt"] * 2


# ---------------------------------------------------------------------------- node calls


def check_retried_call(telemetry: Telemetry, name: str, waits: list[float]) -> None:
    call = telemetry.one(name)
    assert call.parent is None
    assert attrs(call) == {
        "nodekit.node": name,
        "nodekit.effect": "read",
        "nodekit.run_id": attrs(call)["nodekit.run_id"],
        "nodekit.outcome": "success",
        "nodekit.attempts": 3,
        "nodekit.replayed": False,
    }
    assert call.status.status_code is StatusCode.UNSET
    attempts = telemetry.children(call)
    assert [span.name for span in attempts] == [f"{name} attempt"] * 3
    assert [attrs(span)["nodekit.attempt"] for span in attempts] == [1, 2, 3]
    assert [attrs(span)["nodekit.outcome"] for span in attempts] == [
        "failure",
        "failure",
        "success",
    ]
    for failed in attempts[:2]:
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.status.description == "ConnectionResetError: reset by peer"
        assert attrs(failed)["nodekit.error.kind"] == "ambiguous"
        assert attrs(failed)["error.type"] == "ConnectionResetError"
    # each wait is a span event on the call, between the attempts it separates
    retries = [event for event in call.events if event.name == "node.retrying"]
    assert [dict(event.attributes or {})["nodekit.wait"] for event in retries] == waits
    assert [dict(event.attributes or {})["nodekit.attempt"] for event in retries] == [1, 2]
    assert dict(retries[0].attributes or {})["nodekit.error.kind"] == "ambiguous"
    for event, before, after in zip(retries, attempts, attempts[1:], strict=False):
        assert before.end_time is not None
        assert after.start_time is not None
        assert before.end_time <= event.timestamp <= after.start_time


def test_a_retried_call_is_a_span_with_a_child_span_per_attempt(telemetry: Telemetry) -> None:
    flaky = Flaky([ConnectionResetError("reset by peer")] * 2, result=7)

    @nk.node(name="fetch", effect=nk.Effect.READ, retry=RETRY)
    def fetch() -> int:
        return flaky()  # type: ignore[no-any-return]

    with instant() as waits:
        assert fetch() == 7
    assert waits.sleeps == [0.1, 0.2]
    check_retried_call(telemetry, "fetch", waits.sleeps)


async def test_a_retried_call_is_a_span_with_a_child_span_per_attempt_async(
    telemetry: Telemetry,
) -> None:
    flaky = Flaky([ConnectionResetError("reset by peer")] * 2, result=7)

    @nk.node(name="fetch_async", effect=nk.Effect.READ, retry=RETRY)
    async def fetch_async() -> int:
        return await flaky.async_()()  # type: ignore[no-any-return]

    with instant() as waits:
        assert await fetch_async() == 7
    check_retried_call(telemetry, "fetch_async", waits.sleeps)


def test_a_failed_call_has_error_status_kind_and_redacted_text(telemetry: Telemetry) -> None:
    @nk.node(name="lookup", effect=nk.Effect.READ, retry=RETRY)
    def lookup() -> None:
        raise ValueError("bad row from postgresql://admin:hunter2@db/orders")

    with pytest.raises(ValueError, match="hunter2"):
        lookup()
    call = telemetry.one("lookup")
    assert call.status.status_code is StatusCode.ERROR
    assert "hunter2" not in (call.status.description or "")
    assert "ValueError" in (call.status.description or "")
    assert attrs(call)["nodekit.outcome"] == "failure"
    assert attrs(call)["nodekit.error.kind"] == "permanent"
    assert attrs(call)["nodekit.attempts"] == 1
    for span in telemetry.spans:
        everything = [*attrs(span).values(), span.status.description]
        everything += [
            value for event in span.events for value in (event.attributes or {}).values()
        ]
        assert not any("hunter2" in str(value) for value in everything)


def test_a_nested_node_call_is_a_child_of_the_attempt_that_made_it(telemetry: Telemetry) -> None:
    @nk.node(name="inner", effect=nk.Effect.READ)
    def inner() -> int:
        return 1

    @nk.node(name="outer", effect=nk.Effect.READ)
    def outer() -> int:
        return inner() + 1

    assert outer() == 2
    outer_attempt = telemetry.one("outer attempt")
    (child,) = telemetry.children(outer_attempt)
    assert child.name == "inner"
    assert attrs(child)["nodekit.run_id"] == attrs(telemetry.one("outer"))["nodekit.run_id"]
    assert telemetry.one("outer attempt").parent.span_id == telemetry.one("outer").context.span_id  # type: ignore[union-attr]


def test_the_attempt_span_is_current_in_the_timeout_worker_thread(telemetry: Telemetry) -> None:
    seen: list[tuple[str, int]] = []

    @nk.node(name="threaded", effect=nk.Effect.READ, timeout=5.0)
    def threaded() -> None:
        seen.append(
            (threading.current_thread().name, trace.get_current_span().get_span_context().span_id)
        )

    threaded()
    ((thread, span_id),) = seen
    assert thread.startswith("nodekit:")
    assert span_id == telemetry.one("threaded attempt").context.span_id


def test_map_items_run_in_worker_threads_nest_under_the_calling_attempt(
    telemetry: Telemetry,
) -> None:
    @nk.node(name="square", effect=nk.Effect.READ)
    def square(x: int) -> int:
        return x * x

    @nk.node(name="batch", effect=nk.Effect.READ)
    def batch() -> list[int]:
        return square.map([1, 2, 3], concurrency=3).unwrap()

    assert batch() == [1, 4, 9]
    children = telemetry.children(telemetry.one("batch attempt"))
    assert [span.name for span in children] == ["square"] * 3


async def test_a_cancelled_call_is_not_a_failure(telemetry: Telemetry) -> None:
    started = asyncio.Event()

    @nk.node(name="slow", effect=nk.Effect.READ)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    call = telemetry.one("slow")
    assert attrs(call)["nodekit.outcome"] == "cancelled"
    assert call.status.status_code is StatusCode.UNSET
    assert attrs(telemetry.one("slow attempt"))["nodekit.outcome"] == "cancelled"


def test_a_keyed_replay_is_a_span_marked_replayed_with_the_key_fingerprint(
    telemetry: Telemetry,
) -> None:
    runs = []

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: f"secret-{order}"))
    def charge(order: str) -> int:
        runs.append(order)
        return 42

    assert charge("o-1") == 42
    assert charge("o-1") == 42
    assert runs == ["o-1"]
    first, second = telemetry.named("charge")
    assert attrs(first)["nodekit.replayed"] is False
    assert attrs(first)["nodekit.attempts"] == 1
    assert attrs(second)["nodekit.replayed"] is True
    assert attrs(second)["nodekit.outcome"] == "success"
    assert attrs(second)["nodekit.attempts"] == 0
    assert telemetry.children(second) == []  # nothing ran: no attempt
    fingerprint = attrs(second)["nodekit.key_fingerprint"]
    assert len(fingerprint) == 12
    assert fingerprint == attrs(first)["nodekit.key_fingerprint"]
    assert [event.name for event in second.events] == ["idempotency.replayed", "node.replayed"]
    for span in telemetry.spans:
        values = [*attrs(span).values()]
        values += [value for event in span.events for value in (event.attributes or {}).values()]
        assert not any("secret-o-1" in str(value) for value in values)
    assert telemetry.points("nodekit.node.replays") == {labels(node="charge", source="store"): 1}


# ---------------------------------------------------------------------------- flows


def failing_flow() -> nk.Flow:
    flow = nk.Flow("orders")

    @flow.node(output="order")
    def load() -> str:
        return "o-1"

    @flow.node(after=load)
    def ship(order: str) -> None:
        raise LookupError(f"no address for {order}")

    return flow


def check_failed_flow(telemetry: Telemetry, mode: str) -> None:
    run = telemetry.one("flow orders")
    assert run.parent is None
    assert run.status.status_code is StatusCode.ERROR
    assert "LookupError" in (run.status.description or "")
    assert attrs(run)["nodekit.flow"] == "orders"
    assert attrs(run)["nodekit.flow.mode"] == mode
    assert attrs(run)["nodekit.outcome"] == "failure"
    assert attrs(run)["nodekit.flow.failed_node"] == "ship"
    load, ship = telemetry.children(run)
    assert (load.name, ship.name) == ("load", "ship")
    for node in (load, ship):
        assert attrs(node)["nodekit.flow"] == "orders"
        assert attrs(node)["nodekit.run_id"] == attrs(run)["nodekit.run_id"]
    assert load.status.status_code is StatusCode.UNSET
    assert ship.status.status_code is StatusCode.ERROR
    assert attrs(ship)["nodekit.error.kind"] == "permanent"
    assert [span.name for span in telemetry.children(ship)] == ["ship attempt"]
    assert telemetry.points("nodekit.flow.runs") == {labels(flow="orders", outcome="failure"): 1}


def test_a_flow_run_is_the_parent_span_of_its_nodes(telemetry: Telemetry) -> None:
    with pytest.raises(nk.FlowError):
        failing_flow().run(run_id="r-1")
    check_failed_flow(telemetry, "sync")
    assert attrs(telemetry.one("flow orders"))["nodekit.run_id"] == "r-1"


async def test_a_flow_run_is_the_parent_span_of_its_nodes_async(telemetry: Telemetry) -> None:
    with pytest.raises(nk.FlowError):
        await failing_flow().arun()
    check_failed_flow(telemetry, "async")


def test_async_nodes_of_a_sync_run_nest_under_it_from_the_loop_thread(
    telemetry: Telemetry,
) -> None:
    flow = nk.Flow("mixed")

    @flow.node(output="a")
    async def fetch_a() -> int:
        return 1

    @flow.node(after=fetch_a, output="b")
    def double(a: int) -> int:
        return 2 * a

    assert flow.run()["b"] == 2
    run = telemetry.one("flow mixed")
    assert [span.name for span in telemetry.children(run)] == ["fetch_a", "double"]
    assert [span.name for span in telemetry.children(telemetry.one("fetch_a"))] == [
        "fetch_a attempt"
    ]


async def test_parallel_nodes_of_an_async_run_all_nest_under_it(telemetry: Telemetry) -> None:
    flow = nk.Flow("fan")

    @flow.node(output="a")
    async def left() -> int:
        await asyncio.sleep(0.01)
        return 1

    @flow.node(output="b")
    def right() -> int:  # a sync node: a worker thread
        return 2

    @flow.node(after=[left, right], output="c")
    async def join(a: int, b: int) -> int:
        return a + b

    state = await flow.arun()
    assert state["c"] == 3
    run = telemetry.one("flow fan")
    assert attrs(run)["nodekit.outcome"] == "success"
    assert run.status.status_code is StatusCode.UNSET
    assert sorted(span.name for span in telemetry.children(run)) == ["join", "left", "right"]


def test_a_resumed_run_shows_journaled_nodes_as_replayed_spans(
    telemetry: Telemetry, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "journal.db")
    try:
        with pytest.raises(nk.FlowError):
            failing_flow().run(run_id="r-2", store=store)
        telemetry.exporter.clear()
        with pytest.raises(nk.FlowError):
            failing_flow().run(run_id="r-2", store=store)
    finally:
        store.close()
    run = telemetry.one("flow orders")
    load, ship = telemetry.children(run)
    assert load.name == "load"
    assert attrs(load)["nodekit.replayed"] is True
    assert attrs(load)["nodekit.source"] == "journal"
    assert telemetry.children(load) == []
    assert ship.name == "ship"
    assert attrs(ship)["nodekit.replayed"] is False


# ---------------------------------------------------------------------------- httpx


def test_httpx_spans_nest_under_the_attempt_that_sent_them(telemetry: Telemetry) -> None:
    with LocalAPI() as api, httpx.Client(base_url=api.url) as client:
        HTTPXClientInstrumentor().instrument_client(
            client, tracer_provider=telemetry.tracer_provider
        )

        @nk.node(name="status", effect=nk.Effect.READ, retry=RETRY)
        def status() -> int:
            response = client.get("/status/200")
            response.raise_for_status()
            return response.status_code

        api.fail_next("503")
        with instant():
            assert status() == 200
    first, second = telemetry.named("status attempt")
    for attempt in (first, second):
        (request,) = telemetry.children(attempt)
        assert request.kind is trace.SpanKind.CLIENT
        assert request.name == "GET"
    assert attrs(first)["nodekit.error.kind"] == "safe"  # a 503: nothing happened


async def test_httpx_spans_nest_under_the_attempt_that_sent_them_async(
    telemetry: Telemetry,
) -> None:
    with LocalAPI() as api:
        async with httpx.AsyncClient(base_url=api.url) as client:
            HTTPXClientInstrumentor().instrument_client(
                client, tracer_provider=telemetry.tracer_provider
            )

            @nk.node(name="status_async", effect=nk.Effect.READ, retry=RETRY, timeout=5.0)
            async def status_async() -> int:
                response = await client.get("/status/200")
                response.raise_for_status()
                return response.status_code

            api.fail_next("503")
            with instant():
                assert await status_async() == 200
    attempts = telemetry.named("status_async attempt")
    assert len(attempts) == 2
    for attempt in attempts:
        (request,) = telemetry.children(attempt)
        assert request.kind is trace.SpanKind.CLIENT


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_calls_attempts_retries_and_outcomes(telemetry: Telemetry) -> None:
    flaky = Flaky([ConnectionResetError("reset")], result=1)

    @nk.node(name="fetch", effect=nk.Effect.READ, retry=RETRY)
    def fetch(fail: bool = False) -> int:
        if fail:
            raise KeyError("missing")
        return flaky()  # type: ignore[no-any-return]

    with instant():
        assert fetch() == 1  # two attempts
        assert fetch() == 1
        with pytest.raises(KeyError):
            fetch(fail=True)
    assert telemetry.points("nodekit.node.calls") == {labels(node="fetch", effect="read"): 3}
    assert telemetry.points("nodekit.node.outcomes") == {
        labels(node="fetch", outcome="success"): 2,
        labels(node="fetch", outcome="failure", error_kind="permanent"): 1,
    }
    assert telemetry.points("nodekit.node.attempts") == {
        labels(node="fetch", outcome="success"): 2,
        labels(node="fetch", outcome="failure", error_kind="ambiguous"): 1,
        labels(node="fetch", outcome="failure", error_kind="permanent"): 1,
    }
    assert telemetry.points("nodekit.node.retries") == {
        labels(node="fetch", error_kind="ambiguous"): 1
    }
    durations = telemetry.points("nodekit.node.duration")
    assert durations[labels(node="fetch", outcome="success")][0] == 2
    assert durations[labels(node="fetch", outcome="failure")][0] == 1
    attempt_durations = telemetry.points("nodekit.node.attempt.duration")
    assert attempt_durations[labels(node="fetch", outcome="success")][0] == 2
    assert attempt_durations[labels(node="fetch", outcome="failure")][0] == 2
    assert all(total >= 0 for _, total in attempt_durations.values())


def test_circuit_rejections_are_counted_and_annotated(telemetry: Telemetry) -> None:
    breaker = nk.CircuitBreaker("api", failure_rate=0.5, min_calls=2, open_for=60)

    @nk.node(name="call_api", effect=nk.Effect.READ, circuit=breaker)
    def call_api() -> None:
        raise ConnectionRefusedError("down")

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            call_api()
    with pytest.raises(nk.CircuitOpen):
        call_api()
    assert telemetry.points("nodekit.circuit.rejections") == {
        labels(node="call_api", circuit="api"): 1
    }
    refused = telemetry.named("call_api attempt")[-1]
    assert attrs(refused)["error.type"] == "CircuitOpen"
    assert "circuit.rejected" in [event.name for event in refused.events]


def test_every_documented_metric_is_exported(telemetry: Telemetry, tmp_path: Path) -> None:
    flaky = Flaky([ConnectionResetError("reset")], result=1)

    @nk.node(name="fetch", effect=nk.Effect.READ, retry=RETRY)
    def fetch() -> int:
        return flaky()  # type: ignore[no-any-return]

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order))
    def charge(order: str) -> int:
        return 1

    breaker = nk.CircuitBreaker("api", failure_rate=0.5, min_calls=1, open_for=60)

    @nk.node(name="down", effect=nk.Effect.READ, circuit=breaker)
    def down() -> None:
        raise ConnectionRefusedError("down")

    with instant():
        fetch()
        charge("o-1")
        charge("o-1")
        for error in (ConnectionRefusedError, nk.CircuitOpen):
            with pytest.raises(error):
                down()
        with pytest.raises(nk.FlowError):
            failing_flow().run()
    for name, (_, _, keys, _) in otel.METRICS.items():
        points = telemetry.points(name)
        assert points, name
        for found in points:
            assert {key for key, _ in found} <= set(keys), name
