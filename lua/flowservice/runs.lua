-- The Flow Service's listings (runs, and flows): a query table -> repeated
-- `property` filters and the other parameters, and the next page's token
-- out of `_links.next.href`.
local args = require "flowservice.args"
local core = require "flowservice.core"
local window = require "flowservice.window"

local concat, format = table.concat, string.format
local ipairs, type = ipairs, type

local _M = {}

_M.MAX_PAGE = 100

local QUERY_FIELDS = {
  flow_id = "string", status = "any", since = "any", before = "any",
  order = "string", page_size = "number", max = "number", filters = "table",
}

-- Epoch milliseconds on the wire as integers: lua-cjson hands them back as
-- floats on Lua 5.3+, and "1670444672602.0" is not a filter the service takes.
local function integer_string(n)
  return format("%.0f", n)
end

local function statuses(status, argn, fname, level)
  local list = type(status) == "string" and { status } or status
  if type(list) ~= "table" or #list == 0 then
    args.fail(argn, fname, "query 'status' must be a string or a list of strings", level)
  end
  for _, s in ipairs(list) do
    if type(s) ~= "string" or s == "" or s:find(",", 1, true) then
      args.fail(argn, fname, "query 'status' entries must be non-empty strings without ','", level)
    end
  end
  return concat(list, ",")
end

-- A window bound: epoch ms (a whole number) or a string flowservice.window
-- reads ("24h", "2026-11-30T07:00:00Z", ...) -> epoch ms, or nil.
function _M.time(v, key, argn, fname, level)
  if v == nil then return nil end
  if type(v) == "number" then
    if not args.is_integer(v) then
      args.fail(argn, fname, format("query field '%s' must be a whole number of epoch ms", key), level + 1)
    end
    return v
  end
  if type(v) ~= "string" then
    args.fail(argn, fname, format("query field '%s' must be epoch ms or a time string, got %s", key, type(v)),
      level + 1)
  end
  local ms, why = window.parse(v)
  if not ms then args.fail(argn, fname, format("query field '%s' %s", key, why), level + 1) end
  return ms
end

-- What every listing's query shares: a table of known fields, a whole
-- page_size from 1 to MAX_PAGE and a whole max >= 1. level: error() style.
local function check_query(query, fields, argn, fname, level)
  if type(query) ~= "table" then
    args.fail(argn, fname, "query must be a table, got " .. type(query), level + 1)
  end
  args.fields(query, fields, "query field", argn, fname, level + 1)
  for _, key in ipairs { "page_size", "max" } do
    if query[key] ~= nil and not args.is_integer(query[key]) then
      args.fail(argn, fname, format("query field '%s' must be a whole number", key), level + 1)
    end
  end
  if query.page_size and (query.page_size < 1 or query.page_size > _M.MAX_PAGE) then
    args.fail(argn, fname, "query field 'page_size' must be from 1 to " .. _M.MAX_PAGE, level + 1)
  end
  if query.max and query.max < 1 then
    args.fail(argn, fname, "query field 'max' must be at least 1", level + 1)
  end
end

-- query.filters, the raw `property` expressions, appended to params.
local function add_filters(params, query, argn, fname, level)
  for i, expression in ipairs(query.filters or {}) do
    if type(expression) ~= "string" or expression == "" then
      args.fail(argn, fname, format("query 'filters' entry %d must be a non-empty string", i), level + 1)
    end
    params[#params + 1] = { "property", expression }
  end
end

-- Checks query (raising at the caller's argument argn) and returns the
-- `property` filters as {name, value} pairs.
function _M.filters(query, argn, fname, level)
  level = (level or 2) + 1
  check_query(query, QUERY_FIELDS, argn, fname, level)
  local since, before = _M.time(query.since, "since", argn, fname, level),
    _M.time(query.before, "before", argn, fname, level)
  local params = {}
  local function add(expression) params[#params + 1] = { "property", expression } end
  if query.flow_id then add("flowId==" .. query.flow_id) end
  if query.status then add("metrics.statusSummary.status==" .. statuses(query.status, argn, fname, level)) end
  if since then add("metrics.durationSummary.startedAtUTC>=" .. integer_string(since)) end
  if before then add("metrics.durationSummary.startedAtUTC<" .. integer_string(before)) end
  add_filters(params, query, argn, fname, level) -- not a tail call: the level counts this frame
  return params
end

local FLOW_QUERY_FIELDS = { state = "string", filters = "table", max = "number", page_size = "number",
  order = "string" }

-- The same for a flows listing: query { state = "enabled"|"disabled", filters, max, page_size, order }.
function _M.flow_filters(query, argn, fname, level)
  level = (level or 2) + 1
  check_query(query, FLOW_QUERY_FIELDS, argn, fname, level)
  if query.state and query.state ~= "enabled" and query.state ~= "disabled" then
    args.fail(argn, fname, "query field 'state' must be \"enabled\" or \"disabled\"", level)
  end
  local params = {}
  if query.state then params[1] = { "property", "state==" .. query.state } end
  add_filters(params, query, argn, fname, level) -- not a tail call: the level counts this frame
  return params
end

-- The parameters of one page of a listing (the original query every time).
function _M.page_params(query, filters, token)
  local params = {}
  for i, p in ipairs(filters) do params[i] = p end
  params[#params + 1] = { "orderby", query.order or "-createdAt" }
  params[#params + 1] = { "limit", integer_string(query.page_size or _M.MAX_PAGE) }
  if token then params[#params + 1] = { "continuationToken", token } end
  return params
end

function _M.count_params(filters)
  local params = {}
  for i, p in ipairs(filters) do params[i] = p end
  params[#params + 1] = { "count", "true" }
  return params
end

-- The continuation token of the next page; nil on the last page; false
-- when there is a next link without a token in it.
function _M.next_token(page)
  local links = type(page._links) == "table" and page._links or nil
  local next_link = links and type(links.next) == "table" and links.next or nil
  local href = next_link and next_link.href
  if type(href) ~= "string" then return nil end
  local token = href:match("[?&]continuationToken=([^&#]*)")
  if not token or token == "" then return false end
  return core.unescape(token)
end

return _M
