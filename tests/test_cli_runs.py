"""`nodekit runs` / `keys find` / `store stats` against real SQLite, Redis and PostgreSQL stores.

Every command runs on runs made for real: a run that succeeded, a run whose node retried and
failed, a run SIGKILLed mid-node in another process (crashed), a compensated run. Effects are
counted outside the process (a ledger file written with O_APPEND), never in a Python counter.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.cli import main
from nodekit.flow import _runlog
from nodekit.testing import Events, Instant

CRASH_DIR = Path(__file__).parent / "flow"  # _crash_worker.py: the five-node crash flow
LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")
EPOCH = re.compile(r"\b1\d{9}\.\d+")


@dataclass
class Target:
    """A store kind: how to open it in process, and its URL and options for the CLI."""

    kind: str
    make: Callable[[], Any]
    url: str
    options: list[str]
    worker_spec: str  # how the crash worker opens it (see `_WORKER`)
    opened: list[Any] = field(default_factory=list)

    def store(self) -> Any:
        store = self.make()
        self.opened.append(store)
        return store

    def cli(self, *args: str) -> list[str]:
        """A command line: verb words, then the URL, then the rest and the store options."""
        group, verb, *rest = args
        return [group, verb, self.url, *rest, *self.options]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.services),
        pytest.param("postgres", marks=pytest.mark.services),
    ]
)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind = request.param
    if kind == "sqlite":
        path = tmp_path / "runs.db"
        made = Target(kind, lambda: nk.SQLiteStore(path), f"sqlite:///{path}", [], f"sqlite:{path}")
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        made = Target(
            kind,
            lambda: nk.RedisStore(url, prefix=prefix),
            url,
            ["--prefix", prefix],
            f"redis:{url}|{prefix}",
        )
    else:
        from nodekit.idempotency.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("pg_schema")
        made = Target(
            kind,
            lambda: PostgresStore(url, schema=schema),
            url,
            ["--schema", schema],
            f"postgres:{url}|{schema}",
        )
    yield made
    for store in made.opened:
        store.close()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_rows(out: str) -> dict[str, list[str]]:
    """`runs list` output: the cells of each run, by run id."""
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["RUN", "FLOW", "STATUS"]
    return {line.split()[0]: line.split() for line in lines[1:]}


# ---------------------------------------------------------------------------- a flow module

_FLOWS = """
import os
import nodekit as nk

LEDGER = {ledger!r}
FLAG = {flag!r}

flow = nk.Flow("orders")


@flow.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=3))
def fetch(order: str) -> dict:
    if os.path.exists(FLAG):
        raise ConnectionError("upstream down")
    return {{"amount": 42}}


@flow.node(after=fetch)
def book(order: str, amount: int) -> dict:
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{{order}} {{amount}}\\n".encode())
    finally:
        os.close(fd)
    return {{"booked": True}}


