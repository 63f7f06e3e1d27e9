-- One job of the fault campaign (spec/campaign_spec.lua), in a process of
-- its own so the campaign can SIGKILL it:
--   lua5.4 spec/support/campaign_job.lua BASE_URL JOURNAL_DIR FLOW[,FLOW...] API_KEY
-- Each flow in turn, with IMS credentials, a 2 s call timeout and its own
-- journal; a flow whose journal another job holds is passed over. One line
-- per flow on stdout:
--   flow ID retriggered N ambiguous N failed N settled N skipped N
--   flow ID error KIND MESSAGE
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local base_url, dir, flows, api_key = arg[1], arg[2], arg[3], arg[4]
local opts = h.opts(base_url, { timeout = 2, api_key = api_key,
  retry = { attempts = 4, base_delay = 0.01, max_delay = 1 } })
opts.access_token = nil
opts.credentials = { client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
  scopes = fake.ims_client.scopes, ims_url = base_url }
local client = flowservice.new(opts)
for flow in flows:gmatch("[^,]+") do
  local report, err = client:retry_failed { flow_id = flow, journal = dir .. "/" .. flow .. ".jsonl",
    concurrency = 8, grace = 1 }
  if report then
    io.write(("flow %s retriggered %d ambiguous %d failed %d settled %d skipped %d\n"):format(flow,
      #report.retriggered, #report.ambiguous, #report.failed, #report.settled, #report.skipped))
  else
    io.write(("flow %s error %s %s\n"):format(flow, tostring(err.kind), tostring(err)))
  end
  io.stdout:flush()
end
client:close()
