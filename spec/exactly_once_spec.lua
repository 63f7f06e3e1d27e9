-- Exactly once on every path: each way a re-trigger could go out twice, or
-- before its journal line is durable, injected as a fault and checked from
-- the fake's side (what it received and created), not from the client's.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local tls = require "spec.support.tls"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local BULK = fake.flows.bulk
local B = fake.bulk_runs
local sh, literal, tmp_journal, eligible_failed = h.sh, h.literal, h.tmp_journal, h.bulk_failed_ids
local FAST = { attempts = 4, base_delay = 0.01, max_delay = 0.1 }

local function entries_of(path)
  local list = {}
  local f = io.open(path)
  if not f then return list end
  for line in f:lines() do
    local ok, e = pcall(cjson.decode, line)
    if ok and type(e) == "table" then list[#list + 1] = e end
  end
  f:close()
  return list
end

-- No run re-triggered twice; every run once, or named in `unknown`.
local function assert_exactly_once(server, ids, unknown)
  local by_source = server:stats().by_source
  for _, id in ipairs(ids) do
    local n = by_source[id] or 0
    assert.is_true(n <= 1, id .. " was re-triggered " .. n .. " times")
    assert.is_true(n == 1 or (unknown and unknown[id]), id .. " was never re-triggered")
  end
end

local function posts_of(server)
  local list = {}
  for _, r in ipairs(server:requests()) do
    if r.method == "POST" and r.path:match("^/runs/") then list[#list + 1] = r end
  end
  return list
end

local function ims_credentials(server)
  return { client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
    scopes = fake.ims_client.scopes, ims_url = server.ims_url }
end

describe("exactly once", function()
  local server, journal

  local function new(extra)
    local o = h.opts(server.url, { retry = FAST })
    for k, v in pairs(extra or {}) do o[k] = v end
    if o.credentials then o.access_token = nil end
    return flowservice.new(o)
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function()
    server:reset()
    journal = tmp_journal()
  end)
  after_each(function() os.remove(journal) end)

  describe("1. libcurl's silent resend", function()
    it("is refused in the bulk job: the dead connection's run is ambiguous, then settled, never doubled", function()
      local victim = fake.bulk_run_id(12)
      server:scenario { match = "^POST /runs/" .. literal(victim), act_then_delay = 0, drop = "after" }
      local client = new()
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, concurrency = 4 })
      assert.same({ victim }, (function()
        local ids = {}
        for _, a in ipairs(report.ambiguous) do ids[#ids + 1] = a.run_id end
        return ids
      end)())
      assert.is_true(report.ambiguous[1].why:find("network", 1, true) ~= nil, report.ambiguous[1].why)
      local sent = 0
      for _, r in ipairs(posts_of(server)) do
        if r.path:find(victim, 1, true) then sent = sent + 1 end
      end
      assert.equal(1, sent)
      assert_exactly_once(server, eligible_failed())
      -- the next job settles it by linkage, and sends nothing for it
      local again = assert(client:retry_failed { flow_id = BULK, journal = journal, grace = 0 })
      client:close()
      assert.same({}, again.ambiguous)
      assert.same({}, again.retriggered)
      assert.equal("done", again.settled[1].outcome)
      assert_exactly_once(server, eligible_failed())
    end)

    it("is refused for HTTP/2 streams of the bulk job too", function()
      local pki = tls.make()
      local h2 = fake.start { tls = { cert = pki.cert, key = pki.key, http2 = true } }
      local victim = fake.bulk_run_id(20)
      h2:scenario { match = "^POST /runs/" .. literal(victim), act_then_delay = 0, drop = "after" }
      local client = flowservice.new(h.opts(h2.tls_url, { ca_file = pki.ca_file, retry = FAST }))
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, concurrency = 8 })
      client:close()
      local by_source = h2:stats().by_source
      for _, id in ipairs(eligible_failed()) do
        local n = by_source[id] or 0
        assert.is_true(n <= 1, id .. " was re-triggered " .. n .. " times")
        assert.is_true(n == 1, id .. " was never re-triggered")
      end
      local posted = 0
      for _, r in ipairs(posts_of(h2)) do
        if r.path:find(victim, 1, true) then posted = posted + 1 end
      end
      assert.equal(1, posted)
      assert.equal(1, #report.ambiguous)
      h2:stop()
      tls.remove(pki)
    end)
  end)

  describe("2. the pending line is durable before the request leaves", function()
    it("even when every token fetch stalls and tokens live 60 s (killed at the first POST)", function()
      server:ims { expires_in = 60 }
      server:scenario { match = "^POST /ims/", delay = 1, times = 0 }
      server:scenario { match = "^POST /runs/", act_then_delay = 30, times = 0 }
      local pidfile = journal .. ".pid"
      assert.equal(0, sh(("env -u http_proxy -u https_proxy lua5.4 spec/support/bulk_job.lua %s %s %s 4 ims "
        .. ">/dev/null 2>&1 & echo $! > %s"):format(server.url, BULK, journal, pidfile)))
      local f = assert(io.open(pidfile))
      local pid = assert(tonumber(f:read("*l")))
      f:close()
      os.remove(pidfile)
      local reached = server:wait_for_posts(1, 20)
      sh("kill -9 " .. pid)
      assert.is_true(reached, "the job never sent")
      local pending = {}
      for _, e in ipairs(entries_of(journal)) do
        if e.state == "pending" then pending[e.request_id] = e.run end
      end
      local posts = posts_of(server)
      assert.is_true(#posts >= 1)
      for _, r in ipairs(posts) do
        local id = r.path:match("^/runs/([^/]+)/action$")
        assert.equal(id, pending[r.headers["x-request-id"]], "POST for " .. id .. " left before its pending line")
      end
      server:scenario {} -- nothing more stalls
      server:reset()
    end)
  end)

  describe("3. aborted transfers count as sent", function()
    local F = require "spec_fork"

    -- fn() in a forked child: 0 when it returned true. The verdict comes
    -- back in a file, and the child ends by SIGKILL: it forgets its parent's
    -- handles on purpose, and valgrind's leak check at its exit would say so.
    local function in_child(fn)
      local verdict = journal .. ".child"
      io.stdout:flush()
      io.stderr:flush()
      local pid = F.fork()
      if pid == 0 then
        local ok, good = pcall(fn)
        local f = io.open(verdict, "w")
        if f then
          f:write(ok and good and "0" or "1")
          f:close()
        end
        os.execute("kill -KILL " .. F.getpid())
        F.exit(0)
      end
      F.wait(pid)
      local f = io.open(verdict)
      local status = f and tonumber(f:read("*a"))
      if f then f:close() end
      os.remove(verdict)
      return status
    end

    it("a forked child never repeats the re-trigger its parent has in flight", function()
      server:scenario { match = "^POST ", act_then_delay = 0.5 }
      local client = new { wait = function(s) coroutine.yield(s) end }
      local co = coroutine.create(function() return client:retrigger(h.runs.failed) end)
      repeat
        assert(coroutine.resume(co))
      until server:stats().posts == 1 -- the parent's POST is out
      local status = in_child(function()
        local ok, run, err = coroutine.resume(co)
        return ok and run == nil and err.sent == true and err.ambiguous == true and err.attempts == 1
      end)
      assert.equal(0, status, "the child repeated the request or did not call it ambiguous")
      local ok, run, err
      repeat
        ok, run, err = coroutine.resume(co)
        assert(ok, run)
        h.sleep(0.01)
      until coroutine.status(co) == "dead"
      client:close()
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.equal(1, server:stats().posts)
      assert.equal(1, server:stats().by_source[h.runs.failed])
    end)

    it("a forked child never makes its parent's next request id (journal lines stay apart)", function()
      local core = require "flowservice.core"
      local o = h.opts(server.url)
      local raw = core.new(o)
      raw:prepare_retrigger(h.runs.failed, o):cancel() -- random bytes kept for the next ids
      local file = journal .. ".ids"
      local status = in_child(function()
        local f = assert(io.open(file, "w"))
        for _ = 1, 3 do
          local t = raw:prepare_retrigger(h.runs.failed, o)
          f:write(t:request_id(), "\n")
          t:cancel()
        end
        f:close()
        return true
      end)
      assert.equal(0, status)
      local child = {}
      for line in io.lines(file) do child[line] = true end
      os.remove(file)
      for _ = 1, 3 do
        local t = raw:prepare_retrigger(h.runs.failed, o)
        assert.is_nil(child[t:request_id()], "the child made the parent's request id " .. t:request_id())
        t:cancel()
      end
      raw:close()
    end)

    it("a child's close and collection leave the parent's TLS connection alone", function()
      local pki = tls.make()
      local s2 = fake.start { tls = { cert = pki.cert, key = pki.key } }
      local client = flowservice.new(h.opts(s2.tls_url, { ca_file = pki.ca_file, retry = FAST }))
      assert.is_table((client:get_run(h.runs.failed)))
      local core = require "flowservice.core"
      local raw = core.new(h.opts(s2.tls_url, { ca_file = pki.ca_file }))
      assert.is_table((raw:request(h.opts(s2.tls_url, { ca_file = pki.ca_file }),
        { method = "GET", path = { "runs", h.runs.failed } })))
      local prepared = raw:prepare_retrigger(h.runs.failed, h.opts(s2.tls_url, { ca_file = pki.ca_file }))
      local status = in_child(function()
        prepared = nil -- collected here: forgotten, not freed
        client:close()
        raw = nil
        collectgarbage()
        collectgarbage()
        return true
      end)
      assert.equal(0, status)
      assert.is_table((client:get_run(h.runs.failed)))
      local log = s2:requests()
      assert.equal(3, #log)
      assert.equal(log[1].connection, log[3].connection) -- still the first connection, alive
      client:close()
      prepared:cancel()
      raw:close()
      s2:stop()
      tls.remove(pki)
    end)
  end)

  describe("4. retrigger by id keeps memory", function()
    it("refuses a run its journal holds as done, and one whose children show a re-trigger; force goes on", function()
      local client = new()
      local id = fake.bulk_run_id(3)
      local first = assert(client:retry_failed { run_ids = { id }, journal = journal })
      assert.equal(1, #first.retriggered)
      local second = assert(client:retry_failed { run_ids = { id }, journal = journal })
      assert.same({}, second.retriggered)
      assert.equal("already re-triggered (journal)", second.skipped[1].reason)
      -- a fresh journal: the run's childFlowRunIds still tell
      local other = tmp_journal()
      local third = assert(client:retry_failed { run_ids = { id }, journal = other })
      assert.equal("already re-triggered (childFlowRunIds)", third.skipped[1].reason)
      assert.equal(1, server:stats().by_source[id])
      local forced = assert(client:retry_failed { run_ids = { id }, journal = other, force = true })
      client:close()
      assert.equal(1, #forced.retriggered)
      assert.is_true(forced.retriggered[1].forced)
      assert.equal(2, server:stats().by_source[id])
      local states = {}
      for _, e in ipairs(entries_of(other)) do
        if e.run == id then states[#states + 1] = e.state end
      end
      assert.same({ "pending", "done" }, states)
      os.remove(other)
    end)

    it("gives each run its flow's journal, sends with If-Match, and reports a run it cannot read", function()
      local client = new()
      local a, b = fake.bulk_run_id(5), h.runs.failed
      local paths = {}
      local report = assert(client:retry_failed { run_ids = { a, b, h.runs.unknown, a },
        journal = function(flow_id)
          paths[flow_id] = journal .. "." .. flow_id
          return paths[flow_id]
        end })
      client:close()
      assert.equal(2, #report.retriggered)
      assert.equal(1, #report.failed)
      assert.equal(h.runs.unknown, report.failed[1].run_id)
      assert.equal(2, #report.journals)
      for flow, path in pairs(paths) do
        for _, e in ipairs(entries_of(path)) do
          if e.run then assert.equal(flow, e.flow) end
        end
        os.remove(path)
      end
      assert.is_string(paths[BULK])
      assert.is_string(paths[fake.flows.enabled])
      for _, r in ipairs(posts_of(server)) do assert.is_string(r.headers["if-match"]) end
    end)

    it("takes exactly one of flow_id and run_ids", function()
      local client = new()
      assert.error_matches(function() client:retry_failed { journal = false } end,
        "spec takes exactly one of 'flow_id', 'run_ids' and 'all_flows'")
      assert.error_matches(function() client:retry_failed { flow_id = BULK, run_ids = { "a" } } end,
        "spec takes exactly one of 'flow_id', 'run_ids' and 'all_flows'")
      assert.error_matches(function() client:retry_failed { run_ids = {} } end, "non%-empty list")
      assert.error_matches(function() client:retry_failed { run_ids = { "a/b" } } end, "run id")
      assert.error_matches(function() client:retry_failed { flow_id = BULK, force = true } end,
        "spec field 'force' needs 'run_ids'")
      assert.error_matches(function() client:retry_failed { run_ids = { "a" }, since = 1 } end,
        "spec field 'since' needs 'flow_id'")
      client:close()
      assert.same({}, server:requests())
    end)
  end)

  describe("5. resolve decides only what is unknown", function()
    it("refuses a run never sent, an unknown one and a done one; writes nothing, keeps no lock", function()
      local client = new()
      local done_id = fake.bulk_run_id(1)
      assert(client:retry_failed { run_ids = { done_id }, journal = journal })
      local before = #entries_of(journal)
      server:reset()
      for _, case in ipairs {
        { done_id, "done", "is done in the journal" },
        { done_id, "retry", "is done in the journal" },
        { fake.bulk_run_id(2), "done", "is not in the journal" },
        { "no-such-run", "done", "is not in the journal" },
      } do
        assert.error_matches(function()
          client:retry_failed { flow_id = BULK, journal = journal, resolve = { [case[1]] = case[2] } }
        end, "run " .. literal(case[1]) .. " " .. case[3])
      end
      assert.equal(before, #entries_of(journal))
      assert.same({}, server:requests())
      local j = assert(require("flowservice.core").journal_open(journal)) -- not left locked
      j:close()
      client:close()
    end)
  end)

  describe("6. a revoked token", function()
    local function job(extra_spec, on_done)
      local client = new { credentials = ims_credentials(server) }
      local seen = 0
      local spec = { flow_id = BULK, journal = journal, concurrency = 8, on_progress = function(c)
        if c.done ~= seen then
          seen = c.done
          on_done(seen)
        end
      end }
      for k, v in pairs(extra_spec or {}) do spec[k] = v end
      local report, err = client:retry_failed(spec)
      client:close()
      return report, err
    end

    it("is refreshed once per refused token by every call, and the job finishes", function()
      local revoked = {}
      local report, err = job(nil, function(done)
        for _, at in ipairs { 5, 20 } do
          if done >= at and not revoked[at] then
            revoked[at] = true
            server:expire_tokens()
          end
        end
      end)
      assert.is_nil(err)
      assert.equal(B.failed.count, #report.retriggered)
      assert.same({}, report.failed)
      assert.same({}, report.ambiguous)
      assert.is_true(server:stats().ims >= 3)
      assert_exactly_once(server, eligible_failed())
    end)

    it("ends the job as kind auth when IMS refuses the refresh", function()
      local refused = false
      local report, err = job(nil, function(done)
        if done >= 5 and not refused then
          refused = true
          server:scenario { match = "^POST /ims/", status = 401, times = 0,
            body = '{"error":"invalid_client","error_description":"revoked for the test"}' }
          server:expire_tokens()
        end
      end)
      assert.is_nil(report)
      assert.equal("auth", err.kind)
      assert.is_true(#err.report.retriggered >= 5)
      local by_source = server:stats().by_source
      for _, id in ipairs(eligible_failed()) do assert.is_true((by_source[id] or 0) <= 1) end
      server:scenario {}
    end)
  end)

  describe("stopping (an interrupt)", function()
    it("stops sending, finishes and journals what is in flight, and the next job resumes", function()
      server:scenario { match = "^POST /runs/", delay = 0.05, times = 0 }
      local client = new()
      local done = 0
      local report = assert(client:retry_failed { flow_id = BULK, journal = journal, concurrency = 4,
        on_progress = function(c) done = c.done end,
        stop = function() return done >= 6 and "told to stop" or nil end })
      assert.equal("told to stop", report.stopped)
      assert.is_true(report.not_attempted > 0)
      assert.equal(B.failed.count, #report.retriggered + report.not_attempted)
      local states = {}
      for _, e in ipairs(entries_of(journal)) do if e.run then states[e.run] = e.state end end
      for _, r in ipairs(report.retriggered) do assert.equal("done", states[r.run_id]) end
      local rest = assert(client:retry_failed { flow_id = BULK, journal = journal })
      client:close()
      assert.equal(report.not_attempted, #rest.retriggered)
      assert_exactly_once(server, eligible_failed())
    end)
  end)
end)
