"""A dead holder on the same host is taken over at once; every refusal says who holds the key.

Real processes on real stores: a holder SIGKILLed mid-call (effects counted in a ledger file
outside the processes), a live holder in another process, holders planted as another host,
a reused pid or an older nodekit would leave them, racing takeovers, a durable flow resumed
after SIGKILL, and tables made before the holder was recorded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit._canonical import canonical_json, digest
from nodekit.idempotency import COMPLETED, IN_PROGRESS, MemoryStore, RecordKey, derive_key
from nodekit.idempotency._holder import ALIVE, DEAD, UNSURE, alive, holder_text, identity, parse
from nodekit.testing import capture_events, instant

from . import _dead_workers, _workers
from ._dead_workers import gone_pid, held_record, holder_json, start_of
from ._workers import StoreSpec, effects, make_store, read_lines
from .conftest import Backend

PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(
    ["nodekit", "nodekit.idempotency.sqlite", _workers.__name__, _dead_workers.__name__]
)
LONG_LEASE = 60.0  # a lease no test waits out: only a dead-holder takeover gets through
FAST = 1.0  # "at once": a generous bound for a takeover, store round trips included


pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="process start times come from /proc"
)


@pytest.fixture
def processes() -> Iterator[Callable[..., Any]]:
    """Start worker processes; any still alive at the end are killed (no strays)."""
    started: list[Any] = []

    def start(target: Callable[..., Any], *args: Any) -> Any:
        process = PROCESSES.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(5)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of another pid on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc
    proc.kill()
    proc.wait()


def kill(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(5)
    assert process.exitcode == -signal.SIGKILL


def charge_in_test(store: Any, ledger: str, **options: Any) -> Any:
    """The workers' `charge` node, called from the test process (on the same host)."""
    return _workers.charge_node(store, ledger, lease=LONG_LEASE, **options)


def plant(store: Any, order: str, holder: str | None, **options: Any) -> Any:
    """Plant an in-progress record of `charge(order)` held by `holder`; returns the record."""
    node = _workers.charge_node(MemoryStore(), os.devnull, **options)
    key, fingerprint = node.spec.idempotency.key_for((order,), {})
    record = held_record(key, fingerprint, holder)
    store._put(record)
    return record


# ---------------------------------------------------------------------------- liveness


def test_this_process_identity_is_computed_once_and_names_it() -> None:
    me = identity()
    assert identity() is me
    assert me.pid == os.getpid()
    assert me.start == start_of(os.getpid())
    assert me.boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert parse(holder_text()) == me
    assert alive(me) == ALIVE


