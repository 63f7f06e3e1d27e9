-- The benchmark's endpoint: its own nginx (bench/nginx.conf.in, started by
-- spec/support/nginx.lua) on two TLS ports of 127.0.0.1, one HTTP/1.1-only
-- and one offering HTTP/2, with a throwaway CA from spec/support/tls.lua.
--
--   local server = require("bench.server").start([cpu])
--     cpu: pin nginx (master and worker) to this CPU number with taskset
--   server.h1_url, server.h2_url   "https://127.0.0.1:PORT" (base URLs)
--   server.ca_file                 the CA that signed the server certificate
--   server:stop()                  TERM by pid, wait, remove the files; idempotent
--
-- Run from the repository root (package.path must hold "./?.lua"). Set
-- BENCH_NGINX to use another nginx binary.

local nginx = require "spec.support.nginx"
local tls = require "spec.support.tls"

local error, pcall, tostring = error, pcall, tostring
local os_getenv = os.getenv

local _M = {}

-- Returns a started server, or raises with nginx's own words.
function _M.start(cpu)
  local pki = tls.make()
  local command = os_getenv("BENCH_NGINX") or "nginx"
  if cpu then command = "taskset -c " .. tostring(cpu) .. " " .. command end  -- the worker inherits it
  -- nginx.start removes the PKI with the prefix: on stop, on a failed start,
  -- and from its watchdog when this process dies.
  local ok, server = pcall(nginx.start, {
    template = "bench/nginx.conf.in",
    vars = { CERT = pki.cert, KEY = pki.key },
    ports = 2,                  -- @PORT1@ HTTP/1.1 only, @PORT2@ also h2
    nginx = command,
    name = "bench",
    cleanup = { pki.dir },
  })
  if not ok then
    tls.remove(pki)             -- a bad template raises before nginx.start owns it
    error(tostring(server), 2)
  end
  server.h1_url = "https://127.0.0.1:" .. server.ports[1]
  server.h2_url = "https://127.0.0.1:" .. server.ports[2]
  server.url = server.h1_url    -- both ports speak TLS
  server.ca_file = pki.ca_file
  server.pki = pki
  return server
end

return _M
