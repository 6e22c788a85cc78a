"""nodekit.sql: a transactional node's database effect happens exactly once per key.

Every effect is counted from the database (a fresh connection, after the fact), never from a
Python counter. Each behaviour runs on SQLite (a file in `tmp_path`) and on PostgreSQL through
psycopg 3, with autocommit connections and with transaction-per-statement ones
(``autocommit=False``), sync nodes on `Connection` and async nodes on `AsyncConnection`. The
crash tests SIGKILL a real worker process (`_sql_worker.py`) at each step of the transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg.rows import dict_row
from pydantic import BaseModel

import nodekit as nk
from nodekit.sql import Message, Outbox, transactional
from nodekit.testing import capture_events, instant

from ._sql_worker import Receipt, place_order, place_order_and_notify, record_delivery
from ._workers import Worker, spawner

EFFECTS = "nodekit_sql_effects"
OUTBOX_TABLE = "nodekit_outbox"
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_sql_worker.py")


# ---------------------------------------------------------------------------- databases


@dataclass
class Backend:
    """One database under test: a SQLite file, or a PostgreSQL schema (two connection modes)."""

    kind: str  # "sqlite", "postgres" (autocommit=True) or "postgres-tx" (autocommit=False)
    path: Path | None = None
    url: str = ""
    schema: str = ""
    opened: list[Any] = field(default_factory=list)

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "sqlite"

    def _pg_kwargs(self, options: str, **extra: Any) -> dict[str, Any]:
        return {
            "autocommit": self.kind == "postgres",
            "options": f"-csearch_path={self.schema} {options}".strip(),
            **extra,
        }

    def connect(self, *, options: str = "", **extra: Any) -> Any:
        """A connection the test owns; closed at teardown."""
        if self.is_sqlite:
            conn: Any = sqlite3.connect(self.path or ":memory:", timeout=5.0, **extra)
        else:
            conn = psycopg.connect(self.url, **self._pg_kwargs(options, **extra))
        self.opened.append(conn)
        return conn

    async def aconnect(self, *, options: str = "") -> Any:
        conn = await psycopg.AsyncConnection.connect(self.url, **self._pg_kwargs(options))
        self.opened.append(conn)
        return conn

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        """A short-lived autocommit connection, for setup and for counting."""
        if self.is_sqlite:
            conn: Any = sqlite3.connect(self.path or ":memory:", timeout=5.0, isolation_level=None)
        else:
            conn = psycopg.connect(
                self.url, autocommit=True, options=f"-csearch_path={self.schema}"
            )
        try:
            yield conn
        finally:
            conn.close()

    def count(self, table: str, where: str = "TRUE", params: tuple[Any, ...] = ()) -> int:
        """Rows of `table` matching `where`, read from the database; 0 if it does not exist."""
        with self.admin() as conn:
            if self.is_sqlite:
                exists = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
                ).fetchone()
                where = where.replace("TRUE", "1")
            else:
                exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
            if not exists:
                return 0
            row = conn.execute(q(conn, f"SELECT count(*) FROM {table} WHERE {where}"), params)
            return int(row.fetchone()[0])

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.admin() as conn:
            return [tuple(row) for row in conn.execute(q(conn, sql), params).fetchall()]


def q(db: Any, text: str) -> str:
    """`text` with the connection's placeholder: sqlite3 takes ``?``, psycopg ``%s``."""
    return text if isinstance(db, sqlite3.Connection) else text.replace("?", "%s")


