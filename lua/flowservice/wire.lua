-- The nginx transport: a run action's bytes over ngx.socket.tcp, nginx's
-- own event loop, instead of libcurl's. C builds the request (the same
-- options, checks and header lines as libcurl's: client:wire_plain for a
-- call on the client's own options, else client:wire_retrigger) and reads
-- the reply (client:wire_reply, transfer:feed_result, src/wire.c); this
-- module only moves the bytes, so one attempt is: a pooled connection (TLS
-- handshake on a new one), one send, reads until the reply is whole, the
-- connection back to nginx's keep-alive pool if the reply allows.
--
-- Sent once: the request is handed to the socket once and never again;
-- nothing here retries. A failure before the send (connect, TLS) says
-- sent = false; any failure from the send on says sent = true, so the
-- caller's retry rules (flowservice.retry) and the bulk job's evidence
-- treat it as possibly acted on, as they do libcurl's.
local ngxwait = require "flowservice.ngx"

local pcall, tostring = pcall, tostring
local format = string.format

local _M = {}

local READ_SIZE = 65536
-- As libcurl's: a connection idle longer is not reused. How many are kept
-- per worker is nginx's lua_socket_pool_size.
local IDLE_MS = 25000

-- OpenResty's API when a call now can use cosockets (the phases that can
-- yield: flowservice.ngx says which), else nil: then libcurl as before.
function _M.usable()
  local ngx = ngxwait.yieldable()
  return ngx and ngx.socket and ngx or nil
end

-- A client's sender: its core handle, finish (the client's end of a plain
-- call: _M.plain tail-calls it with the run id and the attempt's results),
-- and the spent transfers (their result taken) made into the next calls' transfers, so that a call leaves
-- no userdata for the collector to finalise. A plain call (the client's
-- own options) makes a transfer only for a reply in pieces or a failure;
-- a call with options of its own makes one always. At most max_spares
-- (SPARES): what a burst left beyond is dropped. As many as a worker has
-- such calls in flight at its busiest are worth keeping: with 1000 in
-- flight, replies come in bursts of hundreds before the next requests
-- arrive, and a cap of 64 made (and dropped) a transfer for one call in
-- eight. A spare is ~0.9 KiB and its reply buffer (up to 4 KiB, a run's
-- reply ~0.1). The core's methods a call makes are kept with it (the same
-- functions for every handle: looked up once).
local SPARES = 1024

function _M.new(handle, finish, max_spares)
  return { handle = handle, wire_retrigger = handle.wire_retrigger, wire_plain = handle.wire_plain,
    wire_reply = handle.wire_reply, wire_transfer = handle.wire_transfer, spares = {}, n = 0,
    max = max_spares or SPARES, pool = nil, pool_options = nil, finish = finish,
    -- the client's own options, once a plain call has read them (learn)
    host = nil, port = nil, tls = nil, verify = nil, timeout_ms = nil, timeout_s = nil,
    connect_ms = nil, max_body = nil, own_pool = nil }
end

-- A spare transfer of w's, or nil.
local function spare_of(w)
  local n = w.n
  if n == 0 then return nil end
  local list = w.spares
  local t = list[n]
  list[n] = nil
  w.n = n - 1
  return t
end

local function keep(w, t)
  local n = w.n
  if n < w.max then
    n = n + 1
    w.spares[n] = t
    w.n = n
  end
end

local feed_result -- transfer:feed_result, once a transfer was seen

-- A plain call's transfer, made when it needs one (its reply in pieces, or
-- a failure): a spare of w's made anew, or a new one. line: the call's
-- x-request-id line (client:wire_plain's), which holds its request id.
local function transfer_of(w, line, max_body)
  local t = w.wire_transfer(w.handle, line, max_body, spare_of(w))
  feed_result = feed_result or t.feed_result
  return t
end

-- t's result (lean: no request id on success), then t kept for a later call.
local function result(t, w, lean)
  local run, status, request_id, date = t:result(lean)
  keep(w, t)
  return run, status, request_id, date
end

local function step_of(err, step)
  return err == "timeout" and "timeout" or step
end

-- The failure of one step, for core's transfer (where: host:port).
local function fail(t, w, sock, step, err, sent, host, port)
  if sock then sock:close() end
  local what = step == "connect" and "connect to %s:%d failed: %s"
    or step == "tls" and "TLS with %s:%d failed: %s"
    or step == "send" and "sending to %s:%d failed: %s"
    or "reading the reply from %s:%d failed: %s"
  t:fail(step_of(err, step), format(what, host, port, err), sent)
  return result(t, w)
end

-- connect()'s options for w's pool: one table, made again only when the
-- pool's name changes (a call's options of its own can name another).
local function pool_options(w, pool)
  if w.pool ~= pool then w.pool, w.pool_options = pool, { pool = pool } end
  return w.pool_options
