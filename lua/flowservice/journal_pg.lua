-- The journal in PostgreSQL (the flowservice-postgresql rock): the same
-- interface as the file (flowservice.journal), shared by many jobs on many
-- hosts at once.
--
-- One table, flowservice_journal, keyed by (org, sandbox, flow, run): a row
-- per run holds the run's folded entry (the same fold as the file's lines:
-- state, pendings, new_ids, ...) and its claim (job, host, lease_until). A
-- row (org '', sandbox '', flow '', run 'schema-version') holds the schema
-- version; a row (org, sandbox, flow '', run 'learned') what was learned of
-- the server. Since schema version 2 the column heal holds flowservice.heal's
-- lines: a run's schedule (its first heal line: the first written wins,
-- on a row of state 'new' when the run has no other entry yet), and on the
-- row (org, sandbox, flow, run '') of state 'scan' the watch loop's scan
-- mark (the latest wins).
--
-- A round is one transaction (group commit). Its pending entries are
-- claims: each run's row is locked (SELECT ... FOR UPDATE), and a run that
-- another live job holds pending, or that is done, is refused (the job skips
-- it); the claims commit before any of the round's re-triggers leaves. A
-- claim carries a lease (database clock) that the job renews while it
-- lives; at open, the job takes over every pending or ambiguous row of its
-- flow whose lease ran out (one UPDATE: the row lock lets exactly one job
-- have each) and settles them by the same evidence rules as the file's
-- pending lines. A job that stalled past its lease (SIGSTOP, a frozen VM)
-- may find some of its claims taken over: keep() compares the rows it
-- renewed with the claims it holds, and every round's write checks the
-- same in its own statement (a row another job now holds is never
-- overwritten); the job is told (err.lost) and sends nothing more.
--
-- Every query is parameterised; data travels as JSON parameters. Waiting
-- goes through opts.wait when given (the client's wait function: nothing
-- blocks), else poll(2) on the socket. A connection string holding a
-- password is refused: libpq takes it from PGPASSWORD, ~/.pgpass or a
-- service file, and no message carries it.
local pg = require "flowservice.pg"
local journal = require "flowservice.journal"
local core = require "flowservice.core"

local cjson = require("cjson.safe").new()
local encode, decode = cjson.encode, cjson.decode
local now = core.now
local format, min = string.format, math.min
local getenv, io_open = os.getenv, io.open
local ipairs, next, pairs, select, setmetatable, tonumber, tostring, type = ipairs, next, pairs, select,
  setmetatable, tonumber, tostring, type
local sort = table.sort
local os_time, random = os.time, math.random

local _M = { SCHEMA_VERSION = 2 }

local TABLE = "flowservice_journal"
local LEASE = 60       -- seconds a claim lives unless renewed
local TIMEOUT = 30     -- seconds a query (or the connect) may take
local MIN_WAIT, MAX_WAIT = 0.001, 0.02
local RETRIES = 5      -- deadlock / serialization failures: the transaction is repeated

local PgJournal = {}
PgJournal.__index = PgJournal

-- Messages leave without any password: PGPASSWORD's value is cut out of
-- them, and so are quoted parts of a connection string libpq echoes.
local function scrub(msg)
  msg = tostring(msg or "")
  local password = getenv("PGPASSWORD")
  if password and password ~= "" then
    local i, j = msg:find(password, 1, true)
    while i do
      msg = msg:sub(1, i - 1) .. "***" .. msg:sub(j + 1)
      i, j = msg:find(password, i + 3, true)
    end
  end
  return (msg:gsub("%s+", " "):gsub("%s+$", ""))
end

local function fail(message, sqlstate)
  return nil, { kind = "journal", message = "PostgreSQL journal: " .. scrub(message), sqlstate = sqlstate }
end

-- A user-facing name for the target (no password can be in it: refused).
local function describe(conninfo)
  local uri_host = conninfo:match("^postgres[q]?[l]?://([^/?]*)")
  return uri_host and ("postgresql://" .. uri_host) or "PostgreSQL"
end

-- The connection ------------------------------------------------------------

local Conn = {}
Conn.__index = Conn

