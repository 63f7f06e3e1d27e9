-- Start, stop and steer the fake Flow Service (fake/) from plain Lua
-- (5.1 to 5.4, LuaJIT).
--
--   local fake = require "spec.support.fake"
--   local server = fake.start{                  -- every field optional
--     tls = { cert = "server.pem", key = "server.key", http2 = false },
--     fixture = "fake/runs.json",               -- the default
--     behaviour = { etag_changes = true },      -- this server's behaviour defaults
--   }
--   server.url                 "http://127.0.0.1:PORT", the client's base_url
--   server.tls_url             "https://127.0.0.1:TLSPORT" (nil without tls)
--   server.tls_localhost_url   "https://localhost:TLSPORT"
--   server.pid, server.worker_pid, server.prefix, server.port, server.tls_port
--   server:stop()              TERM by pid, wait, remove the prefix; idempotent
--   server.ports, server:error_log()   as spec/support/nginx.lua's servers have
--   server:reset()             reseed runs, clear scenarios and the request log
--   server:scenario(t)         queue a scenario; raises if the fake refuses it
--   server:requests()          recorded requests, oldest first
--   server:clear_requests()
--   server:runs()              all runs (array), server:run(id) one run or nil
--   server:http(opts)          a plain curl request (see below), for tests/demos
--   server.ims_url             base URL of the fake IMS (= server.url); the token
--                              endpoint is server.ims_url .. "/ims/token/v3"
--   server:ims{ expires_in = n }   expires_in (s) of IMS tokens issued from now on
--   server:expire_tokens()     every IMS token issued so far answers 401013 from now on
--   server:behaviour(t)        set switches until reset, answer all of them (t nil: read);
--                              built-in defaults { linkage = true, etag_changes = false,
--                              eligible_after_retrigger = true }, start's behaviour overrides
--   server:stats()             { in_flight, max_in_flight, posts, gets, retriggers, ims,
--                              by_source = { [source id] = n }, chaos = { drop_after,
--                              status_502, throttle, slow, revoke, get_502 }, witness =
--                              { checked, missing, missing_runs = { {run, request_id} },
--                              errors = { text } }, executing = { [flow id] = n },
--                              max_executing = { [flow id] = n } } since reset (Flow Service
--                              requests; IMS only in ims; chaos and witness also since set).
--                              executing: runs made by re-trigger not finished yet (flows
--                              with none are left out); max_executing: the most of them one
--                              flow had at once, checked on every re-trigger and read
--   server:outcomes(t)         how runs made by re-trigger from now on finish, until reset;
--                              t nil or {}: they stay inProgress (the default). t = { after = s
--                              (0), status = "success" (default) | "failed", errors = { {code,
--                              message, nestedErrors?}, ... } (failed only; default one
--                              CONNECTOR-2001-500), records = n (success only; 100), by_source
--                              = { [source run id] = outcome }, by_flow = { [flow id] = outcome } }
--                              (an outcome: the same four fields; by_source, then by_flow, then
--                              the top level). A new run finishes once `after` seconds passed,
--                              seen on the next read: completedAtUTC = startedAtUTC + after.
--                              Returns { on, default, by_source, by_flow }; raises if refused
--   server:sandbox(t)          add the generated sandbox until reset (once per reset; raises
--                              if refused). t fields, all optional: flows (20), runs (1000),
--                              seed (1), disabled (3), streaming (1). Flows 1..flows: the last
--                              `streaming` are streaming, the `disabled` before them disabled,
--                              the rest enabled batch; every run failed, spread over the flows
--                              and an 8-hour night by the seed, with CONNECTOR-2001-500 and/or
--                              CONNECTOR-1001-500 carrying nestedErrors { INGEST-1212-400 }.
--                              Returns { seed, runs, flows = { {id, name, state, source, runs
--                              = n} }, by_code = { [code] = runs carrying it } }
--   server:chaos(t)            seeded faults on re-trigger POSTs the service would accept,
--                              until reset; t nil or {} turns them off; raises if refused;
--                              returns the settings (seed included). t fields, all optional:
--                              seed (whole number), probabilities 0..1 adding up to <= 1:
--                              drop_after, status_502, throttle, slow, revoke; also get_502
--                              (GET /runs[/{id}] answers 502), retry_after (s, 1),
--                              throttle_burst (0), slow_seconds (3). See fake/flowservice_fake.lua.
--   server:witness(paths)      as each re-trigger POST arrives, check that one of these
--                              journal files (relative paths are made absolute) holds its
--                              {"run", "state": "pending", "request_id": x-request-id} line;
--                              results in stats().witness; nil or {} turns it off, as reset does
--   server:witness(paths, dbs) the same, also against PostgreSQL journals' claims: dbs =
--                              { {psql = path of psql, conninfo = ...} }: the run's row is
--                              pending with that request id, committed (asked by psql)
--   server:keys(map)           serve these I/O Events public keys ({ [path] = pem }) at their
--                              paths, as static.adobeioevents.com does (kept across reset);
--                              server:key_fetches() -> { [path] = GETs since set }
--   server:signing{ key1 = { path = "/prod/keys/k1.pem", private_key = "/abs/k1.key" },
--                   key2 = {...} }   the private keys (made by the suite with the openssl
--                              CLI) the fake signs events with, and the key paths the
--                              headers name; kept across reset
--   server:emit{ url = u | urls = { u, ... }, events = { { run = id, event_id, recipient,
--                code, meta, headers = { name = value | false }, bad_signature }, ... },
--                recipient, concurrency (50), timeout (10), retry_intervals ({1,2,4,8,16}) }
--                              the fake builds each "Flow Run Failed" event from the run it
--                              holds, signs it (openssl dgst) and POSTs it as Adobe I/O
--                              Events does (retries on 5xx, 429, no answer in timeout s);
--                              returns the delivery ids, one per event and url, in order
--   server:deliveries()        every delivery since reset: { id, event_id, run, url, done,
--                              outcome ("delivered", "refused", "gave up"), status (0: no
--                              answer), latency (s), attempts = { {status, latency, body,
--                              headers, error} } }
--   server:wait_deliveries(ids, timeout_s)   true once all are done (and their records)
--   server:webhook{ url, recipient, timeout, retry_intervals }   until reset ({} or nil: off):
--                              a run made by re-trigger that finishes failed (outcomes) has
--                              its failure event emitted there by the fake on its own
--   server:add_run(t)          inject a run (flowId required; id, status "success",
--                              createdClient "scheduler", createdAt now, outputRecordCount 0,
--                              errors, parentFlowRunId optional); returns the created run
--   server:wait_for_posts(n, timeout_s)   true once posts >= n, false after the timeout
--   fake.credentials           the token, api key, org and sandbox the fixture accepts
--   fake.ims_client            the client_id, client_secret and scopes IMS accepts
--   fake.flows                 the fixture's flow ids: enabled, disabled, streaming, paging, bulk
--   fake.paging_flow           the generated flow (250 failed + 20 successful runs)
--   fake.paging_run_id(i, s)   id of its i-th generated run, s "failed" (default) or "success"
--   fake.bulk_flow             the generated flow for bulk jobs (see fake.bulk_runs)
--   fake.bulk_run_id(i, kind)  id of its i-th run of a kind (default "failed")
--   fake.flow_specs            { batch = id, streaming = id }: the flowSpec ids of flows
--                              (a streaming flow is one with the streaming flowSpec)
--   fake.sandbox_flow_id(i)    id of the sandbox's i-th flow
--   fake.sandbox_run_id(i, j)  id of the j-th run of the sandbox's i-th flow (j up to
--                              that flow's runs in server:sandbox()'s answer)
--
-- The server is a real nginx on loopback with its own prefix directory
-- (spec/support/nginx.lua), so it neither needs nor touches a system nginx.
-- Control requests go through the curl command line, not through the code
-- under test. Set FAKE_NGINX to use another nginx binary.

