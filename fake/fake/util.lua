-- Small helpers every part of the fake shares: JSON (a private cjson
-- instance), ids and etags, clocks, query strings, request bodies, a seeded
-- generator. No state of its own but math.random's seed flag.

local ngx = ngx
local cjson = require("cjson").new()   -- a private instance: settings stay ours

local io_open = io.open
local ipairs, pairs, pcall, tostring, type = ipairs, pairs, pcall, tostring, type
local math_floor, math_random, math_randomseed = math.floor, math.random, math.randomseed
local str_byte, str_format = string.byte, string.format

local _M = { cjson = cjson }

-- cjson 2.1.0 (Debian) allows at most 14 significant digits, which is also
-- its default: epoch milliseconds (13 digits) round-trip exactly with it.
cjson.encode_number_precision(14)

local seeded = false
local function random_hex(template)
  if not seeded then
    -- Seed in the worker, not in init_by_lua (the master), so ids differ
    -- between fake servers started in the same second.
    math_randomseed(math_floor(ngx.now() * 1000) + ngx.worker.pid())
    seeded = true
  end
  return (template:gsub("[xy]", function(c)
    local v = (c == "x") and math_random(0, 15) or math_random(8, 11)
    return str_format("%x", v)
  end))
end

local function uuid4()
  return random_hex("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx")
end

local function new_etag()
  -- Cosmos DB style, as Adobe returns them, with the literal quotes.
  return '"' .. random_hex("xxxxxxxx-0000-0200-0000-xxxxxxxxxxxx") .. '"'
end

local function now_ms()
  ngx.update_time()
  return math_floor(ngx.now() * 1000)
end

local function encode(value)
  -- cjson escapes "/" as "\/"; Adobe does not, and readable bodies help when
  -- a test fails. A literal "/" is always escaped, so after an escaped
  -- backslash ("\\") no raw "/" can follow and the substitution is exact.
  return (cjson.encode(value):gsub("\\/", "/"))
end

-- cjson 2.1.0 has no empty-array marker: an empty Lua table encodes as {}.
local function encode_array(list)
  if #list == 0 then return "[]" end
  return encode(list)
end

-- Percent-escape everything but RFC 3986's unreserved characters, so "+",
-- "/", "=" and "," in a query value always travel escaped.
local function escape_component(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c)
    return str_format("%%%02X", str_byte(c))
  end))
end

-- A query string or form body as an ordered list of { key, value }, decoded
-- the form-urlencoded way: "+" is a space, "%2B" a plus. Parsed by hand
-- rather than with ngx.req.get_uri_args, so the decoding is exactly this.
local function parse_query(text)
  local list = {}
  for part in (text or ""):gmatch("[^&]+") do
    local k, eq, v = part:match("^([^=]*)(=?)(.*)$")
    local function dec(x) return ngx.unescape_uri((x:gsub("%+", " "))) end
    list[#list + 1] = { dec(k), eq == "=" and dec(v) or "" }
  end
  return list
end

-- { key = value } from parse_query's list; a repeated key maps to false
-- (the callers refuse it), except keys in `multi`, which collect an array.
local function query_table(list, multi)
  local t = {}
  for _, kv in ipairs(list) do
    local k, v = kv[1], kv[2]
    if multi and multi[k] then
      t[k] = t[k] or {}
      t[k][#t[k] + 1] = v
    elseif t[k] == nil then
      t[k] = v
    else
      t[k] = false
    end
  end
  return t
end

local function set_of(list)
  local set = {}
  if type(list) == "table" then
    for _, v in ipairs(list) do set[v] = true end
  end
  return set
end

local MAX_INTEGER = 1e14   -- cjson sends 14 significant digits exactly

local function whole(v, min)
  return type(v) == "number" and v == math_floor(v) and v >= min and v < MAX_INTEGER
end

local function read_file(path)
  local f, err = io_open(path, "rb")
  if not f then return nil, err end
  local data = f:read("*a")
  f:close()
  return data
end


-- A repeated header arrives as an array; the real gateway would not accept
-- that as a credential either.
local function single(value)
  if type(value) == "string" then return value end
  if value == nil then return nil end
  return false
end

local function read_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local file = ngx.req.get_body_file()   -- only if it outgrew the buffer
  if file then return read_file(file) or "" end
  return ""
end

local function plain_copy(t)
  local copy = {}
  for k, v in pairs(t or {}) do copy[k] = v end
  return copy
end

-- A JSON object from a control request's body, or nil.
local function decode_object(text)
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then return nil end
  return t
end

-- A private generator: math.random also makes ids and etags, and would
-- shift seeded sequences whenever a test makes one more run. Park-Miller's
-- minimal standard, x = x * 48271 mod (2^31 - 1): every product stays below
-- 2^47, so LuaJIT's doubles compute it exactly.
local PRNG_MODULUS, PRNG_MULTIPLIER = 2147483647, 48271
local PRNG_WARMUP = 8   -- neighbouring seeds start out as neighbours: stir first

local function new_prng(seed)
  local span = PRNG_MODULUS - 1
  local x = seed % span
  -- % on doubles is a - floor(a / b) * b; for a seed near 2^46 the quotient
  -- may round across an integer, leaving x just outside 0 .. span - 1
  if x < 0 then x = x + span elseif x >= span then x = x - span end
  x = x + 1   -- 1 .. 2^31 - 2: a state of 0 would stay 0
  local function draw()
    x = (x * PRNG_MULTIPLIER) % PRNG_MODULUS
    return (x - 1) / span   -- [0, 1)
  end
  for _ = 1, PRNG_WARMUP do draw() end
  return draw
end

_M.random_hex = random_hex
_M.uuid4 = uuid4
_M.new_etag = new_etag
_M.now_ms = now_ms
_M.encode = encode
_M.encode_array = encode_array
_M.escape_component = escape_component
_M.parse_query = parse_query
_M.query_table = query_table
_M.set_of = set_of
_M.MAX_INTEGER = MAX_INTEGER
_M.whole = whole
_M.read_file = read_file
_M.single = single
_M.read_body = read_body
_M.plain_copy = plain_copy
_M.decode_object = decode_object
_M.new_prng = new_prng

return _M
