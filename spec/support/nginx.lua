-- A private nginx for tests and benchmarks (Lua 5.1 to 5.4, LuaJIT): its own
-- prefix directory, random loopback ports, a rendered config, stopped by PID.
-- The one place that knows how; spec/support/fake.lua and bench/server.lua
-- build on it.
--
--   local nginx = require "spec.support.nginx"
--   local server = nginx.start {
--     template = "fake/nginx.conf.in",  -- or text = "..." (the config itself)
--     vars = { NAME = "value" },        -- fills @NAME@; @PREFIX@ and @PORT1@..@PORTn@ are given
--     ports = 2,                        -- loopback ports to allocate (default 1)
--     ready = "/health",                -- answers 200 on server.url once up, or a
--                                       -- function(server) -> true once up;
--                                       -- default: nginx has written its pid file
--     timeout = 5,                      -- seconds to wait for ready (default 5)
--     env = { FOO = "bar" },            -- nginx's environment (the config must say `env FOO;`)
--     -- for the modules built on this one:
--     nginx = "nginx",                  -- the command that runs nginx (default "nginx")
--     name = "nginx",                   -- the prefix is $TMPDIR/flowservice-<name>.XXXXXXXX
--     methods = Class,                  -- more methods for the server object, looked up
--                                       -- before these (ready may call them)
--     cleanup = { dir },                -- directories removed with the prefix
--   }
--   server.prefix, server.pid, server.ports (array of numbers)
--   server.url                 "http://127.0.0.1:" .. ports[1]
--   server:error_log()         the error log's text (kept after stop)
--   server:stop()              TERM by pid, wait (zombie-aware), remove the prefix; idempotent
--   nginx.Server               these methods, for a methods table that wraps stop
--
-- start raises with nginx's own words (start output and error log) when nginx
-- cannot start, exits, or is not ready in time; it stops what it started first.
--
-- Rendering: slots are @NAME@ (capitals, digits, _). vars are filled first,
-- then @PREFIX@ and @PORTn@, so a var's value may use those two; a slot with
-- no value raises. Values are spliced in as they are: `$`, `%` and `;;` in
-- the template or the values mean nothing here.
--
-- The config must keep nginx inside its prefix and off the system's ports:
-- `pid @PREFIX@/nginx.pid;` (checked), every `listen` on an allocated port or
-- a unix socket (checked; a server without listen would take port 80), temp
-- paths under @PREFIX@, and `daemon on` (nginx's default) so that starting
-- returns. Ports taken by someone else are retried with fresh ones.
--
-- A Lua error that drops the server runs __gc (a sentinel userdata on 5.1
-- and LuaJIT, whose tables have no __gc); `local s <close>` works on 5.4; a
-- detached watchdog stops nginx and removes the prefix if the owning process
-- dies without either (SIGKILL, SIGPIPE into `| head`, Ctrl-C).

local assert, error, getmetatable, ipairs, pairs, pcall, setmetatable, tonumber, tostring, type =
      assert, error, getmetatable, ipairs, pairs, pcall, setmetatable, tonumber, tostring, type
local newproxy = newproxy   -- 5.1 and LuaJIT only
local io_open, io_popen = io.open, io.popen
local os_execute, os_remove, os_time = os.execute, os.remove, os.time
local math_random = math.random
local str_find, str_format, str_sub = string.find, string.format, string.sub
local table_concat, table_sort = table.concat, table.sort

local _M = { _VERSION = "0.1.0" }

local START_TRIES = 20        -- fresh ports after a bind failure
local STOP_SECONDS = 5        -- TERM, then KILL

---------------------------------------------------------------------------
-- shell and files

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function capture(cmd)
  local p = assert(io_popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  return out
end

-- The exit status through the shell: Lua 5.1's os.execute and popen:close
-- report it differently from 5.2+, or not at all.
local function succeeds(cmd)
  return capture(cmd .. "; echo \" $?\""):match("(%d+)%s*$") == "0"
end

local function read_file(path)
  local f = io_open(path, "rb")
  if not f then return nil end
  local data = f:read("*a")
  f:close()
  return data
end

local function write_file(path, data)
  local f = assert(io_open(path, "wb"))
  assert(f:write(data))
  f:close()
end

local function sleep(seconds)
  os_execute("sleep " .. tostring(seconds))
end

-- Seconds on the one clock the whole suite measures with (deadlines here,
-- durations in the specs: two clocks with different steps made a 0.3 s
-- wait read as 0.29 s): luasystem's monotime (CLOCK_MONOTONIC; busted
-- depends on luasystem), else /proc/uptime (Linux, 10 ms steps), else os.time.
local has_system, system = pcall(require, "system")
local monotonic = has_system and type(system) == "table" and system.monotime
if not monotonic then
  monotonic = function()
    local text = read_file("/proc/uptime")
    return text and tonumber(text:match("^(%S+)")) or os_time()
  end
end

---------------------------------------------------------------------------
-- processes

-- /proc rather than `kill -0`: a master that exited but is not yet reaped
-- (PID 1 in some containers reaps slowly) still answers kill -0.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  local state = stat and stat:match("%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- The master's children (its workers), to wait for them too.
local function children(pid)
  local pids = {}
  local text = read_file(str_format("/proc/%d/task/%d/children", pid, pid)) or ""
  for n in text:gmatch("%d+") do pids[#pids + 1] = tonumber(n) end
  return pids
end

local function any_alive(pids)
  for _, pid in ipairs(pids) do
    if alive(pid) then return true end
  end
  return false
end

-- A harness killed outright runs no Lua: this detached shell, started as soon
-- as the prefix exists, stops nginx and removes the files once the owner is
-- gone. A normal stop removes the prefix, and the watchdog ends within a
-- second. Arguments: owner pid, prefix, directories to remove with it.
local WATCHDOG = [[
owner=$0 prefix=$1; shift
alive() { [ -r /proc/$1/stat ] && ! grep -q ') [ZX] ' /proc/$1/stat 2>/dev/null; }
while alive "$owner" && [ -d "$prefix" ]; do sleep 1; done
[ -d "$prefix" ] || exit 0
pid=$(cat "$prefix/nginx.pid" 2>/dev/null)
if [ -n "$pid" ] && alive "$pid"; then
  kill -TERM "$pid"
  i=0; while alive "$pid" && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  if alive "$pid"; then kill -KILL "$pid"; fi
fi
rm -rf "$prefix" "$@"
]]

-- setsid: its own session, so the Ctrl-C that kills the tests spares it.
local function start_watchdog(prefix, cleanup)
  local owner = tonumber((capture("echo $PPID")))   -- the shell's parent: this process
  if not owner then return end
  local args = { q(prefix) }
  for _, dir in ipairs(cleanup) do args[#args + 1] = q(dir) end
  os_execute(str_format("setsid sh -c %s %d %s >/dev/null 2>&1 </dev/null &",
                        q(WATCHDOG), owner, table_concat(args, " ")))
end

---------------------------------------------------------------------------
-- the config

-- Fill @NAME@ slots from values by plain splicing (no gsub replacement
-- string, so `%` and `$` stay as they are). strict: a slot without a value
-- raises; otherwise it is left for a later pass.
local function render(text, values, strict)
  local out, pos = {}, 1
  while true do
    local s, e, name = str_find(text, "@([%u%d_]+)@", pos)
    if not s then break end
    local value = values[name]
    if value == nil and strict then error("no value for the slot @" .. name .. "@", 0) end
    out[#out + 1] = str_sub(text, pos, s - 1)
    out[#out + 1] = value == nil and str_sub(text, s, e) or tostring(value)
    pos = e + 1
  end
  out[#out + 1] = str_sub(text, pos)
  return table_concat(out)
end

-- What keeps nginx private, checked on the rendered text.
local function check_config(conf, prefix, ports)
  if not str_find(conf, "pid " .. prefix .. "/nginx.pid;", 1, true) then
    error("the config must say `pid @PREFIX@/nginx.pid;`", 0)
  end
  local ours = {}
  for _, port in ipairs(ports) do ours[port] = true end
  -- every listen directive, comments aside (a listen without a port is 80)
  local code = ("\n" .. conf):gsub("#[^\n]*", "")
  for addr in code:gmatch("[%s{;]listen%s+([^%s;]+)") do
    if not addr:match("^unix:") then
      local port = tonumber(addr:match(":(%d+)$") or addr:match("^(%d+)$"))
      if not ours[port] then
        error("`listen " .. addr .. "` is not on a port nginx.start allocated (@PORTn@)", 0)
      end
    end
  end
end

-- From /dev/urandom, so parallel processes started in the same second
-- differ, without reseeding the math.random that busted itself uses.
local function random_port()
  local f = io_open("/dev/urandom", "rb")
  local n
  if f then
    local a, b, c = f:read(3):byte(1, 3)
    f:close()
    n = a * 65536 + b * 256 + c
  else
    n = math_random(0, 2 ^ 24)
  end
  return 20000 + n % 40000
end

local function pick_ports(count)
  local ports, taken = {}, {}
  while #ports < count do
    local port = random_port()
    if not taken[port] then
      taken[port] = true
      ports[#ports + 1] = port
    end
  end
  return ports
end

local function bind_failure(text)
  return str_find(text, "Address already in use", 1, true) or str_find(text, "bind() to", 1, true)
end

---------------------------------------------------------------------------
-- the server object

local Server = {}
_M.Server = Server

-- The shell and file helpers above, for the other test supports.
_M.util = { quote = q, capture = capture, read_file = read_file, write_file = write_file,
  sleep = sleep, monotonic = monotonic, alive = alive }

local PREFIX_PATTERN = "^/.+/flowservice%-[%w_]+%.%w+$"

function Server:error_log()
  return self._log or read_file(self.prefix .. "/error.log") or ""
end

-- TERM the master, wait for it and its workers, KILL what stays, then remove
-- the prefix. Safe to call twice, and from __gc.
function Server:stop()
  if self.stopped then return end
  self.stopped = true
  local pid = self.pid or tonumber(read_file(self.prefix .. "/nginx.pid") or "")
  if pid then
    local pids = children(pid)
    pids[#pids + 1] = pid
    os_execute(str_format("kill -TERM %d 2>/dev/null", pid))
    local deadline = monotonic() + STOP_SECONDS
    while any_alive(pids) and monotonic() < deadline do sleep(0.05) end
    for _, p in ipairs(pids) do
      if alive(p) then os_execute(str_format("kill -KILL %d 2>/dev/null", p)) end
    end
  end
  self._log = self:error_log()
  -- Only ever remove a directory this module made.
  if self.prefix:match(PREFIX_PATTERN) then
    os_execute("rm -rf " .. q(self.prefix))
  end
  for _, dir in ipairs(self._cleanup) do os_execute("rm -rf " .. q(dir)) end
end

local function finalize(self) pcall(Server.stop, self) end

local function new_server(prefix, methods, cleanup)
  local index = Server
  if methods then
    index = function(_, key)
      local v = methods[key]
      if v == nil then v = Server[key] end
      return v
    end
  end
  local server = setmetatable({ prefix = prefix, _cleanup = cleanup },
                              { __index = index, __gc = finalize, __close = finalize })
  if newproxy then   -- 5.1 and LuaJIT: no __gc on tables, so a userdata that dies with it
    server._sentinel = newproxy(true)
    getmetatable(server._sentinel).__gc = function() finalize(server) end
  end
  return server
end

---------------------------------------------------------------------------
-- starting

local function make_prefix(name)
  local prefix = capture(str_format("mktemp -d \"${TMPDIR:-/tmp}/flowservice-%s.XXXXXXXX\"", name))
                   :gsub("\n$", "")
  assert(prefix:match(PREFIX_PATTERN), "mktemp failed: " .. prefix)
  -- Paths end up inside nginx.conf (and Lua strings there): refuse
  -- characters that would need quoting rather than quote them halfway.
  if prefix:find('[%c%s"\'{};$\\]') then
    os_execute("rm -rf " .. q(prefix))
    error("nginx.start: TMPDIR has characters nginx.conf cannot take: " .. prefix, 3)
  end
  -- Run as root, nginx's worker becomes "nobody": it must be able to enter
  -- the prefix (mktemp makes it 0700) to reach its temp directories.
  os_execute("chmod 755 " .. q(prefix))
  return prefix
end

local function check_options(opts)
  local function bad(msg) error("nginx.start: " .. msg, 4) end
  if type(opts) ~= "table" then bad("options must be a table") end
  if (opts.template == nil) == (opts.text == nil) then bad("give template or text, not both") end
  for name, value in pairs(opts.vars or {}) do
    if type(name) ~= "string" or not name:match("^[%u%d_]+$") then
      bad("var names are slot names (capitals, digits, _): " .. tostring(name))
    end
    if name == "PREFIX" or name:match("^PORT%d+$") then bad("@" .. name .. "@ is nginx.start's") end
    if type(value) ~= "string" and type(value) ~= "number" then
      bad("var " .. name .. " must be a string or a number")
    end
  end
  for name, value in pairs(opts.env or {}) do
    if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") then
      bad("bad environment variable name: " .. tostring(name))
    end
    if type(value) ~= "string" and type(value) ~= "number" then
      bad("env " .. name .. " must be a string or a number")
    end
  end
  local ports = opts.ports or 1
  if type(ports) ~= "number" or ports < 1 or ports % 1 ~= 0 then bad("ports must be a count >= 1") end
  local ready = opts.ready
  if ready ~= nil and type(ready) ~= "function" and (type(ready) ~= "string" or ready:sub(1, 1) ~= "/") then
    bad("ready must be a path (\"/health\") or a function")
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    bad("timeout must be a number of seconds")
  end
  if opts.name ~= nil and not (type(opts.name) == "string" and opts.name:match("^[%w_]+$")) then
    bad("name must be letters, digits and _")
  end
  for _, dir in ipairs(opts.cleanup or {}) do
    if type(dir) ~= "string" or not dir:match("^/[^/]+/.") then
      bad("cleanup entries must be absolute directories below the top level")
    end
  end
end

-- The environment as shell assignments before the command.
local function env_prefix(env)
  local parts = {}
  for name, value in pairs(env or {}) do parts[#parts + 1] = name .. "=" .. q(value) .. " " end
  table_sort(parts)
  return table_concat(parts)
end

local function http_status(url)
  local out = capture("curl -s -o /dev/null --noproxy '*' --max-time 2 -w '%{http_code}' "
                      .. q(url) .. " 2>/dev/null")
  return tonumber(out)
end

-- Start nginx in server.prefix (fresh ports after a bind failure) and wait
-- until it is ready; raises a plain message, start() cleans up.
local function launch(server, text, opts)
  local prefix = server.prefix
  local conf_file, error_file, start_file = prefix .. "/nginx.conf", prefix .. "/error.log",
                                            prefix .. "/start.log"
  local template = render(text, opts.vars or {}, false)
  local cmd = str_format("%s%s -p %s -c %s -e %s >%s 2>&1 </dev/null", env_prefix(opts.env),
                         opts.nginx or "nginx", q(prefix .. "/"), q(conf_file), q(error_file),
                         q(start_file))
  local started, log
  for _ = 1, START_TRIES do
    local ports = pick_ports(opts.ports or 1)
    local values = { PREFIX = prefix }
    for i, port in ipairs(ports) do values["PORT" .. i] = port end
    local conf = render(template, values, true)
    check_config(conf, prefix, ports)
    write_file(conf_file, conf)
    os_remove(error_file)
    -- Output to a file, never a pipe: the daemon would hold a pipe open.
    if succeeds(cmd) then
      server.ports = ports
      server.url = "http://127.0.0.1:" .. ports[1]
      started = true
      break
    end
    log = (read_file(start_file) or "") .. (read_file(error_file) or "")
    -- Only a taken port is worth another try.
    if not bind_failure(log) then break end
  end
  if not started then error("nginx did not start:\n" .. tostring(log), 0) end

  -- nginx has daemonized; the daemon writes its pid file after the parent returned.
  local ready, timeout = opts.ready, opts.timeout or 5
  local deadline = monotonic() + timeout
  while true do
    server.pid = server.pid or tonumber(read_file(prefix .. "/nginx.pid") or "")
    if server.pid then
      if not alive(server.pid) then error("nginx exited:\n" .. server:error_log(), 0) end
      if ready == nil
         or (type(ready) == "string" and http_status(server.url .. ready) == 200)
         or (type(ready) == "function" and ready(server)) then
        return
      end
    end
    if monotonic() >= deadline then
      error(str_format("nginx %s within %s s:\n%s",
                       server.pid and "was not ready" or "wrote no pid file",
                       tostring(timeout), server:error_log()), 0)
    end
    sleep(0.05)
  end
end

function _M.start(opts)
  check_options(opts)
  local text = opts.text
  if text == nil then
    text = read_file(opts.template)
    if not text then error("nginx.start: cannot read the template " .. tostring(opts.template), 2) end
  end
  local cleanup = {}
  for i, dir in ipairs(opts.cleanup or {}) do cleanup[i] = dir end
  local server = new_server(make_prefix(opts.name or "nginx"), opts.methods, cleanup)
  start_watchdog(server.prefix, cleanup)
  local ok, err = pcall(launch, server, text, opts)
  if not ok then
    server:stop()
    error("nginx.start: " .. tostring(err), 2)
  end
  return server
end

return _M
