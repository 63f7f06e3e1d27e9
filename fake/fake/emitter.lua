-- Adobe I/O Events' part: "Experience Platform Source's Flow Run Failed"
-- events for runs of the store, signed and POSTed to a webhook the way Adobe
-- delivers them.
--
--   POST /_fake/signing {"key1": {"path": "/prod/keys/k1.pem", "private_key":
--        "/abs/k1.key"}, "key2": {...}}   the private keys the suite made with
--        the openssl CLI, and the public key paths the headers name (the
--        fake serves those keys with POST /_fake/keys). Kept across reset, as
--        the keys are. Signing is the openssl CLI's (openssl dgst -sha256
--        -sign), base64 by ngx.encode_base64.
--   POST /_fake/emit {"url": u | "urls": [u, ...], "events": [event, ...],
--        "recipient": client id, "concurrency": 50, "timeout": 10,
--        "retry_intervals": [1, 2, 4, 8, 16]}   an event is {"run": id (a run
--        of the store), "event_id" (default a new uuid), "recipient",
--        "code" (sources_flow_run_failed), "meta" (true: the
--        _eventNotificationMeta shape), "headers" {name: value, or false to
--        leave it out} (tampering), "bad_signature" (true: both signatures
--        over another body)}. Every event is built and recorded at once (the
--        answer: {"deliveries": [id, ...]}, one per event and url, in order),
--        then signed in a timer and delivered by `concurrency` timers, in
--        order.
--   GET  /_fake/deliveries  every delivery since reset: {id, event_id, run,
--        url, done, outcome ("delivered": 2xx; "refused": any other answer
--        that is not retried; "gave up": after the last retry; "not sent":
--        signing failed, see error), status (the last attempt's, 0: no
--        answer), latency (s, the last attempt's), attempts [{status,
--        latency, body (first 200 bytes), headers {lowercase: value},
--        error}]}
--   POST /_fake/webhook {"url", "recipient", "timeout", "retry_intervals"}
--        until reset ({} turns it off): whenever a run made by re-trigger
--        finishes failed (POST /_fake/outcomes), the fake emits its
--        failure event there on its own (a delivery like the others).
--
-- Delivery as Adobe does it: POST with Content-Type application/json, the
-- x-adobe-* headers, an answer awaited `timeout` seconds; 5xx, 429 or no
-- answer in time is retried after retry_intervals[n] seconds (Adobe's own
-- schedule spans a day; tests pass short ones), every other answer ends it.
-- Plain http:// URLs only (the suite's webhooks listen on loopback).
local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")
local reply_m = require("fake.reply")
local store = require("fake.store")

local io_open, ipairs, next, os_execute, pairs, tonumber, tostring, type =
      io.open, ipairs, next, os.execute, pairs, tonumber, tostring, type
local str_format, str_sub, table_concat = string.format, string.sub, table.concat
local cjson, encode, encode_array, uuid4 = util.cjson, util.encode, util.encode_array, util.uuid4
local json_reply = reply_m.json_reply

local _M = {}

local DEFAULT_TIMEOUT = 10
local DEFAULT_INTERVALS = { 1, 2, 4, 8, 16 }
local DEFAULT_CONCURRENCY = 50
local EVENT_CODE = "sources_flow_run_failed"
local META_TYPE = "sources_flow_run_failure"

-- The signing keys live as long as the server, as keys.lua's public keys do.
local signing = nil   -- { {path = header path, private_key = file}, {...} }
local batch = 0

local function bad(msg) return json_reply(400, { errorMessage = msg }) end

local function plain_file(path)
  return type(path) == "string" and path:sub(1, 1) == "/" and not path:find("[^%w/%._%-]")
end

function _M.set_signing(text)
  local t = util.decode_object(text)
  if not t then return bad('expected {"key1": {path, private_key}, "key2": {...}}') end
  local list = {}
  for i, name in ipairs { "key1", "key2" } do
    local k = t[name]
    if type(k) ~= "table" or type(k.path) ~= "string" or k.path:sub(1, 1) ~= "/" then
      return bad(name .. ".path must be the absolute key path the header names")
    end
    if not plain_file(k.private_key) then
      return bad(name .. ".private_key must be an absolute path of letters, digits, /._-")
    end
    local f = io_open(k.private_key, "rb")
    if not f then return bad(name .. ".private_key is not readable") end
    f:close()
    list[i] = { path = k.path, private_key = k.private_key }
  end
  signing = list
  return json_reply(200, { ok = true })
