"""Shared state in a `RedisStore`: every step is one Lua script, one round trip, atomic.

Keys (under the store's prefix, ``{p}``):

- ``{p}resilience:breaker:{name}``: a string, the breaker's JSON document (`_rules`), read,
  changed and written back by `BREAKER` (one script, five operations);
- ``{p}resilience:limit:{name}``: a string, the GCRA theoretical arrival time; `RESERVE` and
  `PAUSE`;
- ``{p}resilience:bulkhead:{name}`` and ``…:queue``: sorted sets, member = the holder's (or
  waiter's) token, score = its lease expiry; `SLOTS` drops expired members first, so a dead
  process's slot is free once its lease ends.

Time is the server's (``TIME``) unless the store has an injected clock; the breaker's
document stores times as cjson writes numbers (14 significant digits: 0.1 ms today). Each
key expires (garbage collection only) a minute after nothing in it can matter — a breaker
idle that long forgets its window and an open period long past; an isolated one never
expires. The scripts run on the
store's own clients, one of its `pool_size` slots each (`RedisStore._enter` / `_aenter`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ._state import BreakerSettings

__all__ = ["RedisBreaker", "RedisLimiter", "RedisSlots"]

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

# KEYS: the document. ARGV: op, failure_rate, min_calls, window, open_for, half_open_calls,
# probe_lease, now ('' = TIME), then the op's own: admit: successes; record: successes,
# probe (0 = none), failed (1/0); release: probe; force: state; read: nothing.
# The same rules as `_rules.breaker_*`, line for line. Numbers that Redis would truncate to
# integers (times) come back as strings.
BREAKER = (
    _PRELUDE
    + """
local op = ARGV[1]
local rate, min_calls, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local open_for, half_calls, lease = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = clock(ARGV[8])
local raw = redis.call('GET', KEYS[1])
local doc = {}
if raw then doc = cjson.decode(raw) end
doc.s = doc.s or 'closed'; doc.o = doc.o or 0; doc.f = doc.f or 0; doc.n = doc.n or 0
doc.p = doc.p or {}; doc.b = doc.b or {}
local changed = false