local cjson = require("cjson").new()
local nginx = require "spec.support.nginx"

local assert, error, ipairs, next, pairs, pcall, tonumber, tostring, type =
      assert, error, ipairs, next, pairs, pcall, tonumber, tostring, type
local os_getenv, os_remove = os.getenv, os.remove
local debug_getinfo = debug.getinfo
local math_floor = math.floor
local math_tointeger = math.tointeger   -- nil before 5.3
local str_format = string.format
local table_concat = table.concat

local fake = { _VERSION = "0.1.0" }

-- What fake/runs.json accepts; handy for tests and the demo.
fake.credentials = {
  access_token = "fake-token",
  api_key = "fake-api-key",
  org = "FAKEORG@AdobeOrg",
  sandbox = "prod",
}

-- What the fixture's IMS accepts (POST /ims/token/v3, form-encoded).
fake.ims_client = {
  client_id = "fake-client-id",
  client_secret = "fake-client-secret",
  scopes = "openid,AdobeID,read_organizations",
}

-- Flow ids of fake/runs.json, by role.
fake.flows = {
  enabled = "fb5d688d-7698-4db6-a45e-8d510fa38dba",     -- batch, enabled
  disabled = "a1b28414-c315-4b94-9b4c-62fba3904971",    -- batch, not enabled
  streaming = "0886c1c7-d6bb-4f9a-bfb8-3d6e1f0fe507",   -- streaming, enabled
  paging = "9a3c5e71-2b4d-4f60-8e1a-7c9d0b2f4e6a",      -- batch, enabled, generated runs
  bulk = "b0c1d2e3-4f50-4a61-9b72-c3d4e5f60718",        -- batch, enabled, generated runs
}
fake.paging_flow = fake.flows.paging
fake.bulk_flow = fake.flows.bulk

