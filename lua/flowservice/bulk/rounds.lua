-- Sending: the rounds of one flow's job, and one re-trigger outside them.
--
-- A round: take the round's token (which may drive the engine: nothing of
-- this round is in it yet), prepare up to the free slots, write their
-- pending lines with the answers of the last round in one fsync, and only
-- then hand the transfers to the engine.
local core = require "flowservice.core"
local errors = require "flowservice.errors"
local retry = require "flowservice.retry"
local bulk_job = require "flowservice.bulk.job"
local answer = require "flowservice.bulk.answer"
local follow = require "flowservice.bulk.follow"
local learn = require "flowservice.bulk.learn"

local now = core.now
local max, min = math.max, math.min
local ipairs, next, pairs, tostring = ipairs, next, pairs, tostring
local remove = table.remove
local wall_ms, CLOCK_MARGIN_MS = bulk_job.wall_ms, bulk_job.CLOCK_MARGIN_MS

local _M = {}

local function pending_line(job, item, t)
  return { run = item.run.id, flow = job.flow_id, state = "pending", request_id = t:request_id(),
    etag = item.etag, time = wall_ms(), server_time = job:server_now_ms() - CLOCK_MARGIN_MS,
    forced = item.forced }
end

-- How many more re-triggers may start now: the concurrency limit, and with
-- max_active the runs of this flow still executing.
local function free_slots(job)
  local room = job.limit - job.in_flight
  if job.spec.max_active then
    room = min(room, job.spec.max_active - job.in_flight - job.executing)
  end
  return room
end

-- Prepared transfers of a round, with their pending lines appended to lines.
local function prepare_round(job, lines)
  local prepared = {}
  if not (free_slots(job) > 0 and #job.queue > 0 and now() >= job.not_before) then
    return prepared
  end
  local token, err = job.batch:token()
  if token == nil then return nil, err end
  local room = free_slots(job)
  while #prepared < room and #job.queue > 0 do
    local item = remove(job.queue, 1)
    local t = job.batch:prepare(item.run.id, item.etag, token)
    item.token, item.tries = token, (item.tries or 0) + 1
    prepared[#prepared + 1] = { t = t, item = item }
    lines[#lines + 1] = pending_line(job, item, t)
  end
  return prepared
end

-- After the fsync: from here on the engine may send them.
local function launch(job, prepared)
  for _, p in ipairs(prepared) do
    p.item.sent_at = now()
    job.batch:submit(p.t)
    job.flight[p.t] = p.item
    job.in_flight = job.in_flight + 1
  end
end

local function cancel_all(prepared, flight)
  for _, p in ipairs(prepared or {}) do p.t:cancel() end
  for t in pairs(flight) do t:cancel() end
end

-- One re-trigger outside the queue (settling by If-Match), by the same
-- rules: pending line durable, then the request; the answer journaled.
function _M.send_one(job, item)
  local token, err = job.batch:token()
  if token == nil then return nil, err end
  local t = job.batch:prepare(item.run.id, item.etag, token)
  local ok, werr = job:write { pending_line(job, item, t) }
  if ok and werr then ok, werr = nil, errors.new { kind = "journal", message = werr[item.run.id] } end
  if not ok then t:cancel() return nil, werr end
  local started = now()
  job.batch:submit(t)
  while not t:done() do
    job.batch:step()
    if not t:done() then job.batch:pause(0.25) end
  end
  local run, rerr = job.batch:answer(t, item.run.id, 1, started)
  local line
  if run then
    line = { run = item.run.id, flow = job.flow_id, state = "done", new_id = run.id, etag = run.etag,
      evidence = "if-match" }
  elseif rerr.status == 412 then
    line = { run = item.run.id, flow = job.flow_id, state = "done", evidence = "if-match" }
  else
    local verdict = retry.verdict(rerr, true)
    line = { run = item.run.id, flow = job.flow_id, request_id = rerr.request_id, why = tostring(rerr),
      state = verdict == "ambiguous" and "ambiguous" or "refused" }
  end
  ok, werr = job:write { line }
  if not ok then return nil, werr end
  return run, rerr
end

-- The queue sent, round by round, and (wait_runs, max_active) the new runs
-- followed; the last answers journaled.
function _M.run_queue(job)
  local carry = {} -- answers journaled with the next round's pending lines
  local following = follow.on(job.spec)
  while (#job.queue > 0 and not job.fatal and not job.report.stopped) or job.in_flight > 0
    or (following and not job.fatal and not job.report.stopped and follow.still_following(job))
    or next(job.reads) do
    local lines, prepared = carry, nil
    if following and #job.queue == 0 and job.in_flight == 0 then
      follow.start_wait(job) -- every re-trigger sent: the wait for the runs begins
    end
    local read_busy = false
    if following then
      -- false: a static token; nil: IMS could not be asked now, read later
      read_busy = follow.step(job, job.batch:token(), lines)
    end
    if not job.fatal and not job:stopping() then
      local err
      prepared, err = prepare_round(job, lines)
      if not prepared then
        job.fatal = err -- IMS refused or unreachable: nothing more can be sent
        prepared = nil
      end
    end
    -- durable before the requests leave: they join the engine only after
    local ok, err = job:write(lines)
    if not ok then
      cancel_all(prepared, job.flight)
      return nil, err
    end
    carry = {}
    if prepared and err then -- claimed by another job meanwhile: not ours to send
      local mine = {}
      for _, p in ipairs(prepared) do
        local why = err[p.item.run.id]
        if why then p.t:cancel() job:skip(p.item.run.id, why) else mine[#mine + 1] = p end
      end
      prepared = mine
    end
    if prepared then launch(job, prepared) end
    job:keep()
    job.batch:step()
    if answer.harvest(job, carry) then
      job:progress()
      if job.learn_from and not job.learned_once then
        job.learned_once = true
        local l = job.learn_from
        local ok2, lerr = learn.learn(job, l[1], l[2], l[3])
        if not ok2 then
          cancel_all(nil, job.flight)
          return nil, lerr
        end
      end
    elseif read_busy then
      job:progress()
    elseif job.in_flight == 0 and not next(job.reads) then
      if (#job.queue > 0 or following) and not job.fatal and not job.report.stopped then
        job:sleep(min(max(job.not_before - now(), 0.001), 0.25))
      end
    else
      job.batch:pause(0.25)
    end
  end
  -- what is still running when the wait ends
  if following then follow.finish(job) end
  return job:write(carry)
end

return _M
