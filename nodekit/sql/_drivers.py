"""Which driver a connection, session, engine or pool belongs to, told by its class alone.

nodekit imports no database library to find out: a class is recognised by its top-level
module and name along its MRO (so subclasses count), and the answer is cached per class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError
from . import _asyncpg, _dbapi, _sqlalchemy

__all__ = ["Driver", "driver_of"]


@dataclass(frozen=True, slots=True)
class Driver:
    """How to open a transaction on one kind of object; `pooled`: a connection per transaction."""

    label: str
    is_async: bool
    pooled: bool
    open: Callable[..., Any]  # (obj, effects) -> a (async) context manager yielding a Tx


_DRIVERS: dict[tuple[str, str], Driver] = {
    ("sqlite3", "Connection"): Driver("sqlite3.Connection", False, False, _dbapi.sqlite3_tx),
    ("psycopg", "Connection"): Driver("psycopg.Connection", False, False, _dbapi.psycopg_tx),
    ("psycopg", "AsyncConnection"): Driver(
        "psycopg.AsyncConnection", True, False, _dbapi.apsycopg_tx
    ),
    ("psycopg_pool", "ConnectionPool"): Driver(
        "psycopg_pool.ConnectionPool", False, True, _dbapi.psycopg_pool_tx
    ),
    ("psycopg_pool", "AsyncConnectionPool"): Driver(
        "psycopg_pool.AsyncConnectionPool", True, True, _dbapi.apsycopg_pool_tx
    ),
    ("sqlalchemy", "Session"): Driver("SQLAlchemy Session", False, False, _sqlalchemy.session_tx),
    ("sqlalchemy", "Connection"): Driver(
        "SQLAlchemy Connection", False, False, _sqlalchemy.connection_tx
    ),
    ("sqlalchemy", "Engine"): Driver("SQLAlchemy Engine", False, True, _sqlalchemy.engine_tx),
    ("sqlalchemy", "sessionmaker"): Driver(
        "SQLAlchemy sessionmaker", False, True, _sqlalchemy.session_factory_tx
    ),
    ("sqlalchemy", "AsyncSession"): Driver(
        "SQLAlchemy AsyncSession", True, False, _sqlalchemy.async_session_tx
    ),
    ("sqlalchemy", "AsyncConnection"): Driver(
        "SQLAlchemy AsyncConnection", True, False, _sqlalchemy.async_connection_tx
    ),
    ("sqlalchemy", "AsyncEngine"): Driver(
        "SQLAlchemy AsyncEngine", True, True, _sqlalchemy.async_engine_tx
    ),
    ("sqlalchemy", "async_sessionmaker"): Driver(
        "SQLAlchemy async_sessionmaker", True, True, _sqlalchemy.async_session_factory_tx
    ),
    ("asyncpg", "Connection"): Driver("asyncpg.Connection", True, False, _asyncpg.asyncpg_tx),
    ("asyncpg", "PoolConnectionProxy"): Driver(
        "asyncpg pool connection", True, False, _asyncpg.asyncpg_tx
    ),
    ("asyncpg", "Pool"): Driver("asyncpg.Pool", True, True, _asyncpg.asyncpg_pool_tx),
}

_BY_CLASS: dict[type, Driver] = {}

SUPPORTED = (
    "sqlite3 and psycopg 3 connections, psycopg_pool pools, SQLAlchemy sessions, connections, "
    "engines and session factories, asyncpg connections and pools"
)


def driver_of(obj: Any) -> Driver:
    """The driver for `obj`; a `ConfigError` listing what is supported when there is none."""
    cls = type(obj)
    found = _BY_CLASS.get(cls)
    if found is not None:
        return found
    for base in cls.__mro__:
        found = _DRIVERS.get((base.__module__.partition(".")[0], base.__name__))
        if found is not None:
            _BY_CLASS[cls] = found
            return found
    raise ConfigError(
        f"nodekit.sql supports {SUPPORTED}; got {cls.__qualname__}", option="connection"
    )
