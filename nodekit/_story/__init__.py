"""The story of one run: its events turned into lanes of attempts, waits, faults and replays.

`build_story` reads a run's stored events (``{**event.as_dict(), "t": event.time,
"name": event.name}``) and returns plain data (JSON-able): per node a lane of segments on one
time axis, and the run's summary. `render_text` draws it as a terminal timeline,
`render_html` as one self-contained page (inline CSS and JS, nothing fetched). All three are
pure: no I/O, no clock, no third-party import. Times print in local time unless a `tz` is
given. Every text taken from events (node names, error texts) is escaped in the page, and
its control characters are escaped in the text (`printable`).

What a node's events say, and how they become segments: ``node.started`` opens a call (its
first attempt); ``node.retrying`` ends attempt n with a fault and starts the wait before n+1
(the wait ends at ``t + wait``, or earlier when the next attempt already ended: instant mode);
``node.succeeded`` / ``node.failed`` end the last attempt; ``node.replayed`` is a replay (from
the flow's journal, or a keyed record); ``node.compensated`` / ``node.compensation_failed`` a
compensation; ``flow.node_skipped`` a skipped node. A durable run's log has no
``node.started``/``node.succeeded`` (they are not emitted unless someone observes every
call): a step with no call events is one attempt from ``flow.node_started`` to
``flow.node_finished``, and a retried step's last attempt ends at ``flow.node_finished``. Guard events (circuit, rate limit,
bulkhead, idempotency warnings), fallbacks and any other event naming a node (progress) are
marks on its lane.
"""

from ._model import build_story
from ._page import render_html
from ._text import format_clock, format_duration, printable, render_text

__all__ = [
    "build_story",
    "format_clock",
    "format_duration",
    "printable",
    "render_html",
    "render_text",
]
