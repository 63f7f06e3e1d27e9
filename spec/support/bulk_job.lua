-- A bulk job in a process of its own, for tests that kill it (SIGKILL).
--   lua5.4 spec/support/bulk_job.lua BASE_URL FLOW_ID JOURNAL CONCURRENCY [ims|token] [GRACE] [wait]
-- ims: OAuth credentials against the fake's IMS instead of a static token;
-- wait: follow the re-runs (wait_runs), reading them every 0.1 to 0.3 s.
-- Run from the repository root; prints a summary line when it finishes.
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local base_url, flow_id, journal, concurrency = arg[1], arg[2], arg[3], tonumber(arg[4])
local opts = h.opts(base_url, { timeout = 60, retry = { base_delay = 0.01, max_delay = 0.2 } })
if arg[5] == "ims" then
  opts.access_token = nil
  opts.credentials = { client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
    scopes = fake.ims_client.scopes, ims_url = base_url }
end
local client = flowservice.new(opts)
local report, err = client:retry_failed { flow_id = flow_id, journal = journal,
  concurrency = concurrency, grace = tonumber(arg[6]) or 0,
  wait_runs = arg[7] == "wait" or nil, wait_backoff = arg[7] == "wait" and { 0.1, 0.3 } or nil }
client:close()
if not report then
  io.write("error ", tostring(err), "\n")
  os.exit(1)
end
io.write(("done %d failed %d ambiguous %d\n"):format(#report.retriggered, #report.failed,
  #report.ambiguous))
