"""`RedisStore`: idempotency records shared by many processes and hosts through Redis.

A record is a hash at ``{prefix}{namespace}:{scope}:{digest}``. Every transition is one Lua
script (EVALSHA), so it is atomic on the server: `acquire` applies the same decision as every
other store (`_base.can_acquire`) and writes a fresh record with a new token and a higher
epoch, or returns the existing record untouched; `complete`, `release` and `renew` are
compare-and-set on ``(owner_token, IN_PROGRESS)``. Time is the server's (``TIME``) unless a
clock is injected. The key's own expiry (``PEXPIRE``) is garbage collection only: it is set a
minute past the record's expiry, which nodekit decides itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .._errors import ConfigError
from ._base import Closing, new_token
from ._store import FORMAT_VERSION, Acquisition, Clock, Record, RecordKey

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["RedisStore"]

# Lua numbers are doubles; "%.17g" writes them back so that Python reads the same float.
_PRELUDE = """
local function fmt(x) return string.format('%.17g', x) end
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function gc(key, seconds)
  redis.call('PEXPIRE', key, string.format('%d', math.ceil((seconds + 60) * 1000)))
end
"""

# KEYS: record. ARGV: fingerprint, token, lease, ttl, takeover (1/0), now ('' = server TIME),
# namespace, scope, digest, format_version.
# Returns {acquired, takeover, now, the record's fields as a JSON object} (one bulk string
# parses much faster in redis-py than a nested array).
_ACQUIRE = (
    _PRELUDE
    + """
local now = clock(ARGV[6])
local lease = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local flat = redis.call('HGETALL', KEYS[1])
local took = 0
local epoch = 1
if #flat > 0 then
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  if tonumber(h['expires_at']) > now then
    if ARGV[5] == '1' and h['state'] == 'IN_PROGRESS'
        and tonumber(h['lease_expires_at']) <= now and h['fingerprint'] == ARGV[1] then
      took = 1
    else
      return {0, 0, fmt(now), cjson.encode(h)}
    end
  end
  epoch = tonumber(h['epoch']) + 1
end
local span = math.max(ttl, lease)
local record = {
  namespace = ARGV[7], scope = ARGV[8], key_digest = ARGV[9], fingerprint = ARGV[1],
  state = 'IN_PROGRESS', owner_token = ARGV[2], epoch = string.format('%d', epoch),
  lease_expires_at = fmt(now + lease), created_at = fmt(now), expires_at = fmt(now + span),
  format_version = ARGV[10]}
local fields = {}
for name, value in pairs(record) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
gc(KEYS[1], span)
return {1, took, fmt(now), cjson.encode(record)}
"""
)

# KEYS: record. ARGV: token, ttl, now, has result (1/0), result, has error (1/0), error.
_COMPLETE = (
    _PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner_token', 'lease_expires_at')
if h[1] ~= 'IN_PROGRESS' or h[2] ~= ARGV[1] then return 0 end
local now = clock(ARGV[3])
local expires_at = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'COMPLETED', 'expires_at', fmt(expires_at))
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'result', ARGV[5])
else redis.call('HDEL', KEYS[1], 'result') end
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'error', ARGV[7])
else redis.call('HDEL', KEYS[1], 'error') end
gc(KEYS[1], math.max(expires_at, tonumber(h[3])) - now)
return 1
"""
)

