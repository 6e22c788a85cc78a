"""Async resources: awaited factories, async context managers, the loop of sync runs, threads.

Real libraries where the behaviour is about them: ``httpx.AsyncClient`` against a loopback
`LocalAPI`, ``asyncpg.connect`` against the test PostgreSQL, sqlite3 for a thread-bound
connection.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

import nodekit as nk
from nodekit.testing import LocalAPI, capture_events


@pytest.fixture
def api() -> Iterator[LocalAPI]:
    with LocalAPI() as server:
        yield server


class Conn:
    """A connection-like object opened by a coroutine: `aclose()` closes it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


@nk.node
async def status(code: int, *, client: Any = nk.resource()) -> int:
    response = await client.get(f"/status/{code}")
    return int(response.status_code)


@nk.node
async def select_one(*, db: Any = nk.resource()) -> int:
    return int(await db.fetchval("SELECT 1"))


# ---------------------------------------------------------------------------- nk.managed


async def test_async_context_manager_factory_is_entered_once_and_closed_at_exit(
    api: LocalAPI,
) -> None:
    made: list[httpx.AsyncClient] = []

    def factory() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(base_url=api.url))
        return made[-1]

    async with nk.use(client=nk.managed(factory)):
        assert made == []  # entered on first use
        assert await status(200) == 200
        assert await status(204) == 204
        assert len(made) == 1
        assert not made[0].is_closed
    assert made[0].is_closed


async def test_coroutine_factory_is_awaited_and_its_connection_closed_at_exit(
    postgres_url: str,
) -> None:
    opened: list[Any] = []

    @nk.node
    async def grab(*, db: Any = nk.resource()) -> int:
        opened.append(db)
        return int(await db.fetchval("SELECT 41 + 1"))

    async with nk.use(db=nk.managed(lambda: asyncpg.connect(postgres_url))):
        assert await grab() == 42
        assert await grab() == 42
        assert len({id(conn) for conn in opened}) == 1
        assert isinstance(opened[0], asyncpg.Connection)
        assert not opened[0].is_closed()
    assert opened[0].is_closed()


async def test_coroutine_resolving_to_an_async_context_manager_is_entered(api: LocalAPI) -> None:
    made: list[httpx.AsyncClient] = []

    async def factory() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(base_url=api.url))
        return made[-1]

    async with nk.use(client=nk.managed(factory)):
        assert await status(200) == 200
    assert made[0].is_closed


async def test_coroutine_resolving_to_a_value_with_aclose_is_closed() -> None:
    made: list[Conn] = []

    async def factory() -> Conn:
        made.append(Conn("a"))
        return made[-1]

    @nk.node
    async def name(*, db: Any = nk.resource()) -> str:
        return str(db.name)

    async with nk.use(db=nk.managed(factory)):
        assert await name() == "a"
        assert not made[0].closed
    assert made[0].closed


def test_coroutine_factory_is_refused_in_sync_code_without_a_stray_coroutine() -> None:
    async def factory() -> Conn:
        return Conn("never")

    @nk.node
    def sync_node(*, db: Any = nk.resource()) -> Any:
        return db

    with (
        nk.use(db=nk.managed(factory)),
        pytest.raises(nk.ConfigError, match=r"'db' is a coroutine .*async with nk\.use") as info,
    ):
        sync_node()
    assert info.value.option == "db"
    gc.collect()  # a coroutine left un-awaited would warn here (warnings are errors)


async def test_coroutine_factory_is_refused_inside_a_sync_use_block() -> None:
    async def factory() -> Conn:
        return Conn("never")

    @nk.node
    async def node(*, db: Any = nk.resource()) -> Any:
        return db

    with (
        nk.use(db=nk.managed(factory)),
        pytest.raises(nk.ConfigError, match="cannot close it"),
    ):
        await node()
    gc.collect()


# ---------------------------------------------------------------------------- awaitables in use()


async def test_coroutine_given_to_async_use_is_awaited_at_entry_and_closed_at_exit(
    postgres_url: str,
) -> None:
    async with nk.use(db=asyncpg.connect(postgres_url)) as provided:
        conn = provided["db"]
        assert isinstance(conn, asyncpg.Connection)
        assert await select_one() == 1
    assert conn.is_closed()


async def test_failing_awaitable_closes_those_already_opened() -> None:
    first = Conn("first")

    async def opens() -> Conn:
        return first

    async def fails() -> Conn:
        raise ConnectionRefusedError("no server")

    async def never() -> Conn:
        raise AssertionError("not awaited after a failure")

    with pytest.raises(ConnectionRefusedError):
        async with nk.use(a=opens(), b=fails(), c=never()):
            pass
    assert first.closed
    gc.collect()


