-- Re-triggering Flow Service runs from OpenResty without stalling the worker:
-- calls made from content, access, rewrite or timer handlers wait with
-- ngx.sleep while libcurl works, so the worker keeps serving other requests.
--
--   init_by_lua_block    { require("flowservice_handler").init() }
--   init_worker_by_lua_block { require("flowservice_handler").start_nightly_job() }
--   location = /retrigger { content_by_lua_block { require("flowservice_handler").retrigger() } }
local flowservice = require "flowservice"
local cjson = require("cjson.safe").new()

local ngx = ngx
local getenv, pairs, tostring = os.getenv, pairs, tostring

local _M = {}

local client -- one per worker: created before the fork, renewed in each worker by the engine

-- init_by_lua: options from the environment (nginx needs `env NAME;` for each).
-- No I/O here; the first call fetches what it needs.
function _M.init(extra)
  local opts = {
    access_token = getenv("AEP_ACCESS_TOKEN"),
    api_key = getenv("AEP_API_KEY"),
    org_id = getenv("AEP_ORG_ID"),
    sandbox = getenv("AEP_SANDBOX_NAME") or "prod",
    base_url = getenv("FLOWSERVICE_URL"),
    timeout = 30,
  }
  for k, v in pairs(extra or {}) do opts[k] = v end
  client = flowservice.new(opts)
  return client
end

-- The worker's client, for handlers of your own.
function _M.client()
  return client
end

local function reply(status, doc)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(doc))
end

-- content_by_lua: POST /retrigger?run=RUN_ID -> {"id": ..., "etag": ...}
function _M.retrigger()
  local run_id = ngx.var.arg_run
  if not run_id or not run_id:match("^[%w%-]+$") then
    return reply(400, { error = "run: letters, digits and dashes expected" })
  end
  local run, err = client:retrigger(run_id)
  if not run then
    return reply(err.status == 429 and 429 or 502, { error = tostring(err), kind = err.kind,
      code = err.code, status = err.status, ambiguous = err.ambiguous or false })
  end
  return reply(200, { id = run.id, etag = run.etag })
end

-- A bulk job in a timer: one worker runs it (the journal's lock keeps any
-- other job out), and a premature timer (nginx exiting) does not start it.
function _M.retry_failed(premature, spec, done)
  if premature then return end
  local report, err = client:retry_failed(spec)
  if done then done(report, err) end
end

-- init_worker_by_lua: schedule retry_failed for FLOWSERVICE_NIGHTLY_FLOW, in worker 0 only.
function _M.start_nightly_job()
  local flow = getenv("FLOWSERVICE_NIGHTLY_FLOW")
  if not flow or ngx.worker.id() ~= 0 then return end
  local spec = { flow_id = flow, journal = getenv("FLOWSERVICE_JOURNAL") or "/var/lib/flowservice/" .. flow .. ".jsonl" }
  local ok, err = ngx.timer.at(0, _M.retry_failed, spec, function(report, job_err)
    if report then
      ngx.log(ngx.NOTICE, "flowservice: re-triggered ", #report.retriggered, ", failed ", #report.failed,
        ", ambiguous ", #report.ambiguous)
    else
      ngx.log(ngx.ERR, "flowservice: ", tostring(job_err))
    end
  end)
  if not ok then ngx.log(ngx.ERR, "flowservice: cannot start the job: ", err) end
end

return _M