def _make_backend(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Backend:
    if kind == "sqlite":
        backend = Backend(kind, path=tmp_path / "app.db")
    else:
        url = request.getfixturevalue("postgres_url")
        backend = Backend(kind, url=url, schema=request.getfixturevalue("pg_schema"))
    with backend.admin() as conn:
        conn.execute("CREATE TABLE orders (order_id TEXT NOT NULL, amount INTEGER)")
    return backend


PG = pytest.mark.services
PG_MODES = [pytest.param("postgres", marks=PG), pytest.param("postgres-tx", marks=PG)]


@pytest.fixture(params=["sqlite", *PG_MODES])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """SQLite, and PostgreSQL with autocommit=True and autocommit=False connections."""
    backend = _make_backend(request, str(request.param), tmp_path)
    try:
        yield backend
    finally:
        for conn in backend.opened:
            conn.close()


@pytest.fixture(params=PG_MODES)
def pg_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """PostgreSQL only, both connection modes."""
    backend = _make_backend(request, str(request.param), tmp_path)
    try:
        yield backend
    finally:
        for conn in backend.opened:
            if not isinstance(conn, psycopg.AsyncConnection):
                conn.close()


@pytest.fixture
def db(backend: Backend) -> Any:
    return backend.connect()


@pytest.fixture
async def adb(pg_backend: Backend) -> AsyncIterator[Any]:
    conn = await pg_backend.aconnect()
    try:
        yield conn
    finally:
        await conn.close()


def is_idle(conn: Any) -> bool:
    if isinstance(conn, sqlite3.Connection):
        return not conn.in_transaction
    return bool(conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)


# ---------------------------------------------------------------------------- nodes

# What the next attempts do after their write: raise an exception, or call a function.
SCRIPT: list[BaseException | Callable[[], None]] = []


@pytest.fixture(autouse=True)
def _clean_script() -> Iterator[None]:
    SCRIPT.clear()
    yield
    SCRIPT.clear()


def step() -> None:
    if SCRIPT:
        item = SCRIPT.pop(0)
        if isinstance(item, BaseException):
            raise item
        item()


class Invoice(BaseModel):
    order_id: str
    amount: int
    lines: list[int]


@dataclass(frozen=True)
class Shipment:
    order_id: str
    parcels: tuple[str, ...]


@transactional(name="orders.place", key=lambda order_id: order_id)
def place(order_id: str, amount: int, *, db: Any = nk.resource()) -> Invoice:
    db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount))
    step()
    return Invoice(order_id=order_id, amount=amount, lines=[amount])


@transactional(name="orders.place", key=lambda order_id: order_id)
async def aplace(order_id: str, amount: int, *, db: Any = nk.resource()) -> Invoice:
    await db.execute(
        q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount)
    )
    step()
    return Invoice(order_id=order_id, amount=amount, lines=[amount])


@transactional(name="orders.ship", key=lambda order_id: order_id)
def ship(order_id: str, parcels: list[str], *, db: Any = nk.resource()) -> Shipment:
    db.execute(
        q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, len(parcels))
    )
    return Shipment(order_id, tuple(parcels))


@transactional(name="orders.ship", key=lambda order_id: order_id)
async def aship(order_id: str, parcels: list[str], *, db: Any = nk.resource()) -> Shipment:
    await db.execute(
        q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, len(parcels))
    )
    return Shipment(order_id, tuple(parcels))


def orders(backend: Backend, order_id: str = "o-1") -> int:
    return backend.count("orders", "order_id = ?", (order_id,))


# ---------------------------------------------------------------------------- once per key


def test_write_applies_once_per_key_and_replays_the_stored_model(backend: Backend, db: Any) -> None:
    first = place("o-1", 10, db=db)
    with capture_events() as events:
        second = place("o-1", 10, db=db)
    assert orders(backend) == 1
    assert backend.count(EFFECTS) == 1
    assert second == first == Invoice(order_id="o-1", amount=10, lines=[10])
    assert type(second) is Invoice
    assert "node.replayed" in events.names()
    assert is_idle(db)


async def test_async_write_applies_once_per_key_and_replays_the_stored_model(
    pg_backend: Backend, adb: Any
) -> None:
    first = await aplace("o-1", 10, db=adb)
    with capture_events() as events:
        second = await aplace("o-1", 10, db=adb)
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1
    assert second == first
    assert type(second) is Invoice
    assert "node.replayed" in events.names()
    assert is_idle(adb)


def test_replay_rebuilds_a_dataclass(backend: Backend, db: Any) -> None:
    first = ship("o-1", ["a", "b"], db=db)
    second = ship("o-1", ["a", "b"], db=db)
    assert second == first == Shipment("o-1", ("a", "b"))
    assert type(second) is Shipment
    assert type(second.parcels) is tuple
    assert orders(backend) == 1


async def test_async_replay_rebuilds_a_dataclass(pg_backend: Backend, adb: Any) -> None:
    first = await aship("o-1", ["a", "b"], db=adb)
    second = await aship("o-1", ["a", "b"], db=adb)
    assert second == first
    assert type(second) is Shipment
    assert orders(pg_backend) == 1


def test_distinct_keys_each_apply_once(backend: Backend, db: Any) -> None:
    for order_id in ("o-1", "o-2", "o-1", "o-3", "o-2"):
        place(order_id, 5, db=db)
    assert backend.count("orders") == 3
    assert backend.count(EFFECTS) == 3


def test_replay_reads_through_a_dict_row_factory(backend: Backend) -> None:
    """A connection that returns dicts (sqlite row_factory, psycopg dict_row) still replays."""
    if backend.is_sqlite:
        conn = backend.connect()
        conn.row_factory = lambda cur, row: {
            d[0]: v for d, v in zip(cur.description, row, strict=True)
        }
    else:
        conn = backend.connect(row_factory=dict_row)
    assert place("o-1", 10, db=conn) == place("o-1", 10, db=conn)
    assert orders(backend) == 1


