-- Record what became of one alert of an organization's outbox: the time of its next attempt,
-- or its final record (delivered or failed) and its removal from the outbox.
--
-- Nothing is written unless the alert is still in the outbox: an alert that another
-- deliverer (whose lease ran out) or the removal of the alert settings has already settled
-- is never recorded twice, and no attempt state is left behind for it.
--
-- KEYS[1] {acct:O}:outbox            stream: alerts not yet delivered
-- KEYS[2] {acct:O}:outbox_attempts   hash: delivery id -> {"attempts":n,"next_at_ms":t}
-- KEYS[3] {acct:O}:deliveries        stream: what became of each alert (capped)
-- ARGV[1] the alert's outbox entry id
-- ARGV[2] its delivery id
-- ARGV[3] 'retry' | 'delivered' | 'failed'
-- ARGV[4] POSTs made for this record (1; 0 when the alert is dropped unsent)
-- ARGV[5] the HTTP status of this POST ('' for none)
-- ARGV[6] why it failed ('' when delivered or retried)
-- ARGV[7] what went wrong on the network ('' for none)
-- ARGV[8] retry: ms until the next attempt (Redis's clock)
-- ARGV[9] the alert's kind
-- ARGV[10] the approximate cap of the deliveries stream
--
-- Returns {1, attempts so far} when written, {0, 0} when the alert was no longer in the outbox.

if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return {0, 0}
end

local attempts = tonumber(ARGV[4])
local state = redis.call('HGET', KEYS[2], ARGV[2])
if state then
  attempts = attempts + (tonumber(cjson.decode(state)['attempts']) or 0)
end

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

if ARGV[3] == 'retry' then
  local next_at_ms = now_ms + tonumber(ARGV[8])
  redis.call('HSET', KEYS[2], ARGV[2], string.format('{"attempts":%d,"next_at_ms":%d}', attempts, next_at_ms))
  return {1, attempts}
end

redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*',
  'delivery_id', ARGV[2], 'kind', ARGV[9], 'status', ARGV[3], 'attempts', attempts,
  'http_status', ARGV[5], 'reason', ARGV[6], 'error', ARGV[7], 'at_ms', now_ms)
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
return {1, attempts}
