-- Settling what a dead job left pending or ambiguous, with the strongest
-- evidence there is: the server's linkage of runs to their children, an
-- If-Match repeat where the server changes a run's etag when it re-triggers
-- it, or counting this client's runs since the first pending time. What
-- stays unknown is ambiguous until an operator resolves it.
local errors = require "flowservice.errors"
local policy = require "flowservice.policy"
local bulk_job = require "flowservice.bulk.job"
local rounds = require "flowservice.bulk.rounds"

local huge, max, min = math.huge, math.max, math.min
local format = string.format
local ipairs, pairs, tostring = ipairs, pairs, tostring
local children_of = policy.children_of
local CLOCK_MARGIN_MS = bulk_job.CLOCK_MARGIN_MS

local _M = {}

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
local function settle_by_if_match(job, entry)
  local etag = entry.pendings[1] and entry.pendings[1].etag
  if type(etag) ~= "string" then return nil end
  local item = { run = { id = entry.run }, etag = etag }
  local run, err = rounds.send_one(job, item)
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
local function settle_by_count(job, unsettled, accounted, unknown_done)
  local oldest, newest = huge, 0
  for _, entry in ipairs(unsettled) do
    for _, pnd in ipairs(entry.pendings) do
      oldest, newest = min(oldest, pending_time(pnd)), max(newest, pending_time(pnd))
    end
  end
  -- the dead process's last requests may still be landing
  local wait = (newest + job.grace * 1000 - job:server_now_ms()) / 1000
  if wait > 0 then
    if job.spec.on_wait then job.spec.on_wait(wait, #unsettled) end -- say what it waits for
    job:sleep(wait)
  end
  if job.report.stopped then return nil, "stopped before counting" end
  if job.journal then -- what other jobs sharing the journal wrote meanwhile counts too
    local ok, err = job.journal:reload()
    if not ok then return nil, tostring(errors.new(err)) end
    job.state = job.journal.state
  end
  for _, entry in pairs(job.state.runs) do
    for _, id in ipairs(entry.new_ids) do accounted[id] = true end
    if entry.state == "done" and not entry.new_id and (entry.server_time or huge) >= oldest - CLOCK_MARGIN_MS then
      unknown_done = unknown_done + 1
    end
  end
  local made, err = job.client:list_runs { flow_id = job.flow_id,
    filters = { format("createdAt>=%.0f", oldest - CLOCK_MARGIN_MS),
      "createdClient==" .. job.batch:client_id() } }
  if not made then return nil, tostring(err) end
  local count = 0
  for _, run in ipairs(made) do
    if not accounted[run.id] then count = count + 1 end
  end
  if count == 0 then return "retry" end
  local elsewhere = job.journal and job.journal:in_flight_elsewhere() or 0
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
function _M.unsettled(job)
  local list = {}
  for _, entry in pairs(job.state.runs) do
    if (entry.state == "pending" or entry.state == "ambiguous")
      and (entry.flow == nil or entry.flow == job.flow_id)
      and (not job.only or job.only[entry.run]) then
      list[#list + 1] = entry
    end
  end
  return list
end

function _M.settle(job, candidates_by_id)
  local learned = job.state.learned
  local unsettled, entries = _M.unsettled(job), {}
  if #unsettled == 0 then return true end
  local accounted, unknown_done = {}, 0
  local function settled(entry, outcome, evidence, new_id, why)
    local first = entry.pendings[1]
    local line = { run = entry.run, flow = job.flow_id, state = outcome, evidence = evidence,
      new_id = new_id, why = why, server_time = first and pending_time(first) or nil }
    if new_id then accounted[new_id] = true end
    if outcome == "done" and not new_id then unknown_done = unknown_done + 1 end
    entries[#entries + 1] = line
    job.report.settled[#job.report.settled + 1] = { run_id = entry.run, outcome = outcome,
      evidence = evidence, new_id = new_id }
  end
  local rest = {}
  for _, entry in ipairs(unsettled) do
    local outcome, new_id, evidence
    if learned.linkage then
      local run = candidates_by_id[entry.run] or job.client:get_run(entry.run)
      if run then outcome, new_id = settle_by_linkage(entry, run) evidence = "linkage" end
      if outcome == "retry" then outcome = nil end -- only once grace has passed: see below
    end
    if not outcome and learned.etag_changes and not job:stopping() then
      outcome, new_id = settle_by_if_match(job, entry)
      evidence = "if-match"
    end
    if outcome then settled(entry, outcome, evidence, new_id) else rest[#rest + 1] = entry end
  end
  if #rest > 0 and not job:stopping() then
    local outcome, why = settle_by_count(job, rest, accounted, unknown_done)
    if not outcome then why = "could not count: " .. tostring(why) end
    for _, entry in ipairs(rest) do settled(entry, outcome or "ambiguous", "count", nil, why) end
  end
  return job:write(entries)
end


return _M
