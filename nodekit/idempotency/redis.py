"""`RedisStore`: idempotency records shared by many processes and hosts through Redis.

A record is a hash at ``{prefix}{namespace}:{scope}:{digest}``. Every transition is one Lua
script (EVALSHA), so it is atomic on the server: `acquire` applies the same decision as every
other store (`_base.can_acquire`) and writes a fresh record with a new token and a higher
epoch, or returns the existing record untouched; `complete`, `release` and `renew` are
compare-and-set on ``(owner_token, IN_PROGRESS)``. Time is the server's (``TIME``) unless a
clock is injected. The key's own expiry (``PEXPIRE``) is garbage collection only: it is set a
minute past the record's expiry, which nodekit decides itself.

Every operation first takes one of the store's `pool_size` slots (a semaphore in front of
redis-py's blocking pool of as many connections), so the pool itself never makes a caller
wait, and the wait for a slot is bounded by the node's deadline (`_base.pool_wait`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from .._redact import redact
from ._base import Closing, PoolTimeout, new_token, pool_wait, record_from_fields
from ._holder import holder_text
from ._redis_clients import (
    Clients,
    Scripts,
    close_with_loop,
    durability_asked,
    report_durability,
    server_of,
    text,
)
from ._store import FORMAT_VERSION, Acquisition, Clock, Record, RecordKey

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["RedisStore"]

# A ping before a command on a connection idle this long (s): a connection the server or a
# firewall dropped meanwhile is found and replaced before the command is sent on it.
HEALTH_CHECK_INTERVAL = 30


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _seconds(value: Any, option: str, *, allow_none: bool) -> float | None:
    """A time option as float seconds (a float, an int or a timedelta), else `ConfigError`."""
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"RedisStore {option} must be seconds (float) or a timedelta, got {value!r}",
            option=option,
        )
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(
            f"RedisStore {option} must be a finite time of 0 s or more, got {value!r}",
            option=option,
        )
    return float(value)


class RedisStore(Closing):
    """Idempotency records in Redis, safe across threads, tasks, processes and hosts.

    `url` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``); clients are created
    from it lazily: one sync client (thread safe) and one asyncio client per event loop, each
    with a blocking pool of at most `pool_size` connections. An asyncio client closes when its
    loop shuts down (``asyncio.run`` does that), or in `aclose`. Pass `client` /
    `async_client` to use your own: the store never closes those. `prefix` namespaces the
    keys. `clock` is injectable (tests); otherwise time is Redis's.

    - `pool_size` (default 20): connections per client, and operations in flight on it; more
      callers wait their turn instead of failing (with your own client, it caps the store's
      operations on it).
    - `pool_timeout` (seconds or timedelta, default 30): the longest wait for a free
      connection. An acquire or a read waits no longer than the node's remaining deadline
      either: if none frees up in time it fails before anything ran (the call raises
      `IdempotencyStoreError`). Completion, release and renewal wait the whole
      `pool_timeout`: the effect happened and its outcome must be recorded if at all possible.
    - `socket_timeout` (default 10 s) and `socket_connect_timeout` (default 5 s) bound one
      read and one connect (None: no limit); a URL's own ``?socket_timeout=`` wins.

    A broken connection (server restart, idle reset, a timeout) is replaced and the operation
    sent once more: every operation is safe to send twice, since the caller's owner token
    tells its own claim apart. Scripts are loaded again after a server restart. On first use
    the store checks that the server keeps its data on disk and warns once per server
    (`NodekitWarning`) if it does not. Redis errors propagate as redis-py exceptions; a
    record nodekit would never write raises `IdempotencyCorruptRecord` and is left as is.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "nodekit:",
        clock: Clock | None = None,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        pool_size: int = 20,
        pool_timeout: float | timedelta = 30.0,
        socket_timeout: float | timedelta | None = 10.0,
        socket_connect_timeout: float | timedelta | None = 5.0,
    ) -> None:
        if url is None and (client is None or async_client is None):
            raise ConfigError(
                "RedisStore needs a URL unless both client and async_client are given",
                option="url",
            )
        if not isinstance(prefix, str):
            raise ConfigError(
                f"RedisStore prefix must be a string, got {prefix!r}", option="prefix"
            )
        if type(pool_size) is not int or pool_size < 1:
            raise ConfigError(
                f"RedisStore pool_size must be an integer of 1 or more, got {pool_size!r}",
                option="pool_size",
            )
        self.url = url
        self.prefix = prefix
        self.pool_size = pool_size
        self.pool_timeout: float = _seconds(pool_timeout, "pool_timeout", allow_none=False) or 0.0
        self.socket_timeout = _seconds(socket_timeout, "socket_timeout", allow_none=True)
        self.socket_connect_timeout = _seconds(
            socket_connect_timeout, "socket_connect_timeout", allow_none=True
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._given_async = async_client
        self._clients = Clients()
        if client is not None:
            self._clients.sync = Scripts(client, self._sync_slots(), owned=False)
        self._prepared = False  # the first-use step (format version, durability) is done
        self._preparing = False  # ... or under way in some caller
        self._closed = False
        self._name = repr(self)  # names the store in IdempotencyCorruptRecord
        weakref.finalize(self, self._clients.close)

    def __repr__(self) -> str:
        where = redact(self.url) if self.url is not None else "<client>"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its URL and options: another process (an executor's worker) connects
        to the same server with clients of its own."""
        if self.url is None:
            raise TypeError(
                "a RedisStore made from client objects cannot be sent to another process: "
                "give it a URL (RedisStore(url))"
            )
        options: dict[str, Any] = {
            "prefix": self.prefix,
            "pool_size": self.pool_size,
            "pool_timeout": self.pool_timeout,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
        }
        if self._clock is not None:
            options["clock"] = self._clock
        return (functools.partial(RedisStore, self.url, **options), ())

    # ------------------------------------------------------------------ clients

    def _sync_slots(self) -> threading.BoundedSemaphore:
        return threading.BoundedSemaphore(self.pool_size)

    def _pool_options(self, parse_url: Callable[[str], Mapping[str, Any]]) -> dict[str, Any]:
        """The pool's keyword arguments: the store's defaults, then the URL's own (they win),
        then the pool size (the slots count on it)."""
        assert self.url is not None
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
            "timeout": self.pool_timeout,
        }
        options.update(parse_url(self.url))
        options["max_connections"] = self.pool_size
        return options

    def _scripts(self) -> Scripts:
        """The sync client (made on first use) with its scripts and slots."""
        scripts = self._clients.sync
        if scripts is not None:
            return scripts
        import redis
        from redis.backoff import NoBackoff
        from redis.connection import parse_url
        from redis.retry import Retry

        with self._clients.lock:
            if self._clients.sync is None:
                if self._closed:
                    raise RuntimeError("RedisStore is closed")
                pool_class: Any = redis.BlockingConnectionPool  # untyped __init__
                pool = pool_class(**self._pool_options(parse_url), retry=Retry(NoBackoff(), 1))
                client = redis.Redis(connection_pool=pool)
                self._clients.sync = Scripts(client, self._sync_slots(), owned=True)
            return self._clients.sync

    async def _ascripts(self) -> Scripts:
        """This event loop's client (made on first use) with its scripts and slots."""
        loop = asyncio.get_running_loop()
        scripts = self._clients.loops.get(loop)
        if scripts is not None:
            return scripts
        import redis.asyncio
        from redis.asyncio.connection import parse_url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        clients = self._clients
        watch = None
        with clients.lock:
            if self._closed:
                raise RuntimeError("RedisStore is closed")
            clients.sweep()
            scripts = clients.loops.get(loop)
            if scripts is None:
                slots = asyncio.Semaphore(self.pool_size)
                if self._given_async is not None:
                    scripts = Scripts(self._given_async, slots, owned=False)
                else:
                    pool_class: Any = redis.asyncio.BlockingConnectionPool  # untyped __init__
                    pool = pool_class(**self._pool_options(parse_url), retry=Retry(NoBackoff(), 1))
                    client = redis.asyncio.Redis(connection_pool=pool)
                    scripts = Scripts(client, slots, owned=True)
                    scripts.watch = watch = close_with_loop(clients, loop, scripts)
                clients.loops[loop] = scripts
        if watch is not None:
            await anext(watch)  # to its `yield`, which registers it with the loop
        return scripts

    # ------------------------------------------------------------------ slots

    def _enter(self, bounded: bool) -> Scripts:
        """Take a slot of the sync client (the caller releases it); first use prepared."""
        scripts = self._scripts()
        slots = scripts.slots
        if not slots.acquire(blocking=False):
            wait = max(pool_wait(self.pool_timeout, bounded=bounded), 0.0)
            if not slots.acquire(timeout=wait):
                raise self._no_slot(wait)
        if not self._prepared and self._first():
            try:
                with scripts.client.pipeline(transaction=False) as pipe:
                    replies = self._prepare(scripts, pipe).execute(raise_on_error=False)
                self._prepared_with(scripts, replies)  # may warn (an error under -W error)
            except BaseException:
                self._preparing = False
                slots.release()
                raise
        return scripts

    async def _aenter(self, bounded: bool) -> Scripts:
        """Take a slot of this loop's client (the caller releases it); first use prepared."""
        scripts = await self._ascripts()
        slots = scripts.slots
        if slots.locked():
            wait = pool_wait(self.pool_timeout, bounded=bounded)
            try:
                async with asyncio.timeout(wait):
                    await slots.acquire()
            except TimeoutError:
                raise self._no_slot(wait) from None
        else:
            await slots.acquire()  # a free slot: returns at once
        if not self._prepared and self._first():
            try:
                async with scripts.client.pipeline(transaction=False) as pipe:
                    replies = await self._prepare(scripts, pipe).execute(raise_on_error=False)
                self._prepared_with(scripts, replies)
            except BaseException:
                self._preparing = False
                slots.release()
                raise
        return scripts

    def _no_slot(self, wait: float) -> PoolTimeout:
        return PoolTimeout(
            f"RedisStore: no free connection among {self.pool_size} within {wait:.3g} s "
            f"(pool_timeout={self.pool_timeout:g} s, or less: the node's deadline)"
        )

    # ------------------------------------------------------------------ first use

    def _first(self) -> bool:
        """Whether this caller makes the first-use step (one caller does; others go on)."""
        with self._lock:
            if self._prepared or self._preparing:
                return False
            self._preparing = True
            return True

    def _prepare(self, scripts: Scripts, pipe: Any) -> Any:
        """Queue the first-use commands (one round trip): the records' format version, and
        whether the server keeps anything on disk, unless this process asked it already."""
        pipe.hsetnx(self._meta_key, "format_version", FORMAT_VERSION)
        if not durability_asked(server_of(scripts.client)):
            pipe.config_get("appendonly")
            pipe.config_get("save")
        return pipe

    def _prepared_with(self, scripts: Scripts, replies: Sequence[Any]) -> None:
        self._prepared = True
        if len(replies) == 3:
            report_durability(server_of(scripts.client), replies[1], replies[2])

    # ------------------------------------------------------------------ arguments, replies

    @property
    def _meta_key(self) -> str:
        return f"{self.prefix}meta"

    def _key(self, key: RecordKey) -> str:
        return f"{self.prefix}{key.namespace}:{key.scope}:{key.digest}"

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _acquire_args(
        self,
        key: RecordKey,
        fingerprint: str,
        lease: float,
        ttl: float,
        takeover: bool,
        token: str,
        dead: str | None,
    ) -> list[str | int]:
        return [
            fingerprint,
            token,
            repr(float(lease)),
            repr(float(ttl)),
            _flag(takeover),
            self._now(),
            key.namespace,
            key.scope,
            key.digest,
            FORMAT_VERSION,
            holder_text(),
            dead or "",
        ]

    def _complete_args(
        self, token: str, result: str | None, error: str | None, ttl: float
    ) -> list[str]:
        return [
            token,
            repr(float(ttl)),
            self._now(),
            _flag(result is not None),
            result or "",
            _flag(error is not None),
            error or "",
        ]

    def _acquisition(self, reply: Sequence[Any]) -> Acquisition:
        acquired, took, now, raw = reply[:4]
        fields = json.loads(text(raw))
        record = record_from_fields(fields, self._name)
        if len(reply) > 4:
            # the script refused a value Python's float() still reads ("1_0", non-ASCII
            # digits) but nodekit never writes: corrupt all the same, named as the script did
            record_from_fields({**fields, text(reply[4]): None}, self._name)
        return Acquisition(
            bool(int(acquired)), record, takeover=bool(int(took)), now=float(text(now))
        )

    def _from_hash(self, raw: Mapping[Any, Any]) -> Record | None:
        if not raw:
            return None
        return record_from_fields({text(k): text(v) for k, v in raw.items()}, self._name)

    # ------------------------------------------------------------------ sync protocol

    def acquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition:
        token = token or new_token()  # chosen once: a second send is then told apart
        args = self._acquire_args(key, fingerprint, lease, ttl, takeover, token, dead)
        scripts = self._enter(True)
        try:
            reply = scripts.acquire(keys=[self._key(key)], args=args)
        finally:
            scripts.slots.release()
        return self._acquisition(reply)

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        args = self._complete_args(token, result, error, ttl)
        scripts = self._enter(False)
        try:
            return int(scripts.complete(keys=[self._key(key)], args=args)) == 1
        finally:
            scripts.slots.release()

    def release(self, key: RecordKey, token: str) -> bool:
        scripts = self._enter(False)
        try:
            return int(scripts.release(keys=[self._key(key)], args=[token])) == 1
        finally:
            scripts.slots.release()

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        args = [token, repr(float(lease)), self._now()]
        scripts = self._enter(False)
        try:
            return int(scripts.renew(keys=[self._key(key)], args=args)) == 1
        finally:
            scripts.slots.release()

    def get(self, key: RecordKey) -> Record | None:
        scripts = self._enter(True)
        try:
            raw = scripts.client.hgetall(self._key(key))
        finally:
            scripts.slots.release()
        return self._from_hash(raw)

    def delete(self, key: RecordKey) -> bool:
        scripts = self._enter(False)
        try:
            return int(scripts.client.delete(self._key(key))) == 1
        finally:
            scripts.slots.release()

    def close(self) -> None:
        """Close the sync pool this store created, and forget the asyncio clients of closed
        loops (an open loop's client closes with its loop, or in `aclose` there)."""
        with self._lock:
            self._closed = True
        self._clients.close()

    # ------------------------------------------------------------------ async protocol

    async def aacquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
        dead: str | None = None,
    ) -> Acquisition:
        token = token or new_token()
        args = self._acquire_args(key, fingerprint, lease, ttl, takeover, token, dead)
        scripts = await self._aenter(True)
        try:
            reply = await scripts.acquire(keys=[self._key(key)], args=args)
        finally:
            scripts.slots.release()
        return self._acquisition(reply)

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        args = self._complete_args(token, result, error, ttl)
        scripts = await self._aenter(False)
        try:
            return int(await scripts.complete(keys=[self._key(key)], args=args)) == 1
        finally:
            scripts.slots.release()

    async def arelease(self, key: RecordKey, token: str) -> bool:
        scripts = await self._aenter(False)
        try:
            return int(await scripts.release(keys=[self._key(key)], args=[token])) == 1
        finally:
            scripts.slots.release()

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        args = [token, repr(float(lease)), self._now()]
        scripts = await self._aenter(False)
        try:
            return int(await scripts.renew(keys=[self._key(key)], args=args)) == 1
        finally:
            scripts.slots.release()

    async def aget(self, key: RecordKey) -> Record | None:
        scripts = await self._aenter(True)
        try:
            raw = await scripts.client.hgetall(self._key(key))
        finally:
            scripts.slots.release()
        return self._from_hash(raw)

    async def adelete(self, key: RecordKey) -> bool:
        scripts = await self._aenter(False)
        try:
            return int(await scripts.client.delete(self._key(key))) == 1
        finally:
            scripts.slots.release()

    async def aclose(self) -> None:
        """Close the clients this store created: this loop's asyncio client and the sync one.

        An asyncio client belongs to the loop that created it; one made in another loop that
        is still open closes when that loop shuts down (or call `aclose` from it).
        """
        with self._lock:
            self._closed = True
        scripts = self._clients.loops.get(asyncio.get_running_loop())
        if scripts is not None and scripts.watch is not None:
            await scripts.watch.aclose()  # its `finally` closes the client
        self._clients.close()

    # ------------------------------------------------------------------ tests

    def _put(self, record: Record) -> None:
        """Write a record as is (tests use it to plant corrupt or foreign records)."""
        fields: dict[str, str | int | float] = {
            "namespace": record.namespace,
            "scope": record.scope,
            "key_digest": record.key_digest,
            "fingerprint": record.fingerprint,
            "state": record.state,
            "owner_token": record.owner_token,
            "epoch": record.epoch,
            "lease_expires_at": repr(float(record.lease_expires_at)),
            "created_at": repr(float(record.created_at)),
            "expires_at": repr(float(record.expires_at)),
            "format_version": record.format_version,
        }
        if record.holder is not None:
            fields["holder"] = record.holder
        if record.result is not None:
            fields["result"] = record.result
        if record.error is not None:
            fields["error"] = record.error
        client = self._scripts().client
        now = self._clock() if self._clock is not None else _server_time(client)
        live = max(record.expires_at, record.lease_expires_at) - now
        key = self._key(RecordKey(record.namespace, record.scope, record.key_digest))
        with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, int((max(live, 0.0) + 60) * 1000))
            pipe.execute()


def _server_time(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000
