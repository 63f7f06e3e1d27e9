-- A fake Adobe Flow Service, run by nginx (LuaJIT, Lua 5.1 syntax) from
-- fake/nginx.conf.in. It answers POST /runs/{id}/action the way the real
-- service does (see the API sheet, ../shared/FLOWSERVICE_API.md), records every request,
-- and can be told, through /_fake/ control endpoints, to misbehave in the
-- ways a client has to survive: errors, delays, dropped or truncated replies.
--
-- State lives in module-level tables. That is sound only because the
-- configuration runs a single worker process.

local ngx = ngx
local cjson = require("cjson").new()   -- a private instance: settings stay ours

local debug_traceback = debug.traceback
local io_open = io.open
local ipairs, pairs, pcall, xpcall = ipairs, pairs, pcall, xpcall
local math_floor, math_random, math_randomseed = math.floor, math.random, math.randomseed
local str_format, str_rep, str_sub = string.format, string.rep, string.sub
local table_concat, table_remove = table.concat, table.remove
local tonumber, tostring, type = tonumber, tostring, type

local _M = { _VERSION = "0.1.0" }

-- cjson 2.1.0 (Debian) allows at most 14 significant digits, which is also
-- its default: epoch milliseconds (13 digits) round-trip exactly with it.
cjson.encode_number_precision(14)

local ERROR_TYPE_BASE = "https://ns.adobe.com/aep/errors/"

local state = {
  fixture_path = nil,
  fixture_text = nil,
  credentials = nil,   -- { access_tokens = set, api_keys = set, orgs = set, sandboxes = set }
  flows = nil,         -- id -> flow
  runs = nil,          -- array of run objects, fixture order, new runs appended
  scenarios = {},      -- FIFO queue
  requests = {},       -- request log, oldest first
  next_scenario_id = 1,
}

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

local function set_of(list)
  local set = {}
  if type(list) == "table" then
    for _, v in ipairs(list) do set[v] = true end
  end
  return set
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
  state.flows = {}
  for _, flow in ipairs(doc.flows or {}) do state.flows[flow.id] = flow end
  state.runs = doc.runs or {}
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
function _M.init(fixture_path)
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

local function gateway_check(headers, request_id)
  local creds = state.credentials
  local auth = single(headers["authorization"])
  if auth == nil then
    return gateway_error(403, "403010", "Oauth token is missing.")
  end
  local token = auth and auth:match("^Bearer (.+)$")
  if not token or not creds.access_tokens[token] then
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

local function retrigger(raw_id, args, headers, request_id)
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

  -- The real service leaves the original run as it is and starts a new one.
  local now = now_ms()
  local new_run = {
    id = uuid4(),
    flowId = run.flowId,
    etag = new_etag(),
    createdAt = now,
    updatedAt = now,
    metrics = {
      statusSummary = { status = "inProgress" },
      recordSummary = { outputRecordCount = 0 },
      durationSummary = { startedAtUTC = now },
    },
  }
  state.runs[#state.runs + 1] = new_run
  return json_reply(200, { id = new_run.id, etag = new_run.etag })
end

local function flow_service(rec, request_id)
  local denied = gateway_check(rec.headers, request_id)
  if denied then return denied end
  local raw_id = rec.path:match("^/runs/([^/]+)/action$")
  if raw_id and rec.method == "POST" then
    return retrigger(raw_id, rec.args, rec.headers, request_id)
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
-- control endpoints under /_fake/ (not recorded, no gateway)

local SCENARIO_FIELDS = {
  match = "string", times = "number", delay = "number", status = "number",
  headers = "table", body = "string", retry_after = "any", drop = "string",
  truncate = "boolean", oversize = "number", slow_body = "number", close = "boolean",
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
  local times = sc.times or 1
  -- times 0 or -1: applies until reset, so no counter
  if times > 0 then sc.remaining = math_floor(times) end
  sc.id = state.next_scenario_id
  state.next_scenario_id = state.next_scenario_id + 1
  state.scenarios[#state.scenarios + 1] = sc
  return json_reply(200, { ok = true, id = sc.id, queued = #state.scenarios })
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
  elseif method == "GET" and path == "/_fake/requests" then
    reply = { status = 200, headers = {}, body = encode_array(state.requests), json = true }
  elseif method == "DELETE" and path == "/_fake/requests" then
    state.requests = {}
    reply = json_reply(200, { ok = true })
  elseif method == "GET" and path == "/_fake/runs" then
    reply = { status = 200, headers = {}, body = encode_array(state.runs), json = true }
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

local function dispatch()
  local method = ngx.req.get_method()
  local request_uri = ngx.var.request_uri
  -- Route on the raw path: ngx.var.uri is already unescaped and would turn
  -- an escaped "/" inside a run id into a path separator.
  local raw_path = request_uri:match("^[^?]*")

  if str_sub(raw_path, 1, 7) == "/_fake/" then
    return control(method, raw_path)
  end

  local sc = take_scenario(method .. " " .. request_uri) or {}
  local delay = tonumber(sc.delay)

  if sc.drop == "before" then
    record(method, raw_path, false, sc)
    if delay then ngx.sleep(delay) end
    return "abort"
  end

  local rec = record(method, raw_path, true, sc)
  local request_id = single(rec.headers["x-request-id"]) or nil
  -- nginx's not_modified filter answers its own HTML 412 to any 200 whose
  -- request carries If-Match but whose response has no ETag. The fake does
  -- the If-Match check itself (from rec.headers), so hide it from nginx.
  ngx.req.clear_header("If-Match")
  if delay then ngx.sleep(delay) end

  if sc.drop == "after" then return "abort" end
  if sc.truncate then return send_truncated(request_id) end

  local reply
  if sc.oversize then
    reply = oversize_reply(math_floor(sc.oversize))
  elseif sc.status then
    reply = scenario_reply(sc, request_id or uuid4())
  else
    reply = flow_service(rec, request_id or uuid4())
  end
  return deliver(reply, sc, request_id)
end

function _M.handle()
  local ok, result = xpcall(dispatch, debug_traceback)
  if not ok then
    ngx.log(ngx.ERR, "fake: handler error: ", result)
    if ngx.headers_sent then return ngx.exit(ngx.ERROR) end
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
    return ngx.exit(ngx.HTTP_OK)
  end
  if result == "abort" then
    -- 444: nginx closes the connection without sending anything (more).
    return ngx.exit(444)
  end
end

return _M
