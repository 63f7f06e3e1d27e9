-- flowservice.heal: given a failed run, decide and act; one policy for the
-- I/O Events webhook (flowservice.webhook) and any loop that finds failed
-- runs itself.
--
--   local healer = heal.new(client, { journal = function(flow_id) return path end, ... })
--   local decision = healer:handle(run_or_id)   -- decide; act when due
--   healer:decide(run) / healer:act(run_id) / healer:scheduled()
--
-- Deciding reads flowservice.policy (eligibility, error codes); the chain
-- budget counts a run's ancestors (its parentFlowRunId, or the journal's
-- new_ids); the backoff between chain steps is written to the flow's
-- journal as a heal line before anything waits on it, so a restart keeps
-- the schedule (a file's line, or the PostgreSQL journal's heal column: the
-- journal interface, whichever backend the target names). Acting is client:retry_failed{ run_ids = { id } } with the
-- same journal: claim before send, If-Match, settling by evidence. That is
-- what keeps duplicated events, two workers, two hosts and a watch loop
-- from re-triggering one run twice; nothing here sends on its own.
local journal = require "flowservice.journal"
local policy = require "flowservice.policy"
local args = require "flowservice.args"
local metrics = require "flowservice.metrics"
local window = require "flowservice.window"

local floor, format, concat = math.floor, string.format, table.concat
local getmetatable, ipairs, pairs, setmetatable, tostring, type =
  getmetatable, ipairs, pairs, setmetatable, tostring, type
local os_time = os.time
local ngx = ngx -- nil outside OpenResty

local _M = {}

-- Codes a re-run does not fix: the source's data does not parse
-- (CONNECTOR-2001), data prep mapping (MAPPER-), ingestion's validation
-- (INGEST-). Matched as prefixes against every code of a run, nested ones too.
_M.DEFAULT_EXCLUDE = { "CONNECTOR-2001", "MAPPER-", "INGEST-" }
_M.DEFAULT_BACKOFF = { 300, 1800, 7200 } -- seconds before chain steps 1, 2, 3 (5 min, 30 min, 2 h)
_M.DEFAULT_MAX_CHAIN = 3
_M.BUDGET_SPENT = "retry budget spent"

local OPTIONS = {
  journal = "any", flows = "table", codes = "table", exclude_codes = "table",
  zero_record_success = "boolean", max_chain = "number", backoff = "table", dry_run = "boolean",
  log = "function", count = "function", grace = "number",
}

local Healer = {}
Healer.__index = Healer

-- Wall clock, epoch ms (a schedule outlives the process: not monotonic).
local function wall_ms()
  if ngx then return floor(ngx.now() * 1000) end
  return os_time() * 1000
end

local function fail(msg) args.fail(2, "heal.new", msg, 3) end

-- heal.new(client, opts) -> healer
function _M.new(client, opts)
  if type(client) ~= "table" or type(client.retry_failed) ~= "function" then
    args.fail(1, "heal.new", "a flowservice client expected", 2)
  end
  if type(opts) ~= "table" then fail("options table expected, got " .. type(opts)) end
  args.fields(opts, OPTIONS, "option", 2, "heal.new", 2)
  local j = opts.journal
  if type(j) == "string" and j ~= "" then
    local path = j
    j = function() return path end
  elseif type(j) ~= "function" and not (j == nil and opts.dry_run) then
    fail("option 'journal' (a path or function(flow_id) -> path) is required: it is what keeps"
      .. " a run from being re-triggered twice")
  end
  local max_chain = opts.max_chain or _M.DEFAULT_MAX_CHAIN
  if not (args.is_integer(max_chain) and max_chain >= 0) then
    fail("option 'max_chain' must be a whole number >= 0")
  end
  local backoff = opts.backoff or _M.DEFAULT_BACKOFF
  if #backoff == 0 then fail("option 'backoff' must be a non-empty list of seconds") end
  for i, s in ipairs(backoff) do
    if type(s) ~= "number" or not (s >= 0 and s < math.huge) then
      fail(format("option 'backoff' entry %d must be a number of seconds >= 0", i))
    end
  end
  for _, key in ipairs { "codes", "exclude_codes", "flows" } do
    for i, v in ipairs(opts[key] or {}) do
      if type(v) ~= "string" or v == "" then
        fail(format("option '%s' entry %d must be a non-empty string", key, i))
      end
    end
  end
  local allowed
  if opts.flows then
    allowed = {}
    for _, f in ipairs(opts.flows) do allowed[f] = true end
  end
  return setmetatable({
    client = client, journal_of = j, allowed = allowed, flows = opts.flows,
    codes = opts.codes, exclude_codes = opts.exclude_codes or _M.DEFAULT_EXCLUDE,
    zero_record_success = opts.zero_record_success or false,
    max_chain = max_chain, backoff = backoff, dry_run = opts.dry_run or false,
    log = opts.log, count = opts.count, grace = opts.grace,
  }, Healer)
