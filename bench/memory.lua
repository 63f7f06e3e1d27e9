-- Memory check: N re-triggers through one client (see bench/subject.lua),
-- resident set size (VmRSS) read after a warm-up and at checkpoints, each
-- after a full collection so Lua garbage is not mistaken for a leak.
--   lua5.4 bench/memory.lua BASE_URL CAFILE [N [LIMIT_KB]]
-- N defaults to 100,000. Prints the
-- checkpoints, then "PASS"/"FAIL" (exit status 0/1): growth from the
-- warm-up to the end under LIMIT_KB (default 1024).
package.path = "./?.lua;" .. package.path

local subject = require "bench.subject"

local assert, error, tonumber, tostring = assert, error, tonumber, tostring
local collectgarbage, io_open, io_write = collectgarbage, io.open, io.write
local str_format = string.format

local WARMUP = 1000
local CHECKPOINTS = 10

local base, ca, n, limit = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4] or "1024")
assert(base and ca, "usage: memory.lua BASE_URL CAFILE [N [LIMIT_KB]]")

local function rss_kb()
  local f = assert(io_open("/proc/self/status"))
  local status = f:read("a")
  f:close()
  return tonumber(status:match("VmRSS:%s*(%d+)%s*kB"))
end

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")  -- a second pass runs what the first one's finalizers freed
  return rss_kb(), collectgarbage("count")
end

local s = subject.open(base, ca)
n = n or 100000
local call = s.call
local last  -- the last reply: its etag names the protocol and the connection's request count
local function calls(k)
  for _ = 1, k do
    local run, err = call()
    if not run then error("call failed: " .. tostring(err)) end
    last = run
  end
end

calls(WARMUP)
local base_rss, base_heap = settle()
io_write(str_format("%s, %d calls after a %d-call warm-up\n", s.label, n, WARMUP))
io_write(str_format("%9s %10s %10s %12s\n", "calls", "VmRSS kB", "growth kB", "Lua heap kB"))
io_write(str_format("%9d %10d %10d %12.1f\n", 0, base_rss, 0, base_heap))
local done, rss = 0, base_rss
for i = 1, CHECKPOINTS do
  local upto = n * i // CHECKPOINTS
  calls(upto - done)
  done = upto
  local heap
  rss, heap = settle()
  io_write(str_format("%9d %10d %10d %12.1f\n", done, rss, rss - base_rss, heap))
end
s.close()

io_write(str_format("last reply's etag: %s (protocol, requests its connection carried)\n", last.etag))
local growth = rss - base_rss
local pass = growth < limit
io_write(str_format("RSS growth %d kB over %d calls (limit %d kB): %s\n",
                    growth, n, limit, pass and "PASS" or "FAIL"))
os.exit(pass and 0 or 1)
