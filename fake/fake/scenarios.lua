-- Misbehaviour on request: scenarios (POST /_fake/scenario, one request
-- each or until reset), chaos (POST /_fake/chaos, seeded faults on the
-- re-trigger POSTs the service would accept) and the journal witness
-- (POST /_fake/witness). The field lists are in fake/flowservice_fake.lua's
-- header and spec/support/fake.lua.

local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")
local reply_m = require("fake.reply")
local api = require("fake.api")
local ims = require("fake.ims")

local io_open = io.open
local ipairs, next, pairs, pcall, tostring, type = ipairs, next, pairs, pcall, tostring, type
local math_floor = math.floor
local str_format, str_sub = string.format, string.sub
local table_remove = table.remove
local cjson, encode_array, now_ms, whole = util.cjson, util.encode_array, util.now_ms, util.whole
local single, new_prng, MAX_INTEGER = util.single, util.new_prng, util.MAX_INTEGER
local json_reply, gateway_error, deliver = reply_m.json_reply, reply_m.gateway_error, reply_m.deliver
local bad_gateway = reply_m.bad_gateway
local gateway_check, retrigger_check, retrigger_act =
      api.gateway_check, api.retrigger_check, api.retrigger_act
local expire_ims_tokens = ims.expire_tokens

local _M = {}

---------------------------------------------------------------------------
-- scenarios

local function take_scenario(request_line)
  for i, sc in ipairs(state.scenarios) do
    if not sc.match or request_line:find(sc.match) then
      if sc.remaining then
        sc.remaining = sc.remaining - 1
        if sc.remaining <= 0 then table_remove(state.scenarios, i) end
      end
      return sc
    end
  end
  return nil
end

local SCENARIO_FIELDS = {
  match = "string", times = "number", delay = "number", status = "number",
  headers = "table", body = "string", retry_after = "any", drop = "string",
  truncate = "boolean", oversize = "number", slow_body = "number", close = "boolean",
  repeat_token = "boolean", link_style = "string", act_then_delay = "number",
}