def test_connection_may_be_passed_positionally(backend: Backend, db: Any) -> None:
    @transactional(name="orders.put", key=lambda order_id: order_id)
    def put(order_id: str, db: Any) -> int:
        db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES (?, 1)"), (order_id,))
        return 1

    assert put("o-1", db) == put("o-1", db) == 1
    assert orders(backend) == 1


# ---------------------------------------------------------------------------- mismatch


def test_same_key_other_payload_is_a_mismatch_and_changes_nothing(
    backend: Backend, db: Any
) -> None:
    place("o-1", 10, db=db)
    with pytest.raises(nk.IdempotencyMismatch) as info:
        place("o-1", 99, db=db)
    assert info.value.node == "orders.place"
    assert backend.rows("SELECT amount FROM orders") == [(10,)]
    assert backend.count(EFFECTS) == 1
    assert is_idle(db)


async def test_async_same_key_other_payload_is_a_mismatch(pg_backend: Backend, adb: Any) -> None:
    await aplace("o-1", 10, db=adb)
    with pytest.raises(nk.IdempotencyMismatch):
        await aplace("o-1", 99, db=adb)
    assert pg_backend.rows("SELECT amount FROM orders") == [(10,)]
    assert is_idle(adb)


# ---------------------------------------------------------------------------- failures


def test_a_raising_function_rolls_back_and_frees_the_key(backend: Backend, db: Any) -> None:
    SCRIPT.append(ValueError("card declined"))
    with pytest.raises(ValueError, match="card declined"):
        place("o-1", 10, db=db)
    assert orders(backend) == 0
    assert backend.count(EFFECTS) == 0
    assert is_idle(db)
    assert place("o-1", 10, db=db).amount == 10
    assert orders(backend) == 1


async def test_async_raising_function_rolls_back_and_frees_the_key(
    pg_backend: Backend, adb: Any
) -> None:
    SCRIPT.append(ValueError("card declined"))
    with pytest.raises(ValueError, match="card declined"):
        await aplace("o-1", 10, db=adb)
    assert orders(pg_backend) == 0
    assert pg_backend.count(EFFECTS) == 0
    assert (await aplace("o-1", 10, db=adb)).amount == 10
    assert orders(pg_backend) == 1


def _transient(kind: str) -> list[BaseException]:
    if kind == "sqlite":
        return [sqlite3.OperationalError("database is locked")]
    return [
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
    ]


def test_transient_errors_retry_the_whole_transaction(backend: Backend, db: Any) -> None:
    for error in _transient(backend.kind):
        SCRIPT.append(error)
        with instant() as waits:
            result = place(f"o-{type(error).__name__}", 10, db=db)
        assert len(waits.sleeps) == 1  # one rolled-back attempt, one that committed
        assert result.amount == 10
        assert orders(backend, f"o-{type(error).__name__}") == 1
    assert backend.count(EFFECTS) == len(_transient(backend.kind))


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
    ],
    ids=["serialization", "deadlock"],
)
async def test_async_transient_errors_retry_the_whole_transaction(
    pg_backend: Backend, adb: Any, error: BaseException
) -> None:
    SCRIPT.append(error)
    with instant() as waits:
        result = await aplace("o-1", 10, db=adb)
    assert len(waits.sleeps) == 1
    assert result.amount == 10
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1


def test_sqlite_write_lock_held_elsewhere_is_waited_out(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE meets another writer's lock: "database is locked", retried until free."""
    backend = Backend("sqlite", path=tmp_path / "app.db")
    with backend.admin() as conn:
        conn.execute("CREATE TABLE orders (order_id TEXT NOT NULL, amount INTEGER)")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        holder = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5.0)
        time.sleep(0.2)  # the node's first attempts find the database locked meanwhile
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    db = sqlite3.connect(tmp_path / "app.db", timeout=0.05)
    try:
        assert locked.wait(5.0)
        release.set()
        with instant() as waits:
            patient = place.options(retry=nk.Retry(attempts=100))
            assert patient("o-1", 10, db=db).amount == 10
    finally:
        thread.join()
        db.close()
    assert len(waits.sleeps) >= 1
    assert orders(backend) == 1
    assert backend.count(EFFECTS) == 1


def test_sqlite_commit_meeting_a_reader_rolls_back_and_retries(tmp_path: Path) -> None:
    """COMMIT itself finds the database locked (a reader holds it): rolled back, retried."""
    backend = sqlite_backend(tmp_path)
    reader = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    db = sqlite3.connect(tmp_path / "app.db", timeout=0.05)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM orders").fetchone()  # holds a SHARED lock

        def reader_finishes() -> None:
            reader.execute("COMMIT")

        SCRIPT.extend([lambda: None, reader_finishes])  # attempt 1 meets the reader; 2 does not
        with instant() as waits, capture_events() as events:
            assert place("o-1", 10, db=db).amount == 10
        assert "database is locked" in str(events.named("node.retrying")[0].error)
        assert len(waits.sleeps) == 1
        assert not db.in_transaction
    finally:
        reader.close()
        db.close()
    assert orders(backend) == 1
    assert backend.count(EFFECTS) == 1


