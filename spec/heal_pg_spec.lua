-- flowservice.heal, the watch command and the webhook on the PostgreSQL
-- journal (a real PostgreSQL the suite starts, spec/support/pg.lua): the
-- chain budget, the backoff kept across a restart, an older schema, watch
-- and heal in two processes with two state directories on one ledger, and
-- one event delivered to two nginx instances. Each failed run is
-- re-triggered exactly once: the fake counts POSTs per source run.
local flowservice = require "flowservice"
local heal = require "flowservice.heal"
local journal = require "flowservice.journal"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local pgserver = require "spec.support.pg"
local cjson = require "cjson"

local FLOW = fake.flows.enabled
local ORG, SANDBOX = fake.credentials.org, fake.credentials.sandbox
local CONNECT = { { code = "CONNECTOR-1001-500", message = "Unable to connect to the source" } }
local q = h.q

local function read(path) return h.read(path) or "" end

local function alive(pid)
  local stat = io.open("/proc/" .. pid .. "/stat")
  local state = stat and stat:read("*l"):match("%) (%a)")
  if stat then stat:close() end
  return state ~= nil and state ~= "Z"
end

local function wait_gone(pid, seconds)
  local deadline = h.now() + seconds
  while alive(pid) and h.now() < deadline do h.sleep(0.02) end
  return not alive(pid)
end

