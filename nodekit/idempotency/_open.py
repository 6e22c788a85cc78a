"""`open_store(url)` and the process default store."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

from .._errors import ConfigError
from .._redact import redact
from .._runtime import RUNTIME

__all__ = ["default_store", "open_store", "set_default_store"]


def set_default_store(store: Any) -> None:
    """Set the store used by keyed nodes that name none (a store or a URL)."""
    if isinstance(store, str):
        store = open_store(store)
    with RUNTIME.lock:
        RUNTIME.default_store = store


def default_store() -> Any:
    """The process default store: a `MemoryStore` unless `set_default_store` chose another.

    Kept in `RUNTIME.default_store`, so that `RUNTIME.reset()` forgets it.
    """
    store = RUNTIME.default_store
    if store is None:
        from .memory import MemoryStore

        with RUNTIME.lock:
            store = RUNTIME.default_store
            if store is None:
                store = RUNTIME.default_store = MemoryStore()
    return store


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"this store needs the {module!r} package: pip install 'nodekit[{extra}]'",
            option="store",
        )


def open_store(url: str, **options: Any) -> Any:
    """Open a store from a URL: ``memory://``, ``sqlite:///path``, ``redis://…``,
    ``postgresql://…``. Options are passed to the store's constructor."""
    if not isinstance(url, str):
        raise ConfigError(f"open_store takes a URL string, got {url!r}", option="url")
    scheme = urlparse(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(**options)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
        if not url.startswith("sqlite:///"):
            raise ConfigError(
                f"sqlite URL must look like sqlite:///path, got {url!r}", option="url"
            )
        path = unquote(url[len("sqlite:///") :])
        if not path:
            raise ConfigError(f"sqlite URL needs a path: {url!r}", option="url")
        return SQLiteStore(path, **options)
    if scheme in ("redis", "rediss", "unix"):
        _need("redis", "redis")
        from .redis import RedisStore

        return RedisStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        _need("psycopg", "postgres")
        from .postgres import PostgresStore

        return PostgresStore(url, **options)
    raise ConfigError(
        f"unknown store URL scheme {scheme!r} in {redact(url)!r}: use memory://, sqlite:///path, "
        "redis://host:port/db or postgresql://...",
        option="url",
    )
