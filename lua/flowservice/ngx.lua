-- How a call waits for the network when the caller gave no `wait` function.
--
-- Inside nginx (OpenResty), in a phase that can yield (rewrite, access,
-- content, timer, ...), by ngx.sleep: the worker goes on serving other
-- requests while libcurl works. In init_by_lua (before the workers exist)
-- and in plain Lua: nil, meaning the C engine blocks in curl_multi_poll.
-- In a phase that cannot yield, a call raises instead of stalling the worker.
local error, rawget, type = error, rawget, type
local format = string.format

local _M = {}

local YIELDABLE = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

local function openresty()
  local ngx = rawget(_G, "ngx") -- OpenResty's API, a global there by design
  if type(ngx) == "table" and type(ngx.get_phase) == "function" then return ngx end
  return nil
end

-- The default wait function for a call made now, or nil to block in C.
-- level: where an error should point, as in error().
function _M.default_wait(level)
  local ngx = openresty()
  if not ngx then return nil end
  local phase = ngx.get_phase()
  if phase == "init" then return nil end
  if YIELDABLE[phase] then return ngx.sleep end
  error(format("flowservice: cannot wait for the network in nginx's %s phase, which cannot yield;"
    .. " call from a content, access, rewrite or timer handler (ngx.timer.at)", phase), (level or 1) + 1)
end

-- True once nginx wants this worker to exit (a timer's job stops early).
function _M.exiting()
  local ngx = openresty()
  return ngx ~= nil and ngx.worker ~= nil and ngx.worker.exiting() == true
end

return _M
