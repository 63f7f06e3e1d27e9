-- A bulk job on a PostgreSQL journal, in a process of its own, for tests that
-- start several at once or SIGKILL them (spec/journal_pg_spec.lua):
--   lua5.4 spec/support/pg_job.lua BASE_URL FLOW_ID JOURNAL CONCURRENCY LEASE GRACE [STATE_DIR]
-- STATE_DIR: this job's own directory (as a host's state directory would be;
-- the journal is the shared database). Prints one JSON line when it ends:
--   {"retriggered": [run ids], "skipped": {run: reason}, "ambiguous": [...],
--    "failed": [...], "settled": [{run_id, outcome, evidence}], "considered": n}
--   or {"error": message, "skipped": {...}, "retriggered": [...]} (the partial report)
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local base_url, flow_id, journal, concurrency = arg[1], arg[2], arg[3], tonumber(arg[4])
-- a short lease takes short timeouts: retry_failed wants lease >= 2 x (timeout + connect_timeout)
local lease = tonumber(arg[5])
local client = flowservice.new(h.opts(base_url, { timeout = math.min(60, lease * 0.3),
  connect_timeout = math.min(10, lease * 0.15), retry = { base_delay = 0.01, max_delay = 0.2 } }))
local report, err = client:retry_failed { flow_id = flow_id, journal = journal, concurrency = concurrency,
  lease = lease, grace = tonumber(arg[6]) }
client:close()
local out = { error = not report and tostring(err) or nil }
report = report or err.report
if not report then
  io.write(cjson.encode(out), "\n")
  os.exit(1)
end
for k, v in pairs { retriggered = {}, skipped = {}, ambiguous = {}, failed = {}, settled = {},
  considered = report.considered } do out[k] = v end
for _, r in ipairs(report.retriggered) do out.retriggered[#out.retriggered + 1] = r.run_id end
for _, r in ipairs(report.skipped) do out.skipped[r.run_id] = r.reason end
for _, r in ipairs(report.ambiguous) do out.ambiguous[#out.ambiguous + 1] = r.run_id end
for _, r in ipairs(report.failed) do out.failed[#out.failed + 1] = r.run_id end
for _, r in ipairs(report.settled) do
  out.settled[#out.settled + 1] = { run_id = r.run_id, outcome = r.outcome, evidence = r.evidence }
end
io.write(cjson.encode(out), "\n")
if out.error then os.exit(1) end
