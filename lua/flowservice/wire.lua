-- The nginx transport: a run action's bytes over ngx.socket.tcp, nginx's
-- own event loop, instead of libcurl's. C builds the request (the same
-- options, checks and header lines as libcurl's, client:wire_retrigger)
-- and reads the reply (transfer:feed, src/wire.c); this module only moves
-- the bytes, so one attempt is: a pooled connection (TLS handshake on a new
-- one), one send, reads until the reply is whole, the connection back to
-- nginx's keep-alive pool if the reply allows.
--
-- Sent once: the request is handed to the socket once and never again;
-- nothing here retries. A failure before the send (connect, TLS) says
-- sent = false; any failure from the send on says sent = true, so the
-- caller's retry rules (flowservice.retry) and the bulk job's evidence
-- treat it as possibly acted on, as they do libcurl's.
local rawget, type = rawget, type
local format = string.format

local _M = {}

-- Phases where cosockets work (lua-nginx-module's docs); elsewhere the call
-- goes through libcurl as before.
local COSOCKETS = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

local READ_SIZE = 65536
local POOL_SIZE = 64          -- kept connections per pool per worker
local IDLE_MS = 25000         -- as libcurl's: idle longer, not reused

-- OpenResty's API when a call now can use cosockets, else nil.
function _M.usable()
  local ngx = rawget(_G, "ngx") -- a global there by design
  if type(ngx) ~= "table" or type(ngx.get_phase) ~= "function" or not ngx.socket then return nil end
  if not COSOCKETS[ngx.get_phase()] then return nil end
  return ngx
end

local function timeout_of(err)
  return err == "timeout"
end

-- One attempt of client:retrigger over a cosocket: what core's transfer
-- result gives (run, status, request_id, date or nil, err).
function _M.retrigger(ngx, handle, run_id, opts)
  local t, request, host, port, tls, verify, timeout_ms, connect_ms = handle:wire_retrigger(run_id, opts)
  local now = ngx.now
  ngx.update_time()
  local ends = now() * 1000 + timeout_ms
  local sock = ngx.socket.tcp()
  local function left()
    ngx.update_time()
    local ms = ends - now() * 1000
    return ms > 1 and ms or 1
  end
  local where = format("%s:%d", host, port)
  local ms = left()
  sock:settimeouts(connect_ms < ms and connect_ms or ms, ms, ms)
  local ok, err = sock:connect(host, port, {
    pool = format("flowservice %s://%s:%d%s", tls and "https" or "http", host, port,
      verify and "" or " insecure"),
    pool_size = POOL_SIZE,
  })
  if not ok then
    t:fail(timeout_of(err) and "timeout" or "connect", format("connect to %s failed: %s", where, err), false)
    return t:result()
  end
  if tls and sock:getreusedtimes() == 0 then
    ok, err = sock:sslhandshake(nil, host, verify)
    if not ok then
      sock:close()
      t:fail(timeout_of(err) and "timeout" or "tls", format("TLS with %s failed: %s", where, err), false)
      return t:result()
    end
  end
  sock:settimeouts(left(), left(), left())
  ok, err = sock:send(request)
  if not ok then
    sock:close()
    t:fail(timeout_of(err) and "timeout" or "send", format("sending to %s failed: %s", where, err), true)
    return t:result()
  end
  while true do
    local data, rerr = sock:receiveany(READ_SIZE)
    if data then
      if t:feed(data) then break end
    elseif rerr == "closed" then
      t:feed(nil)
      break
    else
      sock:close()
      t:fail(timeout_of(rerr) and "timeout" or "receive",
        format("reading the reply from %s failed: %s", where, rerr), true)
      return t:result()
    end
    sock:settimeout(left())
  end
  if t:reusable() then
    sock:setkeepalive(IDLE_MS)
  else
    sock:close()
  end
  return t:result()
end

return _M
