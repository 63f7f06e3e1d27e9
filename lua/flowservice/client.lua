-- A client: options, credentials and connections kept across calls, with
-- the retry rules of flowservice.retry, IMS tokens and the runs API.
--
-- Secrets (access token, api key, client secret) live in a private table
-- keyed by the client, not in its fields: a table dump shows none.
local core = require "flowservice.core"
local args = require "flowservice.args"
local auth = require "flowservice.auth"
local bulk = require "flowservice.bulk"
local errors = require "flowservice.errors"
local retry = require "flowservice.retry"
local runs = require "flowservice.runs"
local ngxwait = require "flowservice.ngx"
local wire = require "flowservice.wire"

local decode = require("cjson.safe").new().decode
local now = core.now
local run_id_problem = core.run_id_problem
local error, ipairs, next, pairs, pcall, rawget, setmetatable, tostring, type =
  error, ipairs, next, pairs, pcall, rawget, setmetatable, tostring, type
local format, floor, max, min = string.format, math.floor, math.max, math.min

local _M = {}

local Client = {}
Client.__index = Client

local private = setmetatable({}, { __mode = "k" })

-- Options handled here; everything else is the C core's to check.
local LUA_OPTIONS = { credentials = "table", retry = "table", deadline = "number", log = "function",
  wait = "function", transport = "string" }
-- transport = "nginx": re-triggers over nginx's cosockets (flowservice.wire),
-- which have no proxy and verify TLS with nginx's lua_ssl_trusted_certificate.
local TRANSPORTS = { curl = true, nginx = true }
local NOT_WITH_NGINX = { "proxy", "ca_file", "ca_path" }
local RETRY_FIELDS = { attempts = "number", base_delay = "number", max_delay = "number" }
-- What one call may change.
local CALL_OPTIONS = { if_match = "string", request_id = "string", headers = "table",
  timeout = "number", deadline = "number", wait = "function" }

local function check_retry(user, argn, fname, level)
  args.fields(user, RETRY_FIELDS, "option 'retry' field", argn, fname, level + 1)
  local policy = {}
  for k, v in pairs(retry.defaults) do policy[k] = user[k] or v end
  if not (args.is_integer(policy.attempts) and policy.attempts >= 1) then
    args.fail(argn, fname, "option 'retry' field 'attempts' must be a whole number >= 1", level + 1)
  end
  if not (policy.base_delay >= 0 and policy.max_delay >= policy.base_delay) then
    args.fail(argn, fname, "option 'retry' needs 0 <= base_delay <= max_delay", level + 1)
  end
  return policy
end

local function check_credentials(c, argn, fname, level)
  args.fields(c, auth.fields, "option 'credentials' field", argn, fname, level + 1)
  for _, key in ipairs { "client_id", "client_secret", "scopes" } do
    if c[key] == nil or c[key] == "" then
      args.fail(argn, fname, "option 'credentials' field '" .. key .. "' is required", level + 1)
    end
  end
  if c.ims_url ~= nil then
    local ok, why = core.check_url(c.ims_url)
    if not ok then args.fail(argn, fname, "option 'credentials' field 'ims_url' " .. why, level + 1) end
  end
  return c
end

local function check_deadline(d, argn, fname, level)
  if d ~= nil and not (d > 0 and d < math.huge) then
    args.fail(argn, fname, "option 'deadline' must be a positive number of seconds", level + 1)
  end
  return d
end

