-- The values the command's flags take (ids, times, statuses, error codes,
-- numbers), checked before anything is sent; each raises a usage error.
local window = require "flowservice.window"
local usage = require "flowservice.cli.usage"

local ipairs, next, tonumber = ipairs, next, tonumber
local fail = usage.fail

local _M = {}

function _M.check_id(what, id)
  if not id:match("^[%w%-]+$") then
    fail("%s must be letters, digits and dashes, got %q", what, id)
  end
  return id
end

-- a time as people type it (flowservice.window) -> epoch ms; "all": no bound
function _M.parse_time(flag, text)
  if text == "all" then return nil end
  local ms, why = window.parse(text)
  if not ms then fail("--%s %s", flag, why) end
  return ms
end

-- --since/--before; default_since: the bound when --since is not given
function _M.time_window(options, default_since)
  local since = _M.parse_time("since", options.since or default_since or "all")
  local before = options.before and _M.parse_time("before", options.before)
  if since and before and since >= before then fail("--since must be earlier than --before") end
  return since, before
end

-- The statuses the service knows, by lower case (it answers in mixed case).
local STATUSES = { failed = "failed", success = "success", partialsuccess = "partialSuccess",
  inprogress = "inProgress", cancelled = "cancelled" }

function _M.statuses(text)
  local list = {}
  for s in (text .. ","):gmatch("([^,]*),") do
    local known = STATUSES[s:lower()]
    if not known then
      fail("--status: unknown status %q (the service knows failed, success, partialSuccess,"
        .. " inProgress, cancelled)", s)
    end
    list[#list + 1] = known
  end
  return list
end

-- "CONNECTOR-2001,INGEST-1212" -> a list of code prefixes
function _M.error_codes(flag, text)
  local list = {}
  for code in (text .. ","):gmatch("([^,]*),") do
    if not code:match("^[%w%-_]+$") then
      fail("--%s takes error codes (or their start) like CONNECTOR-2001, got %q", flag, code)
    end
    list[#list + 1] = code
  end
  return list
end

function _M.positive_integer(flag, text)
  local n = text:match("^%d+$") and tonumber(text)
  if not n or n < 1 or n > 1e6 then fail("--%s must be a positive integer, got %q", flag, text) end
  return n
end

function _M.seconds(flag, text)
  local n = text:match("^%d+%.?%d*$") and tonumber(text)
  if not n then fail("--%s must be a number of seconds, got %q", flag, text) end
  return n
end

-- --resolve RUN_ID=done|retry ... -> { [run_id] = decision } or nil
function _M.resolutions(texts)
  local t = {}
  for _, text in ipairs(texts or {}) do
    local id, decision = text:match("^(.-)=(.*)$")
    if not id or (decision ~= "done" and decision ~= "retry") then
      fail("--resolve takes RUN_ID=done or RUN_ID=retry, got %q", text)
    end
    _M.check_id("--resolve run id", id)
    if t[id] and t[id] ~= decision then fail("--resolve %s given both done and retry", id) end
    t[id] = decision
  end
  return next(t) and t or nil
end

return _M