end

-- sock:sslhandshake, which lua-resty-core 0.1.25 (Debian 12) can make raise
-- where it means a refusal: when the handshake ends as its result is read,
-- a certificate that fails verification trips an assert() in its second
-- read. Either way nothing was sent, and it is the TLS failure it is.
local function handshake(sock, host, verify)
  local ok, session, err = pcall(sock.sslhandshake, sock, nil, host, verify)
  if ok then return session, err end
  local why = tostring(session)
  why = why:match("^.*:%d+: (.*)$") or why -- no file path of theirs in our message
  return nil, "the handshake failed (lua-resty-core raised: " .. why .. ")"
end

-- The request's three pieces (client:wire_retrigger says why three) go to
-- sock:send as one array table, this one: filled right before the send,
-- which copies them out before it can yield, and emptied after it, so no
-- two calls ever hold it at once.
local pieces = {}

-- Milliseconds left until ends (ngx.now()'s seconds), at least 1.
local function left(now, ends)
  local ms = (ends - now()) * 1000
  return ms > 1 and ms or 1
end

-- A new connection (none from the pool): its timeouts set to what is left
-- of the call's, after a TLS handshake if the target has TLS. Nothing is
-- sent yet: a failure is the TLS step's, not sent.
local function fresh(now, sock, host, tls, verify, ends)
  local ms = left(now, ends)
  sock:settimeouts(ms, ms, ms)
  if not tls then return true end
  local ok, err = handshake(sock, host, verify)
  if not ok then return nil, err end
  ms = left(now, ends)
  sock:settimeouts(ms, ms, ms)
  return true
end

-- The reply from its first read on (data, or rerr for a read that failed),
-- fed to t from its start: a reply in pieces, or a failed read. What core's
-- transfer result gives (lean: no request_id on success).
local function rest(ngx, w, sock, t, data, rerr, ends, lean, host, port)
  while true do
    if data then
      local done, reusable, run, status, rid, date = feed_result(t, data, lean)
      if done then
        if reusable then sock:setkeepalive(IDLE_MS) else sock:close() end
        if reusable == nil then return result(t, w, lean) end -- it had ended before
        keep(w, t)
        return run, status, rid, date
      end
    elseif rerr == "closed" then
      t:feed(nil)
      sock:close()
      return result(t, w, lean)
    else
      return fail(t, w, sock, "receive", rerr, true, host, port)
    end
    sock:settimeout(left(ngx.now, ends))
    data, rerr = sock:receiveany(READ_SIZE)
  end
end

-- One attempt of client:retrigger over a cosocket, w the client's sender
-- (_M.new): what core's transfer result gives (run, status, request_id,
-- date or nil, err; lean: no request_id on success), or false for a bad
-- run id (nothing sent). The general way: a transfer from the start, for a
-- call with options of its own (and for a client whose options the core's
-- plain way does not take).
function _M.retrigger(ngx, w, run_id, opts, lean)
  local spare = spare_of(w)
  local t, head, lines, tail, host, port, pool, tls, verify, timeout_ms, connect_ms =
    w.wire_retrigger(w.handle, run_id, opts, spare)
  if not t then
    if spare then keep(w, spare) end
    return false
  end
  feed_result = feed_result or t.feed_result
  local now = ngx.now -- the event loop's time: the loop moves it on
  local started = now()
  local ends = started + timeout_ms / 1000
  local sock = ngx.socket.tcp()
  sock:settimeouts(connect_ms < timeout_ms and connect_ms or timeout_ms, timeout_ms, timeout_ms)
  local ok, err = sock:connect(host, port, pool_options(w, pool))
  if not ok then return fail(t, w, nil, "connect", err, false, host, port) end
  -- a new connection: connecting took time, and TLS is still to come (one
  -- from the pool took none: without TLS, a clock that has not moved says
  -- so at no cost)
  if (tls or now() ~= started) and sock:getreusedtimes() == 0 then
    ok, err = fresh(now, sock, host, tls, verify, ends)
    if not ok then return fail(t, w, sock, "tls", err, false, host, port) end
  end
  pieces[1], pieces[2], pieces[3] = head, lines, tail
  ok, err = sock:send(pieces) -- copies them before it can yield
  pieces[1], pieces[2], pieces[3] = nil, nil, nil
  if not ok then return fail(t, w, sock, "send", err, true, host, port) end
  local data, rerr = sock:receiveany(READ_SIZE)
  return rest(ngx, w, sock, t, data, rerr, ends, lean, host, port)
