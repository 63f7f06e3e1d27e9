-- What the command prints: JSON documents (lua-cjson, with empty lists kept
-- as lists), errors as they may leave, and one run as a summary or a line.
local flowservice = require "flowservice"
local window = require "flowservice.window"
local hints = require "flowservice.cli.hints"
local cjson = require("cjson").new()

local getmetatable, ipairs, next, pairs, select, setmetatable, tostring, type = getmetatable,
  ipairs, next, pairs, select, setmetatable, tostring, type
local concat = table.concat
local format = string.format
local iso_time = window.iso

local _M = {}

-- JSON output: lists are marked, so an empty list stays [] (lua-cjson 2.1.0
-- has no empty_array_mt and would write {})

local LIST = {}
local function list(t) return setmetatable(t or {}, LIST) end

-- Fields of the service's runs that are lists: empty, they come back from
-- cjson as {} and go out as [] again.
local LIST_KEYS = { items = true, errors = true, activities = true, labels = true,
  sourceConnectionIds = true, targetConnectionIds = true, transformations = true }

-- Only what may leave: never the body (it may echo what we sent).
local function error_json(err)
  if type(err) ~= "table" then return { kind = "error", message = tostring(err) } end
  return { kind = err.kind, status = err.status, code = err.code, message = err.message,
    request_id = err.request_id }
end

-- lua-cjson writes the JSON; this marker, swapped for [] afterwards, is how
-- an empty list gets out as a list.
local EMPTY_LIST = "flowservice_empty_list_6f1d2c"

-- A copy fit for cjson.encode: errors reduced to what may leave, functions
-- dropped, empty lists marked.
local function prepare(v, key)
  if type(v) ~= "table" then
    if type(v) == "function" then return nil end
    return v
  end
  if flowservice.is_error(v) then return error_json(v) end
  if next(v) == nil then
    return (getmetatable(v) == LIST or LIST_KEYS[key]) and EMPTY_LIST or v
  end
  local copy = {}
  for k, item in pairs(v) do copy[k] = prepare(item, k) end
  return copy
end

local function encode(v)
  local text = cjson.encode(prepare(v))
  text = text:gsub('"' .. EMPTY_LIST .. '"', "[]")
  return (text:gsub("\\/", "/")) -- lua-cjson writes / as \/; a path reads better without
end

local function print_json(out, v)
  out:write(encode(v), "\n")
end

local function is_auth(err)
  return type(err) == "table" and (err.kind == "auth" or err.status == 401 or err.status == 403)
end

-- exit status for a list of errors: 3 if one is about authentication
local function failure_code(errs)
  local code = 0
  for _, err in ipairs(errs) do
    if is_auth(err) then return 3 end
    code = 1
  end
  return code
end

local function field(t, ...)
  for i = 1, select("#", ...) do
    if type(t) ~= "table" then return nil end
    t = t[(select(i, ...))]
  end
  return t
end

local function records(run)
  local n = field(run, "metrics", "recordSummary", "outputRecordCount")
  return type(n) == "number" and format("%.0f", n) or "-"
end

local function run_summary(run)
  local lines = {}
  local function add(label, value)
    if value ~= nil then lines[#lines + 1] = format("%-10s %s", label, tostring(value)) end
  end
  add("id", run.id)
  add("flow", run.flowId)
  add("status", field(run, "metrics", "statusSummary", "status") or "-")
  add("records", records(run))
  add("created", iso_time(run.createdAt))
  local started = field(run, "metrics", "durationSummary", "startedAtUTC")
  local completed = field(run, "metrics", "durationSummary", "completedAtUTC")
  if started then add("started", iso_time(started)) end
  if completed then add("completed", iso_time(completed)) end
  add("etag", run.etag or run.eTag)
  local errs = field(run, "metrics", "statusSummary", "errors")
  if type(errs) == "table" and #errs > 0 then
    for i, e in ipairs(errs) do
      add(i == 1 and "errors" or "", format("%s: %s", tostring(field(e, "code") or "-"),
        tostring(field(e, "message") or "-")))
    end
  else
    add("errors", "none")
  end
  return concat(lines, "\n") .. "\n"
end

local RUN_HEADER = format("%-36s  %-14s  %-24s  %7s  %s\n", "RUN", "STATUS", "CREATED", "RECORDS", "ERROR")

-- one run of list-runs: id, status, created, records, its first error code
local function run_line(run)
  local errs = field(run, "metrics", "statusSummary", "errors")
  local first = type(errs) == "table" and type(errs[1]) == "table" and errs[1].code
  return format("%-36s  %-14s  %-24s  %7s  %s\n", tostring(run.id),
    tostring(field(run, "metrics", "statusSummary", "status") or "-"), iso_time(run.createdAt),
    records(run), type(first) == "string" and first or "-")
end

-- One error that ends a command: on stderr (with a hint where the cause is
-- known), and as {"error": ...} with --json. listing: it answered a listing.
local function fail(ctx, err, listing)
  if ctx.json then print_json(ctx.stdout, { error = error_json(err) }) end
  ctx.stderr:write(tostring(err), "\n")
  hints.show(ctx, err, listing)
  return is_auth(err) and 3 or 1
end

_M.list, _M.encode, _M.print_json, _M.error_json = list, encode, print_json, error_json
_M.is_auth, _M.failure_code, _M.field, _M.fail = is_auth, failure_code, field, fail
_M.run_summary, _M.run_line, _M.RUN_HEADER = run_summary, run_line, RUN_HEADER

return _M