def test_a_forked_child_records_itself_not_its_parent() -> None:
    parent = holder_text()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its own identity, then leave at once
        os.write(write, holder_text().encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = parse(pipe.read())
    os.waitpid(pid, 0)
    assert child is not None
    assert child.pid == pid != os.getpid()
    assert parse(parent) == identity()


def test_a_pid_that_is_gone_is_dead() -> None:
    assert alive(parse(holder_json(pid=gone_pid(), start=1))) == DEAD


def test_a_zombie_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rpartition(")")[2].split()[0] != "Z":  # exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert alive(parse(holder_json(pid=proc.pid, start=start_of(proc.pid)))) == DEAD
    finally:
        proc.wait()


def test_a_live_pid_is_alive_and_a_reused_one_is_dead(sleeper: subprocess.Popen[bytes]) -> None:
    started = start_of(sleeper.pid)
    assert alive(parse(holder_json(pid=sleeper.pid, start=started))) == ALIVE
    assert alive(parse(holder_json(pid=sleeper.pid, start=started - 1))) == DEAD
    # our own pid recorded with another start time: a process that had it before us
    assert alive(parse(holder_json(start=identity().start - 1))) == DEAD  # type: ignore[operator]


@pytest.mark.parametrize(
    "elsewhere",
    [{"host": "another-host"}, {"boot": "0" * 36}, {"pidns": "pid:[1]"}],
    ids=["host", "boot", "pid-namespace"],
)
def test_a_holder_elsewhere_is_never_declared_dead(elsewhere: dict[str, str]) -> None:
    assert alive(parse(holder_json(pid=gone_pid(), **elsewhere))) == UNSURE


@pytest.mark.parametrize(
    "text", [None, "", "not json", "[1, 2]", '{"host": "h"}', '{"host": "h", "pid": "1"}']
)
def test_a_holder_that_cannot_be_read_is_never_declared_dead(text: str | None) -> None:
    assert parse(text) is None
    assert alive(parse(text)) == UNSURE


# ---------------------------------------------------------------------------- planted holders


def test_a_dead_holder_on_this_host_is_taken_over_at_once(backend: Backend, tmp_path: Path) -> None:
    store = backend.make()
    ledger = str(tmp_path / "ledger.txt")
    planted = plant(store, "o-1", holder_json(pid=gone_pid(), start=1))
    charge = charge_in_test(store, ledger)
    with capture_events(prefix="idempotency.") as events:
        assert charge("o-1") == f"charged:o-1:{os.getpid()}"
    [takeover] = [event for event in events if event.name == "idempotency.takeover"]
    assert takeover.fields["dead_holder"] is True
    [line] = effects(ledger)
    assert line["epoch"] == planted.epoch + 1  # fenced: the dead holder's token is void
    record = store.get(_workers.record_key("o-1"))
    assert record.state == COMPLETED
    assert record.owner_token != planted.owner_token
    assert parse(record.holder) == identity()


async def test_a_dead_holder_on_this_host_is_taken_over_at_once_async(
    abackend: Backend, tmp_path: Path
) -> None:
    store = abackend.make()
    ledger = str(tmp_path / "ledger.txt")
    planted = plant(store, "o-1", holder_json(pid=gone_pid(), start=1))

    @nk.node(
        name="charge",
        idempotency=nk.Idempotency(key=lambda order: order, store=store, lease=LONG_LEASE),
    )
    async def charge(order: str) -> str:
        _workers.append_line(ledger, json.dumps({"epoch": nk.context().epoch}))
        return f"charged:{order}"

    with capture_events(prefix="idempotency.") as events:
        assert await charge("o-1") == "charged:o-1"
    assert "idempotency.takeover" in events.names()
    assert [line["epoch"] for line in effects(ledger)] == [planted.epoch + 1]


def test_a_reused_pid_is_a_dead_holder(
    backend: Backend, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    store = backend.make()
    plant(store, "o-1", holder_json(pid=sleeper.pid, start=start_of(sleeper.pid) - 5))
    charge = charge_in_test(store, str(tmp_path / "ledger.txt"))
    assert charge("o-1") == f"charged:o-1:{os.getpid()}"


def test_a_live_holder_in_another_process_is_not_taken_over(
    backend: Backend, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    store = backend.make()
    planted = plant(store, "o-1", holder_json(pid=sleeper.pid, start=start_of(sleeper.pid)))
    charge = charge_in_test(store, str(tmp_path / "ledger.txt"))
    with pytest.raises(nk.IdempotencyInProgress) as info:
        charge("o-1")
    assert info.value.holder.pid == sleeper.pid
    assert info.value.holder.state == ALIVE
    assert f"pid {sleeper.pid} on host {identity().host}" in str(info.value)
    assert store.get(_workers.record_key("o-1")).owner_token == planted.owner_token


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param({"host": "another-host"}, id="another-host"),
        pytest.param({"boot": "0" * 36}, id="another-boot"),
        pytest.param(None, id="not-recorded"),
    ],
)
def test_a_holder_not_known_dead_is_not_taken_over(
    backend: Backend, tmp_path: Path, holder: dict[str, str] | None
) -> None:
    store = backend.make()
    text = None if holder is None else holder_json(pid=gone_pid(), **holder)
    planted = plant(store, "o-1", text)
    ledger = str(tmp_path / "ledger.txt")
    with pytest.raises(nk.IdempotencyInProgress) as info:
        charge_in_test(store, ledger)("o-1")
    assert info.value.holder.state == UNSURE
    if holder is None:
        assert "did not record itself" in str(info.value)
    else:
        assert f"on host {holder.get('host', identity().host)}" in str(info.value)
    assert effects(ledger) == []
    assert store.get(_workers.record_key("o-1")).owner_token == planted.owner_token


def test_at_most_once_a_dead_holder_is_outcome_unknown_at_once(
    backend: Backend, tmp_path: Path
) -> None:
    """Not run again (the effect may have happened), and not after a wait either."""
    store = backend.make()
    pid = gone_pid()
    planted = plant(store, "o-1", holder_json(pid=pid, start=1))
    ledger = str(tmp_path / "ledger.txt")
    policy = nk.Idempotency(
        key=lambda order: order, store=store, lease=LONG_LEASE, delivery="at_most_once"
    )

    @nk.node(name="charge", idempotency=policy)
    def charge(order: str) -> str:
        _workers.append_line(ledger, "ran")
        return order

    started = time.monotonic()
    with pytest.raises(nk.OutcomeUnknown) as info:
        charge("o-1")
    assert time.monotonic() - started < FAST
    message = str(info.value)
    assert f"pid {pid} on host {identity().host} (that process is gone)" in message
    assert "nk.resolve" in message
    assert "o-1" not in message.replace(str(pid), "")  # never the key
    assert info.value.holder.state == DEAD
    assert read_lines(ledger) == []
    assert store.get(_workers.record_key("o-1")).owner_token == planted.owner_token
    assert nk.resolve(charge, "o-1")
    assert charge("o-1") == "o-1"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_racing_takeovers_of_one_dead_holder_have_one_winner(kind: str, tmp_path: Path) -> None:
    """Store level: two acquires naming the same dead token; only the first takes over."""
    store = MemoryStore() if kind == "memory" else nk.SQLiteStore(tmp_path / "r.db")
    planted = plant(store, "o-1", holder_json(pid=gone_pid(), start=1))
    key, fingerprint = _workers.record_key("o-1"), planted.fingerprint
    first = store.acquire(key, fingerprint, lease=10, ttl=100, dead=planted.owner_token)
    second = store.acquire(key, fingerprint, lease=10, ttl=100, dead=planted.owner_token)
    assert (first.acquired, first.takeover) == (True, True)
    assert not second.acquired
    assert second.record.owner_token == first.record.owner_token
    store.close()


def test_racing_takeovers_on_every_store_have_one_winner(backend: Backend) -> None:
    store = backend.make()
    planted = plant(store, "o-1", holder_json(pid=gone_pid(), start=1))
    key, fingerprint = _workers.record_key("o-1"), planted.fingerprint
    token = planted.owner_token
    refused = store.acquire(key, fingerprint, lease=10, ttl=100, dead=token, takeover=False)
    assert not refused.acquired  # at most once never takes over
    other = store.acquire(key, fingerprint, lease=10, ttl=100, dead="0" * 32)
    assert not other.acquired  # another token than the holder's: its lease is valid
    answers = [store.acquire(key, fingerprint, lease=10, ttl=100, dead=token) for _ in range(3)]
    assert [got.acquired for got in answers] == [True, False, False]
    assert answers[0].takeover
    assert answers[0].record.epoch == planted.epoch + 1


def test_eight_processes_racing_for_a_dead_holders_key_run_it_once(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any]
) -> None:
    store = make_store(spec)
    try:
        plant(store, "order-race", holder_json(pid=gone_pid(), start=1))
    finally:
        store.close()
    barrier = PROCESSES.Barrier(8)
    procs = [
        processes(_workers.race, spec, files["ledger"], files["results"], barrier, "raise")
        for _ in range(8)
    ]
    for process in procs:
        process.join(30)
        assert process.exitcode == 0
    ran = effects(files["ledger"])
    assert len(ran) == 1, ran
    assert ran[0]["epoch"] == 2
    outcomes = [json.loads(line) for line in read_lines(files["results"])]
    got = Counter(o.get("result") or o["error"] for o in outcomes)
    assert got[f"charged:order-race:{ran[0]['pid']}"] >= 1
    assert set(got) <= {f"charged:order-race:{ran[0]['pid']}", "IdempotencyInProgress"}