end

-- What a plain call takes of the client's own options, which never change:
-- read with its first request (from then on the core gives a call only what
-- is its own: the request's pieces).
local function learn(w, run_id)
  local head, line, tail, host, port, pool, tls, verify, timeout_ms, connect_ms, max_body =
    w.wire_plain(w.handle, run_id)
  if head then
    w.host, w.port, w.tls, w.verify, w.max_body = host, port, tls, verify, max_body
    w.timeout_ms, w.timeout_s = timeout_ms, timeout_ms / 1000
    w.connect_ms = connect_ms < timeout_ms and connect_ms or timeout_ms
    w.own_pool = { pool = pool }
  end
  return head, line, tail
end

-- A plain call (client:retrigger on the client's own options) whole: its
-- attempt, then w's finish (the client's) tail-called with the attempt's
-- results and the run id, run false for a bad one. Client:retrigger
-- tail-calls this, so the transport's frames start where its own did; and
-- as nginx reuses request coroutines with the stacks they grew to, every
-- value live at a call here is a stack slot of every waiting request: so
-- the call's own values only (the client's constants are w's), the
-- request's pieces scoped to the send but its own line (its x-request-id,
-- the request id the reply is read under), no transfer while the reply is
-- awaited (client:wire_reply reads a reply that comes whole in one read;
-- one in pieces, or a failure, gets one then). spec/luajit_stack_spec.lua
-- holds the registers; the README says what it measured.
function _M.plain(ngx, w, run_id)
  local line, sock, ends
  do
    local head, tail
    if w.host then
      head, line, tail = w.wire_plain(w.handle, run_id, true)
    else
      head, line, tail = learn(w, run_id)
    end
    if not head then -- false: a bad run id, nil: not the core's plain way
      if head == false then return w.finish(run_id, false) end
      return w.finish(run_id, _M.retrigger(ngx, w, run_id, nil, true))
    end
    local started = ngx.now()
    ends = started + w.timeout_s
    sock = ngx.socket.tcp()
    sock:settimeouts(w.connect_ms, w.timeout_ms, w.timeout_ms)
    local ok, err = sock:connect(w.host, w.port, w.own_pool)
    if not ok then
      return w.finish(run_id, fail(transfer_of(w, line, w.max_body), w, nil, "connect",
        err, false, w.host, w.port))
    end
    if (w.tls or ngx.now() ~= started) and sock:getreusedtimes() == 0 then
      ok, err = fresh(ngx.now, sock, w.host, w.tls, w.verify, ends)
      if not ok then
        return w.finish(run_id, fail(transfer_of(w, line, w.max_body), w, sock, "tls",
          err, false, w.host, w.port))
      end
    end
    pieces[1], pieces[2], pieces[3] = head, line, tail
    head, tail = nil, nil -- luacheck: ignore 311 (not kept while the reply is awaited)
    ok, err = sock:send(pieces) -- copies them before it can yield
    pieces[1], pieces[2], pieces[3] = nil, nil, nil
    if not ok then
      return w.finish(run_id, fail(transfer_of(w, line, w.max_body), w, sock, "send",
        err, true, w.host, w.port))
    end
  end
  local data, rerr = sock:receiveany(READ_SIZE)
  if data then -- the reply's end comes with its result: one call for a reply in one read
    local done, reusable, run, status, rid, date = w.wire_reply(w.handle, data, line,
      w.max_body, true)
    if done then
      if reusable then sock:setkeepalive(IDLE_MS) else sock:close() end
      return w.finish(run_id, run, status, rid, date)
    end
  end
  return w.finish(run_id, rest(ngx, w, sock, transfer_of(w, line, w.max_body), data, rerr,
    ends, true, w.host, w.port))
end

return _M