-- flowservice.new(opts); argn/fname/level say where errors point.
local after_first -- defined below: the client's sender (flowservice.wire) ends plain calls in it
function _M.new(opts, argn, fname, level)
  argn, fname, level = argn or 1, fname or "new", (level or 1) + 1
  if type(opts) ~= "table" then
    args.fail(argn, fname, "table expected, got " .. type(opts), level)
  end
  local core_opts, own = {}, {}
  for k, v in pairs(opts) do
    if LUA_OPTIONS[k] then own[k] = v else core_opts[k] = v end
  end
  args.fields(own, LUA_OPTIONS, "option", argn, fname, level)
  if own.transport ~= nil and not TRANSPORTS[own.transport] then
    args.fail(argn, fname, "option 'transport' must be \"curl\" or \"nginx\"", level)
  end
  if own.transport == "nginx" then
    for _, key in ipairs(NOT_WITH_NGINX) do
      if core_opts[key] ~= nil then
        args.fail(argn, fname, format("option '%s' cannot be used with transport \"nginx\""
          .. " (cosockets have no proxy and trust nginx's lua_ssl_trusted_certificate)", key), level)
      end
    end
  end
  local p = {
    retry = check_retry(own.retry or {}, argn, fname, level),
    deadline = check_deadline(own.deadline, argn, fname, level),
    log = own.log,
    wait = own.wait,
  }
  if own.credentials then
    p.auth = auth.new(check_credentials(own.credentials, argn, fname, level))
    if core_opts.api_key == nil then core_opts.api_key = own.credentials.client_id end
  end
  local ok, handle = pcall(core.new, core_opts, p.auth ~= nil)
  if not ok then args.rethrow(handle, argn, fname, level) end
  p.handle, p.opts = handle, core_opts
  if own.transport == "nginx" then -- its sender
    p.wire = wire.new(handle, function(run_id, run, status, _, date) -- only under LuaJIT
      return after_first(p, run_id, run, status, date, 2)
    end)
  end
  local self = setmetatable({
    base_url = core_opts.base_url or core.defaults.base_url,
    org_id = core_opts.org_id,
    sandbox = core_opts.sandbox or core.defaults.sandbox,
  }, Client)
  -- What Client:retrigger's plain path needs (close() ends it). Outside
  -- nginx, where the global ngx never appears, a call has no default wait
  -- function (waiter_of): that is known once, here.
  p.plain = not (p.auth or p.deadline or p.log or p.wait)
  p.blocking = rawget(_G, "ngx") == nil
  private[self] = p
  return self
end

local function open(self, level)
  local p = private[self]
  if not p or p.closed then error("flowservice: client is closed", level + 1) end
  return p
end

local function secrets(p)
  local list = errors.secrets_of(p.opts)
  local a = p.auth or p.ims_of
  if a then
    for _, s in ipairs(a:secrets()) do list[#list + 1] = s end
  end
  return list
end

-- A call waits by the caller's wait function (an event loop's sleep, e.g.
-- ngx.sleep), or, without one, in C on the client's engine. Without the
-- global ngx (plain Lua) there is no default wait function to ask for.
local function waiter_of(p, call_wait, level)
  local wait = call_wait or p.wait
  if wait or rawget(_G, "ngx") == nil then return wait end
  return ngxwait.default_wait((level or 1) + 1)
end

-- Sleep for seconds (a backoff, a Retry-After); loop: wake-ups may come early.
local function sleep(p, seconds, waiter)
  local wake = now() + seconds
  local left = seconds
  while left > 0 do
    if waiter then waiter(left) else p.handle:wait(left) end
    left = wake - now()
  end
end

-- Between two steps of the engine the waiter gets the time libcurl asks for,
-- within these bounds: its sockets are not the event loop's, so it is polled.
local MIN_WAIT, MAX_WAIT = 0.001, 0.02
-- A waiter that watches the engine's fd is woken by it: this only bounds a
-- sleep libcurl's timer would not end.
local MAX_FD_WAIT = 1

