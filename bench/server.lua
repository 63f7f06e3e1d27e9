-- The benchmark's endpoint: its own nginx (bench/nginx.conf.in) on two TLS
-- ports of 127.0.0.1, one HTTP/1.1-only and one offering HTTP/2, with a
-- throwaway CA from spec/support/tls.lua.
--
--   local server = require("bench.server").start()
--   server.h1_url, server.h2_url   "https://127.0.0.1:PORT" (base URLs)
--   server.ca_file                 the CA that signed the server certificate
--   server:stop()                  TERM by pid, wait, remove the files; idempotent
--
-- Run from the repository root (package.path must hold "./?.lua").

local tls = require "spec.support.tls"

local assert, error, tonumber, tostring = assert, error, tonumber, tostring
local io_open, io_popen, os_execute, os_getenv, os_remove =
      io.open, io.popen, os.execute, os.getenv, os.remove
local str_format = string.format

local _M = {}

local NGINX = os_getenv("BENCH_NGINX") or "nginx"
local START_TRIES = 20

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function capture(cmd)
  local p = assert(io_popen(cmd, "r"))
  local out = p:read("a")
  p:close()
  return out
end

local function read_file(path)
  local f = io_open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

local function write_file(path, data)
  local f = assert(io_open(path, "wb"))
  assert(f:write(data))
  f:close()
end

-- /proc, not `kill -0`: an exited but unreaped nginx still answers kill -0.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  local state = stat and stat:match("%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- From /dev/urandom, so two harnesses started in the same second differ.
local function random_port()
  local f = assert(io_open("/dev/urandom", "rb"))
  local a, b, c = f:read(3):byte(1, 3)
  f:close()
  return 20000 + (a * 65536 + b * 256 + c) % 40000
end

-- A harness killed outright (SIGKILL, a closed terminal) runs no Lua: this
-- detached shell, started as soon as the prefix exists, stops nginx and
-- removes the files once the owner is gone. A normal stop removes the
-- prefix, and the watchdog ends within a second.
local WATCHDOG = [[
alive() { [ -r /proc/$1/stat ] && ! grep -q ') [ZX] ' /proc/$1/stat 2>/dev/null; }
while alive "$0" && [ -d "$1" ]; do sleep 1; done
[ -d "$1" ] || exit 0
pid=$(cat "$1/nginx.pid" 2>/dev/null)
if [ -n "$pid" ] && alive "$pid"; then
  kill -TERM "$pid"
  i=0; while alive "$pid" && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
fi
pki=$(cat "$1/pki.dir" 2>/dev/null)
case $pki in /tmp/flowservice-tls.*) rm -rf "$pki" ;; esac
rm -rf "$1"
]]

local function start_watchdog(prefix)
  local owner = tonumber((capture("echo $PPID")))  -- the shell's parent: this process
  if not owner then return end
  os_execute(str_format("setsid sh -c %s %d %s >/dev/null 2>&1 </dev/null &",
    q(WATCHDOG), owner, q(prefix)))
end

local Server = {}
Server.__index = Server

function Server:stop()
  if self.stopped then return end
  self.stopped = true
  if self.pid then
    os_execute(str_format("kill -TERM %d 2>/dev/null", self.pid))
    for _ = 1, 100 do
      if not alive(self.pid) then break end
      os_execute("sleep 0.05")
    end
    if alive(self.pid) then os_execute(str_format("kill -KILL %d 2>/dev/null", self.pid)) end
  end
  -- Only ever remove the directories this module made.
  if self.prefix and self.prefix:match("^/tmp/flowservice%-bench%.%w+$") then
    os_execute("rm -rf " .. q(self.prefix))
  end
  tls.remove(self.pki)
end

-- Returns a started server, or raises with nginx's own words.
function _M.start()
  local template = assert(read_file("bench/nginx.conf.in"), "run from the repository root")
  local prefix = capture("mktemp -d /tmp/flowservice-bench.XXXXXXXX"):gsub("\n$", "")
  assert(prefix:match("^/tmp/flowservice%-bench%.%w+$"), "mktemp failed")
  -- Run as root, nginx's worker becomes "nobody" and must enter the prefix.
  os_execute("chmod 755 " .. q(prefix))
  local server = setmetatable({ prefix = prefix }, Server)
  start_watchdog(prefix)
  local ok, err = pcall(function()
    server.pki = tls.make()
    write_file(prefix .. "/pki.dir", server.pki.dir)
    local log
    for _ = 1, START_TRIES do
      local h1, h2 = random_port(), random_port()
      if h1 ~= h2 then
        local values = { PREFIX = prefix, CERT = server.pki.cert, KEY = server.pki.key,
                         H1_PORT = tostring(h1), H2_PORT = tostring(h2) }
        write_file(prefix .. "/nginx.conf", (template:gsub("@([%u%d_]+)@", function(name)
          return assert(values[name], "unknown slot @" .. name .. "@")
        end)))
        os_remove(prefix .. "/error.log")
        -- Output to a file, never a pipe: the daemon would hold a pipe open.
        local started = os_execute(str_format("%s -p %s -c %s -e %s >%s 2>&1 </dev/null",
          NGINX, q(prefix .. "/"), q(prefix .. "/nginx.conf"), q(prefix .. "/error.log"),
          q(prefix .. "/start.log")))
        if started then
          server.h1_url = "https://127.0.0.1:" .. h1
          server.h2_url = "https://127.0.0.1:" .. h2
          break
        end
        log = (read_file(prefix .. "/start.log") or "") .. (read_file(prefix .. "/error.log") or "")
        -- Only a taken port is worth another try.
        if not log:find("Address already in use", 1, true) then break end
      end
    end
    if not server.h1_url then error("nginx did not start:\n" .. tostring(log), 0) end
    -- The daemon writes its pid file after the parent has returned.
    for _ = 1, 100 do
      server.pid = tonumber(read_file(prefix .. "/nginx.pid") or "")
      if server.pid then break end
      os_execute("sleep 0.05")
    end
    if not server.pid then error("nginx wrote no pid file", 0) end
  end)
  if not ok then
    server:stop()
    error(err, 2)
  end
  server.ca_file = server.pki.ca_file
  return server
end

return _M
