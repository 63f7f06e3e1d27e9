-- The engine as an event loop sees it: libcurl's sockets in an epoll set
-- whose fd (client:fd()) turns readable when a step has work, a step that
-- acts only on what is ready (client:pump()), and flowservice.cqueues, a
-- wait function that sleeps in a real cqueues loop on that fd.
local core = require "flowservice.core"
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local has_cqueues, cqueues = pcall(require, "cqueues")

describe("the engine's sockets and event loops", function()
  local server

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function() server:reset() end)

  it("names its socket set; client:fd() is the epoll fd, or nil with poll(2)", function()
    local c = core.new(h.opts(server.url))
    assert.is_true(core.socket_set == "epoll" or core.socket_set == "poll")
    if core.socket_set == "epoll" then
      assert.is_number(c:fd())
      assert.equal(c:fd(), c:fd()) -- one set for the client's life
    else
      assert.is_nil(c:fd())
    end
    c:close()
    local client = flowservice.new(h.opts(server.url))
    assert.equal(core.socket_set == "epoll" and "number" or "nil", type(client:fd()))
    local running, timeout = client:pump()
    assert.equal(0, running)
    assert.is_nil(timeout)
    client:close()
  end)

  it("client:pump() drives submitted transfers to the end and then reports no timer", function()
    server:scenario { match = "^POST ", delay = 0.1, times = 0 }
    local c = core.new(h.opts(server.url))
    local ts = {}
    for i = 1, 5 do ts[i] = c:submit_retrigger(h.runs.failed, h.opts(server.url, { request_id = "p" .. i })) end
    local running, timeout = c:pump()
    assert.equal(5, running)
    local steps = 0
    while running > 0 do
      c:wait(timeout and math.min(timeout, 1) or 1) -- curl_multi_poll: the blocking path stays
      running, timeout = c:pump()
      steps = steps + 1
      assert.is_true(steps < 1000)
    end
    for i = 1, 5 do
      assert.is_true(ts[i]:done())
      local run, status, request_id = ts[i]:result()
      assert.is_table(run, tostring(status))
      assert.equal("p" .. i, request_id)
    end
    assert.equal(0, c:in_flight())
    c:close()
  end)

  describe("under cqueues", function()
    if not has_cqueues then
      pending("lua-cqueues is not installed for " .. _VERSION)
      return
    end
    local cq_wait = require("flowservice.cqueues").wait

    it("serves ten calls of one client at once in a cqueues loop, waking on the engine's fd", function()
      server:scenario { match = "^POST ", delay = 0.3, times = 0 }
      local client = flowservice.new(h.opts(server.url, { wait = cq_wait }))
      local cq = cqueues.new()
      local results, ticks, finished = {}, 0, 0
      local t0 = h.now()
      for i = 1, 10 do
        cq:wrap(function()
          results[i] = { client:retrigger(h.runs.failed, { request_id = "q" .. i }) }
          finished = finished + 1
        end)
      end
      cq:wrap(function() -- the loop stays free for others meanwhile
        while finished < 10 do
          ticks = ticks + 1
          cqueues.sleep(0.01)
        end
      end)
      local ok, err = cq:loop(5)
      assert(ok, err)
      local elapsed = h.now() - t0
      for i = 1, 10 do
        assert.is_table(results[i][1], tostring(results[i][2]))
      end
      assert.is_true(elapsed < 1.5, "ten 0.3 s calls took " .. elapsed .. " s")
      assert.is_true(ticks >= 10, "the loop ticked " .. ticks .. " times")
      assert.equal(0, client:_in_flight())
      assert.is_true(server:stats().max_in_flight >= 10)
      client:close()
    end)

    it("sleeps on the fd rather than polling: a 0.3 s call wakes a few times, not every 20 ms", function()
      server:scenario { match = "^POST ", delay = 0.3, times = 0 }
      local waits = 0
      local wait = require("flowservice.ngx").watches_fd(function(seconds, fd)
        waits = waits + 1
        return cq_wait(seconds, fd)
      end)
      local client = flowservice.new(h.opts(server.url, { wait = wait }))
      local cq = cqueues.new()
      local run, err
      cq:wrap(function() run, err = client:retrigger(h.runs.failed) end)
      local ok, lerr = cq:loop(5)
      assert(ok, lerr)
      assert.is_table(run, tostring(err))
      if core.socket_set == "epoll" then
        assert.is_true(waits <= 8, "the call woke " .. waits .. " times")
      end
      client:close()
    end)
  end)
end)