-- Drive the engine without blocking until t is done (also when the waiter
-- closed the client meanwhile: t then ends aborted). Inside nginx the
-- worker's pump drives it and the call sleeps until woken; any other
-- waiter polls.
local function drive(p, t, waiter)
  local handle = p.handle
  local pump = ngxwait.pump(handle, waiter)
  if pump and pump:await(handle, t) then return end
  local fd = ngxwait.fd_aware(waiter) and handle:fd()
  if fd then -- the waiter sleeps until the engine's sockets or timer want a step
    while true do
      local _, timeout = handle:pump()
      if t:done() then return end
      waiter(timeout and min(timeout, MAX_FD_WAIT) or MAX_FD_WAIT, fd)
    end
  end
  while not t:done() do
    handle:step()
    if t:done() then return end
    waiter(min(max(handle:timeout() or MAX_WAIT, MIN_WAIT), MAX_WAIT))
  end
end

local function copy(t, changes)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  for k, v in pairs(changes) do c[k] = v end
  return c
end

local function log_attempt(p, method, path, outcome, attempt, request_id, started)
  if p.log then
    p.log(format("%s %s -> %s (attempt %d, request-id %s, %d ms)", method, path,
      tostring(outcome), attempt, tostring(request_id), floor((now() - started) * 1000 + 0.5)))
  end
end

local function failed(err, attempts, request_ids)
  err.attempts, err.request_ids = attempts, request_ids
  return nil, err
end

-- A token for a call that must end by `ends` (monotonic seconds, or nil).
local ims_request -- defined below: call() asks it for tokens, it asks call() to send

local function fetch_token(p, waiter, ends)
  return p.auth:token(function(form) return ims_request(p, form, waiter, ends) end,
    function(s) sleep(p, s, waiter) end, ends)
end

