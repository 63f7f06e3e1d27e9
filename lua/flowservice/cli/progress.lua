-- Live progress of a job on stderr: on a terminal one line redrawn in place.
local core = require "flowservice.core"

local format = string.format
local huge = math.huge

local _M = {}

function _M.line(stderr)
  local drawn, last, counts, shown = false, -huge, nil, nil
  local self = {}
  local function draw(c)
    stderr:write(format("\r\27[K%d/%d done, %d failed, %d ambiguous, %d in flight, %d queued, %.1f/s",
      c.done or 0, c.total or 0, c.failed or 0, c.ambiguous or 0, c.in_flight or 0, c.queued or 0,
      c.rate or 0))
    drawn, shown = true, c
  end
  -- at most ten redraws a second
  function self.update(c)
    counts = c
    local t = core.now()
    if t - last >= 0.1 then
      last = t
      draw(c)
    end
  end
  -- before another line goes to stderr (--verbose)
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

return _M
