-- `make bench-nginx-callgrind`: what one request of bench-nginx's handlers
-- costs in the worker, counted by callgrind (instructions and simulated
-- cache misses), which a shared 2-vCPU host cannot move the way it moves
-- CPU time.
--
-- The subject of bench-nginx (bench/nginx_subject.conf.in, one process:
-- master_process off) runs under valgrind --tool=callgrind with counting
-- off; per handler, after a warm-up, counting is on for one wrk -c10 run
-- and the dump's totals are divided by the requests wrk completed. The
-- handlers alternate (floor, wire, wire, floor, ...) so that a drift of
-- the worker's state over the run (its heap, its pools) falls on both.
-- Beside the totals, the same per object (the worker's own code: nginx,
-- LuaJIT, its compiled traces (no file: "JIT code"), libc, the core,
-- cjson, ...): the self cost of each object's functions.
--
--   lua5.4 bench/nginx_callgrind.lua     from the repository root, after `make trees`
-- Environment (defaults in brackets):
--   BENCH_NGINX_CG_ONLY [floor,wire]     the handlers (bench/nginx_handler.lua)
--   BENCH_NGINX_CG_ROUNDS [2]            times each is counted (the table shows the median)
--   BENCH_NGINX_CG_SECONDS [8]           seconds of wrk -c10 per count
--   BENCH_NGINX_CG_CACHE [32768,8,64/32768,8,64/1048576,16,64]  --I1/--D1/--LL
package.path = "./?.lua;" .. package.path

local nginx = require "spec.support.nginx"
local util = nginx.util
local support = require "bench.support"
local run, median = support.run, support.median

local assert, error, ipairs, pairs, pcall, tonumber, tostring = assert, error, ipairs, pairs, pcall,
  tonumber, tostring
local io_open, io_stderr, os_getenv = io.open, io.stderr, os.getenv
local str_format = string.format
local table_concat, table_sort = table.concat, table.sort

