-- The non-blocking way of driving the engine, outside nginx: a `wait`
-- function (here coroutine.yield under a tiny scheduler, as an event loop
-- would) gets control between steps, so one client serves several
-- coroutines at once.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local system = require "system"

-- Runs fns as coroutines; each yield is a wait(seconds) of theirs. Returns
-- their results in order and how long it all took.
local function run_concurrently(fns)
  local cos, results, alive = {}, {}, #fns
  for i, fn in ipairs(fns) do cos[i] = coroutine.create(fn) end
  local t0 = h.now()
  while alive > 0 do
    local shortest = 0.01
    for i, co in ipairs(cos) do
      if coroutine.status(co) == "suspended" then
        local ok, a, b = coroutine.resume(co)
        assert(ok, a)
        if coroutine.status(co) == "dead" then
          results[i], alive = { a, b }, alive - 1
        elseif type(a) == "number" then
          shortest = math.min(shortest, a)
        end
      end
    end
    if alive > 0 then system.sleep(shortest) end
  end
  return results, h.now() - t0
end

describe("driving the engine in steps (opts.wait)", function()
  local server

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function() server:reset() end)

  it("runs many calls of one client at once, each getting its own result", function()
    server:scenario { match = "^POST ", delay = 0.3, times = 0 }
    local client = flowservice.new(h.opts(server.url, { wait = coroutine.yield }))
    local fns = {}
    for i = 1, 10 do
      fns[i] = function()
        local id = i == 5 and h.runs.success_with_records or h.runs.failed
        return client:retrigger(id, { request_id = "c" .. i })
      end
    end
    local results, elapsed = run_concurrently(fns)
    assert.equal(0, client:_in_flight())
    client:close()
    for i = 1, 10 do
      local run, err = results[i][1], results[i][2]
      if i == 5 then
        assert.is_nil(run)
        assert.equal("FLOW-1387-400", err.code)
        assert.equal("c5", err.request_id)
      else
        assert.is_string(run.id)
      end
    end
    assert.is_true(elapsed < 1.5, "took " .. elapsed .. " s: not concurrent") -- 10 x 0.3 s in series
    assert.equal(10, server:stats().max_in_flight)
  end)

  it("shares one token request among concurrent calls", function()
    local client = flowservice.new { org_id = fake.credentials.org, base_url = server.url,
      credentials = { client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
        scopes = fake.ims_client.scopes, ims_url = server.ims_url },
      wait = coroutine.yield }
    server:scenario { match = "^POST /ims/", delay = 0.2 }
    local fns = {}
    for i = 1, 5 do fns[i] = function() return client:get_run(h.runs.failed) end end
    local results = run_concurrently(fns)
    client:close()
    for i = 1, 5 do assert.equal(h.runs.failed, results[i][1].id) end
    assert.equal(1, server:stats().ims)
  end)

  it("does every kind of call, and leaves no transfer behind, errors and timeouts included", function()
    local waits = 0
    local client = flowservice.new(h.opts(server.url, { retry = { base_delay = 0.01, max_delay = 0.05 },
      wait = function(s) waits = waits + 1 system.sleep(s) end }))
    assert.is_string(assert(client:retrigger(h.runs.failed)).id)
    assert.equal(h.runs.failed, assert(client:get_run(h.runs.failed)).id)
    assert.equal(250, #assert(client:list_runs { flow_id = fake.paging_flow, status = "failed" }))
    assert.equal(250, assert(client:count_runs { flow_id = fake.paging_flow, status = "failed" }))
    local report = assert(client:retry_failed { flow_id = fake.flows.bulk, concurrency = 4 })
    assert.equal(fake.bulk_runs.failed.count, #report.retriggered)
    server:scenario { match = "^GET ", status = 503, times = 2 }
    assert.is_table((client:get_run(h.runs.failed))) -- retried with backoff sleeps
    server:scenario { delay = 2 }
    local _, err = client:retrigger(h.runs.failed, { timeout = 0.2 })
    assert.equal("timeout", err.kind)
    assert.equal(0, client:_in_flight())
    assert.is_true(waits > 0)
    client:close()
  end)

  it("takes a per-call wait", function()
    local client = flowservice.new(h.opts(server.url))
    local waited = false
    server:scenario { delay = 0.1 }
    local run = client:retrigger(h.runs.failed, { wait = function(s) waited = true system.sleep(s) end })
    client:close()
    assert.is_string(run.id)
    assert.is_true(waited)
  end)

  it("blocks in C without a wait function outside nginx", function()
    local client = flowservice.new(h.opts(server.url))
    server:scenario { delay = 0.1 }
    assert.is_string(assert(client:retrigger(h.runs.failed)).id)
    client:close()
  end)
end)
