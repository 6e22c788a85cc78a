"""Competing outbox dispatchers: each message claimed by one at a time, delivered once.

Several dispatchers — real ``nodekit outbox run`` processes, or `Dispatcher` threads — share
one outbox on a real SQLite file and a real PostgreSQL schema, and deliver to a `LocalAPI`
that honours ``Idempotency-Key``. What happened is read from the server's ledger file and the
database, never from a counter in a dispatcher; the handlers (`_outbox_worker.py`) log when
each delivery started and ended, so the test can prove that no message was ever being
delivered by two dispatchers at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import nodekit as nk
from nodekit.sql import Dispatcher, Message, Outbox
from nodekit.testing import LocalAPI
from nodekit.testing._routes import APIRequest, APIResponse

from ._outbox_worker import close_thread_connection, deliver

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TABLE = "nodekit_outbox"
RUN = [sys.executable, "-m", "nodekit", "outbox", "run"]
OUTBOX = Outbox()
PG = pytest.mark.services
KINDS = ["sqlite", pytest.param("postgres", marks=PG)]

# the outbox table as nodekit created it before competing dispatchers (no claim columns)
OLD_DDL = {
    "sqlite": (
        f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
        "created_at REAL NOT NULL, dispatched_at REAL, attempts INTEGER NOT NULL DEFAULT 0, "
        "last_error TEXT)"
    ),
    "postgres": (
        f"CREATE TABLE {TABLE} (id BIGSERIAL PRIMARY KEY, "
        "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, dispatched_at DOUBLE PRECISION, "
        "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)"
    ),
}


# ---------------------------------------------------------------------------- databases


@dataclass
class DB:
    """The outbox's database: a SQLite file or a PostgreSQL schema."""

    kind: str
    url: str  # as `nodekit outbox run --db` takes it
    path: Path | None = None
    pg_url: str = ""
    schema: str = ""
    opened: list[Any] = field(default_factory=list)

    def connect(self) -> Any:
        """A dispatcher's own connection (closed at teardown)."""
        if self.kind == "sqlite":
            conn: Any = sqlite3.connect(self.path or "", timeout=30.0, check_same_thread=False)
        else:
            conn = psycopg.connect(
                self.pg_url, autocommit=True, options=f"-csearch_path={self.schema}"
            )
        self.opened.append(conn)
        return conn

    def sql(self, text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run `text` (``?`` placeholders) on a fresh autocommit connection."""
        if self.kind == "sqlite":
            with contextlib.closing(
                sqlite3.connect(self.path or "", timeout=30.0, isolation_level=None)
            ) as conn:
                return [tuple(r) for r in conn.execute(text, params).fetchall()]
        conn = psycopg.connect(self.pg_url, autocommit=True, options=f"-csearch_path={self.schema}")
        with conn:
            cur = conn.execute(text.replace("?", "%s"), params or None)  # type: ignore[arg-type]
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def count(self, where: str = "1 = 1") -> int:
        return int(self.sql(f"SELECT count(*) FROM {TABLE} WHERE {where}")[0][0])

    def seed(self, count: int, topic: str = "event", start: int = 0) -> list[str]:
        """`count` messages, queued the way an application does (`Outbox.add`, one commit)."""
        keys = [f"m-{n:05d}" for n in range(start, start + count)]
        conn = self.connect()
        if self.kind == "sqlite":
            with conn:
                for key in keys:
                    OUTBOX.add(conn, topic, {"key": key}, key=key)
        else:
            with conn.transaction():
                for key in keys:
                    OUTBOX.add(conn, topic, {"key": key}, key=key)
        return keys


@pytest.fixture(params=KINDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DB]:
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        handle = DB("sqlite", f"sqlite:///{path}", path=path)
    else:
        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("pg_schema")
        options = quote(f"-csearch_path={schema}")
        handle = DB("postgres", f"{url}?options={options}", pg_url=url, schema=schema)
    yield handle
    for conn in handle.opened:
        conn.close()


# ---------------------------------------------------------------------------- the sink


def record_event(request: APIRequest) -> APIResponse:
    body = json.loads(request.body)
    return APIResponse(201, {"ok": True}, effect=True, data={"key": body["key"]})


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[LocalAPI]:
    with LocalAPI(routes={"POST /events": record_event}, ledger_path=tmp_path / "ledger") as api:
        yield api


def ledger_outcomes(api: LocalAPI) -> dict[str, collections.Counter[str]]:
    """Per outcome, how many requests each key had — read from the ledger *file*."""
    assert api.ledger_path is not None
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for entry in LocalAPI.read_ledger(api.ledger_path):
        outcomes[entry.outcome][str(entry.idempotency_key)] += 1
    return outcomes


def assert_delivered_once(api: LocalAPI, keys: list[str]) -> dict[str, collections.Counter[str]]:
    outcomes = ledger_outcomes(api)
    assert outcomes["processed"] == collections.Counter(keys)  # each exactly once
    assert sum(outcomes["conflict"].values()) == 0  # never two at once at the server
    return outcomes


def assert_no_overlap(logs: Path, killed: dict[int, float] | None = None) -> int:
    """No key was being delivered by two dispatchers at once; returns deliveries seen.

    A delivery that never logged its end belongs to a killed process: it lasted until the
    kill (`killed`: pid -> time of the SIGKILL).
    """
    spans: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for log in logs.glob("*.log"):
        who = log.stem
        pid = int(who.split("-")[0])
        open_: dict[str, float] = {}
        for line in log.read_text().splitlines():
            what, key, at = line.split()
            if what == "start":
                open_[key] = float(at)
            elif what == "end":
                spans[key].append((open_.pop(key), float(at), who))
        for key, start in open_.items():
            assert killed is not None, f"{who} never finished delivering {key}"
            assert pid in killed, f"{who} never finished delivering {key}"
            spans[key].append((start, killed[pid], who))
    for key, intervals in spans.items():
        intervals.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
            assert start >= end, f"{key} delivered by {first} and {second} at the same time"
    return sum(len(v) for v in spans.values())


# ---------------------------------------------------------------------------- processes


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    folder = tmp_path / "deliveries"
    folder.mkdir()
    return folder


@pytest.fixture
def spawn(
    tmp_path: Path, db: DB, sink: LocalAPI, logs: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``nodekit outbox run`` workers on `db`, delivering to `sink`."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        *extra: str, handler: str = "_outbox_worker:deliver", **env: str
    ) -> subprocess.Popen[bytes]:
        environ = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "NK_OUTBOX_SINK": sink.url,
            "NK_OUTBOX_LOG_DIR": str(logs),
            **env,
        }
        stderr = (tmp_path / f"worker-{len(procs)}.err").open("wb")
        proc = subprocess.Popen(
            [*RUN, "--db", db.url, "--handler", handler, "--idle", "0.05", *extra],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        stderr.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def paused(logs: Path) -> bool:
    return any("pause " in log.read_text() for log in logs.glob("*.log"))


def claimed_by(db: DB, pid: int) -> int:
    return db.count(f"claimed_by LIKE '%/{pid}/%' AND dispatched_at IS NULL")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(20) == 0


# ---------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_four_dispatcher_processes_one_killed_mid_batch_deliver_every_message_once(
    db: DB, sink: LocalAPI, logs: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    keys = db.seed(2000)
    # the victim stops after its 10th delivery was made, before the handler returns: ten
    # messages delivered and not marked, the rest of its batch claimed
    victim = spawn("--batch", "50", "--lease", "30", NK_OUTBOX_PAUSE_AFTER="10")
    wait_until(lambda: paused(logs), 20, "the victim to pause mid-batch")
    others = [spawn("--batch", "50", "--lease", "30") for _ in range(3)]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    assert claimed_by(db, victim.pid) == 50  # killed holding its batch, ten delivered
    assert victim.wait(10) == -signal.SIGKILL  # reaped: its claims are given back at once

    wait_until(lambda: db.count("dispatched_at IS NULL") == 0, 60, "every message dispatched")
    stop_all(others)

    outcomes = assert_delivered_once(sink, keys)
    # the victim's ten deliveries were made again, with their keys: replayed, not re-processed
    assert sum(outcomes["replayed"].values()) >= 10
    assert db.count("claimed_by IS NOT NULL OR claim_expires IS NOT NULL") == 0
    assert db.count("last_error IS NOT NULL") == 0
    assert assert_no_overlap(logs, killed={victim.pid: killed_at}) >= 2000


@pytest.mark.slow
def test_sigterm_finishes_the_current_message_gives_the_rest_back_and_exits_0(
    db: DB, sink: LocalAPI, logs: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    keys = db.seed(100)
    proc = spawn("--batch", "100", "--lease", "60", NK_OUTBOX_SLOW="0.05")
    wait_until(
        lambda: sum(log.read_text().count("start ") for log in logs.glob("*.log")) >= 3,
        20,
        "deliveries to start",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0

    assert db.count("claimed_by IS NOT NULL OR claim_expires IS NOT NULL") == 0
    delivered = assert_no_overlap(logs)  # every delivery that started, finished
    assert 3 <= delivered < 100
    assert db.count("dispatched_at IS NOT NULL") == delivered  # and was marked
    assert_delivered_once(sink, keys[:delivered])
    # the rest were given back at once, not left to the 60 s lease: claimable right away
    conn = db.connect()
    assert OUTBOX.dispatch(conn, lambda message: None, limit=100) == 100 - delivered


def test_dispatcher_threads_share_one_outbox_and_deliver_each_message_once(
    db: DB, sink: LocalAPI, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NK_OUTBOX_LOG_DIR", str(logs))
    monkeypatch.setenv("NK_OUTBOX_SINK", sink.url)
    keys = db.seed(600)
    dispatchers = [
        Dispatcher(db.connect(), deliver, batch=25, lease=30.0, idle=0.01) for _ in range(4)
    ]

    def run(dispatcher: Dispatcher) -> None:
        try:
            dispatcher.run()
        finally:
            close_thread_connection()

    threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: db.count("dispatched_at IS NULL") == 0, 60, "every message")
    finally:
        for dispatcher in dispatchers:
            dispatcher.stop()
        for thread in threads:
            thread.join(20)
    assert_delivered_once(sink, keys)
    assert assert_no_overlap(logs) == 600
    assert db.count("claimed_by IS NOT NULL") == 0
    assert sum(d.delivered for d in dispatchers) == 600
    assert sum(1 for d in dispatchers if d.delivered) >= 2  # they did compete


@pytest.mark.slow
def test_a_dead_dispatchers_claims_come_back_when_its_lease_ends(
    db: DB, logs: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    db.seed(5)
    victim = spawn("--batch", "5", "--lease", "3", NK_OUTBOX_PAUSE_AFTER="1")
    wait_until(lambda: paused(logs), 20, "the victim to pause")
    # killed and not reaped: its PID still exists, so only the lease can free its claims
    os.kill(victim.pid, signal.SIGKILL)
    conn = db.connect()
    delivered: list[str] = []
    assert OUTBOX.dispatch(conn, lambda m: delivered.append(m.key)) == 0
    started = time.monotonic()
    wait_until(
        lambda: OUTBOX.dispatch(conn, lambda m: delivered.append(m.key)) > 0, 10, "the lease"
    )
    assert time.monotonic() - started > 1.0  # not before the lease ended
    assert sorted(delivered) == [f"m-{n:05d}" for n in range(5)]
    assert db.count("dispatched_at IS NULL") == 0
    victim.wait(10)


def test_a_long_batch_renews_its_lease_so_no_one_else_takes_it(db: DB) -> None:
    """A batch outlasting its lease renews it at half-time: a rival never claims it meanwhile."""
    db.seed(5)
    conn, rival = db.connect(), db.connect()
    seen: list[tuple[str, str]] = []
    rival_got: list[int] = []

    def slow(message: Message) -> None:
        seen.append(("slow", message.key))
        rival_got.append(OUTBOX.dispatch(rival, lambda m: seen.append(("rival", m.key))))
        time.sleep(0.3)

    # 5 x 0.3 s = 1.5 s of delivery on a 1 s lease
    assert OUTBOX.dispatch(conn, slow, limit=5, lease=1.0) == 5
    assert rival_got == [0] * 5
    assert [who for who, _ in seen] == ["slow"] * 5
    assert db.count("dispatched_at IS NULL OR claimed_by IS NOT NULL") == 0


def test_a_failed_message_is_released_with_its_error_and_waits_retry_delay(db: DB) -> None:
    db.seed(2)
    conn = db.connect()

    def flaky(message: Message) -> None:
        if message.key == "m-00000":
            raise RuntimeError("sink down: https://sink.test/?token=s3cret")

    assert OUTBOX.dispatch(conn, flaky, retry_delay=0.3) == 1
    assert db.sql(f"SELECT attempts, last_error, claimed_by FROM {TABLE} WHERE id = 1") == [
        (1, "RuntimeError: sink down: https://sink.test/?token=***", None)
    ]
    assert OUTBOX.dispatch(conn, flaky, retry_delay=0.3) == 0  # not before the delay
    got: list[str] = []
    wait_until(lambda: OUTBOX.dispatch(conn, lambda m: got.append(m.key)) == 1, 5, "the delay")
    assert got == ["m-00000"]


def test_an_outbox_table_of_an_older_version_is_migrated_and_keeps_working(db: DB) -> None:
    db.sql(OLD_DDL[db.kind])
    insert = f"INSERT INTO {TABLE} (topic, key, payload, created_at) VALUES (?, ?, ?, ?)"
    db.sql(insert, ("event", "old-1", '{"n": 1}', time.time()))  # as an older writer does
    conn = db.connect()
    got: list[str] = []
    assert OUTBOX.dispatch(conn, lambda m: got.append(m.key)) == 1
    if db.kind == "sqlite":
        columns = {row[1] for row in db.sql(f"PRAGMA table_info({TABLE})")}
    else:
        columns = {
            row[0]
            for row in db.sql(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                (TABLE,),
            )
        }
    assert {"claimed_by", "claim_expires"} <= columns
    # an older writer, and an older reader, still work on the migrated table
    db.sql(insert, ("event", "old-2", '{"n": 2}', time.time()))
    assert db.sql(f"SELECT key FROM {TABLE} WHERE dispatched_at IS NULL") == [("old-2",)]
    db.seed(1)
    assert OUTBOX.dispatch(conn, lambda m: got.append(m.key)) == 2
    assert got == ["old-1", "old-2", "m-00000"]


def test_a_dispatcher_takes_only_its_topic(db: DB) -> None:
    db.seed(2, topic="email")
    db.seed(1, topic="sms", start=2)
    got: list[str] = []
    dispatcher = Dispatcher(db.connect(), lambda m: got.append(m.topic), topic="sms")
    assert dispatcher.run_once() == 1
    assert got == ["sms"]
    assert db.count("dispatched_at IS NULL") == 2


@PG
async def test_async_dispatchers_and_arun_loops_on_async_connections_compete_safely(
    postgres_url: str, pg_schema: str
) -> None:
    options = f"-csearch_path={pg_schema}"
    db = DB("postgres", "", pg_url=postgres_url, schema=pg_schema)
    keys = db.seed(300)
    db.opened.pop().close()
    delivered: list[str] = []
    active: set[str] = set()

    async def handler(message: Message) -> None:
        assert message.key not in active  # nobody else is delivering it now
        active.add(message.key)
        await asyncio.sleep(0)
        active.discard(message.key)
        delivered.append(message.key)

    async def dispatcher() -> None:
        conn = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True, options=options)
        async with conn:
            while await OUTBOX.adispatch(conn, handler, limit=20):
                pass

    async def looping(dispatchers: list[Dispatcher]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                conn = await psycopg.AsyncConnection.connect(
                    postgres_url, autocommit=True, options=options
                )
                await stack.enter_async_context(conn)
                dispatchers.append(Dispatcher(conn, handler, batch=20, idle=0.01))
            runs = [asyncio.create_task(d.arun()) for d in dispatchers]
            while db.count("dispatched_at IS NULL"):
                await asyncio.sleep(0.02)
            for d in dispatchers:
                d.stop()
            await asyncio.gather(*runs)

    loops: list[Dispatcher] = []
    await asyncio.gather(dispatcher(), dispatcher(), looping(loops))
    assert sorted(delivered) == keys
    assert db.count("dispatched_at IS NULL OR claimed_by IS NOT NULL") == 0


def test_dispatcher_options_are_checked_when_it_is_built(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    try:
        with pytest.raises(nk.ConfigError, match="batch"):
            Dispatcher(conn, print, batch=0)
        with pytest.raises(nk.ConfigError, match="lease"):
            Dispatcher(conn, print, lease=0)
        with pytest.raises(nk.ConfigError, match="retry_delay"):
            OUTBOX.dispatch(conn, print, retry_delay=-1)
    finally:
        conn.close()


def test_outbox_run_refuses_a_handler_that_is_not_module_colon_function(tmp_path: Path) -> None:
    result = subprocess.run(
        [*RUN, "--db", f"sqlite:///{tmp_path}/a.db", "--handler", "nothing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "module:function" in result.stderr


# ---------------------------------------------------------------------------- throughput


@pytest.mark.slow
@PG
def test_four_dispatcher_processes_on_postgres_exceed_2000_messages_per_second(
    postgres_url: str, pg_schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wall clock: four idle workers, 20,000 messages committed at once, until none is pending."""
    options = quote(f"-csearch_path={pg_schema}")
    db = DB("postgres", f"{postgres_url}?options={options}", pg_url=postgres_url, schema=pg_schema)
    total = 20_000
    db.seed(1)  # the table, as an application creates it
    procs: list[subprocess.Popen[bytes]] = []
    errs = [tmp_path / f"bench-{n}.err" for n in range(4)]
    for err in errs:
        with err.open("wb") as stderr:
            procs.append(
                subprocess.Popen(
                    [*RUN, "--db", db.url, "--handler", "_outbox_worker:sink", "--idle", "0.02"],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])},
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
    conn = db.opened[0]
    try:
        wait_until(lambda: all("dispatching" in err.read_text() for err in errs), 30, "the workers")
        wait_until(lambda: db.count("dispatched_at IS NULL") == 0, 10, "the first message")
        rows = [("event", f"t-{n}", json.dumps({"n": n}), time.time()) for n in range(total)]
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {TABLE} (topic, key, payload, created_at) VALUES (%s, %s, %s, %s)",
                rows,
            )
        started = time.monotonic()
        wait_until(lambda: db.count("dispatched_at IS NULL") == 0, 60, "every message")
        elapsed = time.monotonic() - started
    finally:
        conn.close()
        stop_all(procs)
    rate = total / elapsed
    with capsys.disabled():
        print(f"\noutbox: 4 dispatcher processes on PostgreSQL: {rate:,.0f} messages/s")
    assert db.count("dispatched_at IS NOT NULL") == total + 1
    assert rate >= 2000
