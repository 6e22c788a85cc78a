"""The decorator: a node is called like the original function and keeps its identity."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import Flaky, instant


@nk.node
def add(a: int, b: int = 2, *, scale: int = 1) -> int:
    """Add two numbers.

    The second line of the docstring is kept too.
    """
    return (a + b) * scale


@nk.node(name="fetch-user", effect=nk.Effect.READ, retry=nk.Retry(attempts=2))
async def fetch(user_id: str) -> dict[str, str]:
    """Fetch a user."""
    await asyncio.sleep(0)
    return {"id": user_id}


def test_sync_node_is_called_like_the_function() -> None:
    assert add(1) == 3
    assert add(1, 3, scale=2) == 8
    assert add(a=1, b=1) == 2
    assert not inspect.iscoroutinefunction(add)


async def test_async_node_stays_a_coroutine_function() -> None:
    assert inspect.iscoroutinefunction(fetch)
    pending = fetch("u1")
    assert inspect.iscoroutine(pending)
    assert await pending == {"id": "u1"}


def test_signature_docstring_and_names_are_kept() -> None:
    assert inspect.signature(add) == inspect.signature(add.fn)
    assert str(inspect.signature(add)) == "(a: 'int', b: 'int' = 2, *, scale: 'int' = 1) -> 'int'"
    assert add.__doc__ is not None
    assert add.__doc__.startswith("Add two numbers.")
    assert add.__name__ == "add"
    assert add.__qualname__ == "add"
    assert add.__module__ == __name__
    assert add.__wrapped__ is add.fn  # type: ignore[attr-defined]


def test_async_signature_docstring_and_names_are_kept() -> None:
    assert inspect.signature(fetch) == inspect.signature(fetch.fn)
    assert fetch.__doc__ == "Fetch a user."
    assert fetch.__name__ == "fetch"
    assert fetch.__wrapped__ is fetch.fn  # type: ignore[attr-defined]


def test_fn_name_and_effect_attributes() -> None:
    assert add.name == "add"
    assert add.effect is nk.Effect.WRITE
    assert add.fn(1, 1) == 2
    assert fetch.name == "fetch-user"
    assert fetch.effect is nk.Effect.READ
    assert inspect.iscoroutinefunction(fetch.fn)


def test_default_name_is_the_qualified_name() -> None:
    @nk.node
    def local() -> None:
        pass

    assert local.name == "test_default_name_is_the_qualified_name.<locals>.local"


def test_options_returns_a_reconfigured_copy() -> None:
    flaky = Flaky([ConnectionRefusedError], times=10)
    call = nk.node(retry=nk.Retry(attempts=3), name="call")(flaky)
    once = call.options(retry=None)
    assert once is not call
    assert once.name == "call"
    with pytest.raises(ConnectionRefusedError):
        once()
    assert flaky.calls == 1
    with instant(), pytest.raises(ConnectionRefusedError):
        call()
    assert flaky.calls == 4, "the original node keeps its retry policy"


async def test_options_returns_a_reconfigured_copy_async() -> None:
    renamed = fetch.options(name="other", effect=nk.Effect.NONE)
    assert inspect.iscoroutinefunction(renamed)
    assert (renamed.name, renamed.effect) == ("other", nk.Effect.NONE)
    assert (fetch.name, fetch.effect) == ("fetch-user", nk.Effect.READ)
    assert await renamed("u2") == {"id": "u2"}


def test_options_validates_like_the_decorator() -> None:
    with pytest.raises(nk.ConfigError) as info:
        add.options(retry=nk.Retry(attempts=0))
    assert info.value.option == "retry.attempts"
    with pytest.raises(nk.ConfigError) as info:
        add.options(retires=3)
    assert info.value.option == "retires"


def test_node_on_a_method_binds_self() -> None:
    class Service:
        def __init__(self) -> None:
            self.base = 10

        @nk.node
        def total(self, x: int) -> int:
            return self.base + x

        @nk.node
        async def atotal(self, x: int) -> int:
            return self.base + x

    service = Service()
    assert service.total(5) == 15
    assert asyncio.run(service.atotal(1)) == 11


def test_exceptions_pass_through_unchanged_without_retry() -> None:
    error = KeyError("k")

    @nk.node
    def broken() -> None:
        raise error

    with pytest.raises(KeyError) as info:
        broken()
    assert info.value is error
    assert not getattr(info.value, "__notes__", None)


def test_callable_instances_can_be_nodes() -> None:
    call = nk.node(Flaky(result=7))
    assert call() == 7
    assert call.name == "Flaky"


async def test_async_callable_instances_stay_async() -> None:
    class Pinger:
        async def __call__(self) -> str:
            return "pong"

    call = nk.node(Pinger())
    assert inspect.iscoroutinefunction(call)
    assert await call() == "pong"


# ---------------------------------------------------------------------------- refused


def generator() -> Iterator[int]:
    yield 1


async def agenerator() -> AsyncIterator[int]:
    yield 1


@pytest.mark.parametrize("target", [generator, agenerator], ids=["generator", "async-generator"])
def test_generator_functions_are_refused(target: Any) -> None:
    with pytest.raises(nk.ConfigError, match="generator functions cannot be nodes") as info:
        nk.node(target)
    assert info.value.option == "fn"
    assert target.__name__ in str(info.value)


def test_classes_are_refused() -> None:
    class Thing:
        pass

    with pytest.raises(nk.ConfigError, match="not classes") as info:
        nk.node(Thing)
    assert "Thing" in str(info.value)
    with pytest.raises(nk.ConfigError, match="not classes"):
        nk.node(retry=True)(Thing)


@pytest.mark.parametrize("value", [42, "name", None], ids=["int", "str", "none"])
def test_non_callables_are_refused(value: Any) -> None:
    with pytest.raises(nk.ConfigError, match="decorates functions"):
        nk.node(retry=True)(value)


def test_staticmethod_objects_are_refused_with_a_hint() -> None:
    with pytest.raises(nk.ConfigError, match="below @staticmethod"):
        nk.node(staticmethod(add.fn))
