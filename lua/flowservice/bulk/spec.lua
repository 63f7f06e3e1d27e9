-- The spec of client:retry_failed(spec), checked before anything is done:
-- its fields, the since/before bounds, the lease. An argument error names
-- the caller of client:retry_failed.
local args = require "flowservice.args"
local window = require "flowservice.window"

local format, huge = string.format, math.huge
local ipairs, pairs, type = ipairs, pairs, type

local _M = {}

local SPEC = {
  flow_id = "string", run_ids = "table", since = "any", before = "any", status = "any",
  zero_record_success = "boolean", concurrency = "number", dry_run = "boolean",
  journal = "any", grace = "number", on_progress = "function", max = "number",
  resolve = "table", force = "boolean", stop = "function", codes = "table", exclude_codes = "table",
  all_flows = "boolean", wait_runs = "boolean", wait_timeout = "number", max_active = "number",
  wait_backoff = "table", lease = "number", short_lease_for_tests = "boolean",
  on_wait = "function", -- called with (seconds, pending) before the grace wait of settling
}

-- An argument error at the caller of client:retry_failed, raised from a
-- function bulk.run calls (client:retry_failed -> bulk.run -> it -> fail);
-- depth: how many more of our frames stand between. No tail calls on that
-- path: Lua 5.1 and 5.4 count them differently.
local function fail(msg, depth) args.fail(1, "retry_failed", msg, 5 + (depth or 0)) end
_M.fail = fail

function _M.check(spec)
  if type(spec) ~= "table" then fail("spec must be a table, got " .. type(spec)) end
  args.fields(spec, SPEC, "spec field", 1, "retry_failed", 4)
  local given = (spec.flow_id ~= nil and 1 or 0) + (spec.run_ids ~= nil and 1 or 0)
    + (spec.all_flows and 1 or 0)
  if given ~= 1 then fail("spec takes exactly one of 'flow_id', 'run_ids' and 'all_flows'") end
  if spec.flow_id == "" then fail("spec field 'flow_id' must not be empty") end
  if spec.run_ids then
    if #spec.run_ids == 0 then fail("spec field 'run_ids' must be a non-empty list") end
    for i, id in ipairs(spec.run_ids) do
      if type(id) ~= "string" then fail(format("spec field 'run_ids' entry %d must be a string", i)) end
      args.run_id(id, 1, "retry_failed", 3)
    end
    for _, key in ipairs { "since", "before", "status", "zero_record_success", "max", "resolve" } do
      if spec[key] ~= nil then fail("spec field '" .. key .. "' needs 'flow_id'") end
    end
  elseif spec.force ~= nil then
    fail("spec field 'force' needs 'run_ids'")
  end
  if spec.all_flows and spec.resolve then fail("spec field 'resolve' needs 'flow_id'") end
  for _, key in ipairs { "codes", "exclude_codes" } do
    for i, code in ipairs(spec[key] or {}) do
      if type(code) ~= "string" or code == "" then
        fail(format("spec field '%s' entry %d must be a non-empty string", key, i))
      end
    end
  end
  for _, key in ipairs { "since", "before" } do
    if spec[key] ~= nil and type(spec[key]) ~= "number" and type(spec[key]) ~= "string" then
      fail(format("spec field '%s' must be epoch ms or a time string, got %s", key, type(spec[key])))
    end
  end
  if spec.max_active ~= nil and not (args.is_integer(spec.max_active) and spec.max_active >= 1) then
    fail("spec field 'max_active' must be a whole number >= 1")
  end
  if spec.wait_timeout ~= nil and not (spec.wait_timeout > 0 and spec.wait_timeout < huge) then
    fail("spec field 'wait_timeout' must be a positive number of seconds")
  end
  local b = spec.wait_backoff
  if b ~= nil and not (type(b[1]) == "number" and type(b[2]) == "number" and b[1] > 0 and b[2] >= b[1]) then
    fail("spec field 'wait_backoff' must be { first, max } seconds, 0 < first <= max")
  end
  if spec.concurrency ~= nil and not (args.is_integer(spec.concurrency) and spec.concurrency >= 1) then
    fail("spec field 'concurrency' must be a whole number >= 1")
  end
  if spec.lease ~= nil and not (spec.lease > 0 and spec.lease < huge) then
    fail("spec field 'lease' must be a positive number of seconds")
  end
  if spec.grace ~= nil and not (spec.grace >= 0 and spec.grace < huge) then
    fail("spec field 'grace' must be a number of seconds >= 0")
  end
  local j = spec.journal
  if j ~= nil and j ~= false and type(j) ~= "function" and (type(j) ~= "string" or j == "") then
    fail("spec field 'journal' must be a path or PostgreSQL connection string, a function(flow_id) -> one,"
      .. " or false")
  end
  for run_id, decision in pairs(spec.resolve or {}) do
    if type(run_id) ~= "string" or (decision ~= "done" and decision ~= "retry") then
      fail("spec field 'resolve' maps run ids to \"done\" or \"retry\"")
    end
  end
end

-- spec.since / spec.before as epoch ms (a string is read by flowservice.window)
function _M.bound(spec, key)
  local v = spec[key]
  if type(v) ~= "string" then return v end
  local ms, why = window.parse(v)
  if not ms then fail(format("spec field '%s' %s", key, why)) end
  return ms
end

-- A claim's lease must outlive a request that starts under it, with room to
-- renew: at least twice the client's timeout + connect_timeout (a test that
-- wants leases to run out says so).
function _M.check_lease(spec, batch)
  local request_time = batch:journal_options().request_time
  if spec.lease and spec.lease < 2 * request_time and not spec.short_lease_for_tests then
    fail(format("spec field 'lease' (%g s) must be at least twice the client's timeout + connect_timeout"
      .. " (2 x %g s): a claim must outlive a request sent under it", spec.lease, request_time))
  end
end

return _M
