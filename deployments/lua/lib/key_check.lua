-- The one check of an API key, shared by admit.lua (inference) and authenticate.lua (/v1/key,
-- /v1/usage, /v1/generation): the secret, the status, the expiry and, when a model is named,
-- the key's allowed models. Returns the refusing VERDICT, or nil for a live key.
--
-- The caller found the key through the secrets index (`tm:auth:<hash>`, written once when
-- the secret was issued), so a secret that reaches a record was issued for it: one that is
-- neither the current secret nor the previous one within its grace was rotated away.
--
-- record: HMGET of the key record's 'key_hash', 'status', 'expires_at', 'models',
--         'prev_key_hash', 'prev_valid_until_ms'
-- model: a listing id, or '' for no model check; now_ms: Redis TIME in ms
local function key_refusal(record, key_hash, model, now_ms)
  if not record[2] then return VERDICT.UNKNOWN_KEY end  -- no record
  -- Lua strings are interned, so these equalities are pointer comparisons, not byte-by-byte scans.
  if record[1] ~= key_hash then
    if record[5] ~= key_hash or now_ms >= tonumber(record[6] or '0') then return VERDICT.ROTATED_KEY end
  end
  if record[2] ~= 'active' then return VERDICT.REVOKED_KEY end
  if record[3] and record[3] ~= '' and now_ms >= tonumber(record[3]) * 1000 then return VERDICT.EXPIRED_KEY end
  if model ~= '' and record[4] and record[4] ~= 'null' and record[4] ~= '' then
    for _, id in ipairs(cjson.decode(record[4])) do
      if id == model then return nil end
    end
    return VERDICT.MODEL_NOT_ALLOWED
  end
  return nil
end

local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
