-- flowservice.heal: the policy (eligibility, allow-list, codes, the chain
-- budget, the backoff kept in the journal, dry_run) and acting once through
-- retry_failed's journal, against the fake Flow Service.
local flowservice = require "flowservice"
local heal = require "flowservice.heal"
local journal = require "flowservice.journal"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local FLOW = fake.flows.enabled
local CONNECT = { { code = "CONNECTOR-1001-500", message = "Unable to connect to the source" } }

describe("flowservice.heal", function()
  local server, client, path

  local function healer(extra)
    local opts = { journal = path, backoff = { 0 } }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return heal.new(client, opts)
  end
  local function failed_run(errors, extra)
    local t = { flowId = FLOW, status = "failed", errors = errors or CONNECT }
    for k, v in pairs(extra or {}) do t[k] = v end
    return server:add_run(t).id
  end
  local function retriggers() return server:stats().retriggers end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function()
    server:reset()
    path = h.tmp_journal()
    client = flowservice.new(h.opts(server.url))
  end)
  after_each(function()
    client:close()
    os.remove(path)
  end)

  it("re-triggers an eligible failed run once; asked again, it skips it", function()
    local id = failed_run()
    local hl = healer()
    local d = hl:handle(id)
    assert.equal("retriggered", d.action)
    assert.is_string(d.new_id)
    assert.equal(1, d.step)
    assert.equal(1, retriggers())
    for _ = 1, 3 do
      local again = hl:handle(id)
      assert.equal("skip", again.action)
      assert.equal("already_retriggered", again.why)
    end
    -- a second healer on the same journal (another worker, a watch loop)
    assert.equal("skip", healer():handle(id).action)
    assert.equal(1, retriggers())
    assert.same({ [id] = 1 }, server:stats().by_source)
  end)

  it("leaves parsing and validation failures alone by default, as configured otherwise", function()
    local parse = failed_run { { code = "CONNECTOR-2001-500", message = "cannot parse" } }
    local nested = failed_run { { code = "FLOW-1106-500", message = "x",
      nestedErrors = { { code = "INGEST-1212-400", message = "bad records" } } } }
    local mapper = failed_run { { code = "MAPPER-3001-400", message = "mapping" } }
    local hl = healer()
    for _, id in ipairs { parse, nested, mapper } do
      local d = hl:handle(id)
      assert.equal("skip", d.action)
      assert.equal("excluded_code", d.why)
      assert.matches("^excluded error code ", d.reason)
    end
    assert.equal(0, retriggers())
    -- exclude_codes = {} takes every code; codes narrows to some
    assert.equal("retriggered", healer { exclude_codes = {} }:handle(parse).action)
    local d = healer { exclude_codes = {}, codes = { "CONNECTOR-1001" } }:handle(mapper)
    assert.equal("skip", d.action)
    assert.equal("no error code matching CONNECTOR-1001", d.reason)
    assert.equal(1, retriggers())
  end)

  it("keeps to the allow-list and to eligible runs", function()
    local id = failed_run()
    local d = healer { flows = { fake.flows.bulk } }:handle(id)
    assert.equal("flow_not_allowed", d.why)
    d = healer():handle(h.runs.success_with_records)
    assert.equal("ineligible", d.why)
    d = healer():handle(h.runs.success_no_records)
    assert.equal("ineligible", d.why)
    assert.equal(0, retriggers())
    assert.equal("retriggered", healer { zero_record_success = true }:handle(h.runs.success_no_records).action)
  end)

  it("stops a chain of failures at max_chain: retry budget spent", function()
    server:outcomes { after = 0, status = "failed", errors = CONNECT }
    local hl = healer { max_chain = 3 }
    local id, steps = failed_run(), {}
    for _ = 1, 3 do
      local d = hl:handle(id)
      assert.equal("retriggered", d.action)
      steps[#steps + 1] = d.step
      id = d.new_id
    end
    assert.same({ 1, 2, 3 }, steps)
    local d = hl:handle(id) -- the third re-run failed too
    assert.equal("skip", d.action)
    assert.equal("retry budget spent", d.reason)
    assert.equal("budget", d.why)
    assert.equal(3, retriggers())
    -- the chain is known from parentFlowRunId alone too (a fresh journal)
    os.remove(path)
    assert.equal("retry budget spent", healer { max_chain = 3 }:handle(id).reason)
    assert.equal("retriggered", healer { max_chain = 4 }:handle(id).action)
  end)

  it("knows a chain from the journal's new_ids when the service does not link", function()
    server:behaviour { linkage = false }
    server:outcomes { after = 0, status = "failed", errors = CONNECT }
    local hl = healer { max_chain = 1 }
    local d = hl:handle(failed_run())
    assert.equal("retriggered", d.action)
    assert.is_nil(server:run(d.new_id).parentFlowRunId)
    assert.equal("retry budget spent", hl:handle(d.new_id).reason)
    assert.equal(1, retriggers())
  end)

  it("waits out the backoff, kept in the journal: a new healer keeps the schedule", function()
    local id = failed_run()
    local d = healer { backoff = { 60 } }:handle(id)
    assert.equal("wait", d.action)
    local now = os.time() * 1000
    assert.is_true(d.due >= now + 58000 and d.due <= now + 61000)
    -- restarted, with another backoff: the schedule written first holds
    local again = healer { backoff = { 1 } }:handle(id)
    assert.equal("wait", again.action)
    assert.equal(d.due, again.due)
    local state = journal.read(path)
    assert.equal(d.due, state.heal[id].due)
    assert.is_nil(state.runs[id]) -- a schedule is not a run state
    local list = healer():scheduled { FLOW }
    assert.equal(1, #list)
    assert.same({ run_id = id, flow_id = FLOW, due = d.due, step = 1 }, list[1])
    assert.equal(0, retriggers())
  end)

  it("waits before every step of a chain by backoff (the last entry repeats)", function()
    local hl = healer { backoff = { 0, 120 } }
    assert.equal(0, hl:delay(1))
    assert.equal(120, hl:delay(2))
    assert.equal(120, hl:delay(5))
    server:outcomes { after = 0, status = "failed", errors = CONNECT }
    local d = hl:handle(failed_run())
    assert.equal("retriggered", d.action)
    local second = hl:handle(d.new_id)
    assert.equal("wait", second.action)
    assert.equal(2, second.step)
    assert.equal(1, retriggers())
  end)

  it("dry_run decides and sends nothing, writes nothing", function()
    local id = failed_run()
    local hl = heal.new(client, { dry_run = true, journal = path, backoff = { 0 } })
    local d = hl:handle(id)
    assert.equal("planned", d.action)
    assert.equal(0, retriggers())
    assert.is_nil(io.open(path))
    assert.equal("retry budget spent", heal.new(client, { dry_run = true, max_chain = 0 }):handle(id).reason)
  end)

  it("answers busy while another job holds the flow's journal, and acts after", function()
    local id = failed_run()
    local held = assert(journal.open(path))
    local d = healer():handle(id)
    assert.equal("busy", d.action)
    held:close()
    assert.equal("retriggered", healer():handle(id).action)
  end)

  it("logs one line per decision, without secrets, and counts them", function()
    local lines, counted = {}, {}
    local hl = healer { log = function(l) lines[#lines + 1] = l end,
      count = function(d) counted[#counted + 1] = d.action end }
    local id = failed_run()
    hl:handle(id)
    hl:handle(id)
    assert.equal(2, #lines)
    assert.matches("^heal: run " .. id:gsub("%-", "%%-") .. " flow .*: retriggered step 1 new run ", lines[1])
    assert.matches(": skip %(already re%-triggered ", lines[2])
    assert.same({ "retriggered", "skip" }, counted)
    for _, l in ipairs(lines) do assert.is_nil(l:find(h.creds.access_token, 1, true)) end
  end)

  it("raises on misuse", function()
    assert.has_error(function() heal.new(client, {}) end)
    assert.has_error(function() heal.new(client, { journal = path, max_chain = -1 }) end)
    assert.has_error(function() heal.new(client, { journal = path, backoff = {} }) end)
    assert.has_error(function() heal.new(client, { journal = path, bogus = 1 }) end)
    assert.has_error(function() heal.new({}, { journal = path }) end)
    -- a PostgreSQL journal is taken like a file (spec/heal_pg_spec.lua); one that cannot be
    -- reached is an error decision, nothing sent
    local d = heal.new(client, { journal = ("postgresql://flowservice@127.0.0.1:%d/x"):format(h.closed_port) })
      :handle(server:add_run { flowId = FLOW, status = "failed", errors = CONNECT }.id)
    assert.equal("error", d.action)
    assert.matches("PostgreSQL journal: cannot connect", d.reason)
    assert.equal(0, server:stats().posts)
    local ok, err = pcall(heal.new, client, { journal = path, codes = { "" } })
    assert.is_false(ok)
    assert.matches("bad argument #2 to 'heal.new' %(option 'codes' entry 1", err)
  end)
end)

describe("flowservice.heal.watch", function()
  local server, client, dir

  local function journal_of(flow_id) return dir .. "/" .. flow_id .. ".jsonl" end
  local function failed_run(flow, errors)
    return server:add_run { flowId = flow or FLOW, status = "failed", errors = errors or CONNECT }.id
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function()
    server:reset()
    local p = io.popen("mktemp -d /tmp/flowservice-watch.XXXXXX")
    dir = p:read("*l")
    p:close()
    client = flowservice.new(h.opts(server.url))
  end)
  after_each(function()
    client:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("re-triggers each flow's failed runs once across passes, and writes the metrics file", function()
    local a, b = failed_run(), failed_run()
    local parse = failed_run(nil, { { code = "CONNECTOR-2001-500", message = "cannot parse" } })
    local hl = heal.new(client, { journal = journal_of, backoff = { 0 } })
    local mfile = dir .. "/heal.prom"
    local summary = heal.watch(hl, { flows = { FLOW }, every = 0, passes = 3, since = "1h", metrics_file = mfile })
    assert.equal(3, summary.passes)
    assert.same({}, summary.errors)
    local by = server:stats().by_source
    assert.equal(1, by[a])
    assert.equal(1, by[b])
    assert.is_nil(by[parse])
    -- the fixture's own failed runs of the flow are in the window too (created now): each once at most
    for _, n in pairs(by) do assert.equal(1, n) end
    local text = assert(io.open(mfile)):read("*a")
    assert.matches("\nflowservice_heal_runs_retriggered_total " .. summary.decisions.retriggered .. "\n", text)
    assert.matches('flowservice_heal_runs_skipped_total{reason="excluded_code"} %d+', text)
    -- the scan mark: the next watch starts from it
    assert.is_number(journal.read(journal_of(FLOW)).heal_scanned)
    local posts = server:stats().posts
    heal.watch(heal.new(client, { journal = journal_of, backoff = { 0 } }), { flows = { FLOW }, passes = 1 })
    assert.equal(posts, server:stats().posts)
  end)

  it("acts on a schedule once it comes due, on a later pass", function()
    local id = failed_run()
    local hl = heal.new(client, { journal = journal_of, backoff = { 1 } })
    local passes = 0
    local summary = heal.watch(hl, { flows = { FLOW }, every = 0.5, since = "1h",
      stop = function() return server:stats().by_source[id] == 1 or passes >= 12 end,
      on_pass = function() passes = passes + 1 end })
    assert.equal(1, server:stats().by_source[id])
    assert.is_true(summary.passes >= 2)
    assert.is_true(summary.decisions.retriggered >= 1)
    assert.is_true(summary.decisions.wait >= 1)
  end)

  it("settles a run a dead process left pending (never sent: re-triggered once)", function()
    local id = failed_run()
    local j = assert(journal.open(journal_of(FLOW)))
    assert(j:write { { run = id, flow = FLOW, state = "pending", request_id = "dead-1",
      time = os.time() * 1000, server_time = os.time() * 1000 - 5000 } })
    j:close()
    local hl = heal.new(client, { journal = journal_of, backoff = { 0 }, grace = 0 })
    local listed = hl:scheduled { FLOW }
    assert.equal(1, #listed)
    assert.is_true(listed[1].unsettled)
    local summary = heal.watch(hl, { flows = { FLOW }, passes = 2, every = 0, since = "1h" })
    assert.same({}, summary.errors)
    assert.equal(1, server:stats().by_source[id])
    local entry = journal.read(journal_of(FLOW)).runs[id]
    assert.equal("done", entry.state)
    assert.equal(0, #hl:scheduled { FLOW })
  end)

  it("covers every enabled flow with all_flows, and raises on misuse", function()
    local bulk = failed_run(fake.flows.bulk)
    local hl = heal.new(client, { journal = journal_of, backoff = { 0 }, exclude_codes = {} })
    heal.watch(hl, { all_flows = true, passes = 1, since = "1h" })
    assert.equal(1, server:stats().by_source[bulk])
    assert.has_error(function() heal.watch(hl, { passes = 1 }) end)
    assert.has_error(function() heal.watch(hl, { flows = { FLOW }, all_flows = true }) end)
    assert.has_error(function() heal.watch({}, { flows = { FLOW } }) end)
  end)
end)
