-- Settle one finished request at every level: charge its real tokens to the organization and
-- to the key's spend this period, count usage, append the ledger event, write the generation
-- record, and raise any spend alert the charge crosses. Idempotent per billing id: a second
-- call for the same id changes nothing.
--
-- A balance never goes below zero. The charge is capped at the request's hold (or, when its
-- lease expired and the hold went back to the balance, at what the balance still has). Had
-- the cost been larger, which means admission's estimate was not an upper bound, the
-- uncharged rest is written to the ledger as a `hold_exceeded` event for the operator
-- (reconcile reports each one).
--
-- Alerts are raised here, in the one script that moves spend, so a burst of settlements across
-- ingress replicas crosses each threshold in exactly one of them: the balance alert when the
-- organization's committed credit (balance + hold) goes from at or above the threshold to
-- below it, the cap alert when the key's spend this period reaches the percentage of its cap.
--
-- KEYS[1]  {acct:O}:org           balance_micros, hold_micros, spent_micros
-- KEYS[2]  {acct:O}:key:K         hold_micros, spent_micros, cap_micros, cap_period, period_id,
--                                 period_spent_micros, and the key's billed token totals
--                                 (prompt_tokens, completion_tokens, cached_tokens)
-- KEYS[3]  {acct:O}:usage         counters (hash): "<YYYY-MM-DD>|<key>|<model>|<metric>" -> integer
--                                 (requests, prompt_tokens, completion_tokens, cost_micros, and
--                                 cached_tokens once there are any)
-- KEYS[4]  {acct:O}:ledger        usage events (stream)
-- KEYS[5]  {acct:O}:settled:<billing id>   idempotency marker
-- KEYS[6]  {acct:O}:buckets:K     rate-limit state: unused reserved tokens go back to the TPM bucket
-- KEYS[7]  {acct:O}:inflight:K    the request's concurrency slot is released
-- KEYS[8]  {acct:O}:holds         the request's hold; absent when its lease expired and admit.lua
--                                 already gave it back, in which case only the cost is taken
-- KEYS[9]  {acct:O}:gen:<response id>   the generation record (expires after gen_ttl_s)
-- KEYS[10] {acct:O}:alerts        alert settings: balance_below_micros, cap_percent
-- KEYS[11] {acct:O}:outbox        alerts raised, for the deliverer (alerts.py)
-- KEYS[12] {acct:O}:leases        the request's lease ("<key id>|<billing id>") is released
-- ARGV: billing_id, key_id, model, prompt_tokens, completion_tokens, cost_micros,
--       hold_micros, status, started_at_ms, marker_ttl_s, unused_tokens, reserved_tokens
--       (what admission reserved: the prompt estimate plus the output budget; in the ledger
--       beside the hold, so each event shows the estimate bounded what was used),
--       org_id, generation (JSON: response_id, served_by, cached_tokens, ttft_ms, latency_ms,
--       stream, user), gen_ttl_s, now_ms ('' = Redis TIME)
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
local org_id = ARGV[13]

if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', marker_ttl) then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0'), 0}
end

local now_ms
if ARGV[16] and ARGV[16] ~= '' then
  now_ms = tonumber(ARGV[16])
else
  now_ms = redis_now_ms()
end
local now_s = math.floor(now_ms / 1000)
local day = utc_day(now_s)

local org = redis.call('HMGET', KEYS[1], 'balance_micros', 'hold_micros')
local committed_before = tonumber(org[1] or '0') + tonumber(org[2] or '0')

if hold ~= 0 and redis.call('HDEL', KEYS[8], billing_id) == 0 then
  hold = 0
end
local charged = cost
if hold ~= 0 then
  charged = math.min(cost, hold)
else
  -- no hold left to take it from: only what the balance has
  charged = math.min(cost, math.max(tonumber(org[1] or '0'), 0))
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance_micros', hold - charged)
if hold ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'hold_micros', -hold)
  redis.call('HINCRBY', KEYS[2], 'hold_micros', -hold)
end
redis.call('HINCRBY', KEYS[1], 'spent_micros', charged)
redis.call('HINCRBY', KEYS[2], 'spent_micros', charged)

-- The key's spend this period (a settlement after a period boundary starts the new period).
local key = redis.call('HMGET', KEYS[2], 'cap_micros', 'cap_period', 'period_id', 'period_spent_micros')
local period = cap_period_id(key[2] or '', now_s)
local period_before = 0
if key[3] == period then
  period_before = tonumber(key[4] or '0')
  redis.call('HINCRBY', KEYS[2], 'period_spent_micros', charged)
