-- The bulk job's journal: one JSON object a line, appended and fsync'd by
-- the C core (exclusive lock, mode 0600) before a request is sent and after
-- its answer. Reading folds the lines into the last known state of each
-- run; a torn last line (a crash mid-write) is skipped.
--
-- Lines:
--   {"run": id, "flow": flow_id, "state": "pending", "request_id": ..., "etag": ..., "time": ms,
--    "server_time": ms}          (every line about a run also names its flow)
--   {"run": id, "state": "done", "new_id": ..., "etag": ..., "request_id": ..., "evidence": ...}
--   {"run": id, "state": "failed" | "ambiguous" | "refused", ...}
--     refused: the service answered without acting (429, not sent); free to try again
--   {"run": id, "state": "retry", "evidence": ...}  settled as never done; free to try again
--   {"learned": {"etag_changes": bool, "linkage": bool}}
--   {"run": id, "flow": ..., "followed": new_id, "outcome": "success" | "failed" | ...}
--     the re-run new_id, followed (wait_runs, max_active) until it finished
--   {"heal": id, "flow": ..., "step": n, "due": ms, "time": ms}
--     flowservice.heal's schedule: re-trigger run id (step n of its chain)
--     not before due (epoch ms). The first line for a run wins; it says
--     nothing about the run's state (runs[id] is untouched): state.heal[id]
--   {"heal": "scan", "flow": ..., "scanned": ms}
--     the same kind, the watch loop's mark: the flow's failed runs were
--     listed up to scanned (epoch ms); the latest wins: state.heal_scanned
-- No secret is ever written: entries carry ids, states and error summaries.
--
-- The backend interface the job talks to (it does not know which it has):
--   journal.open(target, opts) -> j | nil, err    journal.read(target, opts) -> state
--   j.state                      the fold above (runs, learned, followed)
--   j:write(entries) -> true, refused | nil, err
--                                one round, durable on return (one fsync, or one
--                                transaction); refused: run id -> why, for pending
--                                entries another job holds (never with the file)
--   j:keep() -> true | nil, err  renew this job's claims when due (file: nothing to do);
--                                err.lost (run id -> why): claims another job took over
--                                while this one stalled past its lease (write says so too)
--   j:reload() -> true | nil, err  read what other jobs wrote since (file: nothing)
--   j:in_flight_elsewhere() -> n   other live jobs' pending claims (file: 0)
--   j:close()
-- A target is a path (this file's backend, exclusive) or a PostgreSQL
-- connection string (flowservice.journal_pg, from the flowservice-postgresql
-- rock: many jobs at once, each run claimed in a transaction).
-- opts: { flow, org, sandbox, wait, lease, request_time, take_over }, used by
-- PostgreSQL only (client:journal_options() gives org, sandbox, wait and
-- request_time; take_over = false: a writer of heal lines, settling nothing).
local core = require "flowservice.core"

local cjson = require("cjson.safe").new()
local encode, decode = cjson.encode, cjson.decode
local concat = table.concat
local io_open, ipairs, pairs, setmetatable, type = io.open, ipairs, pairs, setmetatable, type

local _M = {}

local Journal = {}
Journal.__index = Journal

local function new_state()
  return { runs = {}, learned = {}, followed = {}, heal = {}, skipped_lines = 0 }
end

-- One entry into the state: runs[id] is the run's last entry, with
-- .pendings (every pending line since it was last settled: the evidence to
-- weigh after a crash) and .new_ids (every run it is known to have made).
local function apply(state, entry)
  if type(entry) ~= "table" then
    state.skipped_lines = state.skipped_lines + 1 -- torn by a crash mid-write
  elseif type(entry.learned) == "table" then
    for k, v in pairs(entry.learned) do state.learned[k] = v end
  elseif type(entry.followed) == "string" and type(entry.outcome) == "string" then
    state.followed[entry.followed] = entry.outcome -- a re-run followed to its end
  elseif type(entry.heal) == "string" and type(entry.scanned) == "number" then
    if entry.scanned > (state.heal_scanned or 0) then state.heal_scanned = entry.scanned end
  elseif type(entry.heal) == "string" and type(entry.due) == "number" then
    state.heal[entry.heal] = state.heal[entry.heal] or entry -- a heal schedule: the first stays
  elseif type(entry.run) == "string" and type(entry.state) == "string" then
    local previous = state.runs[entry.run] or { new_ids = {} }
    entry.new_ids = previous.new_ids
    entry.pendings = nil -- the fold's own: a line's would poison it (found by fuzz/journal)
    if entry.state == "pending" then
      local unsettled = previous.state == "pending" or previous.state == "ambiguous"
      entry.pendings = unsettled and previous.pendings or {}
      entry.pendings[#entry.pendings + 1] = { request_id = entry.request_id, etag = entry.etag,
        time = entry.time, server_time = entry.server_time }
    elseif entry.state == "ambiguous" then
      entry.pendings = previous.pendings or {}
    end
    if entry.state == "done" and type(entry.new_id) == "string" then
      entry.new_ids[#entry.new_ids + 1] = entry.new_id
    end
    state.runs[entry.run] = entry
  else
    state.skipped_lines = state.skipped_lines + 1
  end
end

local function fold(text)
  local state = new_state()
  for line in text:gmatch("[^\n]+") do apply(state, decode(line)) end
  return state
end

_M.fold = fold -- text -> state, for tests (fuzz/journal)
_M.new_state, _M.apply = new_state, apply -- the one fold, shared with the PostgreSQL backend

-- libpq's key=value keywords a connection string may start with
local CONNINFO_KEYS = { host = true, hostaddr = true, port = true, dbname = true, user = true,
  service = true, sslmode = true, application_name = true, connect_timeout = true, options = true,
  target_session_attrs = true, passfile = true }

-- Whether target names a PostgreSQL database rather than a file: a
-- postgresql:// (or postgres://) URI, or key=value conninfo that starts with
-- one of libpq's keywords. Anything else is a path.
function _M.is_postgresql(target)
  if type(target) ~= "string" then return false end
  if target:find("^postgres://") or target:find("^postgresql://") then return true end
  local key = target:match("^%s*([%a_]+)%s*=")
  return key ~= nil and CONNINFO_KEYS[key] == true
end

local function backend_pg()
  local ok, mod = pcall(require, "flowservice.journal_pg")
  if ok then return mod end
  return nil, { kind = "journal", message = "a PostgreSQL journal needs the flowservice-postgresql rock"
    .. " (luarocks install flowservice-postgresql): " .. tostring(mod):match("^[^\n]*") }
end

local read_file

-- The state a journal holds, without claiming anything (a dry run writes nothing).
function _M.read(target, opts)
  if _M.is_postgresql(target) then
    local pgj, err = backend_pg()
    if not pgj then return nil, err end
    return pgj.read(target, opts or {})
  end
  return read_file(target)
end

-- Every run the journal holds, for `flowservice journal show`: a list of
-- { flow, run, state, new_ids, job, host, lease_until, updated_at }
-- (the file knows flow, run, state, new_ids), by flow then run.
function _M.show(target, opts)
  opts = opts or {}
  if _M.is_postgresql(target) then
    local pgj, err = backend_pg()
    if not pgj then return nil, err end
    return pgj.show(target, opts)
  end
  local state = read_file(target)
  local list = {}
  for id, entry in pairs(state.runs) do
    if not opts.flow or entry.flow == opts.flow then
      list[#list + 1] = { flow = entry.flow, run = id, state = entry.state, new_ids = entry.new_ids }
    end
  end
  table.sort(list, function(a, b)
    if (a.flow or "") ~= (b.flow or "") then return (a.flow or "") < (b.flow or "") end
    return a.run < b.run
  end)
  return list
end

-- Whether a job could use target now (connect, schema created when missing,
-- the table readable) -> true | nil, err; a file is checked by opening it.
function _M.check(target, opts)
  if not _M.is_postgresql(target) then return true end
  local pgj, err = backend_pg()
  if not pgj then return nil, err end
  return pgj.check(target, opts or {})
end

-- Brings a PostgreSQL journal's schema to this version (creating it when
-- missing) -> { from = n, to = n }; a file needs none.
function _M.migrate(target, opts)
  if not _M.is_postgresql(target) then return { from = "file", to = "file" } end
  local pgj, err = backend_pg()
  if not pgj then return nil, err end
  return pgj.migrate(target, opts or {})
end

function read_file(path)
  local f = io_open(path, "rb")
  if not f then return fold("") end
  local text = f:read("*a")
  f:close()
  return fold(text)
end

-- Opens target for this job: a file exclusively (another job on it fails
-- here), then reads what earlier jobs left. Returns journal or nil, err.
function _M.open(path, opts)
  if _M.is_postgresql(path) then
    local pgj, err = backend_pg()
    if not pgj then return nil, err end
    return pgj.open(path, opts or {})
  end
  local handle, err = core.journal_open(path)
  if not handle then return nil, err end
  local state = _M.read(path)
  -- a torn last line must not glue itself to the first line we append
  local f = io_open(path, "rb")
  local ends_clean = true
  if f then
    local size = f:seek("end")
    if size > 0 then
      f:seek("set", size - 1)
      ends_clean = f:read(1) == "\n"
    end
    f:close()
  end
  local j = setmetatable({ path = path, handle = handle, state = state }, Journal)
  if not ends_clean then
    local ok, werr = handle:append("\n")
    if not ok then handle:close() return nil, werr end
  end
  return j
end

-- Appends entries (one round's worth) with one fsync; folds them in too.
function Journal:write(entries)
  if #entries == 0 then return true end
  local lines = {}
  for i, entry in ipairs(entries) do lines[i] = encode(entry) end
  local ok, err = self.handle:append(concat(lines, "\n") .. "\n")
  if not ok then return nil, err end
  for _, line in ipairs(lines) do apply(self.state, decode(line)) end
  return true
end

-- The file is this job's alone: no claim to renew, nobody else writes.
function Journal.keep(_) return true end
function Journal.reload(_) return true end
function Journal.in_flight_elsewhere(_) return 0 end

function Journal:close()
  self.handle:close()
end

return _M
