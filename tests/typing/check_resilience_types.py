"""Types survive `@nk.node(circuit=..., rate_limit=..., bulkhead=..., fallback=...)`: checked
by ``mypy --strict``, never run.

Each `assert_type` fails the type check if the guards or the fallback cost the decorated
function its parameters (its ParamSpec) or its return type, for sync and async functions.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

import nodekit as nk

breaker = nk.CircuitBreaker("payments", failure_rate=0.5, min_calls=10, open_for=30.0)
limit = nk.RateLimit("payments", 10, per=1.0, burst=5)
slots = nk.Bulkhead("payments", 3, queue=10)


def queued(error: Exception, order_id: str, amount: int = 0, *, note: str = "") -> str:
    return f"queued {order_id}"


async def aqueued(error: Exception, order_id: str, *, retries: int = 1) -> list[str]:
    return [order_id]


@nk.node(circuit=breaker, rate_limit=limit, bulkhead=slots, fallback=queued)
def send(order_id: str, amount: int = 0, *, note: str = "") -> str:
    return order_id


@nk.node(
    effect=nk.Effect.READ,
    retry=nk.Retry(attempts=3),
    timeout=nk.Timeout(total=5.0),
    circuit=breaker,
    rate_limit=limit,
    bulkhead=slots,
    fallback=aqueued,
)
async def asend(order_id: str, *, retries: int = 1) -> list[str]:
    return [order_id]


@nk.node(circuit=breaker)
def only_circuit(x: float) -> float:
    return x


@nk.node(rate_limit=limit, bulkhead=None, fallback=None)
async def only_limit(x: bytes, /) -> bytes:
    return x


def check_calls() -> None:
    assert_type(send("o-1"), str)
    assert_type(send("o-1", 5, note="n"), str)
    assert_type(send(order_id="o-1", amount=2), str)
    assert_type(only_circuit(1.5), float)
    assert_type(asend("o-1"), Coroutine[Any, Any, list[str]]).close()
    assert_type(asend("o-1", retries=2), Coroutine[Any, Any, list[str]]).close()
    assert_type(only_limit(b"x"), Coroutine[Any, Any, bytes]).close()


async def check_awaits() -> None:
    assert_type(await asend("o-1"), list[str])
    assert_type(await only_limit(b"x"), bytes)


def check_attributes() -> None:
    assert_type(send.fn("o-1"), str)
    assert_type(send.options(circuit=None)("o-1"), str)
    assert_type(asend.options(fallback=None)("o-1"), Coroutine[Any, Any, list[str]]).close()


def check_wrong_calls_are_errors() -> None:
    send(1)  # type: ignore[arg-type]
    send("o-1", note=3)  # type: ignore[arg-type]
    send("o-1", extra=1)  # type: ignore[call-arg]
    asend("o-1", 2).close()  # type: ignore[call-arg]
    only_limit(x=b"x").close()  # type: ignore[call-arg]
    x: int = send("o-1")  # type: ignore[assignment]
    del x
