-- Contender: what a Lua user writes without this module. LuaSec's
-- ssl.https.request per call (it speaks HTTP/1.1 only and opens a new
-- connection, with a full TLS handshake, for every request), the same
-- headers, the CA for verification, the reply decoded with cjson.
--   lua5.4 bench/luasocket.lua BASE_URL CAFILE N [nodelay]
-- Prints: calls=N seconds=S etag=E label=L
--
-- LuaSocket's http writes the request line and the headers separately; with
-- Nagle on, the second write waits for the server's delayed ACK (~40 ms on
-- Linux) on every call. "nodelay" sets TCP_NODELAY after connect (LuaSec's
-- https.request refuses a `create` function, hence the patched metatable),
-- to show what the TLS handshake per call costs on its own.
local https = require "ssl.https"
local ltn12 = require "ltn12"
local cjson = require "cjson"
local monotime = require("system").monotime

local assert, error, tonumber, tostring = assert, error, tonumber, tostring
local concat = table.concat
local str_format = string.format

local RUN_ID = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"

local base, ca, n, nodelay = arg[1], arg[2], tonumber(arg[3]), arg[4] == "nodelay"
assert(base and ca and n, "usage: luasocket.lua BASE_URL CAFILE N [nodelay]")
local label = nodelay and "LuaSocket+LuaSec, TCP_NODELAY" or "LuaSocket+LuaSec"

if nodelay then
  local socket = require "socket"
  local methods = getmetatable(socket.tcp()).__index
  local connect = methods.connect
  methods.connect = function(sock, ...)
    local ok, err = connect(sock, ...)
    if ok then assert(sock:setoption("tcp-nodelay", true)) end
    return ok, err
  end
end
local url = base .. "/runs/" .. RUN_ID .. "/action?op=re-trigger"

-- A version-4 UUID per call, as the client sends.
local random = math.random
local function uuid()
  return str_format("%08x-%04x-4%03x-%04x-%04x%08x", random(0, 0xffffffff),
    random(0, 0xffff), random(0, 0xfff), random(0x8000, 0xbfff),
    random(0, 0xffff), random(0, 0xffffffff))
end

local function retrigger()
  local chunks = {}
  local ok, status = https.request{
    url = url,
    method = "POST",
    headers = {
      ["authorization"] = "Bearer bench-token",
      ["x-api-key"] = "bench-key",
      ["x-gw-ims-org-id"] = "BENCH@AdobeOrg",
      ["x-sandbox-name"] = "prod",
      ["content-type"] = "application/json",
      ["accept"] = "application/json",
      ["x-request-id"] = uuid(),
      ["user-agent"] = "lua-flowservice-bench-luasocket",
      ["content-length"] = "0",
    },
    source = ltn12.source.empty(),
    sink = ltn12.sink.table(chunks),
    cafile = ca,
    verify = "peer",
  }
  if not ok then return nil, status end
  if status ~= 200 then return nil, "HTTP " .. tostring(status) end
  return cjson.decode(concat(chunks))
end

local run, err
local start = monotime()
for _ = 1, n do
  run, err = retrigger()
  if not run then error("call failed: " .. tostring(err)) end
end
local seconds = monotime() - start

io.write(("calls=%d seconds=%.6f etag=%s label=%s\n"):format(n, seconds, run.etag, label))
