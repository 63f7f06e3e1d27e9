-- Listing: property filters, order, pages and counts, the same for
-- GET /runs and GET /flows.
--
-- Query-parameter problems answer problem documents with codes the fake
-- makes up (the real catalog does not name them):
--   FLOW-1107-400 invalid property filter     FLOW-1108-400 invalid limit
--   FLOW-1109-400 count together with limit   FLOW-1110-400 bad continuationToken
--   FLOW-1111-400 invalid orderby             (also a repeated single parameter)

local ngx = ngx
local util = require("fake.util")
local reply = require("fake.reply")

local ipairs, tonumber, tostring, type = ipairs, tonumber, tostring, type
local math_floor = math.floor
local str_byte, str_char, str_sub = string.byte, string.char, string.sub
local table_concat, table_sort = table.concat, table.sort
local encode, escape_component = util.encode, util.escape_component
local json_reply, problem = reply.json_reply, reply.problem
local query_table = util.query_table

local _M = {}

local DEFAULT_LIMIT, MAX_LIMIT = 100, 100
local TOKEN_MAGIC = "\251\255\191"   -- base64 "+/+/": every token needs escaping

local function valid_path(path)
  if path == "" then return false end
  for segment in (path .. "."):gmatch("([^.]*)%.") do
    if not segment:match("^[%a_][%w_]*$") then return false end
  end
  return true
end

local function field(run, path)
  local v = run
  for segment in path:gmatch("[^.]+") do
    if type(v) ~= "table" then return nil end
    v = v[segment]
  end
  return v
end

local NUMBER = "^%-?%d+%.?%d*$"

