"""`node.map(items, executor=...)`, `Flow(executor=...)` and nodes that travel to other processes.

The process-pool tests run real worker processes (a forkserver `ProcessPoolExecutor`): where a
call ran is told by its pid, effects are counted by a `LocalAPI`'s ledger and the shared
store's file, never by a counter in this process.
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import os
import pickle
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

import nodekit as nk
from nodekit.idempotency import MemoryStore
from nodekit.testing import APIRequest, APIResponse, LocalAPI

cloudpickle = pytest.importorskip("cloudpickle")


# module-level nodes: a worker imports them by name


@nk.node(effect=nk.Effect.READ)  # unkeyed WRITE nodes on other processes warn (tested below)
def square(x: int) -> tuple[int, int]:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x, os.getpid()


@nk.node(effect=nk.Effect.READ)
async def asquare(x: int) -> tuple[int, int]:
    await asyncio.sleep(0)
    return x * x, os.getpid()


class Outer:
    @staticmethod
    @nk.node(effect=nk.Effect.READ)
    def inc(x: int) -> int:
        return x + 1


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as executor:
        yield executor


# ---------------------------------------------------------------------------- pickling


def test_a_module_level_node_pickles_by_reference() -> None:
    for dumps in (pickle.dumps, cloudpickle.dumps):
        assert pickle.loads(dumps(square)) is square
        assert pickle.loads(dumps(asquare)) is asquare
    assert pickle.loads(pickle.dumps(square.spec)) is square.spec
    assert len(pickle.dumps(square)) < 100  # a name, not the node's state


def test_a_node_that_is_not_importable_says_so_when_pickled() -> None:
    @nk.node
    def local(x: int) -> int:
        return x

    # not a complaint about a lock or a ContextVar deep inside: what to do instead
    with pytest.raises(TypeError, match=r"node '.*local' cannot be pickled: it is not importable"):
        cloudpickle.dumps(local)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(square.options(retry=None).spec)


def _shares_records(store: Any, copy: Any) -> None:
    """A result recorded through `store` is replayed through `copy`: one store, two handles."""

    @nk.node(name="write", idempotency=nk.Idempotency(key=lambda x: x, store=store))
    def write(x: int) -> int:
        return x * 2

    @nk.node(name="write", idempotency=nk.Idempotency(key=lambda x: x, store=copy))
    def must_not_run(x: int) -> int:
        raise AssertionError("the copy does not see the original's record")

    assert write(21) == 42
    assert must_not_run(21) == 42


def test_stores_pickle_as_their_location(tmp_path: Path) -> None:
    store = nk.SQLiteStore(tmp_path / "keys.db", table="keys", busy_timeout=3.0)
    copy = pickle.loads(pickle.dumps(store))
    assert copy is not store
    assert (copy.path, copy.table, copy._busy_ms) == (store.path, "keys", 3000)
    _shares_records(store, copy)
    with pytest.raises(TypeError, match="MemoryStore lives in one process"):
        pickle.dumps(MemoryStore())


@pytest.mark.services
def test_postgres_store_pickles_as_its_dsn(postgres_url: str, pg_schema: str) -> None:
    from nodekit.idempotency.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=pg_schema, pool_size=3, pool_timeout=5)
    copy = pickle.loads(pickle.dumps(store))
    try:
        assert (copy.dsn, copy.schema, copy.table, copy.pool_size, copy.pool_timeout) == (
            postgres_url,
            pg_schema,
            "nodekit_idempotency",
            3,
            5.0,
        )
        _shares_records(store, copy)
    finally:
        store.close()
        copy.close()


@pytest.mark.services
def test_redis_store_pickles_as_its_url(redis_url: str, redis_prefix: str) -> None:
    import redis

    from nodekit.idempotency.redis import RedisStore

    store = RedisStore(redis_url, prefix=redis_prefix, pool_size=4)
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.url, copy.prefix, copy.pool_size) == (redis_url, redis_prefix, 4)
    _shares_records(store, copy)
    given = RedisStore(
        client=redis.Redis.from_url(redis_url),
        async_client=redis.asyncio.Redis.from_url(redis_url),
    )
    with pytest.raises(TypeError, match="give it a URL"):
        pickle.dumps(given)


# ---------------------------------------------------------------------------- process pools


@pytest.mark.slow
def test_map_on_a_process_pool_keeps_order_and_records_errors(pool: ProcessPoolExecutor) -> None:
    items = [3, 1, -2, 4, 0, -5, 2]
    result = square.map(items, executor=pool)
    assert [r if r is None else r[0] for r in result.results] == [9, 1, None, 16, 0, None, 4]
    assert sorted(result.errors) == [2, 5]
    assert isinstance(result.errors[2], ValueError)
    assert str(result.errors[5]) == "negative: -5"
    pids = {r[1] for r in result.results if r is not None}
    assert os.getpid() not in pids
    with pytest.raises(ExceptionGroup, match="failed for 2 of 7 items"):
        result.unwrap()

    # an async node runs to completion on the worker; `concurrency` bounds what is in flight
    done = asquare.map(range(20), executor=pool, concurrency=3)
    assert done.ok
    assert [r[0] for r in done.unwrap()] == [x * x for x in range(20)]
    assert os.getpid() not in {r[1] for r in done.unwrap()}
    assert Outer.inc.map([1, 2], executor=pool).unwrap() == [2, 3]


@pytest.mark.slow
async def test_amap_on_a_process_pool(pool: ProcessPoolExecutor) -> None:
    result = await square.amap([2, -1, 3], executor=pool, concurrency=2)
    assert [r if r is None else r[0] for r in result.results] == [4, None, 9]
    assert isinstance(result.errors[1], ValueError)


def _shop() -> tuple[LocalAPI, Any]:
    def charge(request: APIRequest) -> APIResponse:
        order = request.json()["order"]
        return APIResponse(201, {"order": order}, effect=True, data={"order": order})

    return LocalAPI(routes={"POST /charges": charge}), charge


@pytest.mark.slow
def test_keyed_map_on_process_pools_charges_each_order_once_with_a_sqlite_store(
    tmp_path: Path,
) -> None:
    """Each order appears twice among the items, run at once by two processes: one charge
    per order on the server, the duplicate waits for it (the key in the shared SQLite file);
    a second pool, new processes, replays every item without a request."""
    store = nk.SQLiteStore(tmp_path / "keys.db")

    # defined here: it travels by value (cloudpickle), its store as its path
    @nk.node(
        name="charge",
        idempotency=nk.Idempotency(
            key=lambda order: order["id"], store=store, on_conflict="wait", lease=5
        ),
    )
    def charge(order: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(
            f"{order['api']}/charges",
            json={"order": order["id"]},
            headers={"Idempotency-Key": nk.context().idempotency_key_for("charge")},
            timeout=10,
        )
        response.raise_for_status()
        return {"charged": response.json()["order"], "pid": os.getpid()}

    api, _ = _shop()
    context = multiprocessing.get_context("forkserver")
    with api:
        orders = [{"id": f"o-{i:02d}", "api": api.url} for i in range(20)]
        items = [order for order in orders for _ in range(2)]
        with ProcessPoolExecutor(2, mp_context=context) as first:
            result = charge.map(items, executor=first)
        assert result.ok, result.errors
        assert [r["charged"] for r in result.unwrap()] == [o["id"] for o in items]
        assert result.results[0] == result.results[1]  # the duplicate got the stored result
        effects = api.ledger.find(route="POST /charges", effect=True)
        assert Counter(e.data["order"] for e in effects) == {o["id"]: 1 for o in orders}
        assert os.getpid() not in {r["pid"] for r in result.unwrap()}

        requests = len(api.ledger)
        with ProcessPoolExecutor(2, mp_context=context) as second:
            again = charge.map(orders, executor=second)
        assert again.unwrap() == list(result.results[::2])
        assert len(api.ledger) == requests


# ---------------------------------------------------------------------------- thread pools

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def test_a_thread_pool_runs_items_here_in_the_callers_context() -> None:
    lock = threading.Lock()  # nothing is pickled: a local node over a lock is fine

    @nk.node
    def tag(x: int) -> tuple[int, str, int]:
        with lock:
            return x, REQUEST.get(), os.getpid()

    token = REQUEST.set("req-7")
    try:
        with ThreadPoolExecutor(3) as threads:
            result = tag.map(range(5), executor=threads)
    finally:
        REQUEST.reset(token)
    assert result.unwrap() == [(x, "req-7", os.getpid()) for x in range(5)]


# ---------------------------------------------------------------------------- bad input


def test_bad_executors_and_unshareable_keys_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(nk.ConfigError, match=r"node 'square'.*executor must be") as bad:
        square.map([1], executor=cast(Any, "processes"))
    assert bad.value.option == "executor"

    @nk.node(name="no_store", idempotency=nk.Idempotency(key=lambda x: x))
    def no_store(x: int) -> int:
        return x

    @nk.node(name="in_memory", idempotency=nk.Idempotency(key=lambda x: x, store=MemoryStore()))
    def in_memory(x: int) -> int:
        return x

    # refused before anything is submitted: the executor would start no process
    with ProcessPoolExecutor(1) as unused:
        for node in (no_store, in_memory):
            with pytest.raises(nk.ConfigError, match="without a shared store") as err:
                node.map([1], executor=unused)
            assert err.value.option == "idempotency"
        assert unused._processes == {}

    with pytest.raises(nk.ConfigError, match=r"flow 'f'.*executor must be"):
        nk.Flow("f", executor=cast(Any, object()))


@pytest.mark.slow
def test_an_unkeyed_write_node_sent_to_other_processes_warns_once(
    pool: ProcessPoolExecutor,
) -> None:
    """Executors that re-run a dead worker's tasks (Dask) could make an unkeyed WRITE's effect
    twice: sending one to another process warns, once per node, naming it and the fix; a
    thread pool (nothing re-run) does not."""

    @nk.node(name="unkeyed_write")
    def unkeyed_write(x: int) -> int:
        return x

    with ThreadPoolExecutor(1) as threads:
        assert unkeyed_write.map([1], executor=threads).unwrap() == [1]  # no warning here
    with pytest.warns(nk.NodekitWarning, match=r"node 'unkeyed_write' is an unkeyed WRITE.*key"):
        assert unkeyed_write.map([2], executor=pool).unwrap() == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unkeyed_write.map([3], executor=pool).unwrap() == [3]  # once per node


async def test_a_durable_run_refuses_an_executor(tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as threads:
        flow = nk.Flow("durable", executor=threads)
        flow.add(Outer.inc)
        with pytest.raises(nk.ConfigError, match=r"durable run .* executor"):
            await flow.arun({"x": 1}, store=nk.SQLiteStore(tmp_path / "j.db"))


# ---------------------------------------------------------------------------- flows


@pytest.mark.slow
async def test_an_async_flow_fans_out_on_a_process_pool(pool: ProcessPoolExecutor) -> None:
    flow = nk.Flow("fanout", executor=pool)

    @flow.node(effect=nk.Effect.READ)
    def left(x: int) -> dict[str, Any]:
        return {"left": x + 1, "left_pid": os.getpid()}

    @flow.node(effect=nk.Effect.READ)
    def right(x: int) -> dict[str, Any]:
        return {"right": x * 10, "right_pid": os.getpid()}

    @flow.node(after=[left, right])
    def total(left: int, right: int, *, tax: Any = nk.resource()) -> dict[str, Any]:
        # takes a resource (a live object of this process): runs here, in a thread
        return {"total": (left + right) * tax["rate"], "total_pid": os.getpid()}

    with nk.use(tax={"rate": 2}):
        state = await flow.arun({"x": 4})
    assert (state["left"], state["right"], state["total"]) == (5, 40, 90)
    assert os.getpid() not in {state["left_pid"], state["right_pid"]}
    assert state["total_pid"] == os.getpid()

    # a node that fails on the executor fails the run as usual
    @flow.node(after=total, effect=nk.Effect.READ)
    def boom(total: int) -> None:
        raise ValueError("boom")

    with nk.use(tax={"rate": 2}), pytest.raises(nk.FlowError, match="boom"):
        await flow.arun({"x": 4})
