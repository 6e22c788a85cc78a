"""Beyond one machine: `node.map` and a flow's fan-out on a real Dask cluster.

A `distributed.LocalCluster` of 4 worker processes (on 127.0.0.1, no dashboard) runs keyed
charges against a `LocalAPI` in this process, the keys in one PostgreSQL store shared by every
worker. Effects are counted by the server's ledger and the store's table, never in a Python
counter: a worker SIGKILLed mid-way loses its tasks, Dask runs them again elsewhere, and each
item is still charged exactly once.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency.postgres import PostgresStore
from nodekit.testing import APIRequest, APIResponse, LocalAPI

distributed = pytest.importorskip("distributed")
psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.slow

ITEMS = 1_000


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A 4-process Dask cluster on loopback, its dashboard off, and a client to it."""
    cluster = distributed.LocalCluster(
        n_workers=4,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=50,
    )
    dask_client = distributed.Client(cluster)
    try:
        yield dask_client
    finally:
        dask_client.close()
        cluster.close()


class Shop:
    """The API's charge route; once a third of the items are charged, it SIGKILLs the worker
    whose charge it is processing: the charge is made, the worker never hears of it."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.charged = 0
        self.victim: int | None = None
        self.victim_order: str | None = None
        self.lock = threading.Lock()

    def charge(self, request: APIRequest) -> APIResponse:
        order = request.json()["order"]
        pid = int(request.headers["x-worker-pid"])  # who sends it; not part of the request
        time.sleep(0.005)  # a charge takes a moment
        with self.lock:
            self.charged += 1
            if self.victim is None and self.charged >= self.kill_after:
                self.victim, self.victim_order = pid, order
                os.kill(pid, signal.SIGKILL)
        return APIResponse(
            201, {"order": order, "pid": pid}, effect=True, data={"order": order, "pid": pid}
        )


def _pids(client: Any) -> dict[str, int]:
    pids: dict[str, int] = client.run(os.getpid)
    return pids


@pytest.mark.services
def test_map_on_dask_charges_every_item_once_with_a_worker_killed(
    postgres_url: str, pg_schema: str, client: Any
) -> None:
    store = PostgresStore(postgres_url, schema=pg_schema, pool_size=2)

    # defined here, so it travels by value; its store travels as its DSN (PostgresStore's
    # __reduce__): every worker keys its calls in the same table
    @nk.node(
        name="charge",
        # a re-run finding the key of a killed worker's call takes it over (its holder is
        # gone), or on another host waits out the short lease
        idempotency=nk.Idempotency(
            key=lambda order: order["id"],
            store=store,
            lease=3,
            on_conflict="wait",
            wait_timeout=10,
        ),
        retry=None,
    )
    def charge(order: dict[str, Any]) -> dict[str, Any]:
        # http.client: a request costs little CPU (the 8 worker threads share 2 cores)
        host, port = order["api"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "POST",
                "/charges",
                json.dumps({"order": order["id"]}),
                {
                    "Content-Type": "application/json",
                    "X-Worker-Pid": str(os.getpid()),
                    "Idempotency-Key": nk.context().idempotency_key_for("charge"),
                },
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 201, response.status
        result: dict[str, Any] = json.loads(body)
        return result

    before = _pids(client)
    assert len(set(before.values())) == 4
    assert os.getpid() not in before.values()
    shop = Shop(kill_after=ITEMS // 3)
    with LocalAPI(routes={"POST /charges": shop.charge}) as api:
        orders = [{"id": f"o-{i:04d}", "api": api.url} for i in range(ITEMS)]
        started = time.monotonic()
        result = charge.map(orders, executor=client.get_executor())
        elapsed = time.monotonic() - started

        assert result.ok, result.errors
        charges = result.unwrap()
        assert [r["order"] for r in charges] == [o["id"] for o in orders]
        effects = api.ledger.find(route="POST /charges", effect=True)
        per_order = Counter(e.data["order"] for e in effects)
        # every item charged exactly once, by the server's ledger
        assert len(effects) == ITEMS
        assert set(per_order.values()) == {1}
        assert set(per_order) == {o["id"] for o in orders}
        # a worker died mid-charge (in flight: charged, never answered); its task ran again
        # on another worker, took over the dead holder's key and sent the same downstream
        # key: the server replayed the charge instead of making a second one
        assert shop.victim in before.values()
        assert shop.victim not in _pids(client).values()
        again = [
            e
            for e in api.ledger.find(route="POST /charges")
            if e.idempotency_key == _key_of(effects, shop.victim_order)
        ]
        assert [e.outcome for e in again] == ["processed", "replayed"]
        assert charges[int(str(shop.victim_order)[2:])]["pid"] == shop.victim
        assert len({e.data["pid"] for e in effects}) >= 4

        # the keys live in the shared store: mapped again, items replay, no request is sent
        requests = len(api.ledger)
        sample = orders[::10]
        replayed = charge.map(sample, executor=client.get_executor())
        assert replayed.ok
        assert replayed.unwrap() == charges[::10]
        assert len(api.ledger) == requests

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT state, count(*) FROM "{pg_schema}".nodekit_idempotency GROUP BY state'
        ).fetchall()
    assert rows == [("COMPLETED", ITEMS)]
    print(f"\n{ITEMS} keyed items on 4 Dask workers, one killed: {elapsed:.1f} s")


def _key_of(effects: list[Any], order: str | None) -> str | None:
    key: str | None = next(e.idempotency_key for e in effects if e.data["order"] == order)
    return key


def test_async_flow_fans_out_on_dask(client: Any) -> None:
    """`Flow(executor=client.get_executor())`: the sync nodes of a parallel level run on the
    cluster's workers; the flow applies their updates here."""
    import asyncio

    flow = nk.Flow("fanout", executor=client.get_executor())

    @flow.node(effect=nk.Effect.READ)
    def left(x: int) -> dict[str, Any]:
        return {"left": x + 1, "left_pid": os.getpid()}

    @flow.node(effect=nk.Effect.READ)
    def right(x: int) -> dict[str, Any]:
        return {"right": x * 10, "right_pid": os.getpid()}

    @flow.node(after=[left, right])
    async def total(left: int, right: int) -> dict[str, Any]:
        return {"total": left + right, "total_pid": os.getpid()}

    workers = set(_pids(client).values())
    state = asyncio.run(flow.arun({"x": 4}))
    assert (state["left"], state["right"], state["total"]) == (5, 40, 45)
    assert {state["left_pid"], state["right_pid"]} <= workers
    assert state["total_pid"] == os.getpid()  # async nodes run on the flow's loop