@transactional(name="orders.place_checked", key=lambda order_id: order_id)
def place_checked(order_id: str, *, db: Any = nk.resource()) -> int:
    """Read, then write: two SERIALIZABLE transactions doing this conflict (write skew)."""
    (before,) = db.execute("SELECT count(*) FROM orders").fetchone()
    step()
    db.execute("INSERT INTO orders (order_id, amount) VALUES (%s, %s)", (order_id, before))
    return int(before)


def test_real_serialization_failure_retries_the_whole_transaction(pg_backend: Backend) -> None:
    serializable = "-cdefault_transaction_isolation=serializable"
    db = pg_backend.connect(options=serializable)

    def concurrent_writer() -> None:
        with (
            psycopg.connect(
                pg_backend.url,
                autocommit=True,
                options=f"-csearch_path={pg_backend.schema} {serializable}",
            ) as other,
            other.transaction(),
        ):
            (n,) = other.execute("SELECT count(*) FROM orders").fetchone()  # type: ignore[misc]
            other.execute("INSERT INTO orders (order_id, amount) VALUES ('other', %s)", (n,))

    SCRIPT.append(concurrent_writer)
    with instant() as waits, capture_events() as events:
        assert place_checked("o-1", db=db) == 1  # the retry saw the other order
    assert len(waits.sleeps) == 1
    retried = events.named("node.retrying")
    assert str(retried[0].error).startswith("SerializationFailure")
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1


def _fail_first_commit(backend: Backend) -> None:
    """A deferred trigger that fails the first COMMIT with SQLSTATE 08006 (connection failure)."""
    with backend.admin() as conn:
        conn.execute("CREATE SEQUENCE commit_faults")
        conn.execute(
            """
            CREATE FUNCTION fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('commit_faults') = 1 THEN
                    RAISE EXCEPTION 'connection lost during commit' USING ERRCODE = '08006';
                END IF;
                RETURN NULL;
            END $$
            """
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER orders_commit_fault AFTER INSERT ON orders "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first_commit()"
        )


def test_operational_error_at_commit_is_retried_and_applies_once(pg_backend: Backend) -> None:
    """An ambiguous error (psycopg OperationalError) on COMMIT is retried: the key decides."""
    _fail_first_commit(pg_backend)
    db = pg_backend.connect()
    with instant() as waits, capture_events() as events:
        assert place("o-1", 10, db=db).amount == 10
    assert len(waits.sleeps) == 1
    assert events.named("node.retrying")[0].fields["kind"] == "ambiguous"
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1


async def test_async_operational_error_at_commit_is_retried_and_applies_once(
    pg_backend: Backend,
) -> None:
    _fail_first_commit(pg_backend)
    adb = await pg_backend.aconnect()
    try:
        with instant() as waits:
            assert (await aplace("o-1", 10, db=adb)).amount == 10
    finally:
        await adb.close()
    assert len(waits.sleeps) == 1
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1


