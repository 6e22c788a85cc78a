"""`batch=nk.Batch(...)`: concurrent calls coalesce into one call of the function with a list.

Effects are counted on a real server (the `LocalAPI` ledger: one bulk request per batch call,
the ids it charged in its data), never by a counter inside the function, except where only
the shape of a call is checked.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import nodekit as nk
from nodekit.idempotency._store import COMPLETED, IN_PROGRESS
from nodekit.testing import APIRequest, APIResponse, Instant, LocalAPI

BULK = "POST /charges/bulk"


def _bulk(request: APIRequest) -> APIResponse:
    """Charge every item of the request: one effect per item, in the request's data."""
    items = request.json()["items"]
    ids = [item["id"] for item in items]
    keys = [item["key"] for item in items]
    results = [{"id": i, "charged": True} for i in ids]
    return APIResponse(200, {"results": results}, effect=True, data={"ids": ids, "keys": keys})


@pytest.fixture
def api() -> Iterator[LocalAPI]:
    with LocalAPI(routes={BULK: _bulk}) as server:
        yield server


def charged(api: LocalAPI) -> Counter[int]:
    """How many times the server charged each id."""
    return Counter(
        i for entry in api.ledger.find(route=BULK, effect=True) for i in entry.data["ids"]
    )


def bulk_calls(api: LocalAPI) -> int:
    return len(api.ledger.find(route=BULK))


def charge_node(
    store: Any, *, max_size: int = 100, max_wait: float = 0.5, **idempotency: Any
) -> Callable[[int], Coroutine[Any, Any, dict[str, Any]]]:
    """A keyed batch node that charges its items on the server in one bulk request."""

    @nk.node(
        name=f"charge-{uuid.uuid4().hex[:8]}",
        batch=nk.Batch(max_size=max_size, max_wait=max_wait),
        idempotency=nk.Idempotency(key=lambda item: f"order-{item}", store=store, **idempotency),
    )
    async def charge(
        items: list[int], *, http: httpx.AsyncClient = nk.resource()
    ) -> list[dict[str, Any]]:
        keys = nk.context().batch_keys
        assert keys is not None
        body = {"items": [{"id": i, "key": k} for i, k in zip(items, keys, strict=True)]}
        response = await http.post("/charges/bulk", json=body)
        response.raise_for_status()
        results: list[dict[str, Any]] = response.json()["results"]
        return results

    return charge


async def run_all(
    node: Callable[[int], Awaitable[Any]], items: list[int], api: LocalAPI
) -> list[Any]:
    async with httpx.AsyncClient(base_url=api.url) as http:
        with nk.use(http=http):
            return await asyncio.gather(*(node(i) for i in items), return_exceptions=True)


# ---------------------------------------------------------------------------- stores


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    kind = request.param
    if kind == "memory":
        made: Any = nk.MemoryStore()
    elif kind == "sqlite":
        made = nk.SQLiteStore(tmp_path / "keys.db")
    elif kind == "redis":
        made = nk.RedisStore(
            request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix")
        )
    else:
        made = nk.PostgresStore(
            request.getfixturevalue("postgres_url"), schema=request.getfixturevalue("pg_schema")
        )
    try:
        yield made
    finally:
        made.close()


# ---------------------------------------------------------------------------- keyed batches


async def test_thousand_keyed_calls_coalesce_and_replay(store: Any, api: LocalAPI) -> None:
    """1,000 concurrent keyed calls make about ten bulk requests and one charge per item; the
    same 1,000 keys again are all replayed, without a single request."""
    charge = charge_node(store)
    items = list(range(1000))

    first = await run_all(charge, items, api)

    assert first == [{"id": i, "charged": True} for i in items]
    assert bulk_calls(api) <= 13
    assert charged(api) == Counter(items)  # exactly one effect per item
    keys = [k for entry in api.ledger.find(route=BULK) for k in entry.data["keys"]]
    assert len(set(keys)) == 1000
    assert None not in keys

    again = await run_all(charge, items, api)

    assert again == first
    assert bulk_calls(api) == len(api.ledger.find(route=BULK)) <= 13  # no new request
    assert charged(api) == Counter(items)