end

---------------------------------------------------------------------------
-- events

-- The event Adobe sends for a failed run: the run as the service holds it,
-- under event.body with the I/O Events header, or (meta) flat with
-- _eventNotificationMeta, as Platform notifications send it.
local function payload(run, o)
  local body = cjson.decode(encode(run))   -- a copy: the store's run stays as it is
  body.sandboxName = body.sandboxName or "prod"
  local event
  if o.meta then
    event = body
    event._eventNotificationMeta = { type = o.code or META_TYPE }
  else
    event = { header = { _adobeio = { imsOrgId = "FAKEORG@AdobeOrg",
      providerMetadata = "platform_notifications", eventCode = o.code or EVENT_CODE } },
      body = body }
  end
  return encode { event_id = o.event_id, event = event, recipient_client_id = o.recipient }
end

-- Both signatures of each text: openssl dgst per text and key, by one shell
-- per chunk of texts; the worker blocks while a chunk signs and serves
-- other requests between chunks (the deliveries start after the last).
local CHUNK = 20

local function sign_chunk(dir, first, last)
  local script = str_format("cd '%s' && i=%d; while [ $i -le %d ]; do "
    .. "openssl dgst -sha256 -sign '%s' -out $i.s1 $i.body && "
    .. "openssl dgst -sha256 -sign '%s' -out $i.s2 $i.body || exit 1; i=$((i+1)); done",
    dir, first, last, signing[1].private_key, signing[2].private_key)
  local status = os_execute(script .. " >/dev/null 2>&1")
  return status == 0 or status == true
end

