-- A job's progress on stderr: on a terminal one line redrawn in place with
-- an ETA; elsewhere (cron, CI) one line every interval (10 s by default).
local core = require "flowservice.core"

local floor, huge = math.floor, math.huge
local format = string.format
local os_date = os.date

local _M = {}

-- "42s", "3m05s", "1h02m"
local function duration(s)
  s = floor(s + 0.5)
  if s < 60 then return format("%ds", s) end
  if s < 3600 then return format("%dm%02ds", floor(s / 60), s % 60) end
  return format("%dh%02dm", floor(s / 3600), floor(s % 3600 / 60))
end
_M.duration = duration

local function counts_text(c)
  local text = format("%d/%d done, %d failed, %d ambiguous, %d in flight, %d queued, %.1f/s",
    c.done or 0, c.total or 0, c.failed or 0, c.ambiguous or 0, c.in_flight or 0, c.queued or 0,
    c.rate or 0)
  local left = (c.total or 0) - (c.done or 0)
  if left > 0 and (c.rate or 0) > 0 then text = text .. ", ETA " .. duration(left / c.rate) end
  return text
end

-- On a terminal: one line, at most ten redraws a second.
local function live(stderr, now)
  local drawn, last, counts, shown = false, -huge, nil, nil
  local self = {}
  local function draw(c)
    stderr:write("\r\27[K", counts_text(c))
    drawn, shown = true, c
  end
  function self.update(c)
    counts = c
    local t = now()
    if t - last >= 0.1 then
      last = t
      draw(c)
    end
  end
  -- before another line goes to stderr (--verbose, a note)
  function self.clear()
    if drawn then stderr:write("\r\27[K") end
    drawn, shown = false, nil
  end
  -- the last counts stay on screen
  function self.finish()
    if counts and counts ~= shown then draw(counts) end
    if drawn then stderr:write("\n") end
    drawn = false
  end
  return self
end

-- Off a terminal: a time-stamped line every interval seconds, the first
-- one interval after the start (a short job prints none).
local function periodic(stderr, now, interval)
  local next_at = now() + interval
  local self = {}
  function self.update(c)
    local t = now()
    if t >= next_at then
      next_at = t + interval
      stderr:write(os_date("!%Y-%m-%dT%H:%M:%SZ"), " flowservice: ", counts_text(c), "\n")
    end
  end
  function self.clear() end
  function self.finish() end
  return self
end

-- progress.new(stderr, how, interval) -> { update, clear, finish } or nil;
-- how: "live", "lines" or "never".
function _M.new(stderr, how, interval)
  if how == "live" then return live(stderr, core.now) end
  if how == "lines" then return periodic(stderr, core.now, interval or 10) end
  return nil
end

return _M