async def test_done_items_are_replayed_and_left_out_of_the_batch(api: LocalAPI) -> None:
    """Items already done are replayed; only the others reach the function."""
    charge = charge_node(nk.MemoryStore(), max_wait=0.02)
    await run_all(charge, list(range(0, 100, 2)), api)  # the even ones
    before = bulk_calls(api)

    results = await run_all(charge, list(range(100)), api)

    assert results == [{"id": i, "charged": True} for i in range(100)]
    later = api.ledger.find(route=BULK)[before:]
    assert sorted(i for entry in later for i in entry.data["ids"]) == list(range(1, 100, 2))
    assert charged(api) == Counter(range(100))


async def test_each_item_is_recorded_under_its_own_key() -> None:
    """Each item's result lands in the store under that item's key, completed."""
    store = nk.MemoryStore()

    @nk.node(
        name="double",
        batch=nk.Batch(max_size=10, max_wait=0),
        idempotency=nk.Idempotency(key=lambda item: item, store=store),
    )
    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    assert await asyncio.gather(*(double(i) for i in range(5))) == [0, 2, 4, 6, 8]
    plan = double.spec.idempotency
    for i in range(5):
        key, _ = plan.key_for((i,), {})
        record = store.get(key)
        assert record is not None
        assert record.state == COMPLETED
        assert json.loads(record.result or "null") == 2 * i


async def test_item_in_flight_elsewhere_is_refused_or_waited_for() -> None:
    """A key held by a call still in its batch: a second call is refused (IdempotencyInProgress),
    or with on_conflict="wait" gets the first call's result; the function runs once."""
    gate = asyncio.Event()
    seen: list[list[str]] = []
    store = nk.MemoryStore()

    def make(on_conflict: Any) -> Any:
        @nk.node(
            name="slow-send",
            batch=nk.Batch(max_size=10, max_wait=0),
            idempotency=nk.Idempotency(
                key=lambda item: item, store=store, on_conflict=on_conflict, wait_timeout=5
            ),
        )
        async def send(items: list[str]) -> list[str]:
            seen.append(list(items))
            await gate.wait()
            return [f"sent {i}" for i in items]

        return send

    raising, waiting = make("raise"), make("wait")
    first = asyncio.ensure_future(raising("a"))
    while not seen:
        await asyncio.sleep(0)

    with pytest.raises(nk.IdempotencyInProgress):
        await raising("a")
    waiter = asyncio.ensure_future(waiting("a"))
    other = asyncio.ensure_future(raising("b"))
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()

    assert await first == "sent a"
    assert await waiter == "sent a"
    assert await other == "sent b"
    assert seen == [["a"], ["b"]]  # "a" ran once; the refused and the waiting call never sat


async def test_same_payload_check_per_item() -> None:
    """An item whose key was used with another payload raises IdempotencyMismatch alone."""

    @nk.node(
        name="put",
        batch=nk.Batch(max_size=10, max_wait=0),
        idempotency=nk.Idempotency(key=lambda item: item["id"], store=nk.MemoryStore()),
    )
    async def put(items: list[dict[str, int]]) -> list[int]:
        return [item["value"] for item in items]

    assert await put({"id": 1, "value": 10}) == 10
    results = await asyncio.gather(
        put({"id": 1, "value": 11}), put({"id": 2, "value": 20}), return_exceptions=True
    )
    assert isinstance(results[0], nk.IdempotencyMismatch)
    assert results[1] == 20


# ---------------------------------------------------------------------------- errors


