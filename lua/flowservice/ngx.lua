-- How a call waits for the network when the caller gave no `wait` function.
--
-- Inside nginx (OpenResty), in a phase that can yield (rewrite, access,
-- content, timer, ...), by ngx.sleep: the worker goes on serving other
-- requests while libcurl works. In init_by_lua (before the workers exist)
-- and in plain Lua: nil, meaning the C engine blocks in curl_multi_poll.
-- In a phase that cannot yield, a call raises instead of stalling the worker.
--
-- The pump: while a client's engine has transfers in flight, one light
-- thread per engine per worker (an ngx.timer) drives it; each waiting call
-- sleeps on its own ngx.semaphore and is woken when its transfer finishes.
-- The engine lists the watched transfers that finished at each step, so a
-- tick costs the same however many calls wait. The pump stops when nothing
-- is in flight and starts again with the next wait. Where no timer can be
-- started (the worker is exiting) or semaphores are missing, a call polls
-- the engine itself, as every other event loop's wait function does.
local error, pairs, pcall, rawget, require, setmetatable, tostring, type =
  error, pairs, pcall, rawget, require, setmetatable, tostring, type
local running_coroutine = coroutine.running
local format = string.format

local _M = {}

local YIELDABLE = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

-- OpenResty's API, once found: it stays for the life of the process, so
-- later calls skip the lookups (where it is not, each call looks again).
local found, get_phase

local function openresty()
  if found then return found end
  local ngx = rawget(_G, "ngx") -- OpenResty's API, a global there by design
  if type(ngx) == "table" and type(ngx.get_phase) == "function" then
    found, get_phase = ngx, ngx.get_phase
    return ngx
  end
  return nil
end

-- OpenResty's API when a call made now may yield (ngx.sleep, cosockets),
-- else nil.
function _M.yieldable()
  local ngx = found or openresty()
  if ngx and YIELDABLE[get_phase()] then return ngx end
  return nil
end

-- The default wait function for a call made now, or nil to block in C.
-- level: where an error should point, as in error().
function _M.default_wait(level)
  local ngx = openresty()
  if not ngx then return nil end
  local phase = ngx.get_phase()
  if phase == "init" then return nil end
  if YIELDABLE[phase] then return ngx.sleep end
  error(format("flowservice: cannot wait for the network in nginx's %s phase, which cannot yield;"
    .. " call from a content, access, rewrite or timer handler (ngx.timer.at)", phase), (level or 1) + 1)
end