# KEYS: record. ARGV: token.
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner_token')
if h[1] ~= 'IN_PROGRESS' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: record. ARGV: token, lease, now.
_RENEW = (
    _PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner_token', 'expires_at')
if h[1] ~= 'IN_PROGRESS' or h[2] ~= ARGV[1] then return 0 end
local now = clock(ARGV[3])
local lease_at = now + tonumber(ARGV[2])
local expires_at = math.max(tonumber(h[3]), lease_at)
redis.call('HSET', KEYS[1], 'lease_expires_at', fmt(lease_at), 'expires_at', fmt(expires_at))
gc(KEYS[1], expires_at - now)
return 1
"""
)

_SOURCES = (_ACQUIRE, _COMPLETE, _RELEASE, _RENEW)


def _text(value: Any) -> str:
    # undecodable bytes survive as surrogates, so a corrupt value fails decoding later
    # (IdempotencyCorruptRecord) instead of being silently altered here
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _record(fields: Mapping[str, str]) -> Record:
    return Record(
        namespace=fields["namespace"],
        scope=fields["scope"],
        key_digest=fields["key_digest"],
        fingerprint=fields["fingerprint"],
        state=fields["state"],
        owner_token=fields["owner_token"],
        epoch=int(fields["epoch"]),
        lease_expires_at=float(fields["lease_expires_at"]),
        created_at=float(fields["created_at"]),
        expires_at=float(fields["expires_at"]),
        result=fields.get("result"),
        error=fields.get("error"),
        format_version=int(fields.get("format_version", FORMAT_VERSION)),
    )


def _from_hash(raw: Mapping[Any, Any]) -> Record | None:
    if not raw:
        return None
    return _record({_text(k): _text(v) for k, v in raw.items()})


def _acquisition(reply: Sequence[Any]) -> Acquisition:
    acquired, took, now, fields = reply
    return Acquisition(
        bool(int(acquired)),
        _record(json.loads(_text(fields))),
        takeover=bool(int(took)),
        now=float(_text(now)),
    )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _flag(value: bool) -> str:
    return "1" if value else "0"


class _Scripts:
    """The four scripts bound to one client (sync or async)."""

    __slots__ = ("acquire", "client", "complete", "release", "renew")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.acquire, self.complete, self.release, self.renew = (
            client.register_script(source) for source in _SOURCES
        )


class RedisStore(Closing):
    """Idempotency records in Redis, safe across threads, tasks, processes and hosts.

    `url` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``); clients are created
    from it lazily: one sync client (thread safe, pooled) and one asyncio client per event
    loop. Pass `client` / `async_client` to use your own: the store never closes those.
    `prefix` namespaces the keys. `clock` is injectable (tests); otherwise time is Redis's.
    Redis errors propagate as redis-py exceptions.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "nodekit:",
        clock: Clock | None = None,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
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
        self.url = url
        self.prefix = prefix
        self._clock = clock
        self._lock = threading.Lock()
        self._given = client
        self._given_async = async_client
        self._sync: _Scripts | None = None if client is None else _Scripts(client)
        self._given_async_scripts: _Scripts | None = (
            None if async_client is None else _Scripts(async_client)
        )
        # event loop -> scripts on an asyncio client created (and owned) for that loop
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Scripts] = (
            weakref.WeakKeyDictionary()
        )
        self._meta_done = False
        self._closed = False

    def __repr__(self) -> str:
        where = _redact(self.url) if self.url is not None else "<client>"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ clients

    def _scripts(self) -> _Scripts:
        scripts = self._sync
        if scripts is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("RedisStore is closed")
                if self._sync is None:
                    import redis

                    assert self.url is not None
                    self._sync = _Scripts(redis.Redis.from_url(self.url))
                scripts = self._sync
        if not self._meta_done:
            scripts.client.hsetnx(self._meta_key, "format_version", FORMAT_VERSION)
            self._meta_done = True
        return scripts

    async def _ascripts(self) -> _Scripts:
        scripts = self._given_async_scripts
        if scripts is None:
            loop = asyncio.get_running_loop()
            scripts = self._async.get(loop)
            if scripts is None:
                import redis.asyncio

                with self._lock:
                    if self._closed:
                        raise RuntimeError("RedisStore is closed")
                    assert self.url is not None
                    scripts = self._async.setdefault(
                        loop, _Scripts(redis.asyncio.Redis.from_url(self.url))
                    )
        if not self._meta_done:
            await scripts.client.hsetnx(self._meta_key, "format_version", FORMAT_VERSION)
            self._meta_done = True
        return scripts

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
        token: str | None,
    ) -> list[str | int]:
        return [
            fingerprint,
            token or new_token(),
            repr(float(lease)),
            repr(float(ttl)),
            _flag(takeover),
            self._now(),
            key.namespace,
            key.scope,
            key.digest,
            FORMAT_VERSION,
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
    ) -> Acquisition:
        args = self._acquire_args(key, fingerprint, lease, ttl, takeover, token)
        return _acquisition(self._scripts().acquire(keys=[self._key(key)], args=args))

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        args = self._complete_args(token, result, error, ttl)
        return int(self._scripts().complete(keys=[self._key(key)], args=args)) == 1

    def release(self, key: RecordKey, token: str) -> bool:
        return int(self._scripts().release(keys=[self._key(key)], args=[token])) == 1

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        args = [token, repr(float(lease)), self._now()]
        return int(self._scripts().renew(keys=[self._key(key)], args=args)) == 1

    def get(self, key: RecordKey) -> Record | None:
        return _from_hash(self._scripts().client.hgetall(self._key(key)))

    def delete(self, key: RecordKey) -> bool:
        return int(self._scripts().client.delete(self._key(key))) == 1

    def close(self) -> None:
        """Close the sync client this store created (async ones close in `aclose`)."""
        with self._lock:
            self._closed = True
            scripts, self._sync = self._sync, None
        if scripts is not None and scripts.client is not self._given:
            scripts.client.close()

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
    ) -> Acquisition:
        args = self._acquire_args(key, fingerprint, lease, ttl, takeover, token)
        scripts = await self._ascripts()
        return _acquisition(await scripts.acquire(keys=[self._key(key)], args=args))

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        args = self._complete_args(token, result, error, ttl)
        scripts = await self._ascripts()
        return int(await scripts.complete(keys=[self._key(key)], args=args)) == 1

    async def arelease(self, key: RecordKey, token: str) -> bool:
        scripts = await self._ascripts()
        return int(await scripts.release(keys=[self._key(key)], args=[token])) == 1

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        args = [token, repr(float(lease)), self._now()]
        scripts = await self._ascripts()
        return int(await scripts.renew(keys=[self._key(key)], args=args)) == 1

    async def aget(self, key: RecordKey) -> Record | None:
        scripts = await self._ascripts()
        return _from_hash(await scripts.client.hgetall(self._key(key)))

    async def adelete(self, key: RecordKey) -> bool:
        scripts = await self._ascripts()
        return int(await scripts.client.delete(self._key(key))) == 1

    async def aclose(self) -> None:
        """Close the clients this store created: this loop's asyncio client and the sync one.

        An asyncio client belongs to the loop that created it; one made in another loop must
        be closed there (call `aclose` from it).
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            scripts = self._async.pop(loop, None)
        if scripts is not None:
            await scripts.client.aclose()
        self.close()

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
