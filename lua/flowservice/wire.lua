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

-- A client's sender: its core handle, and the spent transfers (their
-- result taken) made into the next calls' transfers, so that a call leaves
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

function _M.new(handle, max_spares)
  return { handle = handle, wire_retrigger = handle.wire_retrigger, wire_plain = handle.wire_plain,
    wire_reply = handle.wire_reply, wire_transfer = handle.wire_transfer, spares = {}, n = 0,
    max = max_spares or SPARES, pool = nil, pool_options = nil }
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
-- a failure): a spare of w's made anew, or a new one.
local function transfer_of(w, request_id, max_body)
  local t = w.wire_transfer(w.handle, request_id, max_body, spare_of(w))
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

-- One attempt of client:retrigger over a cosocket, w the client's sender
-- (_M.new): what core's transfer result gives (run, status, request_id,
-- date or nil, err; lean: no request_id on success), or false for a bad
-- run id (nothing sent). A call on the client's own options (opts nil)
-- takes the core's plain way: no transfer while the reply is awaited, the
-- reply read by client:wire_reply when it comes whole in one read, and a
-- transfer made (transfer_of) only for a reply in pieces or a failure.
function _M.retrigger(ngx, w, run_id, opts, lean)
  -- What reading the reply needs; the rest is scoped to the block. nginx
  -- reuses request coroutines with the stacks they grew to, so a value live
  -- at this function's deepest call is a slot of every waiting request's
  -- stack (measured: at 1000 connections 1.47 -> 0.92 KiB of heap a request
  -- in flight, stacks of 150-200 slots -> 83-150, README)
  local t, request_id, max_body, host, port, sock, ends
  do
    local head, lines, tail, pool, tls, verify, timeout_ms, connect_ms
    if opts == nil then
      request_id, head, lines, tail, host, port, pool, tls, verify, timeout_ms, connect_ms,
        max_body = w.wire_plain(w.handle, run_id)
      if request_id == false then return false end
    end
    if request_id == nil then -- not the plain way: a transfer from the start
      local spare = spare_of(w)
      t, head, lines, tail, host, port, pool, tls, verify, timeout_ms, connect_ms =
        w.wire_retrigger(w.handle, run_id, opts, spare)
      if not t then
        if spare then keep(w, spare) end
        return false
      end
      feed_result = feed_result or t.feed_result
    end
    local now = ngx.now -- the event loop's time: the loop moves it on
    local started = now()
    ends = started + timeout_ms / 1000
    sock = ngx.socket.tcp()
    sock:settimeouts(connect_ms < timeout_ms and connect_ms or timeout_ms, timeout_ms, timeout_ms)
    local ok, err = sock:connect(host, port, pool_options(w, pool))
    if not ok then
      return fail(t or transfer_of(w, request_id, max_body), w, nil, "connect", err, false, host, port)
    end
    -- a new connection: connecting took time, and TLS is still to come (one
    -- from the pool took none: without TLS, a clock that has not moved says
    -- so at no cost)
    if (tls or now() ~= started) and sock:getreusedtimes() == 0 then
      local ms = left(now, ends)
      sock:settimeouts(ms, ms, ms)
      if tls then
        ok, err = handshake(sock, host, verify)
        if not ok then
          return fail(t or transfer_of(w, request_id, max_body), w, sock, "tls", err, false, host, port)
        end
        ms = left(now, ends)
        sock:settimeouts(ms, ms, ms)
      end
    end
    pieces[1], pieces[2], pieces[3] = head, lines, tail
    head, lines, tail = nil, nil, nil -- luacheck: ignore 311 (not kept while the reply is awaited)
    ok, err = sock:send(pieces) -- copies them before it can yield
    pieces[1], pieces[2], pieces[3] = nil, nil, nil
    if not ok then
      return fail(t or transfer_of(w, request_id, max_body), w, sock, "send", err, true, host, port)
    end
  end
  while true do
    local data, rerr = sock:receiveany(READ_SIZE)
    if data then
      -- the reply's end comes with its result: one call for a reply in one read
      local done, reusable, run, status, rid, date
      if t == nil then
        done, reusable, run, status, rid, date = w.wire_reply(w.handle, data, request_id, max_body, lean)
        if not done then t = transfer_of(w, request_id, max_body) end -- fed from the start
      end
      if t ~= nil then done, reusable, run, status, rid, date = feed_result(t, data, lean) end
      if done then
        if reusable then sock:setkeepalive(IDLE_MS) else sock:close() end
        if reusable == nil then return result(t, w, lean) end -- it had ended before
        if t ~= nil then keep(w, t) end
        return run, status, rid, date
      end
    elseif rerr == "closed" then
      t = t or transfer_of(w, request_id, max_body)
      t:feed(nil)
      sock:close()
      return result(t, w, lean)
    else
      return fail(t or transfer_of(w, request_id, max_body), w, sock, "receive", rerr, true, host, port)
    end
    sock:settimeout(left(ngx.now, ends))
  end
end

return _M
