"""The story as text: times and durations as people read them, and the terminal timeline."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, tzinfo
from typing import Any

__all__ = [
    "counts_line",
    "format_clock",
    "format_duration",
    "plural",
    "printable",
    "render_text",
]

# C0 and C1 control characters (and DEL): a stored error text may hold any of them, and a
# terminal obeys them (``\x1b[2J`` clears the screen)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: str) -> str:
    """`text` safe to print on a terminal: each control character (newline and tab too) as
    a ``\\x1b``-style escape."""
    return _CONTROL.sub(_escaped, text)


def format_clock(t: float, tz: tzinfo | None = None) -> str:
    """An epoch time as a wall-clock time with milliseconds: ``21:04:05.123`` (local time
    unless `tz`)."""
    moment = datetime.fromtimestamp(t, tz)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_duration(seconds: float) -> str:
    """A duration the way a person reads it: ``850 µs``, ``12 ms``, ``1.25 s``, ``3 min 4 s``."""
    seconds = max(seconds, 0.0)
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms" if seconds < 0.01 else f"{seconds * 1e3:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def counts_line(summary: Mapping[str, Any]) -> str:
    by_status = ", ".join(f"{count} {name}" for name, count in summary["by_status"].items())
    return (
        f"{plural(summary['nodes'], 'node')}"
        + (f" ({by_status})" if by_status else "")
        + f" · {plural(summary['attempts'], 'attempt')}"
        + f" · {plural(summary['retries'], 'retry').replace('retrys', 'retries')}"
        + f" · {plural(summary['replays'], 'replay')}"
        + f" · {plural(summary['faults'], 'fault')}"
        + f" · {plural(summary['compensations'], 'compensation')}"
    )


def render_text(story: Mapping[str, Any], *, tz: tzinfo | None = None) -> str:
    """The story as a terminal timeline: a header, one line per node, and an indented line
    per attempt, wait, fault, replay, compensation and mark (no colors)."""
    run, summary = story["run"], story["summary"]

    def clock(t: float) -> str:
        return format_clock(t, tz)

    ended = run.get("ended_at")
    until = f" → {clock(float(ended))}" if isinstance(ended, int | float) else " → (no end)"
    lines = [
        f"run {run['run_id']}  flow {run['flow'] or '-'}  {summary['status']}",
        f"  {clock(run['started_at'])}{until}  ({format_duration(summary['duration'])})",
        f"  {counts_line(summary)}",
        "",
    ]
    width = max([len(lane["node"]) for lane in story["lanes"]] + [4])
    states = max([len(lane["status"]) for lane in story["lanes"]] + [11])
    for lane in story["lanes"]:
        took = format_duration(lane["end"] - lane["start"])
        what = plural(lane["attempts"], "attempt") if lane["attempts"] else ""
        lines.append(
            f"{clock(lane['start'])}  {lane['node']:<{width}}  {lane['status']:<{states}}  "
            f"{what:<11} {took}".rstrip()
        )
        items: list[tuple[float, int, str]] = []
        for order, segment in enumerate(lane["segments"]):
            items.append((segment["start"], order, _segment_text(segment)))
        for order, mark in enumerate(lane["marks"]):
            items.append((mark["t"], 10_000 + order, _mark_text(mark)))
        for at, _, text in sorted(items):
            lines.append(f"  {clock(at)}    {text}")
    for mark in story["marks"]:
        lines.append(f"{clock(mark['t'])}  {_mark_text(mark)}")
    dropped = summary.get("dropped")
    if dropped:
        lines.append(
            f"({plural(int(dropped), 'event')} not kept: the run log keeps at most "
            "its first events)"
        )
    # every text from events (node names, error texts) may hold control characters
    return "\n".join(printable(line) for line in lines) + "\n"


def _segment_text(segment: Mapping[str, Any]) -> str:
    kind = segment["type"]
    took = format_duration(segment["end"] - segment["start"])
    if kind == "attempt":
        outcome = segment.get("outcome", "running")
        what = {"retried": "fault", "failed": "fault, gave up"}.get(outcome, outcome)
        if segment.get("timed_out"):
            what = what.replace("fault", "timed out")
        text = f"attempt {segment['attempt']:<3} {what:<18} {took:>9}"
        if segment.get("kind"):
            text += f"  [{segment['kind']}]"
        if segment.get("error"):
            text += f"  {segment['error']}"
        return text
    if kind == "wait":
        asked = float(segment.get("wait") or 0.0)
        return f"wait    {'':3} {'backoff':<18} {format_duration(asked):>9}"
    if kind == "replay":
        source = segment.get("source", "journal")
        text = f"replayed    from the {'journal' if source == 'journal' else 'key record'}"
        if segment.get("key"):
            text += f" (key {segment['key']})"
        if segment.get("outcome") == "error":
            text += ": the recorded error"
        return text
    if kind == "compensation":
        what = {
            "compensated": "compensated",
            "replayed": "compensated before (journal)",
        }.get(str(segment.get("outcome")), "compensation failed")
        text = f"{what:<30} {took:>9}"
        return text + (f"  {segment['error']}" if segment.get("error") else "")
    if kind == "skipped":
        return f"skipped     {segment.get('reason') or ''}".rstrip()
    return str(kind)


def _mark_text(mark: Mapping[str, Any]) -> str:
    text = f"{mark['name']}"
    if mark.get("detail"):
        text += f"  {mark['detail']}"
    if mark.get("error"):
        text += f"  {mark['error']}"
    return text
