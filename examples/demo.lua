-- `make demo`: re-trigger a failed run against the project's own fake Flow
-- Service on loopback. No credentials needed; the server is stopped at the end.
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local flowservice = require "flowservice"
local fake = require "spec.support.fake"

local FAILED_RUN = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"

local server = fake.start()
print(("fake Flow Service listening on %s (pid %d)"):format(server.url, server.pid))

local ok, failure = pcall(function()
  local before = server:run(FAILED_RUN)
  print(("run %s is %s"):format(FAILED_RUN, before.metrics.statusSummary.status))

  local run, err = flowservice.retrigger(FAILED_RUN, {
    access_token = fake.credentials.access_token,
    api_key = fake.credentials.api_key,
    org_id = fake.credentials.org,
    sandbox = fake.credentials.sandbox,
    base_url = server.url,
    if_match = before.etag, -- re-trigger only the run we just looked at
  })
  if not run then error(err, 0) end
  print("re-triggered; new run id: " .. run.id)
  print("new run etag:             " .. run.etag)

  -- not every run can be re-triggered: this is what an error looks like
  local _, not_eligible = flowservice.retrigger("74bf93af-1a48-495c-a676-129b8c7c88fa", {
    access_token = fake.credentials.access_token,
    api_key = fake.credentials.api_key,
    org_id = fake.credentials.org,
    base_url = server.url,
  })
  print("a successful run with records cannot be re-triggered:")
  print("  " .. tostring(not_eligible))

  -- the bulk job, through the command: a seeded flow of 40 failed runs
  local journal = os.tmpname()
  os.remove(journal)
  local command = table.concat({
    "env LUA_PATH='build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;;'",
    "LUA_CPATH='build/tree/lib/lua/5.4/?.so;;'",
    "AEP_ACCESS_TOKEN=" .. fake.credentials.access_token,
    "AEP_API_KEY=" .. fake.credentials.api_key,
    "AEP_ORG_ID=" .. fake.credentials.org,
    "lua5.4 bin/flowservice retry-failed --flow " .. fake.flows.bulk,
    "--since all --url " .. server.url .. " --journal " .. journal .. " --concurrency 8",
  }, " ")
  print("\n$ flowservice retry-failed --flow " .. fake.flows.bulk .. " --since all --concurrency 8 ...")
  assert(os.execute(command))
  print("\nthe same command again: the journal makes it a no-op")
  os.execute(command .. " | head -3")
  os.remove(journal)
end)

server:stop()
print("fake Flow Service stopped")
if not ok then
  io.stderr:write("demo failed: ", tostring(failure), "\n")
  os.exit(1)
end
