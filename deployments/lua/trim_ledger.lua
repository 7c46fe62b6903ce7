-- Trim the oldest ledger entries of one organization into its checkpoint, in one atomic call,
-- so checkpoint + remaining entries always give the totals of the untrimmed ledger.
--
-- Each usage event (an entry without `event`) adds to the checkpoint what settlement counted
-- for it: `events` 1, `cost_micros`, and the usage counters
-- "<day>|<key id>|<model>|requests|prompt_tokens|completion_tokens|cost_micros" (and
-- cached_tokens when the event has some, as settlement counts it).
-- An operator notice adds `<event>_events` 1 instead (a `hold_exceeded` notice also adds its
-- `uncharged_micros`); notices are not usage.
-- All entries of the batch are checked before anything is written: a malformed entry is an
-- error naming it, and nothing changes (Redis does not roll back a script's earlier writes).
--
-- KEYS[1] {acct:O}:ledger              the organization's ledger (stream)
-- KEYS[2] {acct:O}:ledger_checkpoint   totals of trimmed entries (hash); `last_id` = the newest trimmed
-- ARGV[1] exclusive upper bound: only entries with ids strictly below it are trimmed ("<ms>-<seq>")
-- ARGV[2] the most entries this call trims
--
-- Returns how many entries were trimmed (fewer than ARGV[2]: nothing older is left).

local bound, batch = ARGV[1], tonumber(ARGV[2])
if bound == '0-0' or bound == '0' or not batch or batch < 1 then
  return 0
end
local entries = redis.call('XRANGE', KEYS[1], '-', '(' .. bound, 'COUNT', batch)
if #entries == 0 then
  return 0
end

local function integer(id, fields, name)
  local value = fields[name]
  if value == nil or not string.match(value, '^%-?%d+$') then
    error('ledger entry ' .. id .. ' has no integer ' .. name, 0)
  end
  return tonumber(value)
end

local function text(id, fields, name)
  local value = fields[name]
  if value == nil or value == '' then
    error('ledger entry ' .. id .. ' has no ' .. name, 0)
  end
  return value
end

-- field -> amount, and the order fields were first seen (so the writes are deterministic)
local totals, order = {}, {}
local function add(name, amount)
  if totals[name] == nil then
    totals[name] = 0
    order[#order + 1] = name
  end
  totals[name] = totals[name] + amount
end

local ok, problem = pcall(function()
  for _, entry in ipairs(entries) do
    local id, flat = entry[1], entry[2]
    local fields = {}
    for i = 1, #flat, 2 do
      fields[flat[i]] = flat[i + 1]
    end
    local notice = fields['event']
    if notice ~= nil then
      add(notice .. '_events', 1)
      if notice == 'hold_exceeded' then
        add('uncharged_micros', integer(id, fields, 'uncharged_micros'))
      end
    else
      local group = text(id, fields, 'day') .. '|' .. text(id, fields, 'key_id') .. '|'
        .. text(id, fields, 'model') .. '|'
      local cost = integer(id, fields, 'cost_micros')
      add('events', 1)
      add('cost_micros', cost)
      add(group .. 'requests', 1)
      add(group .. 'prompt_tokens', integer(id, fields, 'prompt_tokens'))
      add(group .. 'completion_tokens', integer(id, fields, 'completion_tokens'))
      add(group .. 'cost_micros', cost)
      local cached = fields['cached_tokens']  -- absent in events migrated from before cached pricing
      if cached ~= nil and cached ~= '' and cached ~= '0' then
        add(group .. 'cached_tokens', integer(id, fields, 'cached_tokens'))
      end
    end
  end
end)
if not ok then
  return redis.error_reply(tostring(problem))
end

for _, name in ipairs(order) do
  redis.call('HINCRBY', KEYS[2], name, string.format('%d', totals[name]))
end
redis.call('HSET', KEYS[2], 'last_id', entries[#entries][1])
-- XDEL in slices: Lua's unpack has a limit on how many values it spreads
local slice = 500
for first = 1, #entries, slice do
  local ids = {}
  for i = first, math.min(first + slice - 1, #entries) do
    ids[#ids + 1] = entries[i][1]
  end
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return #entries
