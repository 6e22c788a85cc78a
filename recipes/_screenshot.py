"""The README's picture of a run: one checkout order of the demo, drawn by `render_html`.

Runs the checkout demo (``recipes.checkout --demo``: faults on, a durable SQLite journal in a
temporary directory) while capturing its events, picks the first pass's most eventful order
(most faults, retries and replays), writes its page and has headless Chromium photograph it:

    python -m recipes._screenshot                  # docs/run.png (what `make screenshot` runs)
    python -m recipes._screenshot --html run.html --out /tmp/run.png --orders 12
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nodekit._story import build_story, render_html
from nodekit.testing import capture_events

from . import checkout

__all__ = ["demo_runs", "first_fault", "main", "pick", "screenshot"]


def demo_runs(orders: int, data_dir: Path, seed: int = 1) -> list[tuple[dict[str, Any], list[Any]]]:
    """Run the checkout demo; each first-pass run as (``run`` record, its stored events)."""
    with capture_events() as events:
        checkout.main(
            [
                "--demo",
                "--plain",
                "--quiet",
                "--orders",
                str(orders),
                "--seed",
                str(seed),
                "--data-dir",
                str(data_dir),
            ],
            out=io.StringIO(),
        )
    runs: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for event in events:
        row = {"t": event.time, "name": event.name, **event.as_dict()}
        run_id = row.get("run_id")
        if run_id is None:
            continue
        if event.name == "flow.started" and run_id not in runs:
            record = {
                "run_id": run_id,
                "flow": row.get("flow", ""),
                "status": "running",
                "started_at": event.time,
                "ended_at": None,
            }
            runs[run_id] = (record, [])
        if run_id not in runs or runs[run_id][0]["ended_at"] is not None:
            continue  # the second pass: the same run ids, replayed
        record, rows = runs[run_id]
        rows.append(row)
        if event.name in ("flow.finished", "flow.failed"):
            record["status"] = "succeeded" if event.name == "flow.finished" else "failed"
            record["ended_at"] = event.time
    return list(runs.values())


def pick(
    runs: Sequence[tuple[Mapping[str, Any], Sequence[Any]]], run_id: str | None = None
) -> dict[str, Any]:
    """The story of run `run_id`, else of the most eventful run (faults, retries, replays)."""
    stories = [build_story(record, rows) for record, rows in runs]
    if run_id is not None:
        stories = [story for story in stories if story["run"]["run_id"] == run_id]
    if not stories:
        raise SystemExit(f"the demo ran no flow{'' if run_id is None else f' {run_id!r}'}")

    def score(story: Mapping[str, Any]) -> tuple[int, int]:
        summary = story["summary"]
        kinds = sum(1 for key in ("faults", "retries", "replays") if summary[key])
        return kinds, summary["faults"] + summary["retries"] + summary["replays"]

    return max(stories, key=score)


def first_fault(story: Mapping[str, Any]) -> int:
    """The place, among the page's timeline items, of the first attempt that met a fault (its
    tooltip is shown in the picture, as on hover); 0 when none did."""
    index = 0
    for lane in story["lanes"]:
        for segment in lane["segments"]:
            if segment.get("error"):
                return index
            index += 1
        index += len(lane["marks"])
    return 0


def screenshot(
    page: Path, out: Path, size: tuple[int, int] = (1200, 800), *, tip: int | None = None
) -> None:
    """Photograph `page` with headless Chromium (Debian's ``chromium``) into `out` (PNG),
    with the tooltip of timeline item `tip` shown."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--screenshot={out.resolve()}",
            f"--window-size={size[0]},{size[1]}",
            page.resolve().as_uri() + ("" if tip is None else f"#tip={tip}"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m recipes._screenshot", description=__doc__)
    cli.add_argument("--out", type=Path, default=Path("docs/run.png"), help="the PNG to write")
    cli.add_argument("--html", type=Path, help="also keep the page here")
    cli.add_argument("--orders", type=int, default=8, help="orders in the demo (default 8)")
    cli.add_argument("--seed", type=int, default=1, help="the local API's fault seed")
    cli.add_argument("--height", type=int, default=800, help="window height in pixels")
    cli.add_argument("--run", help="the run id to draw (default: the most eventful)")
    args = cli.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nodekit-shot-") as tmp:
        story = pick(demo_runs(args.orders, Path(tmp), args.seed), args.run)
        page = args.html or Path(tmp) / "run.html"
        page.write_text(render_html(story), encoding="utf-8")
        screenshot(page, args.out, (1200, args.height), tip=first_fault(story))
    summary = story["summary"]
    print(
        f"{args.out}: run {story['run']['run_id']} ({summary['status']}, "
        f"{summary['attempts']} attempts, {summary['faults']} faults, "
        f"{summary['replays']} replays)",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
