-- client:retry_failed(spec): re-trigger a flow's failed runs concurrently,
-- in one thread, through the C multi engine, exactly once.
--
-- Every decision goes to the journal (flowservice.journal) and is fsync'd
-- before the request leaves ("pending", with its request id) and after the
-- answer. A run the journal calls done is never re-triggered again. A run
-- left pending or ambiguous by a job that died is settled, before anything
-- else, with the strongest evidence there is (see settle below); what stays
-- unknown is reported as ambiguous until an operator resolves it.
local core = require "flowservice.core"
local args = require "flowservice.args"
local errors = require "flowservice.errors"
local journal = require "flowservice.journal"
local retry = require "flowservice.retry"

local now, parse_date = core.now, core.parse_date
local floor, huge, max, min = math.floor, math.huge, math.max, math.min
local format, lower = string.format, string.lower
local ipairs, pairs, setmetatable, tostring, type = ipairs, pairs, setmetatable, tostring, type
local os_time, remove = os.time, table.remove

local _M = {}

local SPEC = {
  flow_id = "string", since = "number", before = "number", status = "any",
  zero_record_success = "boolean", concurrency = "number", dry_run = "boolean",
  journal = "any", grace = "number", on_progress = "function", max = "number",
  resolve = "table",
}

-- Errors that every run would get too: stop at once instead of failing all.
local FATAL_CODES = {
  ["FLOW-1388-400"] = "the flow is not enabled",
  ["FLOW-2105-400"] = "the sandbox header is missing",
  ["FLOW-2100-404"] = "the sandbox is unknown",
  ["FLOW-1333-400"] = "re-trigger is not supported for this source",
}

local MAX_THROTTLED = 20 -- 429s one run may take before it counts as failed
local GRACE = 30
local CLOCK_MARGIN_MS = 2000 -- the Date header has whole seconds; lean early

local function fail(msg) args.fail(1, "retry_failed", msg, 3) end

local function check_spec(spec)
  if type(spec) ~= "table" then fail("spec must be a table, got " .. type(spec)) end
  args.fields(spec, SPEC, "spec field", 1, "retry_failed", 3)
  if not spec.flow_id or spec.flow_id == "" then fail("spec field 'flow_id' is required") end
  if spec.concurrency ~= nil and not (args.is_integer(spec.concurrency) and spec.concurrency >= 1) then
    fail("spec field 'concurrency' must be a whole number >= 1")
  end
  if spec.grace ~= nil and not (spec.grace >= 0 and spec.grace < huge) then
    fail("spec field 'grace' must be a number of seconds >= 0")
  end
  if spec.journal ~= nil and spec.journal ~= false and (type(spec.journal) ~= "string" or spec.journal == "") then
    fail("spec field 'journal' must be a path or false")
  end
  for run_id, decision in pairs(spec.resolve or {}) do
    if type(run_id) ~= "string" or (decision ~= "done" and decision ~= "retry") then
      fail("spec field 'resolve' maps run ids to \"done\" or \"retry\"")
    end
  end
end

local function status_of(run)
  local summary = type(run.metrics) == "table" and run.metrics.statusSummary
  return type(summary) == "table" and type(summary.status) == "string" and lower(summary.status) or "?"
end

local function records_of(run)
  local summary = type(run.metrics) == "table" and run.metrics.recordSummary
  return type(summary) == "table" and summary.outputRecordCount or nil
end

local function children_of(run)
  return type(run.childFlowRunIds) == "table" and run.childFlowRunIds or nil
end

-- Why a listed run may not be re-triggered, or nil when it may.
local function ineligible(run, spec)
  local status = status_of(run)
  if status == "failed" then return nil end
  if status == "success" and spec.zero_record_success and records_of(run) == 0 then return nil end
  if status == "success" and records_of(run) == 0 then
    return "success with 0 records (ask with zero_record_success)"
  end
  return "status " .. status .. " cannot be re-triggered"
end

local function wall_ms() return os_time() * 1000 end

-- The job: state shared by its steps.
local Job = {}
Job.__index = Job

