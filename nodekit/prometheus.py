"""Prometheus for nodekit: the metrics of `nodekit.otel.METRICS`, served for scraping.

``nodekit.prometheus.serve()`` (``pip install 'nodekit[prometheus]'``) builds an OpenTelemetry
SDK ``MeterProvider`` whose only reader is OpenTelemetry's ``PrometheusMetricReader``,
instruments nodekit with it (`nodekit.otel.instrument`), and serves ``/metrics`` with
``prometheus_client``'s HTTP server. The metrics take one path, the OTel one, whether they end
up in Prometheus or an OTLP collector: the same names, attributes and histogram buckets, no
second set of counters to keep in step. The exporter renders a name for Prometheus by
replacing dots with underscores and adding the unit (``_seconds``) and ``_total`` for a
counter; attributes become labels the same way (``nodekit.error.kind`` ->
``nodekit_error_kind``). `names()` gives the names a scrape shows.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from . import otel
from ._errors import ConfigError

try:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, start_http_server
except ImportError as exc:  # pragma: no cover - the extra is installed in the test suite
    raise ImportError(
        "nodekit.prometheus needs the OpenTelemetry SDK, its Prometheus exporter and "
        "prometheus_client: pip install 'nodekit[prometheus]'",
        name=exc.name,
    ) from exc

__all__ = ["Endpoint", "names", "serve"]

# OpenTelemetry's unit -> the suffix its Prometheus exporter adds (a `{call}` annotation adds none)
_UNIT_SUFFIXES = {"s": "_seconds"}


def names() -> Mapping[str, str]:
    """Each metric of `nodekit.otel.METRICS` by the name a Prometheus scrape shows it under.

    A histogram is exposed as its ``_bucket``, ``_count`` and ``_sum`` series.
    """
    out: dict[str, str] = {}
    for name, (kind, unit, _, _) in otel.METRICS.items():
        rendered = name.replace(".", "_") + _UNIT_SUFFIXES.get(unit, "")
        out[name] = rendered + "_total" if kind == "counter" else rendered
    return out


class Endpoint:
    """A running ``/metrics`` endpoint and the instrumentation that feeds it.

    `stop()` (or leaving it as a context manager) ends both: the HTTP server, the meter
    provider, and the instrumentation, unless an ``instrument()`` made since replaced it.
    """

    def __init__(
        self,
        server: WSGIServer,
        thread: threading.Thread,
        meter_provider: MeterProvider,
        registry: CollectorRegistry,
        installed: object,
    ) -> None:
        self._server = server
        self._thread = thread
        self._lock = threading.Lock()
        self._stopped = False
        self._installed = installed  # what `stop()` uninstruments, if still in effect
        self.meter_provider = meter_provider
        self.registry = registry
        self.addr: str = str(server.server_address[0])
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        """The URL to scrape, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Uninstrument, shut the server and the meter provider down; a second call does nothing.

        Takes up to half a second: the server notices the request at its next poll.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        otel._uninstrument_if(self._installed)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.meter_provider.shutdown()  # unregisters the reader from the registry

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "serving"
        return f"<nodekit.prometheus.Endpoint {self.url} {state}>"


def serve(
    port: int = 9464,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any = None,
) -> Endpoint:
    """Instrument nodekit and serve its metrics for Prometheus at ``http://addr:port/metrics``.

    `port` 9464 is OpenTelemetry's Prometheus port; 0 picks a free one (`Endpoint.port` says
    which). `addr` is the loopback by default: give ``"0.0.0.0"`` to let other hosts scrape.
    `registry` is the ``prometheus_client`` registry the metrics go in and the server serves:
    by default a new one of the endpoint's own, so nothing else is exposed and a second endpoint
    never clashes; pass ``prometheus_client.REGISTRY`` to serve the process and platform
    metrics too. `tracer_provider` is handed to `nodekit.otel.instrument` (default: the
    global one), which this replaces, as a new ``instrument()`` would. Raises ``OSError`` when
    the port cannot be bound, having instrumented nothing.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int from 0 to 65535, got {port!r}", option="port")
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    reader = PrometheusMetricReader(registry=registry)
    meter_provider = MeterProvider(metric_readers=[reader])
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except BaseException:
        meter_provider.shutdown()
        raise
    installed = otel._instrument(tracer_provider, meter_provider)
    return Endpoint(server, thread, meter_provider, registry, installed)