async def test_an_open_awaitable_value_is_a_plain_value_never_awaited_nor_closed(
    postgres_url: str,
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    try:
        with nk.use(db=pool):  # a sync block takes it too: it is no coroutine
            pass
        async with nk.use(db=pool) as provided:
            assert provided["db"] is pool
            assert await select_one() == 1
        assert not pool.is_closing()
    finally:
        await pool.close()


def test_coroutine_given_to_sync_use_is_refused() -> None:
    async def connect() -> Conn:
        return Conn("never")

    with pytest.raises(nk.ConfigError, match=r"'db' is a coroutine") as info:  # noqa: SIM117
        with nk.use(db=connect()):
            pass
    assert "resources={'db': factory}" in str(info.value)
    gc.collect()


# ---------------------------------------------------------------------------- sync runs


def test_async_client_given_with_use_works_across_repeated_sync_runs(api: LocalAPI) -> None:
    flow = nk.Flow("repeat")

    @flow.node
    async def fetch(*, client: Any = nk.resource()) -> dict[str, Any]:
        response = await client.get("/status/200")
        return {"status": response.status_code, "loop": id(asyncio.get_running_loop())}

    client = httpx.AsyncClient(base_url=api.url)
    with nk.use(client=client):
        results = [flow.run({}) for _ in range(3)]
    assert [r["status"] for r in results] == [200, 200, 200]
    assert len({r["loop"] for r in results}) == 1  # one loop for the thread's sync runs
    asyncio.run(client.aclose())


def test_async_client_given_with_use_works_across_repeated_sync_maps(api: LocalAPI) -> None:
    """`node.map` over an async node runs on the thread's loop too, kept between calls."""

    @nk.node(effect=nk.Effect.READ)
    async def fetch(code: int, *, client: Any = nk.resource()) -> tuple[int, int]:
        response = await client.get(f"/status/{code}")
        return response.status_code, id(asyncio.get_running_loop())

    client = httpx.AsyncClient(base_url=api.url)
    with nk.use(client=client):
        batches = [fetch.map([200, 201]) for _ in range(3)]
    assert [[status for status, _ in batch.unwrap()] for batch in batches] == [[200, 201]] * 3
    assert len({loop for batch in batches for _, loop in batch.unwrap()}) == 1
    asyncio.run(client.aclose())


def test_async_nodes_of_sync_runs_see_each_runs_own_context() -> None:
    flow = nk.Flow("ctx")

    @flow.node
    async def who(*, tag: str = nk.resource()) -> dict[str, Any]:
        return {"run": nk.context().run_id, "tag": tag, "inner": await inner()}

    @nk.node
    async def inner(*, tag: str = nk.resource()) -> str:
        return tag

    with nk.use(tag="a"):
        first = flow.run({}, run_id="run-a")
    with nk.use(tag="b"):
        second = flow.run({}, run_id="run-b")
    assert first == {"run": "run-a", "tag": "a", "inner": "a"}
    assert second == {"run": "run-b", "tag": "b", "inner": "b"}


def test_sync_run_opens_and_closes_an_async_flow_resource_each_run(api: LocalAPI) -> None:
    made: list[httpx.AsyncClient] = []

    def client() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(base_url=api.url))
        return made[-1]

    flow = nk.Flow("per-run", resources={"client": client})

    @flow.node
    async def fetch(client: httpx.AsyncClient) -> dict[str, Any]:
        assert not client.is_closed
        return {"status": (await client.get("/status/201")).status_code}

    assert [flow.run({}) for _ in range(3)] == [{"status": 201}] * 3
    assert len(made) == 3
    assert all(c.is_closed for c in made)


def test_sync_run_awaits_a_flow_resource_factory_returning_a_coroutine(
    postgres_url: str,
) -> None:
    opened: list[Any] = []
    flow = nk.Flow("pg", resources={"db": lambda: asyncpg.connect(postgres_url)})

    @flow.node
    async def query(db: Any) -> dict[str, Any]:
        opened.append(db)
        return {"one": await db.fetchval("SELECT 1")}

    assert flow.run({}) == {"one": 1}
    assert flow.run({}) == {"one": 1}
    assert all(isinstance(c, asyncpg.Connection) and c.is_closed() for c in opened)


async def test_async_run_awaits_a_flow_resource_factory_returning_a_coroutine(
    postgres_url: str,
) -> None:
    opened: list[Any] = []
    flow = nk.Flow("apg", resources={"db": lambda: asyncpg.connect(postgres_url)})

    @flow.node
    async def query(db: Any) -> dict[str, Any]:
        opened.append(db)
        return {"one": await db.fetchval("SELECT 1")}

    assert await flow.arun({}) == {"one": 1}
    assert opened[0].is_closed()


