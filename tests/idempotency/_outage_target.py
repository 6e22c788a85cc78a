"""A real Redis or PostgreSQL server behind `FaultProxy`s, for the outage tests.

Shared by `tests/idempotency/test_outages.py` (keyed calls) and
`tests/flow/test_journal_outages.py` (durable flows): stores that reach the server through a
proxy the test breaks, and reads straight from the server to see what it really holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import nodekit as nk
from nodekit.idempotency import IN_PROGRESS, Record, RecordKey
from nodekit.idempotency._renewer import RENEWER
from nodekit.idempotency._store import NotSent
from nodekit.testing import FaultProxy

REDIS_OPTIONS = "socket_timeout=0.25&socket_connect_timeout=0.25"
PG_OPTIONS = "connect_timeout=1&sslmode=disable"


def _through(url: str, address: str, query: str) -> str:
    """`url` with its host and port replaced by `address`, and `query` added to its query."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{address}" if user else address
    return parts._replace(
        netloc=netloc, query="&".join(filter(None, (parts.query, query)))
    ).geturl()


def _redis_sha(script: str) -> bytes:
    """What an EVALSHA of one of the store's Lua scripts carries on the wire."""
    return hashlib.sha1(script.encode("utf-8")).hexdigest().encode("ascii")


async def drain(bound: float) -> None:
    """Wait (at most `bound` s) until the renewer has no reconciliation left to do."""
    deadline = time.monotonic() + bound
    while RENEWER.reconciling() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class Target:
    """One server behind fault proxies: stores that go through a proxy, reads that don't."""

    def __init__(self, kind: str, url: str, location: str) -> None:
        self.kind = kind
        self.url = url  # straight to the server
        self.location = location  # a Redis key prefix or a PostgreSQL schema (this test's)
        self.proxies: list[FaultProxy] = []
        self.proxy = self.new_proxy()
        self.stores: list[Any] = []
        self._direct: Any = None

    def new_proxy(self) -> FaultProxy:
        """Another proxy in front of the same server (faults are proxy-wide)."""
        parts = urlsplit(self.url)
        proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 0).start()
        self.proxies.append(proxy)
        return proxy

    def store(self, proxy: FaultProxy | None = None) -> Any:
        """A new store on this test's records, reaching the server through `proxy`."""
        address = (proxy or self.proxy).address
        if self.kind == "redis":
            store: Any = nk.RedisStore(
                _through(self.url, address, REDIS_OPTIONS), prefix=self.location
            )
        else:
            store = nk.PostgresStore(_through(self.url, address, PG_OPTIONS), schema=self.location)
        self.stores.append(store)
        return store

    def direct(self) -> Any:
        """A store straight to the server (no proxy), to see what the server really holds."""
        if self._direct is None:
            if self.kind == "redis":
                self._direct = nk.RedisStore(self.url, prefix=self.location)
            else:
                self._direct = nk.PostgresStore(self.url, schema=self.location)
        return self._direct

    def record(self, key: RecordKey) -> Record | None:
        """The record as the server holds it."""
        return self.direct().get(key)  # type: ignore[no-any-return]

    def server_now(self) -> float:
        """The server's clock (the stores' time), in seconds since the epoch."""
        if self.kind == "redis":
            import redis

            with redis.Redis.from_url(self.url) as client:
                seconds, micros = client.time()
            return float(seconds) + float(micros) / 1_000_000
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as pg:
            row = pg.execute("SELECT extract(epoch from clock_timestamp())").fetchone()
        assert row is not None
        return float(row[0])

    @property
    def acquire_pattern(self) -> bytes:
        """Bytes only an acquire carries: its script's digest, its statement's CTE."""
        if self.kind == "redis":
            from nodekit.idempotency import _redis_scripts as redis_store

            return _redis_sha(redis_store.ACQUIRE)
        return b"prev AS MATERIALIZED"

    @property
    def complete_pattern(self) -> bytes:
        """Bytes only a completion carries."""
        if self.kind == "redis":
            from nodekit.idempotency import _redis_scripts as redis_store

            return _redis_sha(redis_store.COMPLETE)
        return b"SET state ="

    def client_errors(self) -> tuple[type[BaseException], ...]:
        """What a store fault surfaces as: the client library's errors, or the store's own
        `NotSent` when no connection could be had at all."""
        if self.kind == "redis":
            import redis

            return (redis.RedisError, NotSent)
        import psycopg

        return (psycopg.Error, ConnectionError, NotSent)  # a resend that could not connect

    def lose_next_reply(self, pattern: bytes, *, cut: bool, resend: bool = False) -> None:
        """The next command holding `pattern` runs on the server, but its reply is lost.

        With `cut` (PostgreSQL: no read timeout), every connection is reset as soon as the
        proxy has discarded the reply: the client sees its connection die mid-response.
        """
        proxy = self.proxy
        before = proxy.stats.dropped_down
        # A store sends a command once more on a fresh connection when the first one breaks
        # (the owner token makes that safe). Unless `resend`, that second send fails too:
        # Redis's reply is lost as well, PostgreSQL's proxy refuses new connections a while.
        lost = 2 if self.kind == "redis" and not resend else 1
        proxy.on_next(pattern, "drop_replies", count=lost)
        if not cut:
            return

        def cut_once_lost() -> None:
            deadline = time.monotonic() + 5.0
            while proxy.stats.dropped_down == before and time.monotonic() < deadline:
                time.sleep(0.001)
            if not resend:
                proxy.refuse(0.5)
            proxy.cut()

        threading.Thread(target=cut_once_lost, daemon=True).start()

    async def locked(self) -> dict[str, float]:
        """Key digest -> seconds left, for every IN_PROGRESS record whose lease still holds."""
        return await asyncio.to_thread(self._locked)

    def _locked(self) -> dict[str, float]:
        if self.kind == "redis":
            import redis

            now = self.server_now()
            found = {}
            with redis.Redis.from_url(self.url, decode_responses=True) as client:
                for name in client.scan_iter(match=self.location + "*", count=1000):
                    fields = client.hgetall(name)
                    if fields.get("state") == IN_PROGRESS:
                        left = float(fields["lease_expires_at"]) - now
                        if left > 0:
                            found[fields["key_digest"]] = left
            return found
        query = (
            "WITH clock AS (SELECT extract(epoch from clock_timestamp()) AS now) "
            "SELECT key_digest, lease_expires_at - clock.now "
            f'FROM "{self.location}".nodekit_idempotency, clock '
            "WHERE state = %s AND lease_expires_at > clock.now"
        )
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as pg:
            rows = pg.execute(query, (IN_PROGRESS,)).fetchall()
        return {digest: float(left) for digest, left in rows}

    async def aclose(self) -> None:
        await drain(3.0)  # a reconciliation must not outlive its store (or spill over)
        for proxy in self.proxies:
            proxy.heal()
        for store in [*self.stores, *([self._direct] if self._direct is not None else [])]:
            with contextlib.suppress(Exception):
                await store.aclose()
        for proxy in self.proxies:
            proxy.close()
