-- Authenticate an API key for the account routes (/v1/key, /v1/usage) in one round trip, with
-- the same check admission runs (lib/key_check.lua).
--
-- KEYS[1] {acct:ID}:key   key record (hash)
-- ARGV: key_hash
--
-- Returns {verdict} for a refused key, or {VERDICT.ADMITTED, field, value, ...} (the record).

local record = redis.call('HMGET', KEYS[1], 'key_hash', 'status', 'expires_at', 'models')
local refused = key_refusal(record, ARGV[1], '', redis_now_ms())
if refused then return {refused} end
local reply = {VERDICT.ADMITTED}
for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do
  reply[#reply + 1] = item
end
return reply