not_a_flow = 42
"""


@dataclass
class Flows:
    module: str
    flow: Any
    ledger: Path
    flag: Path

    def booked(self) -> list[str]:
        return self.ledger.read_text().splitlines() if self.ledger.exists() else []


@pytest.fixture
def flows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flows:
    """A module of flows in the current directory, importable as `--flow module:flow`."""
    name = f"nk_runs_flows_{uuid.uuid4().hex[:8]}"
    ledger, flag = tmp_path / "ledger.txt", tmp_path / "fail.flag"
    (tmp_path / f"{name}.py").write_text(_FLOWS.format(ledger=str(ledger), flag=str(flag)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)
    return Flows(name, module.flow, ledger, flag)


# ---------------------------------------------------------------------------- the tests


def test_a_succeeded_and_a_failed_run_listed_shown_resumed_cancelled_and_forgotten(
    target: Target, flows: Flows, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    store = target.store()
    flows.flow.run({"order": "o-1"}, run_id="ok-1", store=store)
    flows.flag.write_text("1")
    with pytest.raises(nk.FlowError, match="fetch"):
        flows.flow.run({"order": "o-2"}, run_id="bad-1", store=store)
    assert nk_instant.sleeps  # it retried (without waiting)
    assert flows.booked() == ["o-1 42"]

    # list: both runs, their status, local ISO times (never epoch floats)
    code, out, err = run_cli(capsys, *target.cli("runs", "list"))
    assert code == 0, err
    rows = run_rows(out)
    assert set(rows) == {"ok-1", "bad-1"}
    assert rows["ok-1"][1:3] == ["orders", "succeeded"]
    assert rows["bad-1"][1:3] == ["orders", "failed"]
    assert len(LOCAL_TIME.findall(out)) == 4
    assert not EPOCH.search(out)
    # filters
    code, out, _ = run_cli(capsys, *target.cli("runs", "list", "--status", "failed"))
    assert list(run_rows(out)) == ["bad-1"]
    code, out, err = run_cli(capsys, *target.cli("runs", "list", "--flow", "other"))
    assert (code, out, err.strip()) == (0, "", "no runs")
    code, out, _ = run_cli(capsys, *target.cli("runs", "list", "--since", "1h"))
    assert set(run_rows(out)) == {"ok-1", "bad-1"}
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    code, out, err = run_cli(capsys, *target.cli("runs", "list", "--since", later))
    assert (code, out) == (0, "")

    # show: the timeline of the failed run, with its three attempts and local times
    code, out, err = run_cli(capsys, *target.cli("runs", "show", "bad-1"))
    assert code == 0, err
    assert "bad-1" in out
    assert "failed" in out
    fetch_line = next(line for line in out.splitlines() if " fetch " in f" {line} ")
    assert "3 attempts" in fetch_line
    assert "ConnectionError" in out
    assert not EPOCH.search(out)

    # resume: the state is checked against the journal's fingerprint of the input
    flows.flag.unlink()
    resume = target.cli("runs", "resume", "bad-1", "--flow", f"{flows.module}:flow")
    code, _, err = run_cli(capsys, *resume, "--state", '{"order": "o-other"}')
    assert code == 2
    assert "different input state" in err
    assert len(err.strip().splitlines()) == 1
    assert flows.booked() == ["o-1 42"]  # nothing ran
    (Path.cwd() / "state.json").write_text('{"order": "o-2"}')
    code, out, err = run_cli(capsys, *resume, "--state", "@state.json")
    assert code == 0, err
    assert "succeeded" in out
    assert flows.booked() == ["o-1 42", "o-2 42"]
    code, out, _ = run_cli(capsys, *target.cli("runs", "list"))
    assert run_rows(out)["bad-1"][2] == "succeeded"

    # cancel: a succeeded run has nothing to cancel; a failed one is refused on resume
    code, _, err = run_cli(capsys, *target.cli("runs", "cancel", "ok-1"))
    assert code == 2
    assert "nothing to cancel" in err
    flows.flag.write_text("1")
    with pytest.raises(nk.FlowError):
        flows.flow.run({"order": "o-3"}, run_id="bad-2", store=store)
    code, out, err = run_cli(capsys, *target.cli("runs", "cancel", "bad-2"))
    assert code == 0, err
    assert "cancelled run bad-2" in out
    flows.flag.unlink()
    with pytest.raises(nk.FlowError, match="was cancelled"):
        flows.flow.run({"order": "o-3"}, run_id="bad-2", store=store)
    code, _, err = run_cli(
        capsys,
        *target.cli("runs", "resume", "bad-2", "--flow", f"{flows.module}:flow"),
        "--state",
        '{"order": "o-3"}',
    )
    assert code == 2
    assert "was cancelled" in err
    assert len(err.strip().splitlines()) == 1
    assert flows.booked() == ["o-1 42", "o-2 42"]  # the cancelled run never booked
    code, out, _ = run_cli(capsys, *target.cli("runs", "list", "--status", "cancelled"))
    assert list(run_rows(out)) == ["bad-2"]

    # forget: the log and the journal go; a new run of that id starts from scratch
    backend = _runlog.backend_for(store)
    assert backend is not None
    journal = _runlog.journal_keys(backend.runs(run_id="ok-1")[0])
    assert all(store.get(key) is not None for key in journal)
    code, out, err = run_cli(capsys, *target.cli("runs", "forget", "ok-1"))
    assert code == 0, err
    assert "3 journal records deleted" in out
    assert all(store.get(key) is None for key in journal)
    code, out, _ = run_cli(capsys, *target.cli("runs", "list"))
    assert set(run_rows(out)) == {"bad-1", "bad-2"}
    code, _, err = run_cli(capsys, *target.cli("runs", "show", "ok-1"))
    assert code == 2
    assert "no run 'ok-1'" in err
    flows.flow.run({"order": "o-1"}, run_id="ok-1", store=store)
    assert flows.booked() == ["o-1 42", "o-2 42", "o-1 42"]


def test_keys_find_takes_the_fingerprint_an_event_printed(
    target: Target, nk_events: Events, capsys: pytest.CaptureFixture[str]
) -> None:
    store = target.store()
    flow = nk.Flow("shop")

    @flow.node(idempotency=nk.Idempotency(key=lambda order: order, store=store))
    def charge(order: str) -> dict[str, int]:
        return {"charged": 1}

    flow.run({"order": "o-9"}, run_id="shop-1", store=store)
    fingerprint = next(e["key"] for e in nk_events if e.name == "idempotency.completed")
    assert len(fingerprint) == 12

    code, out, err = run_cli(capsys, *target.cli("keys", "find", fingerprint))
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split()[:4] == ["NAMESPACE", "SCOPE", "DIGEST", "STATE"]
    assert len(rows) == 1
    namespace, scope, digest, state, *times = rows[0].split()
    assert (namespace, scope, state) == ("charge", "-", "COMPLETED")
    assert digest.startswith(fingerprint)
    assert len(digest) == 64
    assert all(LOCAL_TIME.fullmatch(t) for t in times if t != "-")
    assert "o-9" not in out  # never the key itself
    # the same fingerprint works where a digest is asked for
    code, out, _ = run_cli(capsys, *target.cli("store", "show", "charge", fingerprint))
    assert code == 0
    assert f"key_digest: {digest}" in out
    code, _, err = run_cli(capsys, *target.cli("keys", "find", "0" * 12))
    assert code == 1
    assert "no record" in err
    code, _, err = run_cli(capsys, *target.cli("keys", "find", "not-hex"))
    assert code == 2
    assert "hex digits" in err

    # store stats: every store, per namespace and state (the run's journal included)
    code, out, err = run_cli(capsys, *target.cli("store", "stats"))
    assert code == 0, err
    lines = set(out.strip().splitlines())
    assert {"charge\tCOMPLETED\t1", "flow:shop\tCOMPLETED\t1"} <= lines
    assert "flow:shop:charge\tCOMPLETED\t1" in lines


_WORKER = """
import sys
sys.path.insert(0, {crash_dir!r})
import _crash_worker
import nodekit as nk

