-- Admit one request in one round trip: concurrency, requests/min, tokens/min, credit hold.
-- Nothing changes unless every check passes.
--
-- Rate limits are token buckets refilled continuously: capacity = the per-minute limit,
-- refill = limit per 60 000 ms. Levels are stored scaled by 60 000 so all arithmetic is
-- exact integers (refill per ms = the limit itself).
--
-- KEYS[1] {acct:ID}:key        key record (hash): balance_micros, hold_micros
-- KEYS[2] {acct:ID}:buckets    rate-limit state (hash): req_level, req_ts, tok_level, tok_ts
-- KEYS[3] {acct:ID}:inflight   admitted, unsettled requests (zset: billing id -> lease expiry ms)
-- ARGV: billing_id, rpm, tpm, max_concurrency, tokens, hold_micros, lease_ms, now_ms ('' = Redis TIME)
--
-- Returns {verdict, retry_after_ms, rpm_remaining, rpm_reset_ms, tpm_remaining, tpm_reset_ms}
-- verdict: 0 admitted, 1 requests/min, 2 tokens/min, 3 larger than the whole TPM,
--          4 concurrency, 5 insufficient credit

local billing_id = ARGV[1]
local rpm, tpm, max_conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, hold, lease_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now
if ARGV[8] ~= '' then
  now = tonumber(ARGV[8])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local SCALE = 60000

local state = redis.call('HMGET', KEYS[2], 'req_level', 'req_ts', 'tok_level', 'tok_ts')

local function level(limit, stored, ts)
  local cap = limit * SCALE
  if not stored then return cap end
  local lvl = tonumber(stored) + math.max(0, now - tonumber(ts)) * limit
  if lvl > cap then lvl = cap end
  return lvl
end

local req_level = level(rpm, state[1], state[2])
local tok_level = level(tpm, state[3], state[4])
local req_cost, tok_cost = SCALE, tokens * SCALE

local function ceil_div(a, b) return math.floor((a + b - 1) / b) end
local function report(verdict, retry_ms, rl, tl)
  return {verdict, retry_ms,
          math.floor(rl / SCALE), ceil_div(rpm * SCALE - rl, rpm),
          math.floor(tl / SCALE), ceil_div(tpm * SCALE - tl, tpm)}
end

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= max_conc then
  return report(4, 1000, req_level, tok_level)
end
if req_level < req_cost then
  return report(1, ceil_div(req_cost - req_level, rpm), req_level, tok_level)
end
if tokens > tpm then
  return report(3, 0, req_level, tok_level)
end
if tok_level < tok_cost then
  return report(2, ceil_div(tok_cost - tok_level, tpm), req_level, tok_level)
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0')
if balance < hold or balance <= 0 then
  return report(5, 0, req_level, tok_level)
end

req_level = req_level - req_cost
tok_level = tok_level - tok_cost
redis.call('HSET', KEYS[2], 'req_level', req_level, 'req_ts', now, 'tok_level', tok_level, 'tok_ts', now)
redis.call('PEXPIRE', KEYS[2], 120000)
redis.call('ZADD', KEYS[3], now + lease_ms, billing_id)
if hold > 0 then  -- (Redis refuses "-0" as an increment)
  redis.call('HINCRBY', KEYS[1], 'balance_micros', -hold)
  redis.call('HINCRBY', KEYS[1], 'hold_micros', hold)
end
return report(0, 0, req_level, tok_level)
