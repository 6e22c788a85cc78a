"""Resources and their injection: `resource`, `use`, `override`, `managed`.

A keyword-only parameter whose default is `resource()` is filled from the active resources at
call time. `use(name=value)` provides values for a block; `override(name=fake)` replaces them,
winning over any `use` (tests); an argument passed explicitly always wins. A plain value is
provided as it is and never closed; a `managed(factory)` value is a factory called on first use
whose result the block owns and closes when it exits, errors included (see `managed`).

A coroutine is never handed to a node as it is: a factory's awaitable result (and a coroutine
given to an ``async with`` block, awaited at entry) is awaited, and what it opens is owned as
`open_awaited` says; a sync block cannot await, so it refuses them with a `ConfigError`.
Other awaitable values given to `use` (an open asyncpg pool, an aiosqlite connection: objects
that are awaitable to initialise) are plain values, never awaited nor closed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import CoroutineType, TracebackType
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
    "open_awaited",
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
    """Mark a factory that `use()` calls on first use; the block closes what it returns.

    The factory may return a context manager (entered, then exited with the block), an async
    context manager, or an awaitable such as ``asyncpg.connect(dsn)`` (awaited; what it opens
    is closed as `open_awaited` says). The async kinds need ``async with nk.use(...)``.
    """
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
                    f"async node inside `async with nk.use(...)`{_for_sync_runs(self.name)}",
                    option=self.name,
                )
            elif inspect.isawaitable(manager):
                raise _cannot_await(self.name, manager, "sync code cannot await it")
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
        if inspect.isawaitable(manager):
            if not self.async_ok:
                raise _cannot_await(self.name, manager, "a sync `with nk.use()` cannot close it")
            value, exit = await open_awaited(manager)
            if self.entered:  # another task entered it meanwhile: keep the first
                if exit is not None:
                    await _finish(exit(None, None, None))
                return self.value
            self.value, self.exit, self.entered = value, exit, True
            return value
        if hasattr(manager, "__aenter__"):
            raise ConfigError(
                f"resource {self.name!r} is an async context manager: provide it with "
                "`async with nk.use(...)`",
                option=self.name,
            )
        raise self._not_a_manager(manager)

    def _not_a_manager(self, manager: Any) -> ConfigError:
        return ConfigError(
            f"resource {self.name!r}: nk.managed() factory must return a context manager "
            f"or an awaitable, got {manager!r}",
            option=self.name,
        )


async def open_awaited(awaitable: Awaitable[Any]) -> tuple[Any, Callable[..., Any] | None]:
    """Await a factory's awaitable; the value it opens and its exit (None: nothing to close).

    What the awaitable resolves to is entered if it is an async context manager (a client
    made by a coroutine); otherwise it is the value (a connection, ``asyncpg.connect``) and
    the exit calls its ``aclose()``, else its ``close()``, awaiting the result. A value with
    neither is not closed. The exit takes ``(exc_type, exc, tb)`` and may return an
    awaitable, like ``__aexit__``.
    """
    result = await awaitable
    if hasattr(result, "__aenter__"):
        return await result.__aenter__(), result.__aexit__
    for method in ("aclose", "close"):
        close = getattr(result, method, None)
        if callable(close):
            return result, functools.partial(_close, close)
    return result, None


def _close(close: Callable[[], Any], *exc_info: Any) -> Any:
    return close()


async def _finish(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


def _discard(value: Any) -> None:
    """Close a coroutine that will never be awaited (no "never awaited" warning)."""
    if inspect.iscoroutine(value):
        value.close()


def _cannot_await(name: str, awaitable: Any, why: str) -> ConfigError:
    _discard(awaitable)
    return ConfigError(
        f"resource {name!r} is {_kind(awaitable)} and {why}: "
        f"provide it with `async with nk.use({name}=...)` in async code (flow.arun(), async "
        f"nodes){_for_sync_runs(name)}",
        option=name,
    )


def _kind(awaitable: Any) -> str:
    if type(awaitable) is CoroutineType:
        return f"a coroutine ({awaitable.__qualname__}())"
    return f"an awaitable ({type(awaitable).__qualname__})"


def _for_sync_runs(name: str) -> str:
    return (
        f"; for a sync flow.run(), make it the flow's own resource, "
        f"nk.Flow(..., resources={{{name!r}: factory}}), opened and closed on the event loop "
        "that runs the flow's async nodes"
    )


_EMPTY: Mapping[str, _Slot] = {}
_NONE: Mapping[str, tuple[Any, Any]] = {}
_RESOURCES: contextvars.ContextVar[Mapping[str, _Slot]] = contextvars.ContextVar(
    "nodekit_resources", default=_EMPTY
)
_OVERRIDES: contextvars.ContextVar[Mapping[str, _Slot]] = contextvars.ContextVar(
    "nodekit_overrides", default=_EMPTY
)


class _Provide:
    """The block returned by `use()` / `override()`: usable with ``with`` and ``async with``."""

    def __init__(self, var: contextvars.ContextVar[Mapping[str, _Slot]], values: dict[str, Any]):
        awaitables: list[str] | None = None  # coroutines: awaited by `async with`
        for name, value in values.items():
            if not name.isidentifier():
                raise ConfigError(f"resource name {name!r} is not an identifier", option=name)
            if type(value) is CoroutineType:
                awaitables = [*(awaitables or ()), name]
        self._var = var
        self._values = values
        self._awaitables = awaitables
        self._slots: list[_Slot] = []
        self._token: contextvars.Token[Mapping[str, _Slot]] | None = None

    def _enter(self, async_ok: bool, opened: Mapping[str, tuple[Any, Any]] = _NONE) -> _Provide:
        self._slots = [_Slot(name, value, async_ok) for name, value in self._values.items()]
        if opened:
            for slot in self._slots:
                if slot.name in opened:
                    slot.value, slot.exit = opened[slot.name]
        self._token = self._var.set({**self._var.get(), **{s.name: s for s in self._slots}})
        return self

    def __enter__(self) -> _Provide:
        if self._awaitables:
            for value in self._values.values():
                _discard(value)
            name = self._awaitables[0]
            raise _cannot_await(name, self._values[name], "a sync `with nk.use()` cannot await it")
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
        if not self._awaitables:
            return self._enter(async_ok=True)
        # awaited now, in order, so that a failure leaves nothing open and nothing un-awaited
        opened: dict[str, tuple[Any, Any]] = {}
        try:
            for name in self._awaitables:
                opened[name] = await open_awaited(self._values[name])
        except BaseException as exc:
            for name in self._awaitables:
                if name not in opened:
                    _discard(self._values[name])
            for _, exit in reversed(opened.values()):
                if exit is not None:
                    with contextlib.suppress(Exception):
                        await _finish(exit(type(exc), exc, exc.__traceback__))
            raise
        return self._enter(async_ok=True, opened=opened)

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._token is not None
        self._var.reset(self._token)
        error: BaseException | None = None
        for slot in reversed(self._slots):
            if slot.exit is not None:
                try:
                    await _finish(slot.exit(et, ev, tb))
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
    """Provide resources to the nodes called inside the block (``with`` or ``async with``).

    A plain value is provided as it is and never closed; `managed` values are opened on first
    use and closed at exit. A coroutine (``asyncpg.connect(dsn)``) is awaited when an
    ``async with`` block is entered and then owned like a managed value's result
    (`open_awaited`); a sync ``with`` refuses it with a `ConfigError`.
    """
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