-- Wait until the socket is ready (for_write), within the deadline.
function Conn:wait_io(for_write, deadline)
  local c, wait, delay = self.c, self.wait, MIN_WAIT
  while true do
    local left = deadline - now()
    if left <= 0 then return nil, "PostgreSQL did not answer within " .. self.timeout .. " s" end
    local ready, err = c:poll(for_write, wait and 0 or min(left, 1))
    if ready == nil then return nil, err end
    if ready then return true end
    if wait then
      wait(delay)
      delay = min(delay * 2, MAX_WAIT)
    end
  end
end

local function check_conninfo(conninfo)
  if conninfo:find("^postgres[q]?[l]?://[^/@?]*:[^/@?]*@") then
    return fail("a password in the connection URI is refused: give it by PGPASSWORD, ~/.pgpass"
      .. " or a service file")
  end
  local has_password, err = pg.conninfo_check(conninfo)
  if has_password == nil then
    -- libpq quotes the part it could not read, which may be anything: cut it out
    return fail((tostring(err):gsub('"[^"]*"', '"..."')))
  end
  if has_password then
    return fail("a password in the connection string is refused: give it by PGPASSWORD, ~/.pgpass"
      .. " or a service file")
  end
  return true
end

local function connect(conninfo, opts)
  local ok, err = check_conninfo(conninfo)
  if not ok then return nil, err end
  local c, cerr = pg.connect(conninfo)
  if not c then return fail(cerr) end
  local self = setmetatable({ c = c, wait = opts.wait, timeout = opts.timeout or TIMEOUT,
    name = describe(conninfo) }, Conn)
  local deadline = now() + self.timeout
  local want = "write" -- libpq: before the first poll, as if it asked to write
  while true do
    local wok, werr = self:wait_io(want == "write", deadline)
    if not wok then c:close() return fail(format("cannot connect to %s: %s", self.name, werr)) end
    local st, perr = c:connect_poll()
    if st == nil then c:close() return fail(perr) end
    if st == "ok" then return self end
    want = st
  end
end