end

-- The delay before chain step n (1-based), seconds; the last entry repeats.
function Healer:delay(step)
  local b = self.backoff
  return b[step] or b[#b]
end

-- What the journal backend needs to hold flow_id's runs of this client.
-- The healer itself writes heal lines only: it takes over no claim a dead
-- job left (retry_failed, which settles them, does).
function Healer:journal_options(flow_id)
  local o = self.client:journal_options()
  o.flow, o.take_over = flow_id, false
  return o
end

-- The flow's journal state and target; nil, nil, why when it cannot be read.
local function state_of(self, flow_id)
  local path = self.journal_of and self.journal_of(flow_id)
  if not path then return journal.read("/dev/null"), nil end
  local state, err = journal.read(path, self:journal_options(flow_id))
  if not state then return nil, nil, type(err) == "table" and err.message or tostring(err) end
  return state, path
end

-- How many re-triggers stand between run and the failure that began its
-- chain: each parent known from parentFlowRunId or the journal's new_ids.
-- Reads at most max_chain parents.
function Healer:depth(run, state)
  local parent_of = {}
  for id, entry in pairs(state.runs) do
    for _, new_id in ipairs(entry.new_ids or {}) do parent_of[new_id] = id end
  end
  local depth, seen = 0, { [run.id] = true }
  local id, parent = run.id, type(run.parentFlowRunId) == "string" and run.parentFlowRunId or nil
  while depth < self.max_chain do
    parent = parent or parent_of[id]
    if not parent or seen[parent] then break end
    seen[parent], depth, id = true, depth + 1, parent
    if depth >= self.max_chain then break end
    if parent_of[id] then
      parent = parent_of[id]
    else
      local p = self.client:get_run(id)
      parent = p and type(p.parentFlowRunId) == "string" and p.parentFlowRunId or nil
    end
  end
  return depth
end

function Healer:note(decision)
  if self.count then self.count(decision) end
  if self.log then
    local d = decision
    self.log(format("heal: run %s flow %s: %s%s%s%s", tostring(d.run_id), tostring(d.flow_id), d.action,
      d.reason and (" (" .. d.reason .. ")") or "", d.step and (" step " .. d.step) or "",
      d.new_id and (" new run " .. d.new_id) or (d.due and d.action == "wait"
        and format(" due in %.0f s", (d.due - wall_ms()) / 1000) or "")))
  end
  return decision
end

local function skip(run, why, reason, extra)
  local d = { run_id = run.id, flow_id = run.flowId, action = "skip", why = why, reason = reason }
  for k, v in pairs(extra or {}) do d[k] = v end
  return d
end

-- Why not, or nil: the policy alone, no I/O.
function Healer:refusal(run)
  if self.allowed and not self.allowed[run.flowId] then
    return skip(run, "flow_not_allowed", "flow " .. tostring(run.flowId) .. " is not on the allow-list")
  end
  local why = policy.ineligible(run, { zero_record_success = self.zero_record_success })
  if why then return skip(run, "ineligible", why) end
  local code = #self.exclude_codes > 0 and policy.matching_code(run, self.exclude_codes)
  if code then return skip(run, "excluded_code", "excluded error code " .. code) end
  if self.codes and not policy.matching_code(run, self.codes) then
    return skip(run, "excluded_code", "no error code matching " .. concat(self.codes, ","))
  end
  local children = policy.children_of(run)
  if children and #children > 0 then
    return skip(run, "already_retriggered", "already re-triggered (childFlowRunIds)")
  end
  return nil
end

-- healer:decide(run) -> decision: { run_id, flow_id, action, why, reason,
-- step, due }. action: "skip" (reason, why: a short key), "wait" (due, epoch
-- ms), "retrigger" (due now), "busy" (the journal is held: ask again soon),
-- "error" (reason). Writes the schedule (a heal line) the first time a run
-- is found eligible, unless dry_run.
function Healer:decide(run)
  if type(run) ~= "table" or type(run.id) ~= "string" or type(run.flowId) ~= "string" then
    return { action = "skip", why = "not_a_run", reason = "not a run with an id and a flowId" }
  end
  local refused = self:refusal(run)
  if refused then return refused end
  local state, path, why = state_of(self, run.flowId)
  if not state then return { run_id = run.id, flow_id = run.flowId, action = "error", reason = why } end
  local entry = state.runs[run.id]
  if entry and entry.state == "done" then
    return skip(run, "already_retriggered", "already re-triggered (journal)")
  end
  local depth = self:depth(run, state)
  if depth >= self.max_chain then
    return skip(run, "budget", _M.BUDGET_SPENT, { step = depth + 1 })
  end
  local step = depth + 1
  local planned = state.heal[run.id]
  -- no wait, nothing to keep across a restart: no schedule line
  if not planned and self:delay(step) <= 0 then planned = { due = wall_ms(), step = step } end
  if not planned and path and not self.dry_run then
    -- a file under its lock; PostgreSQL keeps the first schedule written:
    -- another worker or host may be writing the same
    local j, err = journal.open(path, self:journal_options(run.flowId))
    if not j then
      local busy = type(err) == "table" and tostring(err.message):find("in use", 1, true)
      return { run_id = run.id, flow_id = run.flowId, action = busy and "busy" or "error",
        reason = type(err) == "table" and err.message or tostring(err) }
    end
    planned = j.state.heal[run.id]
    if not planned then
      local now = wall_ms()
      planned = { heal = run.id, flow = run.flowId, step = step, due = now + floor(self:delay(step) * 1000),
        time = now }
      local ok, werr = j:write { planned }
      if not ok then
        j:close()
        return { run_id = run.id, flow_id = run.flowId, action = "error", reason = tostring(werr.message or werr) }
      end
      planned = j.state.heal[run.id] or planned -- the schedule that was first
    end
    j:close()
  elseif not planned then
    planned = { due = wall_ms() + floor(self:delay(step) * 1000), step = step }
  end
  local due = planned.due
  return { run_id = run.id, flow_id = run.flowId, step = planned.step or step, due = due,
    action = due <= wall_ms() and "retrigger" or "wait" }
end

-- healer:act(run_id, flow_id) -> decision: re-trigger through retry_failed
-- with the journal. action "retriggered" (new_id), "skip", "failed",
-- "ambiguous", "busy", "error", or "planned" in a dry run.
function Healer:act(run_id, flow_id)
  local d = { run_id = run_id, flow_id = flow_id }
  local report, err = self.client:retry_failed { run_ids = { run_id }, concurrency = 1,
    journal = self.journal_of or false, dry_run = self.dry_run, grace = self.grace }
  if not report then
    report = err.report
    if err.kind == "journal" and tostring(err.message):find("in use", 1, true) then
      d.action, d.reason = "busy", err.message
      return d
    end
    if not report or (#report.retriggered == 0 and #report.ambiguous == 0) then
      d.action, d.reason = "error", tostring(err)
      return d
    end
  end
  local r = report
  if r.retriggered[1] then
    d.action, d.new_id = "retriggered", r.retriggered[1].new_id
  elseif r.ambiguous[1] then
    d.action, d.reason = "ambiguous", r.ambiguous[1].why
  elseif r.planned and r.planned[1] then
    d.action = "planned"
  elseif r.skipped[1] then
    local reason = tostring(r.skipped[1].reason)
    d.action, d.reason = "skip", reason
    d.why = reason:find("already re-triggered", 1, true) and "already_retriggered" or "ineligible"
  elseif r.failed[1] then
    d.action, d.reason = "failed", tostring(r.failed[1].error)
  else
    d.action, d.reason = "error", "retry_failed reported nothing about the run"
  end
  return d
end

-- healer:handle(run or run_id) -> decision: decide, and act when due. A
-- decision to wait says when (due); call act(run_id, flow_id) then (the
-- webhook sets a timer; a restart finds it again through scheduled()).
function Healer:handle(run)
  if type(run) == "string" then
    local got, err = self.client:get_run(run)
    if not got then
      return self:note { run_id = run, action = "error", reason = "could not read the run: " .. tostring(err) }
    end
    run = got
  end
  local d = self:decide(run)
  if d.action == "retrigger" then
    if self.dry_run then
      d.action = "planned"
    else
      local step = d.step
      d = self:act(d.run_id, d.flow_id)
      d.step = step
    end
  end
  return self:note(d)
end

-- healer:settle(run_id, flow_id) -> decision: a run the journal holds as
-- pending (a process died mid-send) goes to retry_failed, which settles it
-- by evidence first (and re-triggers only what it finds never sent).
function Healer:settle(run_id, flow_id)
  local d = self.dry_run and { run_id = run_id, flow_id = flow_id, action = "planned" }
    or self:act(run_id, flow_id)
  d.settling = true
  return self:note(d)
end

-- What is scheduled and not yet done, for a restart: { {run_id, flow_id,
-- due, step} }, from the journals of flows (default: the allow-list, else
-- every flow the service lists); also the runs a process that died mid-send
-- left pending (due now, unsettled = true: acting on them is retry_failed
-- settling them by evidence, never a blind repeat). nil, err when the flows
-- cannot be listed.
function Healer:scheduled(flows)
  flows = flows or self.flows
  if not flows then
    local list, err = self.client:list_flows {}
    if not list then return nil, err end
    flows = {}
    for _, f in ipairs(list) do
      if type(f) == "table" and type(f.id) == "string" then flows[#flows + 1] = f.id end
    end
  end
  local out = {}
  for _, flow_id in ipairs(flows) do
    local state = state_of(self, flow_id) or journal.fold("") -- unreadable now: nothing to resume
    for run_id, planned in pairs(state.heal) do
      local entry = state.runs[run_id]
      if not (entry and (entry.state == "done" or entry.state == "pending")) then
        out[#out + 1] = { run_id = run_id, flow_id = flow_id, due = planned.due, step = planned.step }
      end
    end
    for run_id, entry in pairs(state.runs) do
      if entry.state == "pending" and (entry.flow == nil or entry.flow == flow_id) then
        out[#out + 1] = { run_id = run_id, flow_id = flow_id, due = 0, unsettled = true }
      end
    end
  end
  table.sort(out, function(a, b) return a.due < b.due end)
  return out
end

-- The watch loop ----------------------------------------------------------
--
-- heal.watch(healer, opts) -> summary | nil, err: every `every` seconds,
-- each flow's failed runs since its last scan (the journal's scan mark, less
-- `overlap`: a run is listed by its start, and may fail long after it), and
-- the schedules that came due, through the healer. For teams without I/O
-- Events, and beside the webhook: both go through the same journals.

local WATCH = {
  flows = "table", all_flows = "boolean", every = "number", since = "any", overlap = "number",
  passes = "number", stop = "function", sleep = "function", metrics_file = "string",
  metrics = "table", on_pass = "function",
}

local function default_sleep(seconds)
  if ngx then return ngx.sleep(seconds) end
  os.execute(format("sleep %.3f", seconds))
end

-- One flow's pass: decisions into summary.
function Healer:scan_flow(flow_id, since0, overlap_ms, summary, quiet, m)
  local state, path, why = state_of(self, flow_id)
  if not state then
    summary.errors[#summary.errors + 1] = format("flow %s: %s", flow_id, why)
    return
  end
  local since = state.heal_scanned and (state.heal_scanned - overlap_ms) or since0
  local before = wall_ms()
  local runs, err = self.client:list_runs { flow_id = flow_id, status = "failed", since = since }
  if not runs then
    summary.errors[#summary.errors + 1] = format("flow %s: could not list runs: %s", flow_id, tostring(err))
    return
  end
  local seen = {}
  local function take(run)
    local id = type(run) == "table" and run.id or run
    if seen[id] then return end
    seen[id] = true
    local entry = state.runs[id]
    -- what the journal already settled, or was decided before, is not counted again
    local q = quiet[id]
    if (entry and entry.state == "done") or q == true or (q and q > wall_ms()) then return end
    local d = self:handle(run)
    m:count_decision(d)
    summary.decisions[d.action] = (summary.decisions[d.action] or 0) + 1
    if d.action == "skip" or d.action == "ambiguous" then
      quiet[id] = true -- said once; an operator decides an ambiguous one (resolve)
    elseif d.action == "wait" then
      quiet[id] = d.due
    end
  end
  for _, run in ipairs(runs) do take(run) end
  local now = wall_ms()
  for _, s in ipairs(self:scheduled { flow_id }) do
    if s.unsettled and not seen[s.run_id] then
      seen[s.run_id] = true
      local d = self:settle(s.run_id, flow_id)
      m:count_decision(d)
      summary.decisions[d.action] = (summary.decisions[d.action] or 0) + 1
    elseif s.due <= now then
      take(s.run_id)
    end
  end
  if path and not self.dry_run then
    local j = journal.open(path, self:journal_options(flow_id)) -- held by another job: scanned again next time
    if j then
      j:write { { heal = "scan", flow = flow_id, scanned = before } }
      j:close()
    end
  end
end

function _M.watch(healer, opts)
  if getmetatable(healer) ~= Healer then args.fail(1, "heal.watch", "a healer (heal.new) expected", 2) end
  if type(opts) ~= "table" then args.fail(2, "heal.watch", "options table expected", 2) end
  args.fields(opts, WATCH, "option", 2, "heal.watch", 2)
  if (opts.flows ~= nil) == (opts.all_flows == true) then
    args.fail(2, "heal.watch", "takes exactly one of 'flows' and 'all_flows'", 2)
  end
  local every = opts.every or 300
  if not (every >= 0 and every < math.huge) then
    args.fail(2, "heal.watch", "option 'every' must be seconds >= 0", 2)
  end
  local since0 = opts.since or "24h"
  if type(since0) == "string" then
    local ms, why = window.parse(since0)
    if not ms then args.fail(2, "heal.watch", "option 'since' " .. why, 2) end
    since0 = ms
  end
  local overlap_ms = floor((opts.overlap or 7200) * 1000)
  local m = opts.metrics or metrics.new()
  local sleep = opts.sleep or default_sleep
  local summary = { passes = 0, decisions = {}, errors = {} }
  local quiet = {}
  while true do
    local flows = opts.flows
    if opts.all_flows then
      local list, err = healer.client:list_flows { state = "enabled" }
      flows = {}
      if not list then
        summary.errors[#summary.errors + 1] = "could not list flows: " .. tostring(err)
      else
        for _, f in ipairs(list) do
          if type(f) == "table" and type(f.id) == "string" and (not healer.allowed or healer.allowed[f.id]) then
            flows[#flows + 1] = f.id
          end
        end
      end
    end
    for _, flow_id in ipairs(flows) do healer:scan_flow(flow_id, since0, overlap_ms, summary, quiet, m) end
    summary.passes = summary.passes + 1
    if opts.metrics_file then
      local ok, err = m:write_file(opts.metrics_file)
      if not ok then summary.errors[#summary.errors + 1] = "metrics file: " .. tostring(err) end
    end
    if opts.on_pass then opts.on_pass(summary) end
    if (opts.passes and summary.passes >= opts.passes) or (opts.stop and opts.stop()) then break end
    sleep(every)
    if opts.stop and opts.stop() then break end
  end
  summary.metrics = m
  return summary
end

return _M
