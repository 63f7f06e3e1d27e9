-- The handlers of spec/openresty_wire_spec.lua (spec/support/openresty_wire.conf.in):
-- clients with transport = "nginx" (cosockets) and one without (libcurl),
-- each call's outcome as JSON for the spec to read.
local flowservice = require "flowservice"
local cjson = require "cjson"

local ngx = ngx

local _M = {}

local settings, clients = nil, {}

function _M.init(s)
  settings = s
end

-- name: "wire" (cosockets, plain HTTP), "curl" (libcurl, plain HTTP),
-- "tls" (cosockets, https), "dead" (cosockets, to ?port= where nothing listens),
-- "ims" (cosockets, its token from the fake's IMS through libcurl)
local function client(name)
  local attempts = tonumber(ngx.var.arg_attempts) or 1
  local key = name .. attempts .. (ngx.var.arg_port or "")
  local base_url = settings.url
  if name == "tls" then base_url = settings.tls_url end
  if name == "dead" then base_url = "http://127.0.0.1:" .. tonumber(ngx.var.arg_port) end
  local c = clients[key]
  if c then return c end
  c = flowservice.new {
    access_token = name ~= "ims" and "fake-token" or nil, api_key = "fake-api-key",
    org_id = "FAKEORG@AdobeOrg", base_url = base_url, timeout = 10,
    transport = name ~= "curl" and "nginx" or nil,
    retry = { attempts = attempts, base_delay = 0.01, max_delay = 0.05 },
    credentials = name == "ims" and { client_id = "fake-client-id", client_secret = "fake-client-secret",
      scopes = "openid,AdobeID,read_organizations", ims_url = settings.url } or nil,
  }
  clients[key] = c
  return c
end
_M.client = client

local function outcome(run, err)
  if run then return { id = run.id, etag = run.etag } end
  return { err = { kind = err.kind, sent = err.sent, ambiguous = err.ambiguous or false,
    status = err.status, message = tostring(err.message), retry_after = err.retry_after,
    attempts = err.attempts, text = tostring(err) } }
end

-- /call?via=wire|curl|tls&run=ID[&timeout=s][&attempts=n][&if_match=e]
function _M.call()
  local a = ngx.req.get_uri_args()
  local per_call = nil
  if a.timeout or a.if_match then per_call = { timeout = tonumber(a.timeout), if_match = a.if_match } end
  local c = client(a.via or "wire")
  local t0 = ngx.now()
  local run, err = c:retrigger(a.run, per_call)
  ngx.update_time()
  local o = outcome(run, err)
  o.ms = math.floor((ngx.now() - t0) * 1000 + 0.5)
  o.in_flight = c:_in_flight()
  ngx.say(cjson.encode(o))
end

-- /handshake-raises?run=ID: the "tls" client's call with every socket's
-- sslhandshake raising as lua-resty-core 0.1.25's does when a certificate
-- fails verification as the handshake ends (an assert in its second read),
-- on a connection taken as new; ngx.socket.tcp is put back before answering.
function _M.handshake_raises()
  local tcp = ngx.socket.tcp
  rawset(ngx.socket, "tcp", function()
    local sock = tcp()
    sock.getreusedtimes = function() return 0 end
    sock.sslhandshake = function()
      error("/usr/share/lua/5.1/resty/core/socket.lua:244: assertion failed!")
    end
    return sock
  end)
  local ok, run, err = pcall(function() return client("tls"):retrigger(ngx.var.arg_run) end)
  rawset(ngx.socket, "tcp", tcp)
  if not ok then
    ngx.say(cjson.encode { raised = tostring(run) })
    return
  end
  ngx.say(cjson.encode(outcome(run, err)))
end

-- bad run ids on the plain path: each call's error message, one a line
function _M.bad_runs()
  local c = client("wire")
  for _, run in ipairs { "a/b", "", "..", "x\r\nX-Evil: 1" } do
    local ok, err = pcall(function() return c:retrigger(run) end)
    ngx.say(ok and "no error" or tostring(err))
  end
end

-- a light thread waiting on a re-trigger is killed while the reply is due
function _M.thread_dies()
  local c = client("wire")
  local th = ngx.thread.spawn(function() return c:retrigger(ngx.var.arg_run) end)
  ngx.sleep(0.1)
  assert(ngx.thread.kill(th))
  ngx.say("killed")
end

-- /concurrent?via=NAME&n=N&run=ID: N light threads, each one call of the
-- NAME client, all at once (more than the pool keeps: most connect anew, and
-- each connect and handshake lets the others run), their outcomes in order
function _M.concurrent()
  local c = client(ngx.var.arg_via or "wire")
  local threads = {}
  for i = 1, tonumber(ngx.var.arg_n) do
    threads[i] = ngx.thread.spawn(function() return outcome(c:retrigger(ngx.var.arg_run)) end)
  end
  local out = {}
  for i, th in ipairs(threads) do
    local ok, o = ngx.thread.wait(th)
    out[i] = ok and o or { raised = tostring(o) }
  end
  ngx.say(cjson.encode(out))
end

-- A sender of flowservice.wire of its own (its own core handle, at most 64
-- spares) and what it keeps, noted after each step: how many spares, and
-- (where asked) whether the first one is the transfer noted first.
local function sender()
  local core = require "flowservice.core"
  local wire = require "flowservice.wire"
  local function options()
    return { access_token = "fake-token", api_key = "fake-api-key", org_id = "FAKEORG@AdobeOrg",
      base_url = settings.url, timeout = 10 }
  end
  local handle = core.new(options())
  -- its finish: what the client's would be given (a plain call ends in it)
  local w = wire.new(handle, function(_, run) return run end, 64)
  local out, first = {}, nil
  local s = { handle = handle, w = w, out = out, options = options() } -- a call's own: the same
  function s.note(what, run, same)
    if same then first = first or w.spares[1] end
    out[#out + 1] = { what = what, ok = type(run) == "table", kept = w.n,
      same = same and w.spares[1] ~= nil and w.spares[1] == first or nil }
  end
  function s.call(opts) -- the plain way for the client's own options, as client:retrigger takes
    if opts == nil then return (wire.plain(ngx, w, ngx.var.arg_run)) end
    return (wire.retrigger(ngx, w, ngx.var.arg_run, opts, true))
  end
  function s.drop() w.spares, w.n = {}, 0 end
  -- n calls at once (opts: each call's options), noted once all have ended
  function s.burst(what, n, opts, before_wait)
    local threads = {}
    for i = 1, n do threads[i] = ngx.thread.spawn(s.call, opts) end
    if before_wait then before_wait() end
    local ok_all = true
    for _, th in ipairs(threads) do
      local ok, run = ngx.thread.wait(th)
      ok_all = ok_all and ok and type(run) == "table"
    end
    s.note(what, ok_all and {} or nil)
  end
  return s
end

-- /spares?run=ID: the first call on the client's own options builds what
-- the plain way sends (a transfer, kept); with the spares dropped, plain
-- calls in turn and at once make none, a bad run id none; calls with
-- options of their own make a transfer each and keep a burst's, up to the
-- cap; plain calls whose client is closed while they wait end all the same
-- (with a transfer each then: the first reply's, then each next one's the
-- spare the last left)
function _M.spares()
  local s = sender()
  s.note("call 1", s.call())
  s.drop()
  s.note("call 2", s.call())
  s.note("call 3", s.call())
  s.note("bad run id", (require("flowservice.wire").plain(ngx, s.w, "a/b")) == false and {} or nil)
  s.burst("40 at once", 40)
  s.burst("40 at once, options of their own", 40, s.options)
  s.burst("80 at once, options of their own", 80, s.options)
  s.drop()
  s.burst("10 at once, the client closed meanwhile", 10, nil, function() s.handle:close() end)
  ngx.say(cjson.encode(s.out))
end

-- /pieces?run=ID (the fake sending a reply longer than one read takes): a
-- plain call whose reply comes in pieces gets a transfer then (or a
-- spare), and its result is the whole reply's
function _M.pieces()
  local s = sender()
  s.note("call 1", s.call())
  s.drop()
  local run = s.call()
  s.note("call 2", run, true)
  s.out[#s.out].id = run and run.id
  s.note("call 3", s.call(), true)
  s.handle:close()
  ngx.say(cjson.encode(s.out))
end

return _M