local ONLY = {}
for name in (os_getenv("BENCH_NGINX_CG_ONLY") or "floor,wire"):gmatch("[%w_]+") do ONLY[#ONLY + 1] = name end
local ROUNDS = tonumber(os_getenv("BENCH_NGINX_CG_ROUNDS") or "2")
local SECONDS = tonumber(os_getenv("BENCH_NGINX_CG_SECONDS") or "8")
local I1, D1, LL = (os_getenv("BENCH_NGINX_CG_CACHE") or "32768,8,64/32768,8,64/1048576,16,64")
  :match("^([%d,]+)/([%d,]+)/([%d,]+)$")
assert(I1, "BENCH_NGINX_CG_CACHE: I1/D1/LL, each size,ways,line")
local SNAPSHOT = "build/bench/tree-5.1"
local SHOWN = { "Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr" }

local function log(...) io_stderr:write(str_format(...), "\n") end

local function completed(url, seconds)
  local out = run(str_format("wrk -t1 -c10 -d%ds --timeout 30s %s", seconds, util.quote(url)))
  local n = tonumber(out:match("(%d+) requests in"))
  assert(n and n > 0, "cannot read wrk's output:\n" .. out)
  assert(not out:find("Non%-2xx"), "the handler failed:\n" .. out)
  return n
end

-- A callgrind dump: its events, the totals, and each object's self cost.
-- A cost line right after calls= is the call's inclusive cost (the callee's,
-- counted where the callee's own lines are): left out of the self costs.
local function read_dump(path)
  local f = assert(io_open(path, "r"))
  local events, totals, by_object = nil, nil, {}
  local names, object, after_call = {}, "?", false
  for line in f:lines() do
    local c = line:byte(1)
    if c and (c >= 48 and c <= 57 or c == 43 or c == 45 or c == 42) then -- a cost line
      if after_call then
        after_call = false
      else
        local costs, i = by_object[object], 0
        if not costs then
          costs = {}
          by_object[object] = costs
        end
        for n in line:gmatch("%S+") do
          if i > 0 then costs[i] = (costs[i] or 0) + tonumber(n) end
          i = i + 1
        end
      end
    elseif line:sub(1, 3) == "ob=" then
      local id, name = line:match("^ob=(%(%d+%))%s*(.*)$")
      if id then
        if name ~= "" then names[id] = name end
        object = names[id] or id
      else
        object = line:sub(4)
      end
    elseif line:sub(1, 6) == "calls=" then
      after_call = true
    elseif line:sub(1, 7) == "events:" then
      events = {}
      for e in line:sub(8):gmatch("%S+") do events[#events + 1] = e end
    elseif line:sub(1, 8) == "summary:" or line:sub(1, 7) == "totals:" then
      totals = {}
      for n in line:match(":%s*(.*)$"):gmatch("%d+") do totals[#totals + 1] = tonumber(n) end
    elseif line:sub(1, 4) == "cob=" then -- a called object's name, first seen here
      local id, name = line:match("^cob=(%(%d+%))%s*(.+)$")
      if id then names[id] = name end
    end
  end
  f:close()
  assert(events and totals, "no events or totals in " .. path)
  local index = {}
  for i, e in ipairs(events) do index[e] = i end
  return index, totals, by_object
end

-- An object's short name: the file's, or what the worker's traces are.
local function short(object)
  if object == "???" or object:match("^%(%d+%)$") then return "JIT code" end
  local base = object:match("([^/]+)$") or object
  base = base:gsub("%.so[%.%d]*$", ""):gsub("^lib", "")
  return base
end

local function main(dumps)
  run("rm -rf " .. SNAPSHOT .. " && mkdir -p build/bench && cp -a build/tree-5.1 " .. SNAPSHOT)
  local root = run("pwd"):gsub("%s+$", "")
  local template = assert(util.read_file("bench/nginx_subject.conf.in"))
  -- one process, in the foreground (callgrind_control reaches a process
  -- valgrind started, not one it forked), started in the background by a
  -- script of its own so that nginx.start returns
  local text, n1, n2
  text, n1 = template:gsub("master_process on;", "master_process off;")
  text, n2 = text:gsub("daemon on;", "daemon off;")
  assert(n1 == 1 and n2 == 1, "no master_process or daemon line in the subject's config")
  local backend = nginx.start { template = "bench/nginx_backend.conf.in", name = "bench_backend",
    vars = { DELAY = 0.05 } }
  local ok, err = pcall(function()
    local script = dumps .. "/nginx.sh"
    util.write_file(script, str_format("#!/bin/sh\nvalgrind --tool=callgrind --instr-atstart=no"
      .. " --cache-sim=yes --I1=%s --D1=%s --LL=%s --callgrind-out-file=%s/cg.out nginx \"$@\" &\n",
      I1, D1, LL, dumps))
    local valgrind = "sh " .. util.quote(script)
    local subject = nginx.start { text = text, name = "bench_subject_cg", nginx = valgrind,
      vars = { TREE = root .. "/" .. SNAPSHOT, ROOT = root, BACKEND_PORT = backend.ports[1] },
      ready = "/health", timeout = 120 }
    local ok2, err2 = pcall(function()
      local pid = tonumber(run("curl -s --noproxy '*' " .. subject.url .. "/pump"):match('"pid":(%d+)'))
      assert(pid, "no worker pid")
      local control = "callgrind_control %s " .. pid
      for _, name in ipairs(ONLY) do completed(subject.url .. "/" .. name, 3) end -- warm: pools, JIT
      local results, dumped = {}, 0
      for round = 1, ROUNDS do
        for i = 1, #ONLY do
          local name = ONLY[round % 2 == 1 and i or #ONLY + 1 - i]
          completed(subject.url .. "/" .. name, 1)
          run(str_format(control, "-z"))
          run(str_format(control, "-i on"))
          local requests = completed(subject.url .. "/" .. name, SECONDS)
          run(str_format(control, "-i off"))
          run(str_format(control, "-d"))
          dumped = dumped + 1
          local path = str_format("%s/cg.out.%d", dumps, dumped)
          local index, totals, by_object = read_dump(path)
          if not os_getenv("BENCH_NGINX_CG_KEEP") then os.remove(path) end
          local r = { requests = requests, total = {}, objects = {} }
          for _, e in ipairs(SHOWN) do
            r.total[e] = (totals[index[e]] or 0) / requests
            for object, costs in pairs(by_object) do
              local key = short(object)
              local o = r.objects[key] or {}
              r.objects[key] = o
              o[e] = (o[e] or 0) + (costs[index[e]] or 0) / requests
            end
          end
          log("round %d %-6s %6d requests  Ir %8.0f  I1mr %6.0f  D1mr %6.0f  D1mw %6.0f", round, name,
            requests, r.total.Ir, r.total.I1mr, r.total.D1mr, r.total.D1mw)
          results[name] = results[name] or {}
          results[name][#results[name] + 1] = r
        end
      end
      return results
    end)
    subject:stop()
    if not ok2 then error(err2, 0) end
    return err2
  end)
  backend:stop()
  if not ok then error(err, 0) end
  return err
end

local function report(results)
  local function med(rounds, get)
    local list = {}
    for i, r in ipairs(rounds) do list[i] = get(r) or 0 end
    return median(list)
  end
  print(str_format("Per request in the worker under callgrind (wrk -c10, %d s a count, median of %d;"
    .. " I1 %s, D1 %s, LL %s):", SECONDS, ROUNDS, I1, D1, LL))
  print()
  print("| handler | " .. table_concat(SHOWN, " | ") .. " |")
  print("|---|" .. ("--:|"):rep(#SHOWN))
  for _, name in ipairs(ONLY) do
    local cells = {}
    for i, e in ipairs(SHOWN) do cells[i] = str_format("%.0f", med(results[name], function(r) return r.total[e] end)) end
    print(str_format("| %s | %s |", name, table_concat(cells, " | ")))
  end
  print()
  -- by object: every object any handler spent at least 1% of its instructions in
  local seen, objects = {}, {}
  for _, name in ipairs(ONLY) do
    for _, r in ipairs(results[name]) do
      for key, o in pairs(r.objects) do
        if not seen[key] and (o.Ir or 0) >= 0.01 * r.total.Ir then
          seen[key] = true
          objects[#objects + 1] = key
        end
      end
    end
  end
  table_sort(objects)
  local head = { "| object" }
  for _, name in ipairs(ONLY) do head[#head + 1] = name .. " Ir / I1mr / D1mr" end
  print(table_concat(head, " | ") .. " |")
  print("|---|" .. ("--:|"):rep(#ONLY))
  for _, key in ipairs(objects) do
    local cells = { "| " .. key }
    for _, name in ipairs(ONLY) do
      local function get(e) return med(results[name], function(r) return r.objects[key] and r.objects[key][e] end) end
      cells[#cells + 1] = str_format("%.0f / %.0f / %.0f", get("Ir"), get("I1mr"), get("D1mr"))
    end
    print(table_concat(cells, " | ") .. " |")
  end
end

local dumps = run("mktemp -d \"${TMPDIR:-/tmp}/flowservice-cg.XXXXXXXX\""):gsub("%s+$", "")
local ok, results = pcall(main, dumps)
if not os_getenv("BENCH_NGINX_CG_KEEP") then run("rm -rf " .. util.quote(dumps)) end
if not ok then
  io_stderr:write("bench-nginx-callgrind: ", tostring(results), "\n")
  os.exit(1)
end
report(results)