async def test_an_item_error_is_raised_to_its_caller_only(api: LocalAPI) -> None:
    """An Exception returned for one item is raised to that caller; the others get theirs, and
    the failed item's key is released (a permanent error), so a later call runs it."""
    calls: list[list[int]] = []
    store = nk.MemoryStore()

    @nk.node(
        name="validate",
        batch=nk.Batch(max_size=10, max_wait=0),
        idempotency=nk.Idempotency(key=lambda item: item, store=store),
    )
    async def validate(items: list[int]) -> list[int | Exception]:
        calls.append(list(items))
        return [ValueError(f"bad item {i}") if i == 3 else i * 10 for i in items]

    results = await asyncio.gather(*(validate(i) for i in range(5)), return_exceptions=True)

    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40]
    assert isinstance(results[3], ValueError)
    assert str(results[3]) == "bad item 3"
    again = await asyncio.gather(*(validate(i) for i in range(5)), return_exceptions=True)
    assert isinstance(again[3], ValueError)
    assert calls == [[0, 1, 2, 3, 4], [3]]  # only the failed item ran again


async def test_a_listed_item_error_is_stored_and_replayed() -> None:
    """With cache_errors, an item's business error is recorded under its key and replayed."""
    calls: list[list[int]] = []

    class Declined(Exception):
        pass

    @nk.node(
        name="pay",
        batch=nk.Batch(max_size=10, max_wait=0),
        idempotency=nk.Idempotency(
            key=lambda item: item, store=nk.MemoryStore(), cache_errors=(Declined,)
        ),
    )
    async def pay(items: list[int]) -> list[str | Exception]:
        calls.append(list(items))
        return [Declined("card declined") if i == 2 else "paid" for i in items]

    for _ in range(2):
        results = await asyncio.gather(*(pay(i) for i in range(3)), return_exceptions=True)
        assert results[:2] == ["paid", "paid"]
        assert isinstance(results[2], nk.NodekitError | Declined)
    assert calls == [[0, 1, 2]]


async def test_a_batch_error_fails_every_caller() -> None:
    """An error of the whole call (after its retries) is raised to every caller of the batch."""

    @nk.node(name="down", batch=nk.Batch(max_size=10, max_wait=0))
    async def down(items: list[int]) -> list[int]:
        raise PermissionError("no access")

    results = await asyncio.gather(*(down(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, PermissionError) for r in results)
    assert len({id(r) for r in results}) == 1  # the one error of the one call


async def test_the_batch_call_is_retried_as_one_attempt_chain(nk_instant: Instant) -> None:
    """A safe error retries the whole batch with the same items; every caller gets its result."""
    calls: list[list[int]] = []

    @nk.node(name="flaky", batch=nk.Batch(max_size=10, max_wait=0), retry=nk.Retry(attempts=3))
    async def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) < 3:
            raise ConnectionRefusedError("try again")
        return [nk.context().attempt] * len(items)

    results = await asyncio.gather(*(flaky(i) for i in range(4)))

    assert results == [3, 3, 3, 3]
    assert calls == [[0, 1, 2, 3]] * 3
    assert len(nk_instant.sleeps) == 2


