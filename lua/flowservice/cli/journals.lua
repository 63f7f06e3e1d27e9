-- Where the command keeps its journals: one file per org/sandbox/flow under
-- $XDG_STATE_HOME/flowservice by default, --journal FILE|URI (or
-- FLOWSERVICE_JOURNAL; a PostgreSQL URI: one journal many jobs share), or
-- --no-journal.
local core = require "flowservice.core"
local journal = require "flowservice.journal"
local usage = require "flowservice.cli.usage"

local tostring, type = tostring, type
local concat = table.concat
local io_open, os_execute = io.open, os.execute
local usage_error = usage.fail

local _M = {}

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function succeeded(a, _, c)
  if type(a) == "number" then return a == 0 end
  return a == true and (c == nil or c == 0)
end

-- Each missing directory of an absolute path, made mode 0700 (mkdir -p
-- would leave the parents at the umask's mode).
local function make_dirs(dir)
  local steps, prefix = {}, ""
  for part in dir:gmatch("[^/]+") do
    prefix = prefix .. "/" .. part
    steps[#steps + 1] = shell_quote(prefix)
  end
  return succeeded(os_execute("for d in " .. concat(steps, " ")
    .. "; do [ -d \"$d\" ] || mkdir -m 700 \"$d\" || exit 1; done 2>/dev/null"))
end

-- create: make the directory (a dry run writes nothing, so it does not)
local function default_journal(getenv, org, sandbox, flow_id, create)
  local state = getenv("XDG_STATE_HOME")
  if not (state and state:sub(1, 1) == "/") then
    local home = getenv("HOME")
    if not (home and home:sub(1, 1) == "/") then
      usage_error("no place for the journal: set HOME or XDG_STATE_HOME, or pass --journal FILE or --no-journal")
    end
    state = home .. "/.local/state"
  end
  local dir = state:gsub("/+$", "") .. "/flowservice"
  if create and not make_dirs(dir) then usage_error("cannot create the journal directory %s", dir) end
  local function safe(s) return (s:gsub("[^%w%-@]", "_")) end
  return dir .. "/" .. safe(org) .. "_" .. safe(sandbox) .. "_" .. safe(flow_id) .. ".jsonl"
end

-- Open (creating it 0600) and close the journal now, so that a path that
-- cannot be written is a usage error before anything is sent; a PostgreSQL
-- journal is connected to (a wrong URI, a refused password, a missing
-- permission: usage errors too, exit 2).
local function check_journal(path, copts)
  if journal.is_postgresql(path) then
    local ok, err = journal.check(path, { org = copts.org_id, sandbox = copts.sandbox })
    if not ok then usage_error("cannot use the journal: %s", tostring(err and err.message or err)) end
    return path
  end
  if core.journal_open then
    local j, err = core.journal_open(path)
    if not j then usage_error("cannot use the journal: %s", tostring(err and err.message or err)) end
    j:close()
  else
    local f, err = io_open(path, "ab")
    if not f then usage_error("cannot use the journal: %s", err) end
    f:close()
  end
  return path
end

-- spec.journal from --journal / --no-journal: a path, false, or by default
-- a function giving each flow its own file (checked before it is used).
function _M.choice(o, getenv, copts, dry_run)
  if o.journal and o.no_journal then usage_error("give --journal FILE or --no-journal, not both") end
  if o.no_journal then return false end
  local given = _M.given(o, getenv)
  -- a dry run writes no file, but reads a PostgreSQL journal as any job
  -- does: its URI, password and permissions are checked the same way
  if given then
    return (dry_run and not journal.is_postgresql(given)) and given or check_journal(given, copts)
  end
  return function(flow_id)
    local path = default_journal(getenv, copts.org_id, copts.sandbox, flow_id, not dry_run)
    return dry_run and path or check_journal(path, copts)
  end
end

-- --journal, or else FLOWSERVICE_JOURNAL, or nil.
function _M.given(o, getenv)
  local env = getenv("FLOWSERVICE_JOURNAL")
  return o.journal or (env ~= "" and env) or nil
end

_M.default_path = default_journal

_M.succeeded = succeeded

return _M
