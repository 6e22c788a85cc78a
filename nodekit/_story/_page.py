"""The story as one self-contained HTML page: inline CSS and JS, nothing fetched, all text
escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import tzinfo
from typing import Any

from ._text import format_clock, format_duration, plural

__all__ = ["render_html"]

_Format = Callable[[float], str]  # an epoch time as text, or its place on the axis


def render_html(story: Mapping[str, Any], *, tz: tzinfo | None = None) -> str:
    """The story as one self-contained HTML page: header, summary, a timeline of bars per
    node (attempts, hatched waits, faults, replays, compensations) with hover details, a
    table per node and the event list. Nothing is fetched; every text is escaped."""
    run, summary = story["run"], story["summary"]
    t0, t1 = float(story["start"]), float(story["end"])
    span = max(t1 - t0, 1e-6)

    def clock(t: float) -> str:
        return format_clock(t, tz)

    def pct(t: float) -> str:  # a time's place on the axis, in percent of its width
        return f"{max(0.0, min(100.0, (t - t0) / span * 100)):.3f}"

    esc = _esc
    ended = run.get("ended_at")
    until = clock(float(ended)) if isinstance(ended, int | float) else "(no end)"
    title = f"run {run['run_id']}" + (f" · {run['flow']}" if run["flow"] else "")
    cards = [
        ("status", summary["status"]),
        ("duration", format_duration(summary["duration"])),
        ("nodes", str(summary["nodes"])),
        ("attempts", str(summary["attempts"])),
        ("retries", str(summary["retries"])),
        ("faults", str(summary["faults"])),
        ("replays", str(summary["replays"])),
        ("compensations", str(summary["compensations"])),
        ("waited", format_duration(summary["waited"])),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head>",
        f'<body data-status="{esc(summary["status"])}">',
        '<header><div class="title">',
        f'<h1>run <span class="run-id">{esc(run["run_id"])}</span></h1>',
        f'<span class="badge st-{_css_name(summary["status"])}">{esc(summary["status"])}</span>',
        "</div>",
        f'<p class="sub">flow <b>{esc(run["flow"] or "-")}</b> · {esc(clock(run["started_at"]))}'
        f" → {esc(until)}</p></header>",
        '<section class="cards" id="summary">',
    ]
    for label, value in cards:
        cls = f" c-{label}" if label in ("faults", "retries", "replays", "compensations") else ""
        cls += f" s-{_css_name(value)}" if label == "status" else ""
        zero = " zero" if value in ("0", "0 µs") else ""
        out.append(
            f'<div class="card{cls}{zero}"><div class="v">{esc(value)}</div>'
            f'<div class="k">{esc(label)}</div></div>'
        )
    out.append("</section>")
    out.append('<section class="timeline" id="timeline"><div class="axis"><div></div><div>')
    for tick, label in _ticks(span):
        out.append(f'<span class="tick" style="left:{pct(t0 + tick)}%">{esc(label)}</span>')
    out.append('</div></div><div class="grid">')
    out.extend(f'<i style="left:{pct(t0 + tick)}%"></i>' for tick, _ in _ticks(span)[1:])
    out.append("</div>")
    for lane in story["lanes"]:
        out.append(_lane_html(lane, pct, clock))
    if story["marks"]:
        out.append('<div class="lane run-lane"><div class="name"><b>run</b></div>')
        out.append('<div class="track" style="--rows:1">')
        for mark in story["marks"]:
            out.append(_mark_html(mark, pct, clock, row=0))
        out.append("</div></div>")
    out.append(_LEGEND)
    out.append("</section>")
    out.append(_table_html(story["lanes"]))
    out.append(_events_html(story["events"], clock))
    out.append('<div id="tip" role="tooltip" hidden></div>')
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _css_name(status: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in status.lower())


def _ticks(span: float) -> list[tuple[float, str]]:
    """Round offsets for the axis: four to seven of them, at 1, 2 or 5 times a power of ten."""
    raw = span / 7
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    count = int(span / step + 1e-9)
    return [
        (i * step, "0" if i == 0 else "+" + format_duration(i * step)) for i in range(count + 1)
    ]


def _lane_html(lane: Mapping[str, Any], pct: _Format, clock: _Format) -> str:
    esc = _esc
    status = lane["status"]
    facts = [plural(lane["attempts"], "attempt")] if lane["attempts"] else []
    if lane["faults"]:
        facts.append(plural(lane["faults"], "fault"))
    if lane["replays"]:
        facts.append(plural(lane["replays"], "replay"))
    if lane["compensations"] > 1:  # one is the lane's status
        facts.append(plural(lane["compensations"], "compensation"))
    out = [
        f'<div class="lane" data-node="{esc(lane["node"])}">',
        f'<div class="name"><span class="dot st-{_css_name(status)}"></span>'
        f'<b title="{esc(lane["node"])}">{esc(lane["node"])}</b>'
        f'<span class="facts">{esc(status)}'
        + "".join(f" · {esc(fact)}" for fact in facts)
        + "</span></div>",
        f'<div class="track" style="--rows:{lane["rows"]}">',
    ]
    for segment in lane["segments"]:
        out.append(_segment_html(lane["node"], segment, pct, clock))
    for mark in lane["marks"]:
        out.append(_mark_html(mark, pct, clock, row=0))
    out.append("</div></div>")
    return "".join(out)


def _segment_html(node: str, segment: Mapping[str, Any], pct: _Format, clock: _Format) -> str:
    kind = segment["type"]
    took = format_duration(segment["end"] - segment["start"])
    when = f"{clock(segment['start'])} → {clock(segment['end'])} ({took})"
    label = ""
    classes = [f"seg {kind}"]
    if kind == "attempt":
        outcome = segment.get("outcome", "running")
        classes.append(f"o-{_css_name(outcome)}")
        head = f"{node} · attempt {segment['attempt']} · {outcome}"
        label = f"#{segment['attempt']}"
        if segment.get("timed_out"):
            head += " · timed out"
            label += " timed out"
    elif kind == "wait":
        head = f"{node} · wait before attempt {segment.get('before_attempt')}"
        when += f"\nbackoff asked: {format_duration(float(segment.get('wait') or 0.0))}"
    elif kind == "replay":
        source = "the flow's journal" if segment.get("source") == "journal" else "its key record"
        head = f"{node} · replayed from {source}"
        when = clock(segment["start"])
        if segment.get("key"):
            when += f"\nkey {segment['key']}"
        if segment.get("outcome") == "error":
            classes.append("o-error")
            when += "\nthe recorded error was raised again"
        label = "↺"
    elif kind == "compensation":
        classes.append(f"o-{_css_name(str(segment.get('outcome', '')))}")
        head = f"{node} · compensation {segment.get('outcome', '')}"
        label = "↩"
    else:
        head = f"{node} · {kind} {segment.get('reason') or ''}".rstrip()
        when = clock(segment["start"])
        label = "»"
    tip = head + "\n" + when
    if segment.get("kind"):
        tip += f"\nerror kind: {segment['kind']}"
    if segment.get("error"):
        tip += f"\n{segment['error']}"
    left, right = pct(segment["start"]), pct(segment["end"])
    width = f"{max(float(right) - float(left), 0.0):.3f}"
    if kind == "wait" and float(width) >= 7:
        label = format_duration(segment["end"] - segment["start"])
    elif kind in ("attempt", "wait") and float(width) < 2.4:
        label = ""  # no room: the tooltip and the lane's facts say it
    fault = ""
    if kind == "attempt" and segment.get("outcome") in ("retried", "failed"):
        fault = '<i class="fault" aria-label="fault">✕</i>'
    return (
        f'<div class="{" ".join(classes)}" style="left:{left}%;width:{width}%;--ri:'
        f'{segment.get("row", 0)}" data-tip="{_esc(tip)}" title="{_esc(tip)}" tabindex="0">'
        f"<span>{_esc(label)}</span>{fault}</div>"
    )


def _mark_html(mark: Mapping[str, Any], pct: _Format, clock: _Format, *, row: int) -> str:
    tip = f"{mark['name']} · {clock(mark['t'])}"
    if mark.get("detail"):
        tip += f"\n{mark['detail']}"
    if mark.get("error"):
        tip += f"\n{mark['error']}"
    return (
        f'<div class="mark k-{_css_name(mark["kind"])}" style="left:{pct(mark["t"])}%;'
        f'--ri:{row}" data-tip="{_esc(tip)}" title="{_esc(tip)}" tabindex="0"></div>'
    )


def _table_html(lanes: Sequence[Mapping[str, Any]]) -> str:
    head = ("node", "status", "attempts", "retries", "faults", "replays", "time", "last error")
    rows = []
    for lane in lanes:
        cells = [
            f'<td class="node">{_esc(lane["node"])}</td>',
            f'<td class="st"><span class="dot st-{_css_name(lane["status"])}"></span>'
            f"{_esc(lane['status'])}</td>",
            f'<td class="n">{lane["attempts"]}</td>',
            f'<td class="n">{lane["retries"]}</td>',
            f'<td class="n{" hot" if lane["faults"] else ""}">{lane["faults"]}</td>',
            f'<td class="n">{lane["replays"]}</td>',
            f'<td class="n">{_esc(format_duration(lane["end"] - lane["start"]))}</td>',
            f'<td class="err">{_esc(lane["error"] or "")}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<section id="nodes"><h2>Nodes</h2><table><thead><tr>'
        + "".join(
            f'<th class="{"" if h in ("node", "status", "last error") else "n"}">{h}</th>'
            for h in head
        )
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _events_html(events: Sequence[Mapping[str, Any]], clock: _Format, limit: int = 2000) -> str:
    rows = []
    for event in events[:limit]:
        rows.append(
            "<tr>"
            f'<td class="n">{_esc(clock(event["t"]))}</td>'
            f"<td>{_esc(event['name'])}</td>"
            f'<td class="node">{_esc(event["node"] or "")}</td>'
            f'<td class="n">{event["attempt"] or ""}</td>'
            f'<td class="err">{_esc(event["detail"])}'
            + (f" <b>{_esc(event['error'])}</b>" if event["error"] else "")
            + "</td></tr>"
        )
    more = f" (first {limit})" if len(events) > limit else ""
    return (
        f'<section id="events"><details><summary>All events: {len(events)}{more}</summary>'
        "<table><thead><tr><th>time</th><th>event</th><th>node</th><th>attempt</th>"
        "<th>detail</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        "</details></section>"
    )


_LEGEND = (
    '<div class="legend">'
    '<span><i class="seg attempt o-succeeded"></i>attempt</span>'
    '<span><i class="seg attempt o-retried"></i>attempt met a fault<b class="x">✕</b></span>'
    '<span><i class="seg attempt o-failed"></i>failed</span>'
    '<span><i class="seg wait"></i>wait (backoff)</span>'
    '<span><i class="seg replay"></i>replayed</span>'
    '<span><i class="seg compensation o-compensated"></i>compensated</span>'
    '<span><i class="mark k-guard"></i>guard</span>'
    '<span><i class="mark k-fault"></i>fault</span>'
    "</div>"
)

_CSS = """
:root{--bg:#f7f8fa;--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--card:#fff;
--ok:#2f9e44;--retry:#f59f00;--bad:#e03131;--wait:#98a2b3;--replay:#7048e8;--comp:#0c8599;
--run:#1c7ed6;--rh:26px}
*{box-sizing:border-box}
body{margin:0;padding:28px 32px;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header .title{display:flex;align-items:center;gap:12px}
h1{font-size:22px;margin:0;font-weight:600}
h1 .run-id{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:20px}
h2{font-size:15px;margin:26px 0 8px;color:var(--muted);font-weight:600;text-transform:uppercase;
letter-spacing:.04em}
.sub{margin:6px 0 18px;color:var(--muted)}
.sub b{color:var(--fg)}
.badge{padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;color:#fff;
background:var(--wait);text-transform:uppercase;letter-spacing:.05em}
.st-succeeded{background:var(--ok)}.st-failed,.st-crashed,.st-compensation-failed{background:var(--bad)}
.st-compensated{background:var(--comp)}.st-replayed{background:var(--replay)}
.st-running{background:var(--run)}.st-cancelled,.st-skipped,.st-interrupted,.st-noted{background:var(--wait)}
.st-fallback{background:var(--retry)}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:22px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 14px;
flex:1 1 auto;min-width:92px}
.card .v{font-size:20px;font-weight:650;font-variant-numeric:tabular-nums}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card.zero .v{color:#98a2b3}.card.s-failed .v,.card.s-crashed .v{color:var(--bad)}
.card.s-succeeded .v{color:var(--ok)}.card.s-compensated .v{color:var(--comp)}
.card.c-faults:not(.zero) .v{color:var(--bad)}.card.c-retries:not(.zero) .v{color:#d97706}
.card.c-replays:not(.zero) .v{color:var(--replay)}.card.c-compensations:not(.zero) .v{color:var(--comp)}
.timeline{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:14px 18px 12px}
.axis,.lane{display:grid;grid-template-columns:230px 1fr;gap:14px;align-items:center}
.axis>div:last-child{position:relative;height:20px;border-bottom:1px solid var(--line)}
.tick{position:absolute;top:0;font-size:11px;color:var(--muted);transform:translateX(-50%);
white-space:nowrap;font-variant-numeric:tabular-nums}
.tick:first-child{transform:none}
.lane{padding:7px 0;border-bottom:1px dashed var(--line)}
.lane:last-of-type{border-bottom:0}
.name{display:flex;flex-direction:column;min-width:0;padding-left:16px;position:relative}
.name b{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;font-weight:600;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.name .dot{position:absolute;left:0;top:6px}
.facts{font-size:12px;color:var(--muted)}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.track{position:relative;height:calc(var(--rows) * var(--rh) + 6px)}
.timeline{position:relative}
.grid{position:absolute;left:262px;right:18px;top:34px;bottom:44px;pointer-events:none}
.grid i{position:absolute;top:0;bottom:0;border-left:1px solid #eef0f3}
.seg{position:absolute;top:calc(var(--rh) * var(--ri, 0) + 3px);height:calc(var(--rh) - 6px);
min-width:6px;border-radius:5px;display:flex;align-items:center;justify-content:center;
color:#fff;font-size:11px;font-weight:600;overflow:visible;cursor:default;outline:none}
.seg span{overflow:hidden;white-space:nowrap;padding:0 2px}
.seg.attempt.o-succeeded{background:var(--ok)}
.seg.attempt.o-retried{background:var(--retry)}
.seg.attempt.o-failed{background:var(--bad)}
.seg.attempt.o-running{background:linear-gradient(90deg,var(--run),#74c0fc)}
.seg.attempt.o-interrupted{background:repeating-linear-gradient(45deg,#868e96 0 6px,#adb5bd 6px 12px)}
.seg.wait{background:repeating-linear-gradient(135deg,#d0d5dd 0 4px,#f2f4f7 4px 8px);
border:1px solid #d0d5dd;color:var(--muted);height:calc(var(--rh) - 14px);margin-top:4px}
.seg.replay{background:var(--replay);min-width:16px;transform:translateX(-50%);border-radius:8px}
.seg.replay.o-error{background:var(--bad)}
.seg.compensation{background:repeating-linear-gradient(135deg,var(--comp) 0 6px,#3bc9db 6px 12px);
min-width:16px}
.seg.compensation.o-failed{background:repeating-linear-gradient(135deg,var(--bad) 0 6px,#ff8787 6px 12px)}
.seg.skipped{background:transparent;border:1px dashed var(--wait);color:var(--muted);min-width:16px;
transform:translateX(-50%)}
.fault{position:absolute;right:-7px;top:-7px;width:15px;height:15px;border-radius:50%;
background:var(--bad);color:#fff;font-style:normal;font-size:9px;line-height:15px;text-align:center;
box-shadow:0 0 0 2px #fff}
.mark{position:absolute;top:calc(var(--rh) * var(--ri, 0) + var(--rh) - 4px);width:10px;height:10px;transform:translate(-50%,0) rotate(45deg);
background:var(--run);border:2px solid #fff;box-shadow:0 0 0 1px rgba(0,0,0,.15)}
.mark.k-fault{background:var(--bad)}.mark.k-guard{background:#f08c00}
.mark.k-fallback{background:var(--retry)}.mark.k-compensation{background:var(--comp)}
.mark.k-note{background:#adb5bd;width:7px;height:7px}
.seg:hover,.seg:focus,.mark:hover,.mark:focus{filter:brightness(1.08);box-shadow:0 0 0 2px var(--fg)}
.legend{display:flex;flex-wrap:wrap;gap:16px;margin-top:12px;font-size:12px;color:var(--muted)}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend .seg,.legend .mark{position:static;display:inline-block;width:22px;height:12px;min-width:0;
transform:none;margin:0}
.legend .mark{width:9px;height:9px;transform:rotate(45deg)}
.legend .x{color:var(--bad);margin-left:2px}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:10px;overflow:hidden;font-size:13px}
th.n{text-align:right}
th{text-align:left;font-weight:600;color:var(--muted);background:#f2f4f7;padding:7px 10px}
td{padding:6px 10px;border-top:1px solid var(--line);vertical-align:top}
td.n{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
td.st{white-space:nowrap}
td.hot{color:var(--bad);font-weight:650}
td.node{font-family:ui-monospace,"DejaVu Sans Mono",monospace}
td.err{color:#b42318;font-size:12px;word-break:break-word}
#events details{margin-top:22px}
#events summary{cursor:pointer;color:var(--muted);font-weight:600}
#events table{margin-top:8px}
#events td.err{color:var(--muted)}
#events td.err b{color:#b42318;font-weight:500}
#tip{position:fixed;z-index:10;max-width:440px;background:#1d2330;color:#fff;padding:8px 11px;
border-radius:8px;font-size:12px;line-height:1.45;white-space:pre-line;pointer-events:none;
box-shadow:0 6px 24px rgba(0,0,0,.25)}
#tip b{display:block;font-size:12.5px;margin-bottom:2px}
"""

_JS = """
(function(){
  var tip = document.getElementById('tip');
  document.querySelectorAll('[data-tip]').forEach(function(el){
    el.removeAttribute('title');
  });
  function show(el, x, y){
    var lines = el.getAttribute('data-tip').split('\\n');
    tip.textContent = '';
    var head = document.createElement('b');
    head.textContent = lines.shift();
    tip.appendChild(head);
    tip.appendChild(document.createTextNode(lines.join('\\n')));
    tip.hidden = false;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var left = Math.min(x + 14, window.innerWidth - w - 8);
    var top = y + 18 + h > window.innerHeight ? y - h - 12 : y + 18;
    tip.style.left = Math.max(8, left) + 'px';
    tip.style.top = Math.max(8, top) + 'px';
  }
  document.addEventListener('mousemove', function(ev){
    var el = ev.target.closest && ev.target.closest('[data-tip]');
    if (el) { show(el, ev.clientX, ev.clientY); } else { tip.hidden = true; }
  });
  document.addEventListener('focusin', function(ev){
    var el = ev.target.closest && ev.target.closest('[data-tip]');
    if (el) { var r = el.getBoundingClientRect(); show(el, r.left, r.bottom); }
  });
  document.addEventListener('focusout', function(){ tip.hidden = true; });
  var pinned = /^#tip=(\\d+)$/.exec(location.hash);
  if (pinned) {
    var el = document.querySelectorAll('.track [data-tip]')[+pinned[1]];
    if (el) { var r = el.getBoundingClientRect(); show(el, r.left + r.width / 2, r.bottom - 8); }
  }
  document.body.setAttribute('data-ready', '1');
})();
"""
