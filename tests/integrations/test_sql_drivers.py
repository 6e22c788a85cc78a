"""nodekit.sql over SQLAlchemy (sync and async), asyncpg and pools: one row per key, always.

Every effect is counted from the database (a fresh psycopg connection, after the fact), never
from a Python counter. PostgreSQL runs each test in a schema of its own; SQLite runs on files
in `tmp_path`, and in memory through a SQLAlchemy engine (the unit-test setup the README shows).
The crash tests SIGKILL a real worker (`_sql_drivers_worker.py`) and re-run the node in a fresh
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

import nodekit as nk
from nodekit.sql import transactional
from nodekit.testing import capture_events, instant

from ._sql_drivers_worker import APP, Base, Order, Receipt
from ._workers import Worker, spawner

EFFECTS = "nodekit_sql_effects"
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_sql_drivers_worker.py")
PG = pytest.mark.services


# ---------------------------------------------------------------------------- databases


class Pg:
    """One test's PostgreSQL schema, and the connections, engines and pools opened on it."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self.app = f"nk-drv-{schema[-12:]}"  # application_name: counts this test's connections
        self.engines: list[Any] = []
        self.async_closers: list[Callable[[], Awaitable[Any]]] = []
        with self.admin() as conn:
            conn.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            conn.execute("INSERT INTO counters VALUES (1, 0), (2, 0)")
        engine = sa.create_engine(self.sa_url("psycopg"), connect_args=self.psycopg_args())
        Base.metadata.create_all(engine)
        engine.dispose()

    def sa_url(self, driver: str) -> str:
        return self.url.replace("postgresql://", f"postgresql+{driver}://", 1)

    def psycopg_args(self, options: str = "") -> dict[str, Any]:
        return {
            "options": f"-csearch_path={self.schema} {options}".strip(),
            "application_name": self.app,
        }

    def asyncpg_settings(self) -> dict[str, str]:
        return {"search_path": self.schema, "application_name": self.app}

    @contextlib.contextmanager
    def admin(self) -> Iterator[psycopg.Connection[Any]]:
        conn = psycopg.connect(self.url, autocommit=True, options=f"-csearch_path={self.schema}")
        try:
            yield conn
        finally:
            conn.close()

    def count(self, table: str, where: str = "TRUE") -> int:
        with self.admin() as conn:
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()
            assert row is not None
            return int(row[0])

    def counter(self, id_: int = 1) -> int:
        with self.admin() as conn:
            row = conn.execute("SELECT n FROM counters WHERE id = %s", (id_,)).fetchone()
            assert row is not None
            return int(row[0])

    def server_connections(self) -> int:
        with self.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app,)
            ).fetchone()
            assert row is not None
            return int(row[0])

    def engine(self, **kwargs: Any) -> sa.Engine:
        options = kwargs.pop("options", "")
        engine = sa.create_engine(
            self.sa_url("psycopg"), connect_args=self.psycopg_args(options), **kwargs
        )
        self.engines.append(engine)
        return engine

    def async_engine(self, driver: str = "asyncpg", **kwargs: Any) -> Any:
        if driver == "asyncpg":
            args: dict[str, Any] = {"server_settings": self.asyncpg_settings()}
        else:
            args = self.psycopg_args()
        engine = create_async_engine(self.sa_url(driver), connect_args=args, **kwargs)
        self.async_closers.append(engine.dispose)
        return engine

    async def asyncpg_connect(self) -> Any:
        conn = await asyncpg.connect(self.url, server_settings=self.asyncpg_settings())
        self.async_closers.append(conn.close)
        return conn

    async def asyncpg_pool(self, size: int = 5) -> Any:
        pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=size, server_settings=self.asyncpg_settings()
        )
        self.async_closers.append(pool.close)
        return pool

    def conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(self.url, **self.psycopg_args())


@pytest.fixture
def pg(postgres_url: str, pg_schema: str) -> Iterator[Pg]:
    db = Pg(postgres_url, pg_schema)
    try:
        yield db
    finally:
        for engine in db.engines:
            engine.dispose()