# ---------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_acquire", "after_effect"])
def test_a_call_killed_mid_effect_is_run_again_at_once(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any], when: str
) -> None:
    """SIGKILL the holder of a 60 s lease; a call right after goes through within a second,
    fenced (a higher epoch), with the same downstream key; a completed effect never repeats."""
    victim = processes(_workers.victim, spec, files["ledger"], files["signal"], LONG_LEASE, when)
    held = _workers.wait_for_line(files["signal"])
    kill(victim)

    store = make_store(spec)
    try:
        charge = charge_in_test(store, files["ledger"])
        started = time.monotonic()
        with capture_events(prefix="idempotency.") as events:
            assert charge("order-crash") == f"charged:order-crash:{os.getpid()}"
        assert time.monotonic() - started < FAST
        assert "idempotency.takeover" in events.names()
        with capture_events(prefix="idempotency.") as events:
            assert charge("order-crash") == f"charged:order-crash:{os.getpid()}"  # a replay
        assert events.names() == ["idempotency.replayed"]
        record = store.get(_workers.record_key("order-crash"))
    finally:
        store.close()
    ran = effects(files["ledger"])
    assert [line["pid"] for line in ran] == (
        [os.getpid()] if when == "after_acquire" else [victim.pid, os.getpid()]
    )
    downstream = derive_key(_workers.record_key("order-crash").digest, "charge")
    assert {line["downstream"] for line in ran} == {downstream}
    assert ran[-1]["epoch"] == held["epoch"] + 1
    assert record.state == COMPLETED
    assert record.epoch == held["epoch"] + 1


