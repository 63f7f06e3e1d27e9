-- The PostgreSQL journal against a real PostgreSQL the suite starts
-- (spec/support/pg.lua) and the fake Flow Service: the schema, claims,
-- leases, many jobs at once in many processes, SIGKILLs, a database
-- restart, bad input, and waiting without blocking.
local flowservice = require "flowservice"
local journal = require "flowservice.journal"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local pgserver = require "spec.support.pg"
local cjson = require "cjson"

local BULK = fake.flows.bulk
local B = fake.bulk_runs
local WIDE = "5b0e7a11-0000-4000-8000-000000000300" -- a flow of 300 failed runs (fixture below)
local WIDE_RUNS = 300
local q = h.q

local function wide_run_id(i) return ("5b0e7a11-0000-4000-8000-%012d"):format(i) end

-- the project's fixture plus the wide flow
local function fixture()
  local doc = cjson.decode((assert(h.read("fake/runs.json"))))
  doc.flows[#doc.flows + 1] = { id = WIDE, name = "wide flow", enabled = true, source = "batch" }
  doc.generated[#doc.generated + 1] = { flowId = WIDE, count = WIDE_RUNS, status = "failed",
    id_prefix = "5b0e7a11", start = 1764000000000, step_ms = 1000, duration_ms = 500,
    outputRecordCount = 0, createdClient = "scheduler" }
  local path = os.tmpname()
  h.write(path, cjson.encode(doc))
  return path
end

local function read(path) return h.read(path) or "" end

local wait_gone = h.wait_gone

describe("#postgresql journal", function()
  local server, db, dir, fixture_path, client
  local ORG, SANDBOX = fake.credentials.org, fake.credentials.sandbox

  local function new_client(extra)
    return flowservice.new(h.opts(server.url, extra or { retry = { base_delay = 0.01, max_delay = 0.1 } }))
  end

  setup(function()
    fixture_path = fixture()
    server = fake.start { fixture = fixture_path }
    db = pgserver.start()
    dir = assert(io.popen("mktemp -d /tmp/flowservice-pgspec.XXXXXX")):read("*l")
  end)
  teardown(function()
    if server then server:stop() end
    if db then db:destroy() end
    if dir then h.sh("rm -rf " .. q(dir)) end
    if fixture_path then os.remove(fixture_path) end
  end)
  before_each(function()
    server:reset()
    db:psql("DROP TABLE IF EXISTS flowservice_journal")
    client = new_client()
  end)
  after_each(function() client:close() end)

  local function count(sql) return tonumber((db:psql(sql):match("%d+"))) end

  -- a job in a process of its own: pid, output file
  local jobs = 0
  local function start_job(flow, concurrency, lease, grace, env)
    jobs = jobs + 1
    local state_dir = dir .. "/host-" .. jobs
    h.sh("mkdir -p " .. q(state_dir))
    local out, pidfile = state_dir .. "/out", state_dir .. "/pid"
    assert.equal(0, h.sh(("env -u http_proxy -u https_proxy XDG_STATE_HOME=%s %s lua5.4 spec/support/pg_job.lua"
      .. " %s %s %s %d %s %s >%s 2>&1 & echo $! >%s"):format(q(state_dir), env or "", q(server.url), q(flow),
      q(db.uri), concurrency, tostring(lease), tostring(grace), q(out), q(pidfile))))
    return assert(tonumber(read(pidfile):match("%d+"))), out
  end

  local function result_of(out)
    local line = read(out):match("[^\n]*\n?$")
    local doc = cjson.decode(line ~= "" and line or "null")
    assert(type(doc) == "table", "job printed: " .. read(out))
    return doc
  end

  describe("schema", function()
    it("is created on first use, with a schema-version row, and a second job skips what the first did", function()
      local report = assert(client:retry_failed { flow_id = BULK, journal = db.uri })
      assert.equal(B.failed.count, #report.retriggered)
      assert.equal("2", db:psql("SELECT entry->>'version' FROM flowservice_journal WHERE run = 'schema-version'")
        :match("%d+"))
      assert.equal(B.failed.count, count("SELECT count(*) FROM flowservice_journal WHERE state = 'done'"))
      local again = assert(client:retry_failed { flow_id = BULK, journal = db.uri })
      assert.equal(0, #again.retriggered)
      assert.equal(B.failed.count, #again.skipped)
      for _, s in ipairs(again.skipped) do
        assert.matches("already re%-triggered", s.reason)
      end
      assert.equal(B.failed.count, server:stats().posts)
    end)

    it("journal.migrate creates or upgrades it; a newer or older schema is refused at open", function()
      assert.same({ from = 0, to = 2 }, assert(journal.migrate(db.uri)))
      assert.same({ from = 2, to = 2 }, assert(journal.migrate(db.uri)))
      db:psql("UPDATE flowservice_journal SET entry = '{\"version\": 99}' WHERE run = 'schema-version'")
      local _, err = client:retry_failed { flow_id = BULK, journal = db.uri }
      assert.matches("schema is version 99, newer", tostring(err))
      db:psql("UPDATE flowservice_journal SET entry = '{\"version\": 0}' WHERE run = 'schema-version'")
      _, err = client:retry_failed { flow_id = BULK, journal = db.uri }
      assert.matches("flowservice journal migrate", tostring(err))
      assert.same({ from = 0, to = 2 }, assert(journal.migrate(db.uri)))
      assert.equal(0, server:stats().posts)
    end)

    it("journal.show lists either backend's state", function()
      local path = h.tmp_journal()
      assert(client:retry_failed { flow_id = BULK, journal = db.uri, run_ids = nil })
      server:reset()
      assert(client:retry_failed { flow_id = BULK, journal = path })
      for _, target in ipairs { db.uri, path } do
        local list = assert(journal.show(target, { flow = BULK }))
        assert.equal(B.failed.count, #list)
        for _, row in ipairs(list) do
          assert.equal(BULK, row.flow)
          assert.equal("done", row.state)
          assert.equal(1, #row.new_ids)
        end
        assert.same({}, assert(journal.show(target, { flow = "no-such-flow" })))
      end
      os.remove(path)
    end)
  end)

  describe("claims", function()
    local function other_job(lease)
      return assert(journal.open(db.uri, { org = ORG, sandbox = SANDBOX, flow = BULK, lease = lease }))
    end

    it("a run another live job holds is skipped: claimed by job J on host H", function()
      local other = other_job(60)
      local held = fake.bulk_run_id(1)
      assert(other:write { { run = held, flow = BULK, state = "pending", request_id = "elsewhere" } })
      local report = assert(client:retry_failed { flow_id = BULK, journal = db.uri })
      assert.equal(B.failed.count - 1, #report.retriggered)
      assert.equal(1, #report.skipped)
      assert.equal(held, report.skipped[1].run_id)
      assert.matches("^claimed by job %x+ on host %S+$", report.skipped[1].reason)
      assert.equal(other.job, report.skipped[1].reason:match("job (%x+)"))
      assert.is_nil(server:stats().by_source[held])
      other:close()
    end)

    it("the claims of a round commit before any of its re-triggers leaves (the fake's witness)", function()
      server:witness({}, { { psql = db.bin .. "/psql", conninfo = db.uri } })
      local report = assert(client:retry_failed { flow_id = BULK, journal = db.uri, concurrency = 8 })
      assert.equal(B.failed.count, #report.retriggered)
      local w = server:stats().witness
      assert.same({}, w.errors)
      assert.equal(B.failed.count, w.checked)
      assert.equal(0, w.missing)
    end)

    it("the witness can fail: a POST with no claim in the database is counted missing", function()
      server:witness({}, { { psql = db.bin .. "/psql", conninfo = db.uri } })
      assert(journal.migrate(db.uri))
      assert(client:retrigger(fake.bulk_run_id(3))) -- no journal at all
      local w = server:stats().witness
      assert.same({}, w.errors)
      assert.equal(1, w.checked)
      assert.equal(1, w.missing)
    end)

    it("a run left ambiguous (502 after acting) holds no lease: the next job settles it by evidence", function()
      local run = fake.bulk_run_id(5)
      server:scenario { match = "^POST /runs/" .. h.literal(run) .. "/", act_then_delay = 0.01, status = 502,
        times = 1 }
      local first = assert(client:retry_failed { flow_id = BULK, journal = db.uri, concurrency = 1 })
      assert.equal(1, #first.ambiguous)
      assert.equal(run, first.ambiguous[1].run_id)
      assert.equal("ambiguous|", db:psql(("SELECT state || '|' || coalesce(lease_until::text, '')"
        .. " FROM flowservice_journal WHERE run = '%s'"):format(run)):match("^%S+"))
      local second = new_client()
      local again = assert(second:retry_failed { flow_id = BULK, journal = db.uri })
      second:close()
      assert.same({}, again.ambiguous)
      assert.equal(1, #again.settled)
      assert.same({ run_id = run, outcome = "done", evidence = "linkage", new_id = again.settled[1].new_id },
        again.settled[1])
      assert.equal(1, server:stats().by_source[run])
      assert.equal(0, #again.retriggered)
    end)

    it("#pgjobs an expired claim is settled by exactly one job, by the evidence rules", function()
      local dead = other_job(0.3)
      local run = fake.bulk_run_id(2)
      -- a job that claimed run 2 and died before sending it
      assert(dead:write { { run = run, flow = BULK, state = "pending", request_id = "never-sent",
        time = os.time() * 1000, server_time = os.time() * 1000 - 2000 } })
      dead:close()
      h.sleep(0.5)
      local a_pid, a_out = start_job(BULK, 4, 5, 0.5)
      local b_pid, b_out = start_job(BULK, 4, 5, 0.5)
      assert.is_true(wait_gone(a_pid, 60) and wait_gone(b_pid, 60), "the jobs did not finish")
      local a, b = result_of(a_out), result_of(b_out)
      local settlers = 0
      for _, r in ipairs { a, b } do
        for _, s in ipairs(r.settled) do
          if s.run_id == run then
            settlers = settlers + 1
            assert.equal("retry", s.outcome)
            assert.equal("count", s.evidence)
          end
        end
      end
      assert.equal(1, settlers)
      for i = 1, B.failed.count do
        assert.equal(1, server:stats().by_source[fake.bulk_run_id(i)], "run " .. i)
      end
      assert.equal(B.failed.count, #a.retriggered + #b.retriggered)
    end)
  end)

  describe("a job stalled past its lease", function()
    it("#pgjobs SIGSTOPped while its claims ran out and another job took over: continued, it sends nothing"
      .. " for them, keeps the other job's rows, and says so", function()
      -- each re-trigger acts at once and answers 0.3 s later: the stop lands with claims in flight
      server:scenario { match = "^POST ", act_then_delay = 0.3, times = 0 }
      local LEASE = 3 -- pg_job.lua gives the job timeouts of 0.9 s + 0.45 s
      local a_pid, a_out = start_job(WIDE, 4, LEASE, 0.5)
      assert.is_true(server:wait_for_posts(6, 60), "job A sent nothing")
      h.sh("kill -STOP " .. a_pid)
      local held = count(("SELECT count(*) FROM flowservice_journal WHERE flow = '%s' AND state = 'pending'"):format(WIDE))
      assert.is_true(held > 0, "the stop left no claim pending")
      h.sleep(LEASE + 1) -- A's leases run out (renewed at most as it stopped)
      local b_pid, b_out = start_job(WIDE, 8, 30, 0.5)
      assert.is_true(wait_gone(b_pid, 120), "job B did not finish")
      local b = result_of(b_out)
      assert.is_nil(b.error)
      assert.is_true(#b.settled >= held, "B settled what A held")
      local posts, by_source = server:stats().posts, server:stats().by_source
      for i = 1, WIDE_RUNS do assert.equal(1, by_source[wide_run_id(i)], "run " .. i .. " after B") end
      h.sh("kill -CONT " .. a_pid)
      assert.is_true(wait_gone(a_pid, 60), "job A did not end after SIGCONT")
      local a = result_of(a_out)
      io.stderr:write("\n  the stalled job, continued: " .. tostring(a.error) .. "\n")
      assert.matches("stalled %d+ s, past its 3 s lease: %d+ of its claims .* were taken over by another job;"
        .. " it sends nothing more for flow " .. h.literal(WIDE), a.error)
      local taken = 0
      for _, why in pairs(a.skipped) do
        if why:find("^taken over by job %x+ on host %S+ %(now done%) after this job's lease ran out") then
          taken = taken + 1
        end
      end
      assert.is_true(taken > 0, "A named the runs taken over")
      h.sleep(1) -- anything A had left would have landed
      assert.equal(posts, server:stats().posts, "the stalled job sent after SIGCONT")
      for i = 1, WIDE_RUNS do assert.equal(1, server:stats().by_source[wide_run_id(i)], "run " .. i) end
      -- B's settlement stands: A overwrote no row it no longer held
      assert.equal(WIDE_RUNS, count(("SELECT count(*) FROM flowservice_journal WHERE flow = '%s'"
        .. " AND state = 'done'"):format(WIDE)))
    end)

    it("retry_failed refuses a lease shorter than twice timeout + connect_timeout, unless a test says so", function()
      local short = new_client { timeout = 5, connect_timeout = 2 }
      local ok, err = pcall(short.retry_failed, short, { flow_id = BULK, journal = db.uri, lease = 10 })
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'retry_failed' %(spec field 'lease' %(10 s%) must be at least twice"
        .. " the client's timeout %+ connect_timeout %(2 x 7 s%)", err)
      assert.equal(0, server:stats().posts)
      assert(short:retry_failed { flow_id = BULK, journal = db.uri, lease = 14, dry_run = true })
      assert(short:retry_failed { flow_id = BULK, journal = db.uri, lease = 1, short_lease_for_tests = true,
        dry_run = true })
      short:close()
      -- without a lease the default outlives the client's requests: 2 x (60 + 10) s with the defaults
      local j = assert(journal.open(db.uri, { org = ORG, sandbox = SANDBOX, flow = BULK, request_time = 70 }))
      assert.equal(140, j.lease)
      j:close()
    end)
  end)

  describe("many jobs", function()
    local function assert_exactly_once(extra)
      local by_source = server:stats().by_source
      local twice, missing = {}, {}
      for i = 1, WIDE_RUNS do
        local n = by_source[wide_run_id(i)] or 0
        if n > 1 then twice[#twice + 1] = wide_run_id(i) end
        if n == 0 then missing[#missing + 1] = wide_run_id(i) end
      end
      assert.same({}, twice, "re-triggered twice" .. (extra or ""))
      assert.same({}, missing, "never re-triggered" .. (extra or ""))
      assert.equal(WIDE_RUNS, count(("SELECT count(*) FROM flowservice_journal WHERE flow = '%s'"
        .. " AND state = 'done'"):format(WIDE)))
    end

    it("#pgjobs three jobs in three processes with three state directories: every run exactly once", function()
      server:scenario { match = "^POST ", delay = 0.02, times = 0 }
      local started = {}
      for k = 1, 3 do started[k] = { start_job(WIDE, 8, 30, 0) } end
      local total = 0
      for k = 1, 3 do
        assert.is_true(wait_gone(started[k][1], 120), "job " .. k .. " did not finish")
        local r = result_of(started[k][2])
        assert.is_nil(r.error)
        assert.equal(WIDE_RUNS, r.considered)
        assert.same({}, r.ambiguous)
        assert.same({}, r.failed)
        local skipped = 0
        for _, why in pairs(r.skipped) do
          skipped = skipped + 1
          assert.is_truthy(why:find("^claimed by job %x+ on host ") or why:find("already re%-triggered"), why)
        end
        assert.equal(WIDE_RUNS, #r.retriggered + skipped, "job " .. k .. "'s report adds up")
        total = total + #r.retriggered
      end
      assert.equal(WIDE_RUNS, total)
      assert.equal(WIDE_RUNS, server:stats().posts)
      assert_exactly_once()
    end)

    it("#pgjobs SIGKILLed at random moments and restarted, 12 cycles: zero duplicates, zero unaccounted", function()
      math.randomseed(20261201)
      -- each re-trigger acts, then answers 50 ms later: kills land between the two
      server:scenario { match = "^POST ", act_then_delay = 0.05, times = 0 }
      local LEASE, GRACE = 2, 0.5 -- the jobs get timeouts of 0.6 s + 0.3 s (pg_job.lua)
      local left_pending = 0
      for cycle = 1, 12 do
        local a = { start_job(WIDE, 8, LEASE, GRACE) }
        local b = { start_job(WIDE, 8, LEASE, GRACE) }
        local posts = server:stats().posts
        assert.is_true(server:wait_for_posts(posts + math.random(3, 12), 60), "no work in cycle " .. cycle)
        h.sleep(math.random() * 0.05)
        h.sh("kill -KILL " .. a[1] .. " 2>/dev/null")
        if cycle % 2 == 1 then h.sleep(math.random() * 0.1) end -- b a little longer, some cycles
        h.sh("kill -KILL " .. b[1] .. " 2>/dev/null")
        assert.is_true(wait_gone(a[1], 30) and wait_gone(b[1], 30))
        left_pending = left_pending + count("SELECT count(*) FROM flowservice_journal WHERE state = 'pending'")
        local dupes = 0
        for _, n in pairs(server:stats().by_source) do if n > 1 then dupes = dupes + 1 end end
        assert.equal(0, dupes, "duplicates after cycle " .. cycle)
      end
      assert.is_true(left_pending > 0, "the kills left nothing to settle")
      io.stderr:write(("\n  kill cycles: %d claims left pending by the kills (summed)\n"):format(left_pending))
      -- the claims of the dead run out; the last jobs settle them and finish the rest
      h.sleep(LEASE + 0.2)
      for _ = 1, 3 do
        local pid, out = start_job(WIDE, 8, LEASE, GRACE)
        assert.is_true(wait_gone(pid, 180), "the last job did not finish")
        local r = result_of(out)
        assert.is_nil(r.error)
        if #r.ambiguous == 0 then break end
        h.sleep(LEASE + 0.2)
      end
      assert_exactly_once()
      assert.equal(0, count("SELECT count(*) FROM flowservice_journal WHERE state IN ('pending', 'ambiguous')"))
      -- what the kills left was settled by evidence (the settling jobs were often killed too: the rows say it)
      local by_evidence = count("SELECT count(*) FROM flowservice_journal WHERE entry ? 'evidence'")
      io.stderr:write(("  settled done by evidence: %d runs\n"):format(by_evidence))
      assert.is_true(by_evidence > 0, "nothing was settled by evidence")
    end)

    it("#pgjobs the database restarted mid-job: the job fails clearly, the next one loses nothing", function()
      server:scenario { match = "^POST ", delay = 0.05, times = 0 }
      local pid, out = start_job(WIDE, 4, 2, 0.5)
      server:wait_for_posts(40, 60)
      db:stop()
      assert.is_true(wait_gone(pid, 60), "the job did not end")
      local r = result_of(out)
      io.stderr:write("\n  the job, as the database stopped: " .. tostring(r.error) .. "\n")
      assert.matches("PostgreSQL", r.error)
      assert.not_matches(db.password, r.error, 1, true)
      assert(db:start())
      h.sleep(2.2)
      local pid2, out2 = start_job(WIDE, 8, 2, 0.5)
      assert.is_true(wait_gone(pid2, 120))
      local r2 = result_of(out2)
      assert.is_nil(r2.error)
      assert.same({}, r2.ambiguous)
      assert_exactly_once()
    end)
  end)

  describe("bad input", function()
    local function open_err(target, opts)
      local j, err = journal.open(target, opts or {})
      assert.is_nil(j)
      assert.equal("journal", err.kind)
      return tostring(err.message)
    end

    it("a password in a URI or conninfo is refused and never repeated", function()
      for _, target in ipairs { "postgresql://flowservice:hunter2@127.0.0.1/flowservice",
        "postgres://u:hunter2@h/db", "host=127.0.0.1 password=hunter2 dbname=x",
        "postgresql://u@127.0.0.1/db?password=hunter2" } do
        local msg = open_err(target)
        assert.matches("password in the connection", msg)
        assert.not_matches("hunter2", msg)
      end
      local _, err = client:retry_failed { flow_id = BULK, journal = "postgresql://a:hunter2@127.0.0.1/x" }
      assert.not_matches("hunter2", tostring(err))
      assert.equal(0, server:stats().posts)
    end)

    it("a wrong URI, a database that is not there, a refused password, a missing permission: clear errors", function()
      assert.matches("cannot read the connection string", open_err("postgresql://[::1"))
      assert.matches("invalid", open_err("postgresql://x@127.0.0.1:" .. db.port .. "/db?bogus_option=hunter2"))
      assert.not_matches("hunter2", open_err("postgresql://x@127.0.0.1:" .. db.port .. "/db?bogus_option=hunter2"))
      assert.matches("Connection refused", open_err(("postgresql://flowservice@127.0.0.1:%d/flowservice"):format(
        h.closed_port)))
      local wrong = dir .. "/wrong.pgpass"
      h.write(wrong, ("127.0.0.1:%d:*:flowservice:not-the-password-xyzzy\n"):format(db.port))
      h.sh("chmod 600 " .. q(wrong))
      local msg = open_err(db:uri_for("flowservice", wrong))
      assert.matches('password authentication failed for user "flowservice"', msg)
      assert.not_matches("xyzzy", msg)
      -- the table exists (made by its owner); reader has no rights on it
      assert(journal.migrate(db.uri))
      msg = open_err(db:uri_for("reader"))
      assert.matches("permission denied for table flowservice_journal", msg)
      assert.equal("42501", select(2, journal.open(db:uri_for("reader"), {})).sqlstate)
    end)

    it("without the flowservice-postgresql rock, a URI says what to install; a file journal works", function()
      local cdir = dir .. "/core-only/flowservice"
      h.sh("mkdir -p " .. q(cdir) .. " && cp build/tree/lib/lua/5.4/flowservice/core.so " .. q(cdir))
      local script = dir .. "/core-only.lua"
      h.write(script, ([[
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = %q .. ";" .. package.cpath
local journal = require "flowservice.journal"
local j, err = journal.open("postgresql://flowservice@127.0.0.1/flowservice", {})
io.write(tostring(j), " ", tostring(err and err.message), "\n")
local f = assert(journal.open(%q))
assert(f:write { { run = "r", flow = "f", state = "pending" } })
f:close()
io.write(journal.read(%q).runs.r.state, "\n")
]]):format(dir .. "/core-only/?.so", dir .. "/core-only.jsonl", dir .. "/core-only.jsonl"))
      -- journal_pg.lua is on this path, flowservice.pg is not: as with the main rock alone
      local p = assert(io.popen("lua5.4 " .. q(script) .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.matches("^nil a PostgreSQL journal needs the flowservice%-postgresql rock", out)
      assert.matches("\npending\n$", out)
    end)

    it("PGPASSWORD's value is in no message, also when libpq is refused", function()
      local script = dir .. "/pgpassword.lua"
      h.write(script, ([[
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath
local j, err = require("flowservice.journal").open("postgresql://flowservice@127.0.0.1:%d/flowservice", {})
io.write(tostring(err and err.message))
]]):format(db.port))
      local p = assert(io.popen("PGPASSWORD=wrong-secret-4711 PGPASSFILE=/nonexistent lua5.4 " .. q(script) .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.matches("password authentication failed", out)
      assert.not_matches("4711", out)
    end)
  end)

  describe("the command", function()
    -- flowservice ARGV with the fake's settings -> exit status, stdout, stderr
    local function cmd(argv, env)
      local words = { "env -i", "PATH=" .. q(os.getenv("PATH") or "/usr/bin:/bin"), "HOME=" .. q(dir),
        "XDG_STATE_HOME=" .. q(dir .. "/state"),
        "LUA_PATH=" .. q("build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;;"),
        "LUA_CPATH=" .. q("build/tree/lib/lua/5.4/?.so;;"), "AEP_ACCESS_TOKEN=" .. q(fake.credentials.access_token),
        "AEP_API_KEY=" .. q(fake.credentials.api_key), "AEP_ORG_ID=" .. q(ORG), "FLOWSERVICE_URL=" .. q(server.url) }
      for k, v in pairs(env or {}) do words[#words + 1] = k .. "=" .. q(v) end
      words[#words + 1] = "lua5.4 bin/flowservice"
      for _, a in ipairs(argv) do words[#words + 1] = q(a) end
      local base = dir .. "/cmd"
      h.sh(table.concat(words, " ") .. " </dev/null >" .. q(base .. ".out") .. " 2>" .. q(base .. ".err")
        .. "; echo $? >" .. q(base .. ".status"))
      local out, err = read(base .. ".out"), read(base .. ".err")
      assert.not_matches(db.password, out .. err, 1, true)
      return tonumber(read(base .. ".status"):match("%d+")), out, err
    end

    it("retry-failed --journal URI, FLOWSERVICE_JOURNAL, journal show and journal migrate", function()
      local code, out, err = cmd { "retry-failed", "--flow", BULK, "--since", "all", "--journal", db.uri, "--json" }
      assert.equal(0, code, err)
      assert.equal(B.failed.count, #cjson.decode(out).retriggered)
      code, out = cmd({ "retry-failed", "--flow", BULK, "--since", "all", "--json" }, { FLOWSERVICE_JOURNAL = db.uri })
      assert.equal(0, code)
      local doc = cjson.decode(out)
      assert.equal(0, #doc.retriggered)
      assert.equal(B.failed.count, #doc.skipped)
      assert.equal(B.failed.count, server:stats().posts)
      code, out = cmd({ "journal", "show", "--flow", BULK, "--json" }, { FLOWSERVICE_JOURNAL = db.uri })
      assert.equal(0, code)
      local rows = cjson.decode(out).runs
      assert.equal(B.failed.count, #rows)
      for _, row in ipairs(rows) do
        assert.equal("done", row.state)
        assert.equal(1, #row.new_ids)
      end
      code, out = cmd { "journal", "show", "--journal", db.uri }
      assert.equal(0, code)
      assert.matches(B.failed.count .. " runs\n$", out)
      code, out = cmd { "journal", "migrate", "--journal", db.uri }
      assert.equal(0, code)
      assert.equal("journal schema: version 2 -> 2\n", out)
    end)

    it("a bad URI, a password in it, a refused password, a missing permission: exit 2, nothing sent (a dry run too)", function()
      assert(journal.migrate(db.uri))
      local wrong = dir .. "/wrong-cmd.pgpass"
      h.write(wrong, ("127.0.0.1:%d:*:flowservice:not-the-password-xyzzy\n"):format(db.port))
      h.sh("chmod 600 " .. q(wrong))
      local cases = {
        { "postgresql://[::1", "cannot read the connection string" },
        { ("postgresql://flowservice:hunter2@127.0.0.1:%d/flowservice"):format(db.port),
          "password in the connection URI is refused" },
        { db:uri_for("flowservice", wrong), 'password authentication failed for user "flowservice"' },
        { db:uri_for("reader"), "permission denied for table flowservice_journal" },
      }
      for _, case in ipairs(cases) do
        for _, argv in ipairs { { "retry-failed", "--flow", BULK, "--journal", case[1] },
          { "retry-failed", "--flow", BULK, "--dry-run", "--journal", case[1] },
          { "journal", "show", "--journal", case[1] }, { "journal", "migrate", "--journal", case[1] } } do
          local code, out, err = cmd(argv)
          assert.equal(2, code, argv[1] .. " " .. case[1] .. ": " .. err)
          assert.matches(case[2], err, 1, true)
          assert.not_matches("hunter2", out .. err, 1, true)
          assert.not_matches("xyzzy", out .. err, 1, true)
          assert.not_matches("traceback", err)
        end
      end
      local code, out, err = cmd({ "retry-failed", "--flow", BULK, "--journal",
        ("postgresql://flowservice@127.0.0.1:%d/flowservice"):format(db.port) },
        { PGPASSWORD = "wrong-secret-4711", PGPASSFILE = "/nonexistent" })
      assert.equal(2, code)
      assert.matches("password authentication failed", err)
      assert.not_matches("4711", out .. err, 1, true)
      assert.equal(0, server:stats().posts)
    end)
  end)

  describe("waiting", function()
    it("with a wait function the job never blocks on the database: it waits through it", function()
      assert(journal.migrate(db.uri))
      -- another session holds the table for 1.5 s: the job's first query must wait
      local lock_out = dir .. "/lock.out"
      h.sh(("%s >%s 2>&1 &"):format(db:as_owner(("%s/psql -X -q -h %s -p %d -U postgres -d flowservice -c %s"):format(
        db.bin, q(db.dir), db.port, q("BEGIN; LOCK TABLE flowservice_journal IN ACCESS EXCLUSIVE MODE;"
          .. " SELECT pg_sleep(1.5); COMMIT;"))), q(lock_out)))
      local deadline = h.now() + 10
      while count("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation ="
        .. " 'flowservice_journal'::regclass") == 0 and h.now() < deadline do h.sleep(0.02) end
      local waits, longest = 0, 0
      local waiting = new_client { wait = function(s)
        waits = waits + 1
        longest = math.max(longest, s)
        h.sleep(s)
      end }
      local t0 = h.now()
      local report = assert(waiting:retry_failed { flow_id = BULK, journal = db.uri })
      local elapsed = h.now() - t0
      waiting:close()
      assert.equal(B.failed.count, #report.retriggered)
      assert.is_true(elapsed > 0.8, "the lock did not hold the job: " .. elapsed)
      assert.is_true(waits > 30, "waits: " .. waits)
      assert.is_true(longest <= 0.5, "longest wait: " .. longest)
    end)
  end)
end)
