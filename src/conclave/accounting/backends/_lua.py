"""Lua scripts of the Redis budget store and rate limiter.

Each operation is one script, so it runs atomically on the server and costs
one round trip (EVALSHA; redis-py falls back to EVAL after a server restart
flushed the script cache).  Keys are built inside the scripts from a prefix,
because which budgets apply is only known after reading the scope index; keep
a ``{hash tag}`` in the prefix so every key lands in one slot on Redis Cluster.

Numbers: Redis Lua numbers are doubles, exact below 2**53 (amounts are capped
there).  ``int()`` formats them for ``redis.call`` without the exponent
notation ``tostring`` would use above 1e14, and micro-dollar amounts travel in
JSON as strings for the same reason.

Key layout (P = prefix, sfx = ``<budget id>:<period key>``)::

    P b:<id>                 HASH  the budget
    P bidx:<scope>:<sid>     SET   budget ids of a scope
    P ball                   SET   every budget id
    P bkey:<scope>:<sid>:<period>  STRING  id (one budget per scope and period)
    P spent:sfx              STRING settled micro-dollars
    P rsv:sfx                ZSET  request id -> expiry (ms)
    P rsva:sfx               HASH  request id -> reserved micro-dollars
    P rsvt:sfx               STRING sum of rsva
    P done:<request id>      STRING settled marker (settle is idempotent)
    P marks:sfx              HASH  threshold -> fired (alert once)
    P alerts                 LIST  alert history, newest first
"""

from __future__ import annotations

_COMMON = """
local function int(x) return string.format('%d', x) end

local PERIOD_TTL = {daily = 3 * 86400, monthly = 70 * 86400}

local function expire_period(period, ...)
  local ttl = PERIOD_TTL[period]
  if ttl then
    for _, k in ipairs({...}) do redis.call('EXPIRE', k, ttl) end
  end
end

-- drop reservations whose expiry <= now, subtracting their amounts from the total
local function prune(zk, ak, tk, now)
  while true do
    local expired = redis.call('ZRANGEBYSCORE', zk, '-inf', now, 'LIMIT', 0, 500)
    if #expired == 0 then return end
    local amounts = redis.call('HMGET', ak, unpack(expired))
    local total = 0
    for i = 1, #expired do
      if amounts[i] then total = total + tonumber(amounts[i]) end
    end
    redis.call('ZREM', zk, unpack(expired))
    redis.call('HDEL', ak, unpack(expired))
    if total ~= 0 then redis.call('DECRBY', tk, int(total)) end
    if #expired < 500 then return end
  end
end
"""

# ARGV: prefix, now_ms, amount, expires_ms, request_id, daily_pk, monthly_pk, n, (scope, id)*n
RESERVE = _COMMON + """
local P = ARGV[1]
local now = ARGV[2]
local amount = tonumber(ARGV[3])
local expires = ARGV[4]
local rid = ARGV[5]
local pks = {daily = ARGV[6], monthly = ARGV[7], lifetime = 'lifetime'}
local n = tonumber(ARGV[8])

if redis.call('EXISTS', P .. 'done:' .. rid) == 1 then return {'settled'} end

local seen, ids = {}, {}
for i = 0, n - 1 do
  local members = redis.call('SMEMBERS', P .. 'bidx:' .. ARGV[9 + 2 * i] .. ':' .. ARGV[10 + 2 * i])
  for _, bid in ipairs(members) do
    if not seen[bid] then seen[bid] = true; ids[#ids + 1] = bid end
  end
end
table.sort(ids)

local targets = {}
for _, bid in ipairs(ids) do
  local h = redis.call('HMGET', P .. 'b:' .. bid, 'limit_micros', 'period')
  if h[1] then
    local pk = pks[h[2]]
    local sfx = bid .. ':' .. pk
    local zk, ak, tk = P .. 'rsv:' .. sfx, P .. 'rsva:' .. sfx, P .. 'rsvt:' .. sfx
    prune(zk, ak, tk, now)
    local spent = tonumber(redis.call('GET', P .. 'spent:' .. sfx) or '0')
    local reserved = tonumber(redis.call('GET', tk) or '0')
    local mine = redis.call('HGET', ak, rid)
    if mine then reserved = reserved - tonumber(mine) end
    if spent + reserved + amount > tonumber(h[1]) then
      return {'exceeded', bid, spent, reserved, redis.call('HGETALL', P .. 'b:' .. bid)}
    end
    targets[#targets + 1] = {bid, pk, zk, ak, tk, mine, h[2]}
  end
end

local out = {'ok'}
for _, t in ipairs(targets) do
  local delta = amount
  if t[6] then delta = amount - tonumber(t[6]) end
  redis.call('ZADD', t[3], expires, rid)
  redis.call('HSET', t[4], rid, ARGV[3])
  redis.call('INCRBY', t[5], int(delta))
  expire_period(t[7], t[3], t[4], t[5])
  out[#out + 1] = t[1]
  out[#out + 1] = t[2]
end
return out
"""