spec, run_id, ledger = sys.argv[1:4]
kind, _, rest = spec.partition(":")
if kind == "sqlite":
    store = nk.SQLiteStore(rest)
elif kind == "redis":
    url, prefix = rest.split("|")
    store = nk.RedisStore(url, prefix=prefix)
else:
    from nodekit.idempotency.postgres import PostgresStore
    dsn, schema = rest.split("|")
    store = PostgresStore(dsn, schema=schema)
flow = _crash_worker.build(ledger)
print("ready", flush=True)
flow.run({{"seed": 1}}, run_id=run_id, store=store)
print("done", flush=True)
"""

_CRASH_FLOW = """
import sys
sys.path.insert(0, {crash_dir!r})
import _crash_worker

flow = _crash_worker.build({ledger!r})
"""


@pytest.mark.slow
def test_a_run_killed_mid_node_is_crashed_then_resumed(
    target: Target,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = tmp_path / "ledger.txt"
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER.format(crash_dir=str(CRASH_DIR)))
    proc = subprocess.Popen(
        [sys.executable, str(worker), target.worker_spec, "crash-1", str(ledger)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        # killed inside a node: after the second effect's line, before its node completes
        while len(ledger.read_text().splitlines() if ledger.exists() else []) < 2:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    done_before = {line.split()[1] for line in ledger.read_text().splitlines()}
    assert "load" not in done_before

    code, out, err = run_cli(capsys, *target.cli("runs", "list"))
    assert code == 0, err
    assert run_rows(out)["crash-1"][1:3] == ["crash", "crashed"]
    code, out, _ = run_cli(capsys, *target.cli("runs", "list", "--status", "crashed"))
    assert list(run_rows(out)) == ["crash-1"]
    code, out, err = run_cli(capsys, *target.cli("runs", "show", "crash-1"))
    assert code == 0, err
    assert "crashed" in out
    assert "extract" in out

    # resumed from the command line: the journaled nodes replay, the rest run
    (tmp_path / "crashflow.py").write_text(
        _CRASH_FLOW.format(crash_dir=str(CRASH_DIR), ledger=str(ledger))
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "crashflow", raising=False)
    code, out, err = run_cli(
        capsys,
        *target.cli("runs", "resume", "crash-1", "--flow", "crashflow:flow"),
        "--state",
        '{"seed": 1}',
    )
    assert code == 0, err
    lines = ledger.read_text().splitlines()
    assert {line.split()[1] for line in lines} == {"extract", "left", "right", "join", "load"}
    # a node effect at most twice (the killed one), each under one downstream key
    keys: dict[str, set[str]] = {}
    for line in lines:
        keys.setdefault(line.split()[1], set()).add(line.split()[2])
    assert all(len(k) == 1 for k in keys.values())
    code, out, _ = run_cli(capsys, *target.cli("runs", "list"))
    assert run_rows(out)["crash-1"][2] == "succeeded"


def test_a_compensated_run_is_listed_as_compensated(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = target.store()
    ledger = tmp_path / "undo.txt"
    flow = nk.Flow("saga")

    def undo(order: str) -> None:
        with open(ledger, "a") as file:
            file.write(f"refund {order}\n")

    def reserve(order: str) -> dict[str, bool]:
        return {"reserved": True}

    def ship(order: str) -> dict[str, bool]:
        raise ValueError("no truck")

    first = flow.add(reserve, compensate=undo)
    flow.add(ship, after=first)
    with pytest.raises(nk.FlowError, match="compensated: reserve"):
        flow.run({"order": "o-5"}, run_id="saga-1", store=store)
    assert ledger.read_text() == "refund o-5\n"
    code, out, err = run_cli(capsys, *target.cli("runs", "list"))
    assert code == 0, err
    assert run_rows(out)["saga-1"][1:3] == ["saga", "compensated"]
    code, out, err = run_cli(capsys, *target.cli("runs", "show", "saga-1"))
    assert code == 0, err
    assert "compensated" in out
    assert "reserve" in out


def test_runs_show_html_writes_one_page(
    target: Target, flows: Flows, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    flows.flow.run({"order": "o-1"}, run_id="page-1", store=target.store())
    page = Path.cwd() / "run.html"
    code, _out, err = run_cli(capsys, *target.cli("runs", "show", "page-1", "--html", str(page)))
    assert code == 0, err
    text = page.read_text()
    assert text.lstrip().lower().startswith("<!doctype html")
    assert "page-1" in text
    assert "fetch" in text
    assert "book" in text
    assert "http://" not in text
    assert "https://" not in text


def test_a_run_cancelled_while_it_runs_stops_before_its_next_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.db"
    store = nk.SQLiteStore(path)
    monkeypatch.setattr(_runlog, "FLUSH_EVERY", 0.0)  # the log is written at every node
    ledger = tmp_path / "ledger.txt"
    flow = nk.Flow("long")

    def step(name: str) -> Callable[[], dict[str, bool]]:
        def run() -> dict[str, bool]:
            with open(ledger, "a") as file:
                file.write(name + "\n")
            if name == "one":  # the operator cancels the run while its first node runs
                assert main(["runs", "cancel", f"sqlite:///{path}", "long-1"]) == 0
            return {name: True}

        return run

    one = flow.add(step("one"), name="one")
    two = flow.add(step("two"), name="two", after=one)
    flow.add(step("three"), name="three", after=two)
    with pytest.raises(nk.FlowError, match=r"cancelled .* while it ran"):
        flow.run({}, run_id="long-1", store=store)
    assert ledger.read_text().splitlines() == ["one"]
    assert "stops before its next node" in capsys.readouterr().out
    store.close()


# ---------------------------------------------------------------------------- errors


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_urls_paths_and_runs_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.db"
    store = nk.SQLiteStore(path)
    flow = nk.Flow("tiny")

    @flow.node
    def only(x: int) -> dict[str, int]:
        return {"y": x}

    flow.run({"x": 1}, run_id="t-1", store=store)
    store.close()
    url = f"sqlite:///{path}"
    port = _free_port()
    monkeypatch.chdir(tmp_path)
    cases = [
        (["runs", "list", "ftp://nowhere"], "unknown store URL scheme"),
        (["runs", "list", "memory://"], "n/a"),
        (["store", "stats", "memory://"], "does not report statistics"),
        (["runs", "list", f"sqlite:///{tmp_path / 'missing.db'}"], "does not exist"),
        (["runs", "list", f"sqlite:///{tmp_path}"], "is a directory"),
        (["runs", "list", f"redis://127.0.0.1:{port}/0"], "cannot reach the store"),
        (["runs", "show", url, "nope"], "no run 'nope'"),
        (["runs", "cancel", url, "nope"], "no run 'nope'"),
        (["runs", "forget", url, "nope"], "no run 'nope'"),
        (["runs", "list", url, "--since", "yesterday"], "--since 'yesterday'"),
        (
            ["runs", "resume", url, "t-1", "--flow", "nomodule_xyz:flow", "--state", "{}"],
            "cannot import",
        ),
        (["runs", "resume", url, "t-1", "--flow", "json:nothing", "--state", "{}"], "no attribute"),
        (["runs", "resume", url, "t-1", "--flow", "json:dumps", "--state", "{}"], "not an nk.Flow"),
        (["runs", "resume", url, "t-1", "--flow", "nocolon", "--state", "{}"], "module:attribute"),
        (["runs", "resume", url, "t-1", "--flow", "json:dumps", "--state", "{bad"], "not JSON"),
        (
            ["runs", "resume", url, "t-1", "--flow", "json:dumps", "--state", "@nofile"],
            "cannot read",
        ),
    ]
    for argv, says in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert says in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.slow
def test_the_command_line_prints_no_traceback(tmp_path: Path) -> None:
    """As a process (``python -m nodekit``): one line on stderr, exit status 2."""
    missing = tmp_path / "missing.db"
    port = _free_port()
    for argv in (
        ["runs", "list", f"sqlite:///{missing}"],
        ["store", "stats", f"postgresql://nobody@127.0.0.1:{port}/nothing"],
        ["keys", "find", f"redis://127.0.0.1:{port}/0", "abcdef012345"],
        ["runs", "resume", f"sqlite:///{missing}", "r", "--flow", "x:y", "--state", "{}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "nodekit", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, (argv, done.stderr)
        assert done.stderr.startswith("nodekit ")
    assert not missing.exists()


def test_the_run_log_holds_the_events_as_json_and_no_payload(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    flow = nk.Flow("secretive")

    @flow.node
    def sign(card: str) -> dict[str, str]:
        return {"token": "tok-" + card}

    flow.run({"card": "4242424242424242"}, run_id="s-1", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="s-1", events=True)
    assert info.status == "succeeded"
    assert info.ended_at is not None
    assert info.events is not None
    names = [e["name"] for e in info.events]
    assert names[0] == "flow.started"
    assert names[-1] == "flow.finished"
    assert "flow.node_finished" in names  # a successful step: the flow's own events
    assert all(isinstance(e["t"], float) for e in info.events)
    with store._use() as conn:
        (raw,) = conn.execute("SELECT events FROM nodekit_idempotency_runs").fetchone()
    assert "4242424242424242" not in raw
    assert "tok-" not in raw
    json.loads(raw.splitlines()[0])
    store.close()


async def test_an_async_run_keeps_its_log_too(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    flow = nk.Flow("parallel")

    @flow.node
    async def left(x: int) -> dict[str, int]:
        return {"l": x + 1}

    @flow.node
    def right(x: int) -> dict[str, int]:
        return {"r": x + 2}

    @flow.node(after=[left, right])
    async def join(l: int, r: int) -> dict[str, int]:  # noqa: E741
        if r > 10:
            raise ValueError("too far right")
        return {"j": l + r}

    assert await flow.arun({"x": 1}, run_id="a-1", store=store) == {"x": 1, "l": 2, "r": 3, "j": 5}
    with pytest.raises(nk.FlowError):
        await flow.arun({"x": 9}, run_id="a-2", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    infos = {info.run_id: info for info in backend.runs(events=True)}
    assert infos["a-1"].status == "succeeded"
    assert infos["a-2"].status == "failed"
    names = {e["name"] for e in infos["a-1"].events or []}
    assert {"flow.started", "flow.node_finished", "flow.finished"} <= names
    assert [n for n, _ in infos["a-1"].nodes] == ["left", "right", "join"]
    store.close()


def test_a_memory_store_keeps_a_run_log_for_its_process() -> None:
    store = nk.MemoryStore()
    flow = nk.Flow("mem")

    @flow.node
    def only(x: int) -> dict[str, int]:
        return {"y": x}

    flow.run({"x": 1}, run_id="m-1", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs()
    assert (info.run_id, info.status) == ("m-1", "succeeded")
    assert backend.set_status("mem", "m-1", "cancelled")
    with pytest.raises(nk.FlowError, match="was cancelled"):
        flow.run({"x": 1}, run_id="m-1", store=store)
    assert backend.delete("mem", "m-1")
    assert backend.runs() == []


def test_crashed_is_derived_from_the_holder_and_the_lease() -> None:
    """A run still marked running: crashed once its lease ended (a holder on another host
    cannot be checked), running while a node entry of it is held."""
    store = nk.MemoryStore()
    backend = _runlog.backend_for(store)
    assert backend is not None
    elsewhere = json.dumps({"host": "another-host", "pid": 4242, "start": 1, "boot": "b"})
    now = time.time()
    nodes = json.dumps([["one", "flow:far:one"]])
    backend.begin("far", "f-1", now, now - 1.0, elsewhere, nodes)  # its lease has ended
    (info,) = backend.runs()
    assert _runlog.derived_status(info, store) == "crashed"
    key = _runlog.journal_keys(info)[1]
    got = store.acquire(key, "fp", lease=30.0, ttl=60.0)  # a node of it is held, alive
    assert got.acquired
    assert _runlog.derived_status(info, store) == "running"
    backend.begin("far", "f-2", now, now + 60.0, elsewhere, nodes)  # lease valid
    info2 = backend.runs(run_id="f-2")[0]
    assert _runlog.derived_status(info2, store) == "running"


# ------------------------------------------------------------- the run's scoped event sink


def _ledger_add(ledger: Path, line: str) -> None:
    with open(ledger, "a") as file:
        file.write(line + "\n")


def _ledger(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines() if ledger.exists() else []


def test_a_durable_run_does_not_make_other_threads_observed(tmp_path: Path) -> None:
    from nodekit import _events
    from nodekit._runtime import RUNTIME

    store = nk.SQLiteStore(tmp_path / "runs.db")
    seen: dict[str, Any] = {}

    @nk.node
    def plain(x: int) -> int:
        return x + 1

    flow = nk.Flow("scoped")

    @flow.node
    def step(x: int) -> dict[str, int]:
        seen["in_run"] = _events.RUN_SINK.get() is not None
        seen["sinks"] = RUNTIME.sinks

        def other() -> None:  # a thread of its own (not a copy of the run's context)
            seen["other_observed"] = _events.observed()
            seen["other_sink"] = _events.RUN_SINK.get()
            seen["other_value"] = plain(1)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return {"y": x}

    assert flow.run({"x": 1}, run_id="s-1", store=store) == {"x": 1, "y": 1}
    assert seen == {
        "in_run": True,
        "sinks": (),
        "other_observed": False,
        "other_sink": None,
        "other_value": 2,
    }
    assert _events.RUN_SINK.get() is None  # reset when the run ended
    store.close()


def test_the_log_keeps_the_steps_events_not_their_inner_nodes(
    tmp_path: Path, nk_instant: Instant
) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    tries: list[int] = []

    @nk.node
    def inner(i: int) -> int:
        return i * 2

    flow = nk.Flow("chatty")

    @flow.node
    def busy(n: int) -> dict[str, int]:
        return {"total": sum(inner(i) for i in range(n))}

    @flow.node(after=busy, effect=nk.Effect.READ, retry=nk.Retry(attempts=3))
    def flaky(total: int) -> dict[str, int]:
        tries.append(total)
        if len(tries) < 3:
            raise ConnectionError("upstream down")
        return {"done": total}

    assert flow.run({"n": 500}, run_id="c-1", store=store)["done"] == 249500
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="c-1", events=True)
    events = info.events or []
    assert not [e for e in events if e.get("node") == "inner"]
    retries = [e for e in events if e["name"] == "node.retrying"]
    assert [(e["node"], e["attempt"]) for e in retries] == [("flaky", 1), ("flaky", 2)]
    assert all(e.get("wait") is not None for e in retries)
    assert len(events) < 20  # the 500 inner calls left nothing
    # the story: one attempt for busy, three for flaky (two faults, two waits)
    from nodekit import _story

    story = _story.build_story(info.as_run(), events)
    lanes = {lane["node"]: lane for lane in story["lanes"]}
    assert (lanes["busy"]["attempts"], lanes["busy"]["status"]) == (1, "succeeded")
    assert lanes["flaky"]["attempts"] == 3
    assert lanes["flaky"]["retries"] == 2
    outcomes = [s.get("outcome") for s in lanes["flaky"]["segments"] if s["type"] == "attempt"]
    assert outcomes == ["retried", "retried", "succeeded"]
    store.close()


def test_the_log_keeps_at_most_max_events_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_runlog, "MAX_EVENTS", 5)
    path = tmp_path / "runs.db"
    store = nk.SQLiteStore(path)
    flow = nk.Flow("noisy")

    @flow.node
    def talk(n: int) -> dict[str, int]:
        for i in range(n):
            nk.context().emit("tick", i=i)
        return {"said": n}

    flow.run({"n": 40}, run_id="n-1", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="n-1", events=True)
    events = info.events or []
    names = [e["name"] for e in events]
    assert names[-1] == "runlog.dropped" or "runlog.dropped" in names
    assert "flow.finished" in names  # the run's end is kept past the cap
    kept = [e for e in events if e["name"] != "runlog.dropped"]
    assert len(kept) == 6  # 5, and the run's end
    dropped = sum(e["dropped"] for e in events if e["name"] == "runlog.dropped")
    # flow.started, node_started, 40 ticks, node_finished, flow.finished: 44, 6 kept
    assert dropped == 44 - 6
    store.close()
    code, out, err = run_cli(capsys, "runs", "show", f"sqlite:///{path}", "n-1")
    assert code == 0, err
    assert "38 events not kept" in out


async def test_an_async_run_logs_its_steps_through_its_context(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    flow = nk.Flow("async-scoped")

    @flow.node
    def threaded(x: int) -> dict[str, int]:  # runs in a worker thread (asyncio.to_thread)
        nk.context().emit("note", where="thread")
        return {"t": x}

    @flow.node
    async def awaited(x: int) -> dict[str, int]:
        nk.context().emit("note", where="task")
        return {"a": x}

    await flow.arun({"x": 1}, run_id="as-1", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="as-1", events=True)
    events = info.events or []
    notes = sorted(e["where"] for e in events if e["name"] == "node.progress")
    assert notes == ["task", "thread"]
    finished = sorted(e["node"] for e in events if e["name"] == "flow.node_finished")
    assert finished == ["awaited", "threaded"]
    store.close()


def test_a_stream_logs_its_steps_through_its_worker_thread(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    flow = nk.Flow("streamed")

    @flow.node
    def one(x: int) -> dict[str, int]:
        return {"y": x}

    list(flow.stream({"x": 1}, run_id="st-1", store=store))
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="st-1", events=True)
    names = [e["name"] for e in info.events or []]
    assert names[0] == "flow.started"
    assert "flow.node_finished" in names
    assert names[-1] == "flow.finished"
    store.close()


# ---------------------------------------------------------------------------- forget


def test_forget_deletes_a_compensated_runs_whole_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ledger, flag = tmp_path / "runs.db", tmp_path / "ledger.txt", tmp_path / "ok.flag"
    flow = nk.Flow("saga-forget")

    def undo(order: str) -> None:
        _ledger_add(ledger, "undo")

    def reserve(order: str) -> dict[str, bool]:
        _ledger_add(ledger, "reserve")
        return {"reserved": True}

    def ship(order: str) -> dict[str, bool]:
        if not flag.exists():
            raise ValueError("no truck")
        _ledger_add(ledger, "ship")
        return {"shipped": True}

    flow.add(ship, after=flow.add(reserve, compensate=undo))
    store = nk.SQLiteStore(path)
    with pytest.raises(nk.FlowError, match="compensated"):
        flow.run({"order": "o-1"}, run_id="f-1", store=store)
    assert _ledger(ledger) == ["reserve", "undo"]
    store.close()
    code, _out, err = run_cli(capsys, "runs", "forget", f"sqlite:///{path}", "f-1")
    assert code == 0, err
    store = nk.SQLiteStore(path)
    assert store.stats() == {}  # header, entry, compensation plan and undo: all gone
    flag.touch()
    assert flow.run({"order": "o-1"}, run_id="f-1", store=store)["shipped"] is True
    assert _ledger(ledger) == ["reserve", "undo", "reserve", "ship"]
    store.close()


def test_forget_deletes_a_loops_entries_and_its_route_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ledger = tmp_path / "runs.db", tmp_path / "ledger.txt"
    flow = nk.Flow("loop-forget")

    @flow.node(output="tries")
    def prepare() -> int:
        return 0

    @flow.node(after=prepare)
    def attempt(tries: int) -> dict[str, Any]:
        _ledger_add(ledger, "attempt")
        return {"tries": tries + 1, "ok": tries + 1 >= 3}

    @flow.node(output="result")
    def done(tries: int) -> str:
        return f"ok after {tries}"

    def again(state: Any) -> Any:
        return done if state["ok"] else attempt

    flow.route(after=attempt, to=again, targets=[attempt, done])
    store = nk.SQLiteStore(path)
    assert flow.run({}, run_id="l-1", store=store)["result"] == "ok after 3"
    assert len(_ledger(ledger)) == 3
    store.close()
    code, _out, err = run_cli(capsys, "runs", "forget", f"sqlite:///{path}", "l-1")
    assert code == 0, err
    store = nk.SQLiteStore(path)
    assert store.stats() == {}
    assert flow.run({}, run_id="l-1", store=store)["result"] == "ok after 3"
    assert len(_ledger(ledger)) == 6  # every attempt ran again, none replayed
    store.close()


def test_forget_deletes_the_subflows_runs_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ledger = tmp_path / "runs.db", tmp_path / "ledger.txt"
    inner = nk.Flow("pay-forget")

    @inner.node
    def charge(amount: int) -> dict[str, int]:
        _ledger_add(ledger, "charge")
        return {"paid": amount}

    outer = nk.Flow("shop-forget")
    outer.add(inner, name="pay")
    store = nk.SQLiteStore(path)
    assert outer.run({"amount": 5}, run_id="sub-1", store=store)["paid"] == 5
    backend = _runlog.backend_for(store)
    assert backend is not None
    assert sorted(info.run_id for info in backend.runs()) == ["sub-1", "sub-1/pay"]
    store.close()
    code, out, err = run_cli(capsys, "runs", "forget", f"sqlite:///{path}", "sub-1")
    assert code == 0, err
    assert "1 subflow run" in out
    store = nk.SQLiteStore(path)
    assert store.stats() == {}
    backend = _runlog.backend_for(store)
    assert backend is not None
    assert backend.runs() == []
    assert outer.run({"amount": 5}, run_id="sub-1", store=store)["paid"] == 5
    assert _ledger(ledger) == ["charge", "charge"]
    store.close()


# ---------------------------------------------------------------------------- backends


def test_a_stores_run_log_goes_with_the_store(tmp_path: Path) -> None:
    import gc
    import weakref

    refs = []
    for i in range(20):
        flow = nk.Flow("url-runs")

        @flow.node
        def one(x: int) -> dict[str, int]:
            return {"y": x}

        flow.run({"x": i}, run_id=f"u-{i}", store=f"sqlite:///{tmp_path / 'runs.db'}")
        store = nk.SQLiteStore(tmp_path / "runs.db")
        backend = _runlog.backend_for(store)
        assert backend is _runlog.backend_for(store)  # one per store
        refs.append(weakref.ref(backend))
        store.close()
        del store, backend
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
    assert len(_runlog._BACKENDS) == 0


def test_the_sqlite_run_log_uses_no_returning(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    statements: list[str] = []
    with store._use() as conn:
        conn.set_trace_callback(statements.append)
    flow = nk.Flow("old-sqlite")

    @flow.node
    def one(x: int) -> dict[str, int]:
        return {"y": x}

    flow.run({"x": 1}, run_id="r-1", store=store)
    logged = [s for s in statements if "_runs" in s]
    assert logged  # the run log was written on this connection
    assert not [s for s in logged if "RETURNING" in s.upper()]
    backend = _runlog.backend_for(store)
    assert backend is not None
    assert backend.runs(run_id="r-1")[0].status == "succeeded"
    store.close()


def test_an_events_own_fields_cannot_replace_its_time_or_name(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "runs.db")
    flow = nk.Flow("reserved")

    @flow.node
    def one(x: int) -> dict[str, int]:
        with pytest.raises(nk.ConfigError, match="'t'"):
            nk.context().emit("tick", t=0)
        from nodekit._events import emit

        emit("node.progress", "one", "rv-1", t=0, name_="x")  # straight to the sink
        return {"y": x}

    flow.run({"x": 1}, run_id="rv-1", store=store)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = backend.runs(run_id="rv-1", events=True)
    progress = [e for e in info.events or [] if e["name"] == "node.progress"]
    assert len(progress) == 1
    assert progress[0]["t"] > 1e9  # the event's time, not its field
    store.close()


def test_runs_show_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.db"
    store = nk.SQLiteStore(path)
    flow = nk.Flow("ansi")

    @flow.node
    def evil(x: int) -> dict[str, int]:
        raise ValueError("boom \x1b[2J\x9b\nnext")

    with pytest.raises(nk.FlowError):
        flow.run({"x": 1}, run_id="e-1", store=store)
    store.close()
    code, out, err = run_cli(capsys, "runs", "show", f"sqlite:///{path}", "e-1")
    assert code == 0, err
    assert "\x1b" not in out
    assert "\x9b" not in out
    assert "boom \\x1b[2J" in out
    code, out, err = run_cli(capsys, "runs", "list", f"sqlite:///{path}")
    assert "\x1b" not in out


@pytest.mark.services
async def test_an_async_postgres_run_logs_on_its_loops_pool(
    postgres_url: str, pg_schema: str
) -> None:
    from nodekit.idempotency.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=pg_schema)
    flow = nk.Flow("pg-async")

    @flow.node
    async def one(x: int) -> dict[str, int]:
        return {"y": x}

    assert await flow.arun({"x": 1}, run_id="pa-1", store=store) == {"x": 1, "y": 1}
    assert store._conns.sync is None  # no sync pool opened (no DDL on the loop through it)
    backend = _runlog.backend_for(store)
    assert backend is not None
    (info,) = await asyncio.to_thread(backend.runs, run_id="pa-1", events=True)
    assert info.status == "succeeded"
    assert [e["name"] for e in info.events or []][-1] == "flow.finished"
    await store.aclose()