function Job:server_now_ms()
  local clock = self.api.clock(self.p)
  if clock then return floor(clock * 1000) end
  return wall_ms()
end

function Job:write(entries)
  if self.journal and #entries > 0 then
    local ok, err = self.journal:write(entries)
    if not ok then return nil, errors.new(err) end
  end
  return true
end

function Job:progress()
  if self.spec.on_progress then
    local r = self.report
    local elapsed = now() - self.started
    self.spec.on_progress {
      total = self.total, done = #r.retriggered, failed = #r.failed, ambiguous = #r.ambiguous,
      skipped = #r.skipped, in_flight = self.in_flight, queued = #self.queue,
      rate = elapsed > 0 and #r.retriggered / elapsed or 0,
    }
  end
end

-- Settling what a dead job left pending or ambiguous --------------------

-- 1. linkage: the server names a run's children.
local function settle_by_linkage(entry, run)
  local known = {}
  for _, id in ipairs(entry.new_ids) do known[id] = true end
  for _, child in ipairs(children_of(run) or {}) do
    if not known[child] then return "done", child end
  end
  return "retry"
end

-- 2. If-Match, where the server changes a run's etag when it re-triggers it:
-- repeat with the etag the first pending line recorded. 412: it was done.
function Job:settle_by_if_match(entry)
  local etag = entry.pendings[1] and entry.pendings[1].etag
  if type(etag) ~= "string" then return nil end
  local run, err = self.client:retrigger(entry.run, { if_match = etag })
  if run then return "done", run.id, run end
  if err.status == 412 then return "done" end
  return nil, err
end

local function pending_time(pnd) return pnd.server_time or pnd.time or 0 end