-- The pump drives the engine this often while anything is in flight (libcurl's
-- sockets are not nginx's: the tick is what an answer may wait, at most).
local TICK = 0.001
-- A waiting call looks at its transfer at least this often, whatever the pump
-- does: a safety net, not the way it is woken.
local SAFETY = 1

local semaphore_new -- ngx.semaphore.new, once loaded; false without it

local function semaphores(ngx)
  if semaphore_new == nil then
    local ok, sema = pcall(require, "ngx.semaphore")
    semaphore_new = ok and type(sema) == "table" and sema.new or false
    if semaphore_new and ngx.worker == nil then semaphore_new = false end
  end
  return semaphore_new
end

-- Post s unless a post is already pending: a wake-up means "look again".
local function wake(s)
  if s:count() < 1 then s:post(1) end
end

local Pump = {}
Pump.__index = Pump

local pumps = setmetatable({}, { __mode = "k" }) -- engine handle -> pump (holds no handle)

local function new_pump(ngx)
  return setmetatable({
    pid = ngx.worker.pid(),
    running = false,
    failed = nil, -- why the engine could not be driven: callers then poll (and see it)
    transfer_of = setmetatable({}, { __mode = "v" }), -- key -> watched transfer
    sema_of = setmetatable({}, { __mode = "k" }),     -- watched transfer -> semaphore
    finished = {},
    ticks = 0,  -- steps taken, and
    starts = 0, -- times the pump started, and
    late = 0,   -- calls found done by the safety net: for tests and the benchmark
  }, Pump)
end

function Pump:wake_all()
  for _, s in pairs(self.sema_of) do wake(s) end
end

-- Step until nothing is in flight; raises when the engine cannot be driven.
local function pump_loop(self, handle)
  local ngx = rawget(_G, "ngx")
  local sleep, finished, transfer_of, sema_of = ngx.sleep, self.finished, self.transfer_of,
    self.sema_of
  while true do
    local running, n, lost = handle:step(finished)
    self.ticks = self.ticks + 1
    for i = 1, n do
      local key = finished[i]
      finished[i] = nil
      local t = transfer_of[key]
      -- a key whose transfer is not done is stale (a freed one's address)
      if t and t:done() then
        transfer_of[key] = nil
        local s = sema_of[t]
        if s then
          sema_of[t] = nil
          wake(s)
        end
      end
    end
    if lost then self:wake_all() end
    if running == 0 then return end
    sleep(TICK)
  end
end

-- The pump's light thread: a timer, so that no request's lifetime holds it.
-- A premature start (the worker exiting) still drives: calls are waiting.
-- When the engine cannot be driven (the client was closed: its transfers
-- ended aborted; or libcurl failed), every waiter looks and then polls.
local function pump_run(_, self, handle)
  local ok, err = pcall(pump_loop, self, handle)
  self.running = false
  if not ok then
    self.failed = tostring(err)
    self:wake_all()
  end
end

-- Make sure the pump runs for handle; false when it cannot (poll instead).
function Pump:ensure(handle)
  if self.failed then return false end
  if self.running then return true end
  local ngx = rawget(_G, "ngx")
  local ok = ngx.timer.at(0, pump_run, self, handle)
  if not ok then return false end -- "process exiting", or too many timers
  self.running, self.starts = true, self.starts + 1
  return true
end

-- Wake s when t finishes (t already submitted, or about to be).
function Pump:watch(t, s)
  local key = t:watch()
  self.transfer_of[key] = t
  self.sema_of[t] = s
  return key
end

function Pump:unwatch(t, key)
  self.transfer_of[key] = nil
  self.sema_of[t] = nil
end

-- One semaphore per waiting coroutine (a coroutine waits for one call at a time).
local sema_of_coroutine = setmetatable({}, { __mode = "k" })

-- Wait until the submitted transfer t is done: true, or false when the
-- caller must poll the engine itself (no pump could be started).
function Pump:await(handle, t)
  if t:done() then return true end
  local co = running_coroutine()
  local s = sema_of_coroutine[co]
  if not s then
    s = semaphore_new()
    sema_of_coroutine[co] = s
  end
  local key = self:watch(t, s)
  -- one step now sends t at once rather than at the pump's next tick (what it
  -- finishes of others is listed for the pump to wake)
  if not self.failed and pcall(handle.step, handle) and t:done() then
    self:unwatch(t, key)
    return true
  end
  while not t:done() do
    if not self:ensure(handle) then
      self:unwatch(t, key)
      return false
    end
    local ok, err = s:wait(SAFETY)
    if not ok then
      if err ~= "timeout" then
        self:unwatch(t, key)
        return false
      end
      if t:done() then self.late = self.late + 1 end -- the pump never woke it
    end
  end
  self:unwatch(t, key)
  return true
end

-- The semaphore a batch (the bulk job) waits on: any of its transfers woke it.
function Pump:semaphore()
  return semaphore_new()
end

-- The pump for handle's engine in this worker when waiter is nginx's own
-- (ngx.sleep), or nil: other waiters poll.
function _M.pump(handle, waiter)
  local ngx = openresty()
  if not ngx or waiter ~= ngx.sleep or not semaphores(ngx) then return nil end
  local pump = pumps[handle]
  if pump == nil or pump.pid ~= ngx.worker.pid() then
    pump = new_pump(ngx)
    pumps[handle] = pump
  end
  return pump
end

-- Wait functions that also take the engine's fd: wait(seconds, fd) returns
-- once fd is readable or seconds passed (flowservice.cqueues registers its own).
local fd_waiters = setmetatable({}, { __mode = "k" })

function _M.watches_fd(wait)
  fd_waiters[wait] = true
  return wait
end

function _M.fd_aware(wait)
  return fd_waiters[wait] == true
end

-- True once nginx wants this worker to exit (a timer's job stops early).
function _M.exiting()
  local ngx = openresty()
  return ngx ~= nil and ngx.worker ~= nil and ngx.worker.exiting() == true
end

return _M
