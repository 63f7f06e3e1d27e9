-- flowservice.webhook in a real nginx (two workers): Adobe I/O Events
-- deliveries made by the fake (server:emit: the event built from the run it
-- holds, signed with the suite's openssl-made key pair, POSTed with Adobe's
-- retries; server:webhook: a re-triggered run that fails has its event sent
-- on its own), keys served by the fake over TLS with the suite's CA,
-- re-triggers through flowservice.heal.
local fake = require "spec.support.fake"
local nginx = require "spec.support.nginx"
local tls = require "spec.support.tls"
local signing = require "spec.support.signing"
local events = require "spec.support.events" -- event ids and the key paths
local h = require "spec.support.helpers"
local cjson = require "cjson"

local capture = nginx.util.capture
local FLOW = fake.flows.enabled
local CLIENT = "suite-client-id"
local CONNECT = { { code = "CONNECTOR-1001-500", message = "Unable to connect to the source" } }

local function trim(s) return (s:gsub("%s+$", "")) end

describe("#openresty flowservice.webhook", function()
  local pki, keys, flow_service, hook, dir, tmp

  local function start_hook(vars)
    local v = { ROOT = trim(capture("pwd")), FAKE_URL = flow_service.url, JOURNAL_DIR = dir,
      CLIENT_ID = CLIENT, KEY_HOST = flow_service.tls_url, CA_FILE = pki.ca_file, FLOW = FLOW,
      BACKOFF = "{ 0 }", MAX_CHAIN = 2, USER = "",
      JOURNAL = 'function(flow_id) return dir .. "/" .. flow_id .. ".jsonl" end' }
    for k, x in pairs(vars or {}) do v[k] = x end
    return nginx.start { template = "spec/support/webhook.conf.in", vars = v, ready = "/health", timeout = 10 }
  end
  local function url(s, location) return (s or hook).url .. (location or "/adobe-events") end
  local function failed_run(errors)
    return flow_service:add_run { flowId = FLOW, status = "failed", errors = errors or CONNECT }
  end
  -- The fake delivers events (a list of { run = id, event_id, code, meta, recipient,
  -- headers, bad_signature }) and the test waits for every delivery's record.
  local function emit(list, o)
    o = o or {}
    local ids = flow_service:emit { url = o.url or url(o.server), events = list, recipient = CLIENT,
      concurrency = o.concurrency, timeout = o.timeout, retry_intervals = o.retry_intervals or { 0.2 } }
    local ok, records = flow_service:wait_deliveries(ids, o.wait or 30)
    assert.is_true(ok, "deliveries not done")
    return records
  end
  -- One event for run: status, answer body, seconds, worker pid (X-Worker-Pid), record.
  local function deliver(run, opts, overrides, server)
    opts = opts or {}
    local d = emit({ { run = run.id, event_id = opts.event_id or events.event_id(),
      recipient = opts.recipient, code = opts.code, meta = opts.meta, headers = overrides,
      bad_signature = opts.bad_signature } }, { server = server })[1]
    local last = d.attempts[#d.attempts] or {}
    return d.status, last.body, d.latency, tonumber((last.headers or {})["x-worker-pid"]), d
  end
  local function metric(name, server)
    local text = capture("curl -s --noproxy '*' " .. (server or hook).url .. "/metrics")
    return tonumber(text:match("\n" .. name:gsub("[%-%.%[%]]", "%%%0"):gsub("{", "%%{") .. " (%d+)")) or 0, text
  end
  -- nothing at all reached the Flow Service (key GETs to the key host aside)
  local function untouched()
    for _, r in ipairs(flow_service:requests()) do
      if r.method == "POST" or r.path:match("^/runs") or r.path:match("^/flows") then return false end
    end
    return flow_service:stats().posts == 0
  end

  setup(function()
    pki = tls.make()
    os.execute("chmod 755 " .. pki.dir) -- the workers (nobody) read the CA
    keys = signing.make()
    flow_service = fake.start { tls = { cert = pki.cert, key = pki.key } }
    flow_service:keys { [events.KEY1] = keys.public, [events.KEY2] = keys.other_public }
    flow_service:signing { key1 = { path = events.KEY1, private_key = keys.private_path },
                           key2 = { path = events.KEY2, private_key = keys.other_private_path } }
    tmp = trim(capture("mktemp -d /tmp/flowservice-webhook.XXXXXX"))
    dir = tmp .. "/journals"
    os.execute("mkdir -p " .. dir .. " && chmod 777 " .. tmp .. " " .. dir)
    hook = start_hook()
  end)
  teardown(function()
    if hook then hook:stop() end
    if flow_service then flow_service:stop() end
    signing.remove(keys)
    tls.remove(pki)
    if tmp then os.execute("rm -rf '" .. tmp .. "'") end
  end)
  before_each(function() flow_service:reset() end)

  it("answers the registration challenge, as text or as JSON", function()
    assert.equal("abc-123", capture("curl -s --noproxy '*' '" .. url() .. "?challenge=abc-123'"))
    local json = capture("curl -s --noproxy '*' -H 'Accept: application/json' '" .. url() .. "?challenge=abc-123'")
    assert.same({ challenge = "abc-123" }, cjson.decode(json))
    local ctype = capture("curl -s --noproxy '*' -o /dev/null -w '%{content_type}' '" .. url() .. "?challenge=x'")
    assert.matches("^text/plain", ctype)
  end)

  it("re-triggers the run of a valid event once, answering well within a second", function()
    local run = failed_run()
    local code, body, secs = deliver(run)
    assert.equal(200, code, body)
    assert.equal("accepted\n", body)
    assert.is_true(secs < 1, "answered in " .. secs .. " s")
    assert.is_true(flow_service:wait_for_posts(1, 10))
    h.sleep(0.5)
    assert.same({ [run.id] = 1 }, flow_service:stats().by_source)
    -- the other way Adobe names the type: _eventNotificationMeta.type
    local other = failed_run()
    assert.equal(200, (deliver(other, { meta = true })))
    assert.is_true(flow_service:wait_for_posts(2, 10))
    assert.equal(1, flow_service:stats().by_source[other.id])
  end)

  it("takes the same event three times and in both workers as one re-trigger", function()
    local run = failed_run()
    local id = events.event_id()
    local dup_before = metric("flowservice_heal_events_duplicate_total")
    local pids, sent = {}, 0
    repeat
      local code, body, _, pid = deliver(run, { event_id = id })
      assert.equal(200, code)
      sent = sent + 1
      if sent > 1 then assert.equal("duplicate\n", body) end
      if pid then pids[pid] = true end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
    until (sent >= 3 and n >= 2) or sent >= 40
    local workers = 0
    for _ in pairs(pids) do workers = workers + 1 end
    assert.equal(2, workers, "both workers answered")
    assert.equal(dup_before + sent - 1, (metric("flowservice_heal_events_duplicate_total")))
    -- and the same run under another event id (a watch loop, a redelivery)
    assert.equal(200, (deliver(run)))
    assert.is_true(flow_service:wait_for_posts(1, 10))
    h.sleep(1.5)
    assert.equal(1, flow_service:stats().by_source[run.id])
    assert.equal(1, flow_service:stats().posts)
  end)

  it("refuses bad signatures, key paths, foreign hosts and recipients: 401, nothing sent", function()
    local run = failed_run()
    local before = metric("flowservice_heal_events_rejected_total")
    local bad = {
      { opts = { bad_signature = true } }, -- both signatures over another body
      { overrides = { ["x-adobe-digital-signature-1"] = false, ["x-adobe-digital-signature-2"] = false } },
      { overrides = { ["x-adobe-public-key1-path"] = "/prod/keys/../../etc/passwd.pem" } },
      { overrides = { ["x-adobe-public-key1-path"] = "/prod/keys/key.txt" } },
      { overrides = { ["x-adobe-public-key2-path"] = "https://evil.example/prod/keys/pub.pem" } },
      { overrides = { ["x-adobe-public-key1-path"] = "//evil.example/prod/keys/pub.pem" } },
      -- a key the host does not have; the other signed with a key it does not match
      { overrides = { ["x-adobe-public-key1-path"] = "/prod/keys/unknown.pem",
                      ["x-adobe-public-key2-path"] = events.KEY1 } },
      { opts = { recipient = "someone-else" } },
    }
    local id = events.event_id()
    for i, case in ipairs(bad) do
      local opts = case.opts or {}
      opts.event_id = id
      local code, body = deliver(run, opts, case.overrides)
      assert.equal(401, code, "case " .. i .. ": " .. tostring(body))
    end
    h.sleep(0.5)
    assert.is_true(untouched())
    assert.equal(before + #bad, (metric("flowservice_heal_events_rejected_total")))
    local log = hook:error_log()
    assert.matches("webhook: rejected event " .. id:gsub("%-", "%%-"), log)
    assert.is_nil(log:find(run.id, 1, true), "no body in the log")
    -- no side effect: the same event id, signed right, is taken afterwards
    assert.equal("accepted\n", select(2, deliver(run, { event_id = id })))
    assert.is_true(flow_service:wait_for_posts(1, 10))
  end)

  it("accepts an event when either signature verifies", function()
    local run = failed_run()
    local code = deliver(run, nil, { ["x-adobe-digital-signature-1"] = keys:sign("not this") })
    assert.equal(200, code)
    assert.is_true(flow_service:wait_for_posts(1, 10))
  end)

  it("acknowledges and ignores other events, and does not re-trigger a parsing error", function()
    local run = failed_run()
    assert.equal("ignored\n", select(2, deliver(run, { code = "sources_flow_run_success" })))
    local parse = failed_run { { code = "CONNECTOR-2001-500", message = "cannot parse the file" } }
    local before = metric('flowservice_heal_runs_skipped_total{reason="excluded_code"}')
    assert.equal("accepted\n", select(2, deliver(parse)))
    local deadline = h.now() + 10
    while metric('flowservice_heal_runs_skipped_total{reason="excluded_code"}') == before and h.now() < deadline do
      h.sleep(0.1)
    end
    assert.equal(before + 1, (metric('flowservice_heal_runs_skipped_total{reason="excluded_code"}')))
    assert.equal(0, flow_service:stats().posts)
  end)

  it("acknowledges a burst of 200 events, each in under a second", function()
    local parse = failed_run { { code = "CONNECTOR-2001-500", message = "cannot parse the file" } }
    local list = {}
    for i = 1, 200 do
      list[i] = { run = parse.id, event_id = events.event_id(),
        code = i % 2 == 0 and "sources_flow_run_failed" or "sources_flow_run_success" }
    end
    local function fetches()
      local f = flow_service:key_fetches()
      return (f[events.KEY1] or 0) + (f[events.KEY2] or 0)
    end
    assert.equal(200, (deliver(parse))) -- both keys in the shared dict now
    local fetched = fetches()
    assert.is_true(fetched >= 1 and fetched <= 8, "fetched " .. fetched)
    local results = emit(list, { concurrency = 50, wait = 120 })
    assert.equal(200, #results)
    local slowest = 0
    for _, d in ipairs(results) do
      assert.equal(200, d.status)
      assert.equal(1, #d.attempts) -- none retried
      slowest = math.max(slowest, d.latency)
    end
    assert.is_true(slowest < 1, "slowest answer " .. slowest .. " s")
    assert.equal(fetched, fetches()) -- 200 events, both workers: the keys came from the dict
    h.sleep(1)
    assert.equal(0, flow_service:stats().posts)
  end)

  it("stops a chain of failures at max_chain (2 here): retry budget spent", function()
    flow_service:outcomes { after = 0, status = "failed", errors = CONNECT }
    local run = failed_run()
    local spent = metric("flowservice_heal_budget_spent_total")
    assert.equal(200, (deliver(run)))
    assert.is_true(flow_service:wait_for_posts(1, 10))
    local first = flow_service:run(run.id).childFlowRunIds[1]
    assert.equal(200, (deliver(flow_service:run(first))))
    assert.is_true(flow_service:wait_for_posts(2, 10))
    local second = flow_service:run(first).childFlowRunIds[1]
    assert.equal(200, (deliver(flow_service:run(second))))
    local deadline = h.now() + 10
    while metric("flowservice_heal_budget_spent_total") == spent and h.now() < deadline do h.sleep(0.1) end
    assert.equal(spent + 1, (metric("flowservice_heal_budget_spent_total")))
    assert.equal(2, flow_service:stats().posts)
    assert.matches("retry budget spent", hook:error_log())
  end)

  it("follows a chain the fake's own failure events drive, to max_chain", function()
    local function diag()
      local lines = {}
      for l in hook:error_log():gmatch("[^\n]+") do if not l:find("keepalive") then lines[#lines+1] = l end end
      return table.concat(lines, "\n"):sub(-5000) .. "\nFAKE: " .. flow_service:error_log():sub(-2000)
        .. "\n" .. cjson.encode(flow_service:stats()) .. "\n" .. cjson.encode(flow_service:deliveries())
    end
    -- each re-triggered run fails 0.2 s after it starts, and the fake sends its event itself
    flow_service:outcomes { after = 0.2, status = "failed", errors = CONNECT }
    flow_service:webhook { url = url(), recipient = CLIENT, retry_intervals = { 0.2 } }
    local run = failed_run()
    local spent = metric("flowservice_heal_budget_spent_total")
    assert.equal(200, (deliver(run))) -- the first failure's event; the rest follow on their own
    local deadline = h.now() + 30
    while metric("flowservice_heal_budget_spent_total") == spent and h.now() < deadline do h.sleep(0.1) end
    assert.equal(spent + 1, (metric("flowservice_heal_budget_spent_total")), diag())
    h.sleep(1) -- nothing more comes
    assert.equal(2, flow_service:stats().posts, diag())
    local first = flow_service:run(run.id).childFlowRunIds[1]
    local second = flow_service:run(first).childFlowRunIds[1]
    assert.is_nil(flow_service:run(second).childFlowRunIds)
    local all = flow_service:deliveries()
    assert.equal(3, #all)
    assert.same({ run.id, first, second }, { all[1].run, all[2].run, all[3].run })
    for _, d in ipairs(all) do
      assert.equal("delivered", d.outcome)
      assert.equal("accepted\n", d.attempts[#d.attempts].body)
    end
    assert.equal("failed", flow_service:run(second).metrics.statusSummary.status)
    assert.matches("retry budget spent", hook:error_log())
  end)

  it("a delivery answered 503 is delivered again: still one re-trigger", function()
    local run = failed_run()
    local d = emit({ { run = run.id, event_id = events.event_id() } },
      { url = url(nil, "/adobe-events-503-once"), retry_intervals = { 0.3, 0.3 } })[1]
    assert.equal(2, #d.attempts)
    assert.equal(503, d.attempts[1].status)
    assert.equal(200, d.attempts[2].status)
    assert.equal("accepted\n", d.attempts[2].body)
    assert.equal("delivered", d.outcome)
    assert.is_true(flow_service:wait_for_posts(1, 10))
    h.sleep(1.5)
    assert.equal(1, flow_service:stats().by_source[run.id])
    assert.equal(1, flow_service:stats().posts)
  end)

  it("a delivery held past Adobe's timeout is delivered again: still one re-trigger", function()
    local run = failed_run()
    -- the first delivery is read, held 3 s, then handled; the fake gives up on it after 1 s
    local d = emit({ { run = run.id, event_id = events.event_id() } },
      { url = url(nil, "/adobe-events-slow-once") .. "?hold=3", timeout = 1, retry_intervals = { 0.2, 0.2 } })[1]
    assert.equal(0, d.attempts[1].status, "no answer in time")
    assert.matches("timeout", d.attempts[1].error)
    assert.equal(200, d.status)
    assert.equal("delivered", d.outcome)
    assert.is_true(flow_service:wait_for_posts(1, 10))
    h.sleep(3) -- the held one is handled by now too: a duplicate
    assert.equal(1, flow_service:stats().by_source[run.id])
    assert.equal(1, flow_service:stats().posts)
    assert.is_true(metric("flowservice_heal_events_duplicate_total") >= 1)
  end)

  it("keeps the backoff across an nginx restart", function()
    local slow = start_hook { BACKOFF = "{ 4 }" }
    local run = failed_run()
    local t0 = tonumber(trim(capture("date +%s.%N")))
    assert.equal(200, (deliver(run, nil, nil, slow)))
    h.sleep(1)
    slow:stop() -- its timer dies with it (premature: nothing sent)
    assert.equal(0, flow_service:stats().posts)
    local again = start_hook { BACKOFF = "{ 4 }" }
    local ok = flow_service:wait_for_posts(1, 15)
    again:stop()
    assert.is_true(ok)
    local post
    for _, r in ipairs(flow_service:requests()) do if r.method == "POST" then post = r end end
    assert.is_true(post.time >= t0 + 4 - 0.01, ("re-triggered %.2f s after the event"):format(post.time - t0))
    assert.equal(1, flow_service:stats().posts)
    assert.matches("resuming run " .. run.id:gsub("%-", "%%-"), again:error_log())
  end)

  it("runs a watch loop beside the webhook on one flow: each run still once", function()
    local runs = {}
    for i = 1, 5 do runs[i] = failed_run() end
    local get = function(p) return trim(capture("curl -s --noproxy '*' " .. hook.url .. p)) end
    assert.equal("started", get("/watch?passes=15"))
    for _, run in ipairs(runs) do
      assert.equal(200, (deliver(run)))
      assert.equal(200, (deliver(run))) -- and again under another event id
    end
    local deadline = h.now() + 20
    while tonumber(get("/watch-passes")) < 15 and h.now() < deadline do h.sleep(0.2) end
    h.sleep(1)
    local by = flow_service:stats().by_source
    for _, run in ipairs(runs) do assert.equal(1, by[run.id], run.id) end
    for id, n in pairs(by) do assert.equal(1, n, id) end
  end)

  it("a worker killed mid-re-trigger: the respawned one settles the run from the journal, never twice", function()
    local journal = require "flowservice.journal"
    flow_service:scenario { match = "^POST ", act_then_delay = 30, times = 1 }
    local run = failed_run()
    local code, _, _, pid = deliver(run)
    assert.equal(200, code)
    assert.is_true(flow_service:wait_for_posts(1, 10)) -- acted; its answer stalls
    local path = dir .. "/" .. FLOW .. ".jsonl"
    assert.equal("pending", journal.read(path).runs[run.id].state)
    os.execute("kill -9 " .. pid) -- the worker whose timer sent it
    local deadline, entry = h.now() + 20
    repeat
      h.sleep(0.2)
      entry = journal.read(path).runs[run.id]
    until entry.state ~= "pending" or h.now() > deadline
    assert.equal("done", entry.state, hook:error_log():sub(-3000))
    -- by whatever this journal learned before: the children the service lists, or counting
    assert.is_truthy(entry.evidence == "linkage" or entry.evidence == "count", entry.evidence)
    h.sleep(1)
    assert.equal(1, flow_service:stats().by_source[run.id])
    assert.equal(1, flow_service:stats().posts)
  end)

  it("counts in Prometheus text format across workers", function()
    local _, text = metric("flowservice_heal_events_received_total")
    assert.matches("# TYPE flowservice_heal_events_received_total counter", text)
    assert.matches("\nflowservice_heal_events_verified_total %d+", text)
    assert.matches("\nflowservice_heal_runs_retriggered_total %d+", text)
    assert.is_nil(text:find("fake-token", 1, true))
  end)
end)