def test_commit_that_happened_but_was_reported_lost_is_replayed(
    pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT succeeds, then the client sees an OperationalError: the retry finds the key."""
    original = psycopg.Transaction.__exit__
    armed: list[bool] = []

    def exit_then_lose_reply(self: psycopg.Transaction, *exc_info: Any) -> bool:
        result = original(self, *exc_info)
        if armed and exc_info[0] is None:
            armed.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(psycopg.Transaction, "__exit__", exit_then_lose_reply)
    db = pg_backend.connect()
    SCRIPT.append(lambda: armed.append(True))
    with instant() as waits, capture_events() as events:
        result = place("o-1", 10, db=db)
    assert result == Invoice(order_id="o-1", amount=10, lines=[10])
    assert len(waits.sleeps) == 1
    assert "node.replayed" in events.names()
    assert orders(pg_backend) == 1
    assert pg_backend.count(EFFECTS) == 1


async def test_async_commit_reported_lost_is_replayed(
    pg_backend: Backend, adb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = psycopg.AsyncTransaction.__aexit__
    armed: list[bool] = []

    async def exit_then_lose_reply(self: psycopg.AsyncTransaction, *exc_info: Any) -> bool:
        result = await original(self, *exc_info)
        if armed and exc_info[0] is None:
            armed.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(psycopg.AsyncTransaction, "__aexit__", exit_then_lose_reply)
    SCRIPT.append(lambda: armed.append(True))
    with instant() as waits, capture_events() as events:
        result = await aplace("o-1", 10, db=adb)
    assert type(result) is Invoice
    assert len(waits.sleeps) == 1
    assert "node.replayed" in events.names()
    assert orders(pg_backend) == 1


def test_broken_connection_raises_the_driver_error_not_a_config_error(
    pg_backend: Backend,
) -> None:
    db = pg_backend.connect()
    place("o-1", 10, db=db)
    db.close()
    with instant(), pytest.raises(psycopg.OperationalError, match="closed"):
        place("o-2", 10, db=db)


# ---------------------------------------------------------------------------- configuration


def _begin(backend: Backend, db: Any) -> None:
    """Leave `db` inside a transaction holding an uncommitted row of the caller's."""
    if backend.kind == "postgres-tx":
        db.execute("INSERT INTO orders (order_id, amount) VALUES ('mine', 1)")  # implicit BEGIN
    else:
        db.execute("BEGIN")
        db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES ('mine', 1)"))


def test_connection_inside_a_transaction_is_a_config_error(backend: Backend, db: Any) -> None:
    _begin(backend, db)
    with pytest.raises(nk.ConfigError, match="inside a transaction") as info:
        place("o-1", 10, db=db)
    assert info.value.option == "connection"
    db.rollback()  # the caller's own work was neither committed nor lost by the node
    assert backend.count("orders") == 0
    assert backend.count(EFFECTS) == 0


async def test_async_connection_inside_a_transaction_is_a_config_error(
    pg_backend: Backend, adb: Any
) -> None:
    await adb.execute("BEGIN" if adb.autocommit else "SELECT 1")
    with pytest.raises(nk.ConfigError, match="inside a transaction"):
        await aplace("o-1", 10, db=adb)
    await adb.rollback()
    assert pg_backend.count(EFFECTS) == 0


def test_missing_connection_parameter_is_a_config_error_naming_it() -> None:
    with pytest.raises(nk.ConfigError, match="'db'") as info:

        @transactional(name="orders.bad", key=lambda order_id: order_id)
        def bad(order_id: str) -> None: ...

    assert info.value.option == "connection"
    assert info.value.node == "orders.bad"

    with pytest.raises(nk.ConfigError, match="'conn'"):

        @transactional(name="orders.bad", key=lambda order_id: order_id, connection="conn")
        def also_bad(order_id: str, *, db: Any) -> None: ...


def test_connection_not_passed_is_a_config_error() -> None:
    with pytest.raises(nk.ConfigError, match="db"):
        place("o-1", 10)


async def test_wrong_connection_kinds_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(nk.ConfigError, match="sqlite3 and psycopg"):
        place("o-1", 10, db=object())
    lite = sqlite3.connect(tmp_path / "x.db")
    try:
        with pytest.raises(nk.ConfigError, match="AsyncConnection"):
            await aplace("o-1", 10, db=lite)
    finally:
        lite.close()


def test_options_keeps_the_node_transactional(backend: Backend, db: Any) -> None:
    """`options()` returns a transactional node: it still records the key and replays."""
    quiet = place.options(retry=None)
    assert quiet("o-1", 10, db=db) == place("o-1", 10, db=db)
    assert orders(backend) == 1
    with pytest.raises(nk.ConfigError, match="unknown option"):
        place.options(idempotency=nk.Idempotency())


def test_sync_node_with_timeout_on_sqlite_runs_in_a_worker_thread(tmp_path: Path) -> None:
    backend = Backend("sqlite", path=tmp_path / "app.db")
    with backend.admin() as conn:
        conn.execute("CREATE TABLE orders (order_id TEXT NOT NULL, amount INTEGER)")
    bounded = place.options(timeout=5.0)
    db = sqlite3.connect(tmp_path / "app.db", check_same_thread=False)
    try:
        assert bounded("o-1", 10, db=db) == bounded("o-1", 10, db=db)
    finally:
        db.close()
    assert orders(backend) == 1


# ---------------------------------------------------------------------------- deadlines


@transactional(name="reports.slow", key=lambda report_id: report_id, timeout=nk.Timeout(total=0.5))
def slow_report(report_id: str, *, db: Any = nk.resource()) -> None:
    db.execute("SELECT pg_sleep(5)")


@transactional(name="reports.slow", key=lambda report_id: report_id, timeout=nk.Timeout(total=0.5))
async def aslow_report(report_id: str, *, db: Any = nk.resource()) -> None:
    await db.execute("SELECT pg_sleep(5)")


def test_deadline_becomes_statement_timeout(pg_backend: Backend) -> None:
    db = pg_backend.connect()
    started = time.monotonic()
    with instant(), pytest.raises(psycopg.errors.QueryCanceled):
        slow_report("r-1", db=db)
    assert time.monotonic() - started < 1.5
    assert is_idle(db)  # cancelled and rolled back by the server, not abandoned mid-query
    assert pg_backend.count(EFFECTS) == 0


async def test_async_deadline_becomes_statement_timeout(pg_backend: Backend, adb: Any) -> None:
    started = time.monotonic()
    with instant(), pytest.raises(psycopg.errors.QueryCanceled):
        await aslow_report("r-1", db=adb)
    assert time.monotonic() - started < 1.5
    assert is_idle(adb)
    assert pg_backend.count(EFFECTS) == 0


def test_deadline_never_loosens_the_session_statement_timeout(pg_backend: Backend) -> None:
    db = pg_backend.connect(options="-cstatement_timeout=200")
    started = time.monotonic()
    with instant(), pytest.raises(psycopg.errors.QueryCanceled):
        slow_report.options(timeout=30.0)("r-1", db=db)
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------- crashes


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    yield from spawner(WORKER, tmp_path)


def sqlite_backend(tmp_path: Path) -> Backend:
    backend = Backend("sqlite", path=tmp_path / "app.db")
    with backend.admin() as conn:
        conn.execute("CREATE TABLE orders (order_id TEXT NOT NULL, amount INTEGER)")
    return backend


def rerun(backend: Backend, node: Callable[..., Receipt]) -> tuple[Receipt, bool]:
    """The same call again, in this process: (result, whether it was a replay)."""
    db = backend.connect()
    try:
        with capture_events() as events, instant():
            result = node("o-1", 10, db=db)
    finally:
        db.close()
        backend.opened.remove(db)
    return result, "node.replayed" in events.names()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash", "committed"),
    [
        ("before_write", False),
        ("before_commit", False),
        ("during_commit", False),  # killed as COMMIT starts
        ("after_commit", True),  # committed; killed before the node returned
    ],
)
def test_sqlite_effect_killed_at_each_step_happens_exactly_once(
    tmp_path: Path, spawn: Callable[..., Worker], crash: str, committed: bool
) -> None:
    backend = sqlite_backend(tmp_path)
    worker = spawn("node", "--sqlite", str(backend.path), "--crash", crash)
    worker.wait_for(f"stage:{crash}")
    worker.kill()
    assert backend.count("orders") == (1 if committed else 0)

    result, replayed = rerun(backend, place_order)

    assert result == Receipt(order_id="o-1", amount=10)
    assert replayed is committed
    assert orders(backend) == 1
    assert backend.count(EFFECTS) == 1


