-- Jobs over several flows in one report: runs named by id (read each,
-- grouped by flow) and every flow's failed runs (all_flows), one job a
-- flow (flowservice.bulk.flow), each with its flow's journal.
local core = require "flowservice.core"
local one_flow = require "flowservice.bulk.flow"
local report_of = require "flowservice.bulk.report"

local now = core.now
local ipairs, tostring, type = ipairs, tostring, type
local new_report, ended, merge = report_of.new, report_of.ended, report_of.merge

local _M = {}

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
      part, err = one_flow.job(client, batch, spec, flow.id, function() return runs_of end, only)
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
function _M.runs_job(client, batch, spec)
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
function _M.all_flows_job(client, batch, spec, since, before, list_candidates)
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

return _M
