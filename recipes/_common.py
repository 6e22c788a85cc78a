"""What every recipe shares: its command-line flags, the API it talks to, its database."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodekit.testing import FaultPlan

from ._demo_api import DemoAPI

__all__ = ["api_base", "connect", "data_dir", "engine_of", "parser"]

DATA_DIR = Path("demo-data")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every recipe takes; recipes add their own."""
    cli = argparse.ArgumentParser(prog=f"python -m recipes.{prog}", description=description)
    cli.add_argument(
        "--api-url",
        help="base URL of a real API; default: start nodekit's local API on a loopback port",
    )
    cli.add_argument(
        "--db-url",
        help="sqlite:///path, postgresql://... or a SQLAlchemy URL (postgresql+psycopg://..., "
        "sqlite+pysqlite:///path); default: sqlite in --data-dir",
    )
    cli.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="where files go (default: %(default)s)"
    )
    cli.add_argument(
        "--faults",
        type=float,
        default=0.0,
        metavar="RATE",
        help="local API only: fraction of requests that fail (503, 429, drops, slow answers)",
    )
    cli.add_argument("--seed", type=int, default=1, help="seed of the local API's faults and data")
    return cli


def data_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def api_base(
    url: str | None,
    *,
    faults: float = 0.0,
    seed: int = 1,
    script: Any = (),
    **options: Any,
) -> Iterator[tuple[str, DemoAPI | None]]:
    """The API's base URL: `url` as given, or a local `DemoAPI` started for the block.

    `faults` is the local API's random fault rate; `script` (see `FaultPlan.script`) adds
    faults at fixed places.
    """
    if url:
        yield url.rstrip("/"), None
        return
    plan = (
        FaultPlan(seed=seed, rate=faults, retry_after=0.05, slow=1.0, script=script)
        if faults or script
        else None
    )
    with DemoAPI(faults=plan, seed=seed, **options) as api:
        yield api.url, api


def connect(db_url: str | None, default: Path) -> Any:
    """Open the recipe's database: sqlite3 for ``sqlite:///path`` (default `default`),
    psycopg for ``postgresql://``, a SQLAlchemy engine (`.engine`) for a ``dialect+driver://``
    URL. The caller closes it."""
    if db_url is None or db_url.startswith("sqlite:///"):
        path = default if db_url is None else Path(db_url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn
    if db_url.startswith(("postgresql://", "postgres://")):
        import psycopg

        return psycopg.connect(db_url, autocommit=True)
    if "+" in db_url.partition("://")[0]:  # a SQLAlchemy URL: dialect+driver://…
        import sqlalchemy as sa

        return _Engine(sa.create_engine(db_url))
    raise SystemExit(
        f"unsupported --db-url {db_url!r}: use sqlite:///path, postgresql://... or a "
        "SQLAlchemy URL (postgresql+psycopg://..., sqlite+pysqlite:///path)"
    )


class _Engine:
    """A SQLAlchemy engine that `contextlib.closing` can close (it disposes of its pool)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def close(self) -> None:
        self.engine.dispose()


def engine_of(db: Any) -> Any:
    """What a recipe hands its nodes: the SQLAlchemy engine inside `connect`'s wrapper (a pool
    that lends a connection per attempt), or the connection itself."""
    return db.engine if isinstance(db, _Engine) else db
