-- flowservice.heal in a process of its own (a second "host" beside the
-- watch command, spec/heal_pg_spec.lua):
--   lua5.4 spec/support/heal_job.lua BASE_URL FLOW_ID JOURNAL [PASSES]
-- Lists the flow's failed runs PASSES times (default 3) and hands each to
-- healer:handle (backoff 0). Prints one JSON line: {"retriggered": [run
-- ids], "actions": {action: n}} or {"error": message}.
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local heal = require "flowservice.heal"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local base_url, flow_id, journal, passes = arg[1], arg[2], arg[3], tonumber(arg[4]) or 3
local client = flowservice.new(h.opts(base_url, { timeout = 20, retry = { base_delay = 0.01, max_delay = 0.2 } }))
local healer = heal.new(client, { journal = journal, backoff = { 0 }, grace = 1 })
local out = { retriggered = {}, actions = {} }
for _ = 1, passes do
  local runs, err = client:list_runs { flow_id = flow_id, status = "failed", since = (os.time() - 3600) * 1000 }
  if not runs then
    io.write(cjson.encode { error = tostring(err) }, "\n")
    os.exit(1)
  end
  for _, run in ipairs(runs) do
    local d = healer:handle(run)
    out.actions[d.action] = (out.actions[d.action] or 0) + 1
    if d.action == "retriggered" then out.retriggered[#out.retriggered + 1] = d.run_id end
  end
end
client:close()
io.write(cjson.encode(out), "\n")
