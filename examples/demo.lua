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

  -- the command, as a user runs it: installed in build/tree, on the PATH,
  -- configured through the environment (here: the fake's credentials)
  local state = os.tmpname()
  os.remove(state)
  local env = {
    { "PATH", "$PWD/build/tree/bin:$PATH" }, { "XDG_STATE_HOME", state },
    { "AEP_ORG_ID", fake.credentials.org }, { "AEP_API_KEY", fake.credentials.api_key },
    { "AEP_ACCESS_TOKEN", fake.credentials.access_token }, { "FLOWSERVICE_URL", server.url },
  }
  local exports = {}
  for i, kv in ipairs(env) do exports[i] = kv[1] .. '="' .. kv[2] .. '"' end
  local prelude = "export " .. table.concat(exports, " ") .. "; "
  local function shell(line, comment)
    print("\n$ " .. line .. (comment and "    # " .. comment or ""))
    io.stdout:flush()
    os.execute(prelude .. line .. " 2>&1")
  end
  print("\nthe flowservice command, installed in build/tree:")
  print("$ export PATH=\"$PWD/build/tree/bin:$PATH\"")
  print("$ export AEP_ORG_ID=" .. fake.credentials.org .. " AEP_API_KEY=... AEP_ACCESS_TOKEN=... FLOWSERVICE_URL=" .. server.url)
  shell("flowservice list-flows --since 2025-01-01", "with each flow's failed runs since then")
  shell("flowservice retry-failed --flow " .. fake.flows.bulk .. " --since all --dry-run | head -14",
    "what would be re-triggered")
  shell("flowservice retry-failed --flow " .. fake.flows.bulk .. " --since all | head -14")
  shell("flowservice retry-failed --flow " .. fake.flows.bulk .. " --since all | head -9",
    "again: the journal makes it a no-op")
  shell("flowservice retry-failed --flow " .. fake.flows.bulk .. " --dry-rn", "a slip")
  shell("flowservice help retrigger | head -5")
  os.execute("rm -rf '" .. state .. "'")
end)

server:stop()
print("fake Flow Service stopped")
if not ok then
  io.stderr:write("demo failed: ", tostring(failure), "\n")
  os.exit(1)
end
