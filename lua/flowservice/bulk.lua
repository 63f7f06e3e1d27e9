-- client:retry_failed(spec): re-trigger a flow's failed runs (or runs named
-- by id) concurrently, in one thread, through the C multi engine, exactly
-- once.
--
-- Every decision goes to the journal (flowservice.journal) and is fsync'd
-- before the request leaves ("pending", with its request id) and after the
-- answer. A re-trigger is prepared first and handed to the engine only once
-- its pending line is on disk, so nothing that drives the engine meanwhile
-- (a token fetch, a read) can send it early. A run the journal calls done
-- is never re-triggered again. A run left pending or ambiguous by a job
-- that died is settled, before anything else, with the strongest evidence
-- there is (see settle below); what stays unknown is reported as ambiguous
-- until an operator resolves it.
--
-- The client is reached through its public methods and one internal door,
-- the batch (flowservice.client): prepare, submit, step, answer. What may be
-- repeated is flowservice.retry's to say.
local core = require "flowservice.core"
local args = require "flowservice.args"
local errors = require "flowservice.errors"
local journal = require "flowservice.journal"
local policy = require "flowservice.policy"
local retry = require "flowservice.retry"
local window = require "flowservice.window"

local now, parse_date = core.now, core.parse_date
local floor, huge, max, min = math.floor, math.huge, math.max, math.min
local format, concat = string.format, table.concat
local ipairs, pairs, setmetatable, tostring, type = ipairs, pairs, setmetatable, tostring, type
local os_time, remove, sort = os.time, table.remove, table.sort

local _M = {}

