"""`Metrics`: a sink of the event stream that keeps per-node counts, success rate and latency
percentiles, in bounded memory, read as plain data (`snapshot()`).

It sits just above `_events` and reads only its events: the hot path never calls it, and a node
call takes the observed path (which builds the events) only while a sink like it is registered.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ._events import Event

__all__ = ["Metrics", "NodeMetrics"]

# Latencies are counted in fixed buckets, _SUB per doubling: bucket i holds durations in
# [2**(i/_SUB), 2**((i+1)/_SUB)) seconds, from 2**-20 s (about 1 µs, bucket _LOW) up to 2**14 s
# (about 4.5 hours, _HIGH); shorter and longer ones share one bucket at each end.
_SUB = 16
_LOW = -20 * _SUB
_HIGH = 14 * _SUB


class _Latencies:
    """Durations in a fixed-bucket, log-spaced histogram.

    Chosen over a sampled reservoir: every call counts (a reservoir of a few hundred keeps a
    handful of samples above its p99, and a random handful), memory is bounded by the bucket
    count (at most 546 per node, a few dozen in practice) instead of by a sample size, recording
    is one logarithm, and the answer does not depend on a random generator. The price is
    resolution: a percentile is reported as its bucket's geometric middle, within 2.2 % of the
    true value, and clamped to the smallest and largest durations seen (so a node whose calls
    all took the same time reports that time exactly); below a microsecond it is the shortest
    duration seen, beyond the last bucket the longest.
    """

    __slots__ = ("buckets", "count", "high", "low", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if seconds > 0.0:
            index = min(max(math.floor(math.log2(seconds) * _SUB), _LOW - 1), _HIGH)
        else:
            index = _LOW - 1
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        self.low = min(self.low, seconds)
        self.high = max(self.high, seconds)

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (nearest rank), or None before the first duration."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                break
        if index < _LOW:
            return self.low  # under a microsecond: the shortest seen
        if index >= _HIGH:
            return self.high
        middle = math.exp2((index + 0.5) / _SUB)
        return min(max(middle, self.low), self.high)


class _NodeStats:
    """One node's counters, written under `Metrics`' lock."""

    __slots__ = ("calls", "failures", "latency", "replays", "retries", "successes", "timeouts")

    def __init__(self) -> None:
        self.calls = self.successes = self.failures = 0
        self.retries = self.timeouts = self.replays = 0
        self.latency = _Latencies()

    def snapshot(self) -> NodeMetrics:
        latency = self.latency
        done = self.successes + self.failures
        return NodeMetrics(
            calls=self.calls,
            successes=self.successes,
            failures=self.failures,
            retries=self.retries,
            timeouts=self.timeouts,
            replays=self.replays,
            success_rate=self.successes / done if done else None,
            latency_mean=latency.total / latency.count if latency.count else 0.0,
            latency_p50=latency.quantile(0.50),
            latency_p95=latency.quantile(0.95),
            latency_p99=latency.quantile(0.99),
            latency_max=latency.high,
            latency_total=latency.total,
        )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


class NodeMetrics(dict[str, Any]):
    """One node's figures: a plain dict of numbers (JSON-serialisable as it is), whose keys
    also read as attributes (``stats["calls"]`` or ``stats.calls``).

    Counts: `calls` (started), `successes`, `failures` (calls that gave up), `retries`,
    `timeouts` (attempts that timed out), `replays` (calls answered by a store or a flow's
    journal, which run nothing and are not in the other counts). `success_rate` is successes
    over finished calls, None before one finishes. Latencies are a whole call's, retries and
    waits included, in seconds: `latency_mean`, `latency_max`, `latency_total`, and
    `latency_p50`, `latency_p95`, `latency_p99` (None before one finishes; see `_Latencies`
    for their precision).
    """

    __slots__ = ()

    @property
    def calls(self) -> int:
        return int(self.get("calls", 0))

    @property
    def successes(self) -> int:
        return int(self.get("successes", 0))

    @property
    def failures(self) -> int:
        return int(self.get("failures", 0))

    @property
    def retries(self) -> int:
        return int(self.get("retries", 0))

    @property
    def timeouts(self) -> int:
        return int(self.get("timeouts", 0))

    @property
    def replays(self) -> int:
        return int(self.get("replays", 0))

    @property
    def success_rate(self) -> float | None:
        return _number(self.get("success_rate"))

    @property
    def latency_mean(self) -> float:
        return float(self.get("latency_mean", 0.0))

    @property
    def latency_max(self) -> float:
        return float(self.get("latency_max", 0.0))

    @property
    def latency_total(self) -> float:
        return float(self.get("latency_total", 0.0))

    @property
    def latency_p50(self) -> float | None:
        return _number(self.get("latency_p50"))

    @property
    def latency_p95(self) -> float | None:
        return _number(self.get("latency_p95"))

    @property
    def latency_p99(self) -> float | None:
        return _number(self.get("latency_p99"))


class Metrics:
    """A sink that counts calls, successes, failures, retries, timeouts and replays per node,
    with latency percentiles and the success rate.

    Register it with ``nk.add_sink(metrics)``; `snapshot()` returns plain data, a `NodeMetrics`
    dict per node name. Memory is bounded per node (see `_Latencies`); a lock makes it safe to
    feed from threads and to read while nodes run. It needs the per-call events, so a node
    call with a sink registered takes the observed path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeStats] = {}

    def __call__(self, event: Event, /) -> None:
        name = event.name
        if not name.startswith("node.") or event.node is None:
            return
        with self._lock:
            stats = self._nodes.get(event.node)
            if stats is None:
                stats = self._nodes[event.node] = _NodeStats()
            if name == "node.started":
                stats.calls += 1
            elif name == "node.succeeded" or name == "node.failed":
                if name == "node.succeeded":
                    stats.successes += 1
                else:
                    stats.failures += 1
                if event.duration is not None:
                    stats.latency.record(event.duration)
            elif name == "node.retrying":
                stats.retries += 1
            elif name == "node.timed_out":
                stats.timeouts += 1
            elif name == "node.replayed":
                stats.replays += 1

    def snapshot(self) -> dict[str, NodeMetrics]:
        """Every node's figures now, as plain data: ``json.dumps(metrics.snapshot())`` works."""
        with self._lock:
            return {node: stats.snapshot() for node, stats in self._nodes.items()}

    def reset(self) -> None:
        with self._lock:
            self._nodes.clear()

    def __repr__(self) -> str:
        with self._lock:
            nodes = sorted(self._nodes)
        return f"Metrics(nodes={nodes!r})"
