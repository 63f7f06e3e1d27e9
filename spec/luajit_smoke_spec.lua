-- Run by `make test` under LuaJIT (busted --run=luajit), with the core built
-- against LuaJIT's headers: the module loads and re-triggers a run.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

describe("#luajit smoke", function()
  local server
  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)

  it("runs under LuaJIT", function()
    assert.is_table(jit)
    assert.matches("^LuaJIT 2%.1", jit.version)
  end)

  it("requires flowservice and re-triggers a failed run", function()
    local flowservice = require "flowservice"
    local run, err = flowservice.retrigger(h.runs.failed, h.opts(server.url))
    assert.is_nil(err)
    assert.is_string(run.id)
    assert.matches('^".+"$', run.etag)
  end)

  it("raises on a misspelt option and returns errors as values", function()
    local flowservice = require "flowservice"
    local o = h.opts(server.url)
    o.acess_token = "x"
    assert.error_matches(function() flowservice.retrigger(h.runs.failed, o) end,
      "option 'acess_token' is unknown")
    local _, err = flowservice.retrigger(h.runs.success_with_records, h.opts(server.url))
    assert.equal("FLOW-1387-400", err.code)
    assert.equal(400, err.status)
  end)
end)
