-- Time windows as people type them, to epoch milliseconds (UTC), and back.
--
--   30m, 24h, 7d        that long before now
--   today, yesterday    UTC midnight of the day
--   2026-11-30          UTC midnight of that day
--   2026-11-30T07:00:00Z, ...T07:00:00.250+02:00, ...-05:30   ISO-8601 with a zone
--   1764000000000       epoch milliseconds (a number below 10^11 looks like
--                       epoch seconds, and is refused as such)
--
-- One owner for the command and the Lua API (client:retry_failed's since
-- and before take these strings too).
local floor, huge = math.floor, math.huge
local format = string.format
local os_date, os_time, tonumber, type = os.date, os.time, tonumber, type

local _M = {}

local DAY_MS = 86400000
local UNIT_MS = { m = 60000, h = 3600000, d = DAY_MS }
local EPOCH_SECONDS_BELOW = 100000000000 -- 10^11 ms is 1973; 10^11 s is the year 5138

-- Howard Hinnant's days_from_civil: days since 1970-01-01 of a proleptic
-- Gregorian date, without os.time (which reads the date as local time).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function days_in_month(y, m)
  if m == 2 then
    return (y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)) and 29 or 28
  end
  return (m == 4 or m == 6 or m == 9 or m == 11) and 30 or 31
end

local function date_ms(y, mo, d)
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo < 1 or mo > 12 or d < 1 or d > days_in_month(y, mo) then return nil end
  return days_from_civil(y, mo, d) * DAY_MS
end

-- "Z", "+00:00", "-05:30" -> offset in ms east of UTC, or nil
local function zone_ms(zone)
  if zone == "Z" then return 0 end
  local sign, hh, mm = zone:match("^([+-])(%d%d):?(%d%d)$")
  if not sign then return nil end
  hh, mm = tonumber(hh), tonumber(mm)
  if hh > 23 or mm > 59 then return nil end
  local offset = (hh * 60 + mm) * 60000
  return sign == "+" and offset or -offset
end

local function iso_ms(text)
  local y, mo, d, h, mi, s, rest = text:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)(.*)$")
  if not y then return nil end
  local fraction, zone = rest:match("^%.(%d+)(.*)$")
  if not fraction then fraction, zone = "", rest end
  local day, offset = date_ms(y, mo, d), zone_ms(zone)
  h, mi, s = tonumber(h), tonumber(mi), tonumber(s)
  if not (day and offset) or h > 23 or mi > 59 or s > 59 then return nil end
  local ms = fraction ~= "" and tonumber((fraction .. "00"):sub(1, 3)) or 0
  return day + ((h * 60 + mi) * 60 + s) * 1000 + ms - offset
end

-- Now in epoch ms (whole seconds: the wall clock Lua has).
function _M.now_ms()
  return os_time() * 1000
end

-- text -> epoch ms, or nil and why. now: epoch ms to count from (default now).
function _M.parse(text, now)
  if type(text) == "number" then text = format("%.0f", text) end
  if type(text) ~= "string" then return nil, "must be a time, got " .. type(text) end
  now = now or _M.now_ms()
  if text:match("^%d+$") then
    local n = #text <= 15 and tonumber(text)
    if not n then return nil, format("%q is not a time", text) end
    if n < EPOCH_SECONDS_BELOW then
      return nil, format("%s looks like epoch seconds; give epoch milliseconds (%s000) or a time"
        .. " like 24h or 2026-11-30T07:00:00Z", text, text)
    end
    return n
  end
  local amount, unit = text:match("^(%d+)([mhd])$")
  if amount then return now - tonumber(amount) * UNIT_MS[unit] end
  if text == "today" or text == "yesterday" then
    local midnight = floor(now / DAY_MS) * DAY_MS
    return text == "today" and midnight or midnight - DAY_MS
  end
  local y, mo, d = text:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)$")
  local ms = y and date_ms(y, mo, d) or iso_ms(text)
  if ms then return ms end
  return nil, format("%q is not a time: use 30m, 24h, 7d, today, yesterday, 2026-11-30,"
    .. " 2026-11-30T07:00:00Z (or +hh:mm), or epoch milliseconds", text)
end

-- epoch ms -> "2026-11-24T00:00:00Z" (".123" when there are milliseconds)
function _M.iso(ms)
  if type(ms) ~= "number" or ms ~= ms or ms == huge or ms == -huge then return "-" end
  local seconds = floor(ms / 1000)
  local rest = floor(ms - seconds * 1000)
  return os_date("!%Y-%m-%dT%H:%M:%S", seconds) .. (rest > 0 and format(".%03dZ", rest) or "Z")
end

-- "2026-11-30T07:00:00Z .. now", for reports
function _M.describe(since, before)
  return (since and _M.iso(since) or "the beginning") .. " .. " .. (before and _M.iso(before) or "now")
end

return _M