@pytest.fixture
async def apg(pg: Pg) -> AsyncIterator[Pg]:
    """`pg` for async tests: async engines, connections and pools closed on the test's loop."""
    try:
        yield pg
    finally:
        for close in reversed(pg.async_closers):
            await close()


def orders(db: Pg, order_id: str = "o-1") -> int:
    return db.count("orders", f"order_id = '{order_id}'")


# ---------------------------------------------------------------------------- nodes

# What the next attempts do between their read and their write: call a function (sync or async).
SCRIPT: list[Callable[[], Any]] = []


@pytest.fixture(autouse=True)
def _clean_script() -> Iterator[None]:
    SCRIPT.clear()
    yield
    SCRIPT.clear()


def write(db: Any, order_id: str, amount: int) -> None:
    """The effect, as a user would write it: an ORM object on a session, Core on a connection."""
    if isinstance(db, Session):
        db.add(Order(order_id=order_id, amount=amount))
    elif isinstance(db, sa.Connection):
        db.execute(insert(Order).values(order_id=order_id, amount=amount))
    else:
        db.execute("INSERT INTO orders (order_id, amount) VALUES (%s, %s)", (order_id, amount))


async def awrite(db: Any, order_id: str, amount: int) -> None:
    if isinstance(db, AsyncSession):
        db.add(Order(order_id=order_id, amount=amount))
    elif type(db).__module__.startswith("asyncpg"):
        await db.execute("INSERT INTO orders (order_id, amount) VALUES ($1, $2)", order_id, amount)
    elif type(db).__module__.startswith("psycopg"):
        await db.execute(
            "INSERT INTO orders (order_id, amount) VALUES (%s, %s)", (order_id, amount)
        )
    else:
        await db.execute(insert(Order).values(order_id=order_id, amount=amount))


