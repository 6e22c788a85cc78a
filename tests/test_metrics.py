"""`nk.Metrics`: per-node counts, success rate and latency percentiles, as plain data."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator

import pytest

import nodekit as nk
from nodekit.testing import Flaky, instant

RETRY = nk.Retry(attempts=3, initial=0.1, jitter=0)
PRECISION = 0.022  # a percentile is its bucket's geometric middle: within 2.2 %

KEYS = {
    "calls",
    "successes",
    "failures",
    "retries",
    "timeouts",
    "replays",
    "success_rate",
    "latency_mean",
    "latency_max",
    "latency_total",
    "latency_p50",
    "latency_p95",
    "latency_p99",
}


@pytest.fixture
def metrics() -> Iterator[nk.Metrics]:
    sink = nk.Metrics()
    remove = nk.add_sink(sink)
    try:
        yield sink
    finally:
        remove()


def feed(
    metrics: nk.Metrics, durations: Iterable[float], node: str = "n", *, ok: bool = True
) -> None:
    """Calls of known durations, as the node's events report them."""
    for duration in durations:
        metrics(nk.Event("node.started", node=node, attempt=1))
        name = "node.succeeded" if ok else "node.failed"
        metrics(nk.Event(name, node=node, attempt=1, duration=duration))


# ---------------------------------------------------------------------------- percentiles


def test_percentiles_of_known_durations_are_within_the_histograms_precision() -> None:
    metrics = nk.Metrics()
    feed(metrics, [ms / 1000 for ms in range(1, 101)])  # 1 ms .. 100 ms, one each
    stats = metrics.snapshot()["n"]
    assert stats["latency_p50"] == pytest.approx(0.050, rel=PRECISION)
    assert stats["latency_p95"] == pytest.approx(0.095, rel=PRECISION)
    assert stats["latency_p99"] == pytest.approx(0.099, rel=PRECISION)
    assert stats["latency_mean"] == pytest.approx(0.0505)
    assert stats["latency_max"] == 0.1
    assert stats["latency_total"] == pytest.approx(5.05)


def test_a_node_whose_calls_all_take_the_same_time_reports_that_time_exactly() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.25] * 10)
    stats = metrics.snapshot()["n"]
    assert stats["latency_p50"] == stats["latency_p95"] == stats["latency_p99"] == 0.25


def test_a_slow_tail_shows_in_p99_and_not_in_p50() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.010] * 980 + [2.0] * 20)
    stats = metrics.snapshot()["n"]
    assert stats["latency_p50"] == pytest.approx(0.010, rel=PRECISION)
    assert stats["latency_p95"] == pytest.approx(0.010, rel=PRECISION)
    assert stats["latency_p99"] == 2.0


def test_durations_beyond_the_buckets_are_clamped_to_the_extremes_seen() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.0, 0.0, 1e-9, 86_400.0])  # nothing, a nanosecond, a day
    stats = metrics.snapshot()["n"]
    assert stats["latency_p50"] == 0.0
    assert stats["latency_p99"] == 86_400.0
    assert stats["latency_max"] == 86_400.0


def test_memory_per_node_is_bounded_by_the_bucket_count() -> None:
    metrics = nk.Metrics()
    feed(metrics, [1.07**power * 1e-12 for power in range(2_000)])  # 1e-12 s .. 1e47 s
    buckets = metrics._nodes["n"].latency.buckets
    assert len(buckets) <= 34 * 16 + 2
    assert metrics.snapshot()["n"]["calls"] == 2_000


def test_no_percentile_or_success_rate_before_a_call_finishes() -> None:
    metrics = nk.Metrics()
    metrics(nk.Event("node.started", node="n", attempt=1))
    stats = metrics.snapshot()["n"]
    assert stats["calls"] == 1
    assert stats["success_rate"] is None
    assert stats["latency_p50"] is None
    assert stats["latency_mean"] == 0.0


# ---------------------------------------------------------------------------- success rate


def test_success_rate_counts_calls_not_attempts(metrics: nk.Metrics) -> None:
    ok = nk.node(retry=RETRY, name="ok")(Flaky([ConnectionRefusedError], result=1))
    down = nk.node(retry=RETRY, name="down")(Flaky([ConnectionRefusedError], times=9))
    with instant():
        assert ok() == 1
        with pytest.raises(ConnectionRefusedError):
            down()
        assert ok() == 1
    ok_stats, down_stats = metrics.snapshot()["ok"], metrics.snapshot()["down"]
    assert (ok_stats["calls"], ok_stats["successes"], ok_stats["retries"]) == (2, 2, 1)
    assert ok_stats["success_rate"] == 1.0
    assert (down_stats["calls"], down_stats["failures"], down_stats["retries"]) == (1, 1, 2)
    assert down_stats["success_rate"] == 0.0
    assert ok_stats["latency_p99"] is not None
    assert 0 <= ok_stats["latency_p50"] <= ok_stats["latency_max"]


