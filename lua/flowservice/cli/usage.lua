-- Usage errors of the command: raised anywhere before the first request
-- (a bad flag, a missing setting), caught by cli.main: one line on stderr,
-- exit 2, nothing sent. And the nearest of some names, for suggestions.
local error, getmetatable, ipairs, pcall, select, setmetatable = error, getmetatable, ipairs, pcall,
  select, setmetatable
local format = string.format
local min = math.min

local _M = {}

local Usage = {}

-- usage.fail(fmt, ...): raise a usage error (never returns)
function _M.fail(fmt, ...)
  error(setmetatable({ message = select("#", ...) > 0 and format(fmt, ...) or fmt }, Usage), 0)
end

-- the same, for words the parser refused: the person is shown where the
-- command's help is
function _M.syntax(fmt, ...)
  local ok, e = pcall(_M.fail, fmt, ...)
  if not ok then e.syntax = true end
  error(e, 0)
end

function _M.is(e)
  return getmetatable(e) == Usage
end

-- What an argument error of the library says ("bad argument #1 to 'new'
-- (option 'base_url' is not a valid URL)"), without where it was raised:
-- a file path and line of ours would mean nothing at the prompt.
function _M.argument_problem(msg)
  return msg:match("bad argument #%d+ to '[^']*' %((.*)%)$")
end

-- Edit distance (insert, delete, substitute, swap two neighbours).
local function distance(a, b)
  local d = {}
  for i = 0, #a do d[i] = { [0] = i } end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      local v = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        v = min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[#a][#b]
end

-- The candidate nearest to word, if it is near enough to be a slip (one
-- edit in a short word, two in a longer one); ties go to the first in order.
function _M.nearest(word, candidates)
  local best, best_d = nil, (#word <= 4 and 1 or 2) + 1
  for _, c in ipairs(candidates) do
    local d = distance(word, c)
    if d < best_d then best, best_d = c, d end
  end
  return best
end

return _M
