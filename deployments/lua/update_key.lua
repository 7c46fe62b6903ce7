-- Change fields of a key record in one step, never bringing a revoked key back.
--
-- Revocation is final. The check (is the key revoked?) and the write happen in this one
-- script, so a PATCH {status: active} racing a DELETE cannot revive the key: whichever comes
-- second sees the other's result. DELETE uses this script too (status = revoked), so it never
-- writes a record for an id that has none. Limits are merged here, from the stored JSON, so
-- two PATCHes of different limits do not undo each other.
--
-- KEYS[1] {acct:O}:key:K   key record (hash): status, limits (JSON), name, models, expires_at, cap...
-- ARGV[1] JSON object: the limits to change; null puts a limit back to the operator's default
-- ARGV[2], ARGV[3], ... field, value pairs to set as they are (name, models, status, expires_at,
--                       cap_micros, cap_period)
--
-- Returns 'updated', 'missing' (no such key) or 'revoked' (the key is revoked and the change
-- would make it active again); nothing is written unless it returns 'updated'.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end

local fields = {}
for i = 2, #ARGV, 2 do
  if ARGV[i] == 'status' and ARGV[i + 1] ~= 'revoked' and status == 'revoked' then return 'revoked' end
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end

local changes = cjson.decode(ARGV[1])
if next(changes) ~= nil then
  local limits = cjson.decode(redis.call('HGET', KEYS[1], 'limits') or '{}')
  for name, value in pairs(changes) do limits[name] = value end
  fields[#fields + 1] = 'limits'
  fields[#fields + 1] = cjson.encode(limits)
end

if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
return 'updated'
