-- Contender: Debian's lua-curl binding (package lua-curl, `require "curl"`),
-- what a LuaJIT user writes by hand: one easy handle reused for N POSTs to
-- the same action URL, the same headers with a fresh x-request-id per call
-- (a new header list, as the binding takes it), the reply collected by a
-- Lua write callback and checked for a run id (the binding has no getinfo).
--   luajit bench/luacurl.lua BASE_URL CAFILE N [h1|h2]
-- Prints the line bench/run.lua parses: calls=N seconds=S etag=E label=L
package.path = "./?.lua;" .. package.path

local curl = require "curl"
local monotime = require("system").monotime

local assert, error = assert, error
local byte, format = string.byte, string.format
local concat = table.concat

local base, ca, n, port = arg[1], arg[2], tonumber(arg[3]), arg[4] or "h2"
assert(base and ca and n, "usage: luacurl.lua BASE_URL CAFILE N [h1|h2]")

local RUN_ID = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"

-- A version-4 UUID from /dev/urandom bytes, as the client and the floor send.
local urandom = assert(io.open("/dev/urandom", "rb"))
local function uuid()
  local b = { byte(urandom:read(16), 1, 16) }
  b[7] = b[7] % 16 + 64
  b[9] = b[9] % 64 + 128
  return format("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
    b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
    b[15], b[16])
end

local e = curl.easy_init()
local chunks, nchunks = {}, 0
-- setopt returns nothing and raises on a bad option; perform returns 0 or
-- a CURLcode and its message.
e:setopt(curl.OPT_URL, base .. "/runs/" .. RUN_ID .. "/action?op=re-trigger")
e:setopt(curl.OPT_NOSIGNAL, 1)
e:setopt(curl.OPT_CAINFO, ca)
e:setopt(curl.OPT_HTTP_VERSION, port == "h1" and curl.HTTP_VERSION_1_1 or curl.HTTP_VERSION_NONE)
e:setopt(curl.OPT_POST, 1)
e:setopt(curl.OPT_POSTFIELDS, "")
e:setopt(curl.OPT_POSTFIELDSIZE, 0)
e:setopt(curl.OPT_TIMEOUT_MS, 60000)
e:setopt(curl.OPT_CONNECTTIMEOUT_MS, 10000)
e:setopt(curl.OPT_WRITEFUNCTION, function(s, len)
  nchunks = nchunks + 1
  chunks[nchunks] = s
  return len
end)

local body
local start = monotime()
for _ = 1, n do
  e:setopt(curl.OPT_HTTPHEADER, {
    "Authorization: Bearer bench-token", "x-api-key: bench-key",
    "x-gw-ims-org-id: BENCH@AdobeOrg", "x-sandbox-name: prod",
    "Content-Type: application/json", "Accept: application/json",
    "x-request-id: " .. uuid(), "User-Agent: lua-flowservice-bench-luacurl" })
  nchunks = 0
  local code, err = e:perform()
  if code ~= 0 then error("perform failed: " .. tostring(err)) end
  body = concat(chunks, "", 1, nchunks)
  if not body:find('"id"', 1, true) then error("reply: " .. body) end
end
local seconds = monotime() - start

io.write(format("calls=%d seconds=%.6f etag=%s label=lua-curl\n", n, seconds,
  body:match('"etag":"\\"([^\\]*)') or ""))
