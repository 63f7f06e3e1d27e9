-- The benchmark: the client against the floor of its design and against
-- what a Lua or shell user would do without it, on a fast local endpoint.
--
--   lua5.4 bench/run.lua            speed table (Markdown) on stdout
--   lua5.4 bench/run.lua memory     RSS growth over many calls, PASS/FAIL
--
-- Run from the repository root after `make build` (bench/run.sh does both).
-- Environment (defaults in brackets):
--   BENCH_N [20000]       calls per round for the floor and the client (fewer is noisy)
--   BENCH_SLOW_N [100]    calls per round for LuaSocket and the curl CLI
--   BENCH_ROUNDS [5]      rounds; the table shows the median round
--   BENCH_ONLY            comma list of contenders: floor,client,client-luajit,lua-curl,
--                         luasocket,nodelay,curl
--   BENCH_MEMORY_N        calls for the memory check [100000]
--   BENCH_MEMORY_PORTS    [h1,h2]
--   BENCH_TREE            a module tree to use as is, instead of a snapshot of build/tree
--   BENCH_TREE_51         the same for LuaJIT, instead of a snapshot of build/tree-5.1
--   BENCH_CPUS [0,0]      "NGINX_CPU,CONTENDER_CPU": nginx (its one worker) runs pinned
--                         to the first CPU and every contender alike to the second
--                         (taskset; the same one by default, see cpus()); "off"
--                         leaves both to the scheduler
--
-- Every contender runs in its own process, times its own loop with a
-- monotonic clock and prints "calls=N seconds=S etag=E label=L". nginx puts
-- $server_protocol and $connection_requests in the etag, so the table shows
-- what each one spoke and whether its connection carried all its calls.
package.path = "./?.lua;" .. package.path

local bench_server = require "bench.server"

local assert, error, ipairs, pcall, tonumber, tostring, xpcall =
      assert, error, ipairs, pcall, tonumber, tostring, xpcall
local io_open, io_popen, io_stderr, io_write = io.open, io.popen, io.stderr, io.write
local os_exit, os_getenv = os.exit, os.getenv
local str_format = string.format
local table_concat, table_sort = table.concat, table.sort

local N = tonumber(os_getenv("BENCH_N") or "20000")
local SLOW_N = tonumber(os_getenv("BENCH_SLOW_N") or "100")
local ROUNDS = tonumber(os_getenv("BENCH_ROUNDS") or "5")
local PORTS = { "h1", "h2" }
local PORT_TITLE = { h1 = "HTTP/1.1-only port", h2 = "HTTP/2 port" }
local FLOOR = "build/bench/floor"
local SNAPSHOT = "build/bench/tree"
local SNAPSHOT_51 = "build/bench/tree-5.1"

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function log(...)
  io_stderr:write(str_format(...), "\n")
end

local function read_file(path)
  local f = io_open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