-- One statement -> rows (the last result's) or nil, err.
function Conn:query(sql, ...)
  local c = self.c
  if self.broken then return fail("the connection to PostgreSQL was lost: " .. self.broken) end
  local params = { n = select("#", ...), ... }
  local deadline = now() + self.timeout
  local function lost(err)
    self.broken = scrub(err)
    return fail(err)
  end
  local ok, err = c:send(sql, params)
  if not ok then return lost(err) end
  while true do
    local done, ferr = c:flush()
    if done == nil then return lost(ferr) end
    if done then break end
    local wok, werr = self:wait_io(true, deadline)
    if not wok then return lost(werr) end
    local _, cerr = c:consume()
    if cerr then return lost(cerr) end
  end
  while true do
    local busy, cerr = c:consume()
    if busy == nil then return lost(cerr) end
    if not busy then break end
    local wok, werr = self:wait_io(false, deadline)
    if not wok then return lost(werr) end
  end
  local rows, failure = {}, nil
  while true do
    local res = c:result()
    if not res then break end
    if res.ok then rows = res.rows or {} elseif not failure then failure = res end
  end
  if failure then return fail(failure.message, failure.sqlstate) end
  return rows
end

function Conn:close()
  self.c:close()
end

-- A transaction: fn(conn) -> result | nil, err; repeated on deadlock or
-- serialization failure (nothing of it committed, nothing sent meanwhile).
local function conflict(err)
  return err and (err.sqlstate == "40P01" or err.sqlstate == "40001")
end

function Conn:transaction(fn, single)
  if single then -- one statement: it commits by itself
    for _ = 1, RETRIES do
      local result, err = fn(self)
      if result ~= nil or not conflict(err) then return result, err end
    end
    return fail("the statement kept meeting deadlocks")
  end
  for _ = 1, RETRIES do
    local ok, err = self:query("BEGIN")
    if not ok then return nil, err end
    local result, ferr = fn(self)
    if result ~= nil then
      ok, err = self:query("COMMIT")
      if ok then return result end
      ferr = err
    end
    if not self.broken then self:query("ROLLBACK") end
    if not conflict(ferr) then return nil, ferr end
  end
  return fail("the transaction kept meeting deadlocks")
end

-- The schema ----------------------------------------------------------------

local MIGRATIONS = {
  [1] = {
    "CREATE TABLE IF NOT EXISTS " .. TABLE .. " ("
      .. " org text NOT NULL, sandbox text NOT NULL, flow text NOT NULL, run text NOT NULL,"
      .. " state text NOT NULL, entry jsonb NOT NULL DEFAULT '{}',"
      .. " job text, host text, lease_until timestamptz,"
      .. " updated_at timestamptz NOT NULL DEFAULT now(),"
      .. " PRIMARY KEY (org, sandbox, flow, run))",
  },
  -- flowservice.heal's schedules and scan marks
  [2] = {
    "ALTER TABLE " .. TABLE .. " ADD COLUMN IF NOT EXISTS heal jsonb",
  },
}

local VERSION_SQL = "SELECT entry->>'version' AS version FROM " .. TABLE
  .. " WHERE org = '' AND sandbox = '' AND flow = '' AND run = 'schema-version'"

local function schema_version(conn)
  local present, perr = conn:query("SELECT to_regclass($1) IS NOT NULL AS present", TABLE)
  if not present then return nil, perr end
  if present[1].present ~= "t" then return 0, false end -- no table yet
  local rows, err = conn:query(VERSION_SQL)
  if not rows then return nil, err end
  return rows[1] and tonumber(rows[1].version) or 0, true
end

-- Creates or upgrades the schema, one transaction under an advisory lock
-- (two jobs starting together create it once) -> from, to.
local function migrate(conn)
  local from
  local ok, err = conn:transaction(function(tx)
    local locked, lerr = tx:query("SELECT pg_advisory_xact_lock(hashtext($1))", TABLE)
    if not locked then return nil, lerr end
    local v, verr = schema_version(tx)
    if not v then return nil, verr end
    from = v
    if v > _M.SCHEMA_VERSION then
      return fail(format("the journal's schema is version %d, newer than this flowservice knows (%d)",
        v, _M.SCHEMA_VERSION))
    end
    for step = v + 1, _M.SCHEMA_VERSION do
      for _, sql in ipairs(MIGRATIONS[step]) do
        local done, serr = tx:query(sql)
        if not done then return nil, serr end
      end
    end
    local set, serr = tx:query("INSERT INTO " .. TABLE .. " (org, sandbox, flow, run, state, entry)"
      .. " VALUES ('', '', '', 'schema-version', 'schema', jsonb_build_object('version', $1::int))"
      .. " ON CONFLICT (org, sandbox, flow, run) DO UPDATE SET entry = EXCLUDED.entry, updated_at = now()",
      tostring(_M.SCHEMA_VERSION))
    if not set then return nil, serr end
    return true
  end)
  if not ok then return nil, err end
  return from, _M.SCHEMA_VERSION
end

-- The schema as this job needs it: created on first use; an older one is
-- upgraded only by `flowservice journal migrate`.
local function ensure_schema(conn)
  local v, present = schema_version(conn)
  if not v then return nil, present end
  if v == _M.SCHEMA_VERSION then return true end
  if not present then
    local from, merr = migrate(conn)
    if not from then return nil, merr end
    return true
  end
  return _M.version_refusal(v)
end

-- Why a schema of version v cannot be used as it is (v ~= SCHEMA_VERSION).
function _M.version_refusal(v)
  if v > _M.SCHEMA_VERSION then
    return fail(format("the journal's schema is version %d, newer than this flowservice knows (%d)",
      v, _M.SCHEMA_VERSION))
  end
  return fail(format("the journal's schema is version %d; run `flowservice journal migrate` to bring it"
    .. " to %d", v, _M.SCHEMA_VERSION))
end

-- Reading rows into the fold's state -----------------------------------------

local function claim_why(row)
  return format("claimed by job %s on host %s", tostring(row.job), tostring(row.host))
end

-- A row's heal column into state: a schedule (state.heal[run]) or, on the
-- row of run '', the scan mark (state.heal_scanned).
local function load_heal(state, run, text)
  local h = type(text) == "string" and decode(text)
  if type(h) ~= "table" then return end
  if run == "" then
    if type(h.scanned) == "number" and h.scanned > (state.heal_scanned or 0) then
      state.heal_scanned = h.scanned
    end
  elseif type(h.due) == "number" then
    h.heal = run
    state.heal[run] = h
  end
end

-- rows (run, state, entry, job, host, live, heal) -> state; rows other live
-- jobs hold pending or ambiguous read as "claimed" (the job skips them).
local function load_rows(state, rows, me)
  local elsewhere = 0
  for _, row in ipairs(rows) do
    local entry = decode(row.entry or "") or {}
    load_heal(state, row.run, row.heal)
    if row.run == "learned" and row.flow == "" then
      for k, v in pairs(entry) do state.learned[k] = v end
    elseif row.state ~= "new" and row.run ~= "" then
      entry.run, entry.state = row.run, row.state
      entry.new_ids = entry.new_ids or {}
      if type(entry.pendings) ~= "table" then entry.pendings = nil end
      for new_id, outcome in pairs(entry.followed_runs or {}) do state.followed[new_id] = outcome end
      local held = (row.state == "pending" or row.state == "ambiguous") and row.live == "t"
        and row.job ~= me
      if held then
        elsewhere = elsewhere + (row.state == "pending" and 1 or 0)
        entry = { run = row.run, flow = entry.flow, state = "claimed", why = claim_why(row),
          new_ids = entry.new_ids, held = entry }
      end
      state.runs[row.run] = entry
    end
  end
  return elsewhere
end

local SELECT_FLOW = "SELECT flow, run, state, entry::text AS entry, job, host,"
  .. " (lease_until > now()) AS live, heal::text AS heal FROM " .. TABLE
  .. " WHERE org = $1 AND sandbox = $2 AND (flow = $3 OR (flow = '' AND run = 'learned'))"

local function random_id()
  local f = io_open("/dev/urandom", "rb")
  local bytes = f and f:read(6)
  if f then f:close() end
  if not bytes or #bytes < 6 then return format("%x%x", os_time(), random(0, 0xffffff)) end
  return (bytes:gsub(".", function(ch) return format("%02x", ch:byte()) end))
end

-- The lease: as given (flowservice.bulk checks it against the client's
-- request time), else 60 s, or twice the time one request may take when
-- that is longer.
local function check_opts(opts)
  local lease = opts.lease
  if type(lease) ~= "number" or lease ~= lease or lease <= 0 then
    local request_time = tonumber(opts.request_time) or 0
    lease = LEASE < 2 * request_time and 2 * request_time or LEASE
  end
  return lease
end

-- Opening, claiming, writing -------------------------------------------------

function _M.open(conninfo, opts)
  local conn, err = connect(conninfo, opts)
  if not conn then return nil, err end
  local ok
  ok, err = ensure_schema(conn)
  if not ok then conn:close() return nil, err end
  -- held: the runs whose claim (a leased row) this job holds; lost: those
  -- another job took over while this one stalled past its lease
  local self = setmetatable({
    conn = conn, org = tostring(opts.org or ""), sandbox = tostring(opts.sandbox or ""),
    flow = tostring(opts.flow or ""), lease = check_opts(opts), job = random_id(),
    host = pg.hostname() or "?", path = describe(conninfo), renewed = now(), held = {}, lost = {},
  }, PgJournal)
  -- take over what dead jobs left: one statement, the row lock gives each row to one job (not
  -- for a writer of heal lines only, which would settle nothing: take_over = false)
  local taken = {}
  if opts.take_over ~= false then taken, err = conn:query("UPDATE " .. TABLE .. " SET job = $4, host = $5,"
    .. " lease_until = now() + make_interval(secs => $6::float8), updated_at = now()"
    .. " WHERE org = $1 AND sandbox = $2 AND flow = $3 AND state IN ('pending', 'ambiguous')"
    .. " AND (lease_until IS NULL OR lease_until <= now()) RETURNING run",
    self.org, self.sandbox, self.flow, self.job, self.host, tostring(self.lease)) end
  if not taken then conn:close() return nil, err end
  for _, row in ipairs(taken) do self.held[row.run] = true end
  ok, err = self:reload()
  if not ok then conn:close() return nil, err end
  return self
end

-- Everything of this flow again (what other jobs wrote since).
function PgJournal:reload()
  local rows, err = self.conn:query(SELECT_FLOW, self.org, self.sandbox, self.flow)
  if not rows then return nil, err end
  local state = self.state or journal.new_state()
  state.runs, state.followed, state.heal, state.heal_scanned = {}, state.followed or {}, {}, nil
  self.elsewhere = load_rows(state, rows, self.job)
  self.state = state
  return true
end

function PgJournal:in_flight_elsewhere()
  return self.elsewhere or 0
end

-- The row of one run as this job's state has it (followed outcomes inside).
local function row_of(state, run_id, followed_of, leased)
  local entry = state.runs[run_id]
  local stored = {}
  for k, v in pairs(entry) do stored[k] = v end
  stored.held = nil
  stored.followed_runs = followed_of[run_id] or entry.followed_runs
  return { run = run_id, state = entry.state, entry = stored, leased = leased }
end

local UPSERT = "INSERT INTO " .. TABLE
  .. " AS t (org, sandbox, flow, run, state, entry, job, host, lease_until, updated_at)"
  .. " SELECT $1, $2, r->>'flow', r->>'run', r->>'state', r->'entry', $3, $4,"
  .. " CASE WHEN (r->>'leased')::boolean THEN now() + make_interval(secs => $5::float8) END, now()"
  .. " FROM jsonb_array_elements($6::jsonb) AS r"
  .. " ON CONFLICT (org, sandbox, flow, run) DO UPDATE SET state = EXCLUDED.state,"
  .. " entry = EXCLUDED.entry, job = EXCLUDED.job, host = EXCLUDED.host,"
  .. " lease_until = EXCLUDED.lease_until, updated_at = now()"
  -- the fence: a row this job believes it holds ($7) is written only while it does
  .. " WHERE t.job IS NOT DISTINCT FROM EXCLUDED.job"
  .. " OR t.run NOT IN (SELECT jsonb_array_elements_text($7::jsonb))"
  .. " RETURNING run"

-- Heal lines ($4: [{run, state, heal}]): a schedule on the run's row (made
-- 'new' when the run has none), the first one kept; the scan mark on the
-- row of run '' (state 'scan'), the latest kept. Each row comes back with
-- the heal it holds now (another job's may have been first).
local HEAL_UPSERT = "INSERT INTO " .. TABLE .. " AS t (org, sandbox, flow, run, state, heal)"
  .. " SELECT $1, $2, $3, r->>'run', r->>'state', r->'heal' FROM jsonb_array_elements($4::jsonb) AS r"
  .. " ORDER BY r->>'run'"
  .. " ON CONFLICT (org, sandbox, flow, run) DO UPDATE SET heal = CASE"
  .. " WHEN t.run <> '' THEN coalesce(t.heal, EXCLUDED.heal)"
  .. " WHEN coalesce((t.heal->>'scanned')::float8, 0) >= (EXCLUDED.heal->>'scanned')::float8 THEN t.heal"
  .. " ELSE EXCLUDED.heal END, updated_at = now()"
  .. " RETURNING run, heal::text AS heal"

-- The claims' rows, locked, in one statement: those that did not exist are
-- made ('new') and come back from the INSERT; the others are locked FOR
-- UPDATE (read as they are now). A row another transaction made while this
-- statement waited is in neither list: the statement is repeated for it
-- (within the transaction, each statement sees what committed before it).
local CLAIM_ROWS = "WITH made AS (INSERT INTO " .. TABLE .. " (org, sandbox, flow, run, state)"
  .. " SELECT $1, $2, $3, r, 'new' FROM jsonb_array_elements_text($4::jsonb) AS r ORDER BY r"
  .. " ON CONFLICT (org, sandbox, flow, run) DO NOTHING RETURNING run),"
  .. " locked AS (SELECT run, state, entry::text AS entry, job, host, (lease_until > now()) AS live"
  .. " FROM " .. TABLE .. " WHERE org = $1 AND sandbox = $2 AND flow = $3"
  .. " AND run IN (SELECT jsonb_array_elements_text($4::jsonb)) ORDER BY run FOR UPDATE)"
  .. " SELECT run, 'new' AS state, NULL AS entry, NULL AS job, NULL AS host, NULL AS live FROM made"
  .. " UNION ALL SELECT run, state, entry, job, host, live FROM locked"

-- Whether this job may send run now, by its locked row: nil, or why not.
function PgJournal:refusal(row, forced)
  if row.state == "done" and not forced then return "already re-triggered (journal)" end
  if (row.state == "pending" or row.state == "ambiguous") and row.job ~= self.job then
    if row.live == "t" then return claim_why(row) end
    if row.state == "ambiguous" then
      return format("left ambiguous by job %s on host %s: the next job settles it", tostring(row.job),
        tostring(row.host))
    end
    return claim_why(row) .. ", whose lease ran out: the next job settles it"
  end
  return nil
end

-- The error a job gets once it finds claims of its taken over: err.lost
-- maps each such run to who holds it now.
local function lost_error(self, lost, since)
  local ids = {}
  for run_id in pairs(lost) do ids[#ids + 1] = run_id end
  sort(ids)
  local who = {}
  local rows = self.conn:query("SELECT run, state, job, host FROM " .. TABLE
    .. " WHERE org = $1 AND sandbox = $2 AND flow = $3 AND run IN (SELECT jsonb_array_elements_text($4::jsonb))",
    self.org, self.sandbox, self.flow, encode(ids)) or {}
  for _, row in ipairs(rows) do who[row.run] = row end
  local why = {}
  for _, run_id in ipairs(ids) do
    local row = who[run_id] or {}
    why[run_id] = format("taken over by job %s on host %s (now %s) after this job's lease ran out",
      tostring(row.job), tostring(row.host), tostring(row.state))
    self.lost[run_id] = why[run_id]
  end
  local shown = {}
  for i = 1, min(#ids, 5) do shown[i] = ids[i] end
  local _, err = fail(format("this job (%s) was stalled %.0f s, past its %g s lease: %d of its claims"
    .. " (%s%s) were taken over by another job; it sends nothing more for flow %s", self.job, since,
    self.lease, #ids, table.concat(shown, ", "), #ids > #shown and ", ..." or "", self.flow))
  err.lost = why
  return nil, err
end

-- One round in one transaction: the pending entries' claims first (each
-- run's row locked; refused ones dropped), then every row the round
-- touched, and the heal lines. -> true, refused (run id -> why) | nil, err.
-- A job that finds its claims taken over (err.lost) writes no claim again.
function PgJournal:write(entries)
  if #entries == 0 then return true end
  local ok, kerr = self:keep() -- a job that stalled learns it before writing anything
  if not ok then return nil, kerr end
  local claims, seen, heal_rows, others = {}, {}, {}, {}
  for _, e in ipairs(entries) do
    if type(e.heal) == "string" then
      if type(e.scanned) == "number" then
        heal_rows[#heal_rows + 1] = { run = "", state = "scan", heal = { scanned = e.scanned, flow = e.flow } }
      elseif type(e.due) == "number" and e.heal ~= "" then
        heal_rows[#heal_rows + 1] = { run = e.heal, state = "new",
          heal = { flow = e.flow, step = e.step, due = e.due, time = e.time } }
      end
    elseif not (type(e.run) == "string" and self.lost[e.run]) then -- another job's now
      others[#others + 1] = e
      if e.state == "pending" and type(e.run) == "string" and not seen[e.run] then
        seen[e.run] = true
        claims[#claims + 1] = e.run
      end
    end
  end
  if #claims > 0 and next(self.lost) then
    return fail("this job's claims were taken over by another job: it sends nothing more for flow "
      .. self.flow)
  end
  entries = others
  sort(claims)
  -- one statement commits by itself; more, or a fence to hold, take a transaction
  local single = #claims == 0 and (#heal_rows == 0 or #entries == 0)
  for _, e in ipairs(entries) do
    if type(e.run) == "string" and self.held[e.run] then single = false end
  end
  local state, refused, healed, fenced_lost
  local result, err = self.conn:transaction(function(tx)
    refused, healed, fenced_lost = {}, nil, nil
    local fresh = {}
    local wanted = claims
    for _ = 1, RETRIES do
      if #wanted == 0 then break end
      local rows, cerr = tx:query(CLAIM_ROWS, self.org, self.sandbox, self.flow, encode(wanted))
      if not rows then return nil, cerr end
      local forced = {}
      for _, e in ipairs(entries) do
        if e.state == "pending" and e.forced then forced[e.run] = true end
      end
      for _, row in ipairs(rows) do
        local why = self:refusal(row, forced[row.run])
        if why then refused[row.run] = why else fresh[row.run] = row end
      end
      local missing = {}
      for _, run_id in ipairs(wanted) do
        if not fresh[run_id] and not refused[run_id] then missing[#missing + 1] = run_id end
      end
      wanted = missing
    end
    if #wanted > 0 then return fail("could not lock the rows of " .. #wanted .. " claims") end
    -- the fold over copies of the rows touched: a rolled-back round leaves the state as it was
    local runs = {}
    for _, e in ipairs(entries) do
      local run_id = e.run
      if type(run_id) == "string" and runs[run_id] == nil and self.state.runs[run_id] then
        runs[run_id] = decode(encode(self.state.runs[run_id]))
      end
    end
    for run_id, row in pairs(fresh) do -- what the row says now, other jobs' attempts included
      local entry = nil
      if row.state ~= "new" then
        entry = decode(row.entry or "") or {}
        entry.run, entry.state, entry.new_ids = run_id, row.state, entry.new_ids or {}
      end
      runs[run_id] = entry
    end
    for _, entry in pairs(runs) do
      if type(entry.new_ids) ~= "table" then entry.new_ids = {} end
    end
    state = { runs = runs, learned = {}, followed = {}, heal = {}, skipped_lines = 0 }
    for k, v in pairs(self.state.learned) do state.learned[k] = v end
    local touched, order, learned = {}, {}, false
    for _, e in ipairs(entries) do
      if not (e.state == "pending" and refused[e.run]) then
        local copy = decode(encode(e)) -- as the file would read it back
        if type(copy.learned) == "table" then learned = true end
        journal.apply(state, copy)
        local run_id = copy.run
        if type(run_id) == "string" and not touched[run_id] then
          touched[run_id] = true
          order[#order + 1] = run_id
        end
      end
    end
    local followed_of = {}
    for _, e in ipairs(entries) do
      if type(e.followed) == "string" and type(e.run) == "string" then
        local base = state.runs[e.run] and state.runs[e.run].followed_runs or {}
        local map = followed_of[e.run] or {}
        for k, v in pairs(base) do map[k] = v end
        map[e.followed] = e.outcome
        followed_of[e.run] = map
      end
    end
    local rows, fence = {}, {}
    sort(order) -- rows locked in one order by every job: no deadlock among them
    for _, run_id in ipairs(order) do
      if state.runs[run_id] then
        local st = state.runs[run_id].state
        -- only what may be in flight holds a lease; an ambiguous row is free for the next job to settle
        local row = row_of(state, run_id, followed_of, st == "pending")
        row.flow = self.flow
        rows[#rows + 1] = row
        -- held from before (not claimed in this round): still ours, or not written
        if self.held[run_id] and not fresh[run_id] then fence[#fence + 1] = run_id end
      end
    end
    if learned then
      rows[#rows + 1] = { flow = "", run = "learned", state = "learned", entry = state.learned,
        leased = false }
    end
    if #rows > 0 then
      local written, uerr = tx:query(UPSERT, self.org, self.sandbox, self.job, self.host, tostring(self.lease),
        encode(rows), #fence > 0 and encode(fence) or "[]") -- cjson makes {} of an empty table
      if not written then return nil, uerr end
      local done = {}
      for _, row in ipairs(written) do done[row.run] = true end
      for _, run_id in ipairs(fence) do
        if not done[run_id] then
          fenced_lost = fenced_lost or {}
          fenced_lost[run_id] = true
        end
      end
      if fenced_lost then return nil, "fenced" end -- rolled back: nothing of this round stays
      for _, row in ipairs(rows) do
        if row.run ~= "learned" or row.flow ~= "" then state.runs[row.run].leased = row.leased end
      end
    end
    if #heal_rows > 0 then
      local stored, herr = tx:query(HEAL_UPSERT, self.org, self.sandbox, self.flow, encode(heal_rows))
      if not stored then return nil, herr end
      healed = stored
    end
    return true
  end, single)
  if not result then
    if fenced_lost then
      for run_id in pairs(fenced_lost) do self.held[run_id] = nil end
      return lost_error(self, fenced_lost, now() - self.renewed)
    end
    return nil, err
  end
  -- committed: the copy becomes the state
  local runs, followed = self.state.runs, self.state.followed
  for run_id, entry in pairs(state.runs) do
    self.held[run_id] = entry.leased or nil
    entry.leased = nil
    runs[run_id] = entry
  end
  for new_id, outcome in pairs(state.followed) do followed[new_id] = outcome end
  for k, v in pairs(state.learned) do self.state.learned[k] = v end
  self.state.heal = self.state.heal or {}
  for _, row in ipairs(healed or {}) do load_heal(self.state, row.run, row.heal) end
  if next(refused) then return true, refused end
  return true
end

-- Renew this job's claims once a third of the lease has passed, and see
-- that every claim it holds was renewed: one that was not has been taken
-- over by another job (this one stalled past its lease) -> nil, err with
-- err.lost (run id -> who holds it now); the rest stay renewed.
function PgJournal:keep()
  local started = now()
  local since = started - self.renewed
  if since < self.lease / 3 then return true end
  local rows, err = self.conn:query("UPDATE " .. TABLE
    .. " SET lease_until = now() + make_interval(secs => $5::float8)"
    .. " WHERE org = $1 AND sandbox = $2 AND flow = $3 AND job = $4"
    .. " AND state IN ('pending', 'ambiguous') AND lease_until IS NOT NULL RETURNING run",
    self.org, self.sandbox, self.flow, self.job, tostring(self.lease))
  if not rows then return nil, err end
  self.renewed = started -- the database's lease began after this: the job's view is the shorter
  local renewed, lost = {}, nil
  for _, row in ipairs(rows) do renewed[row.run] = true end
  for run_id in pairs(self.held) do
    if not renewed[run_id] then
      lost = lost or {}
      lost[run_id] = true
      self.held[run_id] = nil
    end
  end
  if lost then return lost_error(self, lost, since) end
  return true
end

-- Claims are left as they are: what is pending stays unknown until settled.
function PgJournal:close()
  if self.conn then
    self.conn:close()
    self.conn = nil
  end
end

-- Without claiming: the state a dry run looks at.
function _M.read(conninfo, opts)
  local conn, err = connect(conninfo, opts)
  if not conn then return nil, err end
  local v
  v, err = schema_version(conn)
  local state = journal.new_state()
  if v and v > 0 and v ~= _M.SCHEMA_VERSION then
    conn:close()
    return _M.version_refusal(v)
  end
  if v and v > 0 then
    local rows
    rows, err = conn:query(SELECT_FLOW, tostring(opts.org or ""), tostring(opts.sandbox or ""),
      tostring(opts.flow or ""))
    if rows then load_rows(state, rows, nil) end
  end
  conn:close()
  if err then return nil, err end
  return state
end

function _M.show(conninfo, opts)
  local conn, err = connect(conninfo, opts)
  if not conn then return nil, err end
  local v
  v, err = schema_version(conn)
  if not v then conn:close() return nil, err end
  if v == 0 then conn:close() return {} end
  local rows
  rows, err = conn:query("SELECT org, sandbox, flow, run, state, entry::text AS entry, job, host,"
    .. " to_char(lease_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS lease_until,"
    .. " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS updated_at"
    .. " FROM " .. TABLE .. " WHERE flow <> '' AND state NOT IN ('new', 'scan')" -- runs, not heal rows
    .. " AND ($1::text IS NULL OR flow = $1)"
    .. " ORDER BY org, sandbox, flow, run", opts.flow or false)
  conn:close()
  if not rows then return nil, err end
  local list = {}
  for _, row in ipairs(rows) do
    local entry = decode(row.entry or "") or {}
    list[#list + 1] = { org = row.org, sandbox = row.sandbox, flow = row.flow, run = row.run,
      state = row.state, new_ids = entry.new_ids or {}, job = row.job, host = row.host,
      lease_until = row.lease_until, updated_at = row.updated_at }
  end
  return list
end

function _M.check(conninfo, opts)
  local conn, err = connect(conninfo, opts)
  if not conn then return nil, err end
  local ok
  ok, err = ensure_schema(conn)
  if ok then ok, err = conn:query("SELECT run FROM " .. TABLE .. " LIMIT 1") end
  conn:close()
  if not ok then return nil, err end
  return true
end

function _M.migrate(conninfo, opts)
  local conn, err = connect(conninfo, opts)
  if not conn then return nil, err end
  local from, to = migrate(conn)
  conn:close()
  if not from then return nil, to end
  return { from = from, to = to }
end

return _M
