"""OpenTelemetry for nodekit: a span per node call, per attempt and per flow run, and metrics.

``nodekit.otel.instrument()`` (``pip install 'nodekit[otel]'``) puts nodekit's two halves of
observability behind the OpenTelemetry API:

- **spans**: a flow run is a span (``flow <name>``); each node call is a span (``<node>``)
  under the flow run, the calling node's attempt, or whatever span is current; each attempt is
  a child span (``<node> attempt``). They are *current* while they run, in worker threads and
  tasks too, so that spans opened inside (httpx's own instrumentation, a database driver's,
  the user's) nest under the attempt that made them. nodekit's other events met inside a
  call or a run become span events on the span current then: retry waits
  (``node.retrying``, with ``nodekit.wait``), timeouts, idempotency steps, circuit refusals;
- **metrics**: counters and histograms (`METRICS`), through the OTel metrics API.

It is an event sink plus the runtime's instrumentation hook (`nodekit._runtime.Tracer`):
spans must be current while the function runs, which a sink, told after the fact, cannot do;
the hook wraps the call, each attempt and each flow run. Both are installed only while
instrumented: an uninstrumented node pays nothing, and its fast path never reads the hook.

Attributes and span events carry only what nodekit's events carry: names, ids, counts,
durations, the error kind, and the error's redacted one-line text. Never a payload, never
an idempotency key (its 12-character fingerprint), never a raw exception message: errors are
not recorded with ``record_exception``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ._classify import classify
from ._events import Event, add_sink, remove_sink, short_error
from ._runtime import RUNTIME

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - the extra is installed in the test suite
    raise ImportError(
        "nodekit.otel needs the OpenTelemetry API: pip install 'nodekit[otel]'", name=exc.name
    ) from exc

__all__ = ["ATTRIBUTES", "METRICS", "instrument", "instrumented", "uninstrument"]

# ---------------------------------------------------------------------------- names

NODE = "nodekit.node"
EFFECT = "nodekit.effect"
RUN_ID = "nodekit.run_id"
FLOW = "nodekit.flow"
MODE = "nodekit.flow.mode"
FAILED_NODE = "nodekit.flow.failed_node"
ATTEMPT = "nodekit.attempt"
ATTEMPTS = "nodekit.attempts"
OUTCOME = "nodekit.outcome"
ERROR_KIND = "nodekit.error.kind"
REPLAYED = "nodekit.replayed"
KEY = "nodekit.key_fingerprint"
SOURCE = "nodekit.source"
CIRCUIT = "nodekit.circuit"
ERROR_TYPE = "error.type"  # OpenTelemetry's semantic convention: the error's class

#: Span attributes, by the span they are on.
ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "flow": (FLOW, RUN_ID, MODE, OUTCOME, FAILED_NODE, ERROR_TYPE),
    "node": (NODE, EFFECT, RUN_ID, FLOW, ATTEMPTS, OUTCOME, ERROR_KIND, REPLAYED, KEY, ERROR_TYPE),
    "attempt": (NODE, ATTEMPT, OUTCOME, ERROR_KIND, ERROR_TYPE),
}

#: The metrics: name -> (instrument, unit, attributes, meaning).
METRICS: Mapping[str, tuple[str, str, tuple[str, ...], str]] = {
    "nodekit.node.calls": ("counter", "{call}", (NODE, EFFECT), "node calls started"),
    "nodekit.node.outcomes": (
        "counter",
        "{call}",
        (NODE, OUTCOME, ERROR_KIND),
        "node calls finished, by outcome (success, failure, cancelled) and error kind",
    ),
    "nodekit.node.attempts": (
        "counter",
        "{attempt}",
        (NODE, OUTCOME, ERROR_KIND),
        "attempts made, by outcome and error kind",
    ),
    "nodekit.node.retries": (
        "counter",
        "{retry}",
        (NODE, ERROR_KIND),
        "retries scheduled after a failed attempt",
    ),
    "nodekit.node.replays": (
        "counter",
        "{call}",
        (NODE, SOURCE),
        "results replayed instead of run: from the idempotency store or a flow's journal",
    ),
    "nodekit.circuit.rejections": (
        "counter",
        "{attempt}",
        (NODE, CIRCUIT),
        "attempts a circuit breaker refused",
    ),
    "nodekit.node.duration": (
        "histogram",
        "s",
        (NODE, OUTCOME),
        "node call duration: every attempt and wait, or the replay",
    ),
    "nodekit.node.attempt.duration": (
        "histogram",
        "s",
        (NODE, OUTCOME),
        "attempt duration (guards included)",
    ),
    "nodekit.flow.runs": ("counter", "{run}", (FLOW, OUTCOME), "flow runs finished, by outcome"),
    "nodekit.flow.duration": ("histogram", "s", (FLOW, OUTCOME), "flow run duration"),
}

# seconds: from a local call (1 ms) to a long retried one (2 min); OpenTelemetry's default
# buckets are for milliseconds
_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)

SUCCESS, FAILURE, CANCELLED = "success", "failure", "cancelled"

# events that are spans or their attributes already (not repeated as span events)
_AS_SPANS = frozenset(
    {
        "node.started",
        "node.succeeded",
        "node.failed",
        "flow.started",
        "flow.finished",
        "flow.failed",
        "flow.node_started",
        "flow.node_finished",
    }
)
# event fields that a span event leaves out: on the span already
_ON_SPAN = frozenset({"node", "run_id", "flow"})
# event fields named as the span attributes of the same meaning
_RENAMED = {"kind": ERROR_KIND, "key": KEY}

# what the instrumentation keeps in OpenTelemetry's context: the node call, the flow run
_CALL = otel_context.create_key("nodekit.call")
_FLOW = otel_context.create_key("nodekit.flow")


class _Call:
    """A node call being traced: its span, and what its events told about it."""

    __slots__ = ("attempts", "kind", "name", "span")

    def __init__(self, span: Any, name: str) -> None:
        self.span = span
        self.name = name
        self.attempts = 0
        self.kind: str | None = None  # the error kind `node.failed` reported


class _Flow:
    """A flow run being traced."""

    __slots__ = ("name", "run_id", "span")

    def __init__(self, span: Any, name: str, run_id: str) -> None:
        self.span = span
        self.name = name
        self.run_id = run_id


class _Instrumentation:
    """The hook (`nodekit._runtime.Tracer`) and the event sink `instrument()` installs."""

    def __init__(self, tracer: Any, meter: Any) -> None:
        self.tracer = tracer
        instruments: dict[str, Any] = {}
        for name, (kind, unit, _, meaning) in METRICS.items():
            if kind == "counter":
                instruments[name] = meter.create_counter(name, unit=unit, description=meaning)
            else:
                instruments[name] = meter.create_histogram(
                    name,
                    unit=unit,
                    description=meaning,
                    explicit_bucket_boundaries_advisory=_BUCKETS,
                )
        self.calls = instruments["nodekit.node.calls"]
        self.outcomes = instruments["nodekit.node.outcomes"]
        self.attempts = instruments["nodekit.node.attempts"]
        self.retries = instruments["nodekit.node.retries"]
        self.replays = instruments["nodekit.node.replays"]
        self.rejections = instruments["nodekit.circuit.rejections"]
        self.duration = instruments["nodekit.node.duration"]
        self.attempt_duration = instruments["nodekit.node.attempt.duration"]
        self.flow_runs = instruments["nodekit.flow.runs"]
        self.flow_duration = instruments["nodekit.flow.duration"]
        # metric attributes by their values: built once, not per call
        self._labels: dict[tuple[Any, ...], Mapping[str, Any]] = {}
        self._attempt_names: dict[str, str] = {}

    def _label(self, *pairs: Any) -> Mapping[str, Any]:
        labels = self._labels.get(pairs)
        if labels is None:
            labels = self._labels[pairs] = {
                pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2) if pairs[i + 1] is not None
            }
        return labels

    # ------------------------------------------------------------------ node calls

    def call_sync(
        self, drive: Callable[..., Any], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any:
        call, token, t0 = self._start_call(spec, ctx)
        error: BaseException | None = None
        try:
            return drive(spec, ctx, args, kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_call(call, spec, ctx, token, t0, error)

    async def call_async(
        self, drive: Callable[..., Awaitable[Any]], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any:
        call, token, t0 = self._start_call(spec, ctx)
        error: BaseException | None = None
        try:
            return await drive(spec, ctx, args, kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_call(call, spec, ctx, token, t0, error)

    def _start_call(self, spec: Any, ctx: Any) -> tuple[_Call, object, float]:
        parent = otel_context.get_current()
        name = spec.name
        effect = spec.effect.value
        attributes = {NODE: name, EFFECT: effect, RUN_ID: ctx.run_id}
        flow = otel_context.get_value(_FLOW, parent)
        if flow is not None:
            attributes[FLOW] = flow.name  # type: ignore[attr-defined]
        span = self.tracer.start_span(name, parent, attributes=attributes)
        call = _Call(span, name)
        here = otel_context.set_value(_CALL, call, trace.set_span_in_context(span, parent))
        token = otel_context.attach(here)
        self.calls.add(1, self._label(NODE, name, EFFECT, effect))
        return call, token, time.perf_counter()

    def _end_call(
        self,
        call: _Call,
        spec: Any,
        ctx: Any,
        token: object,
        t0: float,
        error: BaseException | None,
    ) -> None:
        duration = time.perf_counter() - t0
        otel_context.detach(token)  # type: ignore[arg-type]
        span = call.span
        kind = None
        attributes: dict[str, Any] = {ATTEMPTS: call.attempts, REPLAYED: bool(ctx.replayed)}
        if error is None:
            outcome = SUCCESS
        elif isinstance(error, Exception):
            outcome = FAILURE
            kind = attributes[ERROR_KIND] = call.kind or classify(error)
            attributes[ERROR_TYPE] = type(error).__qualname__
            span.set_status(Status(StatusCode.ERROR, short_error(error)))
        else:  # cancelled, interrupted: not the node's failure
            outcome = CANCELLED
        attributes[OUTCOME] = outcome
        if ctx.idempotency_key is not None:  # the key's digest: its fingerprint, as events show
            attributes[KEY] = ctx.idempotency_key[:12]
        span.set_attributes(attributes)
        span.end()
        name = call.name
        self.outcomes.add(1, self._label(NODE, name, OUTCOME, outcome, ERROR_KIND, kind))
        self.duration.record(duration, self._label(NODE, name, OUTCOME, outcome))

    # ------------------------------------------------------------------ attempts

    def attempt_sync(
        self, attempt: Callable[..., Any], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any:
        span, token, t0 = self._start_attempt(spec, ctx)
        error: BaseException | None = None
        try:
            return attempt(spec, ctx, args, kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_attempt(span, spec, token, t0, error)

    async def attempt_async(
        self, attempt: Callable[..., Awaitable[Any]], spec: Any, ctx: Any, args: Any, kwargs: Any
    ) -> Any:
        span, token, t0 = self._start_attempt(spec, ctx)
        error: BaseException | None = None
        try:
            return await attempt(spec, ctx, args, kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_attempt(span, spec, token, t0, error)

    def _start_attempt(self, spec: Any, ctx: Any) -> tuple[Any, object, float]:
        parent = otel_context.get_current()
        call = otel_context.get_value(_CALL, parent)
        if call is not None:
            call.attempts += 1  # type: ignore[attr-defined]
        name = spec.name
        title = self._attempt_names.get(name)
        if title is None:
            title = self._attempt_names[name] = f"{name} attempt"
        span = self.tracer.start_span(title, parent, attributes={NODE: name, ATTEMPT: ctx.attempt})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token, time.perf_counter()

    def _end_attempt(
        self, span: Any, spec: Any, token: object, t0: float, error: BaseException | None
    ) -> None:
        duration = time.perf_counter() - t0
        otel_context.detach(token)  # type: ignore[arg-type]
        kind = None
        if error is None:
            span.set_attribute(OUTCOME, SUCCESS)
            outcome = SUCCESS
        elif isinstance(error, Exception):
            outcome = FAILURE
            kind = classify(error)
            span.set_status(Status(StatusCode.ERROR, short_error(error)))
            span.set_attributes(
                {OUTCOME: outcome, ERROR_KIND: kind, ERROR_TYPE: type(error).__qualname__}
            )
        else:
            outcome = CANCELLED
            span.set_attribute(OUTCOME, outcome)
        span.end()
        name = spec.name
        self.attempts.add(1, self._label(NODE, name, OUTCOME, outcome, ERROR_KIND, kind))
        self.attempt_duration.record(duration, self._label(NODE, name, OUTCOME, outcome))

    # ------------------------------------------------------------------ flow runs

    def start_flow(self, flow: str, run_id: str, mode: str) -> Callable[[], None]:
        parent = otel_context.get_current()
        span = self.tracer.start_span(
            f"flow {flow}", parent, attributes={FLOW: flow, RUN_ID: run_id, MODE: mode}
        )
        here = otel_context.set_value(
            _FLOW, _Flow(span, flow, run_id), trace.set_span_in_context(span, parent)
        )
        token = otel_context.attach(here)

        def end() -> None:
            otel_context.detach(token)
            span.end()

        return end

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event, /) -> None:
        """The sink: metrics and span annotations from nodekit's events (must not raise)."""
        name = event.name
        if name in _AS_SPANS:
            if name == "node.failed":
                call = otel_context.get_value(_CALL)
                if call is not None and call.name == event.node:  # type: ignore[attr-defined]
                    call.kind = event.fields.get("kind")  # type: ignore[attr-defined]
            elif name == "flow.failed" or name == "flow.finished":
                self._flow_ended(event)
            return
        if name == "node.retrying":
            self.retries.add(1, self._label(NODE, event.node, ERROR_KIND, event.fields.get("kind")))
        elif name == "node.replayed":
            source = event.fields.get("source", "store")
            self.replays.add(1, self._label(NODE, event.node, SOURCE, source))
            if source == "journal":
                self._journal_replay(event)
                return
        elif name == "circuit.rejected":
            circuit = event.fields.get("circuit")
            self.rejections.add(1, self._label(NODE, event.node, CIRCUIT, circuit))
        current = otel_context.get_current()
        if (
            otel_context.get_value(_CALL, current) is None
            and otel_context.get_value(_FLOW, current) is None
        ):
            return  # not inside a node call or a flow run: not ours to annotate
        span = trace.get_current_span(current)
        if span.is_recording():
            span.add_event(name, _event_attributes(event))

    def _flow_ended(self, event: Event) -> None:
        flow = otel_context.get_value(_FLOW)
        name = event.fields.get("flow")
        outcome = SUCCESS if event.name == "flow.finished" else FAILURE
        if event.duration is not None:
            self.flow_duration.record(event.duration, self._label(FLOW, name, OUTCOME, outcome))
        self.flow_runs.add(1, self._label(FLOW, name, OUTCOME, outcome))
        if flow is None or flow.run_id != event.run_id:  # type: ignore[attr-defined]
            return
        span = flow.span  # type: ignore[attr-defined]
        span.set_attribute(OUTCOME, outcome)
        if outcome == FAILURE:
            span.set_status(Status(StatusCode.ERROR, event.error))
            failed = event.fields.get("failed")
            if failed is not None:
                span.set_attribute(FAILED_NODE, failed)
            if event.exc is not None:
                span.set_attribute(ERROR_TYPE, type(event.exc).__qualname__)

    def _journal_replay(self, event: Event) -> None:
        """A node a resumed flow run replays from its journal: a span of its own, at once."""
        attributes: dict[str, Any] = {
            NODE: event.node or "",
            RUN_ID: event.run_id or "",
            OUTCOME: SUCCESS,
            REPLAYED: True,
            SOURCE: "journal",
            ATTEMPTS: 0,
        }
        flow = event.fields.get("flow")
        if flow is not None:
            attributes[FLOW] = flow
        self.tracer.start_span(event.node or "node", attributes=attributes).end()


