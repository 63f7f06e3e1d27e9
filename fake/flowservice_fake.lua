-- A fake Adobe Flow Service, run by nginx (LuaJIT, Lua 5.1 syntax) from
-- fake/nginx.conf.in. It answers the way the real service does (see the API
-- sheet, ../shared/FLOWSERVICE_API.md), records every request, and can be
-- told, through /_fake/ control endpoints, to misbehave in the ways a client
-- has to survive: errors, delays, dropped or truncated replies.
--
--   POST /runs/{id}/action?op=re-trigger   a new run (createdClient = x-api-key)
--   GET  /runs/{id}                        {"items": [run]}; FLOW-1101-404
--   GET  /runs                             property= filters (==, >, <, >=, <=),
--        orderby, limit (1..100, default 100), count=true, continuationToken;
--        made-up codes: FLOW-1107-400 filter, FLOW-1108-400 limit,
--        FLOW-1109-400 count with limit, FLOW-1110-400 token (bad, or issued for
--        another query), FLOW-1111-400 orderby or a repeated single parameter
--   POST /ims/token/v3                     IMS client_credentials (no gateway);
--        issued tokens pass the gateway until they expire
--   control: GET /_fake/health, POST /_fake/reset, POST /_fake/scenario,
--        GET|DELETE /_fake/requests, GET /_fake/runs[/{id}],
--        POST /_fake/runs (inject a run), GET|POST /_fake/behaviour,
--        GET /_fake/stats,
--        POST /_fake/ims {"expires_in": n}, POST /_fake/expire_tokens,
--        POST /_fake/chaos, POST /_fake/witness (below)
--   scenario fields for GET /runs: repeat_token (the next link repeats the
--        request's token), link_style "token" (default) or "full" (the next
--        link carries the whole query)
--   scenario field act_then_delay (seconds): do the request (a re-trigger
--        creates its run), then stall before the reply; with status/body/
--        oversize the canned reply follows the real action, with
--        drop = "after" the connection closes instead of any reply. The
--        plain delay stalls before acting (and, without act_then_delay,
--        status/drop/truncate/oversize replace the action).
--   behaviour switches (POST /_fake/behaviour, until reset; reset restores
--        the server's defaults: the built-in ones below, or those given to
--        init, i.e. fake.start{ behaviour = {...} }):
--        linkage (true): a re-trigger's new run gets parentFlowRunId = source
--          id, the source gets the new id appended to childFlowRunIds
--        etag_changes (false): a re-trigger gives the source run a new etag,
--          so a repeat with the old If-Match answers FLOW-1404-412. Off by
--          default because existing client tests compare the source's etag
--          after a re-trigger with the If-Match they sent.
--        eligible_after_retrigger (true): a re-triggered failed run can be
--          re-triggered again (false: FLOW-1387-400 from then on)
--   stats (GET /_fake/stats, since reset): in_flight and max_in_flight
--        (Flow Service requests being handled at once, scenario stalls
--        included), posts and gets (Flow Service requests received),
--        retriggers (runs created by re-trigger), ims (token requests;
--        IMS is not counted in the others), by_source (re-triggers per
--        source run id), chaos (faults dealt since chaos was set or reset:
--        drop_after, status_502, throttle, slow, revoke, get_502), witness
--        (checked, missing, missing_runs [{run, request_id}], at most 50,
--        errors [journals the worker could not read]; since set or reset)
--   chaos (POST /_fake/chaos, until reset; {} turns it off; the answer
--        names the settings, the seed included): faults drawn from a
--        private generator, so the same seed and the same sequence of
--        re-trigger POSTs give the same faults. They hit only re-trigger
--        POSTs the service would accept, and only where no scenario
--        matched; one draw per such POST picks at most one of, in this
--        order (probabilities 0..1, adding up to at most 1):
--          drop_after   create the run, then close without a reply byte
--                       (on a reused connection libcurl resends the POST)
--          status_502   create the run, then answer a gateway 502
--          throttle     do not act: 429 429050 with Retry-After:
--                       retry_after (seconds, 1); the next throttle_burst
--                       (0) such POSTs get 429 too, without a draw
--          slow         create the run, stall slow_seconds (3), then reply
--          revoke       create the run and reply, and expire every IMS
--                       token issued so far (as /_fake/expire_tokens)
--        get_502 (probability): GET /runs and GET /runs/{id} answer 502
--        without doing anything (its own stream: reads do not shift the
--        POST faults). seed: a whole number (default from the clock).
--   witness (POST /_fake/witness {"journals": [absolute path, ...]}, until
--        reset; {} or [] turns it off): as each POST /runs/{id}/action
--        arrives, before anything acts on it, some line of some journal
--        (JSON lines; a missing file has none, lines that do not decode
--        are skipped) must be {"run": id, "state": "pending",
--        "request_id": the request's x-request-id}; else it counts as
--        missing. The journals are written by another process: they are
--        read from where the last read stopped, and from the start again
--        when one shrank or its first bytes changed.
--
-- State lives in module-level tables. That is sound only because the
-- configuration runs a single worker process.

local ngx = ngx
local cjson = require("cjson").new()   -- a private instance: settings stay ours

local debug_traceback = debug.traceback
local io_open = io.open
local ipairs, next, pairs, pcall, xpcall = ipairs, next, pairs, pcall, xpcall
local math_floor, math_random, math_randomseed = math.floor, math.random, math.randomseed
local str_byte, str_char = string.byte, string.char
local str_format, str_rep, str_sub = string.format, string.rep, string.sub
local table_concat, table_remove, table_sort = table.concat, table.remove, table.sort
local tonumber, tostring, type = tonumber, tostring, type

local _M = { _VERSION = "0.1.0" }

-- cjson 2.1.0 (Debian) allows at most 14 significant digits, which is also
-- its default: epoch milliseconds (13 digits) round-trip exactly with it.
cjson.encode_number_precision(14)

local ERROR_TYPE_BASE = "https://ns.adobe.com/aep/errors/"
local IMS_TOKEN_PATH = "/ims/token/v3"
local IMS_DEFAULT_EXPIRES_IN = 86399   -- seconds, as IMS answers

local state = {
  fixture_path = nil,
  fixture_text = nil,
  credentials = nil,   -- { access_tokens = set, api_keys = set, orgs = set, sandboxes = set }
  flows = nil,         -- id -> flow
  runs = nil,          -- array of run objects, fixture order, new runs appended
  scenarios = {},      -- FIFO queue
  requests = {},       -- request log, oldest first
  next_scenario_id = 1,
  ims_clients = nil,   -- client_id -> client_secret
  ims_tokens = {},     -- access token -> { expires = ngx.now() deadline, client_id, scope }
  ims_expires_in = IMS_DEFAULT_EXPIRES_IN,
  behaviour = nil,     -- see DEFAULT_BEHAVIOUR; set by reset()
  retriggered = {},    -- id -> how many times re-triggered since reset
  chaos = nil,         -- chaos settings and generators; nil: off (POST /_fake/chaos)
  chaos_counts = nil,  -- faults dealt since chaos was set or reset
  witness = nil,       -- { journals = paths, caches = path -> cache }; nil: off
  witness_stats = nil, -- { checked, missing, missing_runs, errors }
  -- In-flight accounting. in_flight is never reset: handlers still running
  -- across a reset decrement it when they finish.
  in_flight = 0,
  stats = { max_in_flight = 0, posts = 0, gets = 0, retriggers = 0, ims = 0 },
}

-- The built-in defaults; every switch is listed here.
local DEFAULT_BEHAVIOUR = {
  linkage = true,
  etag_changes = false,
  eligible_after_retrigger = true,
}
local server_defaults = DEFAULT_BEHAVIOUR   -- init may override some

local function default_behaviour()
  local b = {}
  for k, v in pairs(server_defaults) do b[k] = v end
  return b
end
state.behaviour = default_behaviour()

-- What GET /_fake/stats reports of chaos and of the witness, from zero.
local function chaos_zero_counts()
  return { drop_after = 0, status_502 = 0, throttle = 0, slow = 0, revoke = 0, get_502 = 0 }
end
local function witness_zero_stats()
  return { checked = 0, missing = 0, missing_runs = {}, errors = {} }
end
state.chaos_counts = chaos_zero_counts()
state.witness_stats = witness_zero_stats()

---------------------------------------------------------------------------
-- small helpers

local seeded = false
local function random_hex(template)
  if not seeded then
    -- Seed in the worker, not in init_by_lua (the master), so ids differ
    -- between fake servers started in the same second.
    math_randomseed(math_floor(ngx.now() * 1000) + ngx.worker.pid())
    seeded = true
  end
  return (template:gsub("[xy]", function(c)
    local v = (c == "x") and math_random(0, 15) or math_random(8, 11)
    return str_format("%x", v)
  end))
end

local function uuid4()
  return random_hex("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx")
end

local function new_etag()
  -- Cosmos DB style, as Adobe returns them, with the literal quotes.
  return '"' .. random_hex("xxxxxxxx-0000-0200-0000-xxxxxxxxxxxx") .. '"'
end

local function now_ms()
  ngx.update_time()
  return math_floor(ngx.now() * 1000)
end

local function encode(value)
  -- cjson escapes "/" as "\/"; Adobe does not, and readable bodies help when
  -- a test fails. A literal "/" is always escaped, so after an escaped
  -- backslash ("\\") no raw "/" can follow and the substitution is exact.
  return (cjson.encode(value):gsub("\\/", "/"))
end

-- cjson 2.1.0 has no empty-array marker: an empty Lua table encodes as {}.
local function encode_array(list)
  if #list == 0 then return "[]" end
  return encode(list)
end

-- Percent-escape everything but RFC 3986's unreserved characters, so "+",
-- "/", "=" and "," in a query value always travel escaped.
local function escape_component(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c)
    return str_format("%%%02X", str_byte(c))
  end))