local SPEC = {
  flow_id = "string", run_ids = "table", since = "any", before = "any", status = "any",
  zero_record_success = "boolean", concurrency = "number", dry_run = "boolean",
  journal = "any", grace = "number", on_progress = "function", max = "number",
  resolve = "table", force = "boolean", stop = "function", codes = "table", exclude_codes = "table",
  all_flows = "boolean", wait_runs = "boolean", wait_timeout = "number", max_active = "number",
  wait_backoff = "table", lease = "number", short_lease_for_tests = "boolean",
  on_wait = "function", -- called with (seconds, pending) before the grace wait of settling
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

-- An argument error at the caller of client:retry_failed; depth: how many
-- more of our frames stand between (bulk.run and client:retry_failed are tail calls).
local function fail(msg, depth) args.fail(1, "retry_failed", msg, 3 + (depth or 0)) end

local function check_spec(spec)
  if type(spec) ~= "table" then fail("spec must be a table, got " .. type(spec)) end
  args.fields(spec, SPEC, "spec field", 1, "retry_failed", 3)
  local given = (spec.flow_id ~= nil and 1 or 0) + (spec.run_ids ~= nil and 1 or 0)
    + (spec.all_flows and 1 or 0)
  if given ~= 1 then fail("spec takes exactly one of 'flow_id', 'run_ids' and 'all_flows'") end
  if spec.flow_id == "" then fail("spec field 'flow_id' must not be empty") end
  if spec.run_ids then
    if #spec.run_ids == 0 then fail("spec field 'run_ids' must be a non-empty list") end
    for i, id in ipairs(spec.run_ids) do
      if type(id) ~= "string" then fail(format("spec field 'run_ids' entry %d must be a string", i)) end
      args.run_id(id, 1, "retry_failed", 3)
    end
    for _, key in ipairs { "since", "before", "status", "zero_record_success", "max", "resolve" } do
      if spec[key] ~= nil then fail("spec field '" .. key .. "' needs 'flow_id'") end
    end
  elseif spec.force ~= nil then
    fail("spec field 'force' needs 'run_ids'")
  end
  if spec.all_flows and spec.resolve then fail("spec field 'resolve' needs 'flow_id'") end
  for _, key in ipairs { "codes", "exclude_codes" } do
    for i, code in ipairs(spec[key] or {}) do
      if type(code) ~= "string" or code == "" then
        fail(format("spec field '%s' entry %d must be a non-empty string", key, i))
      end
    end
  end
  for _, key in ipairs { "since", "before" } do
    if spec[key] ~= nil and type(spec[key]) ~= "number" and type(spec[key]) ~= "string" then
      fail(format("spec field '%s' must be epoch ms or a time string, got %s", key, type(spec[key])))
    end
  end
  if spec.max_active ~= nil and not (args.is_integer(spec.max_active) and spec.max_active >= 1) then
    fail("spec field 'max_active' must be a whole number >= 1")
  end
  if spec.wait_timeout ~= nil and not (spec.wait_timeout > 0 and spec.wait_timeout < huge) then
    fail("spec field 'wait_timeout' must be a positive number of seconds")
  end
  local b = spec.wait_backoff
  if b ~= nil and not (type(b[1]) == "number" and type(b[2]) == "number" and b[1] > 0 and b[2] >= b[1]) then
    fail("spec field 'wait_backoff' must be { first, max } seconds, 0 < first <= max")
  end
  if spec.concurrency ~= nil and not (args.is_integer(spec.concurrency) and spec.concurrency >= 1) then
    fail("spec field 'concurrency' must be a whole number >= 1")
  end
  if spec.lease ~= nil and not (spec.lease > 0 and spec.lease < huge) then
    fail("spec field 'lease' must be a positive number of seconds")
  end
  if spec.grace ~= nil and not (spec.grace >= 0 and spec.grace < huge) then
    fail("spec field 'grace' must be a number of seconds >= 0")
  end
  local j = spec.journal
  if j ~= nil and j ~= false and type(j) ~= "function" and (type(j) ~= "string" or j == "") then
    fail("spec field 'journal' must be a path or PostgreSQL connection string, a function(flow_id) -> one,"
      .. " or false")
  end
  for run_id, decision in pairs(spec.resolve or {}) do
    if type(run_id) ~= "string" or (decision ~= "done" and decision ~= "retry") then
      fail("spec field 'resolve' maps run ids to \"done\" or \"retry\"")
    end
  end
end

local status_of, records_of, children_of = policy.status_of, policy.records_of, policy.children_of
local source_facts, matching_code, first_code = policy.source_facts, policy.matching_code, policy.first_code
local ineligible = policy.ineligible

local function wall_ms() return os_time() * 1000 end

-- The job: state shared by its steps.
local Job = {}
Job.__index = Job

function Job:server_now_ms()
  local clock = self.batch:server_time()
  if clock then return floor(clock * 1000) end
  return wall_ms()
end

-- Why the job should stop sending now (an interrupt, nginx exiting), or nil.
function Job:stopping()
  if self.report.stopped then return self.report.stopped end
  local why = (self.spec.stop and self.spec.stop()) or (self.batch.exiting() and "nginx is exiting")
  if why then self.report.stopped = why end
  return why
end

-- Sleep, in steps, so that a stop request is heard within a second.
function Job:sleep(seconds)
  local wake = now() + seconds
  while not self:stopping() do
    local left = wake - now()
    if left <= 0 then return end
    self.batch:sleep(min(left, 0.5))
    self:keep()
  end
end

-- Durable before returning (one fsync, or one transaction). refused: the
-- pending entries another job holds (run id -> why), not written.
function Job:write(entries)
  if self.journal and #entries > 0 then
    local ok, err = self.journal:write(entries)
    if not ok then
      self:taken_over(err)
      return nil, errors.new(err)
    end
    return true, err
  end
  return true
end

-- Claims another job took over while this one stalled past its lease
-- (err.lost, PostgreSQL): their transfers that are still here are dropped
-- (one not yet sent never leaves; that job settles what was), they are
-- reported skipped, and the job sends nothing more.
function Job:taken_over(err)
  local lost = type(err) == "table" and err.lost
  if not lost then return end
  for t, item in pairs(self.flight) do
    if lost[item.run.id] then
      t:cancel()
      self.flight[t] = nil
      self.in_flight = self.in_flight - 1
    end
  end
  local ids = {}
  for run_id in pairs(lost) do ids[#ids + 1] = run_id end
  sort(ids)
  -- what this job thought of them (an answer that came after the stall) is not its to report
  for _, kind in ipairs { "ambiguous", "failed" } do
    local kept = {}
    for _, entry in ipairs(self.report[kind]) do
      if not lost[entry.run_id] then kept[#kept + 1] = entry end
    end
    self.report[kind] = kept
  end
  for _, run_id in ipairs(ids) do self:skip(run_id, lost[run_id]) end
  self.report.taken_over = (self.report.taken_over or 0) + #ids
end

-- The journal's claims renewed while the job lives; a failure ends the job.
function Job:keep()
  if not self.journal or self.keep_failed then return true end
  local ok, err = self.journal:keep()
  if not ok then
    self:taken_over(err)
    self.keep_failed = errors.new(err)
    self.fatal = self.fatal or self.keep_failed
    return nil, self.keep_failed
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
-- The repeat is a re-trigger like any other: journaled pending first.
function Job:settle_by_if_match(entry)
  local etag = entry.pendings[1] and entry.pendings[1].etag
  if type(etag) ~= "string" then return nil end
  local item = { run = { id = entry.run }, etag = etag }
  local run, err = self:send_one(item)
  if run then return "done", run.id end
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
  if wait > 0 then
    if self.spec.on_wait then self.spec.on_wait(wait, #unsettled) end -- say what it waits for
    self:sleep(wait)
  end
  if self.report.stopped then return nil, "stopped before counting" end
  if self.journal then -- what other jobs sharing the journal wrote meanwhile counts too
    local ok, err = self.journal:reload()
    if not ok then return nil, tostring(errors.new(err)) end
    self.state = self.journal.state
  end
  for _, entry in pairs(self.state.runs) do
    for _, id in ipairs(entry.new_ids) do accounted[id] = true end
    if entry.state == "done" and not entry.new_id and (entry.server_time or huge) >= oldest - CLOCK_MARGIN_MS then
      unknown_done = unknown_done + 1
    end
  end
  local made, err = self.client:list_runs { flow_id = self.flow_id,
    filters = { format("createdAt>=%.0f", oldest - CLOCK_MARGIN_MS),
      "createdClient==" .. self.batch:client_id() } }
  if not made then return nil, tostring(err) end
  local count = 0
  for _, run in ipairs(made) do
    if not accounted[run.id] then count = count + 1 end
  end
  if count == 0 then return "retry" end
  local elsewhere = self.journal and self.journal:in_flight_elsewhere() or 0
  if count == #unsettled + unknown_done and elsewhere == 0 then return "done" end
  if elsewhere > 0 then
    return "ambiguous", format("%d unaccounted runs by this client since the first pending time, %d pending,"
      .. " %d re-triggers of other jobs in flight", count, #unsettled, elsewhere)
  end
  return "ambiguous", format("%d unaccounted runs by this client since the first pending time, %d pending",
    count, #unsettled)
end

-- The journal's unsettled runs of this job's flow (older journals did not
-- name the flow: theirs), or only the ones asked for by id.
function Job:unsettled()
  local list = {}
  for _, entry in pairs(self.state.runs) do
    if (entry.state == "pending" or entry.state == "ambiguous")
      and (entry.flow == nil or entry.flow == self.flow_id)
      and (not self.only or self.only[entry.run]) then
      list[#list + 1] = entry
    end
  end
  return list
end

function Job:settle(candidates_by_id)
  local learned = self.state.learned
  local unsettled, entries = self:unsettled(), {}
  if #unsettled == 0 then return true end
  local accounted, unknown_done = {}, 0
  local function settled(entry, outcome, evidence, new_id, why)
    local first = entry.pendings[1]
    local line = { run = entry.run, flow = self.flow_id, state = outcome, evidence = evidence,
      new_id = new_id, why = why, server_time = first and pending_time(first) or nil }
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
    if not outcome and learned.etag_changes and not self:stopping() then
      outcome, new_id = self:settle_by_if_match(entry)
      evidence = "if-match"
    end
    if outcome then settled(entry, outcome, evidence, new_id) else rest[#rest + 1] = entry end
  end
  if #rest > 0 and not self:stopping() then
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

-- Sending ----------------------------------------------------------------
--
-- A round: take the round's token (which may drive the engine: nothing of
-- this round is in it yet), prepare up to the free slots, write their
-- pending lines with the answers of the last round in one fsync, and only
-- then hand the transfers to the engine.

function Job:pending_line(item, t)
  return { run = item.run.id, flow = self.flow_id, state = "pending", request_id = t:request_id(),
    etag = item.etag, time = wall_ms(), server_time = self:server_now_ms() - CLOCK_MARGIN_MS,
    forced = item.forced }
end

-- Prepared transfers of a round, with their pending lines appended to lines.
-- How many more re-triggers may start now: the concurrency limit, and with
-- max_active the runs of this flow still executing.
function Job:room()
  local room = self.limit - self.in_flight
  if self.spec.max_active then
    room = min(room, self.spec.max_active - self.in_flight - self.executing)
  end
  return room
end

function Job:prepare_round(lines)
  local prepared = {}
  if not (self:room() > 0 and #self.queue > 0 and now() >= self.not_before) then
    return prepared
  end
  local token, err = self.batch:token()
  if token == nil then return nil, err end
  local room = self:room()
  while #prepared < room and #self.queue > 0 do
    local item = remove(self.queue, 1)
    local t = self.batch:prepare(item.run.id, item.etag, token)
    item.token, item.tries = token, (item.tries or 0) + 1
    prepared[#prepared + 1] = { t = t, item = item }
    lines[#lines + 1] = self:pending_line(item, t)
  end
  return prepared
end

-- After the fsync: from here on the engine may send them.
function Job:launch(prepared)
  for _, p in ipairs(prepared) do
    p.item.sent_at = now()
    self.batch:submit(p.t)
    self.flight[p.t] = p.item
    self.in_flight = self.in_flight + 1
  end
end

local function cancel_all(prepared, flight)
  for _, p in ipairs(prepared or {}) do p.t:cancel() end
  for t in pairs(flight) do t:cancel() end
end

-- One re-trigger outside the queue (settling by If-Match), by the same
-- rules: pending line durable, then the request; the answer journaled.
function Job:send_one(item)
  local token, err = self.batch:token()
  if token == nil then return nil, err end
  local t = self.batch:prepare(item.run.id, item.etag, token)
  local ok, werr = self:write { self:pending_line(item, t) }
  if ok and werr then ok, werr = nil, errors.new { kind = "journal", message = werr[item.run.id] } end
  if not ok then t:cancel() return nil, werr end
  local started = now()
  self.batch:submit(t)
  while not t:done() do
    self.batch:step()
    if not t:done() then self.batch:pause(0.25) end
  end
  local run, rerr = self.batch:answer(t, item.run.id, 1, started)
  local line
  if run then
    line = { run = item.run.id, flow = self.flow_id, state = "done", new_id = run.id, etag = run.etag,
      evidence = "if-match" }
  elseif rerr.status == 412 then
    line = { run = item.run.id, flow = self.flow_id, state = "done", evidence = "if-match" }
  else
    local verdict = retry.verdict(rerr, true)
    line = { run = item.run.id, flow = self.flow_id, request_id = rerr.request_id, why = tostring(rerr),
      state = verdict == "ambiguous" and "ambiguous" or "refused" }
  end
  ok, werr = self:write { line }
  if not ok then return nil, werr end
  return run, rerr
end

function Job:requeue(item, delay)
  self.queue[#self.queue + 1] = item
  if delay then self.not_before = max(self.not_before, now() + delay) end
end

-- An entry of the report's list kind, with the source run's errors and
-- start time when the job knows the run.
function Job:add(kind, entry)
  local run = self.by_id and self.by_id[entry.run_id]
  if run then entry.errors, entry.started = source_facts(run) end
  local list = self.report[kind]
  list[#list + 1] = entry
end

function Job:skip(id, why)
  self:add("skipped", { run_id = id, reason = why })
end

-- One finished transfer -> report and journal lines.
function Job:answer(item, t, lines)
  local id = item.run.id
  local run, err = self.batch:answer(t, id, item.tries, item.sent_at)
  self.in_flight = self.in_flight - 1
  if run then
    local request_id = err -- on success, answer's second value
    self:add("retriggered", { run_id = id, new_id = run.id, etag = run.etag, request_id = request_id,
      forced = item.forced or nil })
    lines[#lines + 1] = { run = id, flow = self.flow_id, state = "done", new_id = run.id, etag = run.etag,
      request_id = request_id }
    self.limit = min(self.concurrency, self.limit + 1)
    self.learn_from = self.learn_from or { id, item.etag, run.id }
    self:follow(id, run.id)
    return
  end
  local refused = { run = id, flow = self.flow_id, state = "refused", request_id = err.request_id,
    status = err.status }
  local policy = self.batch:retry_policy()
  item.refreshed = item.refreshed or {}
  local verdict = retry.verdict(err, true, item.token and not item.refreshed[item.token]
    and (item.refreshes or 0) < policy.attempts)
  if verdict == "retry" and err.status == 429 then
    item.throttled = (item.throttled or 0) + 1
    if item.throttled <= MAX_THROTTLED then
      self.limit = max(1, floor(self.limit / 2)) -- slow down, lose nothing
      lines[#lines + 1] = refused
      return self:requeue(item, err.retry_after or retry.backoff(policy, item.throttled))
    end
  elseif verdict == "retry" then -- never sent: safe to repeat
    item.attempts = (item.attempts or 1) + 1
    if item.attempts <= policy.attempts then
      lines[#lines + 1] = refused
      return self:requeue(item, retry.backoff(policy, item.attempts - 1))
    end
  elseif verdict == "refresh" and self.batch:refresh(item.token) then
    -- its token was refused: a new one for the next round, once per token
    item.refreshed[item.token], item.refreshes = true, (item.refreshes or 0) + 1
    lines[#lines + 1] = refused
    return self:requeue(item)
  elseif err.status == 412 and not item.refetched then
    -- the run changed since it was listed: look again and decide afresh
    item.refetched = true
    lines[#lines + 1] = refused
    local fresh = self.client:get_run(id)
    local why = not fresh and "changed since listed, and could not be read again"
      or ineligible(fresh, self.spec) or (not item.forced and children_of(fresh) and #children_of(fresh) > 0
        and "already re-triggered (childFlowRunIds)")
    if why then return self:skip(id, why) end
    item.run, item.etag = fresh, fresh.etag
    return self:requeue(item)
  end
  if err.status == 401 or err.status == 403 or FATAL_CODES[err.code or ""] then
    self.fatal = self.fatal or err
    lines[#lines + 1] = refused
    return
  end
  if verdict == "ambiguous" then
    err.ambiguous = true
    self:add("ambiguous", { run_id = id, why = tostring(err), request_id = err.request_id })
    lines[#lines + 1] = { run = id, flow = self.flow_id, state = "ambiguous", why = tostring(err),
      request_id = err.request_id }
    return
  end
  self:add("failed", { run_id = id, error = err })
  lines[#lines + 1] = { run = id, flow = self.flow_id, state = "failed", request_id = err.request_id,
    status = err.status, code = err.code, why = tostring(err) }
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

-- Following re-triggered runs (wait_runs, max_active) ----------------------
--
-- Each new run is read (GET /runs/{id}, on the engine, beside the
-- re-triggers) from `first` seconds after it was made, the pause doubling
-- up to `max`, until it is no longer in progress. Its outcome is journaled,
-- so a resumed job follows what a dead one left running.

local WAIT_BACKOFF = { 5, 60 }
local WAIT_TIMEOUT = 7200

function Job:following_on()
  return self.spec.wait_runs or self.spec.max_active ~= nil
end

function Job:follow(source_id, new_id)
  if not self:following_on() or self.followed[new_id] then return end
  local first = (self.spec.wait_backoff or WAIT_BACKOFF)[1]
  self.followed[new_id] = { source = source_id, next_at = now() + first, delay = first }
  self.executing = self.executing + 1
end

local FINISHED = { success = "succeeded", failed = "failed", partialsuccess = "failed",
  cancelled = "failed" }

-- A read finished: record the outcome, or read again later.
function Job:observed(new_id, run, lines)
  local f = self.followed[new_id]
  f.reading = nil
  local verdict = run and FINISHED[status_of(run)]
  if not verdict then -- still running, or the read failed: look again later
    f.delay = min(f.delay * 2, (self.spec.wait_backoff or WAIT_BACKOFF)[2])
    f.next_at = now() + f.delay
    return
  end
  f.done = true
  self.executing = self.executing - 1
  local errs = source_facts(run)
  self.report.outcomes[verdict][#self.report.outcomes[verdict] + 1] = { run_id = f.source,
    new_id = new_id, status = status_of(run), errors = verdict == "failed" and errs or nil }
  lines[#lines + 1] = { run = f.source, flow = self.flow_id, followed = new_id, outcome = status_of(run) }
end

-- Start the reads that are due; harvest those that finished.
function Job:follow_step(token, lines)
  local busy = false
  for t, new_id in pairs(self.reads) do
    if t:done() then
      self.reads[t] = nil
      self:observed(new_id, self.batch:read_result(t), lines)
      busy = true
    end
  end
  local at = now()
  for new_id, f in pairs(self.followed) do
    if not f.done and not f.reading and f.next_at <= at and token ~= nil then
      f.reading = true
      self.reads[self.batch:read_run(new_id, token)] = new_id
    end
  end
  return busy
end

function Job:still_following()
  return self.executing > 0 and now() < self.follow_until
end

function Job:run_queue()
  local carry = {} -- answers journaled with the next round's pending lines
  local following = self:following_on()
  while (#self.queue > 0 and not self.fatal and not self.report.stopped) or self.in_flight > 0
    or (following and not self.fatal and not self.report.stopped and self:still_following())
    or next(self.reads) do
    local lines, prepared = carry, nil
    if following and #self.queue == 0 and self.in_flight == 0 and not self.waiting_since then
      self.waiting_since = now() -- every re-trigger sent: the wait for the runs begins
      self.follow_until = now() + (self.spec.wait_timeout or WAIT_TIMEOUT)
    end
    local read_busy = false
    if following then
      -- false: a static token; nil: IMS could not be asked now, read later
      read_busy = self:follow_step(self.batch:token(), lines)
    end
    if not self.fatal and not self:stopping() then
      local err
      prepared, err = self:prepare_round(lines)
      if not prepared then
        self.fatal = err -- IMS refused or unreachable: nothing more can be sent
        prepared = nil
      end
    end
    -- durable before the requests leave: they join the engine only after
    local ok, err = self:write(lines)
    if not ok then
      cancel_all(prepared, self.flight)
      return nil, err
    end
    carry = {}
    if prepared and err then -- claimed by another job meanwhile: not ours to send
      local mine = {}
      for _, p in ipairs(prepared) do
        local why = err[p.item.run.id]
        if why then p.t:cancel() self:skip(p.item.run.id, why) else mine[#mine + 1] = p end
      end
      prepared = mine
    end
    if prepared then self:launch(prepared) end
    self:keep()
    self.batch:step()
    if self:harvest(carry) then
      self:progress()
      if self.learn_from and not self.learned_once then
        self.learned_once = true
        local l = self.learn_from
        local ok2, lerr = self:learn(l[1], l[2], l[3])
        if not ok2 then
          cancel_all(nil, self.flight)
          return nil, lerr
        end
      end
    elseif read_busy then
      self:progress()
    elseif self.in_flight == 0 and not next(self.reads) then
      if (#self.queue > 0 or following) and not self.fatal and not self.report.stopped then
        self:sleep(min(max(self.not_before - now(), 0.001), 0.25))
      end
    else
      self.batch:pause(0.25)
    end
  end
  -- what is still running when the wait ends
  for new_id, f in pairs(self.followed) do
    if not f.done then
      self.report.outcomes.still_running[#self.report.outcomes.still_running + 1] = { run_id = f.source,
        new_id = new_id }
    end
  end
  return self:write(carry)
end

-- One flow: its journal, the operator's decisions, settling, then the
-- queue. candidates: the runs to consider (listed, or read by id).
local function journal_path(spec, flow_id)
  local j = spec.journal
  if type(j) == "function" then j = j(flow_id) end
  return j or nil
end

-- A job's answer: its report, or nil and err carrying the partial report.
local function ended(report, started, err)
  report.elapsed = now() - started
  if err then
    err.report = report
    return nil, err
  end
  return report
end

local function new_report(spec)
  return { considered = 0, retriggered = {}, skipped = {}, failed = {}, ambiguous = {},
    settled = {}, dry_run = spec.dry_run or false, journals = {} }
end

function Job:check_resolutions()
  for run_id, decision in pairs(self.spec.resolve or {}) do
    local entry = self.state.runs[run_id]
    local state = entry and entry.state
    if state ~= "pending" and state ~= "ambiguous" then
      if self.journal then self.journal:close() end
      fail(format("spec field 'resolve': run %s %s; only runs the journal holds as pending or ambiguous"
        .. " can be resolved (to %s)", run_id,
        state and ("is " .. state .. " in the journal") or "is not in the journal", decision), 1)
    end
  end
end

-- Runs of one flow: candidates is a function returning the runs (or nil, err).
local function flow_job(client, batch, spec, flow_id, candidates_of, only)
  local path = journal_path(spec, flow_id)
  local job = setmetatable({
    client = client, batch = batch, spec = spec, flow_id = flow_id, only = only, started = now(),
    concurrency = spec.concurrency or 8, grace = spec.grace or GRACE,
    queue = {}, flight = {}, in_flight = 0, not_before = 0, total = 0,
    followed = {}, reads = {}, executing = 0, follow_until = huge,
    report = new_report(spec),
  }, Job)
  if job:following_on() then job.report.outcomes = { succeeded = {}, failed = {}, still_running = {} } end
  job.report.journal = path
  job.report.journals[1] = path
  job.limit = job.concurrency
  local report = job.report
  local function finish(err)
    if job.journal then job.journal:close() end
    return ended(report, job.started, err)
  end

  local jopts = batch:journal_options()
  jopts.flow, jopts.lease = flow_id, spec.lease
  if path and not spec.dry_run then
    local j, err = journal.open(path, jopts)
    if not j then return nil, errors.new(err) end
    job.journal, job.state = j, j.state
  else
    local state, err = journal.read(path or "/dev/null", jopts)
    if not state then return nil, errors.new(err) end
    job.state = state
  end
  if spec.dry_run then report.planned = {} end

  -- an operator's decisions come first; only for what is unknown
  job:check_resolutions()
  local decisions = {}
  for run_id, decision in pairs(spec.resolve or {}) do
    decisions[#decisions + 1] = { run = run_id, flow = flow_id, state = decision, evidence = "operator" }
    report.settled[#report.settled + 1] = { run_id = run_id, outcome = decision, evidence = "operator" }
  end
  if spec.dry_run then
    for _, d in ipairs(decisions) do job.state.runs[d.run] = { run = d.run, state = d.state, new_ids = {} } end
  else
    local ok, err = job:write(decisions)
    if not ok then return finish(err) end
  end

  local candidates, err = candidates_of(report)
  if not candidates then
    report.aborted = (err.not_found or err.kind == "flow") and err.message
      or "could not list runs: " .. tostring(err)
    return finish(err)
  end
  local by_id, unique = {}, {}
  for _, run in ipairs(candidates) do
    if type(run) == "table" and type(run.id) == "string" and not by_id[run.id] then
      by_id[run.id] = run
      unique[#unique + 1] = run
    end
  end
  report.considered = #unique
  job.by_id = by_id
  report.by_code = {}
  for _, run in ipairs(unique) do
    local code = first_code(run)
    report.by_code[code] = (report.by_code[code] or 0) + 1
  end

  if not spec.dry_run then
    local ok
    ok, err = job:settle(by_id)
    if not ok then return finish(err) end
  end

  for _, run in ipairs(unique) do
    local entry = job.state.runs[run.id]
    local state = entry and entry.state
    -- a run named by id goes to the service, which says why it may not
    local why = not spec.run_ids and ineligible(run, spec) or nil
    local forced = spec.force and not why
    if not why and state == "done" then why = "already re-triggered (journal)" end
    if not why and children_of(run) and #children_of(run) > 0 then
      why = "already re-triggered (childFlowRunIds)"
    end
    if forced and why then why = nil end
    if state == "claimed" then why = entry.why end -- another live job holds it, even when forced
    if not why and spec.exclude_codes then
      local code = matching_code(run, spec.exclude_codes)
      if code then why = "excluded error code " .. code end
    end
    if not why and spec.codes and not matching_code(run, spec.codes) then
      why = "no error code matching " .. concat(spec.codes, ",")
    end
    if not why and not forced and (state == "pending" or state == "ambiguous") then
      job:add("ambiguous", { run_id = run.id, request_id = entry.request_id,
        why = entry.why or "outcome of an earlier job unknown: decide with resolve" })
    elseif why then
      job:skip(run.id, why)
    elseif spec.dry_run then
      job:add("planned", { run_id = run.id })
    else
      job.queue[#job.queue + 1] = { run = run, etag = run.etag, forced = spec.force or nil }
    end
  end
  job.total = #job.queue
  -- runs a dead job re-triggered and left running: followed again
  if job:following_on() and not spec.dry_run then
    for _, entry in pairs(job.state.runs) do
      if entry.state == "done" and (entry.flow == nil or entry.flow == flow_id)
        and (not only or only[entry.run]) then
        for _, new_id in ipairs(entry.new_ids) do
          if not job.state.followed[new_id] then job:follow(entry.run, new_id) end
        end
      end
    end
  end
  -- runs the journal still holds as unknown but that were not listed this time
  for _, entry in ipairs(job:unsettled()) do
    if not by_id[entry.run] then
      report.ambiguous[#report.ambiguous + 1] = { run_id = entry.run, request_id = entry.request_id,
        why = entry.why or "outcome of an earlier job unknown: decide with resolve" }
    end
  end
  if spec.dry_run or (#job.queue == 0 and job.executing == 0) then return finish() end

  local ok
  ok, err = job:run_queue()
  job:progress()
  if report.stopped then report.not_attempted = #job.queue end
  if not ok then return finish(err) end
  if job.fatal then return finish(job.fatal) end
  return finish()
end

-- Several flows' jobs in one report: each flow's part merged in.
local function merge(report, part)
  for _, key in ipairs { "retriggered", "skipped", "failed", "ambiguous", "settled", "journals", "planned" } do
    if part[key] then
      report[key] = report[key] or {}
      for _, v in ipairs(part[key]) do report[key][#report[key] + 1] = v end
    end
  end
  report.considered = report.considered + part.considered
  for code, n in pairs(part.by_code or {}) do
    report.by_code = report.by_code or {}
    report.by_code[code] = (report.by_code[code] or 0) + n
  end
  report.stopped = report.stopped or part.stopped
  if part.outcomes then
    report.outcomes = report.outcomes or { succeeded = {}, failed = {}, still_running = {} }
    for kind, list in pairs(part.outcomes) do
      for _, v in ipairs(list) do report.outcomes[kind][#report.outcomes[kind] + 1] = v end
    end
  end
  if part.not_attempted then report.not_attempted = (report.not_attempted or 0) + part.not_attempted end
end

-- Errors that end a flow's job but not the others' (all_flows goes on).
local FLOW_CODES = { ["FLOW-1388-400"] = true, ["FLOW-1333-400"] = true }

-- One job per flow, in order: groups[flow] = its runs. flows: { {id, name} }.
-- A flow refused as a whole is reported and passed over when each_flow.
local function flows_job(client, batch, spec, report, started, flows, groups, each_flow)
  report.flows = {}
  for i, flow in ipairs(flows) do
    local runs_of = groups[flow.id]
    if report.stopped then
      for j = i, #flows do
        report.not_attempted = (report.not_attempted or 0) + #groups[flows[j].id]
      end
      break
    end
    local summary = { flow_id = flow.id, name = flow.name, considered = #runs_of }
    report.flows[#report.flows + 1] = summary
    local only
    if spec.run_ids then
      only = {}
      for _, run in ipairs(runs_of) do only[run.id] = true end
    end
    local part, err
    if flow.state and flow.state ~= "enabled" then
      part = new_report(spec)
      part.considered = #runs_of
      for _, run in ipairs(runs_of) do
        part.skipped[#part.skipped + 1] = { run_id = run.id, reason = "the flow is " .. flow.state }
      end
      summary.skipped_flow = "the flow is " .. flow.state
    else
      part, err = flow_job(client, batch, spec, flow.id, function() return runs_of end, only)
      if not part then part = err.report end
    end
    if part then
      merge(report, part)
      for _, key in ipairs { "retriggered", "skipped", "failed", "ambiguous" } do
        summary[key] = #(part[key] or {})
      end
      summary.journal = part.journal
    end
    if err then
      summary.error = err
      if not (each_flow and FLOW_CODES[err.code or ""]) then return ended(report, started, err) end
    end
  end
  report.journal = #report.journals == 1 and report.journals[1] or nil
  return ended(report, started)
end

local function fatal_for_all(err)
  return err.status == 401 or err.status == 403 or err.kind == "auth"
    or err.code == "FLOW-2105-400" or err.code == "FLOW-2100-404"
end

-- Runs named by id: read each, then one job per flow, each with its
-- flow's journal, in one report.
local function runs_job(client, batch, spec)
  local report, started = new_report(spec), now()
  local groups, flows, seen = {}, {}, {}
  for _, id in ipairs(spec.run_ids) do
    if not seen[id] then
      seen[id] = true
      local run, err = client:get_run(id)
      if not run then
        if fatal_for_all(err) then return ended(report, started, err) end
        report.considered = report.considered + 1
        report.failed[#report.failed + 1] = { run_id = id, error = err }
      else
        local flow = type(run.flowId) == "string" and run.flowId or "?"
        if not groups[flow] then
          groups[flow] = {}
          flows[#flows + 1] = { id = flow }
        end
        local list = groups[flow]
        list[#list + 1] = run
      end
    end
  end
  return flows_job(client, batch, spec, report, started, flows, groups, false)
end

-- Every flow's failed runs in the window, one listing, then one job per
-- flow (each its own journal); a disabled flow, or one whose source cannot
-- re-trigger, is reported and passed over.
local function all_flows_job(client, batch, spec, since, before, list_candidates)
  local report, started = new_report(spec), now()
  report.window = { since = since, before = before }
  local known, err = client:list_flows {}
  if not known then
    report.aborted = "could not list flows: " .. tostring(err)
    return ended(report, started, err)
  end
  local by_id = {}
  for _, flow in ipairs(known) do
    if type(flow) == "table" and type(flow.id) == "string" then by_id[flow.id] = flow end
  end
  local candidates
  candidates, err = list_candidates(nil)
  if not candidates then
    report.aborted = "could not list runs: " .. tostring(err)
    return ended(report, started, err)
  end
  local groups, flows = {}, {}
  for _, run in ipairs(candidates) do
    if type(run) == "table" and type(run.flowId) == "string" then
      local id = run.flowId
      if not groups[id] then
        local flow = by_id[id] or {}
        groups[id] = {}
        flows[#flows + 1] = { id = id, name = flow.name, state = flow.state }
      end
      local list = groups[id]
      list[#list + 1] = run
    end
  end
  table.sort(flows, function(a, b) return a.id < b.id end)
  return flows_job(client, batch, spec, report, started, flows, groups, true)
end

-- spec.since / spec.before as epoch ms (a string is read by flowservice.window)
local function bound(spec, key)
  local v = spec[key]
  if type(v) ~= "string" then return v end
  local ms, why = window.parse(v)
  if not ms then fail(format("spec field '%s' %s", key, why)) end
  return ms
end

-- client:retry_failed(spec) -> report or nil, err (err.report: the partial report)
-- A claim's lease must outlive a request that starts under it, with room to
-- renew: at least twice the client's timeout + connect_timeout (a test that
-- wants leases to run out says so).
local function check_lease(spec, batch)
  local request_time = batch:journal_options().request_time
  if spec.lease and spec.lease < 2 * request_time and not spec.short_lease_for_tests then
    fail(format("spec field 'lease' (%g s) must be at least twice the client's timeout + connect_timeout"
      .. " (2 x %g s): a claim must outlive a request sent under it", spec.lease, request_time))
  end
end

function _M.run(client, batch, spec)
  check_spec(spec)
  check_lease(spec, batch)
  if spec.run_ids then return runs_job(client, batch, spec) end
  local since, before = bound(spec, "since"), bound(spec, "before")
  -- the candidates of one flow, or (flow_id nil) of every flow
  local function list_candidates(flow_id)
    local candidates, err = client:list_runs { flow_id = flow_id, status = spec.status or "failed",
      since = since, before = before, max = spec.max }
    if not candidates then return nil, err end
    if spec.zero_record_success then
      local more
      more, err = client:list_runs { flow_id = flow_id, status = "success",
        since = since, before = before, max = spec.max }
      if not more then return nil, err end
      for _, run in ipairs(more) do
        if records_of(run) == 0 then candidates[#candidates + 1] = run end
      end
    end
    return candidates
  end
  if spec.all_flows then return all_flows_job(client, batch, spec, since, before, list_candidates) end
  return flow_job(client, batch, spec, spec.flow_id, function(report)
    report.window = { since = since, before = before }
    -- the flow first: one that does not exist, or cannot run, is said so
    local flow, err = client:get_flow(spec.flow_id)
    if not flow then
      if err.status == 404 then
        err.message = "flow " .. spec.flow_id .. " not found"
        err.not_found = true
      end
      return nil, err
    end
    report.flow_name = flow.name
    if flow.state and flow.state ~= "enabled" then
      return nil, errors.new { kind = "flow", code = "FLOW-1388-400", flow_state = flow.state,
        message = format("flow %s is %s: the service re-triggers runs of enabled flows only",
          spec.flow_id, tostring(flow.state)) }
    end
    return list_candidates(spec.flow_id)
  end)
end

return _M