# ARGV: prefix, now_ms, request_id, actual, done_ttl_s, fired_at_iso, nthr, thr*nthr,
#       n, (budget id, period key)*n
SETTLE = _COMMON + """
local P = ARGV[1]
local now = ARGV[2]
local rid = ARGV[3]
local actual = ARGV[4]
local nthr = tonumber(ARGV[7])
local thresholds = {}
for i = 1, nthr do thresholds[i] = tonumber(ARGV[7 + i]) end
local base = 8 + nthr
local n = tonumber(ARGV[base])

if not redis.call('SET', P .. 'done:' .. rid, now, 'NX', 'EX', ARGV[5]) then
  return {'already'}
end

local out = {'ok'}
for i = 0, n - 1 do
  local bid, pk = ARGV[base + 1 + 2 * i], ARGV[base + 2 + 2 * i]
  local sfx = bid .. ':' .. pk
  local ak = P .. 'rsva:' .. sfx
  local mine = redis.call('HGET', ak, rid)
  if mine then
    redis.call('HDEL', ak, rid)
    redis.call('ZREM', P .. 'rsv:' .. sfx, rid)
    redis.call('DECRBY', P .. 'rsvt:' .. sfx, mine)
  end
  local h = redis.call('HMGET', P .. 'b:' .. bid, 'limit_micros', 'period', 'scope', 'scope_id',
                       'name', 'webhook_url')
  if h[1] then
    local sk = P .. 'spent:' .. sfx
    local spent = redis.call('INCRBY', sk, actual)
    expire_period(h[2], sk)
    local limit = tonumber(h[1])
    for _, thr in ipairs(thresholds) do
      if spent > 0 and spent * 100 >= limit * thr then
        local mk = P .. 'marks:' .. sfx
        if redis.call('HSETNX', mk, int(thr), now) == 1 then
          expire_period(h[2], mk)
          local rec = cjson.encode({
            budget_id = bid, budget_name = h[5] or '', scope = h[3], scope_id = h[4],
            period = h[2], period_key = pk, threshold = thr, spent_micros = int(spent),
            limit_micros = h[1], fired_at = ARGV[6], request_id = rid})
          redis.call('LPUSH', P .. 'alerts', rec)
          redis.call('LTRIM', P .. 'alerts', 0, 9999)
          out[#out + 1] = rec
          out[#out + 1] = h[6] or ''
        end
      end
    end
  end
end
return out
"""

# ARGV: prefix, request_id, n, (budget id, period key)*n
RELEASE = """
local P = ARGV[1]
local rid = ARGV[2]
local n = tonumber(ARGV[3])
local removed = 0
for i = 0, n - 1 do
  local sfx = ARGV[4 + 2 * i] .. ':' .. ARGV[5 + 2 * i]
  local ak = P .. 'rsva:' .. sfx
  local mine = redis.call('HGET', ak, rid)
  if mine then
    redis.call('HDEL', ak, rid)
    redis.call('ZREM', P .. 'rsv:' .. sfx, rid)
    redis.call('DECRBY', P .. 'rsvt:' .. sfx, mine)
    removed = removed + 1
  end
end
return removed
"""

