-- client:retry_failed: eligibility, concurrency, 429s, the circuit breaker,
-- the journal, settling unknown outcomes, and kill-and-resume.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local sh, literal, tmp_journal, eligible_failed = h.sh, h.literal, h.tmp_journal, h.bulk_failed_ids
local BULK = fake.flows.bulk
local B = fake.bulk_runs

local function lines_of(path)
  local list = {}
  local f = io.open(path)
  if not f then return list end
  for line in f:lines() do list[#list + 1] = line end
  f:close()
  return list
end

-- Re-triggers per source run, as the fake counted them (whatever linkage says).
local function children(server)
  return server:stats().by_source
end

describe("client:retry_failed", function()
  local server, client, journal

  local function new(extra)
    return flowservice.new(h.opts(server.url, extra or { retry = { base_delay = 0.01, max_delay = 0.1 } }))
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function()
    server:reset()
    journal = tmp_journal()
    client = new()
  end)
  after_each(function()
    client:close()
    os.remove(journal)
  end)

  describe("eligibility", function()
    it("re-triggers every failed run once, each with If-Match: its etag", function()
      local report, err = client:retry_failed { flow_id = BULK, journal = journal }
      assert.is_nil(err)
      assert.equal(B.failed.count, report.considered)
      assert.equal(B.failed.count, #report.retriggered)
      assert.same({}, report.failed)
      assert.same({}, report.ambiguous)
      assert.is_number(report.elapsed)
      local posts = 0
      for _, r in ipairs(server:requests()) do
        if r.method == "POST" then
          posts = posts + 1
          local id = r.path:match("^/runs/([^/]+)/action$")
          assert.equal(server:run(id).etag, r.headers["if-match"])
        end
      end
      assert.equal(B.failed.count, posts)
      local by_parent = children(server)
      for _, id in ipairs(eligible_failed()) do assert.equal(1, by_parent[id]) end
      for _, entry in ipairs(report.retriggered) do
        assert.is_string(entry.new_id)
        assert.is_string(entry.etag)
        assert.is_string(entry.request_id)
        assert.equal(entry.run_id, server:run(entry.new_id).parentFlowRunId)
      end
    end)

    it("adds successful runs with 0 records only when asked, and skips what cannot be re-triggered", function()
      local report = assert(client:retry_failed { flow_id = BULK, journal = false,
        status = { "failed", "success", "partialSuccess" } })
      assert.equal(B.failed.count, #report.retriggered)
      local reasons = {}
      for _, s in ipairs(report.skipped) do reasons[s.run_id] = s.reason end
      assert.matches("zero_record_success", reasons[fake.bulk_run_id(1, "success_empty")])
      assert.matches("status success cannot be re%-triggered", reasons[fake.bulk_run_id(1, "success_records")])
      assert.matches("status partialsuccess cannot be re%-triggered", reasons[fake.bulk_run_id(1, "partialSuccess")])
      server:reset()
      report = assert(client:retry_failed { flow_id = BULK, journal = false, zero_record_success = true })
      assert.equal(B.failed.count + B.success_empty.count, #report.retriggered)
    end)

    it("plans without sending or writing on a dry run", function()
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, dry_run = true })
      assert.is_true(report.dry_run)
      assert.equal(B.failed.count, #report.planned)
      assert.same({}, report.retriggered)
      assert.equal(0, server:stats().posts)
      assert.is_nil(io.open(journal))
    end)

    it("raises on a bad spec, before any request", function()
      assert.error_matches(function() client:retry_failed { flow = BULK } end,
        "bad argument #1 to 'retry_failed' %(spec field 'flow' is unknown%)")
      assert.error_matches(function() client:retry_failed { flow_id = BULK, concurrency = 0 } end,
        "spec field 'concurrency' must be a whole number >= 1")
      assert.error_matches(function() client:retry_failed { flow_id = BULK, resolve = { x = "maybe" } } end,
        "spec field 'resolve' maps run ids")
      assert.same({}, server:requests())
    end)

    it("names the caller's line in a bad spec's error, as luaL_argerror does", function()
      local lease_journal = journal .. ".lease"
      for _, spec in ipairs {
        { flow = BULK }, { flow_id = BULK, concurrency = 0 }, { flow_id = BULK, since = "yesterday-ish" },
        { flow_id = BULK, journal = lease_journal, lease = 0.5 },
        { flow_id = BULK, journal = journal, resolve = { [h.runs.unknown] = "done" } },
      } do
        local ok, err = pcall(function() client:retry_failed(spec) end)
        assert.is_false(ok)
        assert.matches("^[^:]*bulk_spec%.lua:%d+: bad argument #1 to 'retry_failed' %(", err)
      end
      assert.same({}, server:requests())
    end)
  end)

  describe("why runs failed", function()
    local function add_failed(code, nested)
      return server:add_run { flowId = BULK, status = "failed", outputRecordCount = 0,
        errors = { { code = code, message = "failed with " .. code,
          nestedErrors = nested and { { code = nested, message = "caused by " .. nested } } or nil } } }
    end

    it("carries each source run's errors and start time, and counts runs by first code", function()
      local a = add_failed("CONNECTOR-1001-500")
      local report = assert(client:retry_failed { flow_id = BULK, journal = false, dry_run = true })
      assert.equal(B.failed.count + 1, #report.planned)
      local planned = {}
      for _, p in ipairs(report.planned) do planned[p.run_id] = p end
      assert.same({ { code = "CONNECTOR-1001-500", message = "failed with CONNECTOR-1001-500" } },
        planned[a.id].errors)
      assert.equal(a.metrics.durationSummary.startedAtUTC, planned[a.id].started)
      assert.equal("CONNECTOR-2001-500", planned[fake.bulk_run_id(1)].errors[1].code)
      assert.same({ ["CONNECTOR-2001-500"] = B.failed.count, ["CONNECTOR-1001-500"] = 1 }, report.by_code)
      report = assert(client:retry_failed { flow_id = BULK, journal = false })
      for _, r in ipairs(report.retriggered) do assert.is_string(r.errors[1].code) end
    end)

    it("re-triggers only runs with a matching code (any code, nested too, by prefix), or skips excluded ones", function()
      local a = add_failed("CONNECTOR-1001-500")
      local b = add_failed("CONNECTOR-3000-500", "INGEST-1212-400")
      local only = assert(client:retry_failed { flow_id = BULK, journal = false,
        codes = { "CONNECTOR-1001", "INGEST-1212" } })
      local ids = {}
      for _, r in ipairs(only.retriggered) do ids[#ids + 1] = r.run_id end
      table.sort(ids)
      local want = { a.id, b.id }
      table.sort(want)
      assert.same(want, ids)
      assert.equal("no error code matching CONNECTOR-1001,INGEST-1212", only.skipped[1].reason)
      server:reset()
      add_failed("CONNECTOR-1001-500")
      local excluded = assert(client:retry_failed { flow_id = BULK, journal = false,
        exclude_codes = { "CONNECTOR-2001" } })
      assert.equal(1, #excluded.retriggered)
      assert.equal(B.failed.count, #excluded.skipped)
      assert.equal("excluded error code CONNECTOR-2001-500", excluded.skipped[1].reason)
    end)

    it("takes since and before as time strings too, and says its window", function()
      local report = assert(client:retry_failed { flow_id = BULK, journal = false, dry_run = true,
        since = "2025-12-17T19:33:20Z", before = "2025-12-17T19:43:20Z" })
      assert.equal(1766000000000, report.window.since)
      assert.equal(1766000600000, report.window.before)
      assert.is_true(#report.planned >= 1 and #report.planned < B.failed.count)
      assert.error_matches(function() client:retry_failed { flow_id = BULK, since = "soon" } end,
        "spec field 'since' \"soon\" is not a time")
      assert.error_matches(function() client:retry_failed { flow_id = BULK, codes = { "" } } end,
        "spec field 'codes' entry 1 must be a non%-empty string")
    end)
  end)

  describe("concurrency", function()
    it("keeps up to concurrency re-triggers in flight in one thread", function()
      server:scenario { match = "^POST ", delay = 0.2, times = 0 }
      local t0 = h.now()
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, concurrency = 8 })
      local elapsed = h.now() - t0
      assert.equal(B.failed.count, #report.retriggered)
      assert.equal(8, server:stats().max_in_flight)
      assert.is_true(elapsed < 40 * 0.2 / 2, "took " .. elapsed .. " s") -- far from sequential
    end)

    it("slows down on 429s and loses no run", function()
      server:scenario { match = "^POST ", status = 429, retry_after = "0", times = 15 }
      local progress = {}
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, concurrency = 8,
        on_progress = function(c) progress[#progress + 1] = c end })
      assert.equal(B.failed.count, #report.retriggered)
      assert.same({}, report.failed)
      local by_parent = children(server)
      for _, id in ipairs(eligible_failed()) do assert.equal(1, by_parent[id]) end
      assert.equal(B.failed.count + 15, server:stats().posts)
      local last = progress[#progress]
      assert.equal(B.failed.count, last.done)
      assert.equal(0, last.in_flight)
      assert.equal(0, last.queued)
    end)
  end)

  describe("errors that every run would get", function()
    it("stop the job at once: flow not enabled", function()
      server:behaviour { }
      local disabled_client = client
      local report, err = disabled_client:retry_failed { flow_id = fake.flows.disabled, journal = journal }
      -- the disabled flow has one failed run: it is refused, and the error says why
      assert.is_nil(report)
      assert.equal("FLOW-1388-400", err.code)
      assert.is_table(err.report)
    end)

    it("stop the job at once: 403 on every call, without hundreds of failures", function()
      local bad = new { api_key = "wrong-key" }
      local t0 = h.now()
      local report, err = bad:retry_failed { flow_id = fake.paging_flow, journal = false, concurrency = 4 }
      bad:close()
      assert.is_nil(report)
      assert.equal(403, err.status)
      assert.is_true(h.now() - t0 < 5)
      assert.same({}, err.report.failed)
      local posts = server:stats().posts
      assert.is_true(posts <= 4, posts .. " POSTs")
    end)
  end)

  describe("outcomes", function()
    it("re-reads a run answered 412 and tries it again with its new etag", function()
      local id = fake.bulk_run_id(3, "failed")
      server:scenario { match = "^POST /runs/" .. literal(id), status = 412,
        body = '{"type":"https://ns.adobe.com/aep/errors/FLOW-1404-412","status":412}' }
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal })
      assert.equal(B.failed.count, #report.retriggered)
      assert.equal(1, children(server)[id])
    end)

    it("reports a 503 after sending as ambiguous, journaled, and does not repeat it", function()
      local id = fake.bulk_run_id(5, "failed")
      server:scenario { match = "^POST /runs/" .. literal(id), status = 503 }
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal })
      assert.equal(B.failed.count - 1, #report.retriggered)
      assert.equal(1, #report.ambiguous)
      assert.equal(id, report.ambiguous[1].run_id)
      assert.matches("HTTP 503", report.ambiguous[1].why)
      assert.is_nil(children(server)[id])
      local posts = 0
      for _, r in ipairs(server:requests()) do
        if r.method == "POST" and r.path:find(id, 1, true) then posts = posts + 1 end
      end
      assert.equal(1, posts)
    end)

    it("keeps no secret in the journal", function()
      assert(client:retry_failed { flow_id = BULK, journal = journal })
      local text = table.concat(lines_of(journal), "\n")
      assert.not_matches("fake-token", text, 1, true)
      assert.not_matches("fake-api-key", text, 1, true)
      sh("stat -c %a " .. journal .. " > " .. journal .. ".mode")
      assert.equal("600", lines_of(journal .. ".mode")[1])
      os.remove(journal .. ".mode")
    end)
  end)

  describe("the journal", function()
    it("makes a second identical job a no-op", function()
      assert(client:retry_failed { flow_id = BULK, journal = journal })
      local posts = server:stats().posts
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal })
      assert.same({}, report.retriggered)
      assert.equal(B.failed.count, #report.skipped)
      assert.equal("already re-triggered (journal)", report.skipped[1].reason)
      assert.equal(posts, server:stats().posts)
    end)

    it("lets one job at a time hold it", function()
      local core = require "flowservice.core"
      local held = assert(core.journal_open(journal))
      local report, err = client:retry_failed { flow_id = BULK, journal = journal }
      held:close()
      assert.is_nil(report)
      assert.equal("journal", err.kind)
      assert.matches("in use by another job", err.message)
      assert.equal(0, server:stats().posts)
    end)

    it("skips a torn last line", function()
      local f = assert(io.open(journal, "w"))
      f:write('{"run":"' .. fake.bulk_run_id(1) .. '","state":"do')
      f:close()
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal })
      assert.equal(B.failed.count, #report.retriggered)
      for _, line in ipairs(lines_of(journal)) do
        if line:find('"state":"done"', 1, true) then assert.is_table(cjson.decode(line)) end
      end
    end)

    it("settles a 503 that was acted upon by linkage, and resolves by decision", function()
      local acted = fake.bulk_run_id(7, "failed")
      local unacted = fake.bulk_run_id(8, "failed")
      server:scenario { match = "^POST /runs/" .. literal(acted), act_then_delay = 0, status = 503 }
      server:scenario { match = "^POST /runs/" .. literal(unacted), status = 503 }
      local first = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      assert.equal(2, #first.ambiguous)
      local second = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      local settled = {}
      for _, s in ipairs(second.settled) do settled[s.run_id] = s end
      assert.equal("done", settled[acted].outcome)
      assert.equal("linkage", settled[acted].evidence)
      -- no child: counting finds nothing unaccounted, so it never happened
      assert.equal("retry", settled[unacted].outcome)
      assert.equal("count", settled[unacted].evidence)
      assert.equal(1, #second.retriggered)
      assert.equal(unacted, second.retriggered[1].run_id)
      local by_parent = children(server)
      assert.equal(1, by_parent[acted])
      assert.equal(1, by_parent[unacted])
    end)

    it("takes an operator's decision for what stays ambiguous", function()
      server:behaviour { linkage = false }
      local a, b = fake.bulk_run_id(9, "failed"), fake.bulk_run_id(10, "failed")
      server:scenario { match = "^POST /runs/" .. literal(a), act_then_delay = 0, status = 503 }
      server:scenario { match = "^POST /runs/" .. literal(b), status = 503 }
      assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      -- one of two acted, no linkage, no etag change: counting cannot tell which
      local second = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      assert.equal(2, #second.ambiguous)
      local third = assert(client:retry_failed { flow_id = BULK, journal = journal,
        resolve = { [a] = "done", [b] = "retry" } })
      assert.same({}, third.ambiguous)
      assert.equal(1, #third.retriggered)
      assert.equal(b, third.retriggered[1].run_id)
    end)

    it("settles by If-Match where the server changes a run's etag on re-trigger", function()
      server:behaviour { linkage = false, etag_changes = true }
      local a, b = fake.bulk_run_id(11, "failed"), fake.bulk_run_id(12, "failed")
      server:scenario { match = "^POST /runs/" .. literal(a), act_then_delay = 0, status = 503 }
      server:scenario { match = "^POST /runs/" .. literal(b), status = 503 }
      assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      local second = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      local settled = {}
      for _, s in ipairs(second.settled) do settled[s.run_id] = s end
      assert.equal("if-match", settled[a].evidence)
      assert.equal("done", settled[a].outcome)
      assert.equal("if-match", settled[b].evidence)
      assert.equal("done", settled[b].outcome) -- it had not been done; now it has, once
      assert.same({}, second.ambiguous)
      local by_source = children(server)
      assert.equal(1, by_source[a])
      assert.equal(1, by_source[b])
      assert.equal(B.failed.count, server:stats().retriggers)
    end)
  end)

  describe("killed at any moment", function()
    -- K quick answers, then C requests that the server performs but never
    -- answers: the job is SIGKILLed with those in flight, then started again.
    local function kill_and_resume(k, c, behaviour, meanwhile)
      if behaviour then server:behaviour(behaviour) end
      if k > 0 then server:scenario { match = "^POST ", times = k } end
      server:scenario { match = "^POST ", act_then_delay = 30, times = c }
      local pidfile = journal .. ".pid"
      assert.equal(0, sh(("env -u http_proxy -u https_proxy lua5.4 spec/support/bulk_job.lua %s %s %s %d "
        .. ">/dev/null 2>&1 & echo $! > %s"):format(server.url, BULK, journal, c, pidfile)))
      local pid = assert(tonumber(lines_of(pidfile)[1]))
      os.remove(pidfile)
      local reached = server:wait_for_posts(k + c, 20)
      sh("kill -9 " .. pid)
      assert.is_true(reached, "the job never sent its requests")
      for _ = 1, 100 do -- gone, or a zombie nobody reaped yet
        local stat = io.open("/proc/" .. pid .. "/stat")
        local state = stat and stat:read("*l"):match("%) (%a)")
        if stat then stat:close() end
        if not state or state == "Z" then break end
        sh("sleep 0.05")
      end
      if meanwhile then meanwhile() end
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      local by_parent = children(server)
      local ambiguous = {}
      for _, a in ipairs(report.ambiguous) do ambiguous[a.run_id] = true end
      for _, id in ipairs(eligible_failed()) do
        local n = by_parent[id] or 0
        assert.is_true(n <= 1, id .. " was re-triggered " .. n .. " times")
        assert.is_true(n == 1 or ambiguous[id], id .. " was dropped")
      end
      return report
    end

    it("after the first request (nothing learned yet: counting)", function()
      local report = kill_and_resume(0, 1)
      assert.same({}, report.ambiguous)
      assert.equal("count", report.settled[1].evidence)
    end)

    it("mid-batch, with linkage", function()
      local report = kill_and_resume(5, 4)
      assert.same({}, report.ambiguous)
      for _, s in ipairs(report.settled) do assert.equal("linkage", s.evidence) end
    end)

    it("mid-batch, by If-Match", function()
      local report = kill_and_resume(3, 4, { linkage = false, etag_changes = true })
      assert.same({}, report.ambiguous)
      for _, s in ipairs(report.settled) do assert.equal("if-match", s.evidence) end
    end)

    it("by counting, while the scheduler and another user add runs to the flow", function()
      local report = kill_and_resume(10, 3, { linkage = false, etag_changes = false }, function()
        server:add_run { flowId = BULK, status = "inProgress", createdClient = "scheduler" }
        server:add_run { flowId = BULK, status = "inProgress", createdClient = "someone-else" }
      end)
      assert.same({}, report.ambiguous)
      assert.equal(3, #report.settled)
      for _, s in ipairs(report.settled) do
        assert.equal("count", s.evidence)
        assert.equal("done", s.outcome)
      end
    end)

    it("keeps them ambiguous when counting cannot tell", function()
      local report = kill_and_resume(10, 3, { linkage = false, etag_changes = false }, function()
        -- one more run by this very client, that no journal line explains
        server:add_run { flowId = BULK, status = "inProgress", createdClient = "fake-api-key" }
      end)
      assert.equal(3, #report.ambiguous)
      for _, s in ipairs(report.settled) do assert.equal("ambiguous", s.outcome) end
    end)

    it("late in the job, by counting", function()
      local report = kill_and_resume(30, 6, { linkage = false, etag_changes = false })
      assert.same({}, report.ambiguous)
      for _, s in ipairs(report.settled) do assert.equal("count", s.evidence) end
    end)
  end)
end)
