-- Re-trigger failed runs given on the command line, against the real Flow
-- Service (or any base URL), with credentials from the environment:
--
--   AEP_ACCESS_TOKEN=... AEP_API_KEY=... AEP_ORG_ID=XXXX@AdobeOrg \
--   AEP_SANDBOX_NAME=prod lua5.4 examples/retrigger.lua RUN_ID [RUN_ID ...]
--
-- Prints one line per run: the old id and the new id, or the error. Exits 1
-- if any run failed, so a cron job notices.
local flowservice = require "flowservice"

local function env(name, required)
  local value = os.getenv(name)
  if required and (value == nil or value == "") then
    io.stderr:write("missing environment variable ", name, "\n")
    os.exit(2)
  end
  return value
end

if #arg == 0 then
  io.stderr:write("usage: lua5.4 examples/retrigger.lua RUN_ID [RUN_ID ...]\n")
  os.exit(2)
end

local opts = {
  access_token = env("AEP_ACCESS_TOKEN", true),
  api_key = env("AEP_API_KEY", true),
  org_id = env("AEP_ORG_ID", true),
  sandbox = env("AEP_SANDBOX_NAME") or "prod",
  base_url = env("FLOWSERVICE_URL"),
}

local failures = 0
for _, run_id in ipairs(arg) do
  local run, err = flowservice.retrigger(run_id, opts)
  if run then
    print(run_id, "->", run.id, run.etag)
  else
    failures = failures + 1
    -- a 5xx or timeout after sending may still have created a run: check
    -- before repeating it (err.sent tells whether the request went out)
    print(run_id, "failed", tostring(err))
  end
end
os.exit(failures == 0 and 0 or 1)