def test_sync_run_refuses_an_async_managed_resource_before_any_node_runs() -> None:
    ran: list[str] = []

    @asynccontextmanager
    async def session() -> AsyncIterator[str]:
        yield "s"

    flow = nk.Flow("refused")

    @flow.node
    async def work(session: str) -> None:
        ran.append(session)

    with (
        nk.use(session=nk.managed(session)),
        pytest.raises(nk.ConfigError, match=r"async with nk\.use.*resources=\{'session'"),
    ):
        flow.run({})
    assert ran == []


def test_a_threads_loop_is_closed_when_the_thread_ends() -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    flow = nk.Flow("thread")

    @flow.node
    async def grab() -> None:
        loops.append(asyncio.get_running_loop())

    def work() -> None:
        flow.run({})
        flow.run({})

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    flow.run({})
    assert loops[0] is loops[1]
    assert loops[0].is_closed()
    assert loops[2] is not loops[0]
    assert not loops[2].is_closed()  # the main thread's, kept until interpreter exit


async def test_sync_run_from_async_code_reuses_its_helper_loop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    flow = nk.Flow("from-async")

    @flow.node
    async def grab() -> None:
        loops.append(asyncio.get_running_loop())

    # a sync run from async code blocks this loop and runs its async nodes on a helper's
    flow.run({})
    flow.run({})
    assert loops[0] is loops[1]
    assert loops[0] is not asyncio.get_running_loop()


# ---------------------------------------------------------------------------- thread-bound


def test_main_thread_sqlite_connection_in_a_timed_node_fails_clearly_after_one_attempt() -> None:
    calls: list[int] = []
    conn = sqlite3.connect(":memory:")

    @nk.node(timeout=5, retry=nk.Retry(attempts=3))
    def count(*, db: sqlite3.Connection = nk.resource()) -> int:
        calls.append(1)
        return int(db.execute("SELECT 1").fetchone()[0])

    try:
        with (
            capture_events() as events,
            nk.use(db=conn),
            pytest.raises(nk.ConfigError, match="check_same_thread=False") as info,
        ):
            count()
    finally:
        conn.close()
    error = info.value
    assert error.node is not None
    assert error.node.endswith("count")
    assert error.option == "db"
    assert "parameter 'db'" in str(error)
    assert "drop timeout=" in str(error)
    assert isinstance(error.__cause__, sqlite3.ProgrammingError)
    assert calls == [1]
    assert not events.named("node.retrying")


def test_main_thread_sqlite_connection_in_a_timed_flow_node_fails_the_flow_clearly() -> None:
    conn = sqlite3.connect(":memory:")
    flow = nk.Flow("sqlite")

    @flow.node(timeout=5)
    def count(db: sqlite3.Connection) -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    try:
        with nk.use(db=conn), pytest.raises(nk.FlowError, match="drop timeout=") as info:
            flow.run({})
    finally:
        conn.close()
    cause = info.value.__cause__
    assert isinstance(cause, nk.ConfigError)
    assert cause.option == "db"


async def test_main_thread_sqlite_connection_in_an_async_run_fails_the_flow_clearly() -> None:
    """`arun` runs sync nodes in worker threads: the same error, with the way out."""
    conn = sqlite3.connect(":memory:")
    flow = nk.Flow("sqlite-arun")

    @flow.node
    def count(db: sqlite3.Connection) -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    try:
        with nk.use(db=conn), pytest.raises(nk.FlowError, match=r"flow\.run") as info:
            await flow.arun({})
    finally:
        conn.close()
    cause = info.value.__cause__
    assert isinstance(cause, nk.ConfigError)
    assert cause.option == "db"
    assert isinstance(cause.__cause__, sqlite3.ProgrammingError)


def test_main_thread_sqlite_connection_in_a_threaded_map_says_how_to_fix_it() -> None:
    conn = sqlite3.connect(":memory:")

    @nk.node(effect=nk.Effect.READ)
    def one(n: int, *, db: sqlite3.Connection = nk.resource()) -> int:
        return int(db.execute("SELECT ?", (n,)).fetchone()[0])

    try:
        with nk.use(db=conn):
            threaded = one.map([1, 2], concurrency=2)
            inline = one.map([1, 2], concurrency=1)
    finally:
        conn.close()
    assert not threaded.ok
    assert all(isinstance(e, nk.ConfigError) for e in threaded.errors.values())
    assert "concurrency=1" in str(threaded.errors[0])
    assert inline.unwrap() == [1, 2]


def test_sqlite_connection_opened_inside_a_timed_node_works() -> None:
    @nk.node(timeout=5)
    def count() -> int:
        with sqlite3.connect(":memory:") as conn:
            value = int(conn.execute("SELECT 1").fetchone()[0])
        conn.close()
        return value

    assert count() == 1