-- One logical call: attempts until success, a final error or the deadline.
-- send(p, target, opts) makes one attempt and returns result, status,
-- request_id or nil, the core's error table. creates: the call makes a run
-- (see flowservice.retry, which alone decides what may be repeated).
-- path: for log lines only (nil when not logging). lean: a success returns
-- the result alone (its caller drops the attempts' record). failure: the
-- core's error table of a first attempt already made (by Client:retrigger's
-- plain path: no token, no deadline, no log): the call goes on from there.
local function call(p, method, path, creates, opts, deadline, send, target, waiter, lean, failure)
  local policy = p.retry
  local ends = deadline and now() + deadline
  local request_ids, attempt, budget, refreshed, last = nil, 0, 0, false, nil
  if failure then attempt, budget = 1, 1 end
  while true do
    local token, started, status_or_err = nil, nil, failure
    if failure then
      failure = nil
    else
      local attempt_opts = opts
      if p.auth then
        local err
        token, err = fetch_token(p, waiter, ends)
        if not token then return nil, err end -- the IMS call's own attempts and ids
        attempt_opts = copy(attempt_opts, { access_token = token })
      end
      if ends then
        local left = ends - now()
        if left <= 0 then
          last = last or errors.new { kind = "timeout", sent = false,
            message = format("deadline of %g s passed", deadline) }
          return failed(last, attempt, request_ids or {})
        end
        if left < (attempt_opts.timeout or core.defaults.timeout) then
          attempt_opts = copy(attempt_opts, { timeout = left })
        end
      end
      attempt, budget = attempt + 1, budget + 1
      started = p.log and now()
      local result, request_id
      result, status_or_err, request_id = send(p, target, attempt_opts, waiter)
      if result then
        if started then log_attempt(p, method, path, status_or_err, attempt, request_id, started) end
        if lean then return result end
        request_ids = request_ids or {}
        request_ids[#request_ids + 1] = request_id
        return result, { attempts = attempt, request_ids = request_ids }
      end
    end
    local err = errors.from_core(status_or_err, secrets(p))
    request_ids = request_ids or {}
    request_ids[#request_ids + 1] = err.request_id
    log_attempt(p, method, path, err.status or err.kind, attempt, err.request_id, started)
    last = err
    local verdict = retry.verdict(err, creates, token ~= nil and not refreshed)
    if verdict == "refresh" then
      -- the token died early: once per call, and the attempt is free
      p.auth:invalidate(token)
      refreshed, budget = true, budget - 1
    else
      if verdict == "ambiguous" then err.ambiguous = true end
      if verdict ~= "retry" or budget >= policy.attempts then
        return failed(err, attempt, request_ids)
      end
      local delay = err.retry_after or retry.backoff(policy, budget)
      if err.retry_after and err.retry_after > policy.max_delay then
        return failed(err, attempt, request_ids)
      end
      if ends and now() + delay >= ends then return failed(err, attempt, request_ids) end
      sleep(p, delay, waiter)
    end
  end
end

-- An error about a reply that came back fine but does not read right;
-- meta: the attempts of the call that got it.
local function reply_error(meta, kind, message)
  return errors.new { kind = kind, message = message, sent = true, attempts = meta.attempts,
    request_ids = meta.request_ids, request_id = meta.request_ids[#meta.request_ids] }
end

-- The server's clock, from the Date header of its latest reply: the bulk
-- job stamps its journal with it (run times are on that clock, not ours).
-- A retrigger hands the header over raw; it is parsed only when asked for.
-- The same raw header again tells nothing new (the server's clock is read
-- to the second): the first sighting of that second is kept, no clock read.
local function saw_date(p, epoch_seconds, raw)
  if raw and p.clock and p.clock.raw == raw then return end
  if epoch_seconds or raw then p.clock = { seconds = epoch_seconds, raw = raw, at = now() } end
end

local function server_clock(p)
  local c = p.clock
  if not c then return nil end
  if not c.seconds then c.seconds = core.parse_date(c.raw) end
  return c.seconds and c.seconds + (now() - c.at)
end

-- One attempt of each kind, for call(): target is the run id or the shape.
-- A client with transport = "nginx", where cosockets work: over them
-- (flowservice.wire). With a waiter, the same request is submitted and driven
-- from here; without, the C engine blocks until it is done.
-- The client's options as they are go as nil: the core's own copy of them,
-- checked when the client was made, is read once (opts.headers every call).
local function send_retrigger(p, run_id, opts, waiter)
  local run, status, request_id, date
  if opts == p.opts then opts = nil end
  local ngx = p.wire and wire.usable()
  if ngx then
    run, status, request_id, date = wire.retrigger(ngx, p.wire, run_id, opts)
  elseif waiter then
    local t = p.handle:submit_retrigger(run_id, opts)
    drive(p, t, waiter)
    run, status, request_id, date = t:result()
  else
    run, status, request_id, date = p.handle:retrigger(run_id, opts)
  end
  if run then
    if date ~= (p.clock and p.clock.raw) then saw_date(p, nil, date) end
  elseif status.date then
    saw_date(p, status.date)
  end
  return run, status, request_id
end

local function send_request(p, shape, opts, waiter)
  local res, err
  if waiter then
    local t = p.handle:submit(opts, shape)
    drive(p, t, waiter)
    res, err = t:result()
  else
    res, err = p.handle:request(opts, shape)
  end
  local date = (res or err).date
  if date then saw_date(p, date) end
  if res then return res, res.status, res.request_id end
  return nil, err
end

-- A raw request's 2xx body as JSON, or a decode error.
local function json_body(res, meta)
  local doc = decode(res.body)
  if type(doc) ~= "table" then
    local err = reply_error(meta, "decode", "reply is not a JSON object")
    err.status = res.status
    return nil, err
  end
  return doc, meta
end

-- The IMS token request: a safe call, no identity headers, the client's
-- transport, within the asking call's deadline (ends) or the client's.
function ims_request(p, form, waiter, ends)
  local a = p.auth
  local ims_opts = {}
  for _, key in ipairs { "timeout", "connect_timeout", "ca_file", "ca_path", "proxy",
    "insecure", "user_agent", "max_body" } do
    ims_opts[key] = p.opts[key]
  end
  ims_opts.base_url = a.ims_url
  local shape = { method = "POST", path = { "ims", "token", "v3" }, body = form,
    content_type = "application/x-www-form-urlencoded", identity = false }
  local no_auth = { retry = p.retry, log = p.log, handle = p.handle, opts = p.opts, ims_of = a }
  local deadline = p.deadline
  if ends then deadline = max(ends - now(), 0.001) end
  return call(no_auth, "POST", "/ims/token/v3", false, ims_opts, deadline, send_request, shape,
    waiter)
end

-- Per-call options over the client's.
local function call_options(p, overrides, argn, fname, level)
  if overrides == nil then return p.opts, p.deadline end
  if type(overrides) ~= "table" then
    args.fail(argn, fname, "table expected, got " .. type(overrides), level + 1)
  end
  args.fields(overrides, CALL_OPTIONS, "per-call option", argn, fname, level + 1)
  local deadline = check_deadline(overrides.deadline, argn, fname, level + 1) or p.deadline
  if next(overrides) == nil then return p.opts, deadline end
  local o = copy(p.opts, overrides)
  o.deadline, o.wait = nil, nil -- the Lua side's, not the request's
  return o, deadline
end

-- A plain call after its first attempt: run, status and date its results
-- (run false: the core's check of the run id refused it, nothing sent).
-- level: where an error points, the caller of client:retrigger (2 when
-- this is tail-called in its place, as the nginx transport's sender does).
function after_first(p, run_id, run, status, date, level)
  if run == false then
    args.run_id(run_id, 1, "retrigger", level)
    error("flowservice: the run id checks disagree", level) -- not reached: they are one
  end
  if run then
    if date ~= (p.clock and p.clock.raw) then saw_date(p, nil, date) end
    return run
  end
  if status.date then saw_date(p, status.date) end
  local err
  run, err = call(p, "POST", nil, true, p.opts, nil, send_retrigger, run_id,
    waiter_of(p, nil, level), true, status)
  if run then return run end
  return nil, err
end

-- client:retrigger(run_id [, opts]) -> { id, etag } or nil, err
-- A plain call (a client without credentials, deadline, log or wait
-- function, no per-call options, and either the nginx transport where
-- cosockets work or no nginx at all) makes its first attempt here, as
-- send_retrigger would; a failure goes on in call(), from that attempt,
-- exactly as if call() had made it. The core's client:retrigger checks the
-- run id itself and answers false, sending nothing, for one that is not.
function Client:retrigger(run_id, overrides)
  local p = private[self]
  if overrides == nil and p and p.plain then
    local ngx = p.wire and wire.usable()
    if ngx then return wire.plain(ngx, p.wire, run_id) end
    if p.blocking then
      local run, status, _, date = p.handle:retrigger(run_id, nil, true)
      local err -- not a tail call: Lua 5.1 leaves no caller's position to a tail-called frame
      run, err = after_first(p, run_id, run, status, date, 3)
      return run, err
    end
  end
  p = open(self, 2)
  if type(run_id) ~= "string" or run_id_problem(run_id) then -- only then the full check
    args.run_id(run_id, 1, "retrigger", 2)
  end
  local opts, deadline = p.opts, p.deadline
  if overrides ~= nil then opts, deadline = call_options(p, overrides, 2, "retrigger", 2) end
  local waiter = waiter_of(p, overrides and overrides.wait, 2)
  local path = p.log and "/runs/" .. run_id .. "/action?op=" .. (opts.op or core.defaults.op)
  local run, err = call(p, "POST", path, true, opts, deadline, send_retrigger, run_id, waiter, true)
  if run then return run end
  return nil, err
end

local function get_json(p, path_segments, query, log_path, waiter)
  local shape = { method = "GET", path = path_segments, query = query }
  local res, err = call(p, "GET", log_path, false, p.opts, p.deadline, send_request, shape, waiter)
  if not res then return nil, err end
  return json_body(res, err)
end

-- client:get_run(run_id) -> the run (unwrapped from {"items": [run]}) or nil, err
function Client:get_run(run_id)
  local p = open(self, 2)
  args.run_id(run_id, 1, "get_run", 2)
  local doc, meta = get_json(p, { "runs", run_id }, nil, "/runs/" .. run_id, waiter_of(p, nil, 2))
  if not doc then return nil, meta end
  local run = type(doc.items) == "table" and doc.items[1]
  if type(run) ~= "table" then return nil, reply_error(meta, "decode", "reply has no items[1]") end
  return run
end

-- client:fetch_text(path_segments) -> the body of a 2xx GET {base_url}/a/b
-- (segments escaped), sent without the identity headers (no token, key,
-- org or sandbox leaves): for public documents such as the I/O Events
-- public keys. Retried as reads are; nil, err otherwise.
function Client:fetch_text(segments)
  local p = open(self, 2)
  if type(segments) ~= "table" or #segments == 0 then
    args.fail(1, "fetch_text", "a non-empty list of path segments expected", 2)
  end
  local shape = { method = "GET", path = segments, identity = false }
  local res, err = call(p, "GET", p.log and "/" .. table.concat(segments, "/"), false, p.opts,
    p.deadline, send_request, shape, waiter_of(p, nil, 2))
  if not res then return nil, err end
  return res.body
end

-- A listing of runs or flows (what: "runs" | "flows"), page by page:
-- next_item() -> item, or nil at the end, or nil, err when a page fails
-- (no pcall around a wait that may yield).
local function listing(p, what, query, filters)
  local seen, token, items, i, count, finished = {}, nil, {}, 0, 0, false
  local function next_page()
    local page, meta = get_json(p, { what }, runs.page_params(query, filters, token), "/" .. what,
      waiter_of(p, nil, 4))
    if not page then return nil, meta end
    items, i = type(page.items) == "table" and page.items or {}, 0
    local nxt = runs.next_token(page)
    if nxt == false then
      return nil, reply_error(meta, "protocol", "next page link without a continuationToken")
    elseif nxt == nil then
      finished = true
    elseif seen[nxt] then
      return nil, reply_error(meta, "protocol", "the server repeated a continuationToken: paging would loop")
    else
      seen[nxt], token = true, nxt
    end
    return true
  end
  return function()
    if query.max and count >= query.max then return nil end
    while i >= #items do
      if finished then return nil end
      local ok, err = next_page()
      if not ok then return nil, err end
    end
    i, count = i + 1, count + 1
    return items[i]
  end
end

local function each_of(next_item)
  return function()
    local item, err = next_item()
    if err then error(err, 0) end -- as io.lines does
    return item
  end
end

local function all_of(next_item)
  local list = {}
  while true do
    local item, err = next_item()
    if err then return nil, err end
    if item == nil then return list end
    list[#list + 1] = item
  end
end

-- for run in client:each_run(query) do ... end
function Client:each_run(query)
  local p = open(self, 2)
  return each_of(listing(p, "runs", query, runs.filters(query, 1, "each_run", 2)))
end

-- client:list_runs(query) -> array of runs (all pages, up to query.max) or nil, err
function Client:list_runs(query)
  local p = open(self, 2)
  return all_of(listing(p, "runs", query, runs.filters(query, 1, "list_runs", 2)))
end

-- for flow in client:each_flow(query) do ... end
function Client:each_flow(query)
  local p = open(self, 2)
  query = query or {}
  return each_of(listing(p, "flows", query, runs.flow_filters(query, 1, "each_flow", 2)))
end

-- client:list_flows(query) -> array of flows (all pages, up to query.max) or nil, err
function Client:list_flows(query)
  local p = open(self, 2)
  query = query or {}
  return all_of(listing(p, "flows", query, runs.flow_filters(query, 1, "list_flows", 2)))
end

-- client:get_flow(flow_id) -> the flow (unwrapped from {"items": [flow]}) or nil, err
function Client:get_flow(flow_id)
  local p = open(self, 2)
  args.run_id(flow_id, 1, "get_flow", 2)
  local doc, meta = get_json(p, { "flows", flow_id }, nil, "/flows/" .. flow_id, waiter_of(p, nil, 2))
  if not doc then return nil, meta end
  local flow = type(doc.items) == "table" and doc.items[1]
  if type(flow) ~= "table" then return nil, reply_error(meta, "decode", "reply has no items[1]") end
  return flow
end

-- client:count_runs(query) -> number or nil, err
function Client:count_runs(query)
  local p = open(self, 2)
  local filters = runs.filters(query, 1, "count_runs", 2)
  local doc, meta = get_json(p, { "runs" }, runs.count_params(filters), "/runs", waiter_of(p, nil, 2))
  if not doc then return nil, meta end
  if type(doc.count) ~= "number" then return nil, reply_error(meta, "decode", "reply has no count") end
  return math.tointeger and math.tointeger(doc.count) or doc.count
end

-- The one door the bulk job (flowservice.bulk) has into a client: run
-- actions are prepared (built, not yet sent), submitted once their journal
-- line is durable, driven, and read back as results or error objects. What
-- may be repeated is flowservice.retry's to say.
local Batch = {}
Batch.__index = Batch

local function new_batch(p, level)
  local waiter = waiter_of(p, nil, level + 1)
  local pump = ngxwait.pump(p.handle, waiter)
  return setmetatable({ p = p, waiter = waiter, pump = pump, sema = pump and pump:semaphore() },
    Batch)
end

-- The token for the next round, fetched before any of its transfers is
-- prepared (a fetch drives the engine); false when the client has a static
-- token. nil, err when IMS refused or could not be reached.
function Batch:token()
  local p = self.p
  if not p.auth then return false end
  return fetch_token(p, self.waiter, p.deadline and now() + p.deadline)
end

-- Whether a 401 401013 on token can be cured with a new one; forgets it.
function Batch:refresh(token)
  local p = self.p
  if not (p.auth and token) then return false end
  p.auth:invalidate(token)
  return true
end

-- A re-trigger of run_id, built but not sent: nothing that drives the
-- engine sends it until submit(t).
function Batch:prepare(run_id, if_match, token)
  local p = self.p
  local opts = copy(p.opts, { if_match = if_match })
  if token then opts.access_token = token end
  return p.handle:prepare_retrigger(run_id, opts)
end

function Batch:submit(t)
  local ok = t:submit()
  if ok and self.pump then self.pump:watch(t, self.sema) end
  return ok
end

-- A read of run_id, submitted at once (reads may leave any time).
function Batch:read_run(run_id, token)
  local p = self.p
  local opts = token and copy(p.opts, { access_token = token }) or p.opts
  local t = p.handle:submit(opts, { method = "GET", path = { "runs", run_id } })
  if self.pump then self.pump:watch(t, self.sema) end
  return t
end

-- A finished read -> the run, or nil, err.
function Batch:read_result(t)
  local res, err = t:result()
  if not res then return nil, errors.from_core(err, secrets(self.p)) end
  local doc = decode(res.body)
  local run = type(doc) == "table" and type(doc.items) == "table" and doc.items[1]
  if type(run) ~= "table" then return nil, errors.new { kind = "decode", message = "reply has no items[1]" } end
  return run
end

-- Drive every submitted transfer once, without blocking (inside nginx the
-- worker's pump does, shared with every other call of the client).
function Batch:step()
  local handle = self.p.handle
  if self.pump and self.pump:ensure(handle) then return end
  handle:step()
end

-- Wait for network activity, at most seconds (the waiter's way in nginx):
-- with the pump, until one of the batch's transfers finishes.
function Batch:pause(seconds)
  local handle = self.p.handle
  if self.pump and self.pump:ensure(handle) then
    local ok, err = self.sema:wait(seconds)
    if ok or err == "timeout" then return end
  end
  local fd = self.waiter and ngxwait.fd_aware(self.waiter) and handle:fd()
  if fd then
    local _, timeout = handle:pump()
    self.waiter(min(timeout or seconds, seconds), fd)
    return
  end
  local wait = min(handle:timeout() or seconds, seconds)
  if self.waiter then
    self.waiter(min(max(wait, MIN_WAIT), MAX_WAIT))
  else
    handle:wait(max(wait, MIN_WAIT))
  end
end

function Batch:sleep(seconds)
  sleep(self.p, seconds, self.waiter)
end

-- A finished transfer of run_id -> run, request_id or nil, err (an error
-- object, secrets redacted). Logs the attempt and keeps the server's clock.
function Batch:answer(t, run_id, attempt, started)
  local p = self.p
  local run, status_or_err, request_id, date = t:result()
  local err
  if run then
    if date then saw_date(p, nil, date) end
  else
    err = errors.from_core(status_or_err, secrets(p))
    if err.date then saw_date(p, err.date) end
  end
  if p.log then
    log_attempt(p, "POST", "/runs/" .. run_id .. "/action?op=" .. (p.opts.op or core.defaults.op),
      run and status_or_err or err.status or err.kind, attempt, request_id or err.request_id, started)
  end
  if run then return run, request_id end
  return nil, err
end

-- The server's clock (epoch seconds) by its latest Date header, or nil.
function Batch:server_time()
  return server_clock(self.p)
end

function Batch:client_id()
  return self.p.opts.api_key
end

-- What a journal backend needs of the client: whose runs (org, sandbox),
-- how to wait without blocking (the same wait function as the engine's),
-- and how long one request may take (timeout + connect_timeout, seconds:
-- a claim's lease must outlive a request that starts under it).
local function journal_options(p, waiter)
  return { org = p.opts.org_id, sandbox = p.opts.sandbox or core.defaults.sandbox, wait = waiter,
    request_time = (p.opts.timeout or core.defaults.timeout)
      + (p.opts.connect_timeout or core.defaults.connect_timeout) }
end

function Batch:journal_options()
  return journal_options(self.p, self.waiter)
end

function Batch:retry_policy()
  return self.p.retry
end

Batch.exiting = ngxwait.exiting

-- client:retry_failed(spec) -> report or nil, err (see flowservice.bulk)
function Client:retry_failed(spec)
  local p = open(self, 2)
  -- not a tail call: bulk's argument errors count this frame to reach the caller
  local report, err = bulk.run(self, new_batch(p, 2), spec)
  return report, err
end

-- client:journal_options() -> { org, sandbox, wait, request_time }: what
-- flowservice.journal.open/read take to hold this client's runs (for
-- flowservice.heal, which reads and writes its schedule there).
function Client:journal_options()
  local p = open(self, 2)
  return journal_options(p, waiter_of(p, nil, 2))
end

-- For an event loop of one's own: the fd that turns readable when the engine
-- has work (nil without epoll), and one step -> transfers running, seconds
-- until libcurl's next timer (nil: none).
function Client:fd()
  return open(self, 2).handle:fd()
end

function Client:pump()
  return open(self, 2).handle:pump()
end

-- How many transfers the client's engine holds (0 between calls); for tests.
function Client:_in_flight()
  return open(self, 2).handle:in_flight()
end

-- The server's clock as the client last read it (epoch seconds), or nil; for tests.
function Client:_server_time()
  return server_clock(open(self, 2))
end

-- This worker's pump of the client's engine inside nginx, or nil; for tests.
function Client:_pump()
  local ngx = rawget(_G, "ngx")
  return ngx and ngxwait.pump(open(self, 2).handle, ngx.sleep)
end

function Client:close()
  local p = private[self]
  if p and not p.closed then
    p.closed, p.plain = true, false
    p.handle:close()
  end
end

Client.__close = Client.close
Client.__gc = Client.close

function Client:__tostring()
  return format("flowservice.client(%s, org %s, sandbox %s%s)", self.base_url,
    tostring(self.org_id), self.sandbox, (private[self] or {}).closed and ", closed" or "")
end

return _M
