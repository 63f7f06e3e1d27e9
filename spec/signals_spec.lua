-- core.signals: the watcher the command polls for SIGINT and SIGTERM during
-- a long job. Signals belong to a process, so each case is a small Lua
-- script run as its own process, with the interpreter and module paths of
-- the running suite (lua5.4, lua5.3, lua5.1, LuaJIT, the ASan interpreter;
-- under valgrind memcheck in the valgrind run). The scripts signal
-- themselves with kill(1) and wait for it, so nothing depends on timing.
local core = require "flowservice.core"

local LUA = arg and arg[-1] or "lua5.4"
local NO_PROXY_ENV = "env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy"
local UNDER_VALGRIND = os.getenv("FLOWSERVICE_UNDER_VALGRIND") ~= nil

local h = require "spec.support.helpers"
local q, write = h.q, h.write
local function read(path) return assert(h.read(path), "cannot read " .. path) end

-- What every script starts with: the suite's module paths, the core, and
-- send(name), which signals this process and returns once kill(1) has
-- (so the signal is pending, or acted on, when it returns).
local PRELUDE = ([[
package.path = %q
package.cpath = %q
local core = require "flowservice.core"
local function self_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("*n")
  f:close()
  return pid
end
local function send(name)
  io.stdout:flush()
  assert(io.popen("kill -" .. name .. " " .. self_pid())):close()
end
]]):format(package.path, package.cpath)

describe("core.signals", function()
  local tmp

  setup(function()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -m 700 " .. q(tmp)))
  end)
  teardown(function() os.execute("rm -rf " .. q(tmp)) end)

  -- script(body) -> exit status (128 + n: killed by signal n), stdout, stderr
  local function script(body)
    local file = tmp .. "/script.lua"
    write(file, PRELUDE .. body)
    local interpreter = UNDER_VALGRIND and "sh spec/support/valgrind.sh" or q(LUA)
    -- the exit status through the shell: Lua 5.1's os.execute cannot report it
    os.execute(NO_PROXY_ENV .. " " .. interpreter .. " " .. q(file) .. " </dev/null >" .. q(tmp .. "/out")
      .. " 2>" .. q(tmp .. "/err") .. "; echo $? >" .. q(tmp .. "/status"))
    local code = tonumber(read(tmp .. "/status"):match("%d+"))
    return code, read(tmp .. "/out"), read(tmp .. "/err")
  end

  it("reports a pending SIGTERM once, and the process survives it", function()
    local code, out, err = script [[
      local w = core.signals { "INT", "TERM" }
      print("before", tostring(w:pending()))
      send("TERM")
      print("after", tostring(w:pending()), tostring(w:pending()))
      assert(w:close())
      print("alive")
    ]]
    assert.equal(0, code, err)
    assert.equal("before\tnil\nafter\tTERM\tnil\nalive\n", out)
  end)

  it("reports each of several pending signals once", function()
    local code, out, err = script [[
      local w = core.signals { "TERM", "HUP", "INT" }
      send("HUP")
      send("INT")
      send("TERM")
      local seen = {}
      for _ = 1, 10 do
        local name = w:pending()
        if not name then break end
        seen[#seen + 1] = name
      end
      table.sort(seen)
      print(table.concat(seen, ","))
      w:close()
    ]]
    assert.equal(0, code, err)
    assert.equal("HUP,INT,TERM\n", out)
  end)

  it("after close, a SIGTERM kills the process again", function()
    local code, out = script [[
      local w = core.signals { "INT", "TERM" }
      assert(w:close())
      assert(w:close()) -- idempotent
      print("closed")
      send("TERM")
      print("survived")
    ]]
    assert.equal(128 + 15, code)
    assert.equal("closed\n", out)
  end)

  it("consumes a SIGINT still pending at close: no 'interrupted!' error", function()
    -- lua.c's SIGINT handler would turn a SIGINT delivered at close into an
    -- "interrupted!" error; the ASan interpreter has none, and would die.
    local code, out, err = script [[
      local w = core.signals { "INT", "TERM" }
      send("INT")
      assert(w:close())
      local n = 0
      for i = 1, 100000 do n = n + i end -- where lua.c's hook would fire
      print("done", n)
    ]]
    assert.equal(0, code, err)
    assert.equal("done\t5000050000\n", out)
    assert.is_nil(err:find("interrupted", 1, true), err)
  end)

  it("closes when collected: the mask is restored", function()
    local code, out = script [[
      local w = core.signals { "TERM" }
      w = nil
      collectgarbage()
      collectgarbage()
      print("collected")
      send("TERM")
      print("survived")
    ]]
    assert.equal(128 + 15, code)
    assert.equal("collected\n", out)
  end)

  it("allows one watcher at a time", function()
    local code, out, err = script [[
      local first = core.signals { "INT" }
      local ok, msg = pcall(core.signals, { "TERM" })
      print(tostring(ok), msg)
      first:close()
      local second = core.signals { "TERM" }
      send("TERM")
      print(tostring(second:pending()))
      second:close()
    ]]
    assert.equal(0, code, err)
    assert.equal("false\tflowservice: signals are already watched\nTERM\n", out)
  end)

  it("raises on a closed watcher", function()
    local code, out, err = script [[
      local w = core.signals { "TERM" }
      w:close()
      print(select(2, pcall(w.pending, w)))
    ]]
    assert.equal(0, code, err)
    assert.equal("flowservice: signal watcher is closed\n", out)
  end)

  if _VERSION == "Lua 5.4" then
    it("closes as a to-be-closed variable (Lua 5.4)", function()
      local code, out = script [[
        do
          local w <close> = core.signals { "TERM" }
          send("TERM")
        end
        print("closed")
        send("TERM")
        print("survived")
      ]]
      assert.equal(128 + 15, code)
      assert.equal("closed\n", out)
    end)
  end

  it("in a child after fork, pending() raises and close() only hands the mask back", function()
    local code, out, err = script [[
      local F = require "spec_fork"
      local w = core.signals { "TERM" }
      send("TERM") -- pending in the parent; fork clears it in the child
      io.stdout:flush()
      local pid = F.fork()
      if pid == 0 then
        local ok, msg = pcall(w.pending, w)
        print("child", tostring(ok), (msg:gsub("%d+", "N")))
        assert(w:close())
        send("TERM") -- the child's own signal: the default action
        print("child survived")
        io.stdout:flush()
        F.exit(0)
      end
      local status = F.wait(pid)
      print("parent", status, tostring(w:pending()), tostring(w:pending()))
      w:close()
    ]]
    assert.equal(0, code, err)
    assert.equal("child\tfalse\tflowservice: signal watcher belongs to process N, not to this one\n"
      .. "parent\t143\tTERM\tnil\n", out)
  end)

  describe("names", function()
    -- these raise before anything is blocked, so the suite's process is safe
    local function message(...)
      local ok, msg = pcall(core.signals, ...)
      assert.is_false(ok)
      return msg
    end

    it("must be a non-empty list of INT, TERM, HUP, QUIT", function()
      assert.matches("unknown signal name 'KILL' %(expected INT, TERM, HUP or QUIT%)",
        message { "INT", "KILL" })
      assert.matches("unknown signal name 'SIGTERM'", message { "SIGTERM" })
      assert.matches("unknown signal name 'int'", message { "int" })
      assert.matches("unknown signal name 'INT'", message { "INT\0" })
      assert.matches("signal name 2 is a number, expected a string", message { "TERM", 15 })
      assert.matches("expected a non%-empty list of signal names", message {})
      assert.matches("bad argument #1", message "TERM")
      assert.matches("bad argument #1", message())
    end)
  end)
end)