describe("#postgresql flowservice.heal on the PostgreSQL journal", function()
  local server, db, dir, client

  local function new_client() return flowservice.new(h.opts(server.url)) end
  local function healer(extra, c)
    local opts = { journal = db.uri, backoff = { 0 } }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return heal.new(c or client, opts)
  end
  local function failed_run() return server:add_run { flowId = FLOW, status = "failed", errors = CONNECT }.id end
  local function count(sql) return tonumber((db:psql(sql):match("%d+"))) end
  -- every commit takes 0.1 s more (as on a loaded database): a claim is invisible to other
  -- jobs' reads for that long, and only the claim itself (row lock, refusal) parts two jobs
  local function slow_commits(on)
    for _, sql in ipairs(on and { "ALTER SYSTEM SET commit_delay = 100000", "ALTER SYSTEM SET commit_siblings = 0" }
      or { "ALTER SYSTEM RESET commit_delay", "ALTER SYSTEM RESET commit_siblings" }) do
      assert.equal("", db:psql(sql, "postgres"))
    end
    assert.matches("^t", db:psql("SELECT pg_reload_conf()", "postgres"))
  end

  setup(function()
    server = fake.start()
    db = pgserver.start()
    dir = assert(io.popen("mktemp -d /tmp/flowservice-healpg.XXXXXX")):read("*l")
  end)
  teardown(function()
    if server then server:stop() end
    if db then db:destroy() end
    if dir then h.sh("rm -rf " .. q(dir)) end
  end)
  before_each(function()
    server:reset()
    db:psql("DROP TABLE IF EXISTS flowservice_journal")
    client = new_client()
  end)
  after_each(function() client:close() end)

  it("stops a chain of failures at max_chain: retry budget spent", function()
    server:outcomes { after = 0, status = "failed", errors = CONNECT }
    server:behaviour { linkage = false } -- the chain is known from the journal's new_ids alone
    local hl = healer { max_chain = 3 }
    local id, steps = failed_run(), {}
    for _ = 1, 3 do
      local d = hl:handle(id)
      assert.equal("retriggered", d.action, d.reason)
      steps[#steps + 1] = d.step
      id = d.new_id
    end
    assert.same({ 1, 2, 3 }, steps)
    local d = hl:handle(id)
    assert.equal("skip", d.action)
    assert.equal("retry budget spent", d.reason)
    -- another process (a new client, a new healer) reads the same chain from the database
    local other = new_client()
    assert.equal("retry budget spent", healer({ max_chain = 3 }, other):handle(id).reason)
    other:close()
    assert.equal(3, server:stats().retriggers)
    assert.equal(3, count(("SELECT count(*) FROM flowservice_journal WHERE flow = '%s' AND state = 'done'"):format(FLOW)))
  end)

  it("keeps the backoff across a restart: the schedule is a row's heal, the first one written holds", function()
    local id = failed_run()
    local d = healer({ backoff = { 2 } }):handle(id)
    assert.equal("wait", d.action)
    local stored = cjson.decode(db:psql(("SELECT heal::text FROM flowservice_journal WHERE run = '%s'"):format(id)))
    assert.equal(d.due, stored.due)
    assert.equal(1, stored.step)
    -- "restarted": a new client and healer, with another backoff; the schedule stands
    client:close()
    client = new_client()
    local again = healer({ backoff = { 600 } }):handle(id)
    assert.equal("wait", again.action)
    assert.equal(d.due, again.due)
    local list = assert(healer():scheduled { FLOW })
    assert.same({ { run_id = id, flow_id = FLOW, due = d.due, step = 1 } }, list)
    assert.equal(0, server:stats().posts)
    -- once due, acted on once, by whichever healer asks first
    while os.time() * 1000 < d.due do h.sleep(0.1) end
    assert.equal("retriggered", healer({ backoff = { 600 } }):handle(id).action)
    assert.equal("skip", healer():handle(id).action)
    assert.same({ [id] = 1 }, server:stats().by_source)
    assert.same({}, assert(healer():scheduled { FLOW }))
  end)

  it("the watch loop's scan mark is kept, the latest wins", function()
    local id = failed_run()
    local summary = heal.watch(healer(), { flows = { FLOW }, passes = 1, since = "1h" })
    assert.equal(1, summary.decisions.retriggered)
    local mark = journal.read(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }).heal_scanned
    assert.is_number(mark)
    local j = assert(journal.open(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }))
    assert(j:write { { heal = "scan", flow = FLOW, scanned = mark - 60000 } }) -- older: ignored
    j:close()
    assert.equal(mark, journal.read(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }).heal_scanned)
    assert.same({ [id] = 1 }, server:stats().by_source)
    -- two jobs writing a schedule for one run: the first stays, and the second job is told it
    local run = failed_run()
    local first = assert(journal.open(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }))
    local second = assert(journal.open(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }))
    assert(first:write { { heal = run, flow = FLOW, step = 1, due = 1000, time = 1 } })
    assert(second:write { { heal = run, flow = FLOW, step = 1, due = 2000, time = 2 } })
    assert.equal(1000, second.state.heal[run].due)
    first:close()
    second:close()
    assert.equal(1000, journal.read(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW }).heal[run].due)
    -- `journal show` lists runs, not the heal rows (the scan mark, a schedule alone)
    local shown = assert(journal.show(db.uri, { flow = FLOW }))
    assert.equal(1, #shown)
    assert.equal(id, shown[1].run)
  end)

  it("an older schema is refused with the way out, and `journal migrate` upgrades it, rows kept", function()
    -- schema version 1 as an earlier flowservice made it, with a run it re-triggered
    db:psql("CREATE TABLE flowservice_journal (org text NOT NULL, sandbox text NOT NULL, flow text NOT NULL,"
      .. " run text NOT NULL, state text NOT NULL, entry jsonb NOT NULL DEFAULT '{}', job text, host text,"
      .. " lease_until timestamptz, updated_at timestamptz NOT NULL DEFAULT now(),"
      .. " PRIMARY KEY (org, sandbox, flow, run)); ALTER TABLE flowservice_journal OWNER TO flowservice;"
      .. " INSERT INTO flowservice_journal (org, sandbox, flow, run, state, entry) VALUES"
      .. " ('', '', '', 'schema-version', 'schema', '{\"version\": 1}'),"
      .. (" ('%s', '%s', '%s', 'old-run', 'done', '{\"new_ids\": [\"n1\"]}')"):format(ORG, SANDBOX, FLOW))
    local id = failed_run()
    local d = healer():handle(id)
    assert.equal("error", d.action)
    assert.matches("schema is version 1; run `flowservice journal migrate` to bring it to 2", d.reason, 1, true)
    assert.equal(0, server:stats().posts)
    assert.same({ from = 1, to = 2 }, assert(journal.migrate(db.uri)))
    assert.equal("retriggered", healer():handle(id).action)
    local state = journal.read(db.uri, { org = ORG, sandbox = SANDBOX, flow = FLOW })
    assert.equal("done", state.runs["old-run"].state)
    assert.same({ "n1" }, state.runs["old-run"].new_ids)
  end)

  describe("in processes", function()
    -- the command with the fake's settings and its own state directory, in the background
    local function watch_cmd(state_dir, argv, out)
      local words = { "env -i", "PATH=" .. q(os.getenv("PATH") or "/usr/bin:/bin"), "HOME=" .. q(state_dir),
        "XDG_STATE_HOME=" .. q(state_dir),
        "LUA_PATH=" .. q("build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;;"),
        "LUA_CPATH=" .. q("build/tree/lib/lua/5.4/?.so;;"), "AEP_ACCESS_TOKEN=" .. q(fake.credentials.access_token),
        "AEP_API_KEY=" .. q(fake.credentials.api_key), "AEP_ORG_ID=" .. q(ORG), "FLOWSERVICE_URL=" .. q(server.url),
        "lua5.4 bin/flowservice" }
      for _, a in ipairs(argv) do words[#words + 1] = q(a) end
      return table.concat(words, " ") .. " </dev/null >" .. q(out) .. " 2>" .. q(out .. ".err")
    end
    local hosts = 0
    local function host_dir()
      hosts = hosts + 1
      local d = dir .. "/host-" .. hosts
      h.sh("mkdir -p " .. q(d))
      return d
    end
    local function background(cmd, pidfile)
      assert.equal(0, h.sh(cmd .. " & echo $! >" .. q(pidfile)))
      return assert(tonumber(read(pidfile):match("%d+")))
    end

    it("#pgjobs the watch command and heal in another process, two state directories, one ledger:"
      .. " every failed run re-triggered exactly once", function()
      local N = 24
      local ids = {}
      for i = 1, N do ids[i] = failed_run() end
      -- each re-trigger takes a while, and so does each commit: the two hosts meet on the same
      -- runs, and only the claim parts them
      server:scenario { match = "^POST ", act_then_delay = 0.05, times = 0 }
      assert(journal.migrate(db.uri))
      slow_commits(true)
      finally(function() slow_commits(false) end)
      local a, b = host_dir(), host_dir()
      local watch_pid = background(watch_cmd(a, { "watch", "--flow", FLOW, "--journal", db.uri, "--backoff", "0",
        "--every", "0", "--passes", "3", "--since", "1h", "--json" }, a .. "/out"), a .. "/pid")
      local heal_pid = background(("env -u http_proxy -u https_proxy XDG_STATE_HOME=%s lua5.4 spec/support/heal_job.lua"
        .. " %s %s %s 3 >%s 2>&1"):format(q(b), q(server.url), q(FLOW), q(db.uri), q(b .. "/out")), b .. "/pid")
      assert.is_true(wait_gone(watch_pid, 120) and wait_gone(heal_pid, 120), "the hosts did not finish")
      local watched = 0
      for line in read(a .. "/out"):gmatch("[^\n]+") do
        local d = cjson.decode(line)
        if d.action == "retriggered" then watched = watched + 1 end
      end
      local healed = cjson.decode(read(b .. "/out"):match("[^\n]*\n?$"))
      assert.is_nil(healed.error, read(b .. "/out"))
      io.stderr:write(("\n  watch re-triggered %d, heal %d of %d\n"):format(watched, #healed.retriggered, N))
      local by_source = server:stats().by_source
      for i = 1, N do assert.equal(1, by_source[ids[i]], "run " .. i) end
      assert.equal(N, server:stats().posts)
      assert.equal(N, watched + #healed.retriggered)
    end)
  end)
end)

describe("#openresty #postgresql flowservice.webhook on the PostgreSQL journal", function()
  local nginx = require "spec.support.nginx"
  local tls = require "spec.support.tls"
  local signing = require "spec.support.signing"
  local events = require "spec.support.events"
  local capture = nginx.util.capture
  local CLIENT = "suite-client-id"
  local pki, keys, flow_service, db, tmp
  local hooks = {}

  setup(function()
    pki = tls.make()
    os.execute("chmod 755 " .. pki.dir)
    keys = signing.make()
    flow_service = fake.start { tls = { cert = pki.cert, key = pki.key } }
    flow_service:keys { [events.KEY1] = keys.public, [events.KEY2] = keys.other_public }
    flow_service:signing { key1 = { path = events.KEY1, private_key = keys.private_path },
                           key2 = { path = events.KEY2, private_key = keys.other_private_path } }
    db = pgserver.start()
    assert(journal.migrate(db.uri))
    tmp = capture("mktemp -d /tmp/flowservice-webhookpg.XXXXXX"):gsub("%s+$", "")
    os.execute("chmod 777 " .. tmp)
    -- the workers read the passfile, which is root's when the suite runs as root
    local user = capture("id -u"):match("^0") and "user root root;" or ""
    for i = 1, 2 do -- two "hosts": two nginx instances, one ledger
      hooks[i] = nginx.start { template = "spec/support/webhook.conf.in", ready = "/health", timeout = 10,
        vars = { ROOT = capture("pwd"):gsub("%s+$", ""), FAKE_URL = flow_service.url, JOURNAL_DIR = tmp,
          CLIENT_ID = CLIENT, KEY_HOST = flow_service.tls_url, CA_FILE = pki.ca_file, FLOW = FLOW,
          BACKOFF = "{ 0 }", MAX_CHAIN = 2, USER = user, JOURNAL = string.format("%q", db.uri) } }
    end
  end)
  teardown(function()
    for _, s in ipairs(hooks) do s:stop() end
    if flow_service then flow_service:stop() end
    if db then db:destroy() end
    signing.remove(keys)
    tls.remove(pki)
    if tmp then os.execute("rm -rf '" .. tmp .. "'") end
  end)

  it("the same event delivered to two nginx instances: one re-trigger", function()
    flow_service:scenario { match = "^POST ", act_then_delay = 0.05, times = 0 }
    -- each instance reads the run before it looks at the journal (both meet there), and each
    -- commit takes 0.1 s more: only the claim parts them
    flow_service:scenario { match = "^GET /runs/", delay = 0.2, times = 0 }
    for _, sql in ipairs { "ALTER SYSTEM SET commit_delay = 100000", "ALTER SYSTEM SET commit_siblings = 0",
      "SELECT pg_reload_conf()" } do db:psql(sql, "postgres") end
    local runs, list = {}, {}
    for i = 1, 5 do
      runs[i] = flow_service:add_run { flowId = FLOW, status = "failed", errors = CONNECT }
      list[i] = { run = runs[i].id, event_id = events.event_id() }
    end
    -- the fake delivers each event to both instances, one after the other: each sees it first
    local ids = flow_service:emit { urls = { hooks[1].url .. "/adobe-events", hooks[2].url .. "/adobe-events" },
      events = list, recipient = CLIENT, concurrency = 1, retry_intervals = {} }
    local ok, deliveries = flow_service:wait_deliveries(ids, 30)
    assert.is_true(ok)
    assert.equal(10, #deliveries)
    for _, d in ipairs(deliveries) do
      assert.equal(200, d.status, d.attempts[1] and d.attempts[1].body)
      assert.equal("accepted\n", d.attempts[1].body)
    end
    assert.is_true(flow_service:wait_for_posts(5, 30), "not every run was re-triggered: "
      .. hooks[1]:error_log():sub(-3000))
    h.sleep(2) -- a second re-trigger would have come by now
    local by_source = flow_service:stats().by_source
    for i, run in ipairs(runs) do assert.equal(1, by_source[run.id], "run " .. i) end
    assert.equal(5, flow_service:stats().posts)
    local done = db:psql(("SELECT count(*) FROM flowservice_journal WHERE flow = '%s' AND state = 'done'"):format(FLOW))
    assert.equal("5", done:match("%d+"))
  end)
end)