end

-- A query string or form body as an ordered list of { key, value }, decoded
-- the form-urlencoded way: "+" is a space, "%2B" a plus. Parsed by hand
-- rather than with ngx.req.get_uri_args, so the decoding is exactly this.
local function parse_query(text)
  local list = {}
  for part in (text or ""):gmatch("[^&]+") do
    local k, eq, v = part:match("^([^=]*)(=?)(.*)$")
    local function dec(x) return ngx.unescape_uri((x:gsub("%+", " "))) end
    list[#list + 1] = { dec(k), eq == "=" and dec(v) or "" }
  end
  return list
end

-- { key = value } from parse_query's list; a repeated key maps to false
-- (the callers refuse it), except keys in `multi`, which collect an array.
local function query_table(list, multi)
  local t = {}
  for _, kv in ipairs(list) do
    local k, v = kv[1], kv[2]
    if multi and multi[k] then
      t[k] = t[k] or {}
      t[k][#t[k] + 1] = v
    elseif t[k] == nil then
      t[k] = v
    else
      t[k] = false
    end
  end
  return t
end

local function set_of(list)
  local set = {}
  if type(list) == "table" then
    for _, v in ipairs(list) do set[v] = true end
  end
  return set
end

local MAX_INTEGER = 1e14   -- cjson sends 14 significant digits exactly

local function whole(v, min)
  return type(v) == "number" and v == math_floor(v) and v >= min and v < MAX_INTEGER
end

local function read_file(path)
  local f, err = io_open(path, "rb")
  if not f then return nil, err end
  local data = f:read("*a")
  f:close()
  return data
end

---------------------------------------------------------------------------
-- fixture

-- Runs described by a fixture "generated" entry, the same every time:
--   { flowId, count, status, id_prefix (8 hex digits), start (epoch ms of
--     the first createdAt), step_ms, duration_ms, outputRecordCount,
--     error = { code, message } (failed runs), createdClient }
-- Run i (1-based) gets id "<id_prefix>-0000-4000-8000-<i as 12 digits>",
-- createdAt start + (i-1)*step_ms, startedAtUTC createdAt + 1500,
-- completedAtUTC = updatedAt = startedAtUTC + duration_ms (an inProgress
-- run has no completedAtUTC, and updatedAt = startedAtUTC).
local function generate_runs(gen)
  local prefix = gen.id_prefix
  if type(prefix) ~= "string" or not prefix:match("^%x%x%x%x%x%x%x%x$") then
    error("fake: generated runs need an id_prefix of 8 hex digits")
  end
  local count, start, step = tonumber(gen.count), tonumber(gen.start), tonumber(gen.step_ms)
  if not (count and start and step) then
    error("fake: generated runs need count, start and step_ms")
  end
  local duration = tonumber(gen.duration_ms) or 60000
  local status = gen.status or "failed"
  local runs = {}
  for i = 1, count do
    local created = start + (i - 1) * step
    local started = created + 1500
    local completed = started + duration
    local running = type(status) == "string" and status:lower() == "inprogress"
    local summary = { status = status }
    if gen.error then summary.errors = { { code = gen.error.code, message = gen.error.message } } end
    runs[i] = {
      id = str_format("%s-0000-4000-8000-%012d", prefix, i),
      flowId = gen.flowId,
      etag = str_format('"%s-0000-0200-0000-%012d"', prefix, i),
      createdAt = created,
      updatedAt = running and started or completed,
      createdClient = gen.createdClient or "scheduler",
      metrics = {
        statusSummary = summary,
        recordSummary = { outputRecordCount = tonumber(gen.outputRecordCount) or 0 },
        durationSummary = { startedAtUTC = started, completedAtUTC = (not running) and completed or nil },
      },
    }
  end
  return runs
end

local function load_fixture(text)
  local ok, doc = pcall(cjson.decode, text)
  if not ok or type(doc) ~= "table" then
    error("fake: fixture " .. state.fixture_path .. " is not a JSON object: " .. tostring(doc))
  end
  local creds = doc.credentials or {}
  state.credentials = {
    access_tokens = set_of(creds.access_tokens),
    api_keys = set_of(creds.api_keys),
    orgs = set_of(creds.orgs),
    sandboxes = set_of(creds.sandboxes),
  }
  state.ims_clients = {}
  for _, c in ipairs(doc.ims_clients or {}) do state.ims_clients[c.client_id] = c.client_secret end
  state.flows = {}
  for _, flow in ipairs(doc.flows or {}) do state.flows[flow.id] = flow end
  state.runs = doc.runs or {}
  for _, run in ipairs(state.runs) do
    if type(run) == "table" then
      if run.createdClient == nil then run.createdClient = "scheduler" end
      -- cjson would send an empty array back as {}: no children, no key.
      if type(run.childFlowRunIds) == "table" and next(run.childFlowRunIds) == nil then
        run.childFlowRunIds = nil
      end
    end
  end
  for _, gen in ipairs(doc.generated or {}) do
    for _, run in ipairs(generate_runs(gen)) do state.runs[#state.runs + 1] = run end
  end
end

local function find_run(id)
  for _, run in ipairs(state.runs) do
    if run.id == id then return run end
  end
  return nil
end

-- Called from init_by_lua (in the master, before the worker forks), so a bad
-- fixture stops nginx from starting instead of failing the first request.
-- The text is kept: reset decodes it again rather than rereading the file,
-- because the worker runs as another user (nobody, when started as root)
-- and may not be allowed to read it.
-- behaviour (optional): { switch = bool }, this server's defaults for the
-- behaviour switches, restored by every reset.
function _M.init(fixture_path, behaviour)
  if behaviour ~= nil then
    if type(behaviour) ~= "table" then error("fake: behaviour must be a table") end
    local defaults = {}
    for k, v in pairs(DEFAULT_BEHAVIOUR) do defaults[k] = v end
    for k, v in pairs(behaviour) do
      if DEFAULT_BEHAVIOUR[k] == nil then error("fake: unknown behaviour " .. tostring(k)) end
      if type(v) ~= "boolean" then error("fake: behaviour " .. k .. " must be true or false") end
      defaults[k] = v
    end
    server_defaults = defaults
    state.behaviour = default_behaviour()
  end
  local text, err = read_file(fixture_path)
  if not text then error("fake: cannot read fixture: " .. tostring(err)) end
  state.fixture_path = fixture_path
  state.fixture_text = text
  load_fixture(text)
end

local function reset()
  load_fixture(state.fixture_text)
  state.scenarios = {}
  state.requests = {}
  state.ims_tokens = {}
  state.ims_expires_in = IMS_DEFAULT_EXPIRES_IN
  state.behaviour = default_behaviour()
  state.retriggered = {}
  state.stats = { max_in_flight = state.in_flight, posts = 0, gets = 0, retriggers = 0, ims = 0 }
  state.chaos = nil
  state.chaos_counts = chaos_zero_counts()
  state.witness = nil
  state.witness_stats = witness_zero_stats()
end

---------------------------------------------------------------------------
-- replies: { status = n, headers = { name = value }, body = string, json = bool }

local function json_reply(status, value)
  return { status = status, headers = {}, body = encode(value), json = true }
end

local function gateway_error(status, code, message)
  return json_reply(status, { error_code = code, message = message })
end

local function problem(code, status, title, detail, request_id)
  return json_reply(status, {
    type = ERROR_TYPE_BASE .. code,
    title = title,
    status = status,
    report = { ["detailed-message"] = detail, ["request-id"] = request_id },
    errorMessage = title,
    errorDetails = detail,
  })
end

local REASONS = {
  [200] = "OK", [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden",
  [404] = "Not Found", [412] = "Precondition Failed", [429] = "Too Many Requests",
  [500] = "Internal Server Error", [502] = "Bad Gateway", [503] = "Service Unavailable",
  [504] = "Gateway Timeout",
}

local function is_http2()
  return (ngx.req.http_version() or 1) >= 2
end

-- Write a hand-made HTTP/1.1 response on the raw connection. Used where the
-- bytes on the wire must be exact (a short body) or the connection must
-- close after this reply. Taking the raw socket makes nginx drop keepalive.
local function send_raw(status, headers, first, rest, pause, declared_length)
  local sock, err = ngx.req.socket(true)
  if not sock then error("raw request socket: " .. tostring(err)) end
  local body_length = #first + #(rest or "")
  local head = { str_format("HTTP/1.1 %d %s", status, REASONS[status] or "Unknown") }
  for name, value in pairs(headers) do
    head[#head + 1] = name .. ": " .. tostring(value)
  end
  head[#head + 1] = "Content-Length: " .. tostring(declared_length or body_length)
  head[#head + 1] = "Connection: close"
  head[#head + 1] = "\r\n"
  local ok, serr = sock:send(table_concat(head, "\r\n") .. first)
  if not ok then return ngx.log(ngx.INFO, "fake: raw send: ", serr) end
  if rest and rest ~= "" then
    if pause then ngx.sleep(pause) end
    sock:send(rest)
  end
end

-- The one way a reply leaves the fake (besides drops and truncation).
local function deliver(reply, sc, request_id)
  local headers = {}
  if reply.json then headers["Content-Type"] = "application/json" end
  if request_id then headers["x-request-id"] = request_id end
  if sc and sc.retry_after then headers["Retry-After"] = tostring(sc.retry_after) end
  for name, value in pairs(reply.headers or {}) do headers[name] = value end
  if sc and type(sc.headers) == "table" then
    for name, value in pairs(sc.headers) do headers[name] = value end
  end

  local body = reply.body or ""
  local slow = sc and tonumber(sc.slow_body)
  local half = math_floor(#body / 2)

  if sc and sc.close and not is_http2() then
    return send_raw(reply.status, headers, slow and str_sub(body, 1, half) or body,
                    slow and str_sub(body, half + 1) or nil, slow)
  end

  ngx.status = reply.status
  for name, value in pairs(headers) do ngx.header[name] = value end
  -- An explicit length keeps nginx from chunking, also when the body goes
  -- out in two parts.
  ngx.header["Content-Length"] = #body
  if slow and #body > 0 then
    ngx.print(str_sub(body, 1, half))
    ngx.flush(true)
    ngx.sleep(slow)
    ngx.print(str_sub(body, half + 1))
  else
    ngx.print(body)
  end
end

local function send_truncated(request_id)
  local partial = '{"id":"'
  local headers = { ["Content-Type"] = "application/json" }
  if request_id then headers["x-request-id"] = request_id end
  if not is_http2() then
    return send_raw(200, headers, partial, nil, nil, 100)
  end
  -- No raw socket on HTTP/2: promise 100 bytes, send fewer, then reset.
  ngx.status = 200
  for name, value in pairs(headers) do ngx.header[name] = value end
  ngx.header["Content-Length"] = 100
  ngx.print(partial)
  ngx.flush(true)
  return "abort"
end

local function oversize_reply(size)
  local skeleton = '{"id":"x","etag":"\\"y\\"","pad":""}'
  local pad = str_rep("a", size - #skeleton)   -- rep of a negative count is ""
  return {
    status = 200, headers = {}, json = true,
    body = '{"id":"x","etag":"\\"y\\"","pad":"' .. pad .. '"}',
  }
end

-- A scenario's canned reply. 429 and 5xx without a body get the body the
-- real service would send, so a client's error parsing is exercised too.
local function scenario_reply(sc, request_id)
  local status = tonumber(sc.status)
  if sc.body ~= nil then
    return { status = status, headers = {}, body = tostring(sc.body), json = true }
  end
  if status == 429 then
    return gateway_error(429, "429050", "Too many requests")
  elseif status == 500 then
    return problem("FLOW-1102-500", 500, "Internal server error",
                   "An internal error occurred.", request_id)
  elseif status == 503 then
    return problem("FLOW-1103-503", 503, "Service unavailable",
                   "The service is temporarily unavailable. Please retry later.", request_id)
  elseif status == 504 then
    return problem("FLOW-1104-504", 504, "Gateway timeout",
                   "The upstream service did not answer in time.", request_id)
  end
  return { status = status, headers = {}, body = "" }
end

---------------------------------------------------------------------------
-- the Flow Service itself

-- A repeated header arrives as an array; the real gateway would not accept
-- that as a credential either.
local function single(value)
  if type(value) == "string" then return value end
  if value == nil then return nil end
  return false
end

-- A token from POST /ims/token/v3, neither expired nor expired by control.
local function ims_token_valid(token)
  local info = state.ims_tokens[token]
  if not info then return false end
  ngx.update_time()
  return ngx.now() < info.expires
end

local function gateway_check(headers, request_id)
  local creds = state.credentials
  local auth = single(headers["authorization"])
  if auth == nil then
    return gateway_error(403, "403010", "Oauth token is missing.")
  end
  local token = auth and auth:match("^Bearer (.+)$")
  if not token or not (creds.access_tokens[token] or ims_token_valid(token)) then
    return gateway_error(401, "401013", "Oauth token is not valid")
  end
  local key = single(headers["x-api-key"])
  if key == nil then
    return gateway_error(403, "403000", "Api Key is required")
  end
  if not key or not creds.api_keys[key] then
    return gateway_error(403, "403003", "Api Key is invalid")
  end
  local org = single(headers["x-gw-ims-org-id"])
  if org == nil then
    return gateway_error(400, "400003", "Organization ID is required")
  end
  if not org or not creds.orgs[org] then
    return gateway_error(403, "403025", "Profile is not valid")
  end
  local sandbox = single(headers["x-sandbox-name"])
  if sandbox == nil then
    return problem("FLOW-2105-400", 400, "Bad request",
                   "The x-sandbox-name header is required.", request_id)
  end
  if not sandbox or not creds.sandboxes[sandbox] then
    return problem("FLOW-2100-404", 404, "Sandbox not found",
                   "The sandbox " .. tostring(sandbox) .. " was not found.", request_id)
  end
  return nil
end

local function eligible(run)
  local metrics = run.metrics or {}
  local status = ((metrics.statusSummary or {}).status or "")
  local lower = type(status) == "string" and status:lower() or ""
  if lower == "failed" then return true, status end
  local records = (metrics.recordSummary or {}).outputRecordCount
  if lower == "success" and records == 0 then return true, status end
  return false, status
end

-- Whether the service would accept a re-trigger: nil and the run, or the
-- refusal. Chaos decides its fault after this and before acting, so no
-- yield may come between the two.
local function retrigger_check(raw_id, args, headers, request_id)
  local op = args.op
  if op ~= "re-trigger" and op ~= "RE_TRIGGER" then
    return problem("FLOW-1401-400", 400, "Unsupported action",
                   "The action op=" .. tostring(op) .. " is not supported for flow runs.",
                   request_id)
  end
  local id = ngx.unescape_uri(raw_id)
  local run = find_run(id)
  if not run then
    return problem("FLOW-1101-404", 404, "Resource not found",
                   "The flowRunId=" .. id .. " was not found.", request_id)
  end
  local flow = state.flows[run.flowId]
  if not flow then
    return problem("FLOW-1101-404", 404, "Resource not found",
                   "The flowId=" .. tostring(run.flowId) .. " of flowRunId=" .. id
                   .. " was not found.", request_id)
  end
  if not flow.enabled then
    return problem("FLOW-1388-400", 400, "Flow not enabled",
                   "The flowId=" .. flow.id .. " is not enabled; the action re-trigger "
                   .. "is not allowed.", request_id)
  end
  if flow.source ~= "batch" then
    return problem("FLOW-1333-400", 400, "Action not supported",
                   "The action re-trigger is not supported for " .. tostring(flow.source)
                   .. " sources (flowId=" .. flow.id .. ").", request_id)
  end
  local if_match = headers["if-match"]
  if if_match ~= nil and if_match ~= run.etag then
    return problem("FLOW-1404-412", 412, "Precondition failed",
                   "The If-Match value does not match the etag of flowRunId=" .. id .. ".",
                   request_id)
  end
  local ok, status = eligible(run)
  if not ok then
    return problem("FLOW-1387-400", 400, "Invalid state",
                   "The flowRunId=" .. id .. " is in an invalid state " .. tostring(status)
                   .. " for the action re-trigger", request_id)
  end
  local behaviour = state.behaviour
  if state.retriggered[id] and not behaviour.eligible_after_retrigger then
    return problem("FLOW-1387-400", 400, "Invalid state",
                   "The flowRunId=" .. id .. " is in an invalid state for the action "
                   .. "re-trigger: it has already been re-triggered", request_id)
  end
  return nil, run
end

-- A new run; the original keeps its status, and (by the behaviour
-- switches) gets a link to the new run and a new etag.
local function retrigger_act(run, headers)
  local id = run.id
  local behaviour = state.behaviour
  local now = now_ms()
  local new_run = {
    id = uuid4(),
    flowId = run.flowId,
    etag = new_etag(),
    createdAt = now,
    updatedAt = now,
    createdClient = single(headers["x-api-key"]) or nil,
    metrics = {
      statusSummary = { status = "inProgress" },
      recordSummary = { outputRecordCount = 0 },
      durationSummary = { startedAtUTC = now },
    },
  }
  if behaviour.linkage then
    new_run.parentFlowRunId = run.id
    local children = run.childFlowRunIds
    if type(children) ~= "table" then
      children = {}
      run.childFlowRunIds = children
    end
    children[#children + 1] = new_run.id
  end
  if behaviour.etag_changes then run.etag = new_etag() end
  state.retriggered[id] = (state.retriggered[id] or 0) + 1
  state.runs[#state.runs + 1] = new_run
  state.stats.retriggers = state.stats.retriggers + 1
  return json_reply(200, { id = new_run.id, etag = new_run.etag })
end

local function retrigger(raw_id, args, headers, request_id)
  local refused, run = retrigger_check(raw_id, args, headers, request_id)
  if refused then return refused end
  return retrigger_act(run, headers)
end

local function not_found_run(id, request_id)
  return problem("FLOW-1101-404", 404, "Resource not found",
                 "The flowRunId=" .. id .. " was not found.", request_id)
end

-- GET /runs/{id}: a list of one, as the real service answers.
local function get_run(raw_id, request_id)
  local id = ngx.unescape_uri(raw_id)
  local run = find_run(id)
  if not run then return not_found_run(id, request_id) end
  return { status = 200, headers = {}, json = true,
           body = '{"items":' .. encode_array({ run }) .. '}' }
end

---------------------------------------------------------------------------
-- GET /runs: filters, order, pages, count
--
-- Query-parameter problems answer problem documents with codes the fake
-- makes up (the real catalog does not name them):
--   FLOW-1107-400 invalid property filter     FLOW-1108-400 invalid limit
--   FLOW-1109-400 count together with limit   FLOW-1110-400 bad continuationToken
--   FLOW-1111-400 invalid orderby             (also a repeated single parameter)

local DEFAULT_LIMIT, MAX_LIMIT = 100, 100
local TOKEN_MAGIC = "\251\255\191"   -- base64 "+/+/": every token needs escaping

local function valid_path(path)
  if path == "" then return false end
  for segment in (path .. "."):gmatch("([^.]*)%.") do
    if not segment:match("^[%a_][%w_]*$") then return false end
  end
  return true
end

local function field(run, path)
  local v = run
  for segment in path:gmatch("[^.]+") do
    if type(v) ~= "table" then return nil end
    v = v[segment]
  end
  return v
end

local NUMBER = "^%-?%d+%.?%d*$"

-- "path==a,b", "path>N", "path<N", "path>=N", "path<=N" -> filter or nil, why
local function parse_filter(expr)
  local path, op, value = expr:match("^([^=<>]*)([=<>]=?)(.*)$")
  if not path then return nil, "no operator" end
  if not valid_path(path) then return nil, "bad field path" end
  if op == "=" then return nil, "unknown operator =" end
  if op == "==" then
    local values = {}
    for v in (value .. ","):gmatch("([^,]*),") do
      if v == "" then return nil, "empty value" end
      values[#values + 1] = v
    end
    return { path = path, op = op, values = values }
  end
  if not value:match(NUMBER) then return nil, "operator " .. op .. " needs a number" end
  return { path = path, op = op, number = tonumber(value) }
end

local function matches(run, f)
  local v = field(run, f.path)
  if f.op == "==" then
    for _, want in ipairs(f.values) do
      if type(v) == "number" then
        if tonumber(want) == v then return true end
      elseif type(v) == "string" then
        if v:lower() == want:lower() then return true end
      elseif v ~= nil and tostring(v) == want then
        return true
      end
    end
    return false
  end
  if type(v) ~= "number" then return false end
  local n = f.number
  if f.op == ">" then return v > n
  elseif f.op == "<" then return v < n
  elseif f.op == ">=" then return v >= n
  else return v <= n end
end

-- "-createdAt" / "+createdAt" / "createdAt" -> descending?, path
-- A raw "+" in the query decodes to a space: take it as the "+" it was.
local function parse_orderby(value)
  local sign, path = value:match("^([%+%- ]?)(.*)$")
  if not valid_path(path) then return nil end
  return sign == "-", path
end

-- Sort key classes: numbers, then strings, then anything else/missing.
local function sort_runs(runs, descending, path)
  local keyed = {}
  for i, run in ipairs(runs) do
    local v = field(run, path)
    local class = type(v) == "number" and 1 or type(v) == "string" and 2 or 3
    if class == 2 then v = v:lower() elseif class == 3 then v = 0 end
    keyed[i] = { run = run, class = class, key = v, index = i }
  end
  table_sort(keyed, function(a, b)
    if a.class ~= b.class then return a.class < b.class end   -- missing last, either way
    if a.key ~= b.key then
      if descending then return a.key > b.key end
      return a.key < b.key
    end
    if descending then return a.index > b.index end
    return a.index < b.index
  end)
  for i, k in ipairs(keyed) do runs[i] = k.run end
  return runs
end

-- The token: base64 of magic (3 bytes), limit (1), offset (4, big-endian)
-- and the first 8 bytes of md5(query signature): 16 bytes, so the base64
-- always holds "+", "/" and "=".
local function make_token(offset, limit, signature)
  local b = {}
  for shift = 24, 0, -8 do b[#b + 1] = math_floor(offset / 2 ^ shift) % 256 end
  return ngx.encode_base64(TOKEN_MAGIC .. str_char(limit) .. str_char(b[1], b[2], b[3], b[4])
                           .. str_sub(ngx.md5_bin(signature), 1, 8))
end

-- token -> offset, limit, signature bytes; nil when it is not one of ours
local function read_token(token)
  local raw = ngx.decode_base64(token)
  if not raw or #raw ~= 16 or str_sub(raw, 1, 3) ~= TOKEN_MAGIC then return nil end
  local offset = 0
  for i = 5, 8 do offset = offset * 256 + str_byte(raw, i) end
  return offset, str_byte(raw, 4), str_sub(raw, 9, 16)
end

local function list_runs(query_list, request_id, sc)
  local function bad(code, title, detail)
    return problem(code, 400, title, detail, request_id)
  end
  local q = query_table(query_list, { property = true })
  for _, name in ipairs({ "limit", "orderby", "count", "continuationToken" }) do
    if q[name] == false then
      return bad("FLOW-1111-400", "Invalid query parameter",
                 "The query parameter " .. name .. " must not repeat.")
    end
  end

  local filters = {}
  for _, expr in ipairs(q.property or {}) do
    local f, why = parse_filter(expr)
    if not f then
      return bad("FLOW-1107-400", "Invalid property filter",
                 "invalid property filter '" .. expr .. "': " .. why .. ".")
    end
    filters[#filters + 1] = f
  end

  local descending, order_path = true, "createdAt"
  if q.orderby then
    descending, order_path = parse_orderby(q.orderby)
    if descending == nil then
      return bad("FLOW-1111-400", "Invalid orderby",
                 "invalid orderby '" .. q.orderby .. "': expected [+|-]<field path>.")
    end
  end

  local limit
  if q.limit then
    limit = q.limit:match("^%d+$") and tonumber(q.limit)
    if not limit or limit < 1 or limit > MAX_LIMIT then
      return bad("FLOW-1108-400", "Invalid limit",
                 "limit must be an integer from 1 to " .. MAX_LIMIT .. ", not '" .. q.limit .. "'.")
    end
  end

  local selected = {}
  for _, run in ipairs(state.runs) do
    local ok = true
    for _, f in ipairs(filters) do
      if not matches(run, f) then ok = false break end
    end
    if ok then selected[#selected + 1] = run end
  end

  if q.count == "true" then
    if limit then
      return bad("FLOW-1109-400", "Invalid query parameters",
                 "count=true cannot be combined with limit.")
    end
    return json_reply(200, { count = #selected })
  end

  -- What a continuationToken is bound to: the filter set (in any order)
  -- and the order. The limit is not part of it.
  local exprs = {}
  for i, expr in ipairs(q.property or {}) do exprs[i] = expr end
  table_sort(exprs)
  local order = (descending and "-" or "+") .. order_path
  local signature = order .. "\n" .. table_concat(exprs, "\n")

  local offset = 0
  local token = q.continuationToken
  if token then
    local t_offset, t_limit, t_sig = read_token(token)
    if not t_offset then
      return bad("FLOW-1110-400", "Invalid continuationToken",
                 "The continuationToken is not valid.")
    end
    if t_sig ~= str_sub(ngx.md5_bin(signature), 1, 8) then
      return bad("FLOW-1110-400", "continuationToken does not match the query",
                 "continuationToken does not match the query: repeat the property filters "
                 .. "and orderby it was issued for.")
    end
    offset = t_offset
    limit = limit or t_limit
  end
  limit = limit or DEFAULT_LIMIT

  sort_runs(selected, descending, order_path)
  local items = {}
  for i = offset + 1, math.min(offset + limit, #selected) do items[#items + 1] = selected[i] end

  local links = "{}"
  if offset + limit < #selected then
    local next_token = make_token(offset + limit, limit, signature)
    if sc and sc.repeat_token and token then next_token = token end
    local href = "/runs?"
    if sc and sc.link_style == "full" then
      local parts = {}
      for _, expr in ipairs(q.property or {}) do
        parts[#parts + 1] = "property=" .. escape_component(expr)
      end
      parts[#parts + 1] = "orderby=" .. escape_component(order)
      if q.limit then parts[#parts + 1] = "limit=" .. limit end
      href = href .. table_concat(parts, "&") .. "&"
    end
    href = href .. "continuationToken=" .. escape_component(next_token)
    links = encode({ next = { href = href } })
  end
  return { status = 200, headers = {}, json = true,
           body = '{"items":' .. encode_array(items) .. ',"_links":' .. links .. '}' }
end

---------------------------------------------------------------------------
-- IMS: POST /ims/token/v3 (another host in reality; no Flow Service gateway)

local function ims_error(status, err, description)
  return json_reply(status, { error = err, error_description = description })
end

local function b64url(raw)
  return (ngx.encode_base64(raw):gsub("[+/=]", { ["+"] = "-", ["/"] = "_", ["="] = "" }))
end

local function ims_token(rec)
  if rec.method ~= "POST" then
    return ims_error(405, "invalid_request", "method " .. rec.method .. " not allowed")
  end
  local ctype = single(rec.headers["content-type"])
  local media = ctype and ctype:lower():match("^%s*([^;%s]+)%s*;?")
  if media ~= "application/x-www-form-urlencoded" then
    return ims_error(400, "invalid_request",
                     "Content-Type must be application/x-www-form-urlencoded")
  end
  local form = query_table(parse_query(rec.body))
  if form.grant_type ~= "client_credentials" then
    return ims_error(400, "unsupported_grant_type",
                     "unsupported grant_type " .. tostring(form.grant_type or "(none)")
                     .. "; expected client_credentials")
  end
  local client_id, secret = form.client_id, form.client_secret
  if not client_id or not secret or state.ims_clients[client_id] ~= secret then
    return ims_error(401, "invalid_client", "invalid client_id or client_secret parameter")
  end
  local scope = form.scope
  if not scope or not scope:match("%S") then
    return ims_error(400, "invalid_scope", "missing scope parameter")
  end
  ngx.update_time()
  local expires_in = state.ims_expires_in
  -- JWT-shaped like the real ones; opaque to the client all the same.
  local token = "eyJhbGciOiJSUzI1NiIsIng1dSI6ImltcyJ9."
    .. b64url(encode({ client_id = client_id, scope = scope, as = "fake-ims",
                       created_at = now_ms(), expires_in = expires_in * 1000 }))
    .. "." .. b64url(ngx.md5_bin(uuid4()) .. ngx.md5_bin(uuid4()))
  state.ims_tokens[token] = { expires = ngx.now() + expires_in, client_id = client_id,
                              scope = scope }
  return json_reply(200, { access_token = token, token_type = "bearer",
                           expires_in = expires_in })
end

-- Every token issued so far answers 401013 from now on (POST
-- /_fake/expire_tokens, and chaos's revoke fault).
local function expire_ims_tokens()
  local n = 0
  for _, info in pairs(state.ims_tokens) do
    info.expires = 0
    n = n + 1
  end
  return n
end

local function flow_service(rec, request_id, sc)
  if rec.path == IMS_TOKEN_PATH then return ims_token(rec) end
  local denied = gateway_check(rec.headers, request_id)
  if denied then return denied end
  local raw_id = rec.path:match("^/runs/([^/]+)/action$")
  if raw_id and rec.method == "POST" then
    return retrigger(raw_id, rec.args, rec.headers, request_id)
  end
  if rec.method == "GET" then
    if rec.path == "/runs" then
      return list_runs(parse_query(ngx.var.args), request_id, sc)
    end
    raw_id = rec.path:match("^/runs/([^/]+)$")
    if raw_id then return get_run(raw_id, request_id) end
  end
  return json_reply(404, { errorMessage = "Not found: " .. rec.method .. " " .. rec.path })
end

---------------------------------------------------------------------------
-- scenarios and the request log

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

local function read_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local file = ngx.req.get_body_file()   -- only if it outgrew the buffer
  if file then return read_file(file) or "" end
  return ""
end

local function plain_copy(t)
  local copy = {}
  for k, v in pairs(t or {}) do copy[k] = v end
  return copy
end

local function record(method, raw_path, with_body, sc)
  ngx.update_time()
  local ok, raw_header = pcall(ngx.req.raw_header)   -- raises on HTTP/2
  local rec = {
    method = method,
    uri = ngx.var.request_uri,
    path = raw_path,
    -- plain copies: the originals carry a metatable cjson need not see
    args = plain_copy(ngx.req.get_uri_args(0)),
    headers = plain_copy(ngx.req.get_headers(0)),
    raw_header = ok and raw_header or nil,
    body = with_body and read_body() or nil,
    connection = tonumber(ngx.var.connection),
    connection_requests = tonumber(ngx.var.connection_requests),
    http_version = ngx.req.http_version(),
    tls = ngx.var.https == "on",
    time = ngx.now(),
    scenario = sc and sc.id or nil,
  }
  state.requests[#state.requests + 1] = rec
  return rec
end

---------------------------------------------------------------------------
-- chaos: seeded faults on the re-trigger POSTs the service would accept
-- (POST /_fake/chaos), for a fault campaign that must prove exactly-once

-- The POST faults in the order of the draw: one uniform draw per accepted
-- re-trigger POST picks the first kind whose cumulative probability lies
-- above it (or none).
local CHAOS_POST_FAULTS = { "drop_after", "status_502", "throttle", "slow", "revoke" }
local CHAOS_DEFAULTS = { retry_after = 1, throttle_burst = 0, slow_seconds = 3, latency = 0 }

-- A private generator: math.random also makes ids and etags, and would
-- shift the faults whenever a test makes one more run. Park-Miller's
-- minimal standard, x = x * 48271 mod (2^31 - 1): every product stays below
-- 2^47, so LuaJIT's doubles compute it exactly.
local PRNG_MODULUS, PRNG_MULTIPLIER = 2147483647, 48271
local PRNG_WARMUP = 8   -- neighbouring seeds start out as neighbours: stir first

local function new_prng(seed)
  local span = PRNG_MODULUS - 1
  local x = seed % span
  -- % on doubles is a - floor(a / b) * b; for a seed near 2^46 the quotient
  -- may round across an integer, leaving x just outside 0 .. span - 1
  if x < 0 then x = x + span elseif x >= span then x = x - span end
  x = x + 1   -- 1 .. 2^31 - 2: a state of 0 would stay 0
  local function draw()
    x = (x * PRNG_MULTIPLIER) % PRNG_MODULUS
    return (x - 1) / span   -- [0, 1)
  end
  for _ = 1, PRNG_WARMUP do draw() end
  return draw
end

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

-- A gateway's own failure, in the gateway's body shape (the code is made up).
local function bad_gateway()
  return gateway_error(502, "502000", "Bad gateway")
end

-- Chaos for one Flow Service request that no scenario claimed: true and the
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

---------------------------------------------------------------------------
-- control endpoints under /_fake/ (not recorded, no gateway)

local SCENARIO_FIELDS = {
  match = "string", times = "number", delay = "number", status = "number",
  headers = "table", body = "string", retry_after = "any", drop = "string",
  truncate = "boolean", oversize = "number", slow_body = "number", close = "boolean",
  repeat_token = "boolean", link_style = "string", act_then_delay = "number",
}

local function add_scenario(text)
  local ok, sc = pcall(cjson.decode, text or "")
  if not ok or type(sc) ~= "table" then
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

-- POST /_fake/ims { "expires_in": N }: the expires_in (and server-side
-- lifetime, seconds) of tokens issued from now on.
local function ims_settings(text)
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then
    return json_reply(400, { errorMessage = "ims settings must be a JSON object" })
  end
  for k, v in pairs(t) do
    if k ~= "expires_in" then
      return json_reply(400, { errorMessage = "unknown ims setting " .. tostring(k) })
    end
    if type(v) ~= "number" or v < 0 or v ~= math_floor(v) then
      return json_reply(400, { errorMessage = "expires_in must be a whole number of seconds >= 0" })
    end
  end
  if t.expires_in then state.ims_expires_in = t.expires_in end
  return json_reply(200, { ok = true, expires_in = state.ims_expires_in })
end

-- POST /_fake/behaviour { switch = bool, ... }: set switches until reset.
local function set_behaviour(text)
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then
    return json_reply(400, { errorMessage = "behaviour must be a JSON object" })
  end
  for k, v in pairs(t) do
    if DEFAULT_BEHAVIOUR[k] == nil then
      return json_reply(400, { errorMessage = "unknown behaviour " .. tostring(k) })
    end
    if type(v) ~= "boolean" then
      return json_reply(400, { errorMessage = "behaviour " .. k .. " must be true or false" })
    end
  end
  for k, v in pairs(t) do state.behaviour[k] = v end
  return json_reply(200, state.behaviour)
end

local function stats_reply()
  local s = state.stats
  -- by_source: re-triggers per source run, whatever the linkage switch says
  -- (tests count duplicates with it); cjson sends an empty table as {}
  local by_source = state.retriggered
  local reply = json_reply(200, { in_flight = state.in_flight, max_in_flight = s.max_in_flight,
                                  posts = s.posts, gets = s.gets, retriggers = s.retriggers,
                                  ims = s.ims, by_source = by_source, chaos = state.chaos_counts })
  -- The witness's lists go out as arrays even when empty: spliced in by
  -- hand, as cjson 2.1.0 has no empty-array marker.
  local w = state.witness_stats
  local witness = str_format('{"checked":%d,"missing":%d,"missing_runs":%s,"errors":%s}',
                             w.checked, w.missing, encode_array(w.missing_runs),
                             encode_array(w.errors))
  reply.body = str_sub(reply.body, 1, -2) .. ',"witness":' .. witness .. "}"
  return reply
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
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then
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
  state.chaos_counts = chaos_zero_counts()
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

-- POST /_fake/witness {"journals": [absolute path, ...]}: check every
-- re-trigger POST against these journals until reset; {} or no journals
-- turns it off. The worker must be able to read them (it runs as the user
-- that started the fake: see fake/nginx.conf.in).
local function set_witness(text)
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then
    return json_reply(400, { errorMessage = "witness must be a JSON object" })
  end
  local function bad(msg) return json_reply(400, { errorMessage = msg }) end
  for k in pairs(t) do
    if k ~= "journals" then return bad("unknown witness field " .. tostring(k)) end
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
  state.witness_stats = witness_zero_stats()
  if #journals == 0 then
    state.witness = nil
    return { status = 200, headers = {}, json = true, body = '{"journals":[]}' }
  end
  local caches = {}
  for _, path in ipairs(journals) do caches[path] = caches[path] or new_journal_cache() end
  state.witness = { journals = journals, caches = caches }
  return { status = 200, headers = {}, json = true,
           body = '{"journals":' .. encode_array(journals) .. '}' }
end

-- POST /_fake/runs: inject a run, as a scheduled run or another user's
-- re-trigger would appear. Shorthand fields (all but flowId optional):
--   flowId, id (new uuid), status ("success"), createdClient ("scheduler"),
--   createdAt (now, ms), outputRecordCount (0), errors (failed runs' list),
--   updatedAt, parentFlowRunId (the parent, when present, lists the new run
--   in its childFlowRunIds); any other field is kept as given (metrics too,
--   with the shorthands set inside it). The etag is always generated.
local function inject_run(text)
  local ok, t = pcall(cjson.decode, text or "")
  if not ok or type(t) ~= "table" then
    return json_reply(400, { errorMessage = "run must be a JSON object" })
  end
  local function bad(msg) return json_reply(400, { errorMessage = msg }) end
  if type(t.flowId) ~= "string" or t.flowId == "" then return bad("flowId is required") end
  for _, name in ipairs({ "id", "status", "createdClient", "parentFlowRunId" }) do
    if t[name] ~= nil and (type(t[name]) ~= "string" or t[name] == "") then
      return bad(name .. " must be a non-empty string")
    end
  end
  for _, name in ipairs({ "createdAt", "updatedAt" }) do
    if t[name] ~= nil and not whole(t[name], 0) then
      return bad(name .. " must be a whole number of epoch ms")
    end
  end
  if t.outputRecordCount ~= nil and not whole(t.outputRecordCount, 0) then
    return bad("outputRecordCount must be a whole number >= 0")
  end
  if t.metrics ~= nil and type(t.metrics) ~= "table" then return bad("metrics must be an object") end
  if t.errors ~= nil and type(t.errors) ~= "table" then return bad("errors must be an array") end
  if t.etag ~= nil then return bad("etag is generated by the fake") end
  local id = t.id or uuid4()
  if find_run(id) then return json_reply(409, { errorMessage = "run " .. id .. " exists" }) end

  local created = t.createdAt or now_ms()
  local status = t.status or "success"
  local run = {}
  for k, v in pairs(t) do run[k] = v end
  run.status, run.outputRecordCount, run.errors = nil, nil, nil
  run.id = id
  run.etag = new_etag()
  run.createdAt = created
  run.updatedAt = t.updatedAt or created
  run.createdClient = t.createdClient or "scheduler"
  local metrics = run.metrics or {}
  run.metrics = metrics
  metrics.statusSummary = type(metrics.statusSummary) == "table" and metrics.statusSummary or {}
  metrics.statusSummary.status = status
  if t.errors and next(t.errors) ~= nil then metrics.statusSummary.errors = t.errors end
  metrics.recordSummary = type(metrics.recordSummary) == "table" and metrics.recordSummary or {}
  metrics.recordSummary.outputRecordCount = t.outputRecordCount
    or metrics.recordSummary.outputRecordCount or 0
  if type(metrics.durationSummary) ~= "table" then
    metrics.durationSummary = { startedAtUTC = created }
    if status:lower() ~= "inprogress" then metrics.durationSummary.completedAtUTC = run.updatedAt end
  end
  if type(run.childFlowRunIds) == "table" and next(run.childFlowRunIds) == nil then
    run.childFlowRunIds = nil
  end
  if run.parentFlowRunId then
    local parent = find_run(run.parentFlowRunId)
    if parent then
      parent.childFlowRunIds = type(parent.childFlowRunIds) == "table" and parent.childFlowRunIds or {}
      parent.childFlowRunIds[#parent.childFlowRunIds + 1] = id
    end
  end
  state.runs[#state.runs + 1] = run
  return json_reply(200, run)
end

local function control(method, path)
  local reply
  if method == "GET" and path == "/_fake/health" then
    reply = json_reply(200, { ok = true, pid = ngx.worker.pid(), runs = #state.runs })
  elseif method == "POST" and path == "/_fake/reset" then
    reset()
    reply = json_reply(200, { ok = true })
  elseif method == "POST" and path == "/_fake/scenario" then
    reply = add_scenario(read_body())
  elseif method == "POST" and path == "/_fake/ims" then
    reply = ims_settings(read_body())
  elseif method == "POST" and path == "/_fake/expire_tokens" then
    reply = json_reply(200, { ok = true, expired = expire_ims_tokens() })
  elseif method == "GET" and path == "/_fake/requests" then
    reply = { status = 200, headers = {}, body = encode_array(state.requests), json = true }
  elseif method == "DELETE" and path == "/_fake/requests" then
    state.requests = {}
    reply = json_reply(200, { ok = true })
  elseif method == "GET" and path == "/_fake/runs" then
    reply = { status = 200, headers = {}, body = encode_array(state.runs), json = true }
  elseif method == "POST" and path == "/_fake/runs" then
    reply = inject_run(read_body())
  elseif method == "GET" and path == "/_fake/behaviour" then
    reply = json_reply(200, state.behaviour)
  elseif method == "POST" and path == "/_fake/behaviour" then
    reply = set_behaviour(read_body())
  elseif method == "GET" and path == "/_fake/stats" then
    reply = stats_reply()
  elseif method == "POST" and path == "/_fake/chaos" then
    reply = set_chaos(read_body())
  elseif method == "POST" and path == "/_fake/witness" then
    reply = set_witness(read_body())
  elseif method == "GET" and path:match("^/_fake/runs/[^/]+$") then
    local run = find_run(ngx.unescape_uri(path:match("^/_fake/runs/([^/]+)$")))
    reply = run and json_reply(200, run)
                or json_reply(404, { errorMessage = "no such run" })
  else
    reply = json_reply(404, { errorMessage = "Not found: " .. method .. " " .. path })
  end
  return deliver(reply, nil, nil)
end

---------------------------------------------------------------------------
-- entry point

-- Requests the stats count: the Flow Service's own, not control requests
-- and not IMS (counted apart).
local function counted_path(raw_path)
  return str_sub(raw_path, 1, 7) ~= "/_fake/" and raw_path ~= IMS_TOKEN_PATH
end

local function count_request(method, raw_path)
  local s = state.stats
  if raw_path == IMS_TOKEN_PATH then
    s.ims = s.ims + 1
  elseif counted_path(raw_path) then
    if method == "POST" then s.posts = s.posts + 1
    elseif method == "GET" then s.gets = s.gets + 1 end
  end
end

local function dispatch()
  local method = ngx.req.get_method()
  local request_uri = ngx.var.request_uri
  -- Route on the raw path: ngx.var.uri is already unescaped and would turn
  -- an escaped "/" inside a run id into a path separator.
  local raw_path = request_uri:match("^[^?]*")

  if str_sub(raw_path, 1, 7) == "/_fake/" then
    return control(method, raw_path)
  end

  -- As a re-trigger POST arrives, before any scenario stalls or drops it
  -- and before anything acts on it.
  if state.witness and method == "POST" then witness_check(raw_path, ngx.req.get_headers(0)) end

  local sc = take_scenario(method .. " " .. request_uri) or {}
  local delay = tonumber(sc.delay)
  local act_then_delay = tonumber(sc.act_then_delay)

  if sc.drop == "before" then
    record(method, raw_path, false, sc)
    count_request(method, raw_path)
    if delay then ngx.sleep(delay) end
    return "abort"
  end

  local rec = record(method, raw_path, true, sc)
  -- Counted once the request (and its body) is in, and with no yield
  -- before a re-trigger acts: whoever sees the count sees the new run,
  -- unless a delay scenario stalls it first.
  count_request(method, raw_path)
  local request_id = single(rec.headers["x-request-id"]) or nil
  -- nginx's not_modified filter answers its own HTML 412 to any 200 whose
  -- request carries If-Match but whose response has no ETag. The fake does
  -- the If-Match check itself (from rec.headers), so hide it from nginx.
  ngx.req.clear_header("If-Match")
  if delay then ngx.sleep(delay) end

  -- Chaos only where no scenario spoke: a test's explicit scenario wins.
  if state.chaos and not sc.id then
    local handled, result = chaos_apply(rec, request_id)
    if handled then return result end
  end

  if act_then_delay then
    -- Act for real, then stall: the reply may never reach a client that
    -- dies meanwhile. A canned status/body/oversize replaces the reply
    -- only; drop = "after" closes the connection instead of replying.
    local reply = flow_service(rec, request_id or uuid4(), sc)
    ngx.sleep(act_then_delay)
    if sc.drop == "after" then return "abort" end
    if sc.truncate then return send_truncated(request_id) end
    if sc.oversize then
      reply = oversize_reply(math_floor(sc.oversize))
    elseif sc.status then
      reply = scenario_reply(sc, request_id or uuid4())
    end
    return deliver(reply, sc, request_id)
  end

  if sc.drop == "after" then return "abort" end
  if sc.truncate then return send_truncated(request_id) end

  local reply
  if sc.oversize then
    reply = oversize_reply(math_floor(sc.oversize))
  elseif sc.status then
    reply = scenario_reply(sc, request_id or uuid4())
  else
    reply = flow_service(rec, request_id or uuid4(), sc)
  end
  return deliver(reply, sc, request_id)
end

function _M.handle()
  -- In flight from the start of the handler to the end of its reply
  -- (stalls included). One worker, so one Lua state sees every request.
  local counted = counted_path(ngx.var.request_uri:match("^[^?]*"))
  if counted then
    state.in_flight = state.in_flight + 1
    if state.in_flight > state.stats.max_in_flight then
      state.stats.max_in_flight = state.in_flight
    end
  end
  local function done()
    if counted then
      counted = false
      state.in_flight = state.in_flight - 1
    end
  end
  local ok, result = xpcall(dispatch, debug_traceback)
  if not ok then
    ngx.log(ngx.ERR, "fake: handler error: ", result)
    if ngx.headers_sent then
      done()
      return ngx.exit(ngx.ERROR)
    end
    -- A JSON problem document, never nginx's HTML error page.
    local body = encode({
      type = ERROR_TYPE_BASE .. "FLOW-1102-500", title = "Internal server error",
      status = 500,
      report = { ["detailed-message"] = "fake handler error", ["request-id"] = "fake" },
      errorMessage = "Internal server error", errorDetails = tostring(result),
    })
    ngx.status = 500
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Content-Length"] = #body
    ngx.print(body)
    done()
    return ngx.exit(ngx.HTTP_OK)
  end
  done()
  if result == "abort" then
    -- 444: nginx closes the connection without sending anything (more).
    return ngx.exit(444)
  end
end

return _M
