-- The valgrind step of `make test` must be able to go red: the same script
-- that runs the suite under memcheck fails on a module that leaks, and
-- passes on ours. (Skipped in the valgrind run itself: no valgrind in valgrind.)
local function sh(cmd)
  local ok, _, code = os.execute(cmd)
  if type(ok) == "number" then return ok end -- Lua 5.1
  return ok and 0 or code
end

local function memcheck(lua_chunk)
  return sh(("sh spec/support/valgrind.sh -e %q >build/probe/valgrind.log 2>&1"):format(lua_chunk))
end

describe("#probe valgrind step", function()
  setup(function()
    assert.equal(0, sh("mkdir -p build/probe && gcc -std=c99 -Wall -Wextra -Werror -shared -fPIC"
      .. " -I/usr/include/lua5.4 -o build/probe/leakprobe.so spec/support/leakprobe.c"))
  end)

  it("goes red on a deliberately leaking module", function()
    local code = memcheck('package.cpath = "build/probe/?.so;" .. package.cpath; '
      .. 'assert(require("leakprobe").leak())')
    assert.equal(99, code)
    local log = assert(io.open("build/probe/valgrind.log")):read("*a")
    assert.matches("4,096 bytes in 1 blocks are definitely lost", log, 1, true)
  end)

  it("stays green on flowservice.core making a request", function()
    local code = memcheck('package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath; '
      .. 'local core = require "flowservice.core"; '
      .. 'assert(core.retrigger("x", { access_token = "t", api_key = "k", org_id = "o", '
      .. 'base_url = "http://127.0.0.1:9" }) == nil)')
    assert.equal(0, code)
  end)
end)