# ARGV: prefix, now_ms, budget id, daily_pk, monthly_pk  ->  {hash fields..., spent, reserved, n}
USAGE = _COMMON + """
local P = ARGV[1]
local bid = ARGV[3]
local h = redis.call('HGETALL', P .. 'b:' .. bid)
if #h == 0 then return {} end
local period = redis.call('HGET', P .. 'b:' .. bid, 'period')
local pks = {daily = ARGV[4], monthly = ARGV[5], lifetime = 'lifetime'}
local sfx = bid .. ':' .. pks[period]
local zk, ak, tk = P .. 'rsv:' .. sfx, P .. 'rsva:' .. sfx, P .. 'rsvt:' .. sfx
prune(zk, ak, tk, ARGV[2])
local spent = tonumber(redis.call('GET', P .. 'spent:' .. sfx) or '0')
local reserved = tonumber(redis.call('GET', tk) or '0')
return {h, spent, reserved, redis.call('ZCARD', zk)}
"""

# ARGV: prefix, id, scope, scope_id, period, limit, name, webhook, now_iso
CREATE = """
local P = ARGV[1]
local bkey = P .. 'bkey:' .. ARGV[3] .. ':' .. ARGV[4] .. ':' .. ARGV[5]
local existing = redis.call('GET', bkey)
if existing then return {'exists', existing} end
redis.call('SET', bkey, ARGV[2])
redis.call('HSET', P .. 'b:' .. ARGV[2], 'id', ARGV[2], 'scope', ARGV[3], 'scope_id', ARGV[4],
           'period', ARGV[5], 'limit_micros', ARGV[6], 'name', ARGV[7], 'webhook_url', ARGV[8],
           'created_at', ARGV[9], 'updated_at', ARGV[9])
redis.call('SADD', P .. 'bidx:' .. ARGV[3] .. ':' .. ARGV[4], ARGV[2])
redis.call('SADD', P .. 'ball', ARGV[2])
return {'ok'}
"""

# ARGV: prefix, id, (field, value)*  ->  the updated hash, or {} if missing
UPDATE = """
local key = ARGV[1] .. 'b:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return {} end
for i = 3, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
return redis.call('HGETALL', key)
"""

# ARGV: prefix, id, daily_pk, monthly_pk  ->  1 deleted, 0 missing
DELETE = """
local P = ARGV[1]
local bid = ARGV[2]
local h = redis.call('HMGET', P .. 'b:' .. bid, 'scope', 'scope_id', 'period')
if not h[1] then return 0 end
local pks = {daily = ARGV[3], monthly = ARGV[4], lifetime = 'lifetime'}
local sfx = bid .. ':' .. pks[h[3]]
redis.call('DEL', P .. 'b:' .. bid, P .. 'bkey:' .. h[1] .. ':' .. h[2] .. ':' .. h[3],
           P .. 'spent:' .. sfx, P .. 'rsv:' .. sfx, P .. 'rsva:' .. sfx, P .. 'rsvt:' .. sfx,
           P .. 'marks:' .. sfx)
redis.call('SREM', P .. 'bidx:' .. h[1] .. ':' .. h[2], bid)
redis.call('SREM', P .. 'ball', bid)
return 1
"""

# ARGV: prefix, id, daily_pk, monthly_pk  ->  1 reset, 0 missing
RESET = """
local P = ARGV[1]
local bid = ARGV[2]
local period = redis.call('HGET', P .. 'b:' .. bid, 'period')
if not period then return 0 end
local pks = {daily = ARGV[3], monthly = ARGV[4], lifetime = 'lifetime'}
local sfx = bid .. ':' .. pks[period]
redis.call('DEL', P .. 'spent:' .. sfx, P .. 'marks:' .. sfx)
return 1
"""

# ARGV: prefix, scope or '', scope_id  ->  list of budget hashes
LIST = """
local P = ARGV[1]
local ids
if ARGV[2] == '' then
  ids = redis.call('SMEMBERS', P .. 'ball')
else
  ids = redis.call('SMEMBERS', P .. 'bidx:' .. ARGV[2] .. ':' .. ARGV[3])
end
local out = {}
for _, bid in ipairs(ids) do
  local h = redis.call('HGETALL', P .. 'b:' .. bid)
  if #h > 0 then out[#out + 1] = h end
end
return out
"""

# --- rate limiter ----------------------------------------------------------------------

