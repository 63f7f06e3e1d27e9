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
-- there is (flowservice.bulk.settle); what stays unknown is reported as ambiguous
-- until an operator resolves it.
--
-- The client is reached through its public methods and one internal door,
-- the batch (flowservice.client): prepare, submit, step, answer. What may be
-- repeated is flowservice.retry's to say.
--
-- This module is the entry point; the job is split by concern under
-- flowservice.bulk: spec (the spec check), flow (one flow's job), job (its
-- shared state), rounds and answer (sending), settle and learn (settling
-- by evidence), follow (wait_runs, max_active), flows (run_ids, all_flows),
-- report (reports, merged).
local errors = require "flowservice.errors"
local policy = require "flowservice.policy"
local bulk_spec = require "flowservice.bulk.spec"
local flow = require "flowservice.bulk.flow"
local flows = require "flowservice.bulk.flows"

local format = string.format
local ipairs, tostring = ipairs, tostring
local records_of = policy.records_of
local bound = bulk_spec.bound

local _M = {}

-- client:retry_failed(spec) -> report or nil, err (err.report: the partial report)
function _M.run(client, batch, spec)
  bulk_spec.check(spec)
  bulk_spec.check_lease(spec, batch)
  -- no tail calls below: the argument errors raised there count these frames
  if spec.run_ids then
    local report, err = flows.runs_job(client, batch, spec)
    return report, err
  end
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
  if spec.all_flows then
    local report, err = flows.all_flows_job(client, batch, spec, since, before, list_candidates)
    return report, err
  end
  local job_report, job_err = flow.job(client, batch, spec, spec.flow_id, function(report)
    report.window = { since = since, before = before }
    -- the flow first: one that does not exist, or cannot run, is said so
    local found, err = client:get_flow(spec.flow_id)
    if not found then
      if err.status == 404 then
        err.message = "flow " .. spec.flow_id .. " not found"
        err.not_found = true
      end
      return nil, err
    end
    report.flow_name = found.name
    if found.state and found.state ~= "enabled" then
      return nil, errors.new { kind = "flow", code = "FLOW-1388-400", flow_state = found.state,
        message = format("flow %s is %s: the service re-triggers runs of enabled flows only",
          spec.flow_id, tostring(found.state)) }
    end
    return list_candidates(spec.flow_id)
  end)
  return job_report, job_err
end

return _M
