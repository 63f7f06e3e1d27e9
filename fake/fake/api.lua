-- The Flow Service's own API: the gateway's header checks, re-trigger with
-- the service's eligibility rules, GET /runs[/{id}], GET /flows[/{id}].
--
--   POST /runs/{id}/action?op=re-trigger   a new run (createdClient = x-api-key)
--   GET  /runs/{id}                        {"items": [run]}; FLOW-1101-404
--   GET  /runs                             listing (fake/fake/query.lua)
--   GET  /flows/{id}                       {"items": [flow]}; FLOW-1101-404
--   GET  /flows                            listing, the same rules as /runs

local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")
local reply = require("fake.reply")
local store = require("fake.store")
local query = require("fake.query")
local ims = require("fake.ims")

local tostring, type = tostring, type
local single, new_etag, now_ms, uuid4 = util.single, util.new_etag, util.now_ms, util.uuid4
local json_reply, gateway_error, problem = reply.json_reply, reply.gateway_error, reply.problem
local find_run = store.find_run

local _M = {}

local function gateway_check(headers, request_id)
  local creds = state.credentials
  local auth = single(headers["authorization"])
  if auth == nil then
    return gateway_error(403, "403010", "Oauth token is missing.")
  end
  local token = auth and auth:match("^Bearer (.+)$")
  if not token or not (creds.access_tokens[token] or ims.token_valid(token)) then
    return gateway_error(401, "401013", "Oauth token is not valid")
  end
  local key = single(headers["x-api-key"])
  if key == nil then
    return gateway_error(403, "403000", "Api Key is required")
  end
  if not key or not creds.api_keys[key] then
    return gateway_error(403, "403003", "Api Key is invalid")
  end
  local org = single(headers["x-gw-ims-org-id"])
  if org == nil then
    return gateway_error(400, "400003", "Organization ID is required")
  end
  if not org or not creds.orgs[org] then
    return gateway_error(403, "403025", "Profile is not valid")
  end
  local sandbox = single(headers["x-sandbox-name"])
  if sandbox == nil then
    return problem("FLOW-2105-400", 400, "Bad request",
                   "The x-sandbox-name header is required.", request_id)
  end
  if not sandbox or not creds.sandboxes[sandbox] then
    return problem("FLOW-2100-404", 404, "Sandbox not found",
                   "The sandbox " .. tostring(sandbox) .. " was not found.", request_id)
  end
  return nil
end

local function eligible(run)
  local metrics = run.metrics or {}
  local status = ((metrics.statusSummary or {}).status or "")
  local lower = type(status) == "string" and status:lower() or ""
  if lower == "failed" then return true, status end
  local records = (metrics.recordSummary or {}).outputRecordCount
  if lower == "success" and records == 0 then return true, status end
  return false, status
end

-- Whether the service would accept a re-trigger: nil and the run, or the
-- refusal. Chaos decides its fault after this and before acting, so no
-- yield may come between the two.
local function retrigger_check(raw_id, args, headers, request_id)
  local op = args.op
  if op ~= "re-trigger" and op ~= "RE_TRIGGER" then
    return problem("FLOW-1401-400", 400, "Unsupported action",
                   "The action op=" .. tostring(op) .. " is not supported for flow runs.",
                   request_id)
  end
  local id = ngx.unescape_uri(raw_id)
  store.settle()   -- a re-triggered run that finished failed is eligible
  local run = find_run(id)
  if not run then
    return problem("FLOW-1101-404", 404, "Resource not found",
                   "The flowRunId=" .. id .. " was not found.", request_id)
  end
  local flow = state.flows[run.flowId]
  if not flow then
    return problem("FLOW-1101-404", 404, "Resource not found",
                   "The flowId=" .. tostring(run.flowId) .. " of flowRunId=" .. id
                   .. " was not found.", request_id)
  end
  if not store.flow_enabled(flow) then
    return problem("FLOW-1388-400", 400, "Flow not enabled",
                   "The flowId=" .. flow.id .. " is not enabled; the action re-trigger "
                   .. "is not allowed.", request_id)
  end
  local source = store.flow_source(flow)
  if source ~= "batch" then
    return problem("FLOW-1333-400", 400, "Action not supported",
                   "The action re-trigger is not supported for " .. source
                   .. " sources (flowId=" .. flow.id .. ").", request_id)
  end
  local if_match = headers["if-match"]
  if if_match ~= nil and if_match ~= run.etag then
    return problem("FLOW-1404-412", 412, "Precondition failed",
                   "The If-Match value does not match the etag of flowRunId=" .. id .. ".",
                   request_id)
  end
  local ok, status = eligible(run)
  if not ok then
    return problem("FLOW-1387-400", 400, "Invalid state",
                   "The flowRunId=" .. id .. " is in an invalid state " .. tostring(status)
                   .. " for the action re-trigger", request_id)
  end
  local behaviour = state.behaviour
  if state.retriggered[id] and not behaviour.eligible_after_retrigger then
    return problem("FLOW-1387-400", 400, "Invalid state",
                   "The flowRunId=" .. id .. " is in an invalid state for the action "
                   .. "re-trigger: it has already been re-triggered", request_id)
  end
  return nil, run