-- The paging flow's runs, generated at load time (fixture "generated"):
--   failed  i = 1..250: createdAt 1764000000000 + (i-1)*60000
--   success i = 1..20:  createdAt 1764000030000 + (i-1)*750000, 500 records
-- startedAtUTC = createdAt + 1500, completedAtUTC = updatedAt = startedAtUTC + 45000.
fake.paging_runs = {
  failed = { count = 250, id_prefix = "fa11ed00", start = 1764000000000, step_ms = 60000 },
  success = { count = 20, id_prefix = "600d0000", start = 1764000030000, step_ms = 750000 },
}
function fake.paging_run_id(i, status)
  local gen = assert(fake.paging_runs[status or "failed"], "status is failed or success")
  return str_format("%s-0000-4000-8000-%012d", gen.id_prefix, i)
end

-- The bulk flow's 55 runs, generated at load time (fixture "generated"), all
-- createdClient "scheduler". Run i of a kind has id
-- "<id_prefix>-0000-4000-8000-<i as 12 digits>" and etag
-- "\"<id_prefix>-0000-0200-0000-<i as 12 digits>\"" (until re-triggered), createdAt
-- start + (i-1)*step_ms, startedAtUTC = createdAt + 1500, completedAtUTC =
-- updatedAt = startedAtUTC + 45000 (inProgress: no completedAtUTC, updatedAt =
-- startedAtUTC). With B = 1766000000000:
--   kind             count  status          records  re-triggerable  createdAt
--   failed              40  failed                0  yes             B + (i-1)*60000
--   success_empty        5  success               0  yes             B + 20000 + (i-1)*480000
--   success_records      5  success             750  no (1387)       B + 40000 + (i-1)*480000
--   partialSuccess       3  partialSuccess      300  no (1387)       B + 10000 + (i-1)*780000
--   inProgress           2  inProgress            0  no (1387)       B + 2400000 + (i-1)*60000
-- failed and partialSuccess runs carry one error each. So
-- property=metrics.statusSummary.status==failed finds 40, and the client's
-- eligible set (failed, or success with 0 records) is 45 runs.
local BULK_START = 1766000000000
fake.bulk_runs = {
  failed = { count = 40, id_prefix = "b1fa11ed", status = "failed", outputRecordCount = 0,
             start = BULK_START, step_ms = 60000, eligible = true },
  success_empty = { count = 5, id_prefix = "b1600d00", status = "success", outputRecordCount = 0,
                    start = BULK_START + 20000, step_ms = 480000, eligible = true },
  success_records = { count = 5, id_prefix = "b1600d50", status = "success",
                      outputRecordCount = 750, start = BULK_START + 40000, step_ms = 480000,
                      eligible = false },
  partialSuccess = { count = 3, id_prefix = "b1ba2700", status = "partialSuccess",
                     outputRecordCount = 300, start = BULK_START + 10000, step_ms = 780000,
                     eligible = false },
  inProgress = { count = 2, id_prefix = "b1a11e00", status = "inProgress", outputRecordCount = 0,
                 start = BULK_START + 40 * 60000, step_ms = 60000, eligible = false },
}
function fake.bulk_run_id(i, kind)
  local gen = fake.bulk_runs[kind or "failed"]
  if not gen then
    error("kind is failed, success_empty, success_records, partialSuccess or inProgress", 2)
  end
  assert(i >= 1 and i <= gen.count, "no such bulk run")
  return str_format("%s-0000-4000-8000-%012d", gen.id_prefix, i)
