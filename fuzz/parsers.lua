-- Fuzz driver 4 (fuzz/parsers.c): every input goes three ways.
--
--   window.parse(input, NOW): the time windows people type (flowservice.window)
--     -> epoch ms, or nil and why; never a raise. Digits give their value
--     (10^11 or more; less looks like epoch seconds and is refused); an
--     ISO time in Z of years 1000-9999 prints back (os.date, UTC) as the
--     date and time it was read from, milliseconds included; 30m/24h/7d
--     are that long before NOW. cli.parse_time("since", input) gives the
--     same, "all" gives nil, a refusal is the command's usage error.
--   runs.next_token(page), page = the input decoded as JSON when that is a
--     table (what the client hands it), else a page whose next link's href
--     is the input: nil, false or a string, never a raise; a string is the
--     unescaped continuationToken of the href.
--   round trip: a token as the service would put it in a next link
--     (escaped, among other parameters) comes back unchanged.
local cli = require "flowservice.cli"
local runs = require "flowservice.runs"
local window = require "flowservice.window"
local core = require "flowservice.core"
local decode = require("cjson.safe").new().decode

local format, match, sub = string.format, string.match, string.sub
local floor, huge = math.floor, math.huge
local getmetatable, pcall, tonumber, tostring, type = getmetatable, pcall, tonumber, tostring, type
local os_date = os.date
local fail = fuzz.fail

local NOW = 1796113946000 -- a fixed now: relative times are checked against it
local UNIT = { m = 60000, h = 3600000, d = 86400000 }

local function check_window(text)
  local ok, ms, why = pcall(window.parse, text, NOW)
  if not ok then fail(format("window.parse(%q) raised: %s", text, tostring(ms))) end
  if ms == nil then
    if type(why) ~= "string" then fail(format("window.parse(%q) refused without a reason", text)) end
    return nil
  end
  if type(ms) ~= "number" or ms ~= ms or ms == huge or ms == -huge or floor(ms) ~= ms then
    fail(format("window.parse(%q) gave %s", text, tostring(ms)))
  end
  if match(text, "^%d+$") then
    if ms ~= tonumber(text) or ms < 1e11 then fail(format("window.parse(%q) gave %s", text, tostring(ms))) end
    return ms
  end
  local n, unit = match(text, "^(%d+)([mhd])$")
  if n and ms ~= NOW - tonumber(n) * UNIT[unit] then
    fail(format("window.parse(%q) gave %s", text, tostring(ms)))
  end
  local y = match(text, "^(%d%d%d%d)%-%d%d%-%d%dT%d%d:%d%d:%d%d[%.%d]*Z$")
  if y and tonumber(y) >= 1000 then
    local printed = os_date("!%Y-%m-%dT%H:%M:%S", floor(ms / 1000))
    local want_ms = tonumber(((match(sub(text, 20), "^%.(%d+)") or "0") .. "00"):sub(1, 3))
    if printed ~= sub(text, 1, 19) or ms % 1000 ~= want_ms then
      fail(format("window.parse(%q) gave %s, which is %s.%03d", text, tostring(ms), printed, ms % 1000))
    end
  end
  return ms
end

local function check_time(text)
  check_window(text)
  local ok, ms = pcall(cli.parse_time, "since", text)
  if not ok then
    if type(ms) ~= "table" or getmetatable(ms) == nil or type(ms.message) ~= "string" then
      fail(format("parse_time(%q) raised something other than a usage error: %s", text, tostring(ms)))
    end
  elseif ms == nil and text ~= "all" then
    fail(format("parse_time(%q) gave no bound", text))
  end
end

local function check_page(page, href)
  local ok, token = pcall(runs.next_token, page)
  if not ok then fail("next_token raised: " .. tostring(token)) end
  if token ~= nil and token ~= false and type(token) ~= "string" then
    fail("next_token gave a " .. type(token))
  end
  if type(token) == "string" then
    local links = page._links
    local raw = type(links.next.href) == "string" and match(links.next.href, "[?&]continuationToken=([^&#]*)")
    if not raw or core.unescape(raw) ~= token then fail("next_token gave a token that is not in the link") end
  end
  return token
end

return function(input)
  check_time(input)
  local doc = decode(input)
  if type(doc) == "table" then check_page(doc) end
  check_page { _links = { next = { href = input } } }
  if input ~= "" then
    local href = "/runs?property=flowId%3D%3Dfb5d688d&orderby=-createdAt&continuationToken="
      .. core.escape(input) .. "&limit=100"
    local token = check_page { items = {}, _links = { next = { href = href } } }
    if token ~= input then fail(format("token %q came back as %q", input, tostring(token))) end
  end
end
