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
--   GET  /flows/{id}                       {"items": [flow]}; FLOW-1101-404 for an
--        unknown id, as for runs
--   GET  /flows                            the same listing rules as GET /runs
--        (property= filters on flow fields: state==enabled, name, flowSpec.id,
--        ...; orderby, default -createdAt; limit; count=true;
--        continuationToken, bound to /flows)
--   POST /ims/token/v3                     IMS client_credentials (no gateway);
--        issued tokens pass the gateway until they expire
--   control: GET /_fake/health, POST /_fake/reset, POST /_fake/scenario,
--        GET|DELETE /_fake/requests, GET /_fake/runs[/{id}],
--        POST /_fake/runs (inject a run), GET|POST /_fake/behaviour,
--        GET /_fake/stats,
--        POST /_fake/ims {"expires_in": n}, POST /_fake/expire_tokens,
--        POST /_fake/chaos, POST /_fake/witness (below)
--        POST /_fake/outcomes, POST /_fake/sandbox (fake/fake/control.lua)
--        POST|GET /_fake/keys: public keys served at their paths, as
--        static.adobeioevents.com does for I/O Events (fake/fake/keys.lua)
--        POST /_fake/signing, POST /_fake/emit, GET /_fake/deliveries,
--        POST /_fake/webhook: Adobe I/O Events' deliveries of Flow Run
--        Failed events, signed, retried, recorded (fake/fake/emitter.lua)
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
--        executing ({ [flow id] = re-triggered runs not finished yet },
--        flows with none left out) and max_executing ({ [flow id] = the
--        most at once since reset; checked on every re-trigger and read })
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
-- The code, one concern a file, under fake/fake/ (require "fake.<name>"):
--   state.lua      every piece of module-level state, and what reset clears
--   util.lua       JSON, ids, clocks, query strings, the seeded generator
--   reply.lua      reply shapes and how they leave (raw, truncated, oversize)
--   store.lua      runs and flows: fixture, lookups, outcomes, the sandbox
--   query.lua      filters, order, pages and counts for /runs and /flows
--   ims.lua        POST /ims/token/v3 and the tokens it issued
--   api.lua        the gateway, re-trigger, GET /runs[/{id}], GET /flows[/{id}]
--   scenarios.lua  scenarios, chaos, the journal witness
--   control.lua    the /_fake/ control API
--   keys.lua       the I/O Events public keys, served at their paths
--   emitter.lua    I/O Events deliveries: events built, signed, POSTed, retried
-- This file: init (from init_by_lua), the request log, and the dispatch
-- that lets scenarios, chaos and the witness in before the API.
--
-- State lives in module-level tables (fake/fake/state.lua). That is sound
-- only because the configuration runs a single worker process.

local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")
local reply_m = require("fake.reply")
local store = require("fake.store")
local ims = require("fake.ims")
local api = require("fake.api")
local scenarios = require("fake.scenarios")
local control = require("fake.control")
local keys = require("fake.keys")

local debug_traceback = debug.traceback
local error, pairs, pcall, tonumber, tostring, type, xpcall =
      error, pairs, pcall, tonumber, tostring, type, xpcall
local math_floor = math.floor
local str_sub = string.sub
local encode, single, uuid4, plain_copy = util.encode, util.single, util.uuid4, util.plain_copy
local deliver = reply_m.deliver
local IMS_TOKEN_PATH = ims.TOKEN_PATH

local _M = { _VERSION = "0.2.0" }

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
    for k, v in pairs(state.DEFAULT_BEHAVIOUR) do defaults[k] = v end
    for k, v in pairs(behaviour) do
      if state.DEFAULT_BEHAVIOUR[k] == nil then error("fake: unknown behaviour " .. tostring(k)) end
      if type(v) ~= "boolean" then error("fake: behaviour " .. k .. " must be true or false") end
      defaults[k] = v
    end
    state.server_defaults = defaults
    state.behaviour = state.default_behaviour()
  end
  local text, err = util.read_file(fixture_path)
  if not text then error("fake: cannot read fixture: " .. tostring(err)) end
  store.load(fixture_path, text)
end

---------------------------------------------------------------------------
-- the request log

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
    body = with_body and util.read_body() or nil,
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
    return control.handle(method, raw_path)
  end
  -- the I/O Events public keys (static.adobeioevents.com's part): no gateway
  local key = keys.serve(method, raw_path)
  if key then return reply_m.deliver(key, nil, nil) end

  -- As a re-trigger POST arrives, before any scenario stalls or drops it
  -- and before anything acts on it.
  if state.witness and method == "POST" then scenarios.witness_check(raw_path, ngx.req.get_headers(0)) end

  local sc = scenarios.take_scenario(method .. " " .. request_uri) or {}
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
    local handled, result = scenarios.chaos_apply(rec, request_id)
    if handled then return result end
  end

  if act_then_delay then
    -- Act for real, then stall: the reply may never reach a client that
    -- dies meanwhile. A canned status/body/oversize replaces the reply
    -- only; drop = "after" closes the connection instead of replying.
    local reply = api.handle(rec, request_id or uuid4(), sc)
    ngx.sleep(act_then_delay)
    if sc.drop == "after" then return "abort" end
    if sc.truncate then return reply_m.send_truncated(request_id) end
    if sc.oversize then
      reply = reply_m.oversize_reply(math_floor(sc.oversize))
    elseif sc.status then
      reply = reply_m.scenario_reply(sc, request_id or uuid4())
    end
    return deliver(reply, sc, request_id)
  end

  if sc.drop == "after" then return "abort" end
  if sc.truncate then return reply_m.send_truncated(request_id) end

  local reply
  if sc.oversize then
    reply = reply_m.oversize_reply(math_floor(sc.oversize))
  elseif sc.status then
    reply = reply_m.scenario_reply(sc, request_id or uuid4())
  else
    reply = api.handle(rec, request_id or uuid4(), sc)
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
      type = reply_m.ERROR_TYPE_BASE .. "FLOW-1102-500", title = "Internal server error",
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
