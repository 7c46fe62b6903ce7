-- Authenticate an API key for the account routes (/v1/key, /v1/usage, /v1/generation) in one
-- round trip, with the same check admission runs (lib/key_check.lua).
--
-- KEYS[1] {acct:O}:key:K   key record (hash)
-- KEYS[2] {acct:O}:org     its organization (hash)
-- ARGV: key_hash
--
-- Returns {verdict} for a refused key, or {VERDICT.ADMITTED, {field, value, ...} of the key,
-- {field, value, ...} of the organization}.

local record = redis.call('HMGET', KEYS[1], 'key_hash', 'status', 'expires_at', 'models', 'prev_key_hash',
  'prev_valid_until_ms')
local refused = key_refusal(record, ARGV[1], '', redis_now_ms())
if refused then return {refused} end
return {VERDICT.ADMITTED, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
