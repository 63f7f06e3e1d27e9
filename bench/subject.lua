-- The code under test, as bench/client.lua and bench/memory.lua call it.
--   local subject = require("bench.subject").open(base_url, ca_file)
--   subject.call()    -> run or nil, err   (one re-trigger through one client)
--   subject.close()
--   subject.label     "client"
-- Loads the module from the tree in BENCH_TREE (bench/run.lua sets it to
-- its snapshot of the `make build` tree), else build/tree; under LuaJIT from
-- the 5.1 tree beside it (BENCH_TREE_51, else build/tree-5.1). Run from the
-- repository root.
local jit = rawget(_G, "jit")
local version = jit and "5.1" or _VERSION:match("%d+%.%d+")
local tree = jit and (os.getenv("BENCH_TREE_51") or "build/tree-5.1")
  or os.getenv("BENCH_TREE") or "build/tree"
package.path = ("%s/share/lua/%s/?.lua;%s/share/lua/%s/?/init.lua;"):format(tree, version, tree, version)
  .. package.path
package.cpath = ("%s/lib/lua/%s/?.so;"):format(tree, version) .. package.cpath

local flowservice = require "flowservice"

local assert = assert

local _M = {}

_M.RUN_ID = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"

function _M.open(base_url, ca_file)
  local run_id = _M.RUN_ID
  local opts = {
    access_token = "bench-token", api_key = "bench-key", org_id = "BENCH@AdobeOrg",
    sandbox = "prod", base_url = base_url, ca_file = ca_file,
  }
  local client = assert(flowservice.new(opts))
  return {
    label = jit and "client-luajit" or "client",
    call = function() return client:retrigger(run_id) end,
    close = function() client:close() end,
  }
end

return _M
