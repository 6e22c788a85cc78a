"""`RedisStore`'s Lua scripts: each transition of a record is one script, atomic on the server.

A record is a hash. `ACQUIRE` applies the same decision as every other store
(`_base.can_acquire`) and never treats a record nodekit would not write as absent or expired:
it returns it untouched, and reading it raises `IdempotencyCorruptRecord`. `COMPLETE`,
`RELEASE` and `RENEW` are compare-and-set on ``(owner_token, IN_PROGRESS)``.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COMPLETE", "RELEASE", "RENEW", "SOURCES"]

# Lua numbers are doubles; "%.17g" writes them back so that Python reads the same float.
# `num` reads a stored time as nodekit writes it: decimal and finite, never nan, inf or hex.
PRELUDE = """
local function fmt(x) return string.format('%.17g', x) end
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function gc(key, seconds)
  redis.call('PEXPIRE', key, string.format('%d', math.ceil((seconds + 60) * 1000)))
end
local function num(v)
  if type(v) ~= 'string' or not string.find(v, '^%s*[+%-]?%d*%.?%d*[eE]?[+%-]?%d*%s*$') then
    return nil
  end
  local n = tonumber(v)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end
"""

# KEYS: record. ARGV: fingerprint, token, lease, ttl, takeover (1/0), now ('' = server TIME),
# namespace, scope, digest, format_version, holder (this process, JSON), dead ('' or the owner
# token of a holder known to be gone: its record is taken over even though its lease is valid).
# Returns {acquired, takeover, now, the record's fields as a JSON object} (one bulk string
# parses much faster in redis-py than a nested array), and the first bad field's name when
# the stored record is one nodekit never writes: a corrupt record is returned untouched,
# never taken for absent or expired.
ACQUIRE = (
    PRELUDE
    + """
local function corrupt(h, newest)
  for _, name in ipairs({'namespace', 'scope', 'key_digest', 'fingerprint', 'owner_token'}) do
    if h[name] == nil or (h[name] == '' and name ~= 'scope') then return name end
  end
  if h['state'] ~= 'IN_PROGRESS' and h['state'] ~= 'COMPLETED' then return 'state' end
  local epoch = h['epoch']
  if not (epoch and string.find(epoch, '^%d+$') and tonumber(epoch) >= 1
      and tonumber(epoch) < 2 ^ 53) then return 'epoch' end
  for _, name in ipairs({'lease_expires_at', 'created_at', 'expires_at'}) do
    if num(h[name]) == nil then return name end
  end
  local version = h['format_version']
  if version ~= nil and not (string.find(version, '^%d+$') and tonumber(version) >= 1
      and tonumber(version) <= newest) then return 'format_version' end
  return nil
end
local now = clock(ARGV[6])
local lease = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local flat = redis.call('HGETALL', KEYS[1])
local took = 0
local epoch = 1
if #flat > 0 then
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  local bad = corrupt(h, tonumber(ARGV[10]))
  if bad then return {0, 0, fmt(now), cjson.encode(h), bad} end
  if num(h['expires_at']) > now then
    if ARGV[5] == '1' and h['state'] == 'IN_PROGRESS' and h['fingerprint'] == ARGV[1]
        and (num(h['lease_expires_at']) <= now
             or (ARGV[12] ~= '' and h['owner_token'] == ARGV[12])) then
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
  format_version = ARGV[10], holder = ARGV[11]}
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
COMPLETE = (
    PRELUDE
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
gc(KEYS[1], math.max(expires_at, num(h[3]) or expires_at) - now)
return 1
"""
)

# KEYS: record. ARGV: token.
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner_token')
if h[1] ~= 'IN_PROGRESS' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: record. ARGV: token, lease, now.
RENEW = (
    PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner_token', 'expires_at')
if h[1] ~= 'IN_PROGRESS' or h[2] ~= ARGV[1] then return 0 end
local now = clock(ARGV[3])
local lease_at = now + tonumber(ARGV[2])
local expires_at = math.max(num(h[3]) or lease_at, lease_at)
redis.call('HSET', KEYS[1], 'lease_expires_at', fmt(lease_at), 'expires_at', fmt(expires_at))
gc(KEYS[1], expires_at - now)
return 1
"""
)

SOURCES = (ACQUIRE, COMPLETE, RELEASE, RENEW)
