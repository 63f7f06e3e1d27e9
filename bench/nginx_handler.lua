-- The handlers of `make bench-nginx` (bench/nginx_subject.conf.in): the
-- same re-trigger, the same reply to the caller, one through the worker's
-- shared lua-flowservice client (libcurl, the pump), one through a client
-- with transport = "nginx" (cosockets), one by hand on ngx.socket.tcp (the floor:
-- a keep-alive POST, the status line, the headers, a Content-Length body),
-- and the issue's sketch: one light thread per worker stepping a bare `core`
-- client every 1 ms while anything is in flight, each request waiting on its
-- own ngx.semaphore, posted (after a scan of the waiters) once its transfer
-- is done.
local flowservice = require "flowservice"
local core = require "flowservice.core"
local semaphore = require "ngx.semaphore"
local cjson = require("cjson.safe").new()

local ngx = ngx
local collectgarbage, ipairs, next, pairs, tonumber = collectgarbage, ipairs, next, pairs, tonumber

local _M = {}

local RUN_ID = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"
local client, wire_client, host, port, request
local sketch_opts, sketch_client -- the sketch's core client: one per worker (after the fork)
local sketch_waiting, sketch_running = {}, false -- transfer -> semaphore

function _M.init(backend_host, backend_port)
  host, port = backend_host, backend_port
  client = flowservice.new { access_token = "bench-token", api_key = "bench-key",
    org_id = "BENCH@AdobeOrg", sandbox = "prod", timeout = 30,
    base_url = "http://" .. host .. ":" .. port }
  wire_client = flowservice.new { access_token = "bench-token", api_key = "bench-key",
    org_id = "BENCH@AdobeOrg", sandbox = "prod", timeout = 30,
    base_url = "http://" .. host .. ":" .. port, transport = "nginx" }
  sketch_opts = { access_token = "bench-token", api_key = "bench-key",
    org_id = "BENCH@AdobeOrg", sandbox = "prod", timeout = 30,
    base_url = "http://" .. host .. ":" .. port }
  -- what lua-flowservice sends, less its User-Agent and x-request-id
  request = "POST /runs/" .. RUN_ID .. "/action?op=retrigger HTTP/1.1\r\n"
    .. "Host: " .. host .. ":" .. port .. "\r\nAccept: application/json\r\n"
    .. "Authorization: Bearer bench-token\r\nx-api-key: bench-key\r\n"
    .. "x-gw-ims-org-id: BENCH@AdobeOrg\r\nx-sandbox-name: prod\r\n"
    .. "Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
end

local function answer(run)
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode { id = run.id, etag = run.etag })
end

local function fail(why)
  ngx.status = 502
  ngx.say(why)
end

function _M.flow()
  local run, err = client:retrigger(RUN_ID)
  if not run then return fail(tostring(err)) end
  answer(run)
end

function _M.wire()
  local run, err = wire_client:retrigger(RUN_ID)
  if not run then return fail(tostring(err)) end
  answer(run)
end

-- a premature run (the worker exiting) still drives: requests are waiting
local function sketch_loop()
  local waiting = sketch_waiting
  while true do
    local running = sketch_client:step()
    for t, s in pairs(waiting) do
      if t:done() then
        waiting[t] = nil
        s:post(1)
      end
    end
    if running == 0 and next(waiting) == nil then break end
    ngx.sleep(0.001)
  end
  sketch_running = false
end

function _M.sketch()
  if not sketch_client then sketch_client = core.new(sketch_opts) end
  local t = sketch_client:submit_retrigger(RUN_ID, sketch_opts)
  local s = semaphore.new()
  sketch_waiting[t] = s
  if not sketch_running then
    sketch_running = true
    local ok, err = ngx.timer.at(0, sketch_loop)
    if not ok then
      sketch_running = false
      sketch_waiting[t] = nil
      return fail(err)
    end
  end
  local ok, err = s:wait(30)
  if not ok then
    sketch_waiting[t] = nil
    return fail(err)
  end
  local run = t:result()
  if not run then return fail("no run") end
  answer(run)
end

function _M.floor()
  local sock = ngx.socket.tcp()
  sock:settimeout(30000)
  local ok, err = sock:connect(host, port)
  if not ok then return fail(err) end
  ok, err = sock:send(request)
  if not ok then return fail(err) end
  local line
  line, err = sock:receive("*l")
  if not line then return fail(err) end
  local status = tonumber(line:match("^HTTP/1%.1 (%d%d%d)"))
  local len
  while true do
    line, err = sock:receive("*l")
    if not line then return fail(err) end
    if line == "" then break end
    local n = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
    if n then len = tonumber(n) end
  end
  if not len then return fail("no Content-Length") end
  local body
  body, err = sock:receive(len)
  if not body then return fail(err) end
  sock:setkeepalive(300000, 4096)
  local run = status == 200 and cjson.decode(body)
  if not run then return fail("status " .. tostring(status)) end
  answer(run)
end

-- The worker's Lua heap after a full collection, and how many requests are
-- in a handler at that moment (bench/nginx.lua: the heap a request in flight holds).
local inflight = 0
function _M.heap()
  collectgarbage()
  collectgarbage()
  ngx.say(cjson.encode { kb = collectgarbage("count"), inflight = inflight })
end

-- each handler, counted while it runs
for _, name in ipairs { "flow", "wire", "sketch", "floor" } do
  local handler = _M[name]
  _M[name] = function()
    inflight = inflight + 1
    handler()
    inflight = inflight - 1
  end
end

function _M.pump()
  local pump = client:_pump()
  ngx.say(cjson.encode { starts = pump.starts, ticks = pump.ticks, late = pump.late,
    pid = ngx.worker.pid() })
end

return _M
