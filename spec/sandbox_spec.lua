-- The whole sandbox: flows (get_flow, list_flows, each_flow), runs of every
-- flow, retry_failed{ all_flows = true } with a journal per flow, and a flow
-- that does not exist or cannot run said so before anything is listed.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local F = fake.flows
local FAST = { attempts = 4, base_delay = 0.01, max_delay = 0.05 }

describe("the whole sandbox", function()
  local server, client, dir

  setup(function()
    server = fake.start()
    local p = assert(io.popen("mktemp -d /tmp/flowservice-sandbox.XXXXXX"))
    dir = p:read("*l")
    p:close()
  end)
  teardown(function()
    server:stop()
    h.sh("rm -rf " .. h.q(dir))
  end)
  before_each(function()
    server:reset()
    client = flowservice.new(h.opts(server.url, { retry = FAST }))
  end)
  after_each(function() client:close() end)

  describe("flows", function()
    it("reads one flow, and says when there is none", function()
      local flow = assert(client:get_flow(F.enabled))
      assert.equal(F.enabled, flow.id)
      assert.equal("enabled", flow.state)
      local none, err = client:get_flow("00000000-0000-4000-8000-000000000000")
      assert.is_nil(none)
      assert.equal(404, err.status)
    end)

    it("lists every flow across pages, and by state", function()
      local all = assert(client:list_flows { page_size = 2 })
      local ids = {}
      for _, f in ipairs(all) do ids[f.id] = f.state end
      for role, id in pairs(F) do assert.is_string(ids[id], role) end
      assert.equal("disabled", ids[F.disabled])
      local disabled = assert(client:list_flows { state = "disabled" })
      assert.is_true(#disabled >= 1)
      for _, f in ipairs(disabled) do assert.equal("disabled", f.state) end
      local n = 0
      for _ in client:each_flow { max = 3 } do n = n + 1 end
      assert.equal(3, n)
      assert.error_matches(function() client:list_flows { state = "on" } end,
        "query field 'state' must be \"enabled\" or \"disabled\"")
    end)

    it("lists runs of every flow when no flow_id is given", function()
      local runs = assert(client:list_runs { status = "failed" })
      local flows = {}
      for _, r in ipairs(runs) do flows[r.flowId] = true end
      assert.is_true(flows[F.bulk] and flows[F.paging] and flows[F.enabled])
    end)
  end)

  describe("retry_failed", function()
    it("re-triggers every flow's failed runs, each flow with its journal, passing over those that cannot run",
      function()
        local paths = {}
        local report, err = client:retry_failed { all_flows = true, concurrency = 8,
          journal = function(flow_id)
            paths[flow_id] = dir .. "/" .. flow_id .. ".jsonl"
            return paths[flow_id]
          end }
        assert.is_nil(err)
        local by_flow = {}
        for _, f in ipairs(report.flows) do by_flow[f.flow_id] = f end
        assert.equal(40, by_flow[F.bulk].retriggered)
        assert.equal(250, by_flow[F.paging].retriggered)
        assert.equal("the flow is disabled", by_flow[F.disabled].skipped_flow)
        assert.equal("FLOW-1333-400", by_flow[F.streaming].error.code)
        assert.is_nil(paths[F.disabled])
        local counted = server:stats().by_source
        for _, r in ipairs(report.retriggered) do assert.equal(1, counted[r.run_id]) end
        -- the same again: every journal says done
        local again = assert(client:retry_failed { all_flows = true, journal = function(flow_id)
          return paths[flow_id] or (dir .. "/" .. flow_id .. ".jsonl")
        end })
        assert.same({}, again.retriggered)
      end)

    it("reads the flow first: one that does not exist or is disabled ends the job before listing", function()
      local report, err = client:retry_failed { flow_id = "00000000-0000-4000-8000-000000000000" }
      assert.is_nil(report)
      assert.is_true(err.not_found)
      assert.matches("flow 00000000%-0000%-4000%-8000%-000000000000 not found", tostring(err))
      report, err = client:retry_failed { flow_id = F.disabled }
      assert.is_nil(report)
      assert.equal("flow", err.kind)
      assert.matches("is disabled", err.message)
      for _, r in ipairs(server:requests()) do assert.not_equal("/runs", r.path) end
      assert.equal(0, server:stats().posts)
    end)

    it("says the listing failed instead of reporting nothing", function()
      server:scenario { match = "^GET /runs%?", status = 500, times = 0 }
      local report, err = client:retry_failed { flow_id = F.bulk }
      assert.is_nil(report)
      assert.equal(500, err.status)
      assert.matches("^could not list runs: ", err.report.aborted)
    end)
  end)

  describe("did the re-runs work?", function()
    local BACKOFF = { 0.1, 0.3 }

    it("wait_runs follows each new run to its end: succeeded, failed with errors", function()
      local bad = fake.bulk_run_id(7)
      server:outcomes { after = 0.3, status = "success",
        by_source = { [bad] = { after = 0.3, status = "failed" } } }
      local report = assert(client:retry_failed { flow_id = F.bulk, journal = false, wait_runs = true,
        wait_backoff = BACKOFF })
      assert.equal(40, #report.retriggered)
      assert.equal(39, #report.outcomes.succeeded)
      assert.equal(1, #report.outcomes.failed)
      assert.equal(bad, report.outcomes.failed[1].run_id)
      assert.equal("CONNECTOR-2001-500", report.outcomes.failed[1].errors[1].code)
      assert.same({}, report.outcomes.still_running)
    end)

    it("max_active keeps at most N re-runs of a flow executing at once, and loses none", function()
      server:outcomes { after = 0.3 }
      local report = assert(client:retry_failed { flow_id = F.bulk, journal = false, max_active = 5,
        concurrency = 8, wait_backoff = BACKOFF })
      assert.equal(40, #report.retriggered)
      assert.equal(40, #report.outcomes.succeeded)
      local most = server:stats().max_executing[F.bulk]
      assert.is_true(most <= 5, most .. " executing at once")
      assert.equal(5, most)
    end)

    it("gives up waiting after wait_timeout: still running", function()
      server:outcomes { after = 30 }
      local report = assert(client:retry_failed { run_ids = { fake.bulk_run_id(1) }, journal = false,
        wait_runs = true, wait_timeout = 0.5, wait_backoff = BACKOFF })
      assert.equal(1, #report.outcomes.still_running)
    end)

    it("a job killed while following leaves the new runs in its journal: the next follows them", function()
      server:outcomes { after = 1.5 }
      local journal = dir .. "/killed.jsonl"
      local pidfile = journal .. ".pid"
      assert.equal(0, h.sh(("env -u http_proxy -u https_proxy lua5.4 spec/support/bulk_job.lua %s %s %s 8 token 0 wait"
        .. " >/dev/null 2>&1 & echo $! > %s"):format(server.url, F.bulk, journal, pidfile)))
      local pid = assert(tonumber(h.read(pidfile):match("%d+")))
      os.remove(pidfile)
      local deadline = h.now() + 20
      while server:stats().retriggers < 40 and h.now() < deadline do h.sleep(0.02) end
      h.sh("kill -9 " .. pid)
      assert.equal(40, server:stats().retriggers)
      h.sleep(0.2)
      local posts = server:stats().posts
      local report = assert(client:retry_failed { flow_id = F.bulk, journal = journal, wait_runs = true,
        wait_backoff = BACKOFF, grace = 0 })
      assert.equal(posts, server:stats().posts) -- nothing re-triggered again
      assert.same({}, report.retriggered)
      assert.equal(40, #report.outcomes.succeeded)
      os.remove(journal)
    end)

    it("a resumed job follows what a stopped one left running, without re-triggering", function()
      server:outcomes { after = 1 }
      local journal = dir .. "/follow.jsonl"
      local first = assert(client:retry_failed { flow_id = F.bulk, journal = journal, wait_runs = true,
        wait_backoff = BACKOFF, stop = function()
          return server:stats().retriggers >= 40 and "stopped while following" or nil
        end })
      assert.equal("stopped while following", first.stopped)
      local posts = server:stats().posts
      h.sleep(1.1)
      local second = assert(client:retry_failed { flow_id = F.bulk, journal = journal, wait_runs = true,
        wait_backoff = BACKOFF })
      assert.equal(posts, server:stats().posts)
      assert.equal(40, #first.outcomes.succeeded + #second.outcomes.succeeded)
      assert.same({}, second.retriggered)
      os.remove(journal)
    end)
  end)
end)
