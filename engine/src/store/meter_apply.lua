-- Applies one write-behind batch of one user, atomically and at most once per (writer, seq).
--
-- KEYS: 1 speech buckets (hash minute -> ms), 2 speech minutes (zset minute scored by minute),
--       3 month usage (hash yyyymm -> ms), 4 writer seqs (hash writer -> seq),
--       5 writer seen (zset writer scored by last apply ms), 6 idempotency keys (zset key scored by ms)
-- ARGV: 1 writer (32 hex), 2 seq, 3 now ms, 4 first kept minute, 5 cutoff ms (now - retention),
--       6 first kept month (yyyymm), 7 ttl s (per-user keys), 8 month ttl s,
--       9 idempotency keys' cutoff ms (now - their longer retention: the backfill lookback + 2 days),
--       then the plain delta, then the keyed deltas:
--       delta = nb, nb x (minute, ms), nm, nm x (yyyymm, ms)
--       keyed = nk, nk x (key, delta)
-- Returns {0} when (writer, seq) was already applied (nothing changes), else {1, rejected keys...}:
-- keyed deltas whose key was already metered within the retention are skipped.
-- All ms values stay strings so HINCRBY sees exact 64-bit integers (Lua numbers are doubles).

local speech, minutes, months, writers, seen, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local writer, seq, now_ms = ARGV[1], ARGV[2], ARGV[3]
local first_minute = tonumber(ARGV[4])
local cutoff_ms = ARGV[5]
local first_month = tonumber(ARGV[6])

local applied = redis.call('HGET', writers, writer)
if applied and tonumber(applied) >= tonumber(seq) then
  return {0}
end

local function hdel_all(key, fields)
  for i = 1, #fields, 500 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 499, #fields)))
  end
end

-- Prune what fell out of the retention, relative to the caller's now (TTLs are only a backstop).
local stale = redis.call('ZRANGEBYSCORE', minutes, '-inf', '(' .. first_minute)
if #stale > 0 then
  hdel_all(speech, stale)
  redis.call('ZREMRANGEBYSCORE', minutes, '-inf', '(' .. first_minute)
end
local stale_writers = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. cutoff_ms)
if #stale_writers > 0 then
  hdel_all(writers, stale_writers)
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. cutoff_ms)
end
redis.call('ZREMRANGEBYSCORE', idem, '-inf', '(' .. ARGV[9])
local old_months = {}
for _, m in ipairs(redis.call('HKEYS', months)) do
  if tonumber(m) < first_month then
    old_months[#old_months + 1] = m
  end
end
if #old_months > 0 then
  hdel_all(months, old_months)
end

local pos = 10
local function delta(apply)
  local nb = tonumber(ARGV[pos])
  pos = pos + 1
  for _ = 1, nb do
    local minute, ms = ARGV[pos], ARGV[pos + 1]
    pos = pos + 2
    if apply and tonumber(minute) >= first_minute then
      redis.call('HINCRBY', speech, minute, ms)
      redis.call('ZADD', minutes, minute, minute)
    end
  end
  local nm = tonumber(ARGV[pos])
  pos = pos + 1
  for _ = 1, nm do
    if apply then
      redis.call('HINCRBY', months, ARGV[pos], ARGV[pos + 1])
    end
    pos = pos + 2
  end
end

delta(true)
local result = {1}
local nk = tonumber(ARGV[pos])
pos = pos + 1
for _ = 1, nk do
  local key = ARGV[pos]
  pos = pos + 1
  if redis.call('ZSCORE', idem, key) then
    result[#result + 1] = key
    delta(false)
  else
    redis.call('ZADD', idem, now_ms, key)
    delta(true)
  end
end

redis.call('HSET', writers, writer, seq)
redis.call('ZADD', seen, now_ms, writer)
for _, key in ipairs({speech, minutes, writers, seen, idem}) do
  redis.call('EXPIRE', key, ARGV[7])
end
redis.call('EXPIRE', months, ARGV[8])
return result
