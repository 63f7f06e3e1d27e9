-- The answers of a round's re-triggers: each finished transfer to the
-- report and to journal lines; what may be repeated (a 429, a request
-- never sent, a refused token once per token, a run changed since it was
-- listed) back to the queue, by flowservice.retry's rules.
local policy = require "flowservice.policy"
local retry = require "flowservice.retry"
local follow = require "flowservice.bulk.follow"

local floor, max, min = math.floor, math.max, math.min
local pairs, tostring = pairs, tostring
local children_of, ineligible = policy.children_of, policy.ineligible

local _M = {}

-- Errors that every run would get too: stop at once instead of failing all.
local FATAL_CODES = {
  ["FLOW-1388-400"] = "the flow is not enabled",
  ["FLOW-2105-400"] = "the sandbox header is missing",
  ["FLOW-2100-404"] = "the sandbox is unknown",
  ["FLOW-1333-400"] = "re-trigger is not supported for this source",
}

local MAX_THROTTLED = 20 -- 429s one run may take before it counts as failed

-- One finished transfer -> report and journal lines.
local function answer(job, item, t, lines)
  local id = item.run.id
  local run, err = job.batch:answer(t, id, item.tries, item.sent_at)
  job.in_flight = job.in_flight - 1
  if run then
    local request_id = err -- on success, answer's second value
    job:add("retriggered", { run_id = id, new_id = run.id, etag = run.etag, request_id = request_id,
      forced = item.forced or nil })
    lines[#lines + 1] = { run = id, flow = job.flow_id, state = "done", new_id = run.id, etag = run.etag,
      request_id = request_id }
    job.limit = min(job.concurrency, job.limit + 1)
    job.learn_from = job.learn_from or { id, item.etag, run.id }
    follow.follow(job, id, run.id)
    return
  end
  local refused = { run = id, flow = job.flow_id, state = "refused", request_id = err.request_id,
    status = err.status }
  local rules = job.batch:retry_policy()
  item.refreshed = item.refreshed or {}
  local verdict = retry.verdict(err, true, item.token and not item.refreshed[item.token]
    and (item.refreshes or 0) < rules.attempts)
  if verdict == "retry" and err.status == 429 then
    item.throttled = (item.throttled or 0) + 1
    if item.throttled <= MAX_THROTTLED then
      job.limit = max(1, floor(job.limit / 2)) -- slow down, lose nothing
      lines[#lines + 1] = refused
      return job:requeue(item, err.retry_after or retry.backoff(rules, item.throttled))
    end
  elseif verdict == "retry" then -- never sent: safe to repeat
    item.attempts = (item.attempts or 1) + 1
    if item.attempts <= rules.attempts then
      lines[#lines + 1] = refused
      return job:requeue(item, retry.backoff(rules, item.attempts - 1))
    end
  elseif verdict == "refresh" and job.batch:refresh(item.token) then
    -- its token was refused: a new one for the next round, once per token
    item.refreshed[item.token], item.refreshes = true, (item.refreshes or 0) + 1
    lines[#lines + 1] = refused
    return job:requeue(item)
  elseif err.status == 412 and not item.refetched then
    -- the run changed since it was listed: look again and decide afresh
    item.refetched = true
    lines[#lines + 1] = refused
    local fresh = job.client:get_run(id)
    local why = not fresh and "changed since listed, and could not be read again"
      or ineligible(fresh, job.spec) or (not item.forced and children_of(fresh) and #children_of(fresh) > 0
        and "already re-triggered (childFlowRunIds)")
    if why then return job:skip(id, why) end
    item.run, item.etag = fresh, fresh.etag
    return job:requeue(item)
  end
  if err.status == 401 or err.status == 403 or FATAL_CODES[err.code or ""] then
    job.fatal = job.fatal or err
    lines[#lines + 1] = refused
    return
  end
  if verdict == "ambiguous" then
    err.ambiguous = true
    job:add("ambiguous", { run_id = id, why = tostring(err), request_id = err.request_id })
    lines[#lines + 1] = { run = id, flow = job.flow_id, state = "ambiguous", why = tostring(err),
      request_id = err.request_id }
    return
  end
  job:add("failed", { run_id = id, error = err })
  lines[#lines + 1] = { run = id, flow = job.flow_id, state = "failed", request_id = err.request_id,
    status = err.status, code = err.code, why = tostring(err) }
end

-- The finished transfers of the flight answered; true when there was one.
function _M.harvest(job, lines)
  local finished = false
  for t, item in pairs(job.flight) do
    if t:done() then
      job.flight[t] = nil
      answer(job, item, t, lines)
      finished = true
    end
  end
  return finished
end

return _M
