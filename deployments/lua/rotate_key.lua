-- Give a key a new secret, keeping the old one valid for a grace period.
--
-- The key keeps its id, organization, limits, cap and usage; only the secret changes. The
-- replaced secret becomes prev_key_hash until prev_valid_until_ms (Redis TIME + grace); a
-- secret older than that stops at once. The secrets index entry of the new secret
-- (tm:auth:<hash>) is written by the caller before this runs, so a secret in a record can
-- always be found.
--
-- KEYS[1] {acct:O}:key:K   key record (hash)
-- ARGV[1] the new secret's sha256, ARGV[2] its display prefix, ARGV[3] grace in ms
--
-- Returns 'rotated', 'missing' or 'revoked' (a revoked key stays revoked; nothing changes).

local record = redis.call('HMGET', KEYS[1], 'status', 'key_hash')
if not record[1] then return 'missing' end
if record[1] == 'revoked' then return 'revoked' end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'prev_key_hash', record[2], 'prev_valid_until_ms', now_ms + tonumber(ARGV[3]),
  'key_hash', ARGV[1], 'prefix', ARGV[2], 'rotated_at', math.floor(now_ms / 1000))
return 'rotated'
