-- The whole night's failures: retry_failed{ all_flows = true } over the
-- fake's generated sandbox (20 flows, 1,000 failed runs), each re-trigger
-- answered after 50 ms, a journal per flow; time against the ideal
-- (eligible runs x 50 ms / concurrency). Then max_active = 5 with re-runs
-- that take 0.3 s: the most re-runs of one flow executing at once.
--   lua5.4 bench/sandbox.lua         (from the repository root, after make build)
-- Environment: SANDBOX_FLOWS [20], SANDBOX_RUNS [1000], SANDBOX_DELAY [0.05],
-- SANDBOX_CONCURRENCY [32].
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local FLOWS = tonumber(os.getenv("SANDBOX_FLOWS") or "20")
local RUNS = tonumber(os.getenv("SANDBOX_RUNS") or "1000")
local DELAY = tonumber(os.getenv("SANDBOX_DELAY") or "0.05")
local CONCURRENCY = tonumber(os.getenv("SANDBOX_CONCURRENCY") or "32")

local mktemp = assert(io.popen("mktemp -d /tmp/flowservice-bench.XXXXXX"))
local dir = assert(mktemp:read("*l"))
mktemp:close()

local function journals(flow_id) return dir .. "/" .. flow_id .. ".jsonl" end

local server = fake.start()
local ok, err = pcall(function()
  local sandbox = server:sandbox { flows = FLOWS, runs = RUNS }
  local eligible, ids = 0, {}
  for _, f in ipairs(sandbox.flows) do
    ids[f.id] = true
    if f.state == "enabled" and f.source ~= "streaming" then eligible = eligible + f.runs end
  end
  server:scenario { match = "^POST ", delay = DELAY, times = 0 }
  local client = flowservice.new(h.opts(server.url, { timeout = 30 }))
  local t0 = h.now()
  local report = assert(client:retry_failed { all_flows = true, concurrency = CONCURRENCY, journal = journals })
  local elapsed = h.now() - t0
  -- every flow of the sandbox: the generated ones and the fixture's own
  local done = #report.retriggered
  local ideal = done * DELAY / CONCURRENCY
  print("| generated flows | their failed runs | re-triggerable of those | re-triggered in all |"
    .. " concurrency | seconds | ideal | × ideal | peak in flight |")
  print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
  print(("| %d | %d | %d | %d | %d | %.2f | %.2f | %.2f | %d |"):format(FLOWS, RUNS, eligible, done,
    CONCURRENCY, elapsed, ideal, elapsed / ideal, server:stats().max_in_flight))
  assert(done >= eligible, ("re-triggered %d of %d"):format(done, eligible))

  -- max_active: re-runs that take 0.3 s, at most 5 of a flow at once
  server:reset()
  h.sh("rm -f " .. h.q(dir) .. "/*.jsonl")
  server:sandbox { flows = FLOWS, runs = RUNS }
  server:outcomes { after = 0.3 }
  t0 = h.now()
  report = assert(client:retry_failed { all_flows = true, concurrency = CONCURRENCY, journal = journals,
    max_active = 5, wait_backoff = { 0.1, 0.3 } })
  elapsed = h.now() - t0
  client:close()
  local most, flow_of_most = 0, nil
  for flow, n in pairs(server:stats().max_executing) do
    if ids[flow] and n > most then most, flow_of_most = n, flow end
  end
  print(("\nmax_active 5: %d re-runs followed to success in %.1f s; the most executing at once in one"
    .. " flow: %d (%s)"):format(#report.outcomes.succeeded, elapsed, most, tostring(flow_of_most)))
  assert(most <= 5, "max_active exceeded")
end)
server:stop()
h.sh("rm -rf " .. h.q(dir))
if not ok then error(err, 0) end
