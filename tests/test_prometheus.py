"""Prometheus: nodekit's metrics scraped over HTTP from a loopback endpoint, as documented."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import nodekit as nk
from nodekit import otel, prometheus
from nodekit.testing import Flaky, instant

RETRY = nk.Retry(attempts=5, initial=0.1, multiplier=2, jitter=0)

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(endpoint: prometheus.Endpoint) -> Samples:
    """GET /metrics and parse it as Prometheus does: each sample by name, then by its labels
    (the exporter's ``otel_scope_*`` labels and the empty ones it backfills left out)."""
    response = httpx.get(endpoint.url, timeout=5)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "target_info":
                continue
            assert sample.labels["otel_scope_name"] == "nodekit"
            labels = frozenset(
                (key, value)
                for key, value in sample.labels.items()
                if value != "" and not key.startswith("otel_scope_")
            )
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset((f"nodekit_{key}", value) for key, value in values.items())


def count(samples: Samples, name: str, **values: str) -> float:
    """A histogram's `_count` for one series (its `le`-free labels)."""
    return samples[f"{name}_count"][labels(**values)]


@pytest.fixture
def endpoint() -> Iterator[prometheus.Endpoint]:
    served = prometheus.serve(port=0)
    try:
        yield served
    finally:
        served.stop()
        otel.uninstrument()


def failing_flow() -> nk.Flow:
    flow = nk.Flow("orders")

    @flow.node(output="order")
    def load() -> str:
        return "o-1"

    @flow.node(after=load)
    def ship(order: str) -> None:
        raise LookupError(f"no address for {order}")

    return flow


# ---------------------------------------------------------------------------- install


def test_importing_nodekit_does_not_import_prometheus_client_or_opentelemetry() -> None:
    code = (
        "import sys, nodekit, nodekit.http\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.startswith(('prometheus_client', 'opentelemetry')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_listens_on_the_loopback_and_instruments_nodekit(
    endpoint: prometheus.Endpoint,
) -> None:
    assert endpoint.addr == "127.0.0.1"
    assert endpoint.port > 0
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    assert otel.instrumented()
    assert "serving" in repr(endpoint)


def test_stop_uninstruments_and_closes_the_port() -> None:
    endpoint = prometheus.serve(port=0)
    try:
        assert httpx.get(endpoint.url, timeout=5).status_code == 200
    finally:
        endpoint.stop()
    assert not otel.instrumented()
    assert "stopped" in repr(endpoint)
    with pytest.raises(httpx.ConnectError):
        httpx.get(endpoint.url, timeout=5)
    endpoint.stop()  # twice is harmless


def test_stop_leaves_an_instrumentation_made_since_in_place() -> None:
    with prometheus.serve(port=0) as endpoint:
        otel.instrument(meter_provider=MeterProvider())
    try:
        assert "stopped" in repr(endpoint)
        assert otel.instrumented()
    finally:
        otel.uninstrument()


def test_a_busy_port_raises_and_instruments_nothing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="in use"):
            prometheus.serve(port=busy.getsockname()[1])
    assert not otel.instrumented()


def test_metrics_go_in_the_registry_given_until_stopped() -> None:
    registry = CollectorRegistry()
    endpoint = prometheus.serve(port=0, registry=registry)
    try:
        assert endpoint.registry is registry

        @nk.node(name="ping", effect=nk.Effect.READ)
        def ping() -> str:
            return "pong"

        ping()
        assert b"nodekit_node_calls_total" in generate_latest(registry)
    finally:
        endpoint.stop()
    assert b"nodekit_node_calls_total" not in generate_latest(registry)


def test_spans_go_to_the_tracer_provider_given() -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    @nk.node(name="ping", effect=nk.Effect.READ)
    def ping() -> str:
        return "pong"

    with prometheus.serve(port=0, tracer_provider=tracer_provider):
        ping()
    assert [span.name for span in exporter.get_finished_spans()] == ["ping attempt", "ping"]


@pytest.mark.parametrize("port", [-1, 65536, 9464.0, True])
def test_an_invalid_port_is_a_config_error(port: Any) -> None:
    with pytest.raises(nk.ConfigError, match="port") as caught:
        prometheus.serve(port=port)
    assert caught.value.option == "port"
    assert not otel.instrumented()


# ---------------------------------------------------------------------------- the scrape


