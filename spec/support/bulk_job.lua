-- A bulk job in a process of its own, for tests that kill it (SIGKILL).
--   lua5.4 spec/support/bulk_job.lua BASE_URL FLOW_ID JOURNAL CONCURRENCY
-- Run from the repository root; prints a summary line when it finishes.
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local h = require "spec.support.helpers"

local base_url, flow_id, journal, concurrency = arg[1], arg[2], arg[3], tonumber(arg[4])
local client = flowservice.new(h.opts(base_url, { timeout = 60 }))
local report, err = client:retry_failed { flow_id = flow_id, journal = journal,
  concurrency = concurrency, grace = 0 }
client:close()
if not report then
  io.write("error ", tostring(err), "\n")
  os.exit(1)
end
io.write(("done %d failed %d ambiguous %d\n"):format(#report.retriggered, #report.failed,
  #report.ambiguous))
