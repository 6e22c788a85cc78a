"""A run's story: real runs' events become lanes of attempts, waits, faults and replays, drawn
as a terminal timeline and as one self-contained HTML page."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._story import build_story, format_clock, format_duration, render_html, render_text
from nodekit.testing import Events, Flaky, Instant, capture_events, instant


class Order(BaseModel):
    order_id: str
    reserved: bool = False
    charge: str | None = None
    shipped: bool = False


def rows(events: Events) -> list[dict[str, Any]]:
    """The events as the run log stores them."""
    return [{**e.as_dict(), "t": e.time, "name": e.name} for e in events]


def record(events: Events, status: str) -> dict[str, Any]:
    return {
        "run_id": "r-1",
        "flow": "shop",
        "status": status,
        "started_at": events[0].time,
        "ended_at": events[-1].time,
    }


def shop_flow(store: Any, flaky: Flaky, ship_error: Exception | None) -> nk.Flow[Order]:
    """reserve (retries through two faults) -> pay (a keyed charge, called twice: the second
    call is a replay) -> ship (fails with `ship_error`, if any)."""
    flow = nk.Flow("shop", state=Order)

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order_id: order_id, store=store))
    def charge(order_id: str) -> str:
        return f"ch-{order_id}"

    @flow.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=4, initial=0.5, jitter=0))
    def reserve(order_id: str) -> dict[str, bool]:
        flaky()
        return {"reserved": True}

    @flow.node(effect=nk.Effect.WRITE, after=["reserve"])
    def pay(order_id: str) -> dict[str, str]:
        charge(order_id)
        return {"charge": charge(order_id)}

    @flow.node(effect=nk.Effect.WRITE, after=["pay"])
    def ship(order_id: str) -> dict[str, bool]:
        if ship_error is not None:
            raise ship_error
        return {"shipped": True}

    return flow


def known_run(tmp_path: Path) -> tuple[dict[str, Any], Instant]:
    """The story of a real failed run: two faults then success, a keyed replay, a failure."""
    store = nk.SQLiteStore(tmp_path / "keys.sqlite")
    flaky = Flaky([ConnectionResetError("reset by peer"), TimeoutError("read timed out")])
    flow = shop_flow(store, flaky, ValueError("carrier refused <b>label</b> & more"))
    try:
        with instant() as waits, capture_events() as events, pytest.raises(nk.FlowError):
            flow.run(Order(order_id="o-1"), run_id="r-1")
    finally:
        store.close()
    assert flaky.calls == 3
    story = build_story(record(events, "failed"), rows(events))
    return story, waits


def lane(story: Mapping[str, Any], node: str) -> dict[str, Any]:
    lanes: list[dict[str, Any]] = story["lanes"]
    (found,) = [item for item in lanes if item["node"] == node]
    return found


def test_a_real_run_becomes_lanes_of_attempts_waits_faults_and_replays(tmp_path: Path) -> None:
    story, waits = known_run(tmp_path)
    assert [item["node"] for item in story["lanes"]] == ["reserve", "pay", "charge", "ship"]

    reserve = lane(story, "reserve")
    assert [s["type"] for s in reserve["segments"]] == [
        "attempt",
        "wait",
        "attempt",
        "wait",
        "attempt",
    ]
    attempts = [s for s in reserve["segments"] if s["type"] == "attempt"]
    assert [s["attempt"] for s in attempts] == [1, 2, 3]
    assert [s["outcome"] for s in attempts] == ["retried", "retried", "succeeded"]
    assert attempts[0]["error"] == "ConnectionResetError: reset by peer"
    assert attempts[1]["error"] == "TimeoutError: read timed out"
    assert attempts[0]["kind"] == "ambiguous"
    # the waits the story shows are the backoff nodekit asked for (instant mode slept none)
    assert [s["wait"] for s in reserve["segments"] if s["type"] == "wait"] == pytest.approx(
        waits.sleeps
    )
    assert (reserve["status"], reserve["attempts"], reserve["retries"], reserve["faults"]) == (
        "succeeded",
        3,
        2,
        2,
    )
    # time runs forward inside a lane: each segment starts where the one before it ended
    for before, after in zip(reserve["segments"], reserve["segments"][1:], strict=False):
        assert before["start"] <= before["end"] <= after["start"] + 1e-9

    charge = lane(story, "charge")
    assert [s["type"] for s in charge["segments"]] == ["attempt", "replay"]
    replay = charge["segments"][1]
    assert replay["source"] == "key"
    assert re.fullmatch(r"[0-9a-f]{12}", replay["key"])
    assert (charge["status"], charge["attempts"], charge["replays"]) == ("succeeded", 1, 1)

    ship = lane(story, "ship")
    assert ship["status"] == "failed"
    assert ship["faults"] == 1
    assert ship["error"] == "ValueError: carrier refused <b>label</b> & more"
    assert ship["segments"][0]["kind"] == "permanent"

    summary = story["summary"]
    assert summary["status"] == "failed"
    assert summary["nodes"] == 4
    assert summary["by_status"] == {"succeeded": 3, "failed": 1}
    assert (summary["attempts"], summary["retries"], summary["replays"]) == (6, 2, 1)
    assert (summary["faults"], summary["compensations"]) == (3, 0)
    assert summary["waited"] == pytest.approx(sum(waits.sleeps))
    assert [mark["name"] for mark in story["marks"]] == ["flow.failed"]
    assert story["marks"][0]["kind"] == "fault"
    assert json.loads(json.dumps(story)) == story  # plain data: the CLI may print it as JSON


async def test_an_async_run_tells_the_same_story() -> None:
    flow = nk.Flow("shop", state=Order)
    flaky = Flaky([ConnectionResetError("reset by peer")])
    call = flaky.async_()

    @flow.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=3, initial=0.25, jitter=0))
    async def reserve(order_id: str) -> dict[str, bool]:
        await call()
        return {"reserved": True}

    with instant() as waits, capture_events() as events:
        await flow.arun(Order(order_id="o-1"), run_id="r-1")
    story = build_story(record(events, "succeeded"), rows(events))
    reserve_lane = lane(story, "reserve")
    assert [s.get("outcome", s["type"]) for s in reserve_lane["segments"]] == [
        "retried",
        "wait",
        "succeeded",
    ]
    assert reserve_lane["segments"][1]["wait"] == pytest.approx(waits.sleeps[0])
    assert story["summary"]["by_status"] == {"succeeded": 1}
    assert flaky.calls == 2


def test_a_resumed_durable_run_shows_its_journal_replays(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "journal.sqlite")
    flow = shop_flow(store, Flaky(), None)
    try:
        with instant():
            flow.run(Order(order_id="o-2"), run_id="r-1", store=store)
            with capture_events() as events:
                flow.run(Order(order_id="o-2"), run_id="r-1", store=store)
    finally:
        store.close()
    story = build_story(record(events, "succeeded"), rows(events))
    assert {item["node"]: item["status"] for item in story["lanes"]} == {
        "reserve": "replayed",
        "pay": "replayed",
        "ship": "replayed",
    }
    for item in story["lanes"]:
        assert [(s["type"], s["source"]) for s in item["segments"]] == [("replay", "journal")]
    assert (story["summary"]["replays"], story["summary"]["attempts"]) == (3, 0)


# ---------------------------------------------------------------------------- stored events

T0 = 1_700_000_000.0  # 22:13:20 UTC


def ev(dt: float, name: str, node: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"t": T0 + dt, "name": name, "node": node, "run_id": "r-9", **fields}


RUN = {"run_id": "r-9", "flow": "f", "status": "running", "started_at": T0, "ended_at": None}


def test_an_attempt_still_open_when_a_run_crashed_is_interrupted_at_the_last_event() -> None:
    events = [
        ev(0.0, "node.started", "load", attempt=1),
        ev(0.2, "node.retrying", "load", attempt=1, wait=0.1, error="OSError: x", kind="safe"),
        ev(0.5, "flow.node_started", "other"),
    ]
    story = build_story({**RUN, "status": "crashed"}, events)
    segments = lane(story, "load")["segments"]
    assert [(s["type"], s.get("outcome")) for s in segments] == [
        ("attempt", "retried"),
        ("wait", None),
        ("attempt", "interrupted"),
    ]
    assert segments[1]["end"] == pytest.approx(T0 + 0.3)  # the wait it asked for
    assert segments[2]["end"] == pytest.approx(T0 + 0.5)
    assert lane(story, "load")["status"] == "interrupted"
    # a running run's open attempt is running, not interrupted
    running = build_story(RUN, events)
    assert lane(running, "load")["segments"][-1]["outcome"] == "running"
    # a flow node the events never timed gets one attempt from its start to the run's end
    assert lane(running, "other")["attempts"] == 1


def test_concurrent_calls_of_one_node_get_rows_of_their_own() -> None:
    events = [
        ev(0.0, "node.started", "fetch", attempt=1),
        ev(0.1, "node.started", "fetch", attempt=1),
        ev(0.3, "node.succeeded", "fetch", attempt=1, duration=0.3, attempts=1),
        ev(0.4, "node.succeeded", "fetch", attempt=1, duration=0.3, attempts=1),
        ev(0.5, "node.started", "fetch", attempt=1),
        ev(0.6, "node.succeeded", "fetch", attempt=1, duration=0.1, attempts=1),
    ]
    fetch = lane(build_story(RUN, events), "fetch")
    assert fetch["rows"] == 2
    assert [s["row"] for s in fetch["segments"]] == [0, 1, 0]
    assert (fetch["calls"], fetch["attempts"]) == (3, 3)


def test_timeouts_compensations_fallbacks_and_progress_are_on_their_lanes() -> None:
    events = [
        ev(0.0, "node.started", "charge", attempt=1),
        ev(0.5, "node.timed_out", "charge", attempt=1, error="NodeTimeout: 0.5s", timeout=0.5),
        ev(0.5, "node.retrying", "charge", attempt=1, wait=0.2, error="NodeTimeout: 0.5s"),
        ev(0.8, "node.progress", "charge", attempt=2, done=3, total=10),
        ev(0.9, "node.succeeded", "charge", attempt=2, duration=0.9, attempts=2),
        ev(1.0, "node.started", "notify", attempt=1),
        ev(1.1, "node.failed", "notify", attempt=1, error="HTTPError: 503", kind="safe"),
        ev(1.1, "node.fallback", "notify", attempt=1, error="HTTPError: 503", kind="safe"),
        ev(1.2, "flow.compensating", None, flow="f", failed="ship"),
        ev(1.5, "node.compensated", "charge", duration=0.25),
        ev(1.6, "node.compensation_failed", "reserve", error="OSError: gone"),
    ]
    story = build_story({**RUN, "status": "compensated", "ended_at": T0 + 1.7}, events)
    charge = lane(story, "charge")
    assert [s.get("outcome") for s in charge["segments"]] == [
        "retried",
        None,
        "succeeded",
        "compensated",
    ]
    assert charge["segments"][0]["timed_out"] is True
    assert charge["segments"][3]["start"] == pytest.approx(T0 + 1.25)
    assert charge["status"] == "compensated"
    assert [m["name"] for m in charge["marks"]] == ["node.progress"]
    assert "done=3 total=10" in charge["marks"][0]["detail"]
    assert lane(story, "notify")["status"] == "fallback"
    assert lane(story, "reserve")["status"] == "compensation failed"
    assert [m["kind"] for m in story["marks"]] == ["compensation"]
    summary = story["summary"]
    assert (summary["compensations"], summary["faults"], summary["attempts"]) == (2, 2, 3)
    assert summary["duration"] == pytest.approx(1.7)


def test_a_resumed_compensated_run_counts_each_compensation_once() -> None:
    """A resume of a compensated run meets its compensations in the journal (`replayed`): shown,
    not counted again; a step whose fallback raised (the run failed at it) is `failed`."""
    events = [
        ev(0.0, "node.started", "charge", attempt=1),
        ev(0.1, "node.succeeded", "charge", attempt=1, duration=0.1, attempts=1),
        ev(0.2, "node.started", "receipt", attempt=1),
        ev(0.3, "node.failed", "receipt", attempt=1, error="HTTPError: 403", kind="permanent"),
        ev(0.3, "node.fallback", "receipt", attempt=1, error="HTTPError: 403", kind="permanent"),
        ev(0.4, "flow.compensating", None, flow="f", failed="receipt"),
        ev(0.5, "node.compensated", "charge", duration=0.05),
        ev(0.6, "flow.failed", "receipt", failed="receipt", error="HTTPError: 403"),
        ev(2.0, "flow.compensating", None, flow="f", failed="receipt"),
        ev(2.0, "node.compensated", "charge", duration=0.0, replayed=True),
        ev(2.1, "flow.failed", "receipt", failed="receipt", error="HTTPError: 403"),
    ]
    story = build_story({**RUN, "status": "compensated", "ended_at": T0 + 2.1}, events)
    charge = lane(story, "charge")
    assert [s.get("outcome") for s in charge["segments"]] == [
        "succeeded",
        "compensated",
        "replayed",
    ]
    assert (charge["compensations"], story["summary"]["compensations"]) == (1, 1)
    assert lane(story, "receipt")["status"] == "failed"
    assert "compensated before (journal)" in render_text(story, tz=UTC)


def test_a_call_whose_start_was_not_seen_starts_its_duration_before_it_ended() -> None:
    events = [ev(1.0, "node.succeeded", "quick", attempt=1, duration=0.25, attempts=1)]
    (segment,) = lane(build_story(RUN, events), "quick")["segments"]
    assert (segment["start"], segment["end"]) == (pytest.approx(T0 + 0.75), T0 + 1.0)


# ---------------------------------------------------------------------------- rendering


def test_durations_and_clock_times_read_like_a_person_writes_them() -> None:
    assert [format_duration(s) for s in (0.00042, 0.0042, 0.042, 1.5, 42.0, 125.0)] == [
        "420 µs",
        "4.2 ms",
        "42 ms",
        "1.5 s",
        "42.0 s",
        "2 min 5 s",
    ]
    assert format_clock(T0 + 0.123, UTC) == "22:13:20.123"


def test_the_terminal_timeline_has_a_line_per_node_and_per_attempt_and_wait() -> None:
    events = [
        ev(0.0, "flow.started", None, flow="f"),
        ev(0.0, "node.started", "reserve", attempt=1),
        ev(0.012, "node.retrying", "reserve", attempt=1, wait=0.05, error="OSError: reset"),
        ev(0.070, "node.succeeded", "reserve", attempt=2, duration=0.07, attempts=2),
        ev(0.080, "node.replayed", "charge", key="a1b2c3d4e5f6", error=False),
        ev(0.090, "flow.finished", None, flow="f", duration=0.09),
    ]
    story = build_story({**RUN, "status": "succeeded", "ended_at": T0 + 0.09}, events)
    text = render_text(story, tz=UTC)
    lines = text.splitlines()
    assert lines[0] == "run r-9  flow f  succeeded"
    assert lines[1] == "  22:13:20.000 → 22:13:20.090  (90 ms)"
    assert "2 attempts · 1 retry · 1 replay · 1 fault" in lines[2]
    assert lines[4].split() == ["22:13:20.000", "reserve", "succeeded", "2", "attempts", "70", "ms"]
    assert lines[5].split()[:5] == ["22:13:20.000", "attempt", "1", "fault", "12"]
    assert lines[5].endswith("OSError: reset")
    assert lines[6].split() == ["22:13:20.012", "wait", "backoff", "50", "ms"]
    assert lines[7].split()[:4] == ["22:13:20.062", "attempt", "2", "succeeded"]
    assert lines[8].split()[1:3] == ["charge", "replayed"]
    assert "from the key record (key a1b2c3d4e5f6)" in lines[9]


def test_the_page_is_self_contained_and_escapes_what_users_wrote() -> None:
    hostile = '<script>alert("node")</script>'
    events = [
        ev(0.0, "node.started", hostile, attempt=1),
        ev(0.1, "node.failed", hostile, attempt=1, error='E: <img src=x onerror="alert(1)">'),
    ]
    story = build_story(
        {**RUN, "run_id": "<b>run</b>", "status": "failed", "ended_at": T0 + 0.1}, events
    )
    page = render_html(story)
    assert page.startswith("<!DOCTYPE html>")
    assert hostile not in page
    assert "<img" not in page
    assert "<b>run</b>" not in page
    assert "&lt;script&gt;alert(&quot;node&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    # nothing is fetched: no external script, style, font or image
    assert not re.search(r"""(src|href)\s*=|@import|url\(|<link""", page.replace("src=x", ""))
    assert page.count("<script>") == 1  # the page's own, inline
    assert page.count('class="fault"') == 1


def test_the_page_shows_every_node_its_attempts_and_faults(tmp_path: Path) -> None:
    story, _ = known_run(tmp_path)
    page = render_html(story)
    for node, facts in [
        ("reserve", "succeeded · 3 attempts · 2 faults"),
        ("pay", "succeeded · 1 attempt"),
        ("charge", "succeeded · 1 attempt · 1 replay"),
        ("ship", "failed · 1 attempt · 1 fault"),
    ]:
        assert f'data-node="{node}"' in page
        assert f'<span class="facts">{facts}</span>' in page
    assert page.count('class="fault"') == 3
    assert page.count('<div class="seg wait"') == 2
    assert page.count('<div class="seg replay"') == 1
    assert "ValueError: carrier refused &lt;b&gt;label&lt;/b&gt; &amp; more" in page


def test_a_durable_runs_steps_are_timed_by_the_flows_own_events() -> None:
    """A durable run's log has no node.started/succeeded for a successful attempt: the flow's
    node_started/node_finished give the lane, and node.retrying the attempts before it."""
    events = [
        {"t": 100.0, "name": "flow.started", "node": None},
        {"t": 100.1, "name": "flow.node_started", "node": "fetch"},
        {"t": 100.3, "name": "flow.node_finished", "node": "fetch"},
        {"t": 100.4, "name": "flow.node_started", "node": "pay"},
        {
            "t": 100.6,
            "name": "node.retrying",
            "node": "pay",
            "attempt": 1,
            "wait": 0.5,
            "error": "ConnectionError: down",
            "duration": 0.2,
        },
        {"t": 101.4, "name": "flow.node_finished", "node": "pay"},
        {"t": 101.5, "name": "flow.node_started", "node": "fetch"},  # a loop: its second call
        {"t": 101.7, "name": "flow.node_finished", "node": "fetch"},
        {"t": 101.8, "name": "flow.node_started", "node": "ship"},
        {"t": 101.9, "name": "flow.finished", "node": None},
    ]
    run = {"run_id": "d-1", "flow": "f", "status": "running", "started_at": 100.0, "ended_at": None}
    story = build_story(run, events)
    lanes = {lane["node"]: lane for lane in story["lanes"]}
    fetch = [s for s in lanes["fetch"]["segments"] if s["type"] == "attempt"]
    assert [(s["start"], s["end"], s["outcome"]) for s in fetch] == [
        (100.1, 100.3, "succeeded"),
        (101.5, 101.7, "succeeded"),
    ]
    assert lanes["fetch"]["calls"] == 2
    pay = lanes["pay"]["segments"]
    assert [(s["type"], s.get("outcome")) for s in pay] == [
        ("attempt", "retried"),
        ("wait", None),
        ("attempt", "succeeded"),
    ]
    assert pay[0]["start"] == 100.4
    assert pay[0]["error"] == "ConnectionError: down"
    assert (pay[1]["start"], pay[1]["end"]) == (100.6, 101.1)
    assert (pay[2]["start"], pay[2]["end"]) == (101.1, 101.4)
    assert lanes["pay"]["status"] == "succeeded"
    assert (lanes["ship"]["attempts"], lanes["ship"]["status"]) == (1, "running")


def test_the_terminal_timeline_escapes_control_characters() -> None:
    events = [
        {"t": 100.0, "name": "flow.node_started", "node": "evil\x1b[31m"},
        {
            "t": 100.2,
            "name": "node.failed",
            "node": "evil\x1b[31m",
            "attempt": 1,
            "error": "ValueError: boom \x1b[2J\x9b\nnext",
        },
        {"t": 100.3, "name": "runlog.dropped", "node": None, "dropped": 7},
    ]
    run = {
        "run_id": "r\x07",
        "flow": "f",
        "status": "failed",
        "started_at": 100.0,
        "ended_at": 100.3,
    }
    text = render_text(build_story(run, events))
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
    assert "boom \\x1b[2J\\x9b\\x0anext" in text
    assert "evil\\x1b[31m" in text
    assert "run r\\x07" in text
    assert "7 events not kept" in text
