-- Following re-triggered runs (wait_runs, max_active).
--
-- Each new run is read (GET /runs/{id}, on the engine, beside the
-- re-triggers) from `first` seconds after it was made, the pause doubling
-- up to `max`, until it is no longer in progress. Its outcome is journaled,
-- so a resumed job follows what a dead one left running.
local core = require "flowservice.core"
local policy = require "flowservice.policy"

local now = core.now
local min = math.min
local pairs = pairs
local status_of, source_facts = policy.status_of, policy.source_facts

local _M = {}

local WAIT_BACKOFF = { 5, 60 }
local WAIT_TIMEOUT = 7200

-- Whether the job follows the runs it makes (spec.wait_runs or spec.max_active).
function _M.on(spec)
  return spec.wait_runs or spec.max_active ~= nil
end

-- Follow new_id, made from source_id.
function _M.follow(job, source_id, new_id)
  if not _M.on(job.spec) or job.followed[new_id] then return end
  local first = (job.spec.wait_backoff or WAIT_BACKOFF)[1]
  job.followed[new_id] = { source = source_id, next_at = now() + first, delay = first }
  job.executing = job.executing + 1
end

local FINISHED = { success = "succeeded", failed = "failed", partialsuccess = "failed",
  cancelled = "failed" }

-- A read finished: record the outcome, or read again later.
local function observed(job, new_id, run, lines)
  local f = job.followed[new_id]
  f.reading = nil
  local verdict = run and FINISHED[status_of(run)]
  if not verdict then -- still running, or the read failed: look again later
    f.delay = min(f.delay * 2, (job.spec.wait_backoff or WAIT_BACKOFF)[2])
    f.next_at = now() + f.delay
    return
  end
  f.done = true
  job.executing = job.executing - 1
  local errs = source_facts(run)
  job.report.outcomes[verdict][#job.report.outcomes[verdict] + 1] = { run_id = f.source,
    new_id = new_id, status = status_of(run), errors = verdict == "failed" and errs or nil }
  lines[#lines + 1] = { run = f.source, flow = job.flow_id, followed = new_id, outcome = status_of(run) }
end

-- Start the reads that are due; harvest those that finished.
function _M.step(job, token, lines)
  local busy = false
  for t, new_id in pairs(job.reads) do
    if t:done() then
      job.reads[t] = nil
      observed(job, new_id, job.batch:read_result(t), lines)
      busy = true
    end
  end
  local at = now()
  for new_id, f in pairs(job.followed) do
    if not f.done and not f.reading and f.next_at <= at and token ~= nil then
      f.reading = true
      job.reads[job.batch:read_run(new_id, token)] = new_id
    end
  end
  return busy
end

function _M.still_following(job)
  return job.executing > 0 and now() < job.follow_until
end

-- Every re-trigger sent: the wait for the runs begins (once).
function _M.start_wait(job)
  if not job.waiting_since then
    job.waiting_since = now()
    job.follow_until = now() + (job.spec.wait_timeout or WAIT_TIMEOUT)
  end
end

-- What is still running when the wait ends, into the report.
function _M.finish(job)
  for new_id, f in pairs(job.followed) do
    if not f.done then
      job.report.outcomes.still_running[#job.report.outcomes.still_running + 1] = { run_id = f.source,
        new_id = new_id }
    end
  end
end

return _M
