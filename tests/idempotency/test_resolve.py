"""`nk.resolve` forgets one call's record: the way out of OutcomeUnknown for at-most-once."""

import pytest

import nodekit as nk
from nodekit.testing import capture_events


class Clock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


def at_most_once_charge(store: nk.MemoryStore, effects: list[str], drop: list[bool]):  # type: ignore[no-untyped-def]
    @nk.node(
        name="charge-amo",
        idempotency=nk.Idempotency(
            key=lambda order: order, store=store, lease=10, delivery="at_most_once"
        ),
    )
    def charge(order: str, amount: int) -> str:
        effects.append(order)
        if drop and drop.pop(0):
            raise ConnectionResetError("dropped after the request was sent")
        return f"charged {order}"

    return charge


def test_resolve_lets_an_at_most_once_key_run_again_after_outcome_unknown() -> None:
    clock = Clock()
    store = nk.MemoryStore(clock=clock)
    effects: list[str] = []
    charge = at_most_once_charge(store, effects, drop=[True])

    with pytest.raises(nk.OutcomeUnknown):
        charge("o-1", 500)
    clock.now += 11  # the holder's lease is over, but at-most-once takes nothing over
    with pytest.raises(nk.OutcomeUnknown):
        charge("o-1", 500)
    assert effects == ["o-1"]

    with capture_events() as events:
        assert nk.resolve(charge, "o-1", 500) is True  # checked: the charge did not happen
    assert events.named("idempotency.resolved")[0]["deleted"] is True
    assert charge("o-1", 500) == "charged o-1"
    assert effects == ["o-1", "o-1"]


def test_resolve_computes_the_same_key_as_the_call_and_reports_a_missing_record() -> None:
    store = nk.MemoryStore()
    effects: list[str] = []

    @nk.node(
        name="scoped",
        idempotency=nk.Idempotency(
            key=lambda order: order, scope=lambda tenant: tenant, store=store
        ),
    )
    def put(order: str, tenant: str) -> str:
        effects.append(f"{tenant}/{order}")
        return "ok"

    put("o-1", tenant="t1")
    put("o-1", tenant="t2")
    assert nk.resolve(put, "o-1", tenant="t1") is True
    assert nk.resolve(put, "o-1", tenant="t1") is False  # already gone
    put("o-1", tenant="t1")  # runs again
    put("o-1", tenant="t2")  # still replayed
    assert effects == ["t1/o-1", "t2/o-1", "t1/o-1"]


async def test_aresolve_is_the_async_twin() -> None:
    store = nk.MemoryStore()
    effects: list[int] = []

    @nk.node(name="async-once", idempotency=nk.Idempotency(store=store))
    async def once(x: int) -> int:
        effects.append(x)
        return x

    await once(1)
    await once(1)
    assert await nk.aresolve(once, 1) is True
    await once(1)
    assert effects == [1, 1]


def test_resolve_refuses_a_node_without_idempotency() -> None:
    @nk.node(name="plain-node")
    def plain(x: int) -> int:
        return x

    with pytest.raises(nk.ConfigError, match="plain-node"):
        nk.resolve(plain, 1)
