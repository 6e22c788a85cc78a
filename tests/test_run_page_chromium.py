"""The run page in a real browser: headless Chromium runs its script and shows a known run's
nodes, attempt counts and faults; a screenshot is kept as a test artifact."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit._story import build_story, render_html
from nodekit.testing import Flaky, capture_events, instant

# Kept after the run (gitignored): CI can upload it, a person can look at it.
ARTIFACTS = Path(os.environ.get("NODEKIT_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (`.ci/run` installs it); skips without it, fails in CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("NODEKIT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message} and NODEKIT_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(message)
    return found


def headless(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


class Order(BaseModel):
    order_id: str
    reserved: bool = False
    charge: str | None = None


def known_page(tmp_path: Path) -> Path:
    """The page of a real failed run: reserve meets two faults, charge replays its key once,
    ship fails."""
    store = nk.SQLiteStore(tmp_path / "keys.sqlite")
    flow = nk.Flow("shop", state=Order)
    flaky = Flaky([ConnectionResetError("reset by peer"), TimeoutError("read timed out")])

    @nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order_id: order_id, store=store))
    def charge(order_id: str) -> str:
        return "ch-1"

    @flow.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=4, initial=0.5, jitter=0))
    def reserve(order_id: str) -> dict[str, bool]:
        flaky()
        return {"reserved": True}

    @flow.node(effect=nk.Effect.WRITE, after=["reserve"])
    def pay(order_id: str) -> dict[str, str]:
        charge(order_id)
        return {"charge": charge(order_id)}

    @flow.node(effect=nk.Effect.WRITE, after=["pay"])
    def ship(charge: str) -> dict[str, Any]:
        raise ValueError("carrier refused <label>")

    try:
        with instant(), capture_events() as events, pytest.raises(nk.FlowError):
            flow.run(Order(order_id="o-1"), run_id="shop:o-1")
    finally:
        store.close()
    run = {
        "run_id": "shop:o-1",
        "flow": "shop",
        "status": "failed",
        "started_at": events[0].time,
        "ended_at": events[-1].time,
    }
    story = build_story(run, [{"t": e.time, "name": e.name, **e.as_dict()} for e in events])
    page = tmp_path / "run.html"
    page.write_text(render_html(story), encoding="utf-8")
    return page


class Lanes(HTMLParser):
    """Reads the rendered DOM: per lane its name, its facts line and its fault markers."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.reading: str | None = None
        self.body: dict[str, str] = {}
        self.tip: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if tag == "body":
            self.body = {k: v or "" for k, v in values.items()}
        if tag == "div" and values.get("id") == "tip":
            self.tip = values
        node = values.get("data-node")
        if "lane" in classes and node:
            self.current = node
            self.lanes[node] = {"facts": "", "faults": 0, "segments": 0}
        elif self.current is not None:
            lane = self.lanes[self.current]
            if "facts" in classes:
                self.reading = "facts"
            elif "fault" in classes:
                lane["faults"] += 1
            elif "seg" in classes:
                lane["segments"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self.reading = None

    def handle_data(self, data: str) -> None:
        if self.reading == "facts" and self.current is not None:
            self.lanes[self.current]["facts"] += data


def test_chromium_shows_the_nodes_attempts_and_faults_of_a_known_run(
    chromium: str, tmp_path: Path
) -> None:
    page = known_page(tmp_path)
    dom = headless(chromium, "--dump-dom", page.as_uri()).stdout
    parsed = Lanes()
    parsed.feed(dom)
    assert parsed.body.get("data-ready") == "1"  # the page's script ran to its end
    assert parsed.tip is not None
    assert "hidden" in parsed.tip  # the tooltip waits for a hover
    assert {node: lane["facts"] for node, lane in parsed.lanes.items()} == {
        "reserve": "succeeded · 3 attempts · 2 faults",
        "pay": "succeeded · 1 attempt",
        "charge": "succeeded · 1 attempt · 1 replay",
        "ship": "failed · 1 attempt · 1 fault",
    }
    assert {node: lane["faults"] for node, lane in parsed.lanes.items()} == {
        "reserve": 2,
        "pay": 0,
        "charge": 0,
        "ship": 1,
    }
    # reserve: three attempts and the two waits between them; charge: an attempt, a replay
    assert parsed.lanes["reserve"]["segments"] == 5
    assert parsed.lanes["charge"]["segments"] == 2
    assert "ValueError: carrier refused &lt;label&gt;" in dom


def test_chromium_takes_a_screenshot_of_the_page(chromium: str, tmp_path: Path) -> None:
    page = known_page(tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "run-page.png"
    shot.unlink(missing_ok=True)
    headless(
        chromium,
        f"--screenshot={shot}",
        "--window-size=1200,800",
        "--force-device-scale-factor=1",
        page.as_uri() + "#tip=0",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 800)
    assert len(data) > 20_000  # a drawn page, not a blank one (that compresses to ~5 KB)
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_the_readme_picture_is_drawn_from_a_real_demo_run(chromium: str, tmp_path: Path) -> None:
    from recipes import _screenshot

    story = _screenshot.pick(_screenshot.demo_runs(8, tmp_path / "demo"))
    summary = story["summary"]
    assert story["run"]["run_id"].startswith("checkout:")
    assert summary["status"] == "succeeded"
    assert summary["faults"] >= 1
    assert summary["retries"] >= 1
    page, shot = tmp_path / "run.html", tmp_path / "run.png"
    page.write_text(render_html(story), encoding="utf-8")
    _screenshot.screenshot(page, shot, tip=_screenshot.first_fault(story))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