def _slow_commit(backend: Backend) -> None:
    """The worker's COMMIT takes a second (a deferred trigger), so it can be killed mid-way."""
    with backend.admin() as conn:
        conn.execute(
            """
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF current_setting('application_name') = 'nk-sql-worker' THEN
                    PERFORM pg_sleep(1);
                END IF;
                RETURN NULL;
            END $$
            """
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER orders_slow_commit AFTER INSERT ON orders "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )


@pytest.mark.slow
@PG
@pytest.mark.parametrize("crash", ["before_commit", "during_commit"])
def test_postgres_effect_killed_before_and_during_commit_happens_exactly_once(
    request: pytest.FixtureRequest, tmp_path: Path, spawn: Callable[..., Worker], crash: str
) -> None:
    backend = _make_backend(request, "postgres", tmp_path)
    _slow_commit(backend)
    worker = spawn("node", "--postgres", backend.url, "--schema", backend.schema, "--crash", crash)
    if crash == "during_commit":
        # The client has sent COMMIT and waits for the reply; the server is committing.
        worker.wait_for("stage:before_commit")
        deadline = time.monotonic() + 10.0
        while not backend.rows(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'nk-sql-worker' "
            "AND state = 'active' AND query = 'COMMIT'"
        ):
            assert time.monotonic() < deadline, "the worker never started its COMMIT"
            time.sleep(0.01)
    else:
        worker.wait_for(f"stage:{crash}")
    worker.kill()

    result, replayed = rerun(backend, place_order)

    # Killed mid-COMMIT, the server still commits (it notices the lost client only when it
    # replies): the outcome the client never saw is found by the key, and replayed.
    assert replayed is (crash == "during_commit")
    assert result == Receipt(order_id="o-1", amount=10)
    assert orders(backend) == 1
    assert backend.count(EFFECTS) == 1


# ---------------------------------------------------------------------------- outbox


OUTBOX = Outbox()
seen_keys: list[str] = []  # the keys `add` returned, attempt by attempt (observed, not counted)


@pytest.fixture(autouse=True)
def _clean_keys() -> None:
    seen_keys.clear()


@transactional(name="orders.notify", key=lambda order_id: order_id)
def place_and_notify(order_id: str, amount: int, *, db: Any = nk.resource()) -> str:
    db.execute(q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount))
    key = OUTBOX.add(db, "order.placed", {"order_id": order_id, "amount": amount})
    seen_keys.append(key)
    step()
    return key


