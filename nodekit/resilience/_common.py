"""What the primitives share: option checks, where their state lives, and what "refused" means.

Every primitive validates its options when it is constructed (`ConfigError` naming the
primitive and the option) and gets its state from `state_for`: private to the object without
a store, shared by name inside a `MemoryStore`, or shared across processes through a SQLite,
Redis or PostgreSQL store (`_shared.py` and one module per store).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from .._errors import BulkheadFull, CircuitOpen, ConfigError, NodeTimeout, RateLimited
from .._policies import MAX_SECONDS

__all__ = [
    "cell_for",
    "check_count",
    "check_name",
    "check_seconds",
    "is_refusal",
    "state_for",
]

T = TypeVar("T")

# MemoryStore -> {(kind, name): state}; weak, so that a dropped store drops its states
_SHARED: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{kind} name must be a non-empty string, got {name!r}", option="name")
    return name


def check_count(kind: str, name: str, option: str, value: object, *, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(
            f"{kind} {name!r}: {option} must be an int >= {least}, got {value!r}",
            option=option,
        )
    return value


def check_seconds(kind: str, name: str, option: str, value: object) -> float:
    """A positive, finite time in seconds (float, int or `timedelta`)."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        result = float("nan")
    if not 0.0 < result <= MAX_SECONDS:
        raise ConfigError(
            f"{kind} {name!r}: {option} must be a positive time in seconds (or a timedelta) "
            f"of at most {MAX_SECONDS:.0f}, got {value!r}",
            option=option,
        )
    return result


def _store_kind(store: object) -> str | None:
    """``"memory"``, ``"sqlite"``, ``"redis"`` or ``"postgres"``; None for anything else.

    The store modules import their drivers lazily, so importing them here imports neither
    redis nor psycopg.
    """
    from ..idempotency import MemoryStore
    from ..idempotency.postgres import PostgresStore
    from ..idempotency.redis import RedisStore
    from ..idempotency.sqlite import SQLiteStore

    for kind, cls in (
        ("memory", MemoryStore),
        ("sqlite", SQLiteStore),
        ("redis", RedisStore),
        ("postgres", PostgresStore),
    ):
        if isinstance(store, cls):
            return kind
    return None


def state_for(
    kind: str,
    name: str,
    store: object,
    settings: object,
    make: Callable[[], T],
    shared: Callable[[str, Any], T] | None = None,
) -> T:
    """The primitive's state: its own without a store, else the one shared under its name.

    In a `MemoryStore`, several primitives with the same name share one state object (and
    must agree on their settings). In a SQLite, Redis or PostgreSQL store, `shared(kind of
    store, store)` makes a backend on the store's row or key of that name: a new primitive
    joins the state found there, never resets it (the settings are each caller's own).
    """
    if store is None:
        return make()
    store_kind = _store_kind(store)
    if store_kind is None:
        raise ConfigError(
            f"{kind} {name!r}: store must be a nodekit store (MemoryStore, SQLiteStore, "
            f"RedisStore or PostgresStore), got {type(store).__name__}",
            option="store",
        )
    if store_kind != "memory":
        assert shared is not None
        return shared(store_kind, store)
    with _SHARED_LOCK:
        states = _SHARED.setdefault(store, {})
        state = states.get((kind, name))
        if state is None:
            state = states[(kind, name)] = make()
        elif state.settings != settings:
            raise ConfigError(
                f"{kind} {name!r} already exists in this store with other settings "
                f"({state.settings}); give this one another name or the same settings",
                option="store",
            )
    return state


def cell_for(store_kind: str, store: Any) -> Any:
    """The `_docs.Cell` of a SQL store (SQLite or PostgreSQL)."""
    if store_kind == "sqlite":
        from ._sqlite import SQLiteCell

        return SQLiteCell(store)
    from ._postgres import PostgresCell

    return PostgresCell(store)


def is_refusal(exc: BaseException) -> bool:
    """True for an error that says a layer refused the attempt before the function ran:
    it tells nothing about the guarded service (a breaker does not count it, a rate limit
    does not read a Retry-After from it)."""
    if isinstance(exc, CircuitOpen | RateLimited | BulkheadFull):
        return True
    # the deadline passed before the attempt could start (`_execution.deadline_error`)
    return isinstance(exc, NodeTimeout) and getattr(exc, "nodekit_kind", None) == "safe"
