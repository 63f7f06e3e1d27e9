-- The run and flow store: the fixture (literal and generated runs, flows in
-- the fixture's shorthand or in full), lookups, new runs, the generated
-- "sandbox" of many flows, and how re-triggered runs finish (outcomes).
-- Its tables live in fake.state.

local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")

local error, ipairs, next, pairs, pcall, tonumber, tostring, type =
      error, ipairs, next, pairs, pcall, tonumber, tostring, type
local math_floor = math.floor
local str_format = string.format
local cjson = util.cjson

local _M = {}

---------------------------------------------------------------------------
-- flows
--
-- A fixture flow may be given in shorthand, { id, name, enabled = bool,
-- source = "batch"|"streaming" }, or with the service's own fields; missing
-- fields are filled in the same way every time. What marks a streaming flow
-- is its flowSpec (STREAMING_FLOW_SPEC), as on the service, where a
-- streaming source has its own flow spec; every other flow is batch.

_M.BATCH_FLOW_SPEC = { id = "9753525b-82c7-4dce-8a9b-5ccfce2b9876", version = "1.0" }
_M.STREAMING_FLOW_SPEC = { id = "d8a6f005-7eaf-4153-983e-e8574508b877", version = "1.0" }
local BATCH_SOURCE_SPEC = { id = "ecadc60c-7455-4d87-84dc-2a0e293d997b", version = "1.0" }
local STREAMING_SOURCE_SPEC = { id = "bc7b00d6-623a-4dfc-9fdb-f1240aeadaeb", version = "1.0" }
local TARGET_SPEC = { id = "c604ff05-7f1a-43c0-8e18-33bf874cb11c", version = "1.0" }
local FLOW_CREATED_BASE = 1669000000000   -- fixture flow k: + (k-1) days
local DAY_MS = 86400000

local function copy_spec(spec) return { id = spec.id, version = spec.version } end

function _M.flow_enabled(flow)
  return type(flow.state) == "string" and flow.state:lower() == "enabled"
end

function _M.flow_source(flow)
  local spec = flow.flowSpec
  if type(spec) == "table" and spec.id == _M.STREAMING_FLOW_SPEC.id then return "streaming" end
  return "batch"
end

-- The flow as the service describes it. k: its place among the flows,
-- which makes the derived ids (connections, etag) and createdAt.
local function full_flow(given, k, created)
  local flow = {}
  for key, v in pairs(given) do flow[key] = v end
  flow.enabled, flow.source = nil, nil
  if flow.state == nil then
    flow.state = (given.enabled == false) and "disabled" or "enabled"
  end
  local streaming = given.source == "streaming"
  if type(flow.flowSpec) ~= "table" then
    flow.flowSpec = copy_spec(streaming and _M.STREAMING_FLOW_SPEC or _M.BATCH_FLOW_SPEC)
  end
  streaming = _M.flow_source(flow) == "streaming"
  local source_id = str_format("5c000000-0000-4000-8000-%012d", k)
  local target_id = str_format("7a000000-0000-4000-8000-%012d", k)
  local base_id = str_format("ba5e0000-0000-4000-8000-%012d", k)
  flow.name = flow.name or ("flow " .. k)
  flow.description = flow.description or (flow.name .. " (fake)")
  flow.sourceConnectionIds = flow.sourceConnectionIds or { source_id }
  flow.targetConnectionIds = flow.targetConnectionIds or { target_id }
  flow.createdAt = flow.createdAt or created
  flow.updatedAt = flow.updatedAt or flow.createdAt
  flow.createdBy = flow.createdBy or "28AF22BA5DE6B0B40A494036@AdobeID"
  flow.updatedBy = flow.updatedBy or flow.createdBy
  flow.createdClient = flow.createdClient or "exc_app"
  flow.updatedClient = flow.updatedClient or flow.createdClient
  flow.sandboxName = flow.sandboxName or "prod"
  flow.imsOrgId = flow.imsOrgId or "FAKEORG@AdobeOrg"
  flow.etag = flow.etag or str_format('"f1000000-0000-0200-0000-%012d"', k)
  flow.version = flow.version or flow.etag
  flow.runs = flow.runs or ("/runs?property=flowId==" .. tostring(flow.id))
  if type(flow.inheritedAttributes) ~= "table" then
    local spec = streaming and STREAMING_SOURCE_SPEC or BATCH_SOURCE_SPEC
    flow.inheritedAttributes = {
      sourceConnections = { {
        id = flow.sourceConnectionIds[1],
        connectionSpec = copy_spec(spec),
        baseConnection = { id = base_id, connectionSpec = copy_spec(spec) },
      } },
      targetConnections = { {
        id = flow.targetConnectionIds[1],
        connectionSpec = copy_spec(TARGET_SPEC),
      } },
    }
  end
  return flow
end

local function add_flow(flow)
  state.flows[flow.id] = flow
  state.flow_list[#state.flow_list + 1] = flow
end

function _M.find_flow(id)
  return state.flows[id]
end

---------------------------------------------------------------------------
-- runs

function _M.find_run(id)
  return state.run_index[id]
end

-- Appends a run (the first run of an id is the one found).
function _M.add_run(run)
  state.runs[#state.runs + 1] = run
  if type(run) == "table" and run.id ~= nil and state.run_index[run.id] == nil then
    state.run_index[run.id] = run
  end
  return run
end

-- Runs described by a fixture "generated" entry, the same every time:
--   { flowId, count, status, id_prefix (8 hex digits), start (epoch ms of
--     the first createdAt), step_ms, duration_ms, outputRecordCount,
--     error = { code, message } (failed runs), createdClient }
-- Run i (1-based) gets id "<id_prefix>-0000-4000-8000-<i as 12 digits>",
-- createdAt start + (i-1)*step_ms, startedAtUTC createdAt + 1500,
-- completedAtUTC = updatedAt = startedAtUTC + duration_ms (an inProgress
-- run has no completedAtUTC, and updatedAt = startedAtUTC).
local function generate_runs(gen)
  local prefix = gen.id_prefix
  if type(prefix) ~= "string" or not prefix:match("^%x%x%x%x%x%x%x%x$") then
    error("fake: generated runs need an id_prefix of 8 hex digits")
  end
  local count, start, step = tonumber(gen.count), tonumber(gen.start), tonumber(gen.step_ms)
  if not (count and start and step) then
    error("fake: generated runs need count, start and step_ms")
  end
  local duration = tonumber(gen.duration_ms) or 60000
  local status = gen.status or "failed"
  local runs = {}
  for i = 1, count do
    local created = start + (i - 1) * step
    local started = created + 1500
    local completed = started + duration
    local running = type(status) == "string" and status:lower() == "inprogress"
    local summary = { status = status }
    if gen.error then summary.errors = { { code = gen.error.code, message = gen.error.message } } end
    runs[i] = {
      id = str_format("%s-0000-4000-8000-%012d", prefix, i),
      flowId = gen.flowId,
      etag = str_format('"%s-0000-0200-0000-%012d"', prefix, i),
      createdAt = created,
      updatedAt = running and started or completed,
      createdClient = gen.createdClient or "scheduler",
      metrics = {
        statusSummary = summary,
        recordSummary = { outputRecordCount = tonumber(gen.outputRecordCount) or 0 },
        durationSummary = { startedAtUTC = started, completedAtUTC = (not running) and completed or nil },
      },
    }
  end
  return runs
end

local function load_fixture(text)
  local ok, doc = pcall(cjson.decode, text)
  if not ok or type(doc) ~= "table" then
    error("fake: fixture " .. state.fixture_path .. " is not a JSON object: " .. tostring(doc))
  end
  local creds = doc.credentials or {}
  local set_of = util.set_of
  state.credentials = {
    access_tokens = set_of(creds.access_tokens),
    api_keys = set_of(creds.api_keys),
    orgs = set_of(creds.orgs),
    sandboxes = set_of(creds.sandboxes),
  }
  state.ims_clients = {}
  for _, c in ipairs(doc.ims_clients or {}) do state.ims_clients[c.client_id] = c.client_secret end
  state.flows, state.flow_list = {}, {}
  for k, flow in ipairs(doc.flows or {}) do
    add_flow(full_flow(flow, k, FLOW_CREATED_BASE + (k - 1) * DAY_MS))
  end
  state.runs, state.run_index = {}, {}
  for _, run in ipairs(doc.runs or {}) do
    if type(run) == "table" then
      if run.createdClient == nil then run.createdClient = "scheduler" end
      -- cjson would send an empty array back as {}: no children, no key.
      if type(run.childFlowRunIds) == "table" and next(run.childFlowRunIds) == nil then
        run.childFlowRunIds = nil
      end
    end
    _M.add_run(run)
  end
  for _, gen in ipairs(doc.generated or {}) do
    for _, run in ipairs(generate_runs(gen)) do _M.add_run(run) end
  end
end

-- From init_by_lua: keeps the text, so reset decodes it again rather than
-- rereading the file (see fake/flowservice_fake.lua).
function _M.load(fixture_path, text)
  state.fixture_path = fixture_path
  state.fixture_text = text
  load_fixture(text)
end

function _M.reload()
  load_fixture(state.fixture_text)
end

---------------------------------------------------------------------------
-- how re-triggered runs finish (POST /_fake/outcomes)
--
-- A run made by re-trigger starts inProgress. With an outcome in force when
-- it was made ({ after = s, status, errors, records }, by source run, by
-- flow, or the default), it finishes once `after` seconds have passed:
-- checked lazily (settle) whenever runs or stats are read and before every
-- re-trigger, on ngx.now(). Without one it stays inProgress, as before.

_M.DEFAULT_FAILED_ERRORS = { {
  code = "CONNECTOR-2001-500",
  message = "Something went wrong while reading data from the source.",
} }
_M.DEFAULT_SUCCESS_RECORDS = 100

local function outcome_for(source, flow_id)
  local o = state.outcomes
  if not o then return nil end
  return o.by_source[source.id] or o.by_flow[flow_id] or o.default
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = deep_copy(x) end
  return t
end

local function finish(u)
  local run, o = u.run, u.outcome
  local metrics = run.metrics
  local duration = metrics.durationSummary
  local completed = duration.startedAtUTC + math_floor(o.after * 1000 + 0.5)
  duration.completedAtUTC = completed
  run.updatedAt = completed
  metrics.statusSummary.status = o.status
  if o.status == "failed" then
    metrics.statusSummary.errors = deep_copy(o.errors or _M.DEFAULT_FAILED_ERRORS)
    metrics.recordSummary.outputRecordCount = 0
  else
    metrics.recordSummary.outputRecordCount = o.records or _M.DEFAULT_SUCCESS_RECORDS
  end
end

local function note_executing(flow_id, delta)
  local n = (state.executing[flow_id] or 0) + delta
  state.executing[flow_id] = n > 0 and n or nil
  if n > (state.max_executing[flow_id] or 0) then state.max_executing[flow_id] = n end
end

-- Who hears of each run that finishes (emitter.lua: the failure event to a
-- registered webhook); called after the run has its final state.
local finish_listener = nil
function _M.set_finish_listener(fn) finish_listener = fn end

-- Finish every tracked run whose time has come.
function _M.settle()
  if next(state.unfinished) == nil then return end
  ngx.update_time()
  local now = ngx.now()
  local finished = {}
  for id, u in pairs(state.unfinished) do
    if now >= u.finish_at then
      finish(u)
      state.unfinished[id] = nil
      note_executing(u.flowId, -1)
      finished[#finished + 1] = u.run
    end
  end
  if finish_listener then
    for _, run in ipairs(finished) do finish_listener(run) end
  end
end

-- Finish run id on time. A timer may fire a little before the clock
-- ngx.update_time() reads reaches finish_at: then it waits again.
local function settle_timer(premature, id)
  if premature then return end
  _M.settle()
  local u = state.unfinished[id]
  if u then ngx.timer.at(math.max(u.finish_at - ngx.now(), 0.001), settle_timer, id) end
end

-- A run just made by re-triggering source: executing until it finishes.
function _M.track_retriggered(new_run, source)
  _M.settle()
  local o = outcome_for(source, new_run.flowId)
  if o then   -- without an outcome it never finishes: nothing to watch
    ngx.update_time()
    state.unfinished[new_run.id] = {
      run = new_run, flowId = new_run.flowId, outcome = o, finish_at = ngx.now() + o.after,
    }
    -- a webhook waits for the failure event: finish on time, not on the next read
    if state.webhook then ngx.timer.at(o.after, settle_timer, new_run.id) end
  end
  note_executing(new_run.flowId, 1)
end

---------------------------------------------------------------------------
-- the sandbox: a night's failures over many flows (POST /_fake/sandbox)
--
-- Flow i (1..flows) has id "5a9d0000-0000-4000-8000-<i as 12 digits>",
-- name "sandbox flow NN"; the last `streaming` flows are streaming (enabled),
-- the `disabled` flows before them batch and disabled, the rest batch and
-- enabled. Each of the `runs` failed runs goes to a flow, a time in the
-- night and an error kind by draws from a generator seeded with `seed`; the
-- j-th run of flow i has id "5a9d<i as 4 hex digits>-0000-4000-8000-<j as
-- 12 digits>" and etag "\"5a9d<i>-0000-0200-0000-<j>\"".

_M.SANDBOX_DEFAULTS = { flows = 20, runs = 1000, seed = 1, disabled = 3, streaming = 1 }
local NIGHT_START = 1768000000000   -- epoch ms of the night's first possible run
local NIGHT_SECONDS = 8 * 3600
local SANDBOX_FLOW_CREATED = 1700000000000

local function ingest_error(rows)
  return {
    code = "INGEST-1212-400",
    message = str_format("Encountered %d errors in the data. Successfully ingested 0 rows. "
                         .. "Review the associated diagnostic files for more details.", rows),
  }
end

-- The error kinds, by cumulative probability.
local function sandbox_errors(u, rows)
  if u < 0.45 then
    return { { code = "CONNECTOR-2001-500",
               message = "Something went wrong while reading data from the source." } }, false
  elseif u < 0.8 then
    return { { code = "CONNECTOR-1001-500", message = "Error occurred at promotion activity.",
               nestedErrors = { ingest_error(rows) } } }, true
  end
  return { { code = "CONNECTOR-2001-500",
             message = "Something went wrong while reading data from the source." },
           { code = "CONNECTOR-1001-500", message = "Error occurred at promotion activity.",
             nestedErrors = { ingest_error(rows) } } }, true
end

function _M.sandbox_flow_id(i)
  return str_format("5a9d0000-0000-4000-8000-%012d", i)
end

-- o: the settings, checked by the caller. Answers what it added.
function _M.add_sandbox(o)
  local n = o.flows
  local first_disabled = n - o.streaming - o.disabled + 1
  local first_streaming = n - o.streaming + 1
  local flows, info = {}, {}
  local base = #state.flow_list
  for i = 1, n do
    local streaming, disabled = i >= first_streaming, i >= first_disabled and i < first_streaming
    local flow = full_flow({
      id = _M.sandbox_flow_id(i),
      name = str_format("sandbox flow %02d", i),
      description = str_format("Sandbox flow %02d: %s", i,
                               streaming and "HTTP API streaming" or "Amazon S3 batch"),
      enabled = not disabled,
      source = streaming and "streaming" or "batch",
    }, base + i, SANDBOX_FLOW_CREATED + (i - 1) * 3600000)
    add_flow(flow)
    flows[i] = flow
    info[i] = { id = flow.id, name = flow.name, state = flow.state,
                source = streaming and "streaming" or "batch", runs = 0 }
  end
  local draw = util.new_prng(o.seed)
  local by_code = {}
  for _ = 1, o.runs do
    local i = math_floor(draw() * n) + 1
    local created = NIGHT_START + math_floor(draw() * NIGHT_SECONDS) * 1000
    local rows = math_floor(draw() * 500) + 1
    local errors, ingest = sandbox_errors(draw(), rows)
    for _, e in ipairs(errors) do by_code[e.code] = (by_code[e.code] or 0) + 1 end
    if ingest then by_code["INGEST-1212-400"] = (by_code["INGEST-1212-400"] or 0) + 1 end
    local j = info[i].runs + 1
    info[i].runs = j
    local started = created + 1500
    local completed = started + 30000 + math_floor(draw() * 600) * 1000
    _M.add_run({
      id = str_format("5a9d%04x-0000-4000-8000-%012d", i, j),
      flowId = flows[i].id,
      etag = str_format('"5a9d%04x-0000-0200-0000-%012d"', i, j),
      createdAt = created,
      updatedAt = completed,
      createdClient = "scheduler",
      metrics = {
        statusSummary = { status = "failed", errors = errors },
        recordSummary = { inputRecordCount = ingest and rows or 0,
                          failedRecordCount = ingest and rows or 0, outputRecordCount = 0 },
        durationSummary = { startedAtUTC = started, completedAtUTC = completed },
      },
    })
  end
  state.sandbox = { seed = o.seed, runs = o.runs, flows = info, by_code = by_code }
  return state.sandbox
end

return _M