else
  redis.call('HSET', KEYS[2], 'period_id', period, 'period_spent_micros', charged)
end

redis.call('ZREM', KEYS[7], billing_id)
redis.call('ZREM', KEYS[12], key_id .. '|' .. billing_id)
if unused_tokens > 0 and redis.call('HEXISTS', KEYS[6], 'tok_level') == 1 then
  -- levels are scaled by SCALE (prepended by scripts.lua_source); the next admission caps at capacity
  redis.call('HINCRBY', KEYS[6], 'tok_level', unused_tokens * SCALE)
end

if status == 'rejected' and charged == 0 then
  -- the engine refused the request as invalid: released, but not a request of the key's usage
  return {1, balance, 0}
end

local field = day .. '|' .. key_id .. '|' .. model .. '|'
redis.call('HINCRBY', KEYS[3], field .. 'requests', 1)
redis.call('HINCRBY', KEYS[3], field .. 'prompt_tokens', prompt_tokens)
redis.call('HINCRBY', KEYS[3], field .. 'completion_tokens', completion_tokens)
redis.call('HINCRBY', KEYS[3], field .. 'cost_micros', charged)
local gen = cjson.decode(ARGV[14])
if gen.cached_tokens > 0 then  -- prompt tokens from the engine's prefix cache (kept sparse)
  redis.call('HINCRBY', KEYS[3], field .. 'cached_tokens', gen.cached_tokens)
  redis.call('HINCRBY', KEYS[2], 'cached_tokens', gen.cached_tokens)
end
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', prompt_tokens)
redis.call('HINCRBY', KEYS[2], 'completion_tokens', completion_tokens)

redis.call('XADD', KEYS[4], '*',
  'request_id', billing_id, 'response_id', gen.response_id, 'org_id', org_id, 'key_id', key_id,
  'model', model, 'served_by', gen.served_by,
  'prompt_tokens', prompt_tokens, 'completion_tokens', completion_tokens, 'cached_tokens', gen.cached_tokens,
  'cost_micros', charged, 'status', status,
  'hold_micros', admitted_hold, 'reserved_tokens', reserved_tokens,
  'started_at_ms', started_at_ms, 'settled_at_ms', now_ms, 'day', day)
if charged < cost then
  redis.call('XADD', KEYS[4], '*',
    'event', 'hold_exceeded', 'request_id', billing_id, 'org_id', org_id, 'key_id', key_id, 'model', model,
    'cost_micros', cost, 'charged_micros', charged, 'hold_micros', hold,
    'uncharged_micros', cost - charged, 'settled_at_ms', now_ms, 'day', day)
end

redis.call('HSET', KEYS[9],
  'id', gen.response_id, 'request_id', billing_id, 'org_id', org_id, 'key_id', key_id, 'model', model,
  'served_by', gen.served_by, 'status', status, 'prompt_tokens', prompt_tokens,
  'completion_tokens', completion_tokens, 'cached_tokens', gen.cached_tokens, 'cost_micros', charged,
  'created', math.floor(tonumber(started_at_ms) / 1000), 'ttft_ms', gen.ttft_ms, 'latency_ms', gen.latency_ms,
  'stream', gen.stream, 'user', gen.user)
redis.call('EXPIRE', KEYS[9], tonumber(ARGV[15]))

if charged > 0 then
  local alerts = redis.call('HMGET', KEYS[10], 'balance_below_micros', 'cap_percent')
  local below = tonumber(alerts[1] or '')
  local committed_after = committed_before - charged
  if below and committed_before >= below and committed_after < below then
    redis.call('XADD', KEYS[11], '*',
      'delivery_id', 'dlv_' .. billing_id .. '_balance_below', 'kind', 'balance_below', 'org_id', org_id,
      'key_id', '', 'threshold_micros', below, 'value_micros', committed_after, 'request_id', billing_id,
      'raised_at_ms', now_ms)
  end
  local percent, cap = tonumber(alerts[2] or ''), tonumber(key[1] or '')
  local period_after = period_before + charged
  -- integers: cap (at most 10^12 micro-USD) x 100 stays exact in a Lua double
  if percent and cap and period_before * 100 < cap * percent and period_after * 100 >= cap * percent then
    redis.call('XADD', KEYS[11], '*',
      'delivery_id', 'dlv_' .. billing_id .. '_cap_percent', 'kind', 'cap_percent', 'org_id', org_id,
      'key_id', key_id, 'threshold_percent', percent, 'value_micros', period_after, 'cap_micros', cap,
      'request_id', billing_id, 'raised_at_ms', now_ms)
  end
end

return {1, balance, charged}