end

-- What GET /flows answers for a flow's flowSpec.id (fake/fake/store.lua).
fake.flow_specs = {
  batch = "9753525b-82c7-4dce-8a9b-5ccfce2b9876",
  streaming = "d8a6f005-7eaf-4153-983e-e8574508b877",
}

-- The sandbox (server:sandbox): flow i, and the j-th run of flow i.
function fake.sandbox_flow_id(i)
  assert(i >= 1 and i <= 1000, "no such sandbox flow")
  return str_format("5a9d0000-0000-4000-8000-%012d", i)
end
function fake.sandbox_run_id(i, j)
  assert(i >= 1 and i <= 1000 and j >= 1, "no such sandbox run")
  return str_format("5a9d%04x-0000-4000-8000-%012d", i, j)
end

local NGINX = os_getenv("FAKE_NGINX") or "nginx"
local WAIT_SECONDS = 5

---------------------------------------------------------------------------
-- shell helpers

local q, capture = nginx.util.quote, nginx.util.capture
local read_file, write_file = nginx.util.read_file, nginx.util.write_file
local sleep, monotonic = nginx.util.sleep, nginx.util.monotonic

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local pwd = capture("pwd"):gsub("\n$", "")
  return pwd .. "/" .. path
end

-- Paths end up inside nginx.conf and a Lua string there: refuse characters
-- that would need quoting rather than quote them halfway.
local function safe_path(path, what)
  if path:find('[%c"\'{};$\\]') then
    error(what .. " path has characters nginx.conf cannot take: " .. path, 3)
  end
  return path
end

-- The repository root, found from this file, so tests may run from anywhere.
local function repo_root()
  local source = debug_getinfo(1, "S").source
  local dir = source:sub(2):match("^(.*)/[^/]*$") or "."
  local root = capture("cd " .. q(absolute(dir) .. "/../..") .. " && pwd -P"):gsub("\n$", "")
  return root
end

local function escape_segment(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c)
    return str_format("%%%02X", c:byte())
  end))
end

---------------------------------------------------------------------------
-- HTTP through the curl CLI

