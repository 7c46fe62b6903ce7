-- Settle one finished request: charge its real tokens, count usage, append to the ledger.
-- Idempotent per billing id: a second call for the same id changes nothing.
--
-- A balance never goes below zero. The charge is capped at the request's hold (or, when its
-- lease expired and the hold went back to the balance, at what the balance still has). Had
-- the cost been larger, which means admission's estimate was not an upper bound, the
-- uncharged rest is written to the ledger as a `hold_exceeded` event for the operator
-- (reconcile reports each one).
--
-- KEYS[1] {acct:ID}:key       key record (hash): balance_micros, hold_micros, spent_micros
-- KEYS[2] {acct:ID}:usage     counters (hash): "<YYYY-MM-DD>|<model>|<metric>" -> integer
-- KEYS[3] {acct:ID}:ledger    usage events (stream)
-- KEYS[4] {acct:ID}:settled:<billing id>   idempotency marker
-- KEYS[5] {acct:ID}:buckets   rate-limit state: unused reserved tokens go back to the TPM bucket
-- KEYS[6] {acct:ID}:inflight  the request's concurrency slot is released
-- KEYS[7] {acct:ID}:holds     the request's hold; absent when its lease expired and admit.lua
--                             already gave it back, in which case only the cost is taken
-- ARGV: billing_id, key_id, model, prompt_tokens, completion_tokens, cost_micros,
--       hold_micros, status, started_at_ms, marker_ttl_s, unused_tokens, reserved_tokens
--       (what admission reserved: the prompt estimate plus the output budget; in the ledger
--       beside the hold, so each event shows the estimate bounded what was used)
--
-- Returns {settled (1 or 0 when already settled), balance_micros, charged_micros}

local billing_id, key_id, model = ARGV[1], ARGV[2], ARGV[3]
local prompt_tokens = tonumber(ARGV[4])
local completion_tokens = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local hold = tonumber(ARGV[7])
local admitted_hold = hold
local status, started_at_ms, marker_ttl = ARGV[8], ARGV[9], tonumber(ARGV[10])
local unused_tokens = tonumber(ARGV[11] or '0')
local reserved_tokens = ARGV[12] or ''

if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', marker_ttl) then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0'), 0}
end

local now = redis.call('TIME')
local now_s = tonumber(now[1])
local now_ms = now_s * 1000 + math.floor(tonumber(now[2]) / 1000)

-- UTC calendar day of now_s (days-from-civil inverse; valid for the proleptic Gregorian calendar)
local z = math.floor(now_s / 86400) + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local d = doy - math.floor((153 * mp + 2) / 5) + 1
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400 + (m <= 2 and 1 or 0)
local day = string.format('%04d-%02d-%02d', y, m, d)

if hold ~= 0 and redis.call('HDEL', KEYS[7], billing_id) == 0 then
  hold = 0
end
local charged = cost
if hold ~= 0 then
  charged = math.min(cost, hold)
else
  -- no hold left to take it from: only what the balance has
  local available = tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0')
  charged = math.min(cost, math.max(available, 0))
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance_micros', hold - charged)
if hold ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'hold_micros', -hold)
end
redis.call('HINCRBY', KEYS[1], 'spent_micros', charged)
redis.call('ZREM', KEYS[6], billing_id)
if unused_tokens > 0 and redis.call('HEXISTS', KEYS[5], 'tok_level') == 1 then
  -- levels are scaled by SCALE (prepended by scripts.lua_source); the next admission caps at capacity
  redis.call('HINCRBY', KEYS[5], 'tok_level', unused_tokens * SCALE)
end

if status == 'rejected' and charged == 0 then
  -- the engine refused the request as invalid: released, but not a request of the key's usage
  return {1, balance, 0}
end

local field = day .. '|' .. model .. '|'
redis.call('HINCRBY', KEYS[2], field .. 'requests', 1)
redis.call('HINCRBY', KEYS[2], field .. 'prompt_tokens', prompt_tokens)
redis.call('HINCRBY', KEYS[2], field .. 'completion_tokens', completion_tokens)
redis.call('HINCRBY', KEYS[2], field .. 'cost_micros', charged)

redis.call('XADD', KEYS[3], '*',
  'request_id', billing_id, 'key_id', key_id, 'model', model,
  'prompt_tokens', prompt_tokens, 'completion_tokens', completion_tokens,
  'cost_micros', charged, 'status', status,
  'hold_micros', admitted_hold, 'reserved_tokens', reserved_tokens,
  'started_at_ms', started_at_ms, 'settled_at_ms', now_ms, 'day', day)
if charged < cost then
  redis.call('XADD', KEYS[3], '*',
    'event', 'hold_exceeded', 'request_id', billing_id, 'key_id', key_id, 'model', model,
    'cost_micros', cost, 'charged_micros', charged, 'hold_micros', hold,
    'uncharged_micros', cost - charged, 'settled_at_ms', now_ms, 'day', day)
end

return {1, balance, charged}