# ARGV: key base, now_ms, window_ms, rpm (-1: none), tpm (-1: none), tokens, lease
# -> {allowed, count, used, retry_ms, reset_requests_ms, reset_tokens_ms}
RATE_ACQUIRE = """
local function int(x) return string.format('%d', x) end
local base = ARGV[1]
local now = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local rpm = tonumber(ARGV[4])
local tpm = tonumber(ARGV[5])
local tokens = tonumber(ARGV[6])
local lease = ARGV[7]
local rk, tk, wk, sk = base .. ':r', base .. ':t', base .. ':tw', base .. ':ts'
local cutoff = now - window

redis.call('ZREMRANGEBYSCORE', rk, '-inf', int(cutoff))
while true do
  local old = redis.call('ZRANGEBYSCORE', tk, '-inf', int(cutoff), 'LIMIT', 0, 500)
  if #old == 0 then break end
  local ws = redis.call('HMGET', wk, unpack(old))
  local total = 0
  for i = 1, #old do if ws[i] then total = total + tonumber(ws[i]) end end
  redis.call('ZREM', tk, unpack(old))
  redis.call('HDEL', wk, unpack(old))
  if total ~= 0 then redis.call('DECRBY', sk, int(total)) end
  if #old < 500 then break end
end

local count = redis.call('ZCARD', rk)
local used = tonumber(redis.call('GET', sk) or '0')

local function reset_of(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) + window - now end
  return 0
end

-- a retry of a request already admitted (same lease) is admitted again, not twice
local seen_r = rpm >= 0 and redis.call('ZSCORE', rk, lease)
local seen_t = tpm >= 0 and tokens > 0 and redis.call('ZSCORE', tk, lease)
if seen_r or seen_t then
  return {1, count, used, 0, reset_of(rk), reset_of(tk)}
end

local allowed, retry = 1, 0
if rpm >= 0 and count + 1 > rpm then
  allowed = 0
  if rpm == 0 then
    retry = -1
  else
    local e = redis.call('ZRANGE', rk, count - rpm, count - rpm, 'WITHSCORES')
    retry = tonumber(e[2]) + window - now
  end
end
if tpm >= 0 and used + tokens > tpm then
  allowed = 0
  local need, freed, wait, start = used + tokens - tpm, 0, -1, 0
  while wait < 0 do
    local chunk = redis.call('ZRANGE', tk, start, start + 499, 'WITHSCORES')
    if #chunk == 0 then break end
    local members = {}
    for i = 1, #chunk, 2 do members[#members + 1] = chunk[i] end
    local ws = redis.call('HMGET', wk, unpack(members))
    for j = 1, #members do
      freed = freed + tonumber(ws[j] or '0')
      if freed >= need then
        wait = tonumber(chunk[2 * j]) + window - now
        break
      end
    end
    start = start + 500
  end
  if wait > retry then retry = wait end
end

if allowed == 1 then
  local ttl = int(window + 1000)
  if rpm >= 0 then
    redis.call('ZADD', rk, int(now), lease)
    redis.call('PEXPIRE', rk, ttl)
    count = count + 1
  end
  if tpm >= 0 and tokens > 0 then
    redis.call('ZADD', tk, int(now), lease)
    redis.call('HSET', wk, lease, int(tokens))
    redis.call('INCRBY', sk, int(tokens))
    redis.call('PEXPIRE', tk, ttl)
    redis.call('PEXPIRE', wk, ttl)
    redis.call('PEXPIRE', sk, ttl)
    used = used + tokens
  end
end
return {allowed, count, used, retry, reset_of(rk), reset_of(tk)}
"""

# ARGV: key base, lease, actual tokens, now_ms, window_ms
RATE_ADJUST = """
local function int(x) return string.format('%d', x) end
local base = ARGV[1]
local lease = ARGV[2]
local actual = tonumber(ARGV[3])
local tk, wk, sk = base .. ':t', base .. ':tw', base .. ':ts'
local ttl = int(tonumber(ARGV[5]) + 1000)
if redis.call('ZSCORE', tk, lease) then
  local old = tonumber(redis.call('HGET', wk, lease) or '0')
  redis.call('HSET', wk, lease, int(actual))
  redis.call('INCRBY', sk, int(actual - old))
elseif actual > 0 then
  redis.call('ZADD', tk, ARGV[4], lease)
  redis.call('HSET', wk, lease, int(actual))
  redis.call('INCRBY', sk, int(actual))
  redis.call('PEXPIRE', tk, ttl)
  redis.call('PEXPIRE', wk, ttl)
  redis.call('PEXPIRE', sk, ttl)
end
return 1
"""