local function capture(cmd)
  local p = assert(io_popen(cmd .. " 2>&1", "r"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok
end

local function run(cmd)
  local out, ok = capture(cmd)
  if not ok then error(str_format("command failed: %s\n%s", cmd, out), 0) end
  return out
end

---------------------------------------------------------------------------
-- preparation

-- Other work may rebuild build/tree while the benchmark runs; a copy keeps
-- every round on the same module.
local function module_tree()
  local given = os_getenv("BENCH_TREE")
  if given then return given end
  if not read_file("build/tree/lib/lua/5.4/flowservice/core.so") then
    error("no build/tree/lib/lua/5.4/flowservice/core.so: run `make build` first"
          .. " (or set BENCH_TREE)", 0)
  end
  run(str_format("rm -rf %s && mkdir -p %s && cp -a build/tree/share build/tree/lib %s",
                 SNAPSHOT, SNAPSHOT, SNAPSHOT))
  return SNAPSHOT
end

-- The same for the LuaJIT contenders (the 5.1 tree of `make trees`).
local function module_tree_51()
  local given = os_getenv("BENCH_TREE_51")
  if given then return given end
  if not read_file("build/tree-5.1/lib/lua/5.1/flowservice/core.so") then
    error("no build/tree-5.1/lib/lua/5.1/flowservice/core.so: run `make trees` first"
          .. " (or set BENCH_TREE_51)", 0)
  end
  run(str_format("rm -rf %s && mkdir -p %s && cp -a build/tree-5.1/share build/tree-5.1/lib %s",
                 SNAPSHOT_51, SNAPSHOT_51, SNAPSHOT_51))
  return SNAPSHOT_51
end

local function build_floor()
  run("mkdir -p build/bench && gcc -O2 -std=c99 -Wall -Wextra -Werror -o "
      .. FLOOR .. " bench/floor.c -lcurl")
end

-- Where nginx and the contenders run. Left to the scheduler, a round's
-- time depends on whether the contender and nginx's worker share a core
-- or not: on two cores a call then waits for the other core to wake from
-- idle (twice per call), and the same contender's rounds came out bimodal
-- (~2x apart). Pinned, every contender runs on the same core as the
-- worker: a call is a plain hand-over between two processes, what each
-- costs is what its round measures, and other load of the machine tends
-- to the other core (CPU 1 also takes the disk's interrupts here).
local function cpus()
  local spec = os_getenv("BENCH_CPUS") or "0,0"
  if spec == "off" then return nil end
  local server_cpu, contender_cpu = spec:match("^(%d+),(%d+)$")
  if not server_cpu then error("BENCH_CPUS must be NGINX_CPU,CONTENDER_CPU or off", 0) end
  return tonumber(server_cpu), tonumber(contender_cpu)
end

-- Loopback only: a proxy from the environment would measure the proxy.
local function child_env(tree, tree_51, cpu)
  return "env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY"
         .. " -u ALL_PROXY -u all_proxy BENCH_TREE=" .. q(tree) .. " BENCH_TREE_51=" .. q(tree_51) .. " "
         .. (cpu and "taskset -c " .. cpu .. " " or "")
end

local function machine()
  local cpuinfo = read_file("/proc/cpuinfo") or ""
  local _, cores = cpuinfo:gsub("\nprocessor%s*:", "")
  if cpuinfo:match("^processor%s*:") then cores = cores + 1 end
  local mem = tonumber((read_file("/proc/meminfo") or ""):match("MemTotal:%s*(%d+)")) or 0
  local os_name = (read_file("/etc/os-release") or ""):match('PRETTY_NAME="([^"]*)"') or "?"
  local curl = capture("curl --version"):match("^[^\n]*") or "?"
  local ok, ssl = pcall(require, "ssl")
  local luajit = capture("luajit -v"):match("^(LuaJIT %S+)") or "?"
  local luacurl = capture("dpkg-query -W -f='${Version}' lua-curl"):match("^[%w.:+~-]+$") or "?"
  return str_format("%s, %d cores, %.0f GB RAM; %s, Linux %s; %s; %s; %s, %s; LuaSec %s; lua-curl %s",
    cpuinfo:match("model name%s*:%s*([^\n]+)") or "?", cores, mem / 1048576, os_name,
    capture("uname -r"):gsub("%s+$", ""), capture("nginx -v"):gsub("^nginx version: ", ""):gsub("%s+$", ""),
    (curl:match("(libcurl/%S+ %S+)") or curl) .. " " .. (curl:match("nghttp2/%S+") or ""), capture("lua5.4 -v"):match("Lua %S+") or "?",
    luajit, ok and ssl._VERSION or "?", luacurl)
end

---------------------------------------------------------------------------
-- contenders

local CONTENDERS = {
  { key = "floor", fast = true,
    name = "C floor: libcurl, one easy handle reused",
    cmd = function(url, ca, n, port)
      return str_format("%s %s %s %d %s", FLOOR, q(url), q(ca), n, port)
    end },
  { key = "client", fast = true,
    cmd = function(url, ca, n)
      return str_format("lua5.4 bench/client.lua %s %s %d", q(url), q(ca), n)
    end },
  { key = "client-luajit", fast = true,
    cmd = function(url, ca, n)
      return str_format("luajit bench/client.lua %s %s %d", q(url), q(ca), n)
    end },
  { key = "lua-curl", fast = true,
    name = "Debian's `lua-curl` under LuaJIT: one easy handle reused, a header list per call",
    cmd = function(url, ca, n, port)
      return str_format("luajit bench/luacurl.lua %s %s %d %s", q(url), q(ca), n, port)
    end },
  { key = "luasocket",
    name = "LuaSocket + LuaSec `https.request` per call",
    cmd = function(url, ca, n)
      return str_format("lua5.4 bench/luasocket.lua %s %s %d", q(url), q(ca), n)
    end },
  { key = "nodelay",
    name = "same, with TCP_NODELAY patched in",
    cmd = function(url, ca, n)
      return str_format("lua5.4 bench/luasocket.lua %s %s %d nodelay", q(url), q(ca), n)
    end },
  { key = "curl",
    name = "`curl` command per call",
    cmd = function(url, ca, n, port)
      return str_format("bench/curl.sh %s %s %d %s", q(url), q(ca), n, port)
    end },
}

local CLIENT_NAME = {
  client = "lua-flowservice client (`flowservice.new`), Lua 5.4",
  ["client-luajit"] = "lua-flowservice client (`flowservice.new`), LuaJIT",
}

local function selected()
  local only = os_getenv("BENCH_ONLY")
  local list = {}
  for _, c in ipairs(CONTENDERS) do
    if not only or ("," .. only .. ","):find("," .. c.key .. ",", 1, true) then
      list[#list + 1] = c
    end
  end
  assert(#list > 0, "BENCH_ONLY selects no contender")
  return list
end

-- Runs one contender once; returns µs per call, "protocol, requests on the
-- last connection", label.
local function measure(env, c, url, ca, n, port)
  local out = run(env .. c.cmd(url, ca, n, port))
  local calls, seconds = out:match("calls=(%d+) seconds=([%d.]+)")
  local etag, label = out:match("etag=(%S*)") or "", out:match("label=([^\n]*)")
  if not calls then error("unexpected output from " .. c.key .. ":\n" .. out, 0) end
  local proto, requests = etag:match("HTTP/([%d.]+)%-(%d+)")
  return tonumber(seconds) * 1e6 / tonumber(calls),
         str_format("HTTP/%s, %s", proto or "?", requests or "?"), label
end

local function median(xs)
  local s = {}
  for i, x in ipairs(xs) do s[i] = x end
  table_sort(s)
  local m = #s // 2
  if #s % 2 == 1 then return s[m + 1] end
  return (s[m] + s[m + 1]) / 2
end

local function fmt_us(us)
  if us >= 1000 then return str_format("%.0f", us) end
  return str_format("%.1f", us)
end

local function speed(server, env, placement)
  local list = selected()
  local results, protos = {}, {}
  for _, c in ipairs(list) do
    c.n = c.fast and N or SLOW_N
    results[c.key], protos[c.key] = { h1 = {}, h2 = {} }, {}
  end
  local urls = { h1 = server.h1_url, h2 = server.h2_url }

  -- Warm-up: page cache, nginx's first connections, libcurl's first load.
  for _, port in ipairs(PORTS) do
    for _, c in ipairs(list) do
      measure(env, c, urls[port], server.ca_file, c.fast and 200 or 3, port)
    end
  end

  -- Rotate the order every round, so each contender runs in each position
  -- and drift (thermal, noisy neighbours) spreads over all of them.
  for round = 1, ROUNDS do
    local ports = round % 2 == 1 and { "h1", "h2" } or { "h2", "h1" }
    for _, port in ipairs(ports) do
      local line = {}
      for i = 1, #list do
        local c = list[(i + round - 2) % #list + 1]
        local us, proto, label = measure(env, c, urls[port], server.ca_file, c.n, port)
        local r = results[c.key][port]
        r[#r + 1] = us
        protos[c.key][port] = proto
        if c.key == "client" or c.key == "client-luajit" then c.name = CLIENT_NAME[label] or label end
        line[#line + 1] = str_format("%s %s", c.key, fmt_us(us))
      end
      log("round %d/%d %s: %s (us/call); load %s", round, ROUNDS, port, table_concat(line, ", "),
          (read_file("/proc/loadavg") or "?"):match("^%S+") or "?")
    end
  end

  -- The table
  local floor = results.floor
  local out = {
    "Machine: " .. machine(),
    "",
    str_format("Sequential re-triggers against a local nginx over TLS (generated CA, verification on)."
      .. " Median of %d rounds; each round every contender makes its calls in its own process,"
      .. " the order rotating between rounds; first connection included, process start not."
      .. " × floor: median over the rounds of the ratio to the floor's run in the same round"
      .. " and port. Last column: protocol spoken, requests its last connection carried. %s.",
      ROUNDS, placement),
    "",
    "| contender | calls/round | " .. PORT_TITLE.h1 .. ": µs/call | × floor | "
      .. PORT_TITLE.h2 .. ": µs/call | × floor | protocol, requests per connection (h1 port / h2 port) |",
    "|---|--:|--:|--:|--:|--:|---|",
  }
  -- Paired by round: the floor ran next to the contender, so drift cancels.
  local function ratio(key, port)
    local rs = {}
    for i, us in ipairs(results[key][port]) do rs[i] = us / floor[port][i] end
    return median(rs)
  end
  for _, c in ipairs(list) do
    local cells = { c.name or c.key, tostring(c.n) }
    for _, port in ipairs(PORTS) do
      cells[#cells + 1] = fmt_us(median(results[c.key][port]))
      cells[#cells + 1] = floor and str_format("%.2f", ratio(c.key, port)) or "–"
    end
    cells[#cells + 1] = protos[c.key].h1 .. " / " .. protos[c.key].h2
    out[#out + 1] = "| " .. table_concat(cells, " | ") .. " |"
  end
  -- Paired by round too: the contender against lua-curl in the same round.
  local function versus(key, other, port)
    local rs = {}
    for i, us in ipairs(results[key][port]) do rs[i] = us / results[other][port][i] end
    return median(rs)
  end
  for _, key in ipairs { "client", "client-luajit" } do
    if floor and results[key] then
      local r1, r2 = ratio(key, "h1"), ratio(key, "h2")
      out[#out + 1] = ""
      out[#out + 1] = str_format("Target, %s within 1.05× of the C floor on both ports: %s"
        .. " (%.3f× and %.3f×)", key, (r1 <= 1.05 and r2 <= 1.05) and "PASS" or "FAIL", r1, r2)
      if results["lua-curl"] then
        local v1, v2 = versus(key, "lua-curl", "h1"), versus(key, "lua-curl", "h2")
        out[#out + 1] = str_format("Target, %s ahead of lua-curl on both ports: %s (%.3f× and %.3f× its time)",
          key, (v1 < 1 and v2 < 1) and "PASS" or "FAIL", v1, v2)
      end
      if not protos[key].h2:find("^HTTP/2") then
        out[#out + 1] = "Note: the client did not speak HTTP/2 on the HTTP/2 port (ALPN)."
      end
    end
  end
  io_write(table_concat(out, "\n"), "\n")
  return true
end

---------------------------------------------------------------------------
-- memory

local function memory(server, env)
  local ports = os_getenv("BENCH_MEMORY_PORTS") or "h1,h2"
  local n = os_getenv("BENCH_MEMORY_N") or ""
  local urls = { h1 = server.h1_url, h2 = server.h2_url }
  local pass = true
  for port in ports:gmatch("[^,]+") do
    assert(urls[port], "BENCH_MEMORY_PORTS: unknown port " .. port)
    io_write(str_format("\n%s (%s)\n", PORT_TITLE[port], urls[port]))
    -- Streamed: 100,000 calls take a while.
    local p = assert(io_popen(str_format("%slua5.4 bench/memory.lua %s %s %s 2>&1",
      env, q(urls[port]), q(server.ca_file), n ~= "" and q(n) or "")))
    for line in p:lines() do io_write(line, "\n"); io.stdout:flush() end
    if not p:close() then pass = false end
  end
  return pass
end

---------------------------------------------------------------------------

local mode = arg[1] or "speed"
if mode ~= "speed" and mode ~= "memory" then
  io_stderr:write("usage: lua5.4 bench/run.lua [speed|memory]\n")
  os_exit(2)
end

local server
local ok, result = xpcall(function()
  local tree = module_tree()
  local tree_51 = mode == "speed" and module_tree_51() or ""
  if mode == "speed" then build_floor() end
  local server_cpu, contender_cpu = cpus()
  server = bench_server.start(server_cpu)
  log("nginx pid %d: %s (HTTP/1.1 only), %s (HTTP/2); module tree %s; %s",
      server.pid, server.h1_url, server.h2_url, tree, server_cpu
        and str_format("nginx on CPU %d, contenders on CPU %d", server_cpu, contender_cpu)
        or "not pinned")
  local env = child_env(tree, tree_51, contender_cpu)
  if mode == "speed" then
    return speed(server, env, server_cpu and str_format("nginx's worker pinned to CPU %d and every"
      .. " contender to CPU %d (taskset)", server_cpu, contender_cpu) or "Nothing pinned")
  end
  return memory(server, env)
end, function(err)
  -- Ctrl-C arrives here as "interrupted!": the server still gets stopped.
  return debug.traceback(tostring(err), 2)
end)
if server then server:stop() end
if not ok then
  io_stderr:write("bench: ", tostring(result), "\n")
  os_exit(1)
end
os_exit(result and 0 or 1)
