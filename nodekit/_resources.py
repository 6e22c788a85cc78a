"""Resources and their injection: `resource`, `use`, `override`, `managed`.

A keyword-only parameter whose default is `resource()` is filled from the active resources at
call time. `use(name=value)` provides values for a block; `override(name=fake)` replaces them,
winning over any `use` (tests); an argument passed explicitly always wins. A plain value is
provided as it is and never closed; a `managed(factory)` value is a factory returning a
context manager (sync or async) that is entered on first use and closed when the block exits,
errors included.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from ._errors import ConfigError

__all__ = [
    "Resource",
    "ainject",
    "find_slot",
    "has_resource",
    "inject",
    "lookup_slot",
    "managed",
    "override",
    "resource",
    "use",
]


class Resource:
    """The default value that marks a parameter as injected (see `resource()`)."""

    __slots__ = ("name",)

    def __init__(self, name: str | None) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"nk.resource({self.name!r})" if self.name else "nk.resource()"


def resource(name: str | None = None) -> Any:
    """Mark a keyword-only parameter as a resource, filled from `use()` / `override()`.

    The resource's name is the parameter's name unless `name` is given.
    """
    return Resource(name)


class _Managed:
    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory


def managed(factory: Callable[[], Any]) -> Any:
    """Mark a factory whose context manager `use()` enters on first use and closes on exit."""
    if not callable(factory):
        raise ConfigError(f"nk.managed() takes a factory (a callable), got {factory!r}")
    return _Managed(factory)


class _Slot:
    """One provided resource: a plain value, or a managed factory entered lazily."""

    __slots__ = ("async_ok", "entered", "exit", "factory", "lock", "name", "value")

    def __init__(self, name: str, value: Any, async_ok: bool) -> None:
        self.name = name
        self.async_ok = async_ok
        self.lock = threading.Lock()
        self.exit: Callable[..., Any] | None = None
        if isinstance(value, _Managed):
            self.factory: Callable[[], Any] | None = value.factory
            self.entered = False
            self.value: Any = None
        else:
            self.factory = None
            self.entered = True
            self.value = value

    def get(self) -> Any:
        if self.entered:
            return self.value
        with self.lock:
            if self.entered:
                return self.value
            assert self.factory is not None
            manager = self.factory()
            if hasattr(manager, "__enter__"):
                self.value = manager.__enter__()
                self.exit = manager.__exit__
            elif hasattr(manager, "__aenter__"):
                raise ConfigError(
                    f"resource {self.name!r} is an async context manager: use it from an "
                    "async node inside `async with nk.use(...)`",
                    option=self.name,
                )
            else:
                raise self._not_a_manager(manager)
            self.entered = True
            return self.value

    async def aget(self) -> Any:
        if self.entered:
            return self.value
        assert self.factory is not None
        manager = self.factory()
        if hasattr(manager, "__aenter__") and self.async_ok:
            value = await manager.__aenter__()
            if self.entered:  # another task entered it meanwhile: keep the first
                await manager.__aexit__(None, None, None)
                return self.value
            self.value, self.exit, self.entered = value, manager.__aexit__, True
            return value
        if hasattr(manager, "__enter__"):
            with self.lock:
                if not self.entered:
                    self.value = manager.__enter__()
                    self.exit = manager.__exit__
                    self.entered = True
                    return self.value
            manager.__exit__(None, None, None)
            return self.value
        if hasattr(manager, "__aenter__"):
            raise ConfigError(
                f"resource {self.name!r} is an async context manager: provide it with "
                "`async with nk.use(...)`",
                option=self.name,
            )
        raise self._not_a_manager(manager)

    def _not_a_manager(self, manager: Any) -> ConfigError:
        return ConfigError(
            f"resource {self.name!r}: nk.managed() factory must return a context manager, "
            f"got {manager!r}",
            option=self.name,
        )


_EMPTY: Mapping[str, _Slot] = {}
_RESOURCES: contextvars.ContextVar[Mapping[str, _Slot]] = contextvars.ContextVar(
    "nodekit_resources", default=_EMPTY
)
_OVERRIDES: contextvars.ContextVar[Mapping[str, _Slot]] = contextvars.ContextVar(
    "nodekit_overrides", default=_EMPTY
)


class _Provide:
    """The block returned by `use()` / `override()`: usable with ``with`` and ``async with``."""

    def __init__(self, var: contextvars.ContextVar[Mapping[str, _Slot]], values: dict[str, Any]):
        for name in values:
            if not name.isidentifier():
                raise ConfigError(f"resource name {name!r} is not an identifier", option=name)
        self._var = var
        self._values = values
        self._slots: list[_Slot] = []
        self._token: contextvars.Token[Mapping[str, _Slot]] | None = None

    def _enter(self, async_ok: bool) -> _Provide:
        self._slots = [_Slot(name, value, async_ok) for name, value in self._values.items()]
        self._token = self._var.set({**self._var.get(), **{s.name: s for s in self._slots}})
        return self

    def __enter__(self) -> _Provide:
        return self._enter(async_ok=False)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._token is not None
        self._var.reset(self._token)
        error: BaseException | None = None
        for slot in reversed(self._slots):
            if slot.exit is not None:
                try:
                    slot.exit(et, ev, tb)
                except BaseException as exc:
                    error = error or exc
                slot.exit = None
        if error is not None:
            raise error

    async def __aenter__(self) -> _Provide:
        return self._enter(async_ok=True)

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._token is not None
        self._var.reset(self._token)
        error: BaseException | None = None
        for slot in reversed(self._slots):
            if slot.exit is not None:
                try:
                    result = slot.exit(et, ev, tb)
                    if asyncio.iscoroutine(result):
                        await result
                except BaseException as exc:
                    error = error or exc
                slot.exit = None
        if error is not None:
            raise error

    def __getitem__(self, name: str) -> Any:
        """The value of a provided resource (entering a managed one if needed)."""
        for slot in self._slots:
            if slot.name == name:
                return slot.get()
        raise KeyError(name)


def use(**resources: Any) -> _Provide:
    """Provide resources to the nodes called inside the block (``with`` or ``async with``)."""
    return _Provide(_RESOURCES, resources)


def override(**resources: Any) -> _Provide:
    """Replace resources inside the block, winning over any `use()` (for tests)."""
    return _Provide(_OVERRIDES, resources)


def _missing(node: str, name: str) -> ConfigError:
    return ConfigError(
        f"node {node!r}: resource {name!r} is not provided; wrap the call in "
        f"`with nk.use({name}=...)` or pass {name}= explicitly",
        node=node,
        option=name,
    )


def find_slot(name: str) -> _Slot | None:
    """The active resource `name` (an override wins over a `use`), or None."""
    return _OVERRIDES.get().get(name) or _RESOURCES.get().get(name)


def lookup_slot(node: str, name: str) -> _Slot:
    slot = find_slot(name)
    if slot is None:
        raise _missing(node, name)
    return slot


def has_resource(name: str) -> bool:
    return name in _OVERRIDES.get() or name in _RESOURCES.get()


def inject(node: str, params: tuple[tuple[str, str], ...], kwargs: dict[str, Any]) -> None:
    """Fill the resource parameters the caller did not pass (sync)."""
    for param, name in params:
        if param not in kwargs:
            kwargs[param] = lookup_slot(node, name).get()


async def ainject(node: str, params: tuple[tuple[str, str], ...], kwargs: dict[str, Any]) -> None:
    """Fill the resource parameters the caller did not pass (async: may enter async managers)."""
    for param, name in params:
        if param not in kwargs:
            kwargs[param] = await lookup_slot(node, name).aget()
