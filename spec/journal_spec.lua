-- The journal's C core (core.journal_open): durable opens, failed opens that
-- let go at once, and a journal that only its opener may append to.
local core = require "flowservice.core"
local journal = require "flowservice.journal"
local F = require "spec_fork"

local function tmp_path()
  local p = assert(io.popen("mktemp -u /tmp/flowservice-journal.XXXXXX"))
  local path = p:read("*l")
  p:close()
  return path
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  return text
end

-- Runs body in a forked child; returns its exit code and what it wrote to
-- why (the failure, if any). The child ends with spec_fork.exit whatever
-- happens, so busted goes on in the parent only.
local function in_child(body)
  local why = tmp_path()
  local pid = F.fork()
  if pid == 0 then
    local ok, err = pcall(body)
    if not ok then
      local f = io.open(why, "wb")
      if f then f:write(tostring(err)) f:close() end
    end
    F.exit(ok and 0 or 1)
  end
  local code = F.wait(pid)
  local text = slurp(why)
  os.remove(why)
  return code, text
end

describe("core.journal_open", function()
  local path

  before_each(function() path = tmp_path() end)
  after_each(function() os.remove(path) end)

  describe("after a fork", function()
    it("refuses a child's append and leaves the parent's lock and appends alone", function()
      local j = assert(core.journal_open(path))
      assert.is_true(j:append("parent 1\n"))
      local parent = F.getpid()
      local code, why = in_child(function()
        local ok, err = j:append("child\n")
        assert(ok == nil, "the child's append was accepted")
        assert(err.kind == "journal", "kind " .. tostring(err.kind))
        assert(err.message == "journal belongs to process " .. parent, err.message)
        j:close() -- only the child's copy of the fd
        j:close()
      end)
      assert.equal(0, code, why)
      -- the lock is still the parent's: no other open gets it
      local other, err = core.journal_open(path)
      assert.is_nil(other)
      assert.matches("in use by another job", err.message)
      assert.is_true(j:append("parent 2\n"))
      j:close()
      assert.equal("parent 1\nparent 2\n", slurp(path))
      local again = assert(core.journal_open(path)) -- closed by the parent: free
      again:close()
    end)

    it("makes the journal module's write return nil, err in the child", function()
      local j = assert(journal.open(path))
      assert.is_true(j:write { { run = "r1", state = "pending" } })
      local parent = F.getpid()
      local code, why = in_child(function()
        local ok, err = j:write { { run = "r2", state = "pending" } }
        assert(ok == nil and err.message == "journal belongs to process " .. parent,
          tostring(err and err.message))
      end)
      assert.equal(0, code, why)
      assert.is_true(j:write { { run = "r3", state = "done" } })
      j:close()
      local state = journal.read(path)
      assert.is_table(state.runs.r1)
      assert.is_nil(state.runs.r2)
      assert.equal("done", state.runs.r3.state)
    end)

    it("spec_fork.wait reports a child's exit code", function()
      assert.equal(0, (in_child(function() end)))
      assert.equal(1, (in_child(function() error("boom") end)))
      local pid = F.fork()
      if pid == 0 then F.exit(42) end
      assert.equal(42, F.wait(pid))
    end)
  end)

  -- The directory fsync fails on demand with strace's fault injection (the
  -- suite runs as root, where permissions cannot make it fail). A plain
  -- lua5.4 child with the rock of `make build` does the opens.
  describe("syncing the directory", function()
    -- with the collector stopped: a failed open must let go without it
    -- (the chunk reaches the shell as one line: no comments in it)
    local function open_twice_with_failing_fsync(file)
      local chunk = ([[
        package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath
        collectgarbage("stop")
        local core = require "flowservice.core"
        local j, err = core.journal_open(%q)
        io.write(j and "opened" or err.message, "\n")
        local j2, err2 = core.journal_open(%q)
        io.write(j2 and "reopened" or err2.message, "\n")]]):format(file, file)
      local p = assert(io.popen(("strace -qq -o /dev/null -e trace=fsync "
        .. "-e inject=fsync:error=EIO:when=1 lua5.4 -e %q 2>&1"):format(chunk)))
      local out = p:read("*a")
      p:close()
      return out
    end

    local function check(file)
      local out = open_twice_with_failing_fsync(file)
      assert.equal("cannot sync the directory of journal " .. file .. ": Input/output error\n"
        .. "reopened\n", out)
    end

    it("happens on every open, for a file that exists too", function()
      assert(io.open(path, "wb")):close()
      check(path)
    end)

    it("releases the fd and the lock at once when it fails", function()
      check(path) -- created by the first open, kept by nothing
    end)
  end)
end)
