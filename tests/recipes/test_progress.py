"""recipes._progress: on a terminal with rich, the checkout demo shows a live row per node and
ends each pass with a table; anywhere else (a pipe, a file, --plain, --quiet, no rich) it
prints its plain lines, unchanged.

The rich output is drawn on a `Console` writing to a `StringIO` as if it were a terminal, and
read back without its ANSI codes; counts are checked against nodekit's own events.
"""

from __future__ import annotations

import io
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

import nodekit as nk
from nodekit.testing import FaultPlan, Instant, capture_events
from nodekit.testing._server import FAULT_KINDS
from recipes import _progress, checkout
from recipes._demo_api import DemoAPI

NODES = ("reserve_stock", "charge_payment", "send_receipt", "write_audit")
FAST_KINDS = tuple(kind for kind in FAULT_KINDS if kind != "slow")  # timeouts are real
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SHOW_CURSOR = "\x1b[?25h"


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    plan = FaultPlan(seed=7, rate=0.25, kinds=FAST_KINDS, retry_after=0)
    with DemoAPI(faults=plan, webhook_secret=checkout.WEBHOOK_SECRET) as server:
        yield server


def terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120), screen


def run(api: DemoAPI, data: Path, console: Console, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    argv = ["--api-url", api.url, "--data-dir", str(data), "--orders", "4", *extra]
    return checkout.main(argv, out=out, console=console), out.getvalue()


def live_rows(screen: str) -> dict[str, tuple[int, ...]]:
    """The last frame's row of each node: settled, done, running, retries, failed, replayed."""
    rows: dict[str, tuple[int, ...]] = {}
    pattern = r"^(\w+)\s+\S*\s+(\d+)/\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$"
    for match in re.finditer(pattern, screen, re.MULTILINE):
        rows[match[1]] = tuple(int(value) for value in match.groups()[1:])
    return rows


def table_rows(screen: str) -> dict[str, tuple[str, ...]]:
    """The summary table's rows: node -> calls, retries, failed, replayed, mean ms, p95 ms."""
    rows: dict[str, tuple[str, ...]] = {}
    for line in screen.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 7 and cells[0] in NODES:
            rows[cells[0]] = tuple(cells[1:])
    return rows


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_on_a_terminal_each_node_has_a_live_row_and_a_table_row_with_its_counts(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, mode: str
) -> None:
    console, screen = terminal()
    with capture_events(prefix="node.") as events:
        code, out = run(api, tmp_path, console, "--mode", mode, "--concurrency", "4")
    assert code == 0, out
    retries = Counter(event.node for event in events.named("node.retrying"))
    assert sum(retries.values()) > 0  # the faults were met
    drawn = ANSI.sub("", screen.getvalue())

    # settled, done, running, retries, failed, replayed
    assert live_rows(drawn) == {node: (4, 4, 0, retries[node], 0, 0) for node in NODES}
    table = table_rows(drawn)
    assert sorted(table) == sorted(NODES)
    for node, (calls, retried, failed, replayed, mean, p95) in table.items():
        assert (calls, retried, failed, replayed) == ("4", str(retries[node]), "0", "0")
        assert float(mean) > 0
        assert float(p95) > 0
    # the live view replaces the line per node; the rest of the summary stays plain text
    assert "4 of 4 orders completed" in out
    assert not re.search(r"reserve_stock +[\d.]+ ms", out)
    assert not re.search(r"node +calls +retries", out)


def test_a_replayed_pass_shows_every_node_replayed_and_no_call(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    assert run(api, tmp_path, terminal()[0], "--quiet")[0] == 0
    console, screen = terminal()
    code, out = run(api, tmp_path, console)
    assert code == 0, out
    drawn = ANSI.sub("", screen.getvalue())
    assert live_rows(drawn) == dict.fromkeys(NODES, (4, 0, 0, 0, 0, 4))
    assert table_rows(drawn) == dict.fromkeys(NODES, ("0", "0", "0", "4", "-", "-"))
    assert "node results replayed from the journal: 16" in out


@pytest.mark.parametrize("flag", ["--plain", "--quiet"])
def test_plain_and_quiet_print_the_plain_lines_even_given_a_terminal(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, flag: str
) -> None:
    console, screen = terminal()
    code, out = run(api, tmp_path, console, flag)
    assert code == 0, out
    assert screen.getvalue() == ""
    assert re.search(r"node +calls +retries +mean ms", out), out
    if flag == "--plain":
        assert re.search(r"o-0001 +reserve_stock +[\d.]+ ms", out), out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_console_is_used_only_on_a_terminal_with_rich_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _progress.terminal_console(io.StringIO()) is None  # a pipe, a file, CI's log
    assert _progress.terminal_console(_Terminal(), plain=True) is None
    console = _progress.terminal_console(_Terminal())
    assert console is not None
    assert console.is_terminal
    monkeypatch.setitem(sys.modules, "rich.console", None)  # rich not installed
    assert _progress.terminal_console(_Terminal()) is None


@nk.node(name="charge_payment")
def charge_payment() -> None:
    """A node by the name of one of the recipe's."""


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_live_view_stops_and_restores_the_cursor_however_the_run_ends(
    error: type[BaseException],
) -> None:
    console, screen = terminal()
    shown: list[_progress.NodeCounts] = []

    def run_then_fail() -> None:
        with _progress.live_view(console, total=3) as counts:
            shown.append(counts)
            charge_payment()
            raise error

    with pytest.raises(error):
        run_then_fail()
    assert screen.getvalue().endswith(SHOW_CURSOR)
    assert live_rows(ANSI.sub("", screen.getvalue())) == {"charge_payment": (1, 1, 0, 0, 0, 0)}
    charge_payment()  # the view's sink is gone: this call is not counted
    assert shown[0].rows() == {"charge_payment": _progress.NodeRow(started=1, succeeded=1)}
    with _progress.live_view(console, total=3):  # nothing left running
        pass


def test_node_counts_are_exact_when_fed_from_many_threads() -> None:
    counts = _progress.NodeCounts()
    names = ("node.started", "node.retrying", "node.succeeded", "node.replayed", "flow.started")

    def feed(node: str) -> None:
        for _ in range(500):
            for name in names:
                counts(nk.Event(name, node=node))

    threads = [threading.Thread(target=feed, args=(f"n{i % 2}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = _progress.NodeRow(started=2000, succeeded=2000, retries=2000, replayed=2000)
    assert counts.rows() == {"n0": row, "n1": row}
    assert (row.done, row.running, row.settled) == (2000, 0, 4000)


def test_on_a_terminal_a_failed_order_is_still_told_above_the_live_view(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """The line per node gives way to the live rows; a failure's line is kept."""
    console, screen = terminal()
    code, out = run(api, tmp_path, console, "--stock", "2")
    assert code == 1
    drawn = ANSI.sub("", screen.getvalue())
    failed = set(re.findall(r"(o-\d{4}) +FAILED at reserve_stock: OutOfStock", drawn))
    assert 0 < len(failed) < 4
    assert live_rows(drawn)["reserve_stock"][4] == len(failed)
    assert table_rows(drawn)["reserve_stock"][2] == str(len(failed))
    assert "FAILED" not in out
    assert not re.search(r"reserve_stock +[\d.]+ ms", drawn + out)
