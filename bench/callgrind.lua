-- Instructions per call under callgrind (valgrind --tool=callgrind): each
-- contender of `make bench` runs twice against the benchmark's nginx (TLS,
-- HTTP/1.1 and HTTP/2 ports), with N1 and N2 calls; the difference of the
-- two totals over N2 - N1 is what one more call costs, start-up and the
-- first connection cancelled out.
--
--   lua5.4 bench/callgrind.lua     from the repository root, after `make trees`
-- Environment: BENCH_CG_N1 [1000], BENCH_CG_N2 [5000],
--   BENCH_CG_ONLY [floor,client,client-luajit,lua-curl],
--   BENCH_CG_CPU [0]: the CPU nginx and every contender run on (taskset), or "off".
-- Pinned to one CPU, nginx answers only once the contender waits, as in a
-- real run (where the reply is never there by the time libcurl first reads).
-- Unpinned, nginx on the other core often answered before the contender,
-- slowed down by valgrind, first read: libcurl then took another path
-- through its socket bookkeeping, and the counts of one build moved by
-- 2,000-4,000 instructions a call from run to run.
package.path = "./?.lua;" .. package.path

local bench_server = require "bench.server"

local N1 = tonumber(os.getenv("BENCH_CG_N1") or "1000")
local N2 = tonumber(os.getenv("BENCH_CG_N2") or "5000")
local CPU = os.getenv("BENCH_CG_CPU") or "0"
if CPU ~= "off" and not CPU:match("^%d+$") then error("BENCH_CG_CPU must be a CPU number or off", 0) end
local PIN = CPU ~= "off" and "taskset -c " .. CPU .. " " or ""
local ONLY = os.getenv("BENCH_CG_ONLY") or "floor,client,client-luajit,lua-curl"
local FLOOR = "build/bench/floor"

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1", "r"))
  local out = p:read("a")
  if not p:close() then error("command failed: " .. cmd .. "\n" .. out, 0) end
  return out
end

local CONTENDERS = {
  { key = "floor", cmd = function(url, ca, n, port) return ("%s %s %s %d %s"):format(FLOOR, q(url), q(ca), n, port) end },
  { key = "client", cmd = function(url, ca, n) return ("lua5.4 bench/client.lua %s %s %d"):format(q(url), q(ca), n) end },
  { key = "client-luajit", cmd = function(url, ca, n) return ("luajit bench/client.lua %s %s %d"):format(q(url), q(ca), n) end },
  { key = "lua-curl", cmd = function(url, ca, n, port) return ("luajit bench/luacurl.lua %s %s %d %s"):format(q(url), q(ca), n, port) end },
}

local function instructions(cmd)
  local out = run("env -u http_proxy -u https_proxy " .. PIN .. "valgrind --tool=callgrind --callgrind-out-file=/dev/null "
    .. cmd)
  local ir = out:match("Collected%s*:%s*(%d+)")
  if not ir then error("no callgrind total from: " .. cmd .. "\n" .. out, 0) end
  return tonumber(ir)
end

run("mkdir -p build/bench && gcc -O2 -std=c99 -Wall -Wextra -Werror -o " .. FLOOR .. " bench/floor.c -lcurl")
local server = bench_server.start(CPU ~= "off" and tonumber(CPU) or nil)
local ok, err = pcall(function()
  local urls = { h1 = server.h1_url, h2 = server.h2_url }
  print(("Instructions per call under callgrind, (Ir(%d calls) - Ir(%d calls)) / %d:"):format(N2, N1, N2 - N1))
  print()
  print("| contender | HTTP/1.1 port | HTTP/2 port |")
  print("|---|--:|--:|")
  for _, c in ipairs(CONTENDERS) do
    if ("," .. ONLY .. ","):find("," .. c.key .. ",", 1, true) then
      local cells = { c.key }
      for _, port in ipairs { "h1", "h2" } do
        local a = instructions(c.cmd(urls[port], server.ca_file, N1, port))
        local b = instructions(c.cmd(urls[port], server.ca_file, N2, port))
        cells[#cells + 1] = ("%.0f"):format((b - a) / (N2 - N1))
      end
      print("| " .. table.concat(cells, " | ") .. " |")
      io.stdout:flush()
    end
  end
end)
server:stop()
if not ok then io.stderr:write("bench-callgrind: ", tostring(err), "\n") os.exit(1) end
