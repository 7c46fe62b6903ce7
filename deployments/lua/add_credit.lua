-- Add prepaid credit to a key, unless the key is revoked.
--
-- Revocation is final, so credit sent to a revoked key would be stranded; the status check
-- and the increment happen in this one script, so a revocation cannot slip in between.
-- Every credit also counts in credited_micros (balance + hold + spent always equals it).
--
-- KEYS[1] {acct:ID}:key   key record (hash): status, balance_micros, credited_micros
-- ARGV[1] micro-USD to add (a positive integer)
--
-- Returns 'credited', 'missing' (no such key) or 'revoked'; nothing changes unless 'credited'.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'revoked' then return 'revoked' end
redis.call('HINCRBY', KEYS[1], 'balance_micros', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'credited_micros', ARGV[1])
return 'credited'
