"""Store fixtures for the idempotency tests: every built-in store, on a clock the test moves."""

from __future__ import annotations

import dataclasses
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodekit.idempotency import MemoryStore, RecordKey

from . import _workers

STORE_KINDS = ["memory", "sqlite", "redis", "postgres"]


class FakeClock:
    """A store clock that moves only when the test moves it (seconds since the epoch)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Backend:
    """One kind of store: makes stores on one shared location and reads their rows raw."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.stores: list[Any] = []
        self.sqlite_path = tmp_path / f"idem-{uuid.uuid4().hex[:8]}.db"
        self.url = ""
        self.location = ""
        if kind == "redis":
            self.url = request.getfixturevalue("redis_url")
            self.location = request.getfixturevalue("redis_prefix")
        elif kind == "postgres":
            self.url = request.getfixturevalue("postgres_url")
            self.location = request.getfixturevalue("pg_schema")

    def make(self, clock: Callable[[], float] | None = None) -> Any:
        """A new store (closed by the fixture) over this backend's records."""
        if self.kind == "memory":
            if self.stores:  # one process, one dict: share it like the durable stores do
                return self.stores[0]
            store: Any = MemoryStore(clock=clock)
        elif self.kind == "sqlite":
            from nodekit.idempotency.sqlite import SQLiteStore

            store = SQLiteStore(self.sqlite_path, clock=clock)
        elif self.kind == "redis":
            from nodekit.idempotency.redis import RedisStore

            store = RedisStore(self.url, prefix=self.location, clock=clock)
        else:
            from nodekit.idempotency.postgres import PostgresStore

            store = PostgresStore(self.url, schema=self.location, clock=clock)
        self.stores.append(store)
        return store

    def rows(self) -> list[dict[str, Any]]:
        """Every stored record as its raw fields (Redis: the key name too), read around the store."""
        if self.kind == "memory":
            return [
                dataclasses.asdict(record)
                for store in self.stores
                for record in store._records.values()
            ]
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.sqlite_path)
            try:
                conn.row_factory = sqlite3.Row
                return [dict(row) for row in conn.execute("SELECT * FROM nodekit_idempotency")]
            finally:
                conn.close()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url, decode_responses=True)
            try:
                return [
                    {"redis_key": name, **{str(k): v for k, v in client.hgetall(name).items()}}
                    for name in client.scan_iter(match=self.location + "*")
                    if name != self.location + "meta"
                ]
            finally:
                client.close()
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, row_factory=dict_row) as pg:
            return list(pg.execute(f'SELECT * FROM "{self.location}".nodekit_idempotency'))

    def corrupt(self, store: Any, **fields: Any) -> None:
        """Overwrite fields of the one stored record with raw values, around the store.

        A value of None deletes the field (Redis only: the other stores' columns are NOT NULL).
        Values are given as text and written as the backend can hold them: PostgreSQL's typed
        columns take a cast (``'NaN'::float8``); a value a column cannot hold skips the test.
        """
        (row,) = self.rows()
        if self.kind == "memory":
            record = store.get(RecordKey(row["namespace"], row["scope"], row["key_digest"]))
            store._put(dataclasses.replace(record, **{k: _typed(k, v) for k, v in fields.items()}))
        elif self.kind == "sqlite":
            conn = sqlite3.connect(self.sqlite_path)
            try:
                sets = ", ".join(f"{name} = ?" for name in fields)
                conn.execute(f"UPDATE nodekit_idempotency SET {sets}", tuple(fields.values()))
                conn.commit()
            finally:
                conn.close()
        elif self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                for name, value in fields.items():
                    if value is None:
                        client.hdel(row["redis_key"], name)
                    else:
                        client.hset(row["redis_key"], name, value)
            finally:
                client.close()
        else:
            import psycopg

            types = {"epoch": "bigint", "format_version": "integer"}
            casts = {k: types.get(k, "float8" if k.endswith("_at") else "text") for k in fields}
            sets = ", ".join(f"{name} = %s::{casts[name]}" for name in fields)
            try:
                with psycopg.connect(self.url, autocommit=True) as pg:
                    pg.execute(
                        f'UPDATE "{self.location}".nodekit_idempotency SET {sets}',
                        tuple(fields.values()),
                    )
            except psycopg.errors.DataError:
                pytest.skip(f"a PostgreSQL column cannot hold {fields}")


def _typed(name: str, value: Any) -> Any:
    """A raw text value as the in-memory record holds that field (a float for times)."""
    if name.endswith("_at"):
        try:
            return float(value)
        except ValueError:
            return value
    if name in ("epoch", "format_version"):
        return int(value) if str(value).lstrip("-").isdigit() else value
    return value


@pytest.fixture
def fake_clock() -> FakeClock:
    """A store clock at a fixed instant; `.advance(seconds)` moves it."""
    return FakeClock()


@pytest.fixture(params=STORE_KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store kind in turn (Redis and PostgreSQL skip when down), for sync tests."""
    made = Backend(request.param, request, tmp_path)
    try:
        yield made
    finally:
        for store in made.stores:
            store.close()


@pytest.fixture(params=STORE_KINDS)
async def abackend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each store kind in turn, for async tests: stores close on the test's own loop."""
    made = Backend(request.param, request, tmp_path)
    try:
        yield made
    finally:
        for store in made.stores:
            await store.aclose()


# ---------------------------------------------------------------------------- processes


@pytest.fixture(params=_workers.DURABLE)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> _workers.StoreSpec:
    """A store every process opens for itself: a SQLite file, a Redis prefix, a PG schema."""
    return _workers.store_spec(request, request.param, tmp_path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The files worker processes write: what they did (ledger), returned, and signal."""
    return {name: str(tmp_path / f"{name}.txt") for name in ("ledger", "results", "signal")}
