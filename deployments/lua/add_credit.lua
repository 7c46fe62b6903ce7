-- Add prepaid credit to an organization; when the credit is sent through one of its keys
-- (POST /admin/v1/keys/{id}/credit), not through a revoked one.
--
-- Revocation is final, so credit sent through a revoked key is refused rather than landing
-- where its sender may no longer look; the status check and the increment happen in this one
-- script, so a revocation cannot slip in between. Every credit also counts in
-- credited_micros (balance + hold + spent always equals it).
--
-- KEYS[1] {acct:O}:org     the organization (hash): balance_micros, credited_micros
-- KEYS[2] {acct:O}:key:K   optional: the key the credit was sent through
-- ARGV[1] micro-USD to add (a positive integer)
--
-- Returns 'credited', 'missing' (no such organization or key) or 'revoked'; nothing changes
-- unless 'credited'.

if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if KEYS[2] then
  local status = redis.call('HGET', KEYS[2], 'status')
  if not status then return 'missing' end
  if status == 'revoked' then return 'revoked' end
end
redis.call('HINCRBY', KEYS[1], 'balance_micros', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'credited_micros', ARGV[1])
return 'credited'
