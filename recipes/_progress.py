"""The recipes' live progress view: a row per node while a run goes, then a summary table.

Both are drawn with rich, which the recipes treat as optional (``pip install 'nodekit[rich]'``):
`terminal_console` answers None when the output is not a terminal (CI, a pipe, a file), when
the user asked for plain lines, or when rich is not installed, and the recipe then prints its
plain lines instead. rich is imported only by the functions that draw.

`NodeCounts` is the event sink behind the view. Nodes finish in worker threads (sync mode) and
in tasks (async mode), so it only swaps one small row under a lock; the view reads a copy
of the rows from rich's refresh thread, a few times a second.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TextIO

import nodekit as nk

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["NodeCounts", "NodeRow", "live_view", "notes", "summary_table", "terminal_console"]


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node's calls so far: `started` calls, of which `succeeded` and `failed` finished;
    `retries` (attempts that were retried) and `replayed` (answers from a key's record or a
    flow's journal, which run nothing)."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    replayed: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def running(self) -> int:
        return max(0, self.started - self.done)

    @property
    def settled(self) -> int:
        """Calls that will not move again: finished, or replayed without a call."""
        return self.done + self.replayed


_FIELDS = {
    "node.started": "started",
    "node.succeeded": "succeeded",
    "node.failed": "failed",
    "node.retrying": "retries",
    "node.replayed": "replayed",
}


class NodeCounts:
    """An event sink counting each node's calls, retries, failures and replays.

    Cheap and thread-safe: one dict lookup for events it ignores, a short lock for the rest.
    `rows()` is a consistent copy, safe to read while nodes run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, NodeRow] = {}

    def __call__(self, event: nk.Event, /) -> None:
        field = _FIELDS.get(event.name)
        if field is None or event.node is None:
            return
        with self._lock:
            row = self._rows.get(event.node) or NodeRow()
            self._rows[event.node] = replace(row, **{field: getattr(row, field) + 1})

    def rows(self) -> dict[str, NodeRow]:
        """Every node seen so far, in the order they were first seen (the flow's order)."""
        with self._lock:
            return dict(self._rows)


def terminal_console(out: TextIO, *, plain: bool = False) -> Console | None:
    """A rich console writing to `out`, or None for plain lines: when `plain` is asked for,
    when `out` is not a terminal, or when rich is not installed."""
    if plain or not _isatty(out):
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=out)


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


@contextlib.contextmanager
def live_view(console: Console, *, total: int) -> Iterator[NodeCounts]:
    """Show each node's counts as a live table, a row per node, while the block runs.

    A `NodeCounts` sink is registered for the block (and yielded). `total` is the calls each
    node is expected to settle (one per order). The view redraws itself a few times a second
    from its own thread; it stops — the cursor restored, the last frame left on screen —
    however the block ends, an error or Ctrl-C included.
    """
    from rich.live import Live

    counts = NodeCounts()
    remove = nk.add_sink(counts)
    try:
        with Live(
            console=console,
            get_renderable=lambda: _live_table(counts.rows(), total),
            refresh_per_second=8,
            redirect_stdout=False,  # the recipe writes to its own `out`, not through sys.stdout
            redirect_stderr=False,
        ):
            yield counts
    finally:
        remove()


def notes(console: Console) -> Callable[[str], None]:
    """A writer of plain lines that a live view on `console` shows above itself (from any
    thread: the console serialises its output)."""

    def note(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    return note


_BAR = 12  # characters: the whole row fits an 80-column terminal


def _live_table(rows: Mapping[str, NodeRow], total: int) -> Table:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("node", no_wrap=True, min_width=max(map(len, rows), default=4))
    table.add_column("", width=_BAR)
    table.add_column("settled", justify="right")
    for header in ("done", "running", "retries", "failed", "replayed"):
        table.add_column(header, justify="right")
    for node, row in rows.items():
        table.add_row(
            node,
            ProgressBar(total=max(total, row.settled, 1), completed=row.settled, width=_BAR),
            f"{row.settled}/{total}",
            str(row.done),
            str(row.running),
            str(row.retries),
            _red(row.failed),
            str(row.replayed),
        )
    return table


def _red(count: int) -> str:
    return f"[red]{count}[/]" if count else "0"


def summary_table(snapshot: Mapping[str, nk.NodeMetrics]) -> Table:
    """The per-node summary of a `nk.Metrics` snapshot: what the plain lines' ``node calls
    retries mean ms`` block says, with failures, replays and the 95th percentile."""
    from rich.table import Table

    table = Table(title="nodes", title_justify="left")
    table.add_column("node")
    for header in ("calls", "retries", "failed", "replayed", "mean ms", "p95 ms"):
        table.add_column(header, justify="right")
    for name, stats in sorted(snapshot.items()):
        table.add_row(
            name,
            str(stats.calls),
            str(stats.retries),
            _red(stats.failures),
            str(stats.replays),
            _ms(stats.latency_mean if stats.successes + stats.failures else None),
            _ms(stats.latency_p95),
        )
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"
