"""The store contract: every built-in store keeps the same rules, sync and async.

Each behaviour runs against Memory, SQLite, Redis and PostgreSQL (the last two skip when their
server is down), once through the store's sync methods and once through its async twins, on a
clock the test moves by hand, so TTL and lease expiry are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import pickle
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

import nodekit as nk
from nodekit.idempotency import COMPLETED, IN_PROGRESS, Acquisition, Record, RecordKey, Store

from .conftest import Backend, FakeClock

NS = "contract@v1"
TOKEN_CHARS = set("0123456789abcdef")
PICKLED = base64.b64encode(pickle.dumps({"amount": 100, "currency": "EUR"})).decode()
# a protocol-0 pickle that would call os.getcwd() if anything ever unpickled it
PICKLE_EXPLOIT = "cos\ngetcwd\n(tR."
GARBAGE = ["{not json", PICKLED, PICKLE_EXPLOIT, '"a string, not an int"']


def new_key(namespace: str = NS, scope: str = "") -> RecordKey:
    return RecordKey(namespace, scope, hashlib.sha256(uuid.uuid4().bytes).hexdigest())


class Ops:
    """One store seen through its sync or its async half; every call is awaited."""

    def __init__(self, store: Any, mode: str) -> None:
        self.store = store
        self.mode = mode

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "sync":
            return getattr(self.store, op)(*args, **kwargs)
        return await getattr(self.store, "a" + op)(*args, **kwargs)

    async def acquire(
        self,
        key: RecordKey,
        fingerprint: str = "fp-a",
        *,
        lease: float = 10.0,
        ttl: float = 100.0,
        takeover: bool = True,
        token: str | None = None,
    ) -> Acquisition:
        got: Acquisition = await self._call(
            "acquire", key, fingerprint, lease=lease, ttl=ttl, takeover=takeover, token=token
        )
        return got

    async def complete(
        self,
        key: RecordKey,
        token: str,
        *,
        result: str | None = "1",
        error: str | None = None,
        ttl: float = 100.0,
    ) -> bool:
        return bool(await self._call("complete", key, token, result=result, error=error, ttl=ttl))

    async def release(self, key: RecordKey, token: str) -> bool:
        return bool(await self._call("release", key, token))

    async def renew(self, key: RecordKey, token: str, *, lease: float = 10.0) -> bool:
        return bool(await self._call("renew", key, token, lease=lease))

    async def get(self, key: RecordKey) -> Record | None:
        record: Record | None = await self._call("get", key)
        return record

    async def delete(self, key: RecordKey) -> bool:
        return bool(await self._call("delete", key))


@pytest.fixture(params=["sync", "async"])
def ops(request: pytest.FixtureRequest, abackend: Backend, fake_clock: FakeClock) -> Ops:
    """A fresh store of each kind on the fake clock, through its sync and its async methods."""
    return Ops(abackend.make(fake_clock), request.param)


# ---------------------------------------------------------------------------- acquire


async def test_an_acquire_records_the_token_its_caller_chose(ops: Ops) -> None:
    """A caller that chose its token can release its claim even if the acquire's reply was
    lost: the record carries exactly that token, and a release with it frees the key."""
    key = new_key()
    got = await ops.acquire(key, "fp-a", lease=10, ttl=100, token="c" * 32)
    assert got.acquired
    assert got.record.owner_token == "c" * 32
    stored = await ops.get(key)
    assert stored is not None
    assert stored.owner_token == "c" * 32
    assert await ops.release(key, "c" * 32)
    assert await ops.get(key) is None


async def test_acquiring_an_absent_key_grants_epoch_1_and_a_fresh_token(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    now = fake_clock.now
    got = await ops.acquire(key, "fp-a", lease=10, ttl=100)
    assert got.acquired
    assert not got.takeover
    assert got.now == now
    record = got.record
    assert (record.namespace, record.scope, record.key_digest) == (key.namespace, "", key.digest)
    assert record.fingerprint == "fp-a"
    assert record.state == IN_PROGRESS
    assert record.epoch == 1
    assert len(record.owner_token) == 32
    assert set(record.owner_token) <= TOKEN_CHARS
    assert record.created_at == now
    assert record.lease_expires_at == now + 10
    assert record.expires_at == now + 100
    assert (record.result, record.error, record.format_version) == (None, None, 1)
    assert await ops.get(key) == record


async def test_a_lease_longer_than_the_ttl_keeps_the_record_alive_as_long(
    ops: Ops, fake_clock: FakeClock
) -> None:
    got = await ops.acquire(new_key(), lease=50, ttl=20)
    assert got.record.expires_at == fake_clock.now + 50


async def test_every_acquisition_gets_its_own_token(ops: Ops) -> None:
    tokens = {(await ops.acquire(new_key())).record.owner_token for _ in range(5)}
    assert len(tokens) == 5


async def test_a_second_acquire_is_refused_and_returns_the_record_untouched(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    first = await ops.acquire(key)
    fake_clock.advance(9.5)
    for fingerprint in ("fp-a", "fp-b"):
        again = await ops.acquire(key, fingerprint)
        assert not again.acquired
        assert not again.takeover
        assert again.record == first.record
        assert again.now == fake_clock.now
    assert await ops.get(key) == first.record


# ---------------------------------------------------------------------------- complete


async def test_completing_with_the_owner_token_stores_the_result(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10, ttl=100)).record
    fake_clock.advance(3)
    assert await ops.complete(key, held.owner_token, result='{"id": 7}', ttl=30)
    done = await ops.get(key)
    assert done == replace(
        held, state=COMPLETED, result='{"id": 7}', error=None, expires_at=fake_clock.now + 30
    )


async def test_completing_can_store_an_error_instead_of_a_result(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    error = '{"type": "shop.CardDeclined", "message": "declined"}'
    assert await ops.complete(key, held.owner_token, result=None, error=error)
    done = await ops.get(key)
    assert done is not None
    assert (done.state, done.result, done.error) == (COMPLETED, None, error)


async def test_a_falsy_result_is_stored_as_is(ops: Ops) -> None:
    for result in ("0", "false", '""', "[]", "null", ""):
        key = new_key()
        held = (await ops.acquire(key)).record
        assert await ops.complete(key, held.owner_token, result=result)
        done = await ops.get(key)
        assert done is not None
        assert done.result == result


async def test_completing_with_a_wrong_token_changes_nothing(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    assert not await ops.complete(key, "0" * 32, result="2")
    assert await ops.get(key) == held
    assert not await ops.complete(new_key(), held.owner_token, result="2")


async def test_a_completed_record_cannot_be_completed_again(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    assert await ops.complete(key, held.owner_token, result="1")
    done = await ops.get(key)
    assert not await ops.complete(key, held.owner_token, result="2")
    assert await ops.get(key) == done


# ---------------------------------------------------------------------------- release


async def test_releasing_with_the_owner_token_frees_the_key(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    assert not await ops.release(key, "0" * 32)
    assert await ops.get(key) == held
    assert await ops.release(key, held.owner_token)
    assert await ops.get(key) is None
    assert not await ops.release(key, held.owner_token)
    again = await ops.acquire(key, "fp-b")
    assert again.acquired
    assert again.record.owner_token != held.owner_token


async def test_a_completed_record_cannot_be_released(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    assert await ops.complete(key, held.owner_token, result="1")
    done = await ops.get(key)
    assert not await ops.release(key, held.owner_token)
    assert await ops.get(key) == done


# ---------------------------------------------------------------------------- renew


async def test_renewing_extends_the_lease_from_now(ops: Ops, fake_clock: FakeClock) -> None:
    key = new_key()
    start = fake_clock.now
    held = (await ops.acquire(key, lease=10, ttl=10)).record
    fake_clock.advance(8)
    assert await ops.renew(key, held.owner_token, lease=10)
    renewed = await ops.get(key)
    assert renewed == replace(held, lease_expires_at=start + 18, expires_at=start + 18)
    fake_clock.advance(7)  # past the first lease and the first expiry, inside the renewed one
    for fingerprint in ("fp-a", "fp-b"):
        refused = await ops.acquire(key, fingerprint)
        assert not refused.acquired
        assert refused.record == renewed


async def test_renewing_never_shortens_the_record_ttl(ops: Ops, fake_clock: FakeClock) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10, ttl=100)).record
    assert await ops.renew(key, held.owner_token, lease=5)
    renewed = await ops.get(key)
    assert renewed is not None
    assert renewed.lease_expires_at == fake_clock.now + 5
    assert renewed.expires_at == held.expires_at


async def test_renewing_with_a_wrong_token_or_after_completion_fails(ops: Ops) -> None:
    key = new_key()
    held = (await ops.acquire(key)).record
    assert not await ops.renew(key, "0" * 32)
    assert await ops.get(key) == held
    assert await ops.complete(key, held.owner_token, result="1")
    done = await ops.get(key)
    assert not await ops.renew(key, held.owner_token)
    assert await ops.get(key) == done
    assert not await ops.renew(new_key(), held.owner_token)


# ---------------------------------------------------------------------------- leases and fencing


async def test_a_live_lease_is_not_taken_over(ops: Ops, fake_clock: FakeClock) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10)).record
    fake_clock.advance(9.5)
    refused = await ops.acquire(key)
    assert not refused.acquired
    assert refused.record == held


async def test_an_expired_lease_is_taken_over_with_a_higher_epoch_and_a_new_token(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    old = (await ops.acquire(key, lease=10, ttl=100)).record
    fake_clock.advance(10)  # the lease ends exactly now
    got = await ops.acquire(key, lease=10, ttl=100)
    assert got.acquired
    assert got.takeover
    new = got.record
    assert new.epoch == old.epoch + 1
    assert new.owner_token != old.owner_token
    assert new.state == IN_PROGRESS
    assert new.created_at == fake_clock.now
    assert new.lease_expires_at == fake_clock.now + 10
    assert new.expires_at == fake_clock.now + 100
    assert await ops.get(key) == new


async def test_a_taken_over_holder_is_fenced_out(ops: Ops, fake_clock: FakeClock) -> None:
    key = new_key()
    old = (await ops.acquire(key, lease=10)).record
    fake_clock.advance(11)
    new = (await ops.acquire(key, lease=10)).record
    assert not await ops.renew(key, old.owner_token)
    assert not await ops.complete(key, old.owner_token, result='"late"')
    assert not await ops.release(key, old.owner_token)
    assert await ops.get(key) == new
    assert await ops.complete(key, new.owner_token, result='"on time"')
    done = await ops.get(key)
    assert done is not None
    assert (done.state, done.result, done.epoch) == (COMPLETED, '"on time"', 2)


async def test_takeover_false_refuses_an_expired_lease(ops: Ops, fake_clock: FakeClock) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10, ttl=100)).record
    fake_clock.advance(11)
    refused = await ops.acquire(key, takeover=False)
    assert not refused.acquired
    assert refused.record == held
    assert await ops.get(key) == held


async def test_an_expired_lease_is_never_taken_over_with_another_payload(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    held = (await ops.acquire(key, "fp-a", lease=10, ttl=100)).record
    fake_clock.advance(11)
    refused = await ops.acquire(key, "fp-b")
    assert not refused.acquired
    assert refused.record == held
    assert await ops.get(key) == held


async def test_an_in_progress_record_past_its_ttl_is_acquired_afresh_by_any_payload(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    held = (await ops.acquire(key, "fp-a", lease=10, ttl=10)).record
    fake_clock.advance(10)
    got = await ops.acquire(key, "fp-b", takeover=False)
    assert got.acquired
    assert not got.takeover  # expiry, not a takeover of a lease
    assert got.record.epoch == held.epoch + 1
    assert got.record.fingerprint == "fp-b"


# ---------------------------------------------------------------------------- TTL


async def test_a_completed_record_is_kept_for_its_whole_ttl(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10, ttl=30)).record
    assert await ops.complete(key, held.owner_token, result='"receipt"', ttl=30)
    done = await ops.get(key)
    fake_clock.advance(29.5)
    for fingerprint in ("fp-a", "fp-b"):
        for takeover in (True, False):
            refused = await ops.acquire(key, fingerprint, takeover=takeover)
            assert not refused.acquired
            assert refused.record == done


async def test_a_completed_record_past_its_ttl_is_acquirable_again_by_any_payload(
    ops: Ops, fake_clock: FakeClock
) -> None:
    key = new_key()
    held = (await ops.acquire(key, lease=10, ttl=30)).record
    assert await ops.complete(key, held.owner_token, result='"receipt"', ttl=30)
    fake_clock.advance(30)
    got = await ops.acquire(key, "fp-b")
    assert got.acquired
    assert not got.takeover
    assert got.record.epoch == held.epoch + 1
    assert got.record.owner_token != held.owner_token
    assert (got.record.state, got.record.result, got.record.error) == (IN_PROGRESS, None, None)
    assert got.record.fingerprint == "fp-b"


# ---------------------------------------------------------------------------- get, delete, keys


async def test_get_and_delete(ops: Ops) -> None:
    key = new_key()
    assert await ops.get(key) is None
    assert not await ops.delete(key)
    held = (await ops.acquire(key)).record
    assert await ops.get(key) == held
    assert await ops.delete(key)
    assert await ops.get(key) is None
    assert not await ops.delete(key)
    assert (await ops.acquire(key)).record.epoch == 1


async def test_namespace_scope_and_digest_each_separate_records(ops: Ops) -> None:
    digest = hashlib.sha256(b"order-1").hexdigest()
    scope = hashlib.sha256(b"tenant").hexdigest()[:32]
    keys = [
        RecordKey("orders", "", digest),
        RecordKey("orders@v2", "", digest),
        RecordKey("orders:eu", "", digest),
        RecordKey("orders", scope, digest),
        RecordKey("orders", "", hashlib.sha256(b"order-2").hexdigest()),
    ]
    held = {key: await ops.acquire(key) for key in keys}
    assert all(got.acquired for got in held.values())
    assert await ops.delete(keys[0])
    for key in keys[1:]:
        assert await ops.get(key) == held[key].record


async def test_planted_records_come_back_exactly_as_stored(ops: Ops, fake_clock: FakeClock) -> None:
    for text in GARBAGE:
        key = new_key()
        record = Record(
            namespace=key.namespace,
            scope=key.scope,
            key_digest=key.digest,
            fingerprint="fp-a",
            state=COMPLETED,
            owner_token="f" * 32,
            epoch=3,
            lease_expires_at=fake_clock.now + 0.125,
            created_at=fake_clock.now,
            expires_at=fake_clock.now + 3600.5,
            result=text,
            error=text,
        )
        ops.store._put(record)
        assert await ops.get(key) == record


async def test_every_store_speaks_the_whole_protocol(ops: Ops) -> None:
    assert isinstance(ops.store, Store)


# ---------------------------------------------------------------------------- concurrency


def test_eight_threads_racing_for_one_key_acquire_it_once(backend: Backend) -> None:
    store = backend.make()
    key = new_key()
    barrier = threading.Barrier(8)
    answers: list[Acquisition] = []

    def race() -> None:
        barrier.wait()
        answers.append(store.acquire(key, "fp-a", lease=30, ttl=60))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [got for got in answers if got.acquired]
    assert len(answers) == 8
    assert len(winners) == 1
    assert {got.record.owner_token for got in answers} == {winners[0].record.owner_token}
    assert store.get(key) == winners[0].record


async def test_fifty_tasks_racing_for_one_key_acquire_it_once(abackend: Backend) -> None:
    store = abackend.make()
    key = new_key()
    answers = await asyncio.gather(
        *(store.aacquire(key, "fp-a", lease=30, ttl=60) for _ in range(50))
    )
    winners = [got for got in answers if got.acquired]
    assert len(winners) == 1
    assert {got.record.owner_token for got in answers} == {winners[0].record.owner_token}
    assert await store.aget(key) == winners[0].record


def test_eight_threads_calling_a_keyed_node_run_it_once(
    backend: Backend, fake_clock: FakeClock
) -> None:
    store = backend.make(fake_clock)
    runs: list[str] = []
    barrier = threading.Barrier(8)

    @nk.node(
        name="ship",
        idempotency=nk.Idempotency(
            key=lambda order: order, store=store, on_conflict="wait", wait_timeout=20
        ),
    )
    def ship(order: str) -> str:
        runs.append(order)
        time.sleep(0.02)  # hold the key while the others arrive
        return f"shipped {order}"

    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(ship("o-1"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs == ["o-1"]
    assert results == ["shipped o-1"] * 8


async def test_fifty_tasks_calling_a_keyed_node_run_it_once(
    abackend: Backend, fake_clock: FakeClock
) -> None:
    store = abackend.make(fake_clock)
    runs: list[str] = []

    @nk.node(
        name="ship",
        idempotency=nk.Idempotency(
            key=lambda order: order, store=store, on_conflict="wait", wait_timeout=20
        ),
    )
    async def ship(order: str) -> str:
        runs.append(order)
        await asyncio.sleep(0.02)
        return f"shipped {order}"

    results = await asyncio.gather(*(ship("o-1") for _ in range(50)))
    assert runs == ["o-1"]
    assert results == ["shipped o-1"] * 50


# ---------------------------------------------------------------------------- through a node


def charge_node(store: Any, runs: list[int], *, is_async: bool) -> Any:
    """A keyed WRITE node, sync or async, that appends each amount it charges to `runs`."""
    idem = nk.Idempotency(key=lambda order: order, store=store)
    if is_async:

        async def acharge(order: str, amount: int) -> int:
            runs.append(amount)
            return amount * 100

        return nk.node(name="charge", idempotency=idem)(acharge)

    def charge(order: str, amount: int) -> int:
        runs.append(amount)
        return amount * 100

    return nk.node(name="charge", idempotency=idem)(charge)


def only_record(backend: Backend, store: Any) -> Record:
    """The one record a test wrote, found through the raw rows, read through the store."""
    (row,) = backend.rows()
    record: Record | None = store.get(RecordKey(row["namespace"], row["scope"], row["key_digest"]))
    assert record is not None
    return record


@pytest.mark.parametrize("text", GARBAGE)
def test_a_corrupt_record_is_never_executed_nor_overwritten(
    backend: Backend, fake_clock: FakeClock, text: str
) -> None:
    store = backend.make(fake_clock)
    runs: list[int] = []
    charge = charge_node(store, runs, is_async=False)
    assert charge("o-1", 5) == 500
    planted = replace(only_record(backend, store), result=text)
    store._put(planted)
    with pytest.raises(nk.IdempotencyCorruptRecord):
        charge("o-1", 5)
    assert runs == [5]
    assert store.get(RecordKey(planted.namespace, planted.scope, planted.key_digest)) == planted


@pytest.mark.parametrize("text", GARBAGE)
async def test_a_corrupt_record_is_never_executed_nor_overwritten_async(
    abackend: Backend, fake_clock: FakeClock, text: str
) -> None:
    store = abackend.make(fake_clock)
    runs: list[int] = []
    charge = charge_node(store, runs, is_async=True)
    assert await charge("o-1", 5) == 500
    planted = replace(only_record(abackend, store), result=text)
    store._put(planted)
    with pytest.raises(nk.IdempotencyCorruptRecord):
        await charge("o-1", 5)
    assert runs == [5]
    key = RecordKey(planted.namespace, planted.scope, planted.key_digest)
    assert await store.aget(key) == planted


def raw_values(backend: Backend) -> list[str]:
    return [f"{name}={value}" for row in backend.rows() for name, value in row.items()]


def test_raw_keys_and_scopes_never_reach_the_store(backend: Backend) -> None:
    store = backend.make()

    @nk.node(
        name="subscribe",
        idempotency=nk.Idempotency(
            key=lambda email: email, scope=lambda tenant: tenant, store=store
        ),
    )
    def subscribe(email: str, tenant: str, plan: str) -> dict[str, str]:
        return {"subscription": "sub-42", "plan": plan}

    assert subscribe("alice@example.com", "acme-corp", "pro") == {
        "subscription": "sub-42",
        "plan": "pro",
    }
    values = raw_values(backend)
    assert len(backend.rows()) == 1
    assert any("sub-42" in value for value in values)  # the rows were read
    for secret in ("alice@example.com", "alice", "example.com", "acme-corp", "acme"):
        assert not any(secret in value for value in values), secret


async def test_raw_keys_and_scopes_never_reach_the_store_async(abackend: Backend) -> None:
    store = abackend.make()

    @nk.node(
        name="subscribe",
        idempotency=nk.Idempotency(
            key=lambda email: email, scope=lambda tenant: tenant, store=store
        ),
    )
    async def subscribe(email: str, tenant: str, plan: str) -> dict[str, str]:
        return {"subscription": "sub-42", "plan": plan}

    assert await subscribe("alice@example.com", "acme-corp", "pro") == {
        "subscription": "sub-42",
        "plan": "pro",
    }
    values = raw_values(abackend)
    assert len(abackend.rows()) == 1
    assert any("sub-42" in value for value in values)
    for secret in ("alice@example.com", "alice", "example.com", "acme-corp", "acme"):
        assert not any(secret in value for value in values), secret


def test_a_replay_through_a_node_returns_the_stored_result(backend: Backend) -> None:
    store = backend.make()
    runs: list[int] = []
    charge = charge_node(store, runs, is_async=False)
    assert charge("o-1", 0) == 0
    assert charge("o-1", 0) == 0
    assert runs == [0]
    with pytest.raises(nk.IdempotencyMismatch):
        charge("o-1", 1)
    assert runs == [0]


async def test_a_replay_through_a_node_returns_the_stored_result_async(abackend: Backend) -> None:
    store = abackend.make()
    runs: list[int] = []
    charge = charge_node(store, runs, is_async=True)
    assert await charge("o-1", 0) == 0
    assert await charge("o-1", 0) == 0
    assert runs == [0]
    with pytest.raises(nk.IdempotencyMismatch):
        await charge("o-1", 1)
    assert runs == [0]


# ---------------------------------------------------------------------------- Redis specifics


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def test_redis_expiry_is_only_garbage_collection_past_the_record(
    redis_url: str, redis_prefix: str, fake_clock: FakeClock
) -> None:
    from nodekit.idempotency.redis import RedisStore

    client = redis_client(redis_url)
    with RedisStore(redis_url, prefix=redis_prefix, clock=fake_clock) as store:
        key = new_key()
        name = f"{redis_prefix}{key.namespace}:{key.scope}:{key.digest}"
        held = store.acquire(key, "fp-a", lease=10, ttl=100).record
        assert 100_000 + 59_000 < client.pttl(name) <= 160_000
        fake_clock.advance(50)
        assert store.complete(key, held.owner_token, result="1", error=None, ttl=1000)
        assert 1_000_000 + 59_000 < client.pttl(name) <= 1_060_000
        assert client.hgetall(f"{redis_prefix}meta") == {"format_version": "1"}
    client.close()


async def test_redis_never_closes_clients_it_was_given(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio

    from nodekit.idempotency.redis import RedisStore

    client = redis_client(redis_url)
    aclient = redis.asyncio.Redis.from_url(redis_url)
    store = RedisStore(prefix=redis_prefix, client=client, async_client=aclient)
    key = new_key()
    assert store.acquire(key, "fp-a", lease=10, ttl=100).acquired
    assert not (await store.aacquire(key, "fp-a", lease=10, ttl=100)).acquired
    await store.aclose()
    assert client.ping()
    assert await aclient.ping()
    client.close()
    await aclient.aclose()


def test_redis_repr_hides_the_password() -> None:
    from nodekit.idempotency.redis import RedisStore

    store = RedisStore("redis://app:s3cret@cache.internal:6380/2", prefix="shop:")
    assert "s3cret" not in repr(store)
    assert "cache.internal:6380/2" in repr(store)
    store.close()


def test_redis_needs_a_url_or_both_clients() -> None:
    from nodekit.idempotency.redis import RedisStore

    with pytest.raises(nk.ConfigError):
        RedisStore()


# ---------------------------------------------------------------------------- PostgreSQL specifics


def test_postgres_creates_its_schema_once_when_many_processes_start_together(
    postgres_url: str, pg_schema: str
) -> None:
    """Eight stores on a schema that does not exist yet race to create it: none fails."""
    import psycopg

    from nodekit.idempotency.postgres import PostgresStore

    schema = f"{pg_schema}_new"
    key = new_key()
    barrier = threading.Barrier(8)
    answers: list[Acquisition] = []
    errors: list[BaseException] = []

    def start() -> None:
        store = PostgresStore(postgres_url, schema=schema)
        try:
            barrier.wait()
            answers.append(store.acquire(key, "fp-a", lease=10, ttl=100))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sum(got.acquired for got in answers) == 1
        with psycopg.connect(postgres_url) as conn:
            meta = conn.execute(f'SELECT name, value FROM "{schema}".nodekit_meta').fetchall()
        assert meta == [("format_version", "1")]
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_postgres_stores_times_as_double_precision(postgres_url: str, pg_schema: str) -> None:
    import psycopg

    from nodekit.idempotency.postgres import PostgresStore

    with PostgresStore(postgres_url, schema=pg_schema) as store:
        got = store.acquire(new_key(), "fp-a", lease=10, ttl=100)
        assert got.acquired
        assert abs(got.now - time.time()) < 60  # the server's clock
    with psycopg.connect(postgres_url) as conn:
        types: dict[str, str] = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'nodekit_idempotency'",
                (pg_schema,),
            ).fetchall()
        )
    assert {types[c] for c in ("lease_expires_at", "created_at", "expires_at")} == {
        "double precision"
    }


def test_postgres_repr_hides_the_password() -> None:
    from nodekit.idempotency.postgres import PostgresStore

    for dsn in (
        "postgresql://app:s3cret@db.internal:5433/shop",
        "host=db.internal port=5433 dbname=shop user=app password=s3cret",
    ):
        store = PostgresStore(dsn, schema="idem")
        assert "s3cret" not in repr(store)
        assert "db.internal" in repr(store)
        store.close()
