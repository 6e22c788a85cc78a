"""What OpenTelemetry costs: a node call instrumented with `nodekit.otel`, next to what
opentelemetry-instrumentation-httpx adds to a plain httpx request.

Rows, in one run, on one machine:

- a plain node (``@nk.node`` on ``add_one``) before `nodekit.otel.instrument()`, while
  instrumented (the OpenTelemetry SDK with a span processor whose exporter drops every span,
  and an SDK meter provider whose reader is never collected), and after `uninstrument()`;
- a plain ``httpx.Client.get`` to a loopback server, without and with
  ``HTTPXClientInstrumentor`` on the same SDK providers;
- the same request made inside a node, with both instrumentations (the attempt span is the
  parent of httpx's span): what a user who turns everything on pays per call.

The figure to read is the *added* time: row minus its baseline, medians of many batches.
"""

from __future__ import annotations

import statistics
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import _common
from ._common import Batch, Stats, measure, now_ns, ns, table

SECTION = "observe"


def _add_one(x: int) -> int:
    return x + 1


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for the whole run
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one write (no delayed-ACK stall)

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _sdk() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(Dropping()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


def _calls(fn: Any, arg: Any) -> Batch:
    def batch(n: int) -> int:
        start = now_ns()
        for _ in range(n):
            fn(arg)
        return now_ns() - start

    return batch


def run(quick: bool) -> str:
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    import nodekit as nk
    from nodekit import otel

    repeats = 5 if quick else 25
    call_ns = 20_000_000 if quick else 60_000_000
    http_ns = 20_000_000 if quick else 120_000_000

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    tracer_provider, meter_provider = _sdk()
    try:
        node = nk.node(_add_one)

        def plain_get(client: httpx.Client) -> int:
            return client.get(url).status_code

        # -- a plain node: before, while and after instrumenting
        tracer = tracer_provider.get_tracer("bench")

        def bare_span(_: Any) -> None:
            with tracer.start_as_current_span("span"):
                pass

        before = measure(
            {
                "plain function": _calls(_add_one, 1),
                "node": _calls(node, 1),
                "span": _calls(bare_span, None),
            },
            repeats=repeats,
            target_ns=call_ns,
        )
        otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        try:
            during = measure({"node": _calls(node, 1)}, repeats=repeats, target_ns=call_ns)
        finally:
            otel.uninstrument()
        after = measure({"node": _calls(node, 1)}, repeats=repeats, target_ns=call_ns)

        # -- an httpx request: plain, with httpx's instrumentation, inside an instrumented node
        with httpx.Client() as client:
            get_node = nk.node(plain_get)
            http_before = measure(
                {"httpx": _calls(plain_get, client), "node(httpx)": _calls(get_node, client)},
                repeats=repeats,
                target_ns=http_ns,
            )
        instrumentor = HTTPXClientInstrumentor()
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        try:
            with httpx.Client() as client:  # instrumented at construction
                http_inst = measure(
                    {"httpx": _calls(plain_get, client)}, repeats=repeats, target_ns=http_ns
                )
                otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
                try:
                    http_both = measure(
                        {"node(httpx)": _calls(get_node, client)},
                        repeats=repeats,
                        target_ns=http_ns,
                    )
                finally:
                    otel.uninstrument()
        finally:
            instrumentor.uninstrument()
    finally:
        server.shutdown()
        server.server_close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return render(before, during, after, http_before, http_inst, http_both, quick)


def _added(row: Stats, base: Stats) -> str:
    return ns(row.median - base.median)


def render(
    before: dict[str, Stats],
    during: dict[str, Stats],
    after: dict[str, Stats],
    http_before: dict[str, Stats],
    http_inst: dict[str, Stats],
    http_both: dict[str, Stats],
    quick: bool,
) -> str:
    bare = before["plain function"]
    node0 = before["node"]
    rows = [
        ["plain function `add_one`", ns(bare.median), "—", "—"],
        ["node, not instrumented", ns(node0.median), _added(node0, bare), "—"],
        [
            "node, instrumented (SDK, exporter drops spans)",
            ns(during["node"].median),
            _added(during["node"], bare),
            _added(during["node"], node0),
        ],
        [
            "node, after `uninstrument()`",
            ns(after["node"].median),
            _added(after["node"], bare),
            _added(after["node"], node0),
        ],
    ]
    h0 = http_before["httpx"]
    hn = http_before["node(httpx)"]
    hi = http_inst["httpx"]
    hb = http_both["node(httpx)"]
    http_rows = [
        ["`client.get`, not instrumented", ns(h0.median), "—"],
        ["`client.get`, opentelemetry-instrumentation-httpx", ns(hi.median), _added(hi, h0)],
        ["node around `client.get`, nothing instrumented", ns(hn.median), _added(hn, h0)],
        ["node around `client.get`, both instrumented", ns(hb.median), _added(hb, h0)],
    ]
    rows.append(
        [
            "for scale: one bare SDK span (`start_as_current_span`), no attributes",
            ns(before["span"].median),
            "—",
            "—",
        ]
    )
    nodekit_otel = during["node"].median - node0.median
    httpx_otel = hi.median - h0.median
    spread = statistics.median(
        (max(s.samples) - min(s.samples)) / s.median for s in (h0, hi, hn, hb)
    )
    lines = [
        "## OpenTelemetry: what instrumenting costs",
        "",
        _common.machine_markdown(),
        "",
        "`python -m benchmarks.bench_observe`: medians of "
        f"{len(bare.samples)} batches per row, nanoseconds per call. The SDK is configured "
        "as in production minus the network: a `SimpleSpanProcessor` whose exporter drops "
        "every span, an SDK `MeterProvider` with a reader that is never collected. nodekit "
        "records a call span, an attempt span, and its counters and histograms per call.",
        "",
        table(["a call of", "ns/call", "added to the function", "added by OTel"], rows, "lrrr"),
        "",
        table(["a loopback HTTP GET (keep-alive)", "ns/request", "added"], http_rows, "lrr"),
        "",
        f"- **Instrumented:** nodekit's spans and metrics add {ns(nodekit_otel)} ns per node "
        f"call; opentelemetry-instrumentation-httpx adds {ns(httpx_otel)} ns per request "
        f"(one client span and its duration histogram) — nodekit's two spans cost "
        f"{nodekit_otel / max(httpx_otel, 1):.2f} times httpx's one. Both are the SDK's own "
        f"cost above all: one bare span takes {ns(before['span'].median)} ns on this machine.",
        "- **Not instrumented:** after `uninstrument()` a node costs what it did before "
        "`instrument()` (the fast path never reads the hook): no cost when not instrumented.",
        f"- HTTP rows vary by about {spread:.0%} between batches (loopback round trips); "
        "read their added figures as ± that much of the request time.",
    ]
    if quick:
        lines.append("- **Quick smoke run: too few repeats for the figures to mean much.**")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return _common.main(SECTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