-- 3. counting: runs made by this client since the oldest pending time that
-- no done line accounts for. None: the pending ones never happened. As many
-- as were pending (plus runs settled done without a known new id in that
-- time): all done. Anything else stays ambiguous.
-- accounted, unknown_done: what this settling pass found before counting.
function Job:settle_by_count(unsettled, accounted, unknown_done)
  local oldest, newest = huge, 0
  for _, entry in ipairs(unsettled) do
    for _, pnd in ipairs(entry.pendings) do
      oldest, newest = min(oldest, pending_time(pnd)), max(newest, pending_time(pnd))
    end
  end
  -- the dead process's last requests may still be landing
  local wait = (newest + self.grace * 1000 - self:server_now_ms()) / 1000
  if wait > 0 then self.api.sleep(self.p, wait, self.waiter) end
  for _, entry in pairs(self.state.runs) do
    for _, id in ipairs(entry.new_ids) do accounted[id] = true end
    if entry.state == "done" and not entry.new_id and (entry.server_time or huge) >= oldest - CLOCK_MARGIN_MS then
      unknown_done = unknown_done + 1
    end
  end
  local made, err = self.client:list_runs { flow_id = self.spec.flow_id,
    filters = { format("createdAt>=%.0f", oldest - CLOCK_MARGIN_MS),
      "createdClient==" .. self.api.client_id(self.p) } }
  if not made then return nil, err end
  local count = 0
  for _, run in ipairs(made) do
    if not accounted[run.id] then count = count + 1 end
  end
  if count == 0 then return "retry" end
  if count == #unsettled + unknown_done then return "done" end
  return "ambiguous", format("%d unaccounted runs by this client since the first pending time, %d pending",
    count, #unsettled)
end

function Job:settle(candidates_by_id)
  local learned = self.state.learned
  local unsettled, entries = {}, {}
  for _, entry in pairs(self.state.runs) do
    if entry.state == "pending" or entry.state == "ambiguous" then unsettled[#unsettled + 1] = entry end
  end
  if #unsettled == 0 then return true end
  local accounted, unknown_done = {}, 0
  local function settled(entry, outcome, evidence, new_id, why)
    local first = entry.pendings[1]
    local line = { run = entry.run, state = outcome, evidence = evidence, new_id = new_id, why = why,
      server_time = first and pending_time(first) or nil }
    if new_id then accounted[new_id] = true end
    if outcome == "done" and not new_id then unknown_done = unknown_done + 1 end
    entries[#entries + 1] = line
    self.report.settled[#self.report.settled + 1] = { run_id = entry.run, outcome = outcome,
      evidence = evidence, new_id = new_id }
  end
  local rest = {}
  for _, entry in ipairs(unsettled) do
    local outcome, new_id, evidence
    if learned.linkage then
      local run = candidates_by_id[entry.run] or self.client:get_run(entry.run)
      if run then outcome, new_id = settle_by_linkage(entry, run) evidence = "linkage" end
      if outcome == "retry" then outcome = nil end -- only once grace has passed: see below
    end
    if not outcome and learned.etag_changes then
      outcome, new_id = self:settle_by_if_match(entry)
      evidence = "if-match"
    end
    if outcome then settled(entry, outcome, evidence, new_id) else rest[#rest + 1] = entry end
  end
  if #rest > 0 then
    local outcome, why = self:settle_by_count(rest, accounted, unknown_done)
    if not outcome then why = "could not count: " .. tostring(why) end
    for _, entry in ipairs(rest) do settled(entry, outcome or "ambiguous", "count", nil, why) end
  end
  return self:write(entries)
end

-- Learning how this server behaves, once, on a run re-triggered for sure --

function Job:learn(source_id, used_etag, new_id)
  local learned = self.state.learned
  if learned.etag_changes ~= nil and learned.linkage ~= nil then return true end
  local source = self.client:get_run(source_id)
  if not source then return true end -- try again on a later success
  local made = self.client:get_run(new_id)
  local children = children_of(source) or {}
  local linked = made and made.parentFlowRunId == source_id
  for _, id in ipairs(children) do linked = linked or id == new_id end
  return self:write { { learned = { etag_changes = source.etag ~= used_etag, linkage = linked and true or false } } }
end

-- The concurrent part ------------------------------------------------------

function Job:submit_round()
  local lines = {}
  while self.in_flight < self.limit and #self.queue > 0 and now() >= self.not_before do
    local item = remove(self.queue, 1)
    local opts, err = self.api.attempt_opts(self.p, { if_match = item.etag }, self.waiter)
    if not opts then return nil, err end
    local t = self.p.handle:submit_retrigger(item.run.id, opts)
    item.tries, item.sent_at = (item.tries or 0) + 1, now()
    self.flight[t] = item
    self.in_flight = self.in_flight + 1
    lines[#lines + 1] = { run = item.run.id, state = "pending", request_id = t:request_id(),
      etag = item.etag, time = wall_ms(), server_time = self:server_now_ms() - CLOCK_MARGIN_MS }
  end
  return lines
end

function Job:requeue(item, delay)
  self.queue[#self.queue + 1] = item
  if delay then self.not_before = max(self.not_before, now() + delay) end
end

-- One finished transfer -> report and journal lines.
function Job:answer(item, t, lines)
  local run, status_or_err, request_id, date = t:result()
  self.in_flight = self.in_flight - 1
  local id = item.run.id
  if self.p.log then
    self.api.log_attempt(self.p, "POST", "/runs/" .. id .. "/action?op=" .. (self.p.opts.op or core.defaults.op),
      run and status_or_err or status_or_err.status or status_or_err.kind, item.tries,
      request_id or status_or_err.request_id, item.sent_at)
  end
  if run then
    if date then self.api.saw_date(self.p, parse_date(date)) end
    self.report.retriggered[#self.report.retriggered + 1] = { run_id = id, new_id = run.id,
      etag = run.etag, request_id = request_id, possible_duplicate = run.resent or nil }
    lines[#lines + 1] = { run = id, state = "done", new_id = run.id, etag = run.etag,
      request_id = request_id, resent = run.resent or nil }
    self.limit = min(self.concurrency, self.limit + 1)
    self.learn_from = self.learn_from or { id, item.etag, run.id }
    return
  end
  local err = errors.from_core(status_or_err, self.api.secrets(self.p))
  if err.date then self.api.saw_date(self.p, err.date) end
  local refused = { run = id, state = "refused", request_id = err.request_id, status = err.status }
  if err.kind == "http" and err.status == 429 then
    item.throttled = (item.throttled or 0) + 1
    if item.throttled <= MAX_THROTTLED then
      self.limit = max(1, floor(self.limit / 2)) -- slow down, lose nothing
      lines[#lines + 1] = refused
      return self:requeue(item, err.retry_after or retry.backoff(self.p.retry, item.throttled))
    end
  elseif retry.verdict(err, true) == "retry" then -- never sent: safe to repeat
    item.attempts = (item.attempts or 1) + 1
    if item.attempts <= self.p.retry.attempts then
      lines[#lines + 1] = refused
      return self:requeue(item, retry.backoff(self.p.retry, item.attempts - 1))
    end
  elseif err.status == 401 and err.code == "401013" and self.p.auth and not self.refreshed then
    self.refreshed = true -- one new token for the whole job, then replay
    self.p.auth:invalidate(self.api.current_token(self.p))
    lines[#lines + 1] = refused
    return self:requeue(item)
  elseif err.status == 412 and not item.refetched then
    -- the run changed since it was listed: look again and decide afresh
    item.refetched = true
    lines[#lines + 1] = refused
    local fresh = self.client:get_run(id)
    local why = not fresh and "changed since listed, and could not be read again"
      or ineligible(fresh, self.spec) or (children_of(fresh) and #children_of(fresh) > 0
        and "already re-triggered (childFlowRunIds)")
    if why then
      self.report.skipped[#self.report.skipped + 1] = { run_id = id, reason = why }
      return
    end
    item.run, item.etag = fresh, fresh.etag
    return self:requeue(item)
  end
  if err.status == 401 or err.status == 403 or FATAL_CODES[err.code or ""] then
    self.fatal = self.fatal or err
    lines[#lines + 1] = refused
    return
  end
  if retry.verdict(err, true) == "ambiguous" then
    err.ambiguous = true
    self.report.ambiguous[#self.report.ambiguous + 1] = { run_id = id, why = tostring(err),
      request_id = err.request_id }
    lines[#lines + 1] = { run = id, state = "ambiguous", why = tostring(err), request_id = err.request_id }
    return
  end
  self.report.failed[#self.report.failed + 1] = { run_id = id, error = err }
  lines[#lines + 1] = { run = id, state = "failed", request_id = err.request_id, status = err.status,
    code = err.code, why = tostring(err) }
end

function Job:harvest(lines)
  local finished = false
  for t, item in pairs(self.flight) do
    if t:done() then
      self.flight[t] = nil
      self:answer(item, t, lines)
      finished = true
    end
  end
  return finished
end

function Job:run_queue()
  local handle = self.p.handle
  local carry = {} -- answers journaled with the next round's pending lines
  while (#self.queue > 0 and not self.fatal and not self.report.stopped) or self.in_flight > 0 do
    local lines = carry
    if self.api.exiting() then self.report.stopped = "nginx is exiting" end -- a timer's premature end
    if not self.fatal and not self.report.stopped then
      local pending, err = self:submit_round()
      if not pending then return nil, err end
      for _, l in ipairs(pending) do lines[#lines + 1] = l end
    end
    -- durable before the requests leave: they only go out in step()
    local ok, err = self:write(lines)
    if not ok then
      for t in pairs(self.flight) do t:cancel() end
      return nil, err
    end
    carry = {}
    handle:step()
    if self:harvest(carry) then
      self:progress()
      if self.learn_from and not self.learned_once then
        self.learned_once = true
        local l = self.learn_from
        local ok2, lerr = self:learn(l[1], l[2], l[3])
        if not ok2 then return nil, lerr end
      end
    else
      local wait = handle:timeout() or 0.05
      if self.in_flight == 0 then wait = max(0, self.not_before - now()) end
      wait = min(max(wait, 0.001), self.waiter and 0.02 or 0.25)
      if self.waiter then self.waiter(wait) else handle:wait(wait) end
    end
  end
  return self:write(carry)
end

-- client:retry_failed(spec) -> report or nil, err (err.report: the partial report)
function _M.run(client, p, spec, api)
  check_spec(spec)
  local job = setmetatable({
    client = client, p = p, spec = spec, api = api, started = now(),
    concurrency = spec.concurrency or 8, grace = spec.grace or GRACE,
    queue = {}, flight = {}, in_flight = 0, not_before = 0, total = 0,
    report = { considered = 0, retriggered = {}, skipped = {}, failed = {}, ambiguous = {},
      settled = {}, dry_run = spec.dry_run or false, journal = spec.journal or nil },
  }, Job)
  job.limit = job.concurrency
  job.waiter = api.waiter(p, nil, 2)
  local report = job.report
  local function finish(err)
    if job.journal then job.journal:close() end
    report.elapsed = now() - job.started
    if err then
      err.report = report
      return nil, err
    end
    return report
  end

  if spec.journal and not spec.dry_run then
    local j, err = journal.open(spec.journal)
    if not j then return nil, errors.new(err) end
    job.journal, job.state = j, j.state
  else
    job.state = spec.journal and journal.read(spec.journal) or journal.read("/dev/null")
  end
  if spec.dry_run then report.planned = {} end

  -- an operator's decisions come first
  local decisions = {}
  for run_id, decision in pairs(spec.resolve or {}) do
    decisions[#decisions + 1] = { run = run_id, state = decision, evidence = "operator" }
    report.settled[#report.settled + 1] = { run_id = run_id, outcome = decision, evidence = "operator" }
  end
  if spec.dry_run then
    for _, d in ipairs(decisions) do job.state.runs[d.run] = { run = d.run, state = d.state, new_ids = {} } end
  else
    local ok, err = job:write(decisions)
    if not ok then return finish(err) end
  end

  local candidates, err = client:list_runs { flow_id = spec.flow_id, status = spec.status or "failed",
    since = spec.since, before = spec.before, max = spec.max }
  if not candidates then return finish(err) end
  if spec.zero_record_success then
    local more
    more, err = client:list_runs { flow_id = spec.flow_id, status = "success",
      since = spec.since, before = spec.before, max = spec.max }
    if not more then return finish(err) end
    for _, run in ipairs(more) do
      if records_of(run) == 0 then candidates[#candidates + 1] = run end
    end
  end
  local by_id, unique = {}, {}
  for _, run in ipairs(candidates) do
    if type(run) == "table" and type(run.id) == "string" and not by_id[run.id] then
      by_id[run.id] = run
      unique[#unique + 1] = run
    end
  end
  report.considered = #unique

  if not spec.dry_run then
    local ok
    ok, err = job:settle(by_id)
    if not ok then return finish(err) end
  end

  for _, run in ipairs(unique) do
    local entry = job.state.runs[run.id]
    local state = entry and entry.state
    local why = ineligible(run, spec)
    if not why and state == "done" then why = "already re-triggered (journal)" end
    if not why and children_of(run) and #children_of(run) > 0 then
      why = "already re-triggered (childFlowRunIds)"
    end
    if not why and (state == "pending" or state == "ambiguous") then
      report.ambiguous[#report.ambiguous + 1] = { run_id = run.id, request_id = entry.request_id,
        why = entry.why or "outcome of an earlier job unknown: decide with resolve" }
    elseif why then
      report.skipped[#report.skipped + 1] = { run_id = run.id, reason = why }
    elseif spec.dry_run then
      report.planned[#report.planned + 1] = run.id
    else
      job.queue[#job.queue + 1] = { run = run, etag = run.etag }
    end
  end
  job.total = #job.queue
  -- runs the journal still holds as unknown but that were not listed this time
  local listed = by_id
  for id, entry in pairs(job.state.runs) do
    if not listed[id] and (entry.state == "pending" or entry.state == "ambiguous") then
      report.ambiguous[#report.ambiguous + 1] = { run_id = id, request_id = entry.request_id,
        why = entry.why or "outcome of an earlier job unknown: decide with resolve" }
    end
  end
  if spec.dry_run or #job.queue == 0 then return finish() end

  local ok
  ok, err = job:run_queue()
  job:progress()
  if not ok then return finish(err) end
  if job.fatal then return finish(job.fatal) end
  return finish()
end

return _M
