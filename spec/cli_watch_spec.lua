-- flowservice watch: the auto-heal's watch loop as a command (real
-- processes against the fake Flow Service).
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local command = require "spec.support.command"
local journal = require "flowservice.journal"

local FLOW = fake.flows.enabled
local CONNECT = { { code = "CONNECTOR-1001-500", message = "Unable to connect to the source" } }
local q = h.q

describe("flowservice watch", function()
  local server, tmp, state_home, n = nil, nil, nil, 0

  local function environment()
    return command.environment(server.url, tmp, state_home,
      { LUA_PATH = command.LUA_PATH, LUA_CPATH = command.LUA_CPATH })
  end
  local function run(argv)
    return command.run(tmp, command.SOURCE, environment(), argv)
  end
  local function failed_run(errors)
    return server:add_run { flowId = FLOW, status = "failed", errors = errors or CONNECT }.id
  end

  setup(function()
    server = fake.start()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -m 700 " .. q(tmp)))
  end)
  teardown(function()
    server:stop()
    os.execute("rm -rf " .. q(tmp))
  end)
  before_each(function()
    server:reset()
    n = n + 1
    state_home = tmp .. "/state-" .. n
  end)

  it("re-triggers each eligible failed run once over passes, prints each decision, writes the metrics", function()
    local a, b = failed_run(), failed_run()
    local parse = failed_run { { code = "CONNECTOR-2001-500", message = "cannot parse" } }
    local metrics = tmp .. "/heal.prom"
    local args = { "watch", "--flow", FLOW, "--passes", "2", "--every", "0", "--since", "1h", "--backoff", "0",
      "--metrics-file", metrics }
    local code, out, err = run(args)
    assert.equal(0, code, err)
    local by = server:stats().by_source
    assert.equal(1, by[a])
    assert.equal(1, by[b])
    assert.is_nil(by[parse])
    for _, count in pairs(by) do assert.equal(1, count) end
    assert.matches("retriggered +" .. h.literal(a) .. "  new run ", out)
    assert.matches("skip +" .. h.literal(parse) .. "  excluded error code CONNECTOR%-2001%-500", out)
    assert.matches("\nflowservice_heal_runs_retriggered_total %d+\n", h.read(metrics))
    -- the command's journal: the same file retry-failed keeps for the flow
    local files = require("spec.support.nginx").util.capture("ls " .. q(state_home .. "/flowservice"))
    assert.matches("_" .. h.literal(FLOW) .. "%.jsonl", files)
    local path = state_home .. "/flowservice/" .. files:match("(%S+)")
    assert.equal("done", journal.read(path).runs[a].state)
    -- again: nothing new to do
    local posts = server:stats().posts
    code = run(args)
    assert.equal(0, code)
    assert.equal(posts, server:stats().posts)
  end)

  it("keeps the backoff in the journal across invocations", function()
    local id = failed_run()
    local args = { "watch", "--flow", FLOW, "--passes", "1", "--since", "1h", "--backoff", "2s", "--json" }
    local code, out = run(args)
    assert.equal(0, code)
    local line = require("cjson").decode(out:match("[^\n]*" .. h.literal(id) .. "[^\n]*"))
    assert.equal("wait", line.action)
    assert.equal(0, server:stats().posts)
    h.sleep(2.5)
    code = run(args)
    assert.equal(0, code)
    assert.equal(1, server:stats().by_source[id])
  end)

  it("stops on SIGTERM between passes: exit 143", function()
    failed_run()
    os.remove(tmp .. "/status")
    os.remove(tmp .. "/out")
    local started = h.now()
    os.execute("(" .. command.line(command.SOURCE, environment(),
      { "watch", "--flow", FLOW, "--every", "1h", "--since", "1h", "--backoff", "0" })
      .. " >" .. q(tmp .. "/out") .. " 2>" .. q(tmp .. "/err") .. " </dev/null & echo $! >" .. q(tmp .. "/pid")
      .. "; wait $!; echo $? >" .. q(tmp .. "/status") .. ") &")
    local deadline = h.now() + 20
    while not (h.read(tmp .. "/out") or ""):find("retriggered", 1, true) and h.now() < deadline do h.sleep(0.1) end
    h.sleep(0.3)
    os.execute("kill -TERM " .. h.read(tmp .. "/pid"):match("%d+"))
    while not (h.read(tmp .. "/status") or ""):match("%d") and h.now() < deadline do h.sleep(0.1) end
    assert.equal("143", h.read(tmp .. "/status"):match("%d+"))
    assert.is_true(h.now() - started < 20)
    assert.matches("interrupted by SIGTERM after 1 pass", h.read(tmp .. "/err"))
  end)

  it("dry-run decides and sends nothing", function()
    local id = failed_run()
    local code, out = run { "watch", "--flow", FLOW, "--passes", "1", "--since", "1h", "--backoff", "0", "--dry-run" }
    assert.equal(0, code)
    assert.matches("planned +" .. h.literal(id), out)
    assert.equal(0, server:stats().posts)
  end)

  it("refuses bad usage with exit 2, sending nothing", function()
    for _, argv in ipairs {
      { "watch" },
      { "watch", "--flow", FLOW, "--all-flows" },
      { "watch", "--flow", FLOW, "--every", "soon" },
      { "watch", "--flow", FLOW, "--backoff", "5m,x" },
      { "watch", "--flow", FLOW, "--max-chain", "-1" },
      { "watch", "--flow", "not a flow id" },
      { "watch", "--flow", FLOW, "--journal", "postgresql://127.0.0.1:9/x" },
    } do
      local code, _, err = run(argv)
      assert.equal(2, code, table.concat(argv, " "))
      assert.matches("^flowservice: ", err)
    end
    assert.equal(0, #server:requests())
  end)
end)
