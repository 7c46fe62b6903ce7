-- UTC calendar arithmetic for the money scripts (Redis Lua has no date library): the day an
-- epoch second falls on, and the spend-cap period it belongs to. periods.py is the same in
-- Python, and a test runs both over the same instants.

-- (year, month, day) of a count of days since 1970-01-01 (proleptic Gregorian calendar).
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m, d
end

local function day_text(days)
  local y, m, d = civil_from_days(days)
  return string.format('%04d-%02d-%02d', y, m, d)
end

-- 'YYYY-MM-DD' of an epoch second
local function utc_day(now_s)
  return day_text(math.floor(now_s / 86400))
end

-- The spend-cap period of an epoch second: 'daily:YYYY-MM-DD', 'weekly:<Monday's date>',
-- 'monthly:YYYY-MM', or '' when the key has no period. The name is part of the id, so a
-- key whose period changes starts a fresh one.
local function cap_period_id(period, now_s)
  local days = math.floor(now_s / 86400)
  if period == 'daily' then return 'daily:' .. day_text(days) end
  if period == 'weekly' then return 'weekly:' .. day_text(days - (days + 3) % 7) end  -- 1970-01-01 was a Thursday
  if period == 'monthly' then
    local y, m = civil_from_days(days)
    return string.format('monthly:%04d-%02d', y, m)
  end
  return ''
end
