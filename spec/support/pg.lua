-- A real PostgreSQL for one spec file, started by the suite and stopped by PID.
--
--   local pgserver = require "spec.support.pg"
--   local db = pgserver.start()   -- initdb into a mktemp -d directory (as the postgres
--                                 -- user when run as root), a free port on 127.0.0.1
--   db.uri        "postgresql://flowservice@127.0.0.1:PORT/flowservice?passfile=..."
--                 (the password in a 0600 passfile, never in the URI)
--   db.password, db.port, db.dir, db.pid, db.passfile
--   db:uri_for(user, passfile)    the same for another role or passfile
--   db:psql(sql [, database])     run SQL as the superuser over the socket -> output
--   db:stop()                     SIGINT (fast shutdown) by pid, wait; idempotent
--   db:start()                    start it again (same directory and port)
--   db:destroy()                  stop and remove the directory
--   pgserver.available()          whether PostgreSQL's binaries are installed
--
-- Roles: flowservice (owns database flowservice), reader (may log in, no
-- rights on the journal's table once it exists: for the permission test).
local h = require "spec.support.helpers"

local io_open, io_popen, os_execute = io.open, io.popen, os.execute
local format = string.format

local _M = {}

local function sh(cmd)
  local ok, _, code = os_execute(cmd)
  if type(ok) == "number" then return ok end
  return ok and 0 or code
end

local function capture(cmd)
  local p = assert(io_popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

local function bindir()
  local out = capture("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1")
  local dir = out:match("^(%S+)")
  if dir and io_open(dir .. "/initdb") then return dir end
  return nil
end

function _M.available()
  return bindir() ~= nil
end

local q = h.q

local function is_root()
  return capture("id -u"):match("^0") ~= nil
end

local function random_port()
  local f = assert(io_open("/dev/urandom", "rb"))
  local a, b = f:read(2):byte(1, 2)
  f:close()
  return 20000 + (a * 256 + b) % 40000
end

local Server = {}
Server.__index = Server

-- A command as the database's owner: the postgres user when we are root.
function Server:as_owner(cmd)
  if self.root then return "runuser -u postgres -- sh -c " .. q(cmd) end
  return cmd
end

function Server:psql(sql, database)
  local out = capture(self:as_owner(format("%s/psql -X -q -A -t -v ON_ERROR_STOP=1 -h %s -p %d -U postgres -d %s -c %s",
    self.bin, q(self.dir), self.port, q(database or "flowservice"), q(sql))))
  return out
end

function Server:uri_for(user, passfile)
  return format("postgresql://%s@127.0.0.1:%d/flowservice?passfile=%s&connect_timeout=10", user, self.port,
    passfile or self.passfile)
end

local function read_pid(self)
  local f = io_open(self.dir .. "/data/postmaster.pid")
  local pid = f and tonumber(f:read("*l"))
  if f then f:close() end
  return pid
end

function Server:start()
  local log = self.dir .. "/server.log"
  local rc = sh(self:as_owner(format("%s/pg_ctl -w -t 60 -D %s -l %s -o %s start >/dev/null 2>&1",
    self.bin, q(self.dir .. "/data"), q(log),
    q(format("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=200", self.port, self.dir)))))
  if rc ~= 0 then return nil, h.read(log) or "pg_ctl start failed" end
  self.pid = read_pid(self)
  if not self.pid then return nil, "no postmaster.pid" end
  return true
end

local alive = h.alive

function Server:stop()
  local pid = self.pid
  if not pid then return end
  self.pid = nil
  sh("kill -INT " .. pid .. " 2>/dev/null")
  local deadline = h.now() + 60
  while alive(pid) and h.now() < deadline do h.sleep(0.05) end
  if alive(pid) then sh("kill -KILL " .. pid .. " 2>/dev/null") end
  while alive(pid) do h.sleep(0.05) end
end

function Server:destroy()
  self:stop()
  if self.dir then sh("rm -rf " .. q(self.dir)) end
end

function _M.start()
  local bin = assert(bindir(), "PostgreSQL is not installed (Debian: postgresql)")
  local dir = capture("mktemp -d /tmp/flowservice-pg.XXXXXX"):match("^(%S+)")
  assert(dir, "mktemp failed")
  local self = setmetatable({ bin = bin, dir = dir, root = is_root(), password = "pw-" .. random_port() },
    Server)
  if self.root then assert(sh("chown postgres " .. q(dir)) == 0) end
  assert(sh("chmod 755 " .. q(dir)) == 0)
  local out = capture(self:as_owner(format("%s/initdb -D %s -U postgres -A trust --no-sync -E UTF8",
    bin, q(dir .. "/data"))))
  assert(io_open(dir .. "/data/PG_VERSION"), "initdb failed: " .. out)
  h.write(dir .. "/hba.tmp", "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
  assert(sh(self:as_owner(format("cp %s %s", q(dir .. "/hba.tmp"), q(dir .. "/data/pg_hba.conf")))) == 0)
  local started, err
  for _ = 1, 10 do
    self.port = random_port()
    started, err = self:start()
    if started then break end
  end
  assert(started, "PostgreSQL did not start: " .. tostring(err))
  local setup = self:psql(format("CREATE ROLE flowservice LOGIN PASSWORD '%s';"
    .. " CREATE ROLE reader LOGIN PASSWORD '%s';", self.password, self.password), "postgres")
    .. self:psql("CREATE DATABASE flowservice OWNER flowservice", "postgres")
  if setup ~= "" then self:destroy() end
  assert(setup == "", "setup: " .. setup)
  -- the passfile is ours (libpq wants it 0600 and owned by whoever reads it)
  self.passfile = dir .. "/pgpass"
  h.write(self.passfile, format("127.0.0.1:%d:*:flowservice:%s\n127.0.0.1:%d:*:reader:%s\n", self.port,
    self.password, self.port, self.password))
  assert(sh("chmod 600 " .. q(self.passfile)) == 0)
  self.uri = self:uri_for("flowservice")
  return self
end

return _M
