"""`Idempotency(skew=...)`: leases and TTLs are honoured past their nominal end by the skew."""

import asyncio
import threading

import pytest

import nodekit as nk


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def holder_and_caller(store: nk.MemoryStore, skew: float) -> tuple[object, list[str]]:
    ran: list[str] = []
    entered, release = threading.Event(), threading.Event()

    @nk.node(
        name="skewed",
        idempotency=nk.Idempotency(key=lambda k: k, store=store, lease=10, skew=skew, fields=["k"]),
    )
    def call(k: str, hold: bool) -> str:
        ran.append(k)
        if hold:
            entered.set()
            release.wait(5)
        return f"done:{len(ran)}"

    call.entered = entered  # type: ignore[attr-defined]
    call.release = release  # type: ignore[attr-defined]
    return call, ran


def test_a_lease_is_not_taken_over_within_the_skew() -> None:
    clock = Clock()
    store = nk.MemoryStore(clock=clock)
    call, ran = holder_and_caller(store, skew=5)
    holder = threading.Thread(target=call, args=("k", True))  # type: ignore[arg-type]
    holder.start()
    assert call.entered.wait(5)  # type: ignore[attr-defined]
    try:
        clock.now += 12  # past the 10 s lease, within the 5 s skew
        with pytest.raises(nk.IdempotencyInProgress):
            call("k", False)  # type: ignore[operator]
        assert ran == ["k"]
        clock.now += 4  # 16 s: past lease + skew
        assert call("k", False) == "done:2"  # type: ignore[operator]
        assert ran == ["k", "k"]
    finally:
        call.release.set()  # type: ignore[attr-defined]
        holder.join(5)


@pytest.mark.parametrize(("later", "runs"), [(103.0, 1), (106.0, 2)])
def test_a_completed_result_outlives_its_ttl_by_the_skew(later: float, runs: int) -> None:
    clock = Clock()
    store = nk.MemoryStore(clock=clock)
    ran: list[int] = []

    @nk.node(name="ttl-skew", idempotency=nk.Idempotency(store=store, ttl=100, skew=5, lease=1))
    def once(x: int) -> int:
        ran.append(x)
        return x

    once(1)
    clock.now += later
    once(1)
    assert len(ran) == runs


async def test_a_lease_is_not_taken_over_within_the_skew_async() -> None:
    clock = Clock()
    store = nk.MemoryStore(clock=clock)
    ran: list[str] = []
    entered, release = asyncio.Event(), asyncio.Event()

    @nk.node(
        name="skewed-async",
        idempotency=nk.Idempotency(key=lambda k: k, store=store, lease=10, skew=5, fields=["k"]),
    )
    async def call(k: str, hold: bool) -> str:
        ran.append(k)
        if hold:
            entered.set()
            await release.wait()
        return f"done:{len(ran)}"

    holder = asyncio.create_task(call("k", True))
    await entered.wait()
    try:
        clock.now += 12
        with pytest.raises(nk.IdempotencyInProgress):
            await call("k", False)
        clock.now += 4
        assert await call("k", False) == "done:2"
    finally:
        release.set()
        await holder


@pytest.mark.parametrize("skew", [-1, "5", True])
def test_a_bad_skew_is_a_config_error_naming_it(skew: object) -> None:
    with pytest.raises(nk.ConfigError, match=r"idempotency\.skew"):

        @nk.node(name="bad-skew", idempotency=nk.Idempotency(skew=skew))  # type: ignore[arg-type]
        def f(x: int) -> int:
            return x