local function sign_all(texts)
  batch = batch + 1
  local dir = str_format("%semit-%d-%d", ngx.config.prefix(), ngx.worker.pid(), batch)
  os_execute("mkdir -p '" .. dir .. "'")
  for i, text in ipairs(texts) do
    local f = io_open(str_format("%s/%d.body", dir, i), "wb")
    if not f then
      os_execute("rm -rf '" .. dir .. "'")
      return nil, "cannot write in " .. dir
    end
    f:write(text)
    f:close()
  end
  local sigs, err = {}, nil
  for first = 1, #texts, CHUNK do
    if first > 1 then ngx.sleep(0) end
    if not sign_chunk(dir, first, math.min(first + CHUNK - 1, #texts)) then
      err = "openssl dgst failed"
      break
    end
  end
  for i = 1, #texts do
    if err then break end
    local s1, s2 = util.read_file(str_format("%s/%d.s1", dir, i)), util.read_file(str_format("%s/%d.s2", dir, i))
    if not s1 or s1 == "" or not s2 or s2 == "" then err = "openssl dgst wrote no signature" break end
    sigs[i] = { ngx.encode_base64(s1), ngx.encode_base64(s2) }
  end
  os_execute("rm -rf '" .. dir .. "'")
  if err then return nil, err end
  return sigs
end

-- The deliveries of events to urls, recorded at once (not done yet), and
-- the texts to sign: { jobs = { {url, body, event, record} }, events, signed }.
-- events: { {run = run table, event_id, recipient, code, meta, headers, bad_signature} }
local function build(events, urls)
  local plan = { jobs = {}, events = events, signed = {} }
  for i, e in ipairs(events) do
    e.event_id = e.event_id or uuid4()
    e.body = payload(e.run, e)
    -- a bad signature: made over a body that is not the one sent
    plan.signed[i] = e.bad_signature and (e.body .. " ") or e.body
    for _, url in ipairs(urls) do
      local record = { id = #state.deliveries + 1, event_id = e.event_id, run = e.run.id,
                       url = url, done = false, attempts = {} }
      state.deliveries[#state.deliveries + 1] = record
      plan.jobs[#plan.jobs + 1] = { url = url, event = e, record = record }
    end
  end
  return plan
end

-- Each event's headers, once signed: Adobe's, then the event's overrides.
local function sign_plan(plan)
  local sigs, err = sign_all(plan.signed)
  if not sigs then return nil, err end
  for i, e in ipairs(plan.events) do
    local headers = {
      ["Content-Type"] = "application/json",
      ["x-adobe-event-id"] = e.event_id,
      ["x-adobe-digital-signature-1"] = sigs[i][1],
      ["x-adobe-digital-signature-2"] = sigs[i][2],
      ["x-adobe-public-key1-path"] = signing[1].path,
      ["x-adobe-public-key2-path"] = signing[2].path,
    }
    for k, v in pairs(e.headers or {}) do
      if v == false then headers[k] = nil else headers[k] = tostring(v) end
    end
    e.signed_headers = headers
  end
  return true
end

---------------------------------------------------------------------------
-- delivery

local function parse_url(url)
  local host, port, path = url:match("^http://([%w%.%-]+):(%d+)(/[^%s]*)$")
  if not host then
    host, path = url:match("^http://([%w%.%-]+)(/[^%s]*)$")
    port = "80"
  end
  if not host then return nil end
  return host, tonumber(port), path
end

-- One POST (HTTP/1.0: the answer ends when the connection closes):
-- status (0: no answer), body, headers, error.
local function post_once(url, body, headers, timeout)
  local host, port, path = parse_url(url)
  local sock = ngx.socket.tcp()
  local ms = timeout * 1000
  sock:settimeouts(ms, ms, ms)
  local ok, err = sock:connect(host, port)
  if not ok then return 0, nil, nil, "connect: " .. tostring(err) end
  local lines = { str_format("POST %s HTTP/1.0", path), str_format("Host: %s:%d", host, port),
                  "User-Agent: Adobe/1.0 (fake I/O Events)", "Content-Length: " .. #body }
  for k, v in pairs(headers) do lines[#lines + 1] = k .. ": " .. v end
  local sent, serr = sock:send(table_concat(lines, "\r\n") .. "\r\n\r\n" .. body)
  if not sent then sock:close() return 0, nil, nil, "send: " .. tostring(serr) end
  local answer, rerr, partial = sock:receive("*a")
  sock:close()
  if not answer then return 0, nil, nil, "receive: " .. tostring(rerr), partial end
  local head, rest = answer:match("^(.-)\r\n\r\n(.*)$")
  local status = head and tonumber(head:match("^HTTP/%d%.%d (%d%d%d)"))
  if not status then return 0, nil, nil, "no HTTP answer" end
  local hdrs = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do hdrs[name:lower()] = value end
  return status, rest, hdrs
end

local function retryable(status) return status == 0 or status == 429 or status >= 500 end

local function deliver(job, opts, generation)
  local record = job.record
  local intervals = opts.retry_intervals
  for n = 1, #intervals + 1 do
    ngx.update_time()
    local t0 = ngx.now()
    local status, body, headers, err = post_once(job.url, job.body, job.headers, opts.timeout)
    ngx.update_time()
    local latency = ngx.now() - t0
    record.attempts[#record.attempts + 1] = { status = status, latency = latency, at = t0,
      body = body and str_sub(body, 1, 200) or nil, headers = headers, error = err }
    record.status, record.latency = status, latency
    if not retryable(status) then
      record.outcome = status < 300 and "delivered" or "refused"
      break
    end
    if n > #intervals or state.emit_generation ~= generation then
      record.outcome = "gave up"
      break
    end
    ngx.sleep(intervals[n])
    if state.emit_generation ~= generation then record.outcome = "gave up" break end
  end
  record.done = true
end

-- In a timer: sign every event (openssl; the worker blocks meanwhile), then
-- send the jobs in order by `concurrency` timers. A signing failure ends
-- every delivery of the plan unsent (outcome "not sent", error).
local function start(plan, opts)
  local generation, next_job, jobs = state.emit_generation, 1, plan.jobs
  local function worker(premature)
    if premature then return end
    while next_job <= #jobs and state.emit_generation == generation do
      local job = jobs[next_job]
      next_job = next_job + 1
      job.body, job.headers = job.event.body, job.event.signed_headers
      deliver(job, opts, generation)
    end
  end
  local function begin(premature)
    if premature then return end
    local ok, err = sign_plan(plan)
    if ok then
      for _ = 1, math.min(opts.concurrency, #jobs) do
        ok, err = ngx.timer.at(0, worker)
        if not ok then err = "cannot start a delivery timer: " .. tostring(err) break end
      end
    end
    if not ok then
      ngx.log(ngx.ERR, "fake: events not sent: ", err)
      for _, job in ipairs(jobs) do
        if not job.record.done and not job.headers then
          job.record.outcome, job.record.error, job.record.done = "not sent", err, true
        end
      end
    end
  end
  local ok, err = ngx.timer.at(0, begin)
  if not ok then return nil, "cannot start a delivery timer: " .. tostring(err) end
  return true
end

-- timeout, retry_intervals, concurrency from a request, checked.
local function delivery_options(t)
  local o = { timeout = DEFAULT_TIMEOUT, retry_intervals = DEFAULT_INTERVALS,
              concurrency = DEFAULT_CONCURRENCY }
  if t.timeout ~= nil then
    if type(t.timeout) ~= "number" or t.timeout <= 0 or t.timeout > 60 then
      return nil, "timeout must be seconds, more than 0, at most 60"
    end
    o.timeout = t.timeout
  end
  if t.retry_intervals ~= nil then
    if type(t.retry_intervals) ~= "table" or #t.retry_intervals > 20 then
      return nil, "retry_intervals must be an array of at most 20 numbers of seconds"
    end
    for _, s in ipairs(t.retry_intervals) do
      if type(s) ~= "number" or s < 0 or s > 3600 then
        return nil, "retry_intervals must be numbers of seconds from 0 to 3600"
      end
    end
    o.retry_intervals = t.retry_intervals
  end
  if t.concurrency ~= nil then
    if not (util.whole(t.concurrency, 1) and t.concurrency <= 200) then
      return nil, "concurrency must be a whole number from 1 to 200"
    end
    o.concurrency = t.concurrency
  end
  return o
end

local EVENT_FIELDS = { run = true, event_id = true, recipient = true, code = true, meta = true,
                       headers = true, bad_signature = true }

function _M.emit(text)
  local t = util.decode_object(text)
  if not t then return bad("emit takes a JSON object") end
  if not signing then return json_reply(409, { errorMessage = "no signing keys: POST /_fake/signing first" }) end
  local urls = t.urls or { t.url }
  if type(urls) ~= "table" or #urls == 0 then return bad("url (or urls) is required") end
  for _, u in ipairs(urls) do
    if type(u) ~= "string" or not parse_url(u) then return bad("urls must be plain http://host:port/path") end
  end
  local opts, why = delivery_options(t)
  if not opts then return bad(why) end
  if type(t.events) ~= "table" or #t.events == 0 or #t.events > 1000 then
    return bad("events must be an array of 1 to 1000 events")
  end
  store.settle()
  local events = {}
  for i, e in ipairs(t.events) do
    if type(e) ~= "table" then return bad("each event is an object") end
    for k in pairs(e) do
      if not EVENT_FIELDS[k] then return bad("unknown event field " .. tostring(k)) end
    end
    local run = type(e.run) == "string" and store.find_run(e.run)
    if not run then return json_reply(404, { errorMessage = "event " .. i .. ": no such run" }) end
    if e.headers ~= nil and type(e.headers) ~= "table" then return bad("headers must be an object") end
    events[i] = { run = run, event_id = e.event_id, recipient = e.recipient or t.recipient,
                  code = e.code, meta = e.meta, headers = e.headers, bad_signature = e.bad_signature }
  end
  local plan = build(events, urls)
  local ids = {}
  for i, job in ipairs(plan.jobs) do ids[i] = job.record.id end
  local ok, serr = start(plan, opts)
  if not ok then return json_reply(500, { errorMessage = serr }) end
  return { status = 200, headers = {}, body = '{"deliveries":' .. encode_array(ids) .. "}", json = true }
end

function _M.deliveries()
  return { status = 200, headers = {}, body = encode_array(state.deliveries), json = true }
end

function _M.set_webhook(text)
  local t = util.decode_object(text)
  if not t then return bad("webhook takes a JSON object") end
  if next(t) == nil then
    state.webhook = nil
    return json_reply(200, { on = false })
  end
  if type(t.url) ~= "string" or not parse_url(t.url) then return bad("url must be plain http://host:port/path") end
  if t.recipient ~= nil and type(t.recipient) ~= "string" then return bad("recipient must be a string") end
  local opts, why = delivery_options(t)
  if not opts then return bad(why) end
  opts.url, opts.recipient, opts.concurrency = t.url, t.recipient, 1
  state.webhook = opts
  return json_reply(200, { on = true, url = t.url })
end

-- store's finish listener: a run made by re-trigger has just finished.
local function on_finish(run)
  local hook = state.webhook
  if not hook or run.metrics.statusSummary.status ~= "failed" or not signing then return end
  local plan = build({ { run = run, recipient = hook.recipient } }, { hook.url })
  local ok, serr = start(plan, hook)
  if not ok then ngx.log(ngx.ERR, "fake: ", serr) end
end
store.set_finish_listener(on_finish)

return _M
