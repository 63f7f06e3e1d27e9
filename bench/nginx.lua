-- `make bench-nginx`: lua-flowservice inside nginx at nginx's own speed.
--
-- One nginx worker (bench/nginx_subject.conf.in) serves wrk; each request
-- makes one re-trigger against a backend nginx that answers after 50 ms
-- (bench/nginx_backend.conf.in). Four handlers in the same worker, measured
-- in the same run, in an order that rotates every round: /flow, the worker's
-- shared lua-flowservice client (one pump, a semaphore per waiting request),
-- /wire, a client with transport = "nginx" (the run action over cosockets),
-- /floor, the same exchange written by hand on ngx.socket.tcp with a
-- keep-alive pool, and /sketch, issue 13's sketch (a bare `core` client, one
-- timer stepping it every 1 ms while anything is in flight, a semaphore per
-- request posted after a scan of the waiters). Per contender and connection count: requests/s, p50 and
-- p99 latency (wrk --latency), and the worker's CPU per request (utime +
-- stime from /proc/PID/stat around the measured run; beside it the time the
-- scheduler counts it on a CPU, /proc/PID/schedstat, in nanoseconds), and
-- the worker's Lua heap per request in flight (one sample per handler and
-- size before the rounds: heap_per_request).
--
--   lua5.4 bench/nginx.lua      from the repository root, after `make trees`
-- Environment (defaults in brackets):
--   BENCH_NGINX_CONNS [100,1000]   wrk -c values
--   BENCH_NGINX_SECONDS [6]        seconds per measured run
--   BENCH_NGINX_ROUNDS [5]         rounds; the table shows the median
--   BENCH_NGINX_DELAY [0.05]       the backend's answer delay, seconds
--   BENCH_NGINX_ONLY [floor,sketch,flow,wire]  the handlers measured (the floor always)
-- Besides the medians, each handler's CPU, requests/s and p50 are set
-- against the floor's of the same round (run minutes apart at most): the
-- median of those paired ratios (for p50, differences) is what the verdicts
-- read, as other load on a shared machine moves whole rounds more than it
-- moves one handler against another.
package.path = "./?.lua;" .. package.path

local nginx = require "spec.support.nginx"
local util = nginx.util
local support = require "bench.support"
local run, median = support.run, support.median

local assert, ipairs, tonumber, tostring = assert, ipairs, tonumber, tostring
local io_stderr, os_getenv = io.stderr, os.getenv
local str_format = string.format
local table_concat = table.concat

