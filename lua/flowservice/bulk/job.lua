-- One flow's job: the state its steps share, and what every step uses:
-- the clocks, stopping, sleeping, the journal (durable writes, renewed
-- claims, claims another job took over), the report's lists, the queue.
--
-- The other steps are functions of a job, each in the module of its
-- concern: flowservice.bulk.rounds (sending), .answer (answers),
-- .settle (settling), .learn, .follow (following re-runs).
local core = require "flowservice.core"
local errors = require "flowservice.errors"
local policy = require "flowservice.policy"
local report_of = require "flowservice.bulk.report"

local now = core.now
local floor, huge, max, min = math.floor, math.huge, math.max, math.min
local ipairs, pairs, setmetatable, type = ipairs, pairs, setmetatable, type
local os_time, sort = os.time, table.sort
local source_facts = policy.source_facts

local _M = {}

local GRACE = 30
_M.CLOCK_MARGIN_MS = 2000 -- the Date header has whole seconds; lean early

local function wall_ms() return os_time() * 1000 end
_M.wall_ms = wall_ms

-- The job: state shared by its steps.
local Job = {}
Job.__index = Job

-- A job for the runs of flow_id (only: the run ids asked for, or nil).
function _M.new(client, batch, spec, flow_id, only)
  local job = setmetatable({
    client = client, batch = batch, spec = spec, flow_id = flow_id, only = only, started = now(),
    concurrency = spec.concurrency or 8, grace = spec.grace or GRACE,
    queue = {}, flight = {}, in_flight = 0, not_before = 0, total = 0,
    followed = {}, reads = {}, executing = 0, follow_until = huge,
    report = report_of.new(spec),
  }, Job)
  job.limit = job.concurrency
  return job
end

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


return _M
