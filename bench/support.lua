-- What the nginx benchmarks (bench/nginx.lua, bench/nginx_callgrind.lua)
-- share: a shell command's output (raising with it when the command fails)
-- and the median of a list.
local util = require("spec.support.nginx").util

local error, ipairs = error, ipairs
local str_format, table_sort = string.format, table.sort

local _M = {}

-- The command's output (stdout and stderr), trailing space trimmed.
function _M.run(cmd)
  local out = util.capture(cmd .. " 2>&1; echo \" $?\"")
  local body, rc = out:match("^(.-)%s*(%d+)%s*$")
  if rc ~= "0" then error(str_format("command failed: %s\n%s", cmd, out), 0) end
  return body
end

function _M.median(list)
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table_sort(s)
  local n = #s
  return n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
end

return _M