-- "path==a,b", "path>N", "path<N", "path>=N", "path<=N" -> filter or nil, why
local function parse_filter(expr)
  local path, op, value = expr:match("^([^=<>]*)([=<>]=?)(.*)$")
  if not path then return nil, "no operator" end
  if not valid_path(path) then return nil, "bad field path" end
  if op == "=" then return nil, "unknown operator =" end
  if op == "==" then
    local values = {}
    for v in (value .. ","):gmatch("([^,]*),") do
      if v == "" then return nil, "empty value" end
      values[#values + 1] = v
    end
    return { path = path, op = op, values = values }
  end
  if not value:match(NUMBER) then return nil, "operator " .. op .. " needs a number" end
  return { path = path, op = op, number = tonumber(value) }
end

local function matches(run, f)
  local v = field(run, f.path)
  if f.op == "==" then
    for _, want in ipairs(f.values) do
      if type(v) == "number" then
        if tonumber(want) == v then return true end
      elseif type(v) == "string" then
        if v:lower() == want:lower() then return true end
      elseif v ~= nil and tostring(v) == want then
        return true
      end
    end
    return false
  end
  if type(v) ~= "number" then return false end
  local n = f.number
  if f.op == ">" then return v > n
  elseif f.op == "<" then return v < n
  elseif f.op == ">=" then return v >= n
  else return v <= n end
end

-- "-createdAt" / "+createdAt" / "createdAt" -> descending?, path
-- A raw "+" in the query decodes to a space: take it as the "+" it was.
local function parse_orderby(value)
  local sign, path = value:match("^([%+%- ]?)(.*)$")
  if not valid_path(path) then return nil end
  return sign == "-", path
end

-- Sort key classes: numbers, then strings, then anything else/missing.
local function sort_runs(runs, descending, path)
  local keyed = {}
  for i, run in ipairs(runs) do
    local v = field(run, path)
    local class = type(v) == "number" and 1 or type(v) == "string" and 2 or 3
    if class == 2 then v = v:lower() elseif class == 3 then v = 0 end
    keyed[i] = { run = run, class = class, key = v, index = i }
  end
  table_sort(keyed, function(a, b)
    if a.class ~= b.class then return a.class < b.class end   -- missing last, either way
    if a.key ~= b.key then
      if descending then return a.key > b.key end
      return a.key < b.key
    end
    if descending then return a.index > b.index end
    return a.index < b.index
  end)
  for i, k in ipairs(keyed) do runs[i] = k.run end
  return runs
end

-- The token: base64 of magic (3 bytes), limit (1), offset (4, big-endian)
-- and the first 8 bytes of md5(query signature): 16 bytes, so the base64
-- always holds "+", "/" and "=".
local function make_token(offset, limit, signature)
  local b = {}
  for shift = 24, 0, -8 do b[#b + 1] = math_floor(offset / 2 ^ shift) % 256 end
  return ngx.encode_base64(TOKEN_MAGIC .. str_char(limit) .. str_char(b[1], b[2], b[3], b[4])
                           .. str_sub(ngx.md5_bin(signature), 1, 8))
end

-- token -> offset, limit, signature bytes; nil when it is not one of ours
local function read_token(token)
  local raw = ngx.decode_base64(token)
  if not raw or #raw ~= 16 or str_sub(raw, 1, 3) ~= TOKEN_MAGIC then return nil end
  local offset = 0
  for i = 5, 8 do offset = offset * 256 + str_byte(raw, i) end
  return offset, str_byte(raw, 4), str_sub(raw, 9, 16)
end

-- GET /runs or GET /flows over `all` (runs or flows, in store order).
-- opts.path: the listing's path ("/runs"), for the next link; opts.kind:
-- nil for runs, else a word that binds its tokens to this listing (a runs
-- token is refused by /flows, and the other way round).
function _M.list(all, query_list, request_id, sc, opts)
  local path = opts and opts.path or "/runs"
  local kind = opts and opts.kind
  local function bad(code, title, detail)
    return problem(code, 400, title, detail, request_id)
  end
  local q = query_table(query_list, { property = true })
  for _, name in ipairs({ "limit", "orderby", "count", "continuationToken" }) do
    if q[name] == false then
      return bad("FLOW-1111-400", "Invalid query parameter",
                 "The query parameter " .. name .. " must not repeat.")
    end
  end

  local filters = {}
  for _, expr in ipairs(q.property or {}) do
    local f, why = parse_filter(expr)
    if not f then
      return bad("FLOW-1107-400", "Invalid property filter",
                 "invalid property filter '" .. expr .. "': " .. why .. ".")
    end
    filters[#filters + 1] = f
  end

  local descending, order_path = true, "createdAt"
  if q.orderby then
    descending, order_path = parse_orderby(q.orderby)
    if descending == nil then
      return bad("FLOW-1111-400", "Invalid orderby",
                 "invalid orderby '" .. q.orderby .. "': expected [+|-]<field path>.")
    end
  end

  local limit
  if q.limit then
    limit = q.limit:match("^%d+$") and tonumber(q.limit)
    if not limit or limit < 1 or limit > MAX_LIMIT then
      return bad("FLOW-1108-400", "Invalid limit",
                 "limit must be an integer from 1 to " .. MAX_LIMIT .. ", not '" .. q.limit .. "'.")
    end
  end

  local selected = {}
  for _, run in ipairs(all) do
    local ok = true
    for _, f in ipairs(filters) do
      if not matches(run, f) then ok = false break end
    end
    if ok then selected[#selected + 1] = run end
  end

  if q.count == "true" then
    if limit then
      return bad("FLOW-1109-400", "Invalid query parameters",
                 "count=true cannot be combined with limit.")
    end
    return json_reply(200, { count = #selected })
  end

  -- What a continuationToken is bound to: the filter set (in any order)
  -- and the order. The limit is not part of it.
  local exprs = {}
  for i, expr in ipairs(q.property or {}) do exprs[i] = expr end
  table_sort(exprs)
  local order = (descending and "-" or "+") .. order_path
  local signature = order .. "\n" .. table_concat(exprs, "\n")
  if kind then signature = kind .. "\n" .. signature end

  local offset = 0
  local token = q.continuationToken
  if token then
    local t_offset, t_limit, t_sig = read_token(token)
    if not t_offset then
      return bad("FLOW-1110-400", "Invalid continuationToken",
                 "The continuationToken is not valid.")
    end
    if t_sig ~= str_sub(ngx.md5_bin(signature), 1, 8) then
      return bad("FLOW-1110-400", "continuationToken does not match the query",
                 "continuationToken does not match the query: repeat the property filters "
                 .. "and orderby it was issued for.")
    end
    offset = t_offset
    limit = limit or t_limit
  end
  limit = limit or DEFAULT_LIMIT

  sort_runs(selected, descending, order_path)
  local items = {}
  for i = offset + 1, math.min(offset + limit, #selected) do items[#items + 1] = selected[i] end

  local links = "{}"
  if offset + limit < #selected then
    local next_token = make_token(offset + limit, limit, signature)
    if sc and sc.repeat_token and token then next_token = token end
    local href = path .. "?"
    if sc and sc.link_style == "full" then
      local parts = {}
      for _, expr in ipairs(q.property or {}) do
        parts[#parts + 1] = "property=" .. escape_component(expr)
      end
      parts[#parts + 1] = "orderby=" .. escape_component(order)
      if q.limit then parts[#parts + 1] = "limit=" .. limit end
      href = href .. table_concat(parts, "&") .. "&"
    end
    href = href .. "continuationToken=" .. escape_component(next_token)
    links = encode({ next = { href = href } })
  end
  return reply.items_reply(items, links)
end

_M.field = field

return _M
