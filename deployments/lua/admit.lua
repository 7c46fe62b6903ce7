-- Authenticate and admit one request in one round trip: the key (secret, status, expiry,
-- model permission), its concurrency, requests/min and tokens/min, then the credit hold at
-- every level at once: the organization's balance and the key's spend cap for this period.
-- Nothing changes unless every check passes.
--
-- Rate limits are token buckets refilled continuously: capacity = the per-minute limit,
-- refill = limit per 60 000 ms. Levels are stored scaled by SCALE (60 000) so all arithmetic
-- is exact integers (refill per ms = the limit itself).
--
-- A spend cap counts what the key spent this period plus everything it holds now, so a burst
-- admitted across ingress replicas can never pass it, as the balance check never lets one
-- pass the organization's credit.
--
-- KEYS[1] {acct:O}:org          the organization: balance_micros, hold_micros
-- KEYS[2] {acct:O}:key:K        the key record: key_hash, prev_key_hash, prev_valid_until_ms,
--                               status, expires_at, models, limits (JSON), hold_micros,
--                               cap_micros, cap_period, period_id, period_spent_micros
-- KEYS[3] {acct:O}:buckets:K    rate-limit state (hash): req_level, req_ts, tok_level, tok_ts
-- KEYS[4] {acct:O}:inflight:K   admitted, unsettled requests (zset: billing id -> lease expiry ms)
-- KEYS[5] {acct:O}:holds        the credit each of those holds (hash: billing id -> micro-USD)
-- KEYS[6] {acct:O}:leases       every key's admitted, unsettled requests ("<key id>|<billing id>"
--                               -> lease expiry ms), so any key's admission frees the lapsed
--                               ones of the whole organization. Freeing one also writes that
--                               key's record and in-flight set, named from the organization's
--                               own hash tag: the same Redis Cluster slot as every KEYS here.
-- ARGV: billing_id, key_hash, models (the model asked for, then its fallbacks, separated by
--       spaces), default_rpm, default_tpm, default_max_concurrency, tokens, hold_micros (one per
--       model, separated by spaces), lease_ms, now_ms ('' = Redis TIME),
--       default_max_tokens_per_request, output_tokens (prompts x n x max output)
--
-- Returns {verdict, retry_after_ms, rpm, rpm_remaining, rpm_reset_ms,
--          tpm, tpm_remaining, tpm_reset_ms, max_concurrency, allowed}; allowed (past the key
-- checks): one '1' or '0' per model, whether the key may use it; then the key's and the
-- organization's fair-share tiers ('' for none).
-- VERDICT.<NAME>, SCALE, key_refusal, redis_now_ms and cap_period_id are not defined here:
-- scripts.py (`lua_source`) prepends them, from its `Verdict` table (the one list of admission
-- outcomes; retry_after_ms carries the per-request bound for OVER_REQUEST_BOUND) and lib/*.lua.

local billing_id, key_hash, model = ARGV[1], ARGV[2], ARGV[3]
local tokens, lease_ms = tonumber(ARGV[7]), tonumber(ARGV[9])
local now
if ARGV[10] ~= '' then
  now = tonumber(ARGV[10])
else
  now = redis_now_ms()
end

local record = redis.call('HMGET', KEYS[2], 'key_hash', 'status', 'expires_at', 'models',
  'prev_key_hash', 'prev_valid_until_ms', 'limits', 'hold_micros', 'cap_micros', 'cap_period', 'period_id',
  'period_spent_micros', 'tier')
-- The candidates (the model, then its fallbacks) the key may use, and the hold: the dearest of
-- their holds, so whichever of them serves, its cost is covered.
local holds = {}
for amount in string.gmatch(ARGV[8], '%S+') do holds[#holds + 1] = tonumber(amount) end
local candidates = {}
for id in string.gmatch(model, '%S+') do candidates[#candidates + 1] = id end
if #candidates == 0 then candidates[1] = '' end
local allowed, refused, hold = '', nil, -1
for index, id in ipairs(candidates) do
  local verdict = key_refusal(record, key_hash, id, now)
  if verdict == nil then
    allowed = allowed .. '1'
    hold = math.max(hold, holds[index] or holds[1])
  elseif verdict == VERDICT.MODEL_NOT_ALLOWED then
    allowed = allowed .. '0'
    refused = verdict
  else
    return {verdict, 0, 0, 0, 0, 0, 0, 0, 0}  -- the key itself is refused, whatever the model
  end
end
if hold < 0 then return {refused, 0, 0, 0, 0, 0, 0, 0, 0} end

-- The key's own limits, else the operator's defaults.
local own = (record[7] and record[7] ~= '') and cjson.decode(record[7]) or {}
local function limit(name, default)
  local value = own[name]
  if type(value) == 'number' and value > 0 then return value end
  return tonumber(default)
end
local rpm, tpm, max_conc = limit('rpm', ARGV[4]), limit('tpm', ARGV[5]), limit('max_concurrency', ARGV[6])
local max_per_request = limit('max_tokens_per_request', ARGV[11])
if tonumber(ARGV[12]) > max_per_request then return {VERDICT.OVER_REQUEST_BOUND, max_per_request, 0, 0, 0, 0, 0, 0, 0} end

local state = redis.call('HMGET', KEYS[3], 'req_level', 'req_ts', 'tok_level', 'tok_ts')

local function level(lim, stored, ts)
  local cap = lim * SCALE
  if not stored then return cap end
  local lvl = tonumber(stored) + math.max(0, now - tonumber(ts)) * lim
  if lvl > cap then lvl = cap end
  return lvl
end

local req_level = level(rpm, state[1], state[2])
local tok_level = level(tpm, state[3], state[4])
local req_cost, tok_cost = SCALE, tokens * SCALE

local function ceil_div(a, b) return math.floor((a + b - 1) / b) end
local function report(verdict, retry_ms, rl, tl)
  return {verdict, retry_ms,
          rpm, math.floor(rl / SCALE), ceil_div(rpm * SCALE - rl, rpm),
          tpm, math.floor(tl / SCALE), ceil_div(tpm * SCALE - tl, tpm),
          max_conc, allowed, record[13] or '', redis.call('HGET', KEYS[1], 'tier') or ''}
end

local key_hold = tonumber(record[8] or '0')
-- Admissions whose lease ran out were never settled (their ingress died): free their slot
-- and give their hold back, to the organization and to their key's cap, whichever key of the
-- organization they were (its credit is shared: one key's lapsed holds must not block the
-- others). At most REAP_BATCH per admission, so one call stays short. A settlement that still
-- arrives later charges without a hold.
local tag = string.sub(KEYS[1], 1, #KEYS[1] - #'org')  -- '{acct:O}:'
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, REAP_BATCH)
for _, member in ipairs(lapsed) do
  local bar = string.find(member, '|', 1, true)
  local owner, id = string.sub(member, 1, bar - 1), string.sub(member, bar + 1)
  local refund = tonumber(redis.call('HGET', KEYS[5], id) or '0')
  redis.call('HDEL', KEYS[5], id)
  redis.call('ZREM', KEYS[6], member)
  redis.call('ZREM', tag .. 'inflight:' .. owner, id)
  if refund > 0 then
    redis.call('HINCRBY', KEYS[1], 'balance_micros', refund)
    redis.call('HINCRBY', KEYS[1], 'hold_micros', -refund)
    local left = redis.call('HINCRBY', tag .. 'key:' .. owner, 'hold_micros', -refund)
    if tag .. 'key:' .. owner == KEYS[2] then key_hold = left end
  end
end
if redis.call('ZCARD', KEYS[4]) >= max_conc then
  return report(VERDICT.CONCURRENCY, 1000, req_level, tok_level)
end
if req_level < req_cost then
  return report(VERDICT.REQUESTS_PER_MINUTE, ceil_div(req_cost - req_level, rpm), req_level, tok_level)
end
if tokens > tpm then
  return report(VERDICT.LARGER_THAN_TPM, 0, req_level, tok_level)
end
if tok_level < tok_cost then
  return report(VERDICT.TOKENS_PER_MINUTE, ceil_div(tok_cost - tok_level, tpm), req_level, tok_level)
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0')
if balance < hold or balance <= 0 then
  return report(VERDICT.INSUFFICIENT_CREDIT, 0, req_level, tok_level)
end
local cap = tonumber(record[9] or '')
if cap then
  local spent = 0
  if record[11] == cap_period_id(record[10] or '', math.floor(now / 1000)) then
    spent = tonumber(record[12] or '0')
  end
  if spent + key_hold + hold > cap or spent + key_hold >= cap then
    return report(VERDICT.SPEND_CAP, 0, req_level, tok_level)
  end
end

req_level = req_level - req_cost
tok_level = tok_level - tok_cost
redis.call('HSET', KEYS[3], 'req_level', req_level, 'req_ts', now, 'tok_level', tok_level, 'tok_ts', now)
redis.call('PEXPIRE', KEYS[3], 120000)
redis.call('ZADD', KEYS[4], now + lease_ms, billing_id)
redis.call('ZADD', KEYS[6], now + lease_ms, string.sub(KEYS[2], #tag + #'key:' + 1) .. '|' .. billing_id)
if hold > 0 then  -- (Redis refuses "-0" as an increment)
  redis.call('HINCRBY', KEYS[1], 'balance_micros', -hold)
  redis.call('HINCRBY', KEYS[1], 'hold_micros', hold)
  redis.call('HINCRBY', KEYS[2], 'hold_micros', hold)
  redis.call('HSET', KEYS[5], billing_id, hold)
end
return report(VERDICT.ADMITTED, 0, req_level, tok_level)
