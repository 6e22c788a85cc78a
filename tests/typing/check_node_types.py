"""Types survive `@nk.node` and `@nk.node(...)`: checked by ``mypy --strict``, never run.

Each `assert_type` fails the type check if the decorator lost a parameter or return type.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Literal, assert_type

import nodekit as nk


@nk.node
def add(a: int, b: int = 2) -> int:
    return a + b


@nk.node(retry=nk.Retry(attempts=3), timeout=2.5, effect=nk.Effect.READ)
async def fetch(url: str, *, http: Any = nk.resource()) -> str:
    return url


@nk.node(name="save")
def save(record: dict[str, int]) -> None:
    pass


@nk.node
async def ping() -> bool:
    return True


def check_calls() -> None:
    assert_type(add(1, 2), int)
    assert_type(add(1), int)
    assert_type(add(a=1, b=3), int)
    assert_type(save({"a": 1}), None)
    assert_type(fetch("x"), Coroutine[Any, Any, str]).close()
    assert_type(ping(), Coroutine[Any, Any, bool]).close()


async def check_awaits() -> None:
    assert_type(await fetch("x"), str)
    assert_type(await ping(), bool)


def check_attributes() -> None:
    assert_type(add.name, str)
    assert_type(add.effect, nk.Effect)
    assert_type(add.fn(1, 2), int)
    once = add.options(retry=None)
    assert_type(once.name, str)
    assert_type(once(1), int)
    assert_type(fetch.options(timeout=None)("y"), Coroutine[Any, Any, str]).close()


def check_wrong_calls_are_errors() -> None:
    add("1")  # type: ignore[arg-type]
    add(1, c=3)  # type: ignore[call-arg]
    fetch(1).close()  # type: ignore[arg-type]
    x: str = add(1)  # type: ignore[assignment]
    del x


def check_flows_and_maps() -> None:
    flow = nk.Flow("typed")
    added = flow.add(add, after=[])
    assert_type(added(1, 2), int)

    @flow.node(after=[added])
    def total(a: int) -> int:
        return a

    assert_type(total(3), int)
    assert_type(add.map([1, 2]).ok, bool)
    assert_type(nk.Idempotency(key=lambda order: order).on_conflict, Literal["raise", "wait"])