local CONNS = {}
for n in (os_getenv("BENCH_NGINX_CONNS") or "100,1000"):gmatch("%d+") do CONNS[#CONNS + 1] = tonumber(n) end
local SECONDS = tonumber(os_getenv("BENCH_NGINX_SECONDS") or "6")
local ROUNDS = tonumber(os_getenv("BENCH_NGINX_ROUNDS") or "5")
local DELAY = tonumber(os_getenv("BENCH_NGINX_DELAY") or "0.05")
local SNAPSHOT = "build/bench/tree-5.1"
local CONTENDERS = { "floor" }
for name in (os_getenv("BENCH_NGINX_ONLY") or "floor,sketch,flow,wire"):gmatch("[%w_]+") do
  if name ~= "floor" then CONTENDERS[#CONTENDERS + 1] = name end
end
local LABEL = { floor = "floor: `ngx.socket.tcp` keep-alive POST by hand",
  sketch = "issue 13's sketch: bare `core` client, 1 ms timer, scan",
  flow = "lua-flowservice shared client (pump)",
  wire = "lua-flowservice client, `transport = \"nginx\"`" }

local function log(...) io_stderr:write(str_format(...), "\n") end

-- utime + stime of a process, in seconds
local CLK_TCK = tonumber(run("getconf CLK_TCK")) or 100
local function cpu_seconds(pid)
  local stat = assert(util.read_file("/proc/" .. pid .. "/stat"), "no worker " .. pid)
  local rest = stat:match("%) (.*)$")
  local fields = {}
  for f in rest:gmatch("%S+") do fields[#fields + 1] = f end
  -- after the command: state is field 3, utime 14, stime 15 (1-based, of the whole line)
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

-- The same process's time on a CPU, in seconds, as the scheduler counts it
-- (/proc/PID/schedstat's first field, nanoseconds): /proc/PID/stat gives
-- whole clock ticks (10 ms), a few percent of a run at 100 connections.
local function oncpu_seconds(pid)
  local ns = (util.read_file("/proc/" .. pid .. "/schedstat") or ""):match("^(%d+)")
  return ns and tonumber(ns) / 1e9 or nil
end

local UNIT = { us = 1e-3, ms = 1, s = 1e3, m = 6e4 }
local function ms_of(text)
  local n, unit = text:match("^([%d%.]+)(%a+)$")
  return tonumber(n) * assert(UNIT[unit], "unit of " .. tostring(text))
end

local function wrk(url, conns, seconds)
  local out = run(str_format("wrk -t1 -c%d -d%ds --latency --timeout 10s %s", conns, seconds,
    util.quote(url)))
  local r = {
    rps = tonumber(out:match("Requests/sec:%s+([%d%.]+)")),
    requests = tonumber(out:match("(%d+) requests in")),
    p50 = ms_of(out:match("\n%s*50%%%s+(%S+)")),
    p99 = ms_of(out:match("\n%s*99%%%s+(%S+)")),
    bad = tonumber(out:match("Non%-2xx or 3xx responses: (%d+)") or "0"),
  }
  local c, rd, w, t = out:match("Socket errors: connect (%d+), read (%d+), write (%d+), timeout (%d+)")
  r.socket_errors = c and (tonumber(c) + tonumber(rd) + tonumber(w) + tonumber(t)) or 0
  assert(r.rps and r.requests and r.p50 and r.p99, "cannot read wrk's output:\n" .. out)
  return r
end

-- The worker's Lua heap a request in flight holds, in bytes: halfway through
-- a 3 s run at conns connections, the heap after a full collection less the
-- idle worker's just before, over the requests in a handler at that moment
-- (nearly every connection's: each waits out the backend's delay). One sample
-- per handler and size, before the timed rounds (a collection takes the
-- worker's time). Approximate by what the idle heap holds that a busy one
-- does not: a client's spare transfers (up to 64 of ~0.9 KiB), say.
local function read_heap(out)
  local kb, inflight = tonumber(out:match('"kb":([%d%.e+]+)')), tonumber(out:match('"inflight":(%d+)'))
  assert(kb and inflight, "cannot read /heap: " .. out)
  return kb, inflight
end

local function heap_per_request(base, name, conns)
  local heap = "curl -s --noproxy '*' " .. util.quote(base .. "/heap")
  wrk(base .. "/" .. name, conns, 1) -- warm, as the rounds are
  local idle, left
  for _ = 1, 50 do -- the requests wrk left behind finish (the backend's delay)
    idle, left = read_heap(run(heap))
    if left == 0 then break end
    run("sleep 0.2")
  end
  assert(left == 0, "requests still in flight 10 s after the warm-up: " .. left)
  -- one shell: wrk in the background, the sample halfway, then wait for wrk to end
  local busy, inflight = read_heap(run(str_format("wrk -t1 -c%d -d3s --timeout 10s %s > /dev/null 2>&1 &"
    .. " sleep 1.5; %s; wait", conns, util.quote(base .. "/" .. name), heap)))
  return inflight > 0 and (busy - idle) * 1024 / inflight or 0 / 0, inflight
end

local function main()
  run("rm -rf " .. SNAPSHOT .. " && mkdir -p build/bench && cp -a build/tree-5.1 " .. SNAPSHOT)
  local root = run("pwd"):gsub("%s+$", "")
  local backend = nginx.start { template = "bench/nginx_backend.conf.in", name = "bench_backend",
    vars = { DELAY = DELAY } }
  local ok, err, pump = pcall(function()
    local subject = nginx.start { template = "bench/nginx_subject.conf.in", name = "bench_subject",
      vars = { TREE = root .. "/" .. SNAPSHOT, ROOT = root, BACKEND_PORT = backend.ports[1] },
      ready = "/health" }
    local ok2, err2, pump = pcall(function()
      local worker = tonumber(run("curl -s --noproxy '*' " .. subject.url .. "/pump"):match('"pid":(%d+)'))
      assert(worker, "no worker pid")
      local results = {} -- [conns][contender] = { rounds }
      for _, conns in ipairs(CONNS) do
        results[conns] = {}
        for _, name in ipairs(CONTENDERS) do
          results[conns][name] = {}
          local bytes, inflight = heap_per_request(subject.url, name, conns)
          results[conns][name].heap = bytes
          log("c=%d %-6s Lua heap %6.0f bytes per request in flight (%d in flight)", conns, name, bytes, inflight)
        end
        for round = 1, ROUNDS do
          local order = {} -- rotates: each contender goes first, second and third in turn
          for i = 1, #CONTENDERS do order[i] = CONTENDERS[(i + round - 2) % #CONTENDERS + 1] end
          for _, name in ipairs(order) do
            local url = subject.url .. "/" .. name
            wrk(url, conns, 1) -- warm: connections to the backend, JIT
            local before, on_before = cpu_seconds(worker), oncpu_seconds(worker)
            local r = wrk(url, conns, SECONDS)
            r.cpu_us = (cpu_seconds(worker) - before) / r.requests * 1e6
            local on_after = oncpu_seconds(worker)
            r.oncpu_us = on_before and on_after and (on_after - on_before) / r.requests * 1e6 or 0 / 0
            log("c=%d round %d %-6s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  cpu %6.1f us/req"
              .. "  on-cpu %6.1f us/req  bad %d",
              conns, round, name, r.rps, r.p50, r.p99, r.cpu_us, r.oncpu_us, r.bad + r.socket_errors)
            local list = results[conns][name]
            list[#list + 1] = r
          end
        end
      end
      local pump = run("curl -s --noproxy '*' " .. subject.url .. "/pump")
      return results, pump
    end)
    subject:stop()
    if not ok2 then error(err2, 0) end
    return err2, pump
  end)
  backend:stop()
  if not ok then error(err, 0) end
  return err, pump
end

local function report(results)
  local lines = {
    str_format("One nginx worker, wrk -t1, %d s per run, backend answering after %g ms; median of %d rounds (× floor: the median of each round's ratio to the floor's in that round).",
      SECONDS, DELAY * 1000, ROUNDS), "",
    "| connections | handler | requests/s | × floor | p50 ms | over floor's | p99 ms | worker CPU µs/request"
      .. " | × floor | on-CPU µs/request (schedstat) | × floor | errors |",
    "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
  }
  -- the median over rounds of a handler's key against the floor's in that
  -- round: as a ratio, or (difference) as what it is over the floor's
  local function paired(rounds, floor_rounds, key, difference)
    local list = {}
    for i, r in ipairs(rounds) do
      list[i] = difference and r[key] - floor_rounds[i][key] or r[key] / floor_rounds[i][key]
    end
    return median(list)
  end
  local verdicts = {}
  for _, conns in ipairs(CONNS) do
    local m = {}
    for _, name in ipairs(CONTENDERS) do
      local rounds, f = results[conns][name], {}
      for _, key in ipairs { "rps", "p50", "p99", "cpu_us", "oncpu_us" } do
        local list = {}
        for i, r in ipairs(rounds) do list[i] = r[key] end
        f[key] = median(list)
      end
      f.errors = 0
      for _, r in ipairs(rounds) do f.errors = f.errors + r.bad + r.socket_errors end
      m[name] = f
    end
    for _, name in ipairs(CONTENDERS) do
      local f = m[name]
      f.rps_x = paired(results[conns][name], results[conns].floor, "rps")
      f.cpu_x = paired(results[conns][name], results[conns].floor, "cpu_us")
      f.oncpu_x = paired(results[conns][name], results[conns].floor, "oncpu_us")
      f.p50_over = paired(results[conns][name], results[conns].floor, "p50", true)
      lines[#lines + 1] = str_format("| %d | %s | %.0f | %.2f | %.2f | %+.2f | %.2f | %.1f | %.2f | %.1f | %.2f | %d |",
        conns, LABEL[name], f.rps, f.rps_x, f.p50, f.p50_over, f.p99, f.cpu_us, f.cpu_x, f.oncpu_us,
        f.oncpu_x, f.errors)
    end
    for _, name in ipairs(CONTENDERS) do
      local fs = m[name]
      if name ~= "floor" and name ~= "sketch" then
        verdicts[#verdicts + 1] = str_format("c=%d %s: requests/s %.2fx floor (>= 1.0: %s), CPU %.2fx floor"
          .. " (<= 1.0: %s; on-CPU by schedstat %.2fx), p50 %+.2f ms over floor (<= 1 ms: %s), errors %d",
          conns, name, fs.rps_x, fs.rps_x >= 1 and "yes" or "NO", fs.cpu_x, fs.cpu_x <= 1 and "yes" or "NO",
          fs.oncpu_x, fs.p50_over, fs.p50_over <= 1 and "yes" or "NO", fs.errors)
      end
    end
  end
  print(table_concat(lines, "\n"))
  print()
  for _, v in ipairs(verdicts) do print(v) end
  print()
  for _, conns in ipairs(CONNS) do
    local held = {}
    for _, name in ipairs(CONTENDERS) do
      held[#held + 1] = str_format("%s %.0f", name, results[conns][name].heap)
    end
    print(str_format("c=%d Lua heap per request in flight, bytes: %s", conns, table_concat(held, ", ")))
  end
end

local ok, results, pump = pcall(main)
if not ok then
  io_stderr:write("bench-nginx: ", tostring(results), "\n")
  os.exit(1)
end
report(results)
log("pump: %s", pump)
