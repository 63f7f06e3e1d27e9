-- flowservice.webhook: Adobe I/O Events "flow run failed" deliveries into
-- flowservice.heal, as an OpenResty content handler.
--
--   init_by_lua:      hook = webhook.new { client = ..., client_id = ..., dict = "...",
--                                          heal = { journal = function(flow_id) ... end } }
--   init_worker_by_lua: hook:resume()     -- schedules a restart found in the journals
--   location /adobe-events { content_by_lua_block { hook:handle() } }
--   location /metrics      { content_by_lua_block { hook:metrics() } }
--
-- A POST is verified before anything else: the raw body against
-- x-adobe-digital-signature-1/-2 (RSA-SHA256, flowservice.verify) with the
-- public keys at https://static.adobeioevents.com + x-adobe-public-key1/2-path
-- (only that host, only a plain /.../....pem path; fetched with a flowservice
-- client, cached in the shared dict up to 24 h), then the payload's
-- recipient_client_id. Anything that fails is 401, no side effect, one log
-- line without the body. A verified event is answered 200 at once: its
-- x-adobe-event-id is claimed in the shared dict (a repeat is acknowledged
-- and dropped, in any worker), and the decision and the re-trigger run in a
-- timer after the answer.
local flowservice = require "flowservice"
local heal = require "flowservice.heal"
local metrics = require "flowservice.metrics"
local verify = require "flowservice.verify"
local args = require "flowservice.args"
local cjson = require("cjson.safe").new()

local ngx = ngx
local format, concat = string.format, table.concat
local ipairs, pairs, setmetatable, tostring, type = ipairs, pairs, setmetatable, tostring, type
local min, max, floor = math.min, math.max, math.floor

local _M = {}

_M.KEY_HOST = "https://static.adobeioevents.com"
_M.FAILURE_EVENTS = { sources_flow_run_failed = true, sources_flow_run_failure = true }

local OPTIONS = {
  client = "table", client_id = "string", dict = "string", heal = "table",
  key_ttl = "number", event_ttl = "number", key_client_opts = "table", key_host_for_tests = "string",
  log = "function", busy_retry = "number",
}

local MAX_KEY_TTL = 86400
local KEY_FAIL_TTL = 30 -- seconds a key path that could not be fetched stays refused
local MAX_PATH = 256

local Hook = {}
Hook.__index = Hook

local function fail(msg) args.fail(1, "webhook.new", msg, 3) end