async def test_success_rate_counts_calls_not_attempts_async(metrics: nk.Metrics) -> None:
    flaky = Flaky([TimeoutError, TimeoutError, TimeoutError, TimeoutError], result=1)
    call = nk.node(retry=RETRY, name="a", effect=nk.Effect.READ)(flaky.async_())
    with instant():
        with pytest.raises(TimeoutError):
            await call()  # three attempts, all fail
        assert await call() == 1  # one fails, the retry succeeds
        assert await call() == 1
        assert await call() == 1
    stats = metrics.snapshot()["a"]
    assert (stats["calls"], stats["successes"], stats["failures"]) == (4, 3, 1)
    assert stats["retries"] == 3
    assert stats["success_rate"] == 0.75


def test_fed_successes_and_failures_give_the_rate() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.01] * 9)
    feed(metrics, [0.5], ok=False)
    stats = metrics.snapshot()["n"]
    assert stats["success_rate"] == 0.9
    assert stats["latency_max"] == 0.5, "failed calls count in the latencies"


def test_timeouts_and_replays_are_counted_apart() -> None:
    metrics = nk.Metrics()
    metrics(nk.Event("node.timed_out", node="n", attempt=1))
    metrics(nk.Event("node.replayed", node="n", attempt=1))
    metrics(nk.Event("flow.node_started", node="n"))  # not a node's own event: ignored
    metrics(nk.Event("node.started"))  # no node: ignored
    assert metrics.snapshot() == {
        "n": {
            "calls": 0,
            "successes": 0,
            "failures": 0,
            "retries": 0,
            "timeouts": 1,
            "replays": 1,
            "success_rate": None,
            "latency_mean": 0.0,
            "latency_max": 0.0,
            "latency_total": 0.0,
            "latency_p50": None,
            "latency_p95": None,
            "latency_p99": None,
        }
    }


# ---------------------------------------------------------------------------- plain data


def test_a_snapshot_is_plain_json_data_and_round_trips(metrics: nk.Metrics) -> None:
    flaky = nk.node(retry=RETRY, name="flaky")(Flaky([ConnectionRefusedError], result=1))
    with instant():
        flaky()
    feed(metrics, [0.001, 0.002, 0.003], node="fed")
    snapshot = metrics.snapshot()
    assert set(snapshot) == {"flaky", "fed"}
    for stats in snapshot.values():
        assert isinstance(stats, dict)
        assert set(stats) == KEYS
        assert all(value is None or type(value) in (int, float) for value in stats.values())
    assert json.loads(json.dumps(snapshot)) == snapshot


def test_a_snapshots_figures_also_read_as_attributes() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.2, 0.4])
    stats = metrics.snapshot()["n"]
    assert (stats.calls, stats.successes, stats.failures) == (2, 2, 0)
    assert (stats.retries, stats.timeouts, stats.replays) == (0, 0, 0)
    assert stats.success_rate == 1.0
    assert stats.latency_mean == pytest.approx(0.3)
    assert stats.latency_max == 0.4
    assert stats.latency_p50 == 0.2, "the shortest seen"
    assert stats.latency_p95 == stats.latency_p99 == pytest.approx(0.4, rel=PRECISION)
    assert stats.latency_total == pytest.approx(0.6)


def test_a_snapshot_is_a_copy_and_reset_forgets_every_node() -> None:
    metrics = nk.Metrics()
    feed(metrics, [0.1])
    metrics.snapshot()["n"]["calls"] = 100
    assert metrics.snapshot()["n"]["calls"] == 1
    metrics.reset()
    assert metrics.snapshot() == {}


def test_events_fed_from_many_threads_are_all_counted() -> None:
    metrics = nk.Metrics()
    threads = [
        threading.Thread(target=feed, args=(metrics, [0.001 * (i + 1)] * 500)) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = metrics.snapshot()["n"]
    assert (stats["calls"], stats["successes"]) == (4_000, 4_000)
    assert stats["latency_p50"] == pytest.approx(0.004, rel=PRECISION)