def _event_attributes(event: Event) -> dict[str, Any]:
    """An event's loggable fields as span-event attributes (what a log line would show)."""
    out: dict[str, Any] = {}
    for key, value in event.as_dict().items():
        if value is None or key in _ON_SPAN:
            continue
        if not isinstance(value, str | bool | int | float):
            if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
                value = tuple(value)
            else:
                value = str(value)
        out[_RENAMED.get(key) or "nodekit." + key] = value
    return out


# ---------------------------------------------------------------------------- install

_lock = threading.Lock()
_installed: _Instrumentation | None = None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nodekit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


def instrument(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Trace every node call, attempt and flow run, and record nodekit's metrics.

    `tracer_provider` and `meter_provider` default to OpenTelemetry's global providers (set
    them with ``trace.set_tracer_provider`` / ``metrics.set_meter_provider``; before that the
    API's no-op ones are used, which later pick up the global provider). Calling it again
    replaces the previous instrumentation. Process-wide, like event sinks; ``uninstrument()``
    removes it.
    """
    _instrument(tracer_provider, meter_provider)


def _instrument(tracer_provider: Any, meter_provider: Any) -> object:
    """`instrument()`, returning what it installed (for `_uninstrument_if`)."""
    global _installed
    version = _version()
    tracer = trace.get_tracer("nodekit", version, tracer_provider=tracer_provider)
    meter = metrics.get_meter("nodekit", version, meter_provider=meter_provider)
    hooks = _Instrumentation(tracer, meter)
    with _lock:
        _uninstall()
        add_sink(hooks)
        with RUNTIME.lock:
            RUNTIME.tracer = hooks
        _installed = hooks
    return hooks


def uninstrument() -> None:
    """Stop tracing and recording metrics; nodes go back to their uninstrumented cost."""
    with _lock:
        _uninstall()


def _uninstrument_if(installed: object) -> None:
    """Uninstrument if `installed` is still in effect: not an ``instrument()`` made since."""
    with _lock:
        if installed is not None and _installed is installed:
            _uninstall()


def instrumented() -> bool:
    """Whether `instrument()` is in effect (`nodekit.testing.reset_defaults` ends it too)."""
    installed = _installed
    return installed is not None and RUNTIME.tracer is installed


def _uninstall() -> None:
    global _installed
    installed = _installed
    if installed is None:
        return
    remove_sink(installed)
    with RUNTIME.lock:
        if RUNTIME.tracer is installed:
            RUNTIME.tracer = None
    _installed = None