local function add(calls, fails)
  local bucket = math.floor(now / (window / 10))
  local kept, found = {}, false
  for _, e in ipairs(doc.b) do
    if e[1] > bucket - 10 then
      if e[1] == bucket then e[2] = e[2] + calls; e[3] = e[3] + fails; found = true end
      kept[#kept + 1] = e
    end
  end
  if not found then kept[#kept + 1] = {bucket, calls, fails} end
  doc.b = kept
  changed = true
end
local function healthy()
  if doc.s ~= 'closed' then return 0 end
  for _, e in ipairs(doc.b) do if e[3] > 0 then return 0 end end
  return 1
end
local function clear(state, at)
  doc.s = state; doc.o = at; doc.p = {}; doc.n = 0; doc.b = {}
  changed = true
end

local reply
if op == 'admit' then
  local successes = tonumber(ARGV[9])
  if doc.s == 'closed' then
    if successes > 0 then add(successes, 0) end
    reply = {1, 'closed', 0, '', 0, healthy()}
  elseif doc.s == 'isolated' then
    reply = {0, 'isolated', 0, '', 0, 0}
  else
    local half = 0
    if doc.s == 'open' then
      local after = doc.o + open_for
      if now < after then
        reply = {0, 'open', 0, fmt(after - now), 0, 0}
      else
        clear('half_open', doc.o)
        half = 1
      end
    end
    if reply == nil then
      local live, count = {}, 0
      for t, e in pairs(doc.p) do
        if e > now then live[t] = e; count = count + 1 else changed = true end
      end
      doc.p = live
      if count + doc.n >= half_calls then
        reply = {0, 'half_open', 0, '', half, 0}
      else
        doc.f = doc.f + 1
        doc.p[tostring(doc.f)] = now + lease
        changed = true
        reply = {1, 'half_open', doc.f, '', half, 0}
      end
    end
  end
elseif op == 'record' then
  local successes, probe, failed = tonumber(ARGV[9]), ARGV[10], ARGV[11] == '1'
  if probe ~= '0' then
    if doc.s ~= 'half_open' or doc.p[probe] == nil then
      reply = {'', 0, 0, healthy()}
    else
      doc.p[probe] = nil
      changed = true
      if failed then
        local passed = doc.n
        clear('open', now)
        reply = {'open', passed + 1, 1, 0}
      else
        doc.n = doc.n + 1
        if doc.n >= half_calls then
          local passed = doc.n
          clear('closed', now)
          reply = {'closed', passed, 0, 1}
        else
          reply = {'', 0, 0, 0}
        end
      end
    end
  elseif doc.s ~= 'closed' then
    reply = {'', 0, 0, 0}
  else
    local fails = 0
    if failed then fails = 1 end
    add(successes + 1, fails)
    if not failed then
      reply = {'', 0, 0, healthy()}
    else
      local calls, failures = 0, 0
      for _, e in ipairs(doc.b) do calls = calls + e[2]; failures = failures + e[3] end
      if calls >= min_calls and failures >= rate * calls then
        clear('open', now)
        reply = {'open', calls, failures, 0}
      else
        reply = {'', calls, failures, 0}
      end
    end
  end
elseif op == 'release' then
  if doc.p[ARGV[9]] ~= nil then doc.p[ARGV[9]] = nil; changed = true end
  reply = 1
elseif op == 'force' then
  if doc.s == ARGV[9] then reply = 0 else clear(ARGV[9], now); reply = 1 end
else
  local state = doc.s
  if state == 'open' and now >= doc.o + open_for then state = 'half_open' end
  reply = state
end
if changed then
  local keep = window
  if open_for > keep then keep = open_for end
  if lease > keep then keep = lease end
  redis.call('SET', KEYS[1], cjson.encode(doc))
  if doc.s ~= 'isolated' then gc(KEYS[1], keep) end  -- isolated holds until reset()
end
return reply
"""
)

# KEYS: the tat. ARGV: interval, tolerance, budget ('' = none), now ('' = TIME).
# Returns {granted 1/0, wait}: `_rules.gcra_reserve`.
RESERVE = (
    _PRELUDE
    + """
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = clock(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait <= 0 then
  wait = 0
elseif ARGV[3] ~= '' and wait > tonumber(ARGV[3]) then
  return {0, fmt(wait)}
end
tat = tat + interval
redis.call('SET', KEYS[1], fmt(tat))
gc(KEYS[1], tat - now)
return {1, fmt(wait)}
"""
)

# KEYS: the tat. ARGV: seconds, tolerance, now ('' = TIME). Returns 1 if it paused.
PAUSE = (
    _PRELUDE
    + """
local now = clock(ARGV[3])
local paused = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if paused <= tat then return 0 end
redis.call('SET', KEYS[1], fmt(paused))
gc(KEYS[1], paused - now)
return 1
"""
)

# KEYS: holders, queue. ARGV: op, token, now ('' = TIME), then take: limit, queue, lease;
# renew: lease. Returns take: 'slot' | 'wait' | 'full'; renew/give: 1/0; count: holders.
# `_rules.slots_*`.
SLOTS = (
    _PRELUDE
    + """
local op, token = ARGV[1], ARGV[2]
local now = clock(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
if op == 'take' then
  local limit, queue, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local expires = fmt(now + lease)
  if redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZREM', KEYS[2], token)
    redis.call('ZADD', KEYS[1], expires, token)
    gc(KEYS[1], lease)
    return 'slot'
  end
  if redis.call('ZSCORE', KEYS[2], token) or redis.call('ZCARD', KEYS[2]) < queue then
    redis.call('ZADD', KEYS[2], expires, token)
    gc(KEYS[2], lease)
    return 'wait'
  end
  return 'full'
elseif op == 'renew' then
  if not redis.call('ZSCORE', KEYS[1], token) then return 0 end
  redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[4])), token)
  gc(KEYS[1], tonumber(ARGV[4]))
  return 1
elseif op == 'give' then
  return redis.call('ZREM', KEYS[1], token) + redis.call('ZREM', KEYS[2], token)
end
return redis.call('ZCARD', KEYS[1])
"""
)

_SHA = {
    source: hashlib.sha1(source.encode()).hexdigest() for source in (BREAKER, RESERVE, PAUSE, SLOTS)
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Scripts:
    """Runs one script on the store's sync client or this loop's async client, in one of
    the store's slots: EVALSHA, and the script's source once if the server lacks it."""

    def __init__(self, store: Any, key: str) -> None:
        self.store = store
        self.key = key

    def now(self) -> str:
        clock = self.store._clock
        return "" if clock is None else repr(float(clock()))

    def call(self, source: str, keys: list[str], args: list[Any], *, bounded: bool) -> Any:
        from redis.exceptions import NoScriptError

        scripts = self.store._enter(bounded)
        try:
            client = scripts.client
            try:
                return client.evalsha(_SHA[source], len(keys), *keys, *args)
            except NoScriptError:
                client.script_load(source)
                return client.evalsha(_SHA[source], len(keys), *keys, *args)
        finally:
            scripts.slots.release()

    async def acall(self, source: str, keys: list[str], args: list[Any], *, bounded: bool) -> Any:
        from redis.exceptions import NoScriptError

        scripts = await self.store._aenter(bounded)
        try:
            client = scripts.client
            try:
                return await client.evalsha(_SHA[source], len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(source)
                return await client.evalsha(_SHA[source], len(keys), *keys, *args)
        finally:
            scripts.slots.release()


def _key(store: Any, kind: str, name: str) -> str:
    return f"{store.prefix}resilience:{kind}:{name}"


class RedisBreaker(_Scripts):
    """`_shared.BreakerSteps`: the `BREAKER` script."""

    def __init__(self, store: Any, name: str, settings: BreakerSettings) -> None:
        super().__init__(store, _key(store, "breaker", name))
        s = settings
        self.head = [
            repr(s.failure_rate),
            s.min_calls,
            repr(s.window),
            repr(s.open_for),
            s.half_open_calls,
            repr(s.probe_lease),
        ]

    def _args(self, op: str, *rest: Any) -> list[Any]:
        return [op, *self.head, self.now(), *rest]

    @staticmethod
    def _admission(reply: Any) -> tuple[bool, str, int | None, float | None, bool, bool]:
        allowed, state, probe, retry_after, half, healthy = reply
        retry = _text(retry_after)
        return (
            bool(allowed),
            _text(state),
            int(probe) or None,
            float(retry) if retry else None,
            bool(half),
            bool(healthy),
        )

    @staticmethod
    def _outcome(reply: Any) -> tuple[str | None, int, int, bool]:
        to, calls, failures, healthy = reply
        return _text(to) or None, int(calls), int(failures), bool(healthy)

    def admit(self, successes: int) -> tuple[bool, str, int | None, float | None, bool, bool]:
        reply = self.call(BREAKER, [self.key], self._args("admit", successes), bounded=True)
        return self._admission(reply)

    async def aadmit(
        self, successes: int
    ) -> tuple[bool, str, int | None, float | None, bool, bool]:
        reply = await self.acall(BREAKER, [self.key], self._args("admit", successes), bounded=True)
        return self._admission(reply)

    def _record_args(self, successes: int, probe: int | None, failed: bool) -> list[Any]:
        return self._args("record", successes, probe or 0, int(failed))

    def record(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]:
        args = self._record_args(successes, probe, failed)
        return self._outcome(self.call(BREAKER, [self.key], args, bounded=False))

    async def arecord(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]:
        args = self._record_args(successes, probe, failed)
        return self._outcome(await self.acall(BREAKER, [self.key], args, bounded=False))

    def release(self, probe: int) -> None:
        self.call(BREAKER, [self.key], self._args("release", probe), bounded=False)

    async def arelease(self, probe: int) -> None:
        await self.acall(BREAKER, [self.key], self._args("release", probe), bounded=False)

    def force(self, state: str) -> bool:
        return bool(self.call(BREAKER, [self.key], self._args("force", state), bounded=False))

    def read(self) -> str:
        return _text(self.call(BREAKER, [self.key], self._args("read"), bounded=True))


class RedisLimiter(_Scripts):
    """`LimiterBackend` (and its async twins): `RESERVE` and `PAUSE`, one round trip each."""

    shared = True

    def __init__(self, store: Any, name: str, settings: Any) -> None:
        super().__init__(store, _key(store, "limit", name))
        self.settings = settings
        self.interval = repr(float(settings.interval))
        self.tolerance = repr(float((settings.burst - 1) * settings.interval))

    def _args(self, budget: float | None) -> list[str]:
        return [self.interval, self.tolerance, "" if budget is None else repr(budget), self.now()]

    def reserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        granted, wait = self.call(RESERVE, [self.key], self._args(budget), bounded=True)
        return bool(granted), float(_text(wait))

    async def areserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        granted, wait = await self.acall(RESERVE, [self.key], self._args(budget), bounded=True)
        return bool(granted), float(_text(wait))

    def pause(self, now: float, seconds: float) -> bool:
        args = [repr(float(seconds)), self.tolerance, self.now()]
        return bool(self.call(PAUSE, [self.key], args, bounded=False))

    async def apause(self, now: float, seconds: float) -> bool:
        args = [repr(float(seconds)), self.tolerance, self.now()]
        return bool(await self.acall(PAUSE, [self.key], args, bounded=False))


class RedisSlots(_Scripts):
    """`_shared.SlotSteps`: the `SLOTS` script on two sorted sets."""

    def __init__(self, store: Any, name: str) -> None:
        super().__init__(store, _key(store, "bulkhead", name))
        self.keys = [self.key, self.key + ":queue"]

    def take(self, token: str, limit: int, queue: int, lease: float) -> str:
        args = ["take", token, self.now(), limit, queue, repr(lease)]
        return _text(self.call(SLOTS, self.keys, args, bounded=True))

    async def atake(self, token: str, limit: int, queue: int, lease: float) -> str:
        args = ["take", token, self.now(), limit, queue, repr(lease)]
        return _text(await self.acall(SLOTS, self.keys, args, bounded=True))

    def renew(self, token: str, lease: float) -> bool:
        args = ["renew", token, self.now(), repr(lease)]
        return bool(self.call(SLOTS, self.keys, args, bounded=False))

    def give(self, token: str) -> None:
        self.call(SLOTS, self.keys, ["give", token, self.now()], bounded=False)

    async def agive(self, token: str) -> None:
        await self.acall(SLOTS, self.keys, ["give", token, self.now()], bounded=False)

    def count(self) -> int:
        return int(self.call(SLOTS, self.keys, ["count", "", self.now()], bounded=True))
