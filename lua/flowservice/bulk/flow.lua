-- One flow's job: its journal, the operator's decisions, settling, which
-- candidates go to the queue (and why the others are skipped), then the
-- queue (flowservice.bulk.rounds).
local errors = require "flowservice.errors"
local journal = require "flowservice.journal"
local policy = require "flowservice.policy"
local bulk_job = require "flowservice.bulk.job"
local bulk_spec = require "flowservice.bulk.spec"
local follow = require "flowservice.bulk.follow"
local report_of = require "flowservice.bulk.report"
local rounds = require "flowservice.bulk.rounds"
local settle = require "flowservice.bulk.settle"

local format, concat = string.format, table.concat
local ipairs, pairs, tostring, type = ipairs, pairs, tostring, type
local children_of, matching_code, first_code = policy.children_of, policy.matching_code, policy.first_code
local ineligible = policy.ineligible
local fail, ended = bulk_spec.fail, report_of.ended

local _M = {}

-- The journal of flow_id: spec.journal, or what the function there names.
local function journal_path(spec, flow_id)
  local j = spec.journal
  if type(j) == "function" then j = j(flow_id) end
  return j or nil
end

-- The operator's decisions (spec.resolve) only for runs the journal holds as unknown.
local function check_resolutions(job)
  for run_id, decision in pairs(job.spec.resolve or {}) do
    local entry = job.state.runs[run_id]
    local state = entry and entry.state
    if state ~= "pending" and state ~= "ambiguous" then
      if job.journal then job.journal:close() end
      fail(format("spec field 'resolve': run %s %s; only runs the journal holds as pending or ambiguous"
        .. " can be resolved (to %s)", run_id,
        state and ("is " .. state .. " in the journal") or "is not in the journal", decision), 1)
    end
  end
end

-- One flow: its journal, the operator's decisions, settling, then the
-- queue. candidates_of(report): the runs to consider (listed, or read by
-- id), or nil, err.
function _M.job(client, batch, spec, flow_id, candidates_of, only)
  local path = journal_path(spec, flow_id)
  local job = bulk_job.new(client, batch, spec, flow_id, only)
  if follow.on(spec) then job.report.outcomes = { succeeded = {}, failed = {}, still_running = {} } end
  job.report.journal = path
  job.report.journals[1] = path
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
  check_resolutions(job)
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
    ok, err = settle.settle(job, by_id)
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
  if follow.on(spec) and not spec.dry_run then
    for _, entry in pairs(job.state.runs) do
      if entry.state == "done" and (entry.flow == nil or entry.flow == flow_id)
        and (not only or only[entry.run]) then
        for _, new_id in ipairs(entry.new_ids) do
          if not job.state.followed[new_id] then follow.follow(job, entry.run, new_id) end
        end
      end
    end
  end
  -- runs the journal still holds as unknown but that were not listed this time
  for _, entry in ipairs(settle.unsettled(job)) do
    if not by_id[entry.run] then
      report.ambiguous[#report.ambiguous + 1] = { run_id = entry.run, request_id = entry.request_id,
        why = entry.why or "outcome of an earlier job unknown: decide with resolve" }
    end
  end
  if spec.dry_run or (#job.queue == 0 and job.executing == 0) then return finish() end

  local ok
  ok, err = rounds.run_queue(job)
  job:progress()
  if report.stopped then report.not_attempted = #job.queue end
  if not ok then return finish(err) end
  if job.fatal then return finish(job.fatal) end
  return finish()
end

return _M