end

-- A new run; the original keeps its status, and (by the behaviour
-- switches) gets a link to the new run and a new etag.
local function retrigger_act(run, headers)
  local id = run.id
  local behaviour = state.behaviour
  local now = now_ms()
  local new_run = {
    id = uuid4(),
    flowId = run.flowId,
    etag = new_etag(),
    createdAt = now,
    updatedAt = now,
    createdClient = single(headers["x-api-key"]) or nil,
    metrics = {
      statusSummary = { status = "inProgress" },
      recordSummary = { outputRecordCount = 0 },
      durationSummary = { startedAtUTC = now },
    },
  }
  if behaviour.linkage then
    new_run.parentFlowRunId = run.id
    local children = run.childFlowRunIds
    if type(children) ~= "table" then
      children = {}
      run.childFlowRunIds = children
    end
    children[#children + 1] = new_run.id
  end
  if behaviour.etag_changes then run.etag = new_etag() end
  state.retriggered[id] = (state.retriggered[id] or 0) + 1
  store.add_run(new_run)
  store.track_retriggered(new_run, run)
  state.stats.retriggers = state.stats.retriggers + 1
  return json_reply(200, { id = new_run.id, etag = new_run.etag })
end

local function retrigger(raw_id, args, headers, request_id)
  local refused, run = retrigger_check(raw_id, args, headers, request_id)
  if refused then return refused end
  return retrigger_act(run, headers)
end

local function not_found_run(id, request_id)
  return problem("FLOW-1101-404", 404, "Resource not found",
                 "The flowRunId=" .. id .. " was not found.", request_id)
end

-- GET /runs/{id}: a list of one, as the real service answers.
local function get_run(raw_id, request_id)
  local id = ngx.unescape_uri(raw_id)
  store.settle()
  local run = find_run(id)
  if not run then return not_found_run(id, request_id) end
  return reply.items_reply({ run })
end

-- GET /runs: runs of every flow unless a flowId filter says otherwise.
local function list_runs(request_id, sc)
  store.settle()
  return query.list(state.runs, util.parse_query(ngx.var.args), request_id, sc,
                    { path = "/runs" })
end

-- GET /flows/{id}: a list of one, like GET /runs/{id}; an unknown id is
-- FLOW-1101-404 (the catalog's "Resource not found"), as for runs.
local function get_flow(raw_id, request_id)
  local id = ngx.unescape_uri(raw_id)
  local flow = store.find_flow(id)
  if not flow then
    return problem("FLOW-1101-404", 404, "Resource not found",
                   "The flowId=" .. id .. " was not found.", request_id)
  end
  return reply.items_reply({ flow })
end

local function list_flows(request_id, sc)
  return query.list(state.flow_list, util.parse_query(ngx.var.args), request_id, sc,
                    { path = "/flows", kind = "flows" })
end

-- The router, after scenarios and chaos had their say.
function _M.handle(rec, request_id, sc)
  if rec.path == ims.TOKEN_PATH then return ims.token(rec) end
  local denied = gateway_check(rec.headers, request_id)
  if denied then return denied end
  local raw_id = rec.path:match("^/runs/([^/]+)/action$")
  if raw_id and rec.method == "POST" then
    return retrigger(raw_id, rec.args, rec.headers, request_id)
  end
  if rec.method == "GET" then
    if rec.path == "/runs" then return list_runs(request_id, sc) end
    raw_id = rec.path:match("^/runs/([^/]+)$")
    if raw_id then return get_run(raw_id, request_id) end
    if rec.path == "/flows" then return list_flows(request_id, sc) end
    raw_id = rec.path:match("^/flows/([^/]+)$")
    if raw_id then return get_flow(raw_id, request_id) end
  end
  return json_reply(404, { errorMessage = "Not found: " .. rec.method .. " " .. rec.path })
end

_M.gateway_check = gateway_check
_M.retrigger_check = retrigger_check
_M.retrigger_act = retrigger_act

return _M