-- webhook.new(opts) -> hook. Made in init_by_lua (or a worker's first use);
-- it does no I/O.
function _M.new(opts)
  if type(opts) ~= "table" then fail("options table expected, got " .. type(opts)) end
  args.fields(opts, OPTIONS, "option", 1, "webhook.new", 2)
  if not opts.client then fail("option 'client' (a flowservice client) is required") end
  if not opts.client_id or opts.client_id == "" then
    fail("option 'client_id' (the Developer Console client id events are sent to) is required")
  end
  if not opts.dict then fail("option 'dict' (a lua_shared_dict name) is required") end
  if not (ngx and ngx.shared and ngx.shared[opts.dict]) then
    fail("option 'dict': no lua_shared_dict " .. opts.dict)
  end
  if not opts.heal then fail("option 'heal' (flowservice.heal options, journal included) is required") end
  local host = opts.key_host_for_tests or _M.KEY_HOST
  if not host:match("^https://[%w%.%-]+:?%d*$") then
    fail("option 'key_host_for_tests' must be https://host[:port]")
  end
  local ttl = opts.key_ttl or MAX_KEY_TTL
  if not (ttl > 0 and ttl <= MAX_KEY_TTL) then fail("option 'key_ttl' must be 0 < seconds <= 86400") end
  local dict = ngx.shared[opts.dict]
  local self = setmetatable({
    client_id = opts.client_id, dict = dict, key_ttl = ttl, event_ttl = opts.event_ttl or 7 * 86400,
    busy_retry = opts.busy_retry or 2,
    log_fn = opts.log, metrics_store = metrics.new(dict),
  }, Hook)
  local heal_opts = {}
  for k, v in pairs(opts.heal) do heal_opts[k] = v end
  heal_opts.log = heal_opts.log or function(line) self:log(ngx.NOTICE, line) end
  heal_opts.count = function(d) self.metrics_store:count_decision(d) end
  self.healer = heal.new(opts.client, heal_opts)
  -- the keys' client: no identity on the wire (fetch_text), its own transport
  local kopts = { base_url = host, access_token = "unused", api_key = "unused", org_id = "unused",
    timeout = 5, connect_timeout = 3, retry = { attempts = 2, base_delay = 0.1, max_delay = 1 },
    max_body = 65536 }
  for k, v in pairs(opts.key_client_opts or {}) do kopts[k] = v end
  self.keys = flowservice.new(kopts)
  return self
end

function Hook:log(level, line)
  if self.log_fn then return self.log_fn(line) end
  ngx.log(level, line)
end

-- The key path's segments when it is a plain /a/b.pem, else nil.
local function key_segments(path)
  if type(path) ~= "string" or #path > MAX_PATH or path:sub(1, 1) ~= "/" then return nil end
  if not path:match("%.pem$") or path:find("[^%w%-_%./]") then return nil end
  local segments = {}
  for seg in path:gmatch("[^/]+") do
    if seg == "." or seg == ".." then return nil end
    segments[#segments + 1] = seg
  end
  if path:find("//", 1, true) or #segments < 1 then return nil end
  return segments
end
_M.key_segments = key_segments -- for tests

-- The PEM at path: from the shared dict, else fetched (and cached).
function Hook:key(path, segments)
  local cache_key = "key:" .. path
  local pem = self.dict:get(cache_key)
  if pem then return pem end
  -- a path that just failed fails again at once: forged events cannot make
  -- every delivery a fetch
  local failed = self.dict:get("keyfail:" .. path)
  if failed then return nil, failed end
  local body, err = self.keys:fetch_text(segments)
  local why
  if not body then
    why = "cannot fetch public key " .. path .. ": " .. tostring(err)
  elseif not body:find("-----BEGIN PUBLIC KEY-----", 1, true) then
    why = "public key " .. path .. " is not a PEM public key"
  end
  if why then
    self.dict:set("keyfail:" .. path, why, KEY_FAIL_TTL)
    return nil, why
  end
  self.dict:set(cache_key, body, self.key_ttl)
  return body
end

-- nil when verified, else why.
function Hook:verify(body, headers)
  local tried, why = 0, {}
  for i = 1, 2 do
    local sig = headers["x-adobe-digital-signature-" .. i]
    local path = headers["x-adobe-public-key" .. i .. "-path"]
    if type(sig) == "table" or type(path) == "table" then return "a signature header is repeated" end
    if path ~= nil and not key_segments(path) then
      return "public key path " .. i .. " is not a plain /.../....pem path"
    end
  end
  for i = 1, 2 do
    local sig = headers["x-adobe-digital-signature-" .. i]
    local path = headers["x-adobe-public-key" .. i .. "-path"]
    if sig and path then
      tried = tried + 1
      local pem, err = self:key(path, key_segments(path))
      if pem then
        local ok, reason = verify.rsa_sha256(pem, body, sig)
        if ok then return nil end
        why[#why + 1] = format("signature %d: %s", i, reason)
      else
        why[#why + 1] = format("signature %d: %s", i, err)
      end
    end
  end
  if tried == 0 then return "no signature with its public key path" end
  return concat(why, "; ")
end

-- The event's type, or nil (pure: fuzz/webhook.lua drives it).
local function event_code(doc)
  local event = type(doc.event) == "table" and doc.event or {}
  local header = type(event.header) == "table" and event.header or {}
  local adobeio = type(header._adobeio) == "table" and header._adobeio or {}
  if type(adobeio.eventCode) == "string" then return adobeio.eventCode end
  for _, t in ipairs { event, type(event.body) == "table" and event.body or {}, doc } do
    local meta = type(t._eventNotificationMeta) == "table" and t._eventNotificationMeta
    if meta and type(meta.type) == "string" then return meta.type end
  end
  return nil
end

-- The failed run's id: the run is the event's body (or the event itself).
local function run_id_of(doc)
  local event = type(doc.event) == "table" and doc.event or {}
  local run = type(event.body) == "table" and event.body or event
  local id = run.flowRunId or run.id
  if type(id) == "string" and id:match("^[%w%-_%.~]+$") and #id <= 128 then return id end
  return nil
end
_M.event_code, _M.run_id_of = event_code, run_id_of

-- An event id fit for a shared-dict key and a log line, or nil.
local function event_id_of(v)
  if type(v) == "string" and #v <= 128 and v:match("^[%w%-_%.:]+$") then return v end
  return nil
end

local function answer(status, text, content_type)
  ngx.status = status
  ngx.header["Content-Type"] = content_type or "text/plain"
  ngx.print(text)
  return ngx.exit(ngx.HTTP_OK)
end

function Hook:reject(why, event_id)
  self.metrics_store:inc("events_rejected")
  -- never the body, never a header value beyond the event id
  self:log(ngx.WARN, format("webhook: rejected event %s from %s: %s", event_id or "-",
    tostring(ngx.var.remote_addr), why))
  return answer(401, "unauthorized\n")
end

-- The work after the answer: decide, act, and come back when due.
local BUSY_TRIES = 150 -- 5 minutes at the default busy_retry of 2 s

local function work(premature, self, run_id, busy, flow_id)
  if premature then return end -- nginx is stopping: the journal keeps the schedule
  local d
  if flow_id then
    d = self.healer:settle(run_id, flow_id) -- left pending by a dead worker
  else
    d = self.healer:handle(run_id)
  end
  local ok, err = true, nil
  if d.action == "wait" and d.due then
    ok, err = ngx.timer.at(max(0, d.due / 1000 - ngx.now()), work, self, run_id)
  elseif d.action == "busy" then
    -- another job holds the flow's journal: ask again soon, for a while
    busy = (busy or 0) + 1
    if busy <= BUSY_TRIES then
      ok, err = ngx.timer.at(self.busy_retry, work, self, run_id, busy, flow_id)
    else
      ok, err = false, "its journal stayed in use by another job"
    end
  end
  if not ok then
    self:log(ngx.ERR, "webhook: run " .. run_id .. " left for the watch loop or a restart: " .. tostring(err))
  end
end
_M._work = work

-- GET ?challenge=X: X (text/plain, or {"challenge": X} when JSON is asked
-- for). POST: an event, verified, acknowledged, handled after the answer.
function Hook:handle()
  local method = ngx.req.get_method()
  if method == "GET" then
    local challenge = ngx.var.arg_challenge
    if not challenge then return answer(400, "no challenge\n") end
    challenge = ngx.unescape_uri(challenge)
    if #challenge > 256 then return answer(400, "challenge too long\n") end
    local accept = ngx.var.http_accept or ""
    if accept:find("application/json", 1, true) or ngx.var.arg_format == "json" then
      return answer(200, cjson.encode { challenge = challenge }, "application/json")
    end
    return answer(200, challenge, "text/plain")
  elseif method ~= "POST" then
    return answer(405, "method not allowed\n")
  end
  self.metrics_store:inc("events_received")
  local headers = ngx.req.get_headers(64)
  local event_id = event_id_of(headers["x-adobe-event-id"])
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if not body then
    return self:reject(ngx.req.get_body_file() and "body larger than client_body_buffer_size" or "empty body",
      event_id)
  end
  if #body > verify.max_message then return self:reject("body too large", event_id) end
  local why = self:verify(body, headers)
  if why then return self:reject(why, event_id) end
  local doc = cjson.decode(body)
  if type(doc) ~= "table" then return self:reject("signed body is not a JSON object", event_id) end
  local recipient = doc.recipient_client_id or doc.recipientclientid
  if recipient ~= self.client_id then return self:reject("recipient is not this client id", event_id) end
  self.metrics_store:inc("events_verified")
  event_id = event_id or event_id_of(doc.event_id)
  if event_id then
    local fresh, err = self.dict:add("event:" .. event_id, true, self.event_ttl)
    if not fresh and err == "exists" then
      self.metrics_store:inc("events_duplicate")
      self:log(ngx.INFO, "webhook: duplicate event " .. event_id .. " acknowledged and dropped")
      return answer(200, "duplicate\n")
    end
  end
  local code = event_code(doc)
  local run_id = run_id_of(doc)
  if not (code and _M.FAILURE_EVENTS[code]) or not run_id then
    self.metrics_store:inc("events_ignored")
    self:log(ngx.INFO, format("webhook: event %s (%s) acknowledged and ignored", event_id or "-",
      tostring(code)))
    return answer(200, "ignored\n")
  end
  local ok, err = ngx.timer.at(0, work, self, run_id)
  if not ok then
    -- no worker capacity: let Adobe deliver it again (5xx), unclaimed
    if event_id then self.dict:delete("event:" .. event_id) end
    self:log(ngx.ERR, "webhook: cannot start the work for event " .. tostring(event_id) .. ": " .. tostring(err))
    return answer(503, "busy\n")
  end
  self:log(ngx.INFO, format("webhook: event %s: run %s failed, accepted", event_id or "-", run_id))
  return answer(200, "accepted\n")
end

-- /metrics: the counters of every worker, Prometheus text format.
function Hook:metrics()
  return answer(200, self.metrics_store:render(), "text/plain; version=0.0.4")
end

-- After a restart: every schedule the journals hold and that is not done
-- gets its timer again (at its due time, or now when it is past), and a run
-- a dead worker left pending is settled. Call it from init_worker_by_lua;
-- it acts in worker 0 at start, and in any worker the master respawned
-- after a crash (its slot was started before: the dict remembers). Two
-- workers acting on one schedule is safe: the journal decides.
function Hook:resume(flows)
  local id = ngx.worker.id()
  local respawned = not self.dict:add("worker-started:" .. tostring(id), true)
  if id ~= 0 and not respawned then return true end
  return ngx.timer.at(0, function(premature)
    if premature then return end
    local list, err = self.healer:scheduled(flows)
    if not list then
      self:log(ngx.ERR, "webhook: cannot read the schedule: " .. tostring(err))
      return
    end
    for _, s in ipairs(list) do
      local delay = max(0, min(s.due / 1000 - ngx.now(), 86400 * 7))
      self:log(ngx.NOTICE, s.unsettled and format("webhook: settling run %s, left pending", s.run_id)
        or format("webhook: resuming run %s (step %s) in %.0f s", s.run_id, tostring(s.step), floor(delay)))
      ngx.timer.at(delay, work, self, s.run_id, nil, s.unsettled and s.flow_id or nil)
    end
  end)
end

return _M