@pytest.mark.slow
def test_a_live_holder_process_is_refused_with_who_holds_the_key(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any]
) -> None:
    holder = processes(
        _workers.victim, spec, files["ledger"], files["signal"], LONG_LEASE, "after_acquire"
    )
    _workers.wait_for_line(files["signal"])
    store = make_store(spec)
    try:
        with pytest.raises(nk.IdempotencyInProgress) as info:
            charge_in_test(store, files["ledger"])("order-crash")
        record = store.get(_workers.record_key("order-crash"))
    finally:
        store.close()
    kill(holder)
    message = str(info.value)
    lease_end = time.strftime("%H:%M:%S", time.localtime(record.lease_expires_at))
    since = time.strftime("%H:%M:%S", time.localtime(record.created_at))
    assert f"held by pid {holder.pid} on host {identity().host} since {since}" in message
    assert f"lease ends {lease_end}" in message
    assert "nk.resolve" in message
    assert "on_conflict='wait'" in message
    assert "order-crash" not in message  # never the key
    who = info.value.holder
    assert (who.host, who.pid, who.state) == (identity().host, holder.pid, ALIVE)
    assert who.lease_ends == record.lease_expires_at
    assert effects(files["ledger"]) == []


@pytest.mark.slow
def test_a_durable_flow_killed_mid_node_resumes_at_once(
    spec: StoreSpec, files: dict[str, str], processes: Callable[..., Any]
) -> None:
    """SIGKILL a run holding a node's journal entry (60 s lease); the resume goes through at
    once: the journaled node is replayed, the killed one taken over and run once."""
    victim = processes(_dead_workers.flow_victim, spec, files["ledger"], files["signal"], "r-1")
    _workers.wait_for_line(files["signal"])
    kill(victim)

    store = make_store(spec)
    try:
        flow = _dead_workers.build_flow(files["ledger"])
        started = time.monotonic()
        with capture_events(prefix="idempotency.") as events:
            assert flow.run({"seed": 1}, run_id="r-1", store=store) == {"seed": 1, "a": 2, "b": 4}
        assert time.monotonic() - started < FAST
        assert "idempotency.takeover" in events.names()
    finally:
        store.close()
    ran = [(line["node"], line["pid"]) for line in effects(files["ledger"])]
    assert ran == [("first", victim.pid), ("second", os.getpid())]


def test_a_flow_node_held_by_a_live_run_names_its_holder(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "j.db")
    ledger = str(tmp_path / "ledger.txt")
    flow = _dead_workers.build_flow(ledger)
    assert flow.run({"seed": 1}, run_id="r-0", store=store)["b"] == 4
    # a live run of this process holds `second` of run r-1 (as a concurrent run would)
    key = RecordKey("flow:dead:second", "", digest(canonical_json(["r-1", "second", 0])))
    fingerprint = digest(canonical_json(["flow-node", "dead", "second", None]))
    assert store.acquire(key, fingerprint, lease=LONG_LEASE, ttl=600).acquired
    with pytest.raises(nk.FlowError) as info:
        flow.run({"seed": 1}, run_id="r-1", store=store)
    cause = info.value.__cause__
    assert isinstance(cause, nk.IdempotencyInProgress)
    assert cause.holder.this_process
    assert f"held by this process (pid {os.getpid()}" in str(cause)
    assert "lease ends" in str(info.value)
    store.close()


# ---------------------------------------------------------------------------- own process