def test_a_scrape_shows_every_documented_metric_with_counts_and_labels(
    endpoint: prometheus.Endpoint,
) -> None:
    flaky = Flaky([ConnectionResetError("reset by peer")] * 2, result=7)

    @nk.node(name="fetch", effect=nk.Effect.READ, retry=RETRY)
    def fetch() -> int:
        return flaky()  # type: ignore[no-any-return]

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: f"secret-{order}"))
    def charge(order: str) -> int:
        return 42

    @nk.node(name="lookup", effect=nk.Effect.READ, retry=RETRY)
    def lookup() -> None:
        raise KeyError("missing")

    breaker = nk.CircuitBreaker("api", failure_rate=0.5, min_calls=1, open_for=60)

    @nk.node(name="down", effect=nk.Effect.READ, circuit=breaker)
    def down() -> None:
        raise ConnectionRefusedError("down")

    with instant() as waits:
        assert fetch() == 7  # three attempts, two retries
        assert charge("o-1") == 42
        assert charge("o-1") == 42  # replayed from the store
        with pytest.raises(KeyError):
            lookup()
        for error in (ConnectionRefusedError, nk.CircuitOpen):
            with pytest.raises(error):
                down()
        with pytest.raises(nk.FlowError):
            failing_flow().run()
    assert waits.sleeps == [0.1, 0.2]

    samples = scrape(endpoint)
    for name, exposed in prometheus.names().items():
        kind = otel.METRICS[name][0]
        assert (exposed if kind == "counter" else f"{exposed}_count") in samples, name

    calls = samples["nodekit_node_calls_total"]
    assert calls[labels(node="fetch", effect="read")] == 1
    assert calls[labels(node="charge", effect="write")] == 2
    assert calls[labels(node="lookup", effect="read")] == 1

    outcomes = samples["nodekit_node_outcomes_total"]
    assert outcomes[labels(node="fetch", outcome="success")] == 1
    assert outcomes[labels(node="charge", outcome="success")] == 2
    assert outcomes[labels(node="lookup", outcome="failure", error_kind="permanent")] == 1
    assert outcomes[labels(node="ship", outcome="failure", error_kind="permanent")] == 1

    attempts = samples["nodekit_node_attempts_total"]
    assert attempts[labels(node="fetch", outcome="failure", error_kind="ambiguous")] == 2
    assert attempts[labels(node="fetch", outcome="success")] == 1
    assert attempts[labels(node="charge", outcome="success")] == 1  # the replay made none

    assert samples["nodekit_node_retries_total"] == {
        labels(node="fetch", error_kind="ambiguous"): 2
    }
    assert samples["nodekit_node_replays_total"] == {labels(node="charge", source="store"): 1}
    assert samples["nodekit_circuit_rejections_total"] == {labels(node="down", circuit="api"): 1}
    assert samples["nodekit_flow_runs_total"] == {labels(flow="orders", outcome="failure"): 1}

    assert count(samples, "nodekit_node_duration_seconds", node="fetch", outcome="success") == 1
    assert count(samples, "nodekit_node_duration_seconds", node="charge", outcome="success") == 2
    attempt_duration = "nodekit_node_attempt_duration_seconds"
    assert count(samples, attempt_duration, node="fetch", outcome="failure") == 2
    assert count(samples, attempt_duration, node="fetch", outcome="success") == 1
    flow_durations = samples["nodekit_flow_duration_seconds_count"]
    assert flow_durations == {labels(flow="orders", outcome="failure"): 1}
    # a key never reaches a label, only what events carry
    assert not any(
        "secret-o-1" in value
        for series in samples.values()
        for found in series
        for _, value in found
    )


async def test_a_scrape_counts_an_async_node_with_retries(
    endpoint: prometheus.Endpoint,
) -> None:
    flaky = Flaky([ConnectionResetError("reset by peer")] * 2, result=7)

    @nk.node(name="fetch_async", effect=nk.Effect.READ, retry=RETRY)
    async def fetch_async() -> int:
        return await flaky.async_()()  # type: ignore[no-any-return]

    with instant():
        assert await fetch_async() == 7
    samples = scrape(endpoint)
    assert samples["nodekit_node_calls_total"] == {labels(node="fetch_async", effect="read"): 1}
    assert samples["nodekit_node_attempts_total"] == {
        labels(node="fetch_async", outcome="failure", error_kind="ambiguous"): 2,
        labels(node="fetch_async", outcome="success"): 1,
    }
    assert samples["nodekit_node_retries_total"] == {
        labels(node="fetch_async", error_kind="ambiguous"): 2
    }


def test_histograms_use_nodekits_buckets_in_seconds(endpoint: prometheus.Endpoint) -> None:
    @nk.node(name="ping", effect=nk.Effect.READ)
    def ping() -> str:
        return "pong"

    ping()
    ping()
    samples = scrape(endpoint)
    buckets = {
        dict(found)["le"]: value
        for found, value in samples["nodekit_node_duration_seconds_bucket"].items()
    }
    assert list(buckets) == [*(str(float(bound)) for bound in otel._BUCKETS), "+Inf"]
    assert buckets["+Inf"] == 2
    total = samples["nodekit_node_duration_seconds_sum"][labels(node="ping", outcome="success")]
    assert 0 <= total < 1  # seconds, not milliseconds


def test_counts_accumulate_across_scrapes(endpoint: prometheus.Endpoint) -> None:
    """Prometheus counters are cumulative: a second scrape sees the first one's calls too."""

    @nk.node(name="ping", effect=nk.Effect.READ)
    def ping() -> str:
        return "pong"

    ping()
    assert scrape(endpoint)["nodekit_node_calls_total"] == {labels(node="ping", effect="read"): 1}
    ping()
    assert scrape(endpoint)["nodekit_node_calls_total"] == {labels(node="ping", effect="read"): 2}