async def test_the_batch_call_has_the_node_timeout() -> None:
    """The node's timeout bounds the batch call; every caller gets the NodeTimeout."""

    @nk.node(name="stuck", batch=nk.Batch(max_size=10, max_wait=0), timeout=0.05)
    async def stuck(items: list[int]) -> list[int]:
        await asyncio.sleep(10)
        return items

    results = await asyncio.gather(*(stuck(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, nk.NodeTimeout) for r in results)


async def test_a_result_count_mismatch_fails_every_caller() -> None:
    """A list of another length fails every caller with an error naming the node."""

    @nk.node(name="short", batch=nk.Batch(max_size=10, max_wait=0))
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    results = await asyncio.gather(*(short(i) for i in range(3)), return_exceptions=True)
    for result in results:
        assert isinstance(result, nk.NodekitError)
        assert "'short'" in str(result)
        assert "2 results for 3 items" in str(result)


async def test_a_result_count_mismatch_records_no_item(api: LocalAPI) -> None:
    """Keyed: no item is recorded as done; every key is kept (the effects may have happened)
    and the callers get OutcomeUnknown, caused by the mismatch."""
    store = nk.MemoryStore()

    @nk.node(
        name="lossy",
        batch=nk.Batch(max_size=10, max_wait=0),
        idempotency=nk.Idempotency(key=lambda item: item, store=store),
    )
    async def lossy(items: list[int]) -> list[str]:
        return ["done"]

    results = await asyncio.gather(*(lossy(i) for i in range(3)), return_exceptions=True)

    for result in results:
        assert isinstance(result, nk.OutcomeUnknown)
        assert "'lossy'" in str(result.__cause__)
        assert "1 results for 3 items" in str(result.__cause__)
    for i in range(3):
        record = store.get(lossy.spec.idempotency.key_for((i,), {})[0])
        assert record is not None
        assert record.state == IN_PROGRESS


async def test_wrong_call_shape_is_a_type_error() -> None:
    """A batch node takes one item: more arguments are a TypeError naming the node."""

    @nk.node(name="one", batch=nk.Batch())
    async def one(items: list[int]) -> list[int]:
        return items

    call: Any = one
    with pytest.raises(TypeError, match="'one' batches its calls"):
        await call(1, 2)
    assert await call(items=5) == 5  # by the parameter's name


# ---------------------------------------------------------------------------- flushing


def on_clock(scenario: Callable[[list[float]], Coroutine[Any, Any, None]]) -> None:
    """Run `scenario` on an event loop whose clock only moves when the scenario moves it."""
    loop = asyncio.new_event_loop()
    now = [1000.0]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    try:
        loop.run_until_complete(scenario(now))
    finally:
        loop.close()


async def spin(times: int = 20) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def test_max_wait_flushes_fewer_items_after_the_first_item_waited() -> None:
    """Fewer than max_size items are sent max_wait after the first of them arrived."""
    calls: list[list[int]] = []

    @nk.node(name="slowly", batch=nk.Batch(max_size=100, max_wait=timedelta(seconds=30)))
    async def slowly(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    async def scenario(now: list[float]) -> None:
        first = asyncio.ensure_future(slowly(1))
        await spin()
        now[0] += 20.0
        second = asyncio.ensure_future(slowly(2))
        await spin()
        now[0] += 9.9
        await spin()
        assert calls == []  # 29.9 s after the first item: still waiting
        now[0] += 0.2
        assert list(await asyncio.gather(first, second)) == [1, 2]
        assert calls == [[1, 2]]  # one call, 30 s after the first item

    on_clock(scenario)


def test_max_size_flushes_at_once_and_starts_a_new_batch() -> None:
    """A full batch is sent at once; the next item opens a new batch with its own wait."""
    calls: list[list[int]] = []

    @nk.node(name="sized", batch=nk.Batch(max_size=3, max_wait=60))
    async def sized(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    async def scenario(now: list[float]) -> None:
        tasks = [asyncio.ensure_future(sized(i)) for i in range(4)]
        await spin()
        assert calls == [[0, 1, 2]]  # no time passed
        now[0] += 60.0
        assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
        assert calls == [[0, 1, 2], [3]]

    on_clock(scenario)


def test_a_cancelled_caller_leaves_the_batch() -> None:
    """A caller cancelled while its item waits for the batch is not sent."""
    calls: list[list[int]] = []

    @nk.node(name="cancelled", batch=nk.Batch(max_size=10, max_wait=1))
    async def send(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    async def scenario(now: list[float]) -> None:
        tasks = [asyncio.ensure_future(send(i)) for i in range(3)]
        await spin()
        tasks[1].cancel()
        now[0] += 1.0
        assert await tasks[0] == 0
        assert await tasks[2] == 2
        assert calls == [[0, 2]]

    on_clock(scenario)


async def test_batch_keys_outside_and_unkeyed() -> None:
    """batch_keys is None outside a batch call, and None per item of an unkeyed batch."""
    seen: list[Any] = []

    @nk.node(name="plain")
    async def plain() -> None:
        seen.append(nk.context().batch_keys)

    @nk.node(name="unkeyed", batch=nk.Batch(max_size=2, max_wait=0))
    async def unkeyed(items: list[int]) -> list[int]:
        seen.append(nk.context().batch_keys)
        return items

    await plain()
    await asyncio.gather(unkeyed(1), unkeyed(2))
    assert seen == [None, (None, None)]


async def test_amap_coalesces() -> None:
    """`node.amap(items)` calls the node once per item: the calls coalesce into batches."""
    calls: list[int] = []

    @nk.node(name="mapped", batch=nk.Batch(max_size=50, max_wait=0.5))
    async def mapped(items: list[int]) -> list[int]:
        calls.append(len(items))
        return [i + 1 for i in items]

    result = await mapped.amap(range(200))
    assert result.unwrap() == list(range(1, 201))
    assert calls == [50, 50, 50, 50]


# ---------------------------------------------------------------------------- decoration


async def _fine(items: list[int]) -> list[int]:
    return items


def _sync(items: list[int]) -> list[int]:
    return items


async def _two(items: list[int], more: list[int]) -> list[int]:
    return items


async def _none() -> list[int]:
    return []


async def _star(*items: int) -> list[int]:
    return list(items)


async def _kwonly(items: list[int], *, flag: bool) -> list[int]:
    return items


async def _defaulted(items: list[int] = []) -> list[int]:  # noqa: B006
    return items


async def _scalar(items: int) -> list[int]:
    return [items]


async def _returns_int(items: list[int]) -> int:
    return 0


@pytest.mark.parametrize(
    ("fn", "batch", "option", "says"),
    [
        (_sync, nk.Batch(), "batch", "needs an async function"),
        (_two, nk.Batch(), "batch", "exactly one positional parameter"),
        (_none, nk.Batch(), "batch", "exactly one positional parameter"),
        (_star, nk.Batch(), "batch", "*args"),
        (_kwonly, nk.Batch(), "batch", "'flag' needs a default"),
        (_defaulted, nk.Batch(), "batch", "without a default"),
        (_scalar, nk.Batch(), "batch", "must be a list"),
        (_returns_int, nk.Batch(), "batch", "return type must be a list"),
        (_fine, 100, "batch", "must be a nk.Batch"),
        (_fine, nk.Batch(max_size=0), "batch.max_size", "max_size must be an int >= 1"),
        (_fine, nk.Batch(max_size=True), "batch.max_size", "max_size"),
        (_fine, nk.Batch(max_wait=-0.1), "batch.max_wait", "max_wait must be >= 0"),
        (_fine, nk.Batch(max_wait=float("inf")), "batch.max_wait", "max_wait"),
        (_fine, nk.Batch(max_wait="soon"), "batch.max_wait", "max_wait"),  # type: ignore[arg-type]
    ],
)
def test_bad_batch_options_are_config_errors(fn: Any, batch: Any, option: str, says: str) -> None:
    """A function not shaped for batching, or a bad Batch, is a ConfigError at decoration."""
    with pytest.raises(nk.ConfigError) as caught:
        nk.node(name="bulk", batch=batch)(fn)
    assert caught.value.option == option
    assert "'bulk'" in str(caught.value)
    assert says in str(caught.value)


def test_key_function_takes_the_item() -> None:
    """In a batch node the key function takes the parameter `item`; another name is an error."""
    with pytest.raises(nk.ConfigError, match="'order'"):
        nk.node(
            name="keyed",
            batch=nk.Batch(),
            idempotency=nk.Idempotency(key=lambda order: order, store=nk.MemoryStore()),
        )(_fine)


def test_zero_max_wait_and_timedelta_are_accepted() -> None:
    assert nk.node(name="z", batch=nk.Batch(max_wait=0))(_fine).name == "z"
    assert nk.node(name="t", batch=nk.Batch(max_wait=timedelta(milliseconds=5)))(_fine)


async def test_the_fallback_answers_each_caller_with_its_item() -> None:
    """A fallback replaces the batch's final error per caller, called with that caller's item."""

    async def queued(error: Exception, items: int) -> str:
        return f"queued {items} ({type(error).__name__})"

    @nk.node(name="refused", batch=nk.Batch(max_size=10, max_wait=0), fallback=queued)
    async def refused(items: list[int]) -> list[str]:
        raise PermissionError("closed")

    assert list(await asyncio.gather(refused(1), refused(2))) == [
        "queued 1 (PermissionError)",
        "queued 2 (PermissionError)",
    ]


@pytest.mark.parametrize("sends_keys", [True, False])
async def test_an_ambiguous_error_is_retried_only_when_the_keys_went_downstream(
    nk_instant: Instant, sends_keys: bool
) -> None:
    """A keyed WRITE batch retries an ambiguous error only if the attempt read `batch_keys`
    (the downstream API then replays what it did); otherwise each caller gets OutcomeUnknown
    and its key stays locked."""
    calls: list[list[int]] = []
    store = nk.MemoryStore()

    @nk.node(
        name=f"bulk-write-{sends_keys}",
        batch=nk.Batch(max_size=10, max_wait=0),
        retry=nk.Retry(attempts=2),
        idempotency=nk.Idempotency(key=lambda item: item, store=store),
    )
    async def write(items: list[int]) -> list[int]:
        if sends_keys:
            assert nk.context().batch_keys is not None
        calls.append(list(items))
        if len(calls) == 1:
            raise ConnectionResetError("dropped after sending")
        return items

    results = await asyncio.gather(write(1), write(2), return_exceptions=True)

    if sends_keys:
        assert list(results) == [1, 2]
        assert calls == [[1, 2], [1, 2]]
    else:
        assert all(isinstance(r, nk.OutcomeUnknown) for r in results)
        assert calls == [[1, 2]]
        with pytest.raises(nk.IdempotencyInProgress):
            await write(1)


async def test_one_unkeyed_item_keeps_an_ambiguous_error_from_being_retried(
    nk_instant: Instant,
) -> None:
    """`Idempotency(optional=True)`: an item without a key cannot be deduplicated downstream,
    so a batch holding one is not retried after an ambiguous error even though it read
    `batch_keys`; the unkeyed item is sent once."""
    calls: list[list[str | None]] = []

    @nk.node(
        name="bulk-mixed",
        batch=nk.Batch(max_size=10, max_wait=0),
        retry=nk.Retry(attempts=2),
        idempotency=nk.Idempotency(
            key=lambda item: item or None, store=nk.MemoryStore(), optional=True
        ),
    )
    async def write(items: list[str]) -> list[str]:
        keys = nk.context().batch_keys
        assert keys is not None
        calls.append([None if key is None else item for item, key in zip(items, keys, strict=True)])
        if len(calls) == 1:
            raise ConnectionResetError("dropped after sending")
        return items

    results = await asyncio.gather(write("o1"), write(""), return_exceptions=True)

    assert calls == [["o1", None]]  # sent once: no retry with the unkeyed item in it
    assert all(isinstance(r, Exception) for r in results)


def test_one_node_serves_one_event_loop_after_another() -> None:
    """A batch left open on a closed loop (its caller cancelled) does not hold up the next
    loop's callers; `node.map` from sync code batches on its own loop too."""
    calls: list[list[int]] = []

    @nk.node(name="loops", batch=nk.Batch(max_size=2, max_wait=60))
    async def send(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    async def abandon() -> None:
        task = asyncio.ensure_future(send(1))
        await spin()
        task.cancel()

    async def use() -> list[int]:
        return list(await asyncio.gather(send(2), send(3)))

    asyncio.run(abandon())
    assert asyncio.run(use()) == [2, 3]
    assert send.map([4, 5]).unwrap() == [4, 5]
    assert calls == [[2, 3], [4, 5]]
