"""The fast paths of a keyed call keep every guarantee of the slow ones.

A `MemoryStore` is the in-process cache of its own completed records (IDEMPOTENCY.md rule
23): a replay is read from it without a claim, so it must still check the fingerprint and the
expiry, and see a `resolve` or `delete` at once. Keys are computed with a pre-built JSON
encoder and a prefix fixed at decoration time: the digests must stay byte for byte those of
canonical JSON, or every stored record would be orphaned. Short calls never reach the
renewer's heap.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

import nodekit as nk
from nodekit._canonical import canonical, digest, dumps
from nodekit.idempotency import MemoryStore, RecordKey
from nodekit.idempotency._policy import _json
from nodekit.idempotency._renewer import RENEWER
from nodekit.testing import capture_events

from .conftest import FakeClock

# ---------------------------------------------------------------------------- helpers


def _charge(store: Any, ran: list[str], *, is_async: bool = False, **options: Any) -> Any:
    idem = nk.Idempotency(key=lambda order, amount: order, store=store, **options)
    if is_async:

        @nk.node(name="charge", idempotency=idem)
        async def acharge(order: str, amount: int = 1) -> str:
            ran.append(order)
            return f"charged:{order}:{amount}"

        return acharge

    @nk.node(name="charge", idempotency=idem)
    def charge(order: str, amount: int = 1) -> str:
        ran.append(order)
        return f"charged:{order}:{amount}"

    return charge


class CountingStore(MemoryStore):
    """Overrides `acquire`, so it must see every acquire, replays included."""

    def __init__(self) -> None:
        super().__init__()
        self.acquires = 0

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.acquires += 1
        return super().acquire(*args, **kwargs)


# ---------------------------------------------------------------------------- MemoryStore replays


def test_a_replay_in_process_returns_the_first_result_without_running() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    assert charge("o-1") == "charged:o-1:1"
    assert charge("o-1") == "charged:o-1:1"
    assert ran == ["o-1"]


async def test_a_replay_in_process_returns_the_first_result_without_running_async() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran, is_async=True)
    assert await charge("o-1") == "charged:o-1:1"
    assert await charge("o-1") == "charged:o-1:1"
    assert ran == ["o-1"]


def test_a_completed_record_is_never_replayed_after_its_ttl() -> None:
    clock = FakeClock()
    store, ran = MemoryStore(clock=clock), list[str]()
    charge = _charge(store, ran, ttl=60)
    charge("o-1")
    clock.advance(59)
    charge("o-1")
    assert ran == ["o-1"]
    clock.advance(1)  # expired exactly at its end
    charge("o-1")
    assert ran == ["o-1", "o-1"]


async def test_a_completed_record_is_never_replayed_after_its_ttl_async() -> None:
    clock = FakeClock()
    store, ran = MemoryStore(clock=clock), list[str]()
    charge = _charge(store, ran, is_async=True, ttl=60)
    await charge("o-1")
    clock.advance(59)
    await charge("o-1")
    assert ran == ["o-1"]
    clock.advance(1)
    await charge("o-1")
    assert ran == ["o-1", "o-1"]


def test_a_different_payload_is_a_mismatch_never_a_replay() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    charge("o-1", amount=1)
    with capture_events() as events, pytest.raises(nk.IdempotencyMismatch):
        charge("o-1", amount=2)
    assert ran == ["o-1"]
    assert "idempotency.mismatch" in events.names()
    assert "node.replayed" not in events.names()


async def test_a_different_payload_is_a_mismatch_never_a_replay_async() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran, is_async=True)
    await charge("o-1", amount=1)
    with capture_events() as events, pytest.raises(nk.IdempotencyMismatch):
        await charge("o-1", amount=2)
    assert ran == ["o-1"]
    assert "idempotency.mismatch" in events.names()


def test_a_resolved_or_deleted_key_runs_again_at_once() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    charge("o-1")
    assert nk.resolve(charge, "o-1")
    charge("o-1")
    key = charge.spec.idempotency.key_for(("o-1",), {})[0]
    assert store.delete(key)
    charge("o-1")
    assert ran == ["o-1", "o-1", "o-1"]


async def test_a_resolved_or_deleted_key_runs_again_at_once_async() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran, is_async=True)
    await charge("o-1")
    assert await nk.aresolve(charge, "o-1")
    await charge("o-1")
    key = charge.spec.idempotency.key_for(("o-1",), {})[0]
    assert await store.adelete(key)
    await charge("o-1")
    assert ran == ["o-1", "o-1", "o-1"]


def test_an_in_process_replay_emits_the_replay_events_with_the_epoch() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    charge("o-1")
    with capture_events() as events:
        assert charge("o-1") == "charged:o-1:1"
    names = events.names()
    assert names.index("idempotency.replayed") < names.index("node.replayed")
    replay = next(e for e in events if e.name == "idempotency.replayed")
    assert replay["epoch"] == 1
    assert replay["key"] == charge.spec.idempotency.key_for(("o-1",), {})[0].short
    assert "idempotency.acquired" not in names


def test_an_in_process_replay_marks_the_context_and_calls_the_hook() -> None:
    seen: list[tuple[bool, int | None]] = []
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran, on_replay=lambda ctx: seen.append((ctx.replayed, ctx.epoch)))
    charge("o-1")
    charge("o-1")
    assert seen == [(True, 1)]


def test_a_cached_business_error_replays_in_process() -> None:
    class Declined(Exception):
        pass

    store, ran = MemoryStore(), list[str]()

    @nk.node(
        name="charge",
        idempotency=nk.Idempotency(key=lambda order: order, store=store, cache_errors=(Declined,)),
    )
    def charge(order: str) -> str:
        ran.append(order)
        raise Declined("card declined")

    for _ in range(2):
        with pytest.raises(Declined, match="card declined"):
            charge("o-1")
    assert ran == ["o-1"]


def test_a_store_that_overrides_acquire_sees_every_replay() -> None:
    store, ran = CountingStore(), list[str]()
    charge = _charge(store, ran)
    charge("o-1")
    charge("o-1")
    assert ran == ["o-1"]
    assert store.acquires == 2


def test_an_in_progress_key_is_not_replayed_in_process() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    key, fingerprint = charge.spec.idempotency.key_for(("o-1",), {})
    store.acquire(key, fingerprint, lease=60.0, ttl=60.0)
    assert store.replay_record(key, fingerprint) is None
    with pytest.raises(nk.IdempotencyInProgress):
        charge("o-1")
    assert ran == []


# ---------------------------------------------------------------------------- keys


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


def _reference_key(plan: Any, arguments: dict[str, Any], material: Any, scope: str) -> Any:
    """The key as canonical JSON and `_canonical.digest` define it (the slow, plain way)."""
    secret = plan.secret
    fingerprint = digest(dumps(canonical(arguments)), secret)
    text = dumps([plan.namespace, scope, canonical(material)])
    scope_digest = digest(scope, secret)[:32] if scope else ""
    return RecordKey(plan.namespace, scope_digest, digest(text, secret)), fingerprint


VALUES = [
    7,
    -(2**70),
    True,
    None,
    1.5,
    "o-1",
    'é"\\\n',
    Decimal("1.10"),
    uuid.UUID(int=5),
    dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
    [1, "a", None],
    {"b": 1, "a": [2, 3]},
    {1: "int key"},
    {"s", "t"},
    Line("x", 2),
    float("nan"),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_the_fast_json_is_canonical_json(value: Any) -> None:
    assert _json(canonical(value)) == dumps(canonical(value))


@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scope": "tenant-1"},
        {"secret": "s3cret"},
        {"version": 2, "scope": "t"},
    ],
    ids=["plain", "scope", "secret", "version"],
)
def test_keys_and_fingerprints_are_those_of_canonical_json(
    value: Any, options: dict[str, Any]
) -> None:
    """Whether the key function returns the value, or all arguments are the key material."""

    def body(order: Any, extra: int = 0) -> None:
        return None

    usable_key = value is not None and not (isinstance(value, str) and not value.isascii())
    for key in [lambda order: order, None] if usable_key else [None]:
        plan = nk.node(name="n", idempotency=nk.Idempotency(key=key, **options))(body).spec
        plan = plan.idempotency
        material = value if key is not None else {"order": value, "extra": 0}
        want = _reference_key(
            plan, {"order": value, "extra": 0}, material, options.get("scope", "")
        )
        assert plan.key_for((value,), {}) == want
        assert plan.key_for((), {"order": value, "extra": 0}) == want


def test_a_scope_function_and_declared_fields_give_canonical_keys() -> None:
    def body(order: str, tenant: str, note: str = "") -> None:
        return None

    policy = nk.Idempotency(
        key=lambda order: order, scope=lambda tenant: tenant, fields=["order"], secret=b"k"
    )
    plan = nk.node(name="n", idempotency=policy)(body).spec.idempotency
    key, fingerprint = plan.key_for(("o-1", "acme"), {"note": "hi"})
    want_key, _ = _reference_key(plan, {}, "o-1", "acme")
    assert key == want_key
    assert fingerprint == digest(dumps(canonical({"order": "o-1"})), b"k")


@pytest.mark.parametrize("bad", ["o-1\n", "\to-1", "o-1 ", "", "k" * 256, "caf\u00e9"])
def test_a_user_key_with_a_final_newline_or_other_bad_text_is_refused(bad: str) -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    with pytest.raises(nk.ConfigError):
        charge(bad)
    assert ran == []


# ---------------------------------------------------------------------------- renewer


def test_short_calls_leave_nothing_for_the_renewer() -> None:
    """A call that settles before its first renewal is due never reaches the renewer's heap."""
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran)
    for i in range(200):
        charge(f"o-{i}")
    assert len(ran) == 200
    assert not RENEWER._fresh
    held = [entry for entry in RENEWER._heap if entry[3].renewing]
    assert held == []


async def test_short_calls_leave_nothing_for_the_renewer_async() -> None:
    store, ran = MemoryStore(), list[str]()
    charge = _charge(store, ran, is_async=True)
    for i in range(200):
        await charge(f"o-{i}")
    assert len(ran) == 200
    assert not RENEWER._fresh