@transactional(name="drivers.place", key=lambda order_id: order_id)
def place(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    write(db, order_id, amount)
    if SCRIPT:
        SCRIPT.pop(0)()
    return Receipt(order_id=order_id, amount=amount)


@transactional(name="drivers.place", key=lambda order_id: order_id)
async def aplace(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    await awrite(db, order_id, amount)
    if SCRIPT:
        await SCRIPT.pop(0)()
    return Receipt(order_id=order_id, amount=amount)


# ---------------------------------------------------------------------------- once per key

SYNC_KINDS = ["session", "connection", "engine", "sessionmaker", "psycopg_pool"]


@contextlib.contextmanager
def sync_target(pg: Pg, kind: str) -> Iterator[Any]:
    """What the caller passes as ``db``: a session, a connection, or a pool of some kind."""
    if kind == "psycopg_pool":
        with psycopg_pool.ConnectionPool(pg.conninfo(), min_size=1, max_size=5) as pool:
            yield pool
        return
    engine = pg.engine(pool_size=5, max_overflow=0)
    if kind == "session":
        with Session(engine) as session:
            yield session
    elif kind == "connection":
        with engine.connect() as conn:
            yield conn
    elif kind == "engine":
        yield engine
    else:
        yield sessionmaker(engine)


@PG
@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_sync_write_applies_once_per_key_and_replays(pg: Pg, kind: str) -> None:
    with sync_target(pg, kind) as db, capture_events() as events:
        first = place("o-1", 10, db=db)
        again = place("o-1", 10, db=db)
        place("o-2", 20, db=db)
    assert first == again == Receipt(order_id="o-1", amount=10)
    assert type(again) is Receipt
    assert len(events.named("node.replayed")) == 1
    assert orders(pg) == 1
    assert orders(pg, "o-2") == 1
    assert pg.count(EFFECTS) == 2


ASYNC_KINDS = [
    "session-asyncpg",
    "session-psycopg",
    "connection-asyncpg",
    "engine-asyncpg",
    "sessionmaker-psycopg",
    "asyncpg",
    "asyncpg_pool",
    "psycopg_pool",
]


@contextlib.asynccontextmanager
async def async_target(pg: Pg, kind: str) -> AsyncIterator[Any]:
    if kind == "asyncpg":
        yield await pg.asyncpg_connect()
        return
    if kind == "asyncpg_pool":
        yield await pg.asyncpg_pool()
        return
    if kind == "psycopg_pool":
        async with psycopg_pool.AsyncConnectionPool(
            pg.conninfo(), min_size=1, max_size=5, open=False
        ) as pool:
            yield pool
        return
    what, _, driver = kind.partition("-")
    engine = pg.async_engine(driver, pool_size=5, max_overflow=0)
    if what == "session":
        async with AsyncSession(engine) as session:
            yield session
    elif what == "connection":
        async with engine.connect() as conn:
            yield conn
    elif what == "engine":
        yield engine
    else:
        yield async_sessionmaker(engine)


@PG
@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_write_applies_once_per_key_and_replays(apg: Pg, kind: str) -> None:
    async with async_target(apg, kind) as db:
        with capture_events() as events:
            first = await aplace("o-1", 10, db=db)
            again = await aplace("o-1", 10, db=db)
            await aplace("o-2", 20, db=db)
    assert first == again == Receipt(order_id="o-1", amount=10)
    assert type(again) is Receipt
    assert len(events.named("node.replayed")) == 1
    assert orders(apg) == 1
    assert orders(apg, "o-2") == 1
    assert apg.count(EFFECTS) == 2


@PG
def test_a_raising_function_rolls_back_the_orm_write_and_frees_the_key(pg: Pg) -> None:
    class Declined(Exception):
        pass

    def decline() -> None:
        raise Declined("card declined")

    with Session(pg.engine()) as session:
        SCRIPT.append(decline)
        with instant(), pytest.raises(Declined):
            place("o-1", 10, db=session)
        assert not session.in_transaction()
        assert place("o-1", 10, db=session).amount == 10
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


# ---------------------------------------------------------------------------- real conflicts


@transactional(name="drivers.bump", key=lambda order_id: order_id)
def bump(order_id: str, *, db: Any = nk.resource()) -> int:
    """Read the counter, let a concurrent writer in, then update it: a REPEATABLE READ conflict."""
    db.execute(sa.text("SELECT n FROM counters WHERE id = 1")).scalar_one()
    if SCRIPT:
        SCRIPT.pop(0)()
    db.execute(sa.text("UPDATE counters SET n = n + 1 WHERE id = 1"))
    write(db, order_id, 1)
    return int(db.execute(sa.text("SELECT n FROM counters WHERE id = 1")).scalar_one())


@transactional(name="drivers.bump", key=lambda order_id: order_id)
async def abump(order_id: str, *, db: Any = nk.resource()) -> int:
    if type(db).__module__.startswith("asyncpg"):
        await db.fetchval("SELECT n FROM counters WHERE id = 1")
        if SCRIPT:
            await SCRIPT.pop(0)()
        await db.execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        await awrite(db, order_id, 1)
        return int(await db.fetchval("SELECT n FROM counters WHERE id = 1"))
    (await db.execute(sa.text("SELECT n FROM counters WHERE id = 1"))).scalar_one()
    if SCRIPT:
        await SCRIPT.pop(0)()
    await db.execute(sa.text("UPDATE counters SET n = n + 1 WHERE id = 1"))
    await awrite(db, order_id, 1)
    return int((await db.execute(sa.text("SELECT n FROM counters WHERE id = 1"))).scalar_one())


def concurrent_bump(pg: Pg) -> None:
    """Another connection updates the counter and commits, mid-way through the node's attempt."""
    with pg.admin() as other:
        other.execute("UPDATE counters SET n = n + 1 WHERE id = 1")


@PG
def test_real_serialization_failure_retries_the_whole_orm_transaction(pg: Pg) -> None:
    engine = pg.engine(isolation_level="REPEATABLE READ")
    SCRIPT.append(lambda: concurrent_bump(pg))
    with Session(engine) as session, instant() as waits, capture_events() as events:
        assert bump("o-1", db=session) == 2  # the retry saw the other writer's update
    assert len(waits.sleeps) == 1
    assert "SerializationFailure" in str(events.named("node.retrying")[0].error)
    assert pg.counter() == 2
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


@PG
@pytest.mark.parametrize("kind", ["asyncpg", "session-asyncpg"])
async def test_async_real_serialization_failure_retries_the_whole_transaction(
    apg: Pg, kind: str
) -> None:
    async def other_writer() -> None:
        concurrent_bump(apg)

    if kind == "asyncpg":
        db: Any = await apg.asyncpg_connect()
        await db.execute("SET default_transaction_isolation = 'repeatable read'")
    else:
        engine = apg.async_engine("asyncpg", isolation_level="REPEATABLE READ")
        db = AsyncSession(engine)
        apg.async_closers.append(db.close)
    SCRIPT.append(other_writer)
    with instant() as waits:
        assert await abump("o-1", db=db) == 2
    assert len(waits.sleeps) == 1
    assert apg.counter() == 2
    assert orders(apg) == 1
    assert apg.count(EFFECTS) == 1


@transactional(name="drivers.transfer", key=lambda order_id, first, second: order_id)
def transfer(order_id: str, first: int, second: int, *, db: Any = nk.resource()) -> None:
    """Lock counter `first`, then `second`: two calls in opposite orders deadlock."""
    db.execute(sa.text("UPDATE counters SET n = n + 1 WHERE id = :id"), {"id": first})
    if SCRIPT:
        SCRIPT.pop(0)()
    db.execute(sa.text("UPDATE counters SET n = n + 1 WHERE id = :id"), {"id": second})
    write(db, order_id, first)


@PG
def test_real_deadlock_between_two_threads_is_retried_one_row_each(pg: Pg) -> None:
    engine = pg.engine(pool_size=2, options="-cdeadlock_timeout=50ms")
    both_locked = threading.Barrier(2, timeout=30)
    SCRIPT.extend([both_locked.wait, both_locked.wait])  # only the first attempts meet
    errors: list[BaseException] = []

    def call(order_id: str, first: int, second: int) -> None:
        try:
            transfer(order_id, first, second, db=engine)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    with instant() as waits, capture_events() as events:
        threads = [
            threading.Thread(target=call, args=("o-a", 1, 2)),
            threading.Thread(target=call, args=("o-b", 2, 1)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    retried = [str(e.error) for e in events.named("node.retrying")]
    assert errors == [], retried
    assert len(retried) == len(waits.sleeps) == 1, retried  # one victim, retried once
    assert "DeadlockDetected" in retried[0]
    assert (orders(pg, "o-a"), orders(pg, "o-b")) == (1, 1)
    assert (pg.counter(1), pg.counter(2)) == (2, 2)
    assert pg.count(EFFECTS) == 2


# ---------------------------------------------------------------------------- lost connections


@PG
@pytest.mark.parametrize("kind", ["session", "connection", "engine"])
def test_connection_dropped_before_commit_retries_on_a_fresh_connection(pg: Pg, kind: str) -> None:
    """The server connection dies between the write and COMMIT: SQLAlchemy reconnects."""
    with sync_target(pg, kind) as db:

        def drop_mine() -> None:
            with pg.admin() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'idle in transaction'",
                    (pg.app,),
                )

        SCRIPT.append(drop_mine)
        with instant() as waits, capture_events() as events:
            assert place("o-1", 10, db=db).amount == 10
    assert len(waits.sleeps) == 1
    assert events.named("node.retrying")[0].fields["kind"] == "ambiguous"
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


@PG
async def test_asyncpg_pool_connection_dropped_before_commit_retries_on_another(apg: Pg) -> None:
    pool = await apg.asyncpg_pool()

    async def drop_mine() -> None:
        async with pool.acquire() as other:  # a second pooled connection, not the node's
            await other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = $1 AND pid <> pg_backend_pid() AND state = 'idle in transaction'",
                apg.app,
            )
        # Let the client read the server's goodbye, as it would a network cut's reset: a
        # statement sent in between meets asyncpg's InternalClientError (classified permanent).
        await asyncio.sleep(0.05)

    SCRIPT.append(drop_mine)
    with instant() as waits:
        assert (await aplace("o-1", 10, db=pool)).amount == 10
    assert len(waits.sleeps) == 1
    assert orders(apg) == 1
    assert apg.count(EFFECTS) == 1


@PG
def test_orm_commit_that_happened_but_was_reported_lost_is_settled_by_the_key(
    pg: Pg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT goes through, then the client is told the connection dropped: replayed, not re-run."""
    engine = pg.engine()
    original = engine.dialect.do_commit
    armed: list[bool] = []

    def commit_then_lose_reply(dbapi_connection: Any) -> None:
        original(dbapi_connection)
        if armed:
            armed.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine.dialect, "do_commit", commit_then_lose_reply)
    SCRIPT.append(lambda: armed.append(True))
    with Session(engine) as session, instant() as waits, capture_events() as events:
        result = place("o-1", 10, db=session)
    assert result == Receipt(order_id="o-1", amount=10)
    assert len(waits.sleeps) == 1
    assert events.named("node.retrying")[0].fields["kind"] == "ambiguous"
    assert "node.replayed" in events.names()
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


@PG
async def test_asyncpg_commit_reported_lost_is_settled_by_the_key(
    apg: Pg, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = asyncpg.transaction.Transaction.commit
    armed: list[bool] = []

    async def commit_then_lose_reply(self: Any) -> None:
        await original(self)
        if armed:
            armed.clear()
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit_then_lose_reply)
    pool = await apg.asyncpg_pool()

    async def arm() -> None:
        armed.append(True)

    SCRIPT.append(arm)
    with instant() as waits, capture_events() as events:
        result = await aplace("o-1", 10, db=pool)
    assert type(result) is Receipt
    assert len(waits.sleeps) == 1
    assert "node.replayed" in events.names()
    assert orders(apg) == 1


# ---------------------------------------------------------------------------- deadlines


@transactional(name="drivers.slow", key=lambda report_id: report_id, timeout=nk.Timeout(total=0.5))
def slow(report_id: str, *, db: Any = nk.resource()) -> None:
    db.execute(sa.text("SELECT pg_sleep(5)"))


@transactional(name="drivers.slow", key=lambda report_id: report_id, timeout=nk.Timeout(total=0.5))
async def aslow(report_id: str, *, db: Any = nk.resource()) -> None:
    if type(db).__module__.startswith("asyncpg"):
        await db.execute("SELECT pg_sleep(5)")
    else:
        await db.execute(sa.text("SELECT pg_sleep(5)"))


@PG
def test_deadline_becomes_the_sqlalchemy_statement_timeout(pg: Pg) -> None:
    started = time.monotonic()
    with Session(pg.engine()) as session, instant(), pytest.raises(sa.exc.OperationalError) as info:
        slow("r-1", db=session)
    assert isinstance(info.value.orig, psycopg.errors.QueryCanceled)
    assert time.monotonic() - started < 1.5
    assert pg.count(EFFECTS) == 0


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error, through SQLAlchemy's wrappers (``orig``, the cause)."""
    while exc is not None:
        state = getattr(exc, "sqlstate", None)
        if isinstance(state, str):
            return state
        exc = getattr(exc, "orig", None) or exc.__cause__
    return None


@PG
@pytest.mark.parametrize("kind", ["asyncpg", "session-asyncpg"])
async def test_deadline_becomes_the_async_statement_timeout(apg: Pg, kind: str) -> None:
    async with async_target(apg, kind) as db:
        started = time.monotonic()
        with instant(), pytest.raises(Exception, match="statement timeout") as info:
            await aslow("r-1", db=db)
        assert time.monotonic() - started < 1.5
        assert sqlstate(info.value) == "57014"  # query_canceled
        if kind == "asyncpg":
            assert not db.is_in_transaction()  # cancelled by the server, rolled back
    assert apg.count(EFFECTS) == 0


# ---------------------------------------------------------------------------- pools


def peak_connections(pg: Pg) -> tuple[Callable[[], int], Callable[[], None]]:
    """Sample this test's server connections (pg_stat_activity) until stopped; the peak."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], pg.server_connections())
            done.wait(0.005)

    thread = threading.Thread(target=sample)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return lambda: peak[0], stop


@PG
@pytest.mark.parametrize("kind", ["engine", "psycopg_pool"])
def test_a_thousand_calls_through_a_sync_pool_of_five_use_five_connections(
    pg: Pg, kind: str
) -> None:
    with sync_target(pg, kind) as pool:
        peak, stop = peak_connections(pg)
        try:

            def calls(worker: int) -> None:
                for i in range(125):
                    place(f"o-{worker}-{i}", i, db=pool)

            threads = [threading.Thread(target=calls, args=(w,)) for w in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            place("o-0-0", 0, db=pool)  # a repeat: replayed through the pool too
        finally:
            stop()
    assert 1 <= peak() <= 5
    assert pg.count("orders") == 1000
    assert pg.count(EFFECTS) == 1000


@PG
@pytest.mark.parametrize("kind", ["engine-asyncpg", "asyncpg_pool", "psycopg_pool"])
async def test_a_thousand_calls_through_an_async_pool_of_five_use_five_connections(
    apg: Pg, kind: str
) -> None:
    async with async_target(apg, kind) as pool:
        peak, stop = peak_connections(apg)
        try:

            async def calls(worker: int) -> None:
                for i in range(50):
                    await aplace(f"o-{worker}-{i}", i, db=pool)

            await asyncio.gather(*(calls(w) for w in range(20)))
        finally:
            await asyncio.to_thread(stop)
    assert 1 <= peak() <= 5
    assert apg.count("orders") == 1000
    assert apg.count(EFFECTS) == 1000


# ---------------------------------------------------------------------------- SQLite, no server


def test_orm_node_unit_test_on_in_memory_sqlite() -> None:
    """The README's unit test: an ORM node on a SQLAlchemy in-memory SQLite engine."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        assert place("o-1", 10, db=session) == place("o-1", 10, db=session)
        assert session.scalar(sa.select(sa.func.count()).select_from(Order)) == 1
    with engine.connect() as conn:
        assert place("o-2", 20, db=sessionmaker(engine)).amount == 20
        assert place("o-3", 30, db=engine).amount == 30
        assert place("o-3", 30, db=conn).amount == 30
        assert conn.scalar(sa.select(sa.func.count()).select_from(Order)) == 3
        assert conn.scalar(sa.text(f"SELECT count(*) FROM {EFFECTS}")) == 3
    engine.dispose()


@transactional(name="drivers.place_positional", key=lambda order_id: order_id)
def place_positional(order_id: str, db: Any) -> str:
    db.execute(insert(Order).values(order_id=order_id, amount=1))
    return type(db).__name__


def test_a_pool_passed_positionally_lends_its_connection_in_its_place() -> None:
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    assert place_positional("o-1", engine) == "Connection"
    assert place_positional("o-1", engine) == "Connection"  # replayed
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Order)) == 1
    engine.dispose()


def test_sqlite_file_through_a_sqlalchemy_engine_applies_once(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    with capture_events() as events:
        for _ in range(3):
            assert place("o-1", 10, db=engine) == Receipt(order_id="o-1", amount=10)
    engine.dispose()
    assert len(events.named("node.replayed")) == 2
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        assert conn.execute(f"SELECT count(*) FROM {EFFECTS}").fetchone() == (1,)


def test_sqlite_rolls_back_the_orm_write_of_a_failed_attempt(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    import sqlite3

    SCRIPT.append(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")))
    with Session(engine) as session, instant() as waits:
        assert place("o-1", 10, db=session).amount == 10
    assert len(waits.sleeps) == 1
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Order)) == 1
    engine.dispose()


# ---------------------------------------------------------------------------- configuration


def test_importing_nodekit_imports_no_database_driver() -> None:
    code = (
        "import sys, nodekit, nodekit.sql\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in "
        "('sqlalchemy', 'asyncpg', 'psycopg', 'psycopg_pool')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_pending_orm_changes_are_a_config_error() -> None:
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Order(order_id="mine", amount=1))
        with pytest.raises(nk.ConfigError, match="pending changes") as info:
            place("o-1", 10, db=session)
        assert info.value.option == "connection"
        session.rollback()
        session.execute(sa.text("SELECT 1"))  # autobegun: inside a transaction
        with pytest.raises(nk.ConfigError, match="inside a transaction"):
            place("o-1", 10, db=session)
    engine.dispose()


async def test_sync_and_async_kinds_must_match_the_node() -> None:
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    with pytest.raises(nk.ConfigError, match="async def"):
        place("o-1", 10, db=create_async_engine("postgresql+asyncpg://nobody@127.0.0.1/x"))
    with pytest.raises(nk.ConfigError, match="async connection"):
        await aplace("o-1", 10, db=Session(engine))
    engine.dispose()


# ---------------------------------------------------------------------------- crashes


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    yield from spawner(WORKER, tmp_path)


@pytest.mark.slow
@PG
@pytest.mark.parametrize("driver", ["sa", "asyncpg", "sa-async"])
@pytest.mark.parametrize(
    ("crash", "committed"),
    [("before_write", False), ("before_commit", False), ("after_commit", True)],
)
def test_write_killed_before_during_and_after_commit_happens_exactly_once(
    pg: Pg, spawn: Callable[..., Worker], driver: str, crash: str, committed: bool
) -> None:
    where = ["--url", pg.url, "--schema", pg.schema]
    worker = spawn(driver, *where, "--crash", crash)
    worker.wait_for(f"stage:{crash}")
    worker.kill()
    assert pg.count("orders") == (1 if committed else 0)

    rerun = spawn(driver, *where)  # the same node, in a fresh process
    assert rerun.wait_for("replayed:") == f"replayed:{committed}"
    assert rerun.wait_for("result:") == "result:o-1:10"
    rerun.wait_for("stage:done")
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


@pytest.mark.slow
@PG
@pytest.mark.parametrize("driver", ["sa", "asyncpg"])
def test_write_killed_while_the_server_commits_happens_exactly_once(
    pg: Pg, spawn: Callable[..., Worker], driver: str
) -> None:
    """The worker's COMMIT takes a second (a deferred trigger) and is killed meanwhile."""
    with pg.admin() as conn:
        conn.execute(
            f"""
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF current_setting('application_name') = '{APP}' THEN PERFORM pg_sleep(1); END IF;
                RETURN NULL;
            END $$
            """
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER orders_slow_commit AFTER INSERT ON orders "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )
    where = ["--url", pg.url, "--schema", pg.schema]
    worker = spawn(driver, *where, "--crash", "never")
    worker.wait_for("stage:before_commit")
    deadline = time.monotonic() + 10.0
    with pg.admin() as admin:
        while not admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
            "AND query ILIKE 'COMMIT%%'",
            (APP,),
        ).fetchone():
            assert time.monotonic() < deadline, "the worker never started its COMMIT"
            time.sleep(0.01)
    worker.kill()

    rerun = spawn(driver, *where)
    # The server still commits (it notices the lost client only when it replies): the
    # outcome the client never saw is found by the key, and replayed.
    assert rerun.wait_for("replayed:") == "replayed:True"
    rerun.wait_for("stage:done")
    assert orders(pg) == 1
    assert pg.count(EFFECTS) == 1


def test_autocommit_isolation_is_a_config_error_and_writes_nothing() -> None:
    """Under AUTOCOMMIT each statement would commit alone: the key could not guard the write."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool, isolation_level="AUTOCOMMIT")
    Base.metadata.create_all(engine)
    with Session(engine) as session, pytest.raises(nk.ConfigError, match="AUTOCOMMIT"):
        place("o-1", 10, db=session)
    with pytest.raises(nk.ConfigError, match="AUTOCOMMIT"):
        place("o-1", 10, db=engine.execution_options(isolation_level="AUTOCOMMIT"))
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Order)) == 0
    engine.dispose()