local function add_scenario(text)
  local sc = util.decode_object(text)
  if not sc then
    return json_reply(400, { errorMessage = "scenario must be a JSON object" })
  end
  for k, v in pairs(sc) do
    local want = SCENARIO_FIELDS[k]
    if not want then
      return json_reply(400, { errorMessage = "unknown scenario field " .. tostring(k) })
    end
    if want ~= "any" and type(v) ~= want then
      return json_reply(400, { errorMessage = "scenario field " .. k .. " must be a " .. want })
    end
  end
  if sc.match and not pcall(string.find, "", sc.match) then
    return json_reply(400, { errorMessage = "bad Lua pattern in match" })
  end
  if sc.drop and sc.drop ~= "before" and sc.drop ~= "after" then
    return json_reply(400, { errorMessage = 'drop must be "before" or "after"' })
  end
  if sc.link_style and sc.link_style ~= "token" and sc.link_style ~= "full" then
    return json_reply(400, { errorMessage = 'link_style must be "token" or "full"' })
  end
  for _, name in ipairs({ "delay", "act_then_delay" }) do
    if sc[name] and sc[name] < 0 then
      return json_reply(400, { errorMessage = name .. " must be >= 0 seconds" })
    end
  end
  local times = sc.times or 1
  -- times 0 or -1: applies until reset, so no counter
  if times > 0 then sc.remaining = math_floor(times) end
  sc.id = state.next_scenario_id
  state.next_scenario_id = state.next_scenario_id + 1
  state.scenarios[#state.scenarios + 1] = sc
  return json_reply(200, { ok = true, id = sc.id, queued = #state.scenarios })
end


---------------------------------------------------------------------------
-- chaos: seeded faults on the re-trigger POSTs the service would accept
-- (POST /_fake/chaos), for a fault campaign that must prove exactly-once

-- The POST faults in the order of the draw: one uniform draw per accepted
-- re-trigger POST picks the first kind whose cumulative probability lies
-- above it (or none).
local CHAOS_POST_FAULTS = { "drop_after", "status_502", "throttle", "slow", "revoke" }
local CHAOS_DEFAULTS = { retry_after = 1, throttle_burst = 0, slow_seconds = 3, latency = 0 }

-- Two streams from one seed, so that the GETs a client happens to make
-- (token-dependent, paging) do not shift the faults of its POSTs.
local function chaos_streams(seed)
  return new_prng(seed), new_prng(seed + 7919)
end

-- The fault for an accepted re-trigger POST, or nil. Once a throttle is
-- drawn, the next throttle_burst accepted POSTs are throttled without a
-- draw (a 429 storm).
local function chaos_post_fault(c)
  if c.burst_left > 0 then
    c.burst_left = c.burst_left - 1
    return "throttle"
  end
  local u = c.draw_post()
  local edge = 0
  for _, kind in ipairs(CHAOS_POST_FAULTS) do
    edge = edge + c[kind]
    if u < edge then
      if kind == "throttle" then c.burst_left = c.throttle_burst end
      return kind
    end
  end
  return nil
end


-- handler's result when a fault took it over, nil to go on as usual.
-- Decides the fault with the same checks the service makes, then acts at
-- once (no yield between), so a fault never lands on a POST the service
-- would have refused, and an "act" fault always creates its run.
local function chaos_apply(rec, request_id)
  local c = state.chaos
  local counts = state.chaos_counts
  if rec.method == "GET" then
    if rec.path ~= "/runs" and not rec.path:match("^/runs/[^/]+$") then return nil end
    -- a draw for every read, so the sequence of reads alone decides
    if c.draw_get() < c.get_502 then
      counts.get_502 = counts.get_502 + 1
      return true, deliver(bad_gateway(), nil, request_id)
    end
    return nil
  end
  local raw_id = rec.method == "POST" and rec.path:match("^/runs/([^/]+)/action$")
  if not raw_id or gateway_check(rec.headers, request_id) then return nil end
  local refused, run = retrigger_check(raw_id, rec.args, rec.headers, request_id)
  if refused then return nil end
  local fault = chaos_post_fault(c)
  if not fault then
    if c.latency <= 0 then return nil end
    -- the service's own time: act at once, answer after latency
    local reply = retrigger_act(run, rec.headers)
    ngx.sleep(c.latency)
    return true, deliver(reply, nil, request_id)
  end
  counts[fault] = counts[fault] + 1

  if fault == "throttle" then
    local reply = gateway_error(429, "429050", "Too many requests")
    reply.headers["Retry-After"] = str_format("%d", c.retry_after)
    return true, deliver(reply, nil, request_id)
  end
  local reply = retrigger_act(run, rec.headers)
  if fault == "drop_after" then
    return true, "abort"   -- 444: no byte of a reply; libcurl may resend on reuse
  elseif fault == "status_502" then
    return true, deliver(bad_gateway(), nil, request_id)
  elseif fault == "slow" then
    ngx.sleep(c.slow_seconds)   -- the settings read before the sleep: a reset may come
    return true, deliver(reply, nil, request_id)
  end
  -- revoke: no yield between this and the reply, so expiring first is the
  -- same as expiring after, as far as any later request can tell
  expire_ims_tokens()
  return true, deliver(reply, nil, request_id)
end


-- POST /_fake/chaos: seeded faults on accepted re-trigger POSTs (and GETs)
-- until reset; {} turns chaos off. Every field is optional:
local CHAOS_FIELDS = {
  seed = "seed",                 -- whole number; default from the clock (reported)
  drop_after = "probability",    -- act, then close without a reply byte
  status_502 = "probability",    -- act, then answer 502
  throttle = "probability",      -- do not act; 429 with Retry-After
  slow = "probability",          -- act, stall slow_seconds, then reply
  revoke = "probability",        -- act, reply, and expire every IMS token issued so far
  get_502 = "probability",       -- GET /runs[/{id}]: 502, nothing done
  retry_after = "whole",         -- seconds in a throttle's Retry-After (1)
  throttle_burst = "whole",      -- POSTs throttled after a drawn throttle (0)
  slow_seconds = "seconds",      -- the slow fault's stall (3)
  latency = "seconds",           -- a POST without a fault acts, then answers after this (0)
}

-- The settings as given, with defaults and the seed filled in.
local function chaos_settings(c)
  if not c then return { on = false } end
  local t = { on = true }
  for name in pairs(CHAOS_FIELDS) do t[name] = c[name] end
  return t
end

local function set_chaos(text)
  local t = util.decode_object(text)
  if not t then
    return json_reply(400, { errorMessage = "chaos must be a JSON object" })
  end
  local function bad(msg) return json_reply(400, { errorMessage = msg }) end
  for k, v in pairs(t) do
    local want = CHAOS_FIELDS[k]
    if not want then return bad("unknown chaos field " .. tostring(k)) end
    if want == "probability" and not (type(v) == "number" and v >= 0 and v <= 1) then
      return bad("chaos field " .. k .. " must be a probability from 0 to 1")
    elseif want == "seed" and not (whole(v, -MAX_INTEGER)) then
      return bad("seed must be a whole number of at most 14 digits")
    elseif want == "whole" and not whole(v, 0) then
      return bad("chaos field " .. k .. " must be a whole number >= 0")
    elseif want == "seconds" and not (type(v) == "number" and v >= 0 and v < MAX_INTEGER) then
      return bad("chaos field " .. k .. " must be a number of seconds >= 0")
    end
  end
  local total = 0
  for _, kind in ipairs(CHAOS_POST_FAULTS) do total = total + (t[kind] or 0) end
  if total > 1 + 1e-9 then
    return bad("the POST fault probabilities add up to more than 1")
  end
  state.chaos_counts = state.chaos_zero_counts()
  if next(t) == nil then
    state.chaos = nil
    return json_reply(200, chaos_settings(nil))
  end
  local c = { burst_left = 0, get_502 = t.get_502 or 0 }
  for _, kind in ipairs(CHAOS_POST_FAULTS) do c[kind] = t[kind] or 0 end
  for name, default in pairs(CHAOS_DEFAULTS) do
    if t[name] == nil then c[name] = default else c[name] = t[name] end
  end
  c.seed = t.seed or (now_ms() + ngx.worker.pid()) % 1000000007
  c.draw_post, c.draw_get = chaos_streams(c.seed)
  state.chaos = c
  return json_reply(200, chaos_settings(c))
end

---------------------------------------------------------------------------
-- journal witness (POST /_fake/witness): does the client's journal hold a
-- pending line for each re-trigger POST before the POST arrives?

local WITNESS_MAX_LISTED = 50   -- missing_runs entries kept; the count goes on
local JOURNAL_HEAD_BYTES = 64   -- compared on every read, to notice a replaced file

local function journal_key(run_id, request_id)
  return run_id .. "\0" .. request_id
end

-- One journal line into the cache's set of pending keys; lines that do not
-- decode (a line torn by a crash, another writer's half line) are skipped.
local function note_journal_line(keys, line)
  local ok, entry = pcall(cjson.decode, line)
  if ok and type(entry) == "table" and entry.state == "pending"
     and type(entry.run) == "string" and type(entry.request_id) == "string" then
    keys[journal_key(entry.run, entry.request_id)] = true
  end
end

local function new_journal_cache()
  return { offset = 0, head = "", keys = {} }
end

-- The pending keys of one journal file, and the text after its last
-- newline. Journals only grow (the client appends and fsyncs), so each read
-- takes up after the last complete line it consumed; a file that shrank, or
-- whose first bytes changed, was replaced and is read again from the start.
-- A missing file has no lines.
local function journal_keys(cache, path)
  local f, err, errno = io_open(path, "rb")
  if not f then
    for k, v in pairs(new_journal_cache()) do cache[k] = v end
    return cache.keys, "", errno ~= 2 and err or nil   -- 2: ENOENT
  end
  local size = f:seek("end")
  local head = ""
  if cache.offset > 0 then
    f:seek("set", 0)
    head = f:read(#cache.head) or ""
  end
  if size < cache.offset or head ~= cache.head then
    for k, v in pairs(new_journal_cache()) do cache[k] = v end
  end
  f:seek("set", cache.offset)
  local text, rerr = f:read("*a")
  f:close()
  if not text then return cache.keys, "", path .. ": " .. tostring(rerr) end
  local complete = text:match("^.*\n") or ""
  for line in complete:gmatch("[^\n]+") do note_journal_line(cache.keys, line) end
  if cache.offset == 0 then cache.head = str_sub(complete, 1, JOURNAL_HEAD_BYTES) end
  cache.offset = cache.offset + #complete
  return cache.keys, str_sub(text, #complete + 1)
end

local function note_witness_error(stats, message)
  for _, seen in ipairs(stats.errors) do
    if seen == message then return end
  end
  if #stats.errors < WITNESS_MAX_LISTED then stats.errors[#stats.errors + 1] = message end
end

-- A PostgreSQL journal's claim (flowservice_journal): the run's row is
-- pending with this request id among its pendings, committed. Asked by
-- psql, from the worker (blocking it a few ms a POST: a test's tool). The
-- ids go in as psql variables (:'run'), quoted by psql, never into the SQL.
local DB_CLAIM_SQL = "SELECT count(*) FROM flowservice_journal WHERE run = :'run' AND state = 'pending'"
  .. " AND entry->'pendings' @> jsonb_build_array(jsonb_build_object('request_id', :'rid'));"

local function shell_word(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function db_has_claim(db, run_id, request_id)
  local cmd = str_format("printf '%%s\\n' %s | %s -X -q -A -t -d %s -v run=%s -v rid=%s -f - 2>&1",
    shell_word(DB_CLAIM_SQL), shell_word(db.psql), shell_word(db.conninfo), shell_word(run_id),
    shell_word(request_id))
  local p = io.popen(cmd)
  if not p then return false, "cannot start psql" end
  local out = p:read("*a") or ""
  p:close()
  local n = tonumber(out:match("^%s*(%d+)%s*$"))
  if not n then return false, "psql: " .. out:sub(1, 200) end
  return n > 0
end

-- Called as a re-trigger POST arrives, before anything acts on it.
local function witness_check(raw_path, headers)
  local w = state.witness
  local raw_id = raw_path:match("^/runs/([^/]+)/action$")
  if not raw_id then return end
  local run_id = ngx.unescape_uri(raw_id)
  local request_id = single(headers["x-request-id"])
  local stats = state.witness_stats
  stats.checked = stats.checked + 1
  local found = false
  if request_id then
    local key = journal_key(run_id, request_id)
    for _, path in ipairs(w.journals) do
      local keys, tail, err = journal_keys(w.caches[path], path)
      if err then note_witness_error(stats, tostring(err)) end
      if not keys[key] and tail ~= "" then
        -- a last line without its newline yet: it counts once it decodes
        local tail_keys = {}
        note_journal_line(tail_keys, tail)
        if tail_keys[key] then keys = tail_keys end
      end
      if keys[key] then
        found = true
        break
      end
    end
    for _, db in ipairs(w.databases) do
      if found then break end
      local has, err = db_has_claim(db, run_id, request_id)
      if err then note_witness_error(stats, err) end
      found = has
    end
  end
  if not found then
    stats.missing = stats.missing + 1
    if #stats.missing_runs < WITNESS_MAX_LISTED then
      stats.missing_runs[#stats.missing_runs + 1] = {
        run = run_id,
        request_id = request_id or cjson.null,   -- none, or a repeated header
      }
    end
  end
end

-- POST /_fake/witness {"journals": [absolute path, ...], "databases":
-- [{"psql": path, "conninfo": ...}]}: check every re-trigger POST against
-- these journals (files, or PostgreSQL journals' claims) until reset; {} or
-- none turns it off. The worker must be able to read them (it runs as the user
-- that started the fake: see fake/nginx.conf.in).
local function set_witness(text)
  local t = util.decode_object(text)
  if not t then
    return json_reply(400, { errorMessage = "witness must be a JSON object" })
  end
  local function bad(msg) return json_reply(400, { errorMessage = msg }) end
  for k in pairs(t) do
    if k ~= "journals" and k ~= "databases" then return bad("unknown witness field " .. tostring(k)) end
  end
  local databases = t.databases or {}
  if type(databases) ~= "table" then return bad("databases must be an array") end
  for _, db in ipairs(databases) do
    if type(db) ~= "table" or type(db.psql) ~= "string" or type(db.conninfo) ~= "string" then
      return bad("each database is {psql, conninfo}")
    end
  end
  local journals = t.journals or {}
  if type(journals) ~= "table" then return bad("journals must be an array of paths") end
  local n = 0
  for _ in pairs(journals) do n = n + 1 end
  if n ~= #journals then return bad("journals must be an array of paths") end
  for _, path in ipairs(journals) do
    if type(path) ~= "string" or str_sub(path, 1, 1) ~= "/" then
      return bad("journals must be absolute paths")
    end
  end
  state.witness_stats = state.witness_zero_stats()
  if #journals == 0 and #databases == 0 then
    state.witness = nil
    return { status = 200, headers = {}, json = true, body = '{"journals":[]}' }
  end
  local caches = {}
  for _, path in ipairs(journals) do caches[path] = caches[path] or new_journal_cache() end
  state.witness = { journals = journals, caches = caches, databases = databases }
  return { status = 200, headers = {}, json = true,
           body = '{"journals":' .. encode_array(journals) .. '}' }
end

_M.take_scenario = take_scenario
_M.add_scenario = add_scenario
_M.chaos_apply = chaos_apply
_M.set_chaos = set_chaos
_M.witness_check = witness_check
_M.set_witness = set_witness

return _M