def test_outcome_unknown_names_this_process_and_a_retry_says_why_it_is_refused() -> None:
    store = MemoryStore()
    calls: list[str] = []

    @nk.node(
        name="charge",
        retry=nk.Retry(attempts=1),
        idempotency=nk.Idempotency(key=lambda order: order, store=store, lease=LONG_LEASE),
    )
    def charge(order: str) -> str:
        calls.append(order)
        raise ConnectionResetError("dropped after sending")

    with instant(), pytest.raises(nk.OutcomeUnknown) as info:
        charge("o-1")
    message = str(info.value)
    assert f"held by this process (pid {os.getpid()} on host {identity().host})" in message
    assert "lease ends" in message
    assert "resolve" in message
    assert info.value.holder.this_process
    with pytest.raises(nk.IdempotencyInProgress) as again:
        charge("o-1")
    assert "OutcomeUnknown" in str(again.value)
    assert again.value.holder.this_process
    assert again.value.holder.state == ALIVE
    assert calls == ["o-1"]


# ---------------------------------------------------------------------------- older tables

_OLD_SQLITE = (
    "CREATE TABLE nodekit_idempotency ("
    "namespace TEXT NOT NULL, scope TEXT NOT NULL, key_digest TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, state TEXT NOT NULL, owner_token TEXT NOT NULL, "
    "epoch INTEGER NOT NULL, lease_expires_at REAL NOT NULL, created_at REAL NOT NULL, "
    "expires_at REAL NOT NULL, result TEXT, error TEXT, format_version INTEGER NOT NULL, "
    "PRIMARY KEY (namespace, scope, key_digest)) WITHOUT ROWID"
)


def _old_row(key: Any, fingerprint: str) -> tuple[Any, ...]:
    now = time.time()
    return (
        key.namespace,
        key.scope,
        key.digest,
        fingerprint,
        IN_PROGRESS,
        "0" * 32,
        1,
        now + LONG_LEASE,
        now,
        now + 3600,
        None,
        None,
        1,
    )


def test_an_older_sqlite_table_gets_the_holder_column_and_keeps_its_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    node = _workers.charge_node(MemoryStore(), os.devnull)
    key, fingerprint = node.spec.idempotency.key_for(("o-1",), {})
    conn = sqlite3.connect(path)
    conn.execute(_OLD_SQLITE)
    conn.execute(
        "INSERT INTO nodekit_idempotency VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        _old_row(key, fingerprint),
    )
    conn.commit()
    conn.close()
    store = nk.SQLiteStore(path)
    try:
        old = store.get(key)
        assert old.holder is None
        assert old.state == IN_PROGRESS
        ledger = str(tmp_path / "ledger.txt")
        with pytest.raises(nk.IdempotencyInProgress, match="did not record itself"):
            charge_in_test(store, ledger)("o-1")  # an unknown holder: waited for, as before
        assert charge_in_test(store, ledger)("o-2") == f"charged:o-2:{os.getpid()}"
        assert parse(store.get(_workers.record_key("o-2")).holder) == identity()
    finally:
        store.close()
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(nodekit_idempotency)")]
    conn.close()
    assert columns[-1] == "holder"


@pytest.mark.services
def test_an_older_postgres_table_gets_the_holder_column_and_keeps_its_records(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    import psycopg

    postgres = pytest.importorskip("nodekit.idempotency.postgres")
    node = _workers.charge_node(MemoryStore(), os.devnull)
    key, fingerprint = node.spec.idempotency.key_for(("o-1",), {})
    old_table = (
        _OLD_SQLITE.replace("TEXT", "text")
        .replace("INTEGER", "bigint")
        .replace("REAL", "double precision")
        .replace(" WITHOUT ROWID", "")
        .replace("nodekit_idempotency", f'"{pg_schema}".nodekit_idempotency')
    )
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(old_table)
        conn.execute(
            f'CREATE TABLE "{pg_schema}".nodekit_meta (name text PRIMARY KEY, value text NOT NULL)'
        )
        conn.execute(f"INSERT INTO \"{pg_schema}\".nodekit_meta VALUES ('format_version', '1')")
        conn.execute(
            f'INSERT INTO "{pg_schema}".nodekit_idempotency VALUES '
            "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            _old_row(key, fingerprint),
        )
    store = postgres.PostgresStore(postgres_url, schema=pg_schema)
    try:
        assert store.get(key).holder is None
        ledger = str(tmp_path / "ledger.txt")
        with pytest.raises(nk.IdempotencyInProgress, match="did not record itself"):
            charge_in_test(store, ledger)("o-1")
        assert charge_in_test(store, ledger)("o-2") == f"charged:o-2:{os.getpid()}"
        assert parse(store.get(_workers.record_key("o-2")).holder) == identity()
    finally:
        store.close()