@transactional(name="orders.notify", key=lambda order_id: order_id)
async def aplace_and_notify(order_id: str, amount: int, *, db: Any = nk.resource()) -> str:
    await db.execute(
        q(db, "INSERT INTO orders (order_id, amount) VALUES (?, ?)"), (order_id, amount)
    )
    key = await OUTBOX.aadd(db, "order.placed", {"order_id": order_id, "amount": amount})
    seen_keys.append(key)
    step()
    return key


def pending(backend: Backend) -> int:
    return backend.count(OUTBOX_TABLE, "dispatched_at IS NULL")


def test_outbox_message_of_a_rolled_back_transaction_is_never_queued(
    backend: Backend, db: Any
) -> None:
    SCRIPT.append(ValueError("declined"))
    with pytest.raises(ValueError, match="declined"):
        place_and_notify("o-1", 10, db=db)
    assert backend.count(OUTBOX_TABLE) == 0
    # the caller's own transaction, rolled back, the same way
    with contextlib.suppress(RuntimeError), db if backend.is_sqlite else db.transaction():
        OUTBOX.add(db, "audit", {"n": 1})
        raise RuntimeError("abort")
    assert backend.count(OUTBOX_TABLE) == 0
    assert OUTBOX.pending(db) == []
    assert is_idle(db)
    # the table rolled back with the first transaction: it is created again when needed
    key = place_and_notify("o-1", 10, db=db)
    assert [m.key for m in OUTBOX.pending(db)] == [key]


def test_committed_message_is_dispatched_once_with_its_key(backend: Backend, db: Any) -> None:
    key = place_and_notify("o-1", 10, db=db)
    delivered: list[Message] = []
    assert OUTBOX.dispatch(db, delivered.append) == 1
    assert OUTBOX.dispatch(db, delivered.append) == 0
    assert [(m.topic, m.key, m.payload) for m in delivered] == [
        ("order.placed", key, {"order_id": "o-1", "amount": 10})
    ]
    assert pending(backend) == 0
    assert backend.rows(f"SELECT attempts FROM {OUTBOX_TABLE}") == [(1,)]
    assert is_idle(db)


def test_message_of_a_retried_node_is_queued_once_with_a_stable_key(
    backend: Backend, db: Any
) -> None:
    SCRIPT.append(_transient(backend.kind)[0])
    with instant() as waits:
        key = place_and_notify("o-1", 10, db=db)
    assert len(waits.sleeps) == 1
    assert seen_keys == [key, key]  # the rolled-back attempt derived the same key
    assert backend.count(OUTBOX_TABLE) == 1
    assert place_and_notify("o-1", 10, db=db) == key  # replayed: no second message
    assert backend.count(OUTBOX_TABLE) == 1


def test_two_messages_on_one_topic_from_one_call_are_both_queued(backend: Backend, db: Any) -> None:
    @transactional(name="orders.fanout", key=lambda order_id: order_id)
    def fanout(order_id: str, *, db: Any = nk.resource()) -> None:
        for recipient in ("a@example.com", "b@example.com"):
            OUTBOX.add(db, "email", {"to": recipient, "order_id": order_id})

    fanout("o-1", db=db)
    fanout("o-1", db=db)
    assert backend.count(OUTBOX_TABLE, "topic = 'email'") == 2


def test_handler_that_raises_leaves_the_message_pending(backend: Backend, db: Any) -> None:
    place_and_notify("o-1", 10, db=db)
    place_and_notify("o-2", 20, db=db)

    def flaky(message: Message) -> None:
        if message.payload["order_id"] == "o-1":
            raise RuntimeError("api down:\nGET https://api.test/send?api_key=SECRET123")

    assert OUTBOX.dispatch(db, flaky) == 1  # o-2 went through; o-1 did not stop it
    # the last error is stored redacted and on one line, like an event's
    assert backend.rows(
        f"SELECT attempts, last_error FROM {OUTBOX_TABLE} WHERE dispatched_at IS NULL"
    ) == [(1, "RuntimeError: api down:; GET https://api.test/send?api_key=***")]
    (message,) = OUTBOX.pending(db)
    assert message.attempts == 1
    delivered: list[Message] = []
    assert OUTBOX.dispatch(db, delivered.append) == 1
    assert [m.key for m in delivered] == [message.key]
    assert pending(backend) == 0


