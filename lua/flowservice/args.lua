-- Argument checks for the Lua face, worded like luaL_argerror so that
-- errors raised here and in the C core read the same.
local error, pairs, tostring, type = error, pairs, tostring, type
local format = string.format
local run_id_problem = require("flowservice.core").run_id_problem

local _M = {}

-- Raise "bad argument #argn to 'fname' (msg)" at the caller of the API
-- function that called us (level 3 from here).
function _M.fail(argn, fname, msg, level)
  error(format("bad argument #%d to '%s' (%s)", argn, fname, msg), (level or 2) + 1)
end

-- Re-raise an argument error of the C core (always about its argument #1
-- here) as one about the caller's argument position.
function _M.rethrow(err, argn, fname, level)
  if type(err) == "string" then
    local inner = err:match("^bad argument #%d+ to '[^']*' %((.*)%)$")
    if inner then _M.fail(argn, fname, inner, (level or 2) + 1) end
  end
  error(err, 0)
end

-- Every key of t must be in spec (name -> Lua type name, or "any" for a
-- field the caller checks itself); returns t.
-- what: how to name the keys, e.g. "option" or "option 'retry' field".
function _M.fields(t, spec, what, argn, fname, level)
  level = (level or 2) + 1
  for key, value in pairs(t) do
    local want = type(key) == "string" and spec[key]
    if not want then
      _M.fail(argn, fname, format("%s '%s' is unknown", what, tostring(key)), level)
    elseif want ~= "any" and type(value) ~= want then
      _M.fail(argn, fname, format("%s '%s' must be a %s, got %s", what, key, want, type(value)), level)
    end
  end
  return t
end

function _M.is_integer(n)
  return type(n) == "number" and n == n and n % 1 == 0 and n > -2^53 and n < 2^53
end

-- The run id rules of the C core, checked before any I/O.
function _M.run_id(run_id, argn, fname, level)
  level = (level or 2) + 1
  if type(run_id) ~= "string" or run_id == "" then
    _M.fail(argn, fname, "run id must be a non-empty string, got "
      .. (run_id == "" and "an empty string" or type(run_id)), level)
  end
  -- unreserved only: "/" would go out as %2F, which a decoding proxy turns
  -- into another path; and not "." or "..". The core's own rules, checked
  -- by it (a pattern here cost ~10,000 instructions a call on Lua 5.4)
  local why = run_id_problem(run_id)
  if why then _M.fail(argn, fname, why, level) end
  return run_id
end

return _M