local function curl(args, out_file, header_file)
  local cmd = { "curl -s --noproxy '*' --max-time 10 -o", q(out_file),
                "-w '%{http_code}'" }
  if header_file then cmd[#cmd + 1] = "-D " .. q(header_file) end
  for _, a in ipairs(args) do cmd[#cmd + 1] = a end
  -- the exit status through the shell: Lua 5.1's popen cannot report it
  local out = capture(table_concat(cmd, " ") .. " 2>/dev/null; echo \" $?\"")
  local code, exit_code = out:match("^(%d*)%s+(%d+)%s*$")
  local body = read_file(out_file) or ""
  os_remove(out_file)
  return tonumber(code), body, tonumber(exit_code)
end

local function parse_headers(text)
  local headers = {}
  -- With -D, curl writes every response (e.g. a 100 Continue too); keep the last.
  local last = text:match(".*\r?\n\r?\n(HTTP/.+)$") or text
  for line in last:gmatch("[^\r\n]+") do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      name = name:lower()
      local old = headers[name]
      if old == nil then headers[name] = value
      elseif type(old) == "table" then old[#old + 1] = value
      else headers[name] = { old, value } end
    end
  end
  return headers
end

---------------------------------------------------------------------------
-- the server object: spec/support/nginx.lua's (prefix, pid, ports, url,
-- error_log, stop, __gc, __close) with these methods

local Server = {}

function Server:_control(method, path, body)
  if self.stopped then error("fake server is stopped", 3) end
  local args = { "-X " .. method }
  if body then
    local file = self.prefix .. "/control-body.json"
    write_file(file, body)
    args[#args + 1] = "-H 'Content-Type: application/json' --data-binary @" .. q(file)
  end
  args[#args + 1] = q(self.url .. path)
  local code, text = curl(args, self.prefix .. "/control-out")
  return code, text
end

local function control_json(self, method, path, body)
  local code, text = self:_control(method, path, body)
  if code ~= 200 then
    error(str_format("fake: %s %s answered %s: %s", method, path, tostring(code), text), 3)
  end
  return cjson.decode(text)
end

function Server:reset()
  control_json(self, "POST", "/_fake/reset", "")
end

function Server:scenario(t)
  assert(type(t) == "table", "scenario must be a table")
  control_json(self, "POST", "/_fake/scenario", cjson.encode(t))
end

function Server:ims(t)
  assert(type(t) == "table", "ims settings must be a table")
  return control_json(self, "POST", "/_fake/ims", cjson.encode(t))
end

function Server:expire_tokens()
  return control_json(self, "POST", "/_fake/expire_tokens", "")
end

function Server:requests()
  return control_json(self, "GET", "/_fake/requests")
end

-- cjson decodes every number as a float; counts read better as integers
-- (the nested ones too: by_source, chaos, witness).
local function integers(t)
  for k, v in pairs(t) do
    if math_tointeger and type(v) == "number" and v == math_floor(v) then
      t[k] = math_tointeger(v) or v
    elseif type(v) == "table" then
      integers(v)
    end
  end
  return t
end

function Server:behaviour(t)
  if t == nil then return control_json(self, "GET", "/_fake/behaviour") end
  assert(type(t) == "table", "behaviour must be a table")
  -- an empty Lua table would encode as [] or {} depending on cjson: send {}
  local body = next(t) == nil and "{}" or cjson.encode(t)
  return control_json(self, "POST", "/_fake/behaviour", body)
end

function Server:stats()
  return integers(control_json(self, "GET", "/_fake/stats"))
end

-- The settings go back as integers where whole (the seed, counts).
function Server:chaos(t)
  if t == nil then t = {} end
  assert(type(t) == "table", "chaos must be a table")
  local body = next(t) == nil and "{}" or cjson.encode(t)
  return integers(control_json(self, "POST", "/_fake/chaos", body))
end

function Server:witness(paths, databases)
  if paths == nil then paths = {} end
  assert(type(paths) == "table", "witness takes a list of journal paths")
  local journals = {}
  for i, path in ipairs(paths) do
    assert(type(path) == "string", "journal paths are strings")
    journals[i] = absolute(path)
  end
  -- an empty list must go out as [], which cjson may not do by itself
  local body = #journals == 0 and '{"journals":[]}'
               or cjson.encode({ journals = journals })
  if databases and #databases > 0 then
    body = body:sub(1, -2) .. ',"databases":' .. cjson.encode(databases) .. "}"
  end
  return control_json(self, "POST", "/_fake/witness", body)
end

function Server:outcomes(t)
  if t == nil then t = {} end
  assert(type(t) == "table", "outcomes must be a table")
  local body = next(t) == nil and "{}" or cjson.encode(t)
  return integers(control_json(self, "POST", "/_fake/outcomes", body))
end

function Server:sandbox(t)
  if t == nil then t = {} end
  assert(type(t) == "table", "sandbox settings must be a table")
  local body = next(t) == nil and "{}" or cjson.encode(t)
  return integers(control_json(self, "POST", "/_fake/sandbox", body))
end

-- The I/O Events public keys the fake serves at their paths (GET, over
-- TLS too, no gateway), as static.adobeioevents.com does: { [path] = pem }.
-- They stay across reset. Server:key_fetches() -> { [path] = n } since set.
function Server:keys(map)
  assert(type(map) == "table" and next(map) ~= nil, "keys must map paths to PEM text")
  return control_json(self, "POST", "/_fake/keys", cjson.encode { keys = map })
end

function Server:key_fetches()
  return control_json(self, "GET", "/_fake/keys").fetches
end

-- Adobe I/O Events' part (fake/fake/emitter.lua). signing{ key1 = { path =
-- public key path, private_key = file }, key2 = {...} }: the keys the fake signs
-- with (kept across reset). emit(t) -> delivery ids; deliveries() -> records;
-- wait_deliveries(ids, timeout_s) -> true/false, the records of ids;
-- webhook(t): failure events of re-triggered runs that finish failed go there.
function Server:signing(t)
  assert(type(t) == "table" and t.key1 and t.key2, "signing takes key1 and key2")
  return control_json(self, "POST", "/_fake/signing", cjson.encode(t))
end

function Server:emit(t)
  assert(type(t) == "table" and type(t.events) == "table", "emit takes events")
  return integers(control_json(self, "POST", "/_fake/emit", cjson.encode(t))).deliveries
end

function Server:deliveries()
  return integers(control_json(self, "GET", "/_fake/deliveries"))
end

-- Poll every 20 ms until every delivery of ids is done.
function Server:wait_deliveries(ids, timeout_seconds)
  local deadline = monotonic() + (timeout_seconds or 10)
  while true do
    local all, by_id, done = self:deliveries(), {}, true
    for _, d in ipairs(all) do by_id[d.id] = d end
    local list = {}
    for i, id in ipairs(ids) do
      list[i] = by_id[id]
      if not (list[i] and list[i].done) then done = false end
    end
    if done then return true, list end
    if monotonic() >= deadline then return false, list end
    sleep(0.02)
  end
end

function Server:webhook(t)
  if t == nil then t = {} end
  assert(type(t) == "table", "webhook takes a table")
  local body = next(t) == nil and "{}" or cjson.encode(t)
  return control_json(self, "POST", "/_fake/webhook", body)
end

function Server:add_run(t)
  assert(type(t) == "table", "run must be a table")
  return control_json(self, "POST", "/_fake/runs", cjson.encode(t))
end

-- Poll the stats every 20 ms until posts >= n (true) or timeout_seconds
-- (default 10) pass (false, and the last stats).
function Server:wait_for_posts(n, timeout_seconds)
  local deadline = monotonic() + (timeout_seconds or 10)
  while true do
    local stats = self:stats()
    if stats.posts >= n then return true, stats end
    if monotonic() >= deadline then return false, stats end
    sleep(0.02)
  end
end

function Server:clear_requests()
  control_json(self, "DELETE", "/_fake/requests")
end

function Server:runs()
  return control_json(self, "GET", "/_fake/runs")
end

function Server:run(id)
  local code, text = self:_control("GET", "/_fake/runs/" .. escape_segment(id))
  if code == 404 then return nil end
  if code ~= 200 then error("fake: GET run answered " .. tostring(code) .. ": " .. text, 2) end
  return cjson.decode(text)
end

-- Not part of the client's world: a plain curl request, for the fake's own
-- tests and for scripts that want to poke the server by hand.
--   opts.method ("GET"), opts.path ("/"), opts.headers { name = value },
--   opts.auth (true: add fake.credentials' headers), opts.body (string),
--   opts.tls (use tls_url), opts.cacert (else -k), opts.http2 (ask for h2)
-- Returns { status = n (0 when no HTTP answer), headers = {lowercase = value},
-- body = s, curl_exit = n (curl's exit status: 52 empty reply, 18 short body) }.
function Server:http(opts)
  opts = opts or {}
  local args = { "-X " .. (opts.method or "GET") }
  local headers = {}
  if opts.auth then
    headers["Authorization"] = "Bearer " .. fake.credentials.access_token
    headers["x-api-key"] = fake.credentials.api_key
    headers["x-gw-ims-org-id"] = fake.credentials.org
    headers["x-sandbox-name"] = fake.credentials.sandbox
  end
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  for k, v in pairs(headers) do
    -- "Name;" is curl's way to send a header with an empty value
    args[#args + 1] = "-H " .. q(v == "" and (k .. ";") or (k .. ": " .. v))
  end
  if opts.body then
    local file = self.prefix .. "/http-body"
    write_file(file, opts.body)
    args[#args + 1] = "--data-binary @" .. q(file)
  end
  local base = self.url
  if opts.tls then
    base = assert(self.tls_url, "server has no TLS listener")
    args[#args + 1] = opts.cacert and ("--cacert " .. q(opts.cacert)) or "-k"
    args[#args + 1] = opts.http2 and "--http2" or "--http1.1"
  end
  args[#args + 1] = q(base .. (opts.path or "/"))
  local header_file = self.prefix .. "/http-headers"
  local code, body, exit_code = curl(args, self.prefix .. "/http-out", header_file)
  local header_text = read_file(header_file) or ""
  os_remove(header_file)
  return { status = code or 0, headers = parse_headers(header_text), body = body,
           curl_exit = exit_code }
end

---------------------------------------------------------------------------
-- starting

-- On the second port; nginx.start fills @PORT2@ after the vars.
local function tls_block(tls)
  local cert = safe_path(absolute(assert(tls.cert, "tls.cert is required")), "tls.cert")
  local key = safe_path(absolute(assert(tls.key, "tls.key is required")), "tls.key")
  return table_concat({
    str_format("        listen 127.0.0.1:@PORT2@ ssl%s;", tls.http2 and " http2" or ""),
    str_format('        ssl_certificate "%s";', cert),
    str_format('        ssl_certificate_key "%s";', key),
  }, "\n")
end

fake.behaviour_switches = { linkage = true, etag_changes = true, eligible_after_retrigger = true }

-- start's behaviour option as a Lua table constructor for nginx.conf.
local function behaviour_lua(t)
  if t == nil then return "nil" end
  if type(t) ~= "table" then error("behaviour must be a table", 3) end
  local parts = {}
  for k, v in pairs(t) do
    if not fake.behaviour_switches[k] then error("unknown behaviour " .. tostring(k), 3) end
    if type(v) ~= "boolean" then error("behaviour " .. k .. " must be true or false", 3) end
    parts[#parts + 1] = str_format("%s = %s", k, tostring(v))
  end
  table.sort(parts)
  return "{ " .. table_concat(parts, ", ") .. " }"
end

-- nginx started by root runs its worker as nobody, which could not read
-- the tests' files (a journal is mode 0600): keep it root then. Otherwise
-- nginx ignores `user` and the worker is the tests' user anyway.
local function worker_user()
  if capture("id -u"):match("^%s*0%s*$") then return "user root root;" end
  return ""
end

-- Health answers once the Lua handler runs; it names the worker, whose pid
-- the fake's own tests check after stop.
local function healthy(server)
  local code, text = server:_control("GET", "/_fake/health")
  if code ~= 200 then return false end
  -- cjson decodes every number as a float; pids are used in commands
  server.worker_pid = math_floor(cjson.decode(text).pid)
  return true
end

function fake.start(opts)
  opts = opts or {}
  local root = repo_root()
  local fake_dir = safe_path(root .. "/fake", "fake/")
  local fixture = safe_path(absolute(opts.fixture or (fake_dir .. "/runs.json")), "fixture")
  if not read_file(fixture) then error("fixture not readable: " .. fixture, 2) end
  local behaviour = behaviour_lua(opts.behaviour)

  local ok, server = pcall(nginx.start, {
    template = fake_dir .. "/nginx.conf.in",
    vars = {
      FAKEDIR = fake_dir,
      FIXTURE_LUA = str_format("%q", fixture),
      BEHAVIOUR_LUA = behaviour,
      USER = worker_user(),
      TLS = opts.tls and tls_block(opts.tls) or "",
    },
    ports = opts.tls and 2 or 1,
    ready = healthy,
    timeout = WAIT_SECONDS,
    nginx = NGINX,
    name = "fake",
    methods = Server,
  })
  if not ok then error("fake: " .. tostring(server), 2) end

  server.fixture = fixture
  server.port = server.ports[1]
  server.ims_url = server.url
  if opts.tls then
    server.tls_port = server.ports[2]
    server.tls_url = "https://127.0.0.1:" .. server.tls_port
    server.tls_localhost_url = "https://localhost:" .. server.tls_port
  end
  return server
end

return fake