def test_dispatch_refuses_a_connection_inside_a_transaction(backend: Backend, db: Any) -> None:
    place_and_notify("o-1", 10, db=db)
    _begin(backend, db)
    with pytest.raises(nk.ConfigError, match="inside a transaction"):
        OUTBOX.dispatch(db, lambda message: None)
    db.rollback()
    assert pending(backend) == 1


async def test_adispatch_with_an_async_handler(backend: Backend, db: Any) -> None:
    key = place_and_notify("o-1", 10, db=db)
    delivered: list[str] = []

    async def handler(message: Message) -> None:
        delivered.append(message.key)

    assert await OUTBOX.adispatch(db, handler) == 1
    assert await OUTBOX.adispatch(db, handler) == 0
    assert delivered == [key]
    assert pending(backend) == 0


async def test_async_node_queues_with_aadd_and_adispatch_delivers_once(
    pg_backend: Backend, adb: Any
) -> None:
    SCRIPT.append(psycopg.errors.SerializationFailure("retry me"))
    with instant():
        key = await aplace_and_notify("o-1", 10, db=adb)
    assert seen_keys == [key, key]
    assert await aplace_and_notify("o-1", 10, db=adb) == key
    delivered: list[Message] = []

    async def handler(message: Message) -> None:
        delivered.append(message)

    assert await OUTBOX.adispatch(adb, handler) == 1
    assert await OUTBOX.adispatch(adb, handler) == 0
    assert [(m.key, m.payload) for m in delivered] == [(key, {"order_id": "o-1", "amount": 10})]
    assert pg_backend.count(OUTBOX_TABLE) == 1
    assert is_idle(adb)


async def test_async_handler_that_raises_leaves_the_message_pending(
    pg_backend: Backend, adb: Any
) -> None:
    await aplace_and_notify("o-1", 10, db=adb)

    async def down(message: Message) -> None:
        raise RuntimeError("api down")

    assert await OUTBOX.adispatch(adb, down) == 0
    assert pg_backend.rows(f"SELECT attempts, last_error FROM {OUTBOX_TABLE}") == [
        (1, "RuntimeError: api down")
    ]


async def test_sync_outbox_calls_on_an_async_connection_are_config_errors(
    pg_backend: Backend, adb: Any
) -> None:
    with pytest.raises(nk.ConfigError, match="aadd"):
        OUTBOX.add(adb, "t", {})
    with pytest.raises(nk.ConfigError, match="adispatch"):
        OUTBOX.dispatch(adb, lambda message: None)


@pytest.mark.slow
def test_crash_between_commit_and_dispatch_delivers_later_with_the_same_key(
    tmp_path: Path, spawn: Callable[..., Worker]
) -> None:
    backend = sqlite_backend(tmp_path)
    receiver = str(tmp_path / "receiver.db")
    worker = spawn("notify", "--sqlite", str(backend.path), "--crash", "after_commit")
    key = worker.wait_for("key:").removeprefix("key:")
    worker.wait_for("stage:after_commit")
    worker.kill()
    assert pending(backend) == 1

    db = backend.connect()
    assert OUTBOX.dispatch(db, record_delivery(receiver)) == 1
    assert OUTBOX.dispatch(db, record_delivery(receiver)) == 0
    assert Backend("sqlite", path=Path(receiver)).rows("SELECT key, topic FROM deliveries") == [
        (key, "order.placed")
    ]
    # the call itself replays: no second order, no second message
    with instant():
        assert place_order_and_notify("o-1", 10, db=db) == Receipt(order_id="o-1", amount=10)
    assert orders(backend) == 1
    assert backend.count(OUTBOX_TABLE) == 1


@pytest.mark.slow
def test_crash_after_the_handler_redelivers_with_the_same_key(
    tmp_path: Path, spawn: Callable[..., Worker]
) -> None:
    backend = sqlite_backend(tmp_path)
    receiver = str(tmp_path / "receiver.db")
    db = backend.connect()
    place_order_and_notify("o-1", 10, db=db)
    (queued,) = OUTBOX.pending(db)

    worker = spawn(
        "dispatch",
        "--sqlite",
        str(backend.path),
        "--receiver",
        receiver,
        "--crash",
        "after_handler",
    )
    worker.wait_for("stage:after_handler")
    worker.kill()
    assert pending(backend) == 1  # delivered, but the mark never committed

    assert OUTBOX.dispatch(db, record_delivery(receiver)) == 1
    assert OUTBOX.dispatch(db, record_delivery(receiver)) == 0
    deliveries = Backend("sqlite", path=Path(receiver)).rows("SELECT key FROM deliveries")
    assert deliveries == [(queued.key,), (queued.key,)]  # at least once, recognisably the same
    assert pending(backend) == 0
