-- The `flowservice` command, run as a real process (lua5.4 bin/flowservice
-- with the rock in build/tree) against the fake Flow Service: arguments,
-- configuration from flags and the environment, output, exit statuses.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local command = require "spec.support.command"
local cjson = require "cjson"
local flowservice = require "flowservice"

local TOKEN, SECRET = fake.credentials.access_token, fake.ims_client.client_secret
local ENABLED, BULK = fake.flows.enabled, fake.bulk_flow

local q, lit, write = h.q, h.literal, h.write
-- a file holding a secret: the command refuses one that group or others may read
local function write_secret(path, text)
  write(path, text)
  assert(os.execute("chmod 600 " .. q(path)))
end
local function read(path) return assert(h.read(path), "cannot read " .. path) end

-- client:retry_failed lands with flowservice.bulk; until then its tests wait.
local HAS_RETRY_FAILED
do
  local probe = flowservice.new(h.opts("http://127.0.0.1:9")) -- no I/O
  HAS_RETRY_FAILED = type(probe.retry_failed) == "function"
  probe:close()
end

describe("flowservice command", function()
  local server, tmp
  local state_home, tests = nil, 0 -- each test its own journals

  -- The environment the fake accepts; extra: name -> value, or false to drop it.
  local function environment(extra)
    local env = command.environment(server.url, tmp .. "/home", state_home,
      { LUA_PATH = command.LUA_PATH, LUA_CPATH = command.LUA_CPATH })
    for k, v in pairs(extra or {}) do env[k] = v or nil end
    return env
  end
  local no_secret = command.no_secret

  -- flowservice(argv, env_changes, stdin) -> exit status, stdout, stderr
  local function flowservice_cmd(argv, extra, stdin)
    return command.run(tmp, command.SOURCE, environment(extra), argv, stdin)
  end

  local function json(text)
    local ok, doc = pcall(cjson.decode, text)
    assert(ok, "not one JSON document: " .. text)
    return doc
  end

  local function requests(prefix)
    local list = {}
    for _, r in ipairs(server:requests()) do
      if r.path:sub(1, #prefix) == prefix then list[#list + 1] = r end
    end
    return list
  end

  setup(function()
    server = fake.start()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -m 700 " .. q(tmp) .. " " .. q(tmp .. "/home")))
  end)
  teardown(function()
    server:stop()
    os.execute("rm -rf " .. q(tmp))
  end)
  before_each(function()
    server:reset()
    tests = tests + 1
    state_home = tmp .. "/state-" .. tests
  end)

  describe("--help and --version", function()
    it("prints the usage, the commands and the shared flags, and exits 0", function()
      local code, out, err = flowservice_cmd { "--help" }
      assert.equal(0, code)
      assert.matches("^usage: flowservice COMMAND", out)
      for _, word in ipairs { "retry-failed", "retrigger", "get-run", "list-runs", "list-flows", "help",
        "completion", "--access-token-file", "--client-secret-file", "AEP_ORG_ID" } do
        assert.truthy(out:find(word, 1, true), word)
      end
      assert.is_nil(out:find("--resolve", 1, true)) -- a command's own flags are in its help
      assert.equal("", err)
      code, out = flowservice_cmd { "retrigger", "--help" }
      assert.equal(0, code)
      assert.matches("^usage: flowservice retrigger", out)
      assert.is_nil(out:find("--resolve", 1, true))
    end)

    it("prints the version and libcurl's", function()
      local code, out = flowservice_cmd { "--version" }
      assert.equal(0, code)
      assert.equal(("flowservice %s (libcurl %s)\n"):format(flowservice._VERSION, flowservice.curl_version), out)
    end)

    it("without a command prints the usage on stderr and exits 2", function()
      local code, out, err = flowservice_cmd {}
      assert.equal(2, code)
      assert.equal("", out)
      assert.matches("^usage:", err)
    end)
  end)

  describe("retrigger", function()
    it("re-triggers one run: RUN_ID -> NEW_ID ETAG", function()
      local code, out, err = flowservice_cmd { "retrigger", h.runs.failed }
      assert.equal(0, code)
      assert.equal("", err)
      local new_id, etag = out:match("^" .. lit(h.runs.failed) .. " %-> ([%w%-]+) (\"[^\"]+\")\n$")
      assert.truthy(new_id, out)
      assert.equal(etag, server:run(new_id).etag)
      local posts = {}
      for _, r in ipairs(requests("/runs/")) do
        if r.method == "POST" then posts[#posts + 1] = r end
      end
      assert.equal(1, #posts)
      assert.equal("/runs/" .. h.runs.failed .. "/action", posts[1].path)
      assert.equal("GET", requests("/runs/")[1].method) -- read first: flow, etag, children
      assert.equal(server:run(h.runs.failed).etag, posts[1].headers["if-match"])
    end)

    it("re-triggers several, one line each, in order", function()
      local code, out = flowservice_cmd { "retrigger", h.runs.failed, h.runs.success_no_records }
      assert.equal(0, code)
      local lines = {}
      for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal(2, #lines)
      assert.matches("^" .. lit(h.runs.failed) .. " %-> ", lines[1])
      assert.matches("^" .. lit(h.runs.success_no_records) .. " %-> ", lines[2])
    end)

    it("reads run ids from stdin with -", function()
      local code, out = flowservice_cmd({ "retrigger", "-" },
        nil, h.runs.failed .. "\n\n  " .. h.runs.success_no_records .. "  \n")
      assert.equal(0, code)
      assert.equal(2, select(2, out:gsub("\n", "")))
      assert.equal(2, server:stats().retriggers)
    end)

    it("exits 1 when a run cannot be re-triggered, and says why", function()
      local code, out = flowservice_cmd { "retrigger", h.runs.failed, h.runs.success_with_records }
      assert.equal(1, code)
      assert.matches(lit(h.runs.failed) .. " %-> ", out)
      assert.matches(lit(h.runs.success_with_records) .. " failed: flowservice: HTTP 400 FLOW%-1387%-400", out)
    end)

    it("--json: one document, lists stay lists when empty, errors without bodies", function()
      local code, out, err = flowservice_cmd { "retrigger", h.runs.failed, "--json" }
      assert.equal(0, code)
      assert.equal("", err)
      assert.matches('"failed":%[%]', out)
      local doc = json(out)
      assert.equal(1, #doc.retriggered)
      assert.equal(h.runs.failed, doc.retriggered[1].run_id)
      assert.equal(server:run(doc.retriggered[1].new_id).etag, doc.retriggered[1].etag)

      code, out = flowservice_cmd { "retrigger", "--json", h.runs.success_with_records }
      assert.equal(1, code)
      assert.matches('"retriggered":%[%]', out)
      doc = json(out)
      local e = doc.failed[1].error
      assert.same({ "code", "kind", "message", "request_id", "status" }, (function()
        local keys = {}
        for k in pairs(e) do keys[#keys + 1] = k end
        table.sort(keys)
        return keys
      end)())
      assert.equal("http", e.kind)
      assert.equal(400, e.status)
      assert.equal("FLOW-1387-400", e.code)
    end)
  end)

  describe("retrigger keeps memory", function()
    local function posts_for(id)
      local n = 0
      for _, r in ipairs(requests("/runs/" .. id)) do
        if r.method == "POST" then n = n + 1 end
      end
      return n
    end

    it("skips a run its flow's journal holds as done (exit 0); --force re-triggers it, journaled", function()
      local code = flowservice_cmd { "retrigger", h.runs.failed }
      assert.equal(0, code)
      local out
      code, out = flowservice_cmd { "retrigger", h.runs.failed }
      assert.equal(0, code)
      assert.equal(h.runs.failed .. " skipped: already re-triggered (journal)\n", out)
      assert.equal(1, posts_for(h.runs.failed))
      code, out = flowservice_cmd { "retrigger", "--force", h.runs.failed }
      assert.equal(0, code)
      assert.matches("^" .. lit(h.runs.failed) .. " %-> ", out)
      assert.equal(2, posts_for(h.runs.failed))
      local journal = state_home .. "/flowservice/FAKEORG@AdobeOrg_prod_" .. ENABLED .. ".jsonl"
      local states = {}
      for line in read(journal):gmatch("[^\n]+") do
        local e = json(line)
        if e.run == h.runs.failed then states[#states + 1] = e.state end
      end
      assert.same({ "pending", "done", "pending", "done" }, states)
    end)

    it("skips a run whose childFlowRunIds show it was re-triggered, without a journal too", function()
      local code = flowservice_cmd { "retrigger", "--no-journal", h.runs.failed }
      assert.equal(0, code)
      local out
      code, out = flowservice_cmd({ "retrigger", "--no-journal", "-" }, nil, h.runs.failed .. "\n")
      assert.equal(0, code)
      assert.equal(h.runs.failed .. " skipped: already re-triggered (childFlowRunIds)\n", out)
      assert.equal(1, posts_for(h.runs.failed))
    end)

    it("reports a run left pending by a killed job as ambiguous, then settles it on the next run", function()
      server:scenario { match = "^POST ", act_then_delay = 0, status = 503 }
      local code, out = flowservice_cmd { "retrigger", h.runs.failed }
      assert.equal(1, code)
      assert.matches(lit(h.runs.failed) .. " ambiguous: flowservice: HTTP 503", out)
      code, out = flowservice_cmd { "retrigger", "--grace", "0", h.runs.failed }
      assert.equal(0, code, out)
      assert.matches("skipped: already re%-triggered %(journal%)", out)
      assert.matches("settled from the journal: done %(count%)", out) -- nothing learned yet
      assert.equal(1, posts_for(h.runs.failed))
      assert.equal(1, server:stats().by_source[h.runs.failed])
    end)
  end)

  describe("interrupts", function()
    -- flowservice in the background: returns its pid and a function that
    -- waits for it and returns exit status, stdout, stderr
    local function spawn(argv, extra)
      local base = tmp .. "/bg-" .. tests
      os.execute("( " .. command.line(command.SOURCE, environment(extra), argv) .. " </dev/null >" .. q(base .. ".out") .. " 2>"
        .. q(base .. ".err") .. " & echo $! >" .. q(base .. ".pid") .. "; wait $!; echo $? >"
        .. q(base .. ".status") .. " ) >/dev/null 2>&1 &")
      local pid
      for _ = 1, 200 do
        local f = io.open(base .. ".pid")
        pid = f and tonumber(f:read("*a"))
        if f then f:close() end
        if pid then break end
        h.sleep(0.01)
      end
      return assert(pid), function()
        local deadline = h.now() + 30
        while h.now() < deadline do
          local f = io.open(base .. ".status")
          local code = f and tonumber(f:read("*a"))
          if f then f:close() end
          if code then
            local out, err = read(base .. ".out"), read(base .. ".err")
            no_secret(out, err)
            return code, out, err
          end
          h.sleep(0.05)
        end
        error("flowservice did not exit")
      end
    end

    for _, case in ipairs { { "INT", 130 }, { "TERM", 143 } } do
      it("SIG" .. case[1] .. " during retry-failed: in-flight finished and journaled, partial report, exit "
        .. case[2] .. "; the same command resumes", function()
        local journal = tmp .. "/interrupted-" .. tests .. ".jsonl"
        -- the in-flight pair answers 2 s after acting: the signal lands long before a third is sent
        server:scenario { match = "^POST /runs/", act_then_delay = 2, times = 0 }
        local argv = { "retry-failed", "--flow", BULK, "--since", "all", "--journal", journal, "--concurrency", "2" }
        local pid, finish = spawn(argv)
        assert.is_true(server:wait_for_posts(2, 20))
        os.execute("kill -" .. case[1] .. " " .. pid)
        local code, out, err = finish()
        assert.equal(case[2], code, err)
        assert.matches("interrupted by SIG" .. case[1], err)
        assert.matches("run the same command again to resume", err)
        assert.matches("retriggered +2\n", out)
        assert.is_nil(err:find("traceback", 1, true))
        assert.is_nil((out .. err):find("%.lua:%d"))
        local done = 0
        for line in read(journal):gmatch("[^\n]+") do
          if json(line).state == "done" then done = done + 1 end
        end
        assert.equal(2, done)
        assert.equal(2, server:stats().posts)
        server:scenario {}
        server:reset()
        code, out = flowservice_cmd(argv)
        assert.equal(0, code)
        assert.matches("retriggered +38\n", out)
        local by_source = server:stats().by_source
        for i = 1, 40 do assert.is_true((by_source[fake.bulk_run_id(i)] or 0) <= 1) end
      end)
    end

    it("SIGINT during retrigger of several runs: exit 130, the rest not attempted", function()
      server:scenario { match = "^POST /runs/", act_then_delay = 2, times = 0 }
      local ids = {}
      for i = 1, 6 do ids[i] = fake.bulk_run_id(i) end
      local pid, finish = spawn { "retrigger", "--concurrency", "1", table.unpack(ids) }
      assert.is_true(server:wait_for_posts(1, 20))
      os.execute("kill -INT " .. pid)
      local code, out, err = finish()
      assert.equal(130, code, err)
      assert.matches("^" .. lit(ids[1]) .. " %-> ", out)
      assert.matches(lit(ids[6]) .. " not attempted %(interrupted by SIGINT%)", out)
      assert.equal(1, server:stats().posts)
    end)
  end)

  describe("in-process (cli.main), as the specs and embedders call it", function()
    it("returns the exit status of help, usage errors and completion; never exits the interpreter", function()
      local cli = require "flowservice.cli"
      local function main(argv)
        local out, err = {}, {}
        local function sink(t)
          return { write = function(self, ...) for _, v in ipairs { ... } do t[#t + 1] = v end return self end }
        end
        local env = environment()
        local code = cli.main(argv, { getenv = function(name) return env[name] end, stdout = sink(out),
          stderr = sink(err), isatty = function() return false end })
        return code, table.concat(out), table.concat(err)
      end
      local code, out = main { "--help" }
      assert.equal(0, code)
      assert.matches("^usage: flowservice COMMAND", out)
      code, out = main { "help", "retry-failed" }
      assert.equal(0, code)
      assert.matches("%-%-resolve", out)
      local err
      code, out, err = main { "retrigger", "--bogus" }
      assert.equal(2, code)
      assert.equal("", out)
      assert.matches("^flowservice: unknown flag %-%-bogus\n", err)
      code, out = main { "completion", "bash" }
      assert.equal(0, code)
      assert.matches("complete %-F _flowservice", out)
      code, out, err = main {}
      assert.equal("", out)
      assert.equal(2, code)
      assert.matches("^usage:", err)
    end)
  end)

  describe("a bug inside the command", function()
    it("is one line on stderr, without a traceback or a file path, exit 1", function()
      local cli = require "flowservice.cli"
      local err = {}
      local env = environment()
      local code = cli.main({ "get-run", h.runs.failed }, {
        getenv = function(name) return env[name] end,
        stdout = { write = function() error("attempt to index a nil value (field 'x')") end },
        stderr = { write = function(self, ...) for _, v in ipairs { ... } do err[#err + 1] = v end return self end },
        isatty = function() return false end })
      assert.equal(1, code)
      local text = table.concat(err)
      assert.matches("^flowservice: internal error: attempt to index a nil value %(field 'x'%)\n", text)
      assert.is_nil(text:find("traceback", 1, true))
      assert.is_nil(text:find("%.lua:%d"))
    end)
  end)

  describe("get-run", function()
    it("prints a summary", function()
      local code, out = flowservice_cmd { "get-run", h.runs.failed }
      assert.equal(0, code)
      assert.matches("id +" .. lit(h.runs.failed), out)
      assert.matches("flow +" .. lit(ENABLED), out)
      assert.matches("status +failed", out)
      assert.matches("records +0", out)
      assert.matches("created +2022%-12%-07T20:24:32%.602Z", out)
      assert.matches("errors +CONNECTOR%-2001%-500: Something went wrong", out)
    end)

    it("--json prints the run", function()
      local code, out = flowservice_cmd { "get-run", "--json", h.runs.failed }
      assert.equal(0, code)
      local run = json(out)
      assert.equal(h.runs.failed, run.id)
      assert.equal("failed", run.metrics.statusSummary.status)
      assert.equal(1670444672602, run.createdAt)
    end)

    it("an unknown run: exit 1, the error as JSON", function()
      local code, out, err = flowservice_cmd { "get-run", "--json", h.runs.unknown }
      assert.equal(1, code)
      local doc = json(out)
      assert.equal(404, doc.error.status)
      assert.equal("FLOW-1101-404", doc.error.code)
      assert.matches("HTTP 404", err)
    end)
  end)

  describe("list-runs", function()
    local function properties()
      local gets = requests("/runs")
      assert.equal(1, #gets)
      local p = gets[1].args.property
      p = type(p) == "table" and p or { p }
      table.sort(p)
      return p
    end

    it("sends --status and an ISO --since as filters; a header, then one line a run", function()
      local code, out = flowservice_cmd { "list-runs", "--flow", ENABLED, "--status", "failed",
        "--since", "2022-12-07T21:00:00Z" }
      assert.equal(0, code)
      assert.same({ "flowId==" .. ENABLED, "metrics.durationSummary.startedAtUTC>=1670446800000",
        "metrics.statusSummary.status==failed" }, properties())
      local n = 0
      for line in out:gmatch("[^\n]+") do
        n = n + 1
        if n == 1 then
          assert.matches("^RUN +STATUS +CREATED +RECORDS  ERROR$", line)
        else
          assert.matches("^[%w%-]+  [Ff]ailed +2022%-12%-0%dT%d%d:%d%d:%d%d[%.%d]*Z +0  [%w%-]+$", line)
        end
      end
      assert.is_true(n > 1)
      assert.is_nil(out:find(h.runs.failed, 1, true)) -- started before 21:00
    end)

    it("takes epoch ms, --flag=value, fractions and +00:00", function()
      local code = flowservice_cmd { "list-runs", "--flow=" .. ENABLED, "--since=1670446800000",
        "--before", "2022-12-08T00:00:00.5+00:00", "--status=failed,partialSuccess" }
      assert.equal(0, code)
      assert.same({ "flowId==" .. ENABLED, "metrics.durationSummary.startedAtUTC<1670457600500",
        "metrics.durationSummary.startedAtUTC>=1670446800000",
        "metrics.statusSummary.status==failed,partialSuccess" }, properties())
    end)

    it("--json: an empty listing is []", function()
      local code, out = flowservice_cmd { "list-runs", "--flow", ENABLED, "--since", "2030-01-01T00:00:00Z", "--json" }
      assert.equal(0, code)
      assert.equal("[]\n", out)
      code, out = flowservice_cmd { "list-runs", "--flow", ENABLED, "--json" }
      assert.equal(0, code)
      assert.is_true(#json(out) > 1)
    end)
  end)

  describe("configuration", function()
    local function identity()
      local r = requests("/runs/")[1]
      return r.headers["x-gw-ims-org-id"], r.headers["x-sandbox-name"], r.headers["x-api-key"],
        r.headers["authorization"]
    end

    it("takes the environment, sandbox prod by default", function()
      assert.equal(0, (flowservice_cmd { "get-run", h.runs.failed }))
      local org, sandbox, key, auth = identity()
      assert.equal(fake.credentials.org, org)
      assert.equal("prod", sandbox)
      assert.equal(fake.credentials.api_key, key)
      assert.equal("Bearer " .. TOKEN, auth)
      server:clear_requests()
      assert.equal(0, (flowservice_cmd({ "get-run", h.runs.failed }, { AEP_SANDBOX_NAME = "dev" })))
      assert.equal("dev", select(2, identity()))
    end)

    it("flags win over the environment", function()
      local code, _, err = flowservice_cmd({ "get-run", h.runs.failed, "--org", fake.credentials.org,
        "--sandbox", "dev", "--api-key", fake.credentials.api_key, "--url", server.url },
        { AEP_ORG_ID = "WRONG@AdobeOrg", AEP_SANDBOX_NAME = "prod", AEP_API_KEY = "wrong-key",
          FLOWSERVICE_URL = "http://127.0.0.1:" .. h.closed_port })
      assert.equal(0, code, err)
      local org, sandbox, key = identity()
      assert.equal(fake.credentials.org, org)
      assert.equal("dev", sandbox)
      assert.equal(fake.credentials.api_key, key)
    end)

    it("--access-token-file: the token from a file, newline trimmed, over AEP_ACCESS_TOKEN", function()
      write_secret(tmp .. "/token", TOKEN .. "\n")
      local code, out, err = flowservice_cmd({ "get-run", h.runs.failed, "--access-token-file", tmp .. "/token" },
        { AEP_ACCESS_TOKEN = "wrong" })
      assert.equal(0, code, err)
      assert.equal("Bearer " .. TOKEN, select(4, identity()))
      no_secret(out, err)
    end)

    it("--client-secret-file: OAuth credentials through IMS, api key = client id", function()
      write_secret(tmp .. "/secret", SECRET .. "\n")
      local code, out, err = flowservice_cmd({ "retrigger", h.runs.failed, "--verbose",
        "--client-id", fake.ims_client.client_id, "--client-secret-file", tmp .. "/secret",
        "--scopes", fake.ims_client.scopes, "--ims-url", server.ims_url },
        { AEP_ACCESS_TOKEN = false, AEP_API_KEY = false })
      assert.equal(0, code, err)
      assert.equal(1, #requests("/ims/token/v3"))
      local _, _, key, auth = identity()
      assert.equal(fake.ims_client.client_id, key)
      assert.not_equal("Bearer " .. TOKEN, auth)
      assert.matches("POST /ims/token/v3 %-> 200", err) -- --verbose logs each attempt
      local issued = auth:match("^Bearer (.+)$")
      assert.is_nil((out .. err):find(issued, 1, true), "the IMS token leaked")
    end)

    it("OAuth credentials from the environment", function()
      local code, _, err = flowservice_cmd({ "get-run", h.runs.failed }, {
        AEP_ACCESS_TOKEN = false, AEP_API_KEY = false, AEP_CLIENT_ID = fake.ims_client.client_id,
        AEP_CLIENT_SECRET = SECRET, AEP_SCOPES = fake.ims_client.scopes, AEP_IMS_URL = server.ims_url })
      assert.equal(0, code, err)
      assert.equal(1, #requests("/ims/token/v3"))
    end)
  end)

  describe("authentication failures exit 3", function()
    it("a token the service refuses", function()
      local code, out, err = flowservice_cmd({ "retrigger", h.runs.failed, h.runs.success_no_records,
        "--verbose" }, { AEP_ACCESS_TOKEN = "wrong" })
      assert.equal(3, code)
      assert.matches("HTTP 401 401013", out)
      assert.equal(1, #requests("/runs/")) -- stops at the first: every other run would fail too
      assert.matches("authentication failed", err)
      code, out = flowservice_cmd({ "get-run", h.runs.failed, "--json" }, { AEP_ACCESS_TOKEN = "wrong" })
      assert.equal(3, code)
      assert.equal(401, json(out).error.status)
    end)

    it("IMS refusing the credentials", function()
      write_secret(tmp .. "/bad-secret", "not-the-secret\n")
      local code, out, err = flowservice_cmd({ "get-run", h.runs.failed, "--verbose",
        "--client-secret-file", tmp .. "/bad-secret" }, { AEP_ACCESS_TOKEN = false,
        AEP_CLIENT_ID = fake.ims_client.client_id, AEP_SCOPES = fake.ims_client.scopes,
        AEP_IMS_URL = server.ims_url })
      assert.equal(3, code)
      assert.matches("invalid_client", err)
      assert.equal(0, #requests("/runs/"))
      assert.is_nil((out .. err):find("not-the-secret", 1, true))
    end)
  end)

  describe("usage and configuration errors exit 2 and send nothing", function()
    local cases = {
      { "an unknown command", { "retrigge", h.runs.failed }, nil, "unknown command" },
      { "an unknown flag", { "retrigger", h.runs.failed, "--bogus" }, nil, "unknown flag %-%-bogus" },
      { "a missing value", { "list-runs", "--flow" }, nil, "missing value for %-%-flow" },
      { "a flag where a value belongs", { "list-runs", "--flow", "--json" }, nil, "missing value for %-%-flow" },
      { "a value for a switch", { "retry-failed", "--flow", BULK, "--since", "all", "--dry-run=yes" }, nil, "takes no value" },
      { "a flag given twice", { "list-runs", "--flow", ENABLED, "--flow", BULK }, nil, "given twice" },
      { "missing credentials", { "get-run", h.runs.failed }, { AEP_ACCESS_TOKEN = false }, "missing credentials" },
      { "incomplete OAuth credentials", { "get-run", h.runs.failed },
        { AEP_ACCESS_TOKEN = false, AEP_CLIENT_ID = "x", AEP_CLIENT_SECRET = "y" }, "no scopes" },
      { "a missing org", { "get-run", h.runs.failed }, { AEP_ORG_ID = false }, "missing org id" },
      { "a missing token file", { "get-run", h.runs.failed, "--access-token-file", "/nonexistent/token" },
        nil, "cannot read %-%-access%-token%-file" },
      { "a URL that is not http(s)", { "get-run", h.runs.failed, "--url", "ftp://example.com" }, nil,
        "invalid configuration" },
      { "a flow id with spaces", { "list-runs", "--flow", "fb5d688d 7698" }, nil, "%-%-flow must be" },
      { "a run id with /", { "retrigger", h.runs.failed, "../runs/x" }, nil, "run id must be" },
      { "a bad run id on stdin", { "retrigger", "-" }, nil, "run id must be", h.runs.failed .. "\nnot an/id\n" },
      { "no run id", { "retrigger" }, nil, "at least one RUN_ID" },
      { "--concurrency 0", { "retry-failed", "--flow", BULK, "--since", "all", "--concurrency", "0" }, nil, "positive integer" },
      { "--concurrency abc", { "retry-failed", "--flow", BULK, "--since", "all", "--concurrency=abc" }, nil, "positive integer" },
      { "a --since that is no time", { "list-runs", "--flow", ENABLED, "--since", "the day before" }, nil,
        "%-%-since \"the day before\" is not a time: use 30m, 24h" },
      { "a --since without a zone", { "retry-failed", "--flow", BULK, "--since", "2026-11-24T00:00:00" }, nil,
        "%-%-since \"2026%-11%-24T00:00:00\" is not a time" },
      { "a --since on no date", { "list-runs", "--flow", ENABLED, "--since", "2026-02-30T00:00:00Z" }, nil,
        "is not a time" },
      { "a --since in epoch seconds", { "list-runs", "--flow", ENABLED, "--since", "1764000000" }, nil,
        "1764000000 looks like epoch seconds; give epoch milliseconds %(1764000000000%)" },
      { "--since after --before", { "list-runs", "--flow", ENABLED, "--since", "2000000000000",
        "--before", "1000000000000" }, nil, "earlier than" },
      { "a bad --url", { "get-run", h.runs.failed, "--url", "notaurl" }, nil,
        "invalid configuration: option 'base_url' is not a valid URL\n" },
      { "an unknown --status", { "list-runs", "--flow", ENABLED, "--status", "failed,faild" }, nil,
        "unknown status \"faild\"" },
      { "a bad --status", { "list-runs", "--flow", ENABLED, "--status", "failed,,x" }, nil, "%-%-status" },
      { "--journal and --no-journal", { "retry-failed", "--flow", BULK, "--since", "all", "--journal", "/tmp/j", "--no-journal" },
        nil, "not both" },
      { "an unwritable journal", { "retry-failed", "--flow", BULK, "--since", "all", "--journal", "/proc/nope/journal.jsonl" },
        nil, "journal" },
      { "a bad --resolve", { "retry-failed", "--flow", BULK, "--since", "all", "--resolve", h.runs.failed .. "=maybe" }, nil,
        "%-%-resolve takes" },
      { "a --grace that is no number", { "retry-failed", "--flow", BULK, "--since", "all", "--grace", "soon" }, nil, "seconds" },
    }
    for _, case in ipairs(cases) do
      local name, argv, env, message, stdin = case[1], case[2], case[3], case[4], case[5]
      it(name, function()
        local code, out, err = flowservice_cmd(argv, env, stdin)
        assert.equal(2, code, err)
        assert.equal("", out)
        assert.matches("^flowservice: .*" .. message, err)
        assert.is_nil(err:find("%.lua:%d"), "an internal file path in: " .. err)
        assert.same({}, server:requests())
        no_secret(err)
      end)
    end
  end)

  describe("the whole sandbox", function()
    it("list-flows: id, state and name; with --since, the failed runs of each", function()
      local code, out = flowservice_cmd { "list-flows" }
      assert.equal(0, code)
      assert.matches("^FLOW +STATE +NAME\n", out)
      assert.matches(lit(fake.flows.disabled) .. "  disabled", out)
      code, out = flowservice_cmd { "list-flows", "--state", "enabled", "--since", "2020-01-01", "--json" }
      assert.equal(0, code)
      local by_id = {}
      for _, f in ipairs(json(out)) do by_id[f.id] = f end
      assert.is_nil(by_id[fake.flows.disabled])
      assert.equal(40, by_id[BULK].failed_runs)
      assert.equal(2, (flowservice_cmd { "list-flows", "--state", "on" }))
    end)

    it("list-runs without --flow lists every flow's runs", function()
      local code, out = flowservice_cmd { "list-runs", "--status", "failed", "--json" }
      assert.equal(0, code)
      local flows = {}
      for _, r in ipairs(json(out)) do flows[r.flowId] = true end
      assert.is_true(flows[BULK] and flows[ENABLED])
    end)

    it("retry-failed --flow of a flow that does not exist, or is disabled: exit 2, nothing sent", function()
      local code, out, err = flowservice_cmd { "retry-failed", "--flow", "00000000-0000-4000-8000-000000000000" }
      assert.equal(2, code)
      assert.matches("flow 00000000%-0000%-4000%-8000%-000000000000 not found", out .. err)
      code, out, err = flowservice_cmd { "retry-failed", "--flow", fake.flows.disabled }
      assert.equal(2, code)
      assert.matches("is disabled", out .. err)
      assert.equal(0, server:stats().posts)
    end)

    it("retry-failed --all-flows: one report, a line per flow", function()
      local code, out = flowservice_cmd { "retry-failed", "--all-flows", "--since", "all", "--concurrency", "8" }
      assert.equal(0, code, out)
      assert.matches("by flow:\n", out)
      assert.matches(lit(BULK) .. "  [^\n]*: 40 considered, 40 retriggered", out)
      assert.matches(lit(fake.flows.disabled) .. "  [^\n]*%(the flow is disabled%)", out)
      assert.matches(lit(fake.flows.streaming) .. "  [^\n]*FLOW%-1333%-400", out)
      assert.equal(2, (flowservice_cmd { "retry-failed", "--all-flows", "--flow", BULK }))
    end)

    it("--wait follows the re-runs: exit 1 when one failed, and says which", function()
      local bad = fake.bulk_run_id(3)
      server:outcomes { after = 0, status = "success", by_source = { [bad] = { status = "failed" } } }
      local ids = { fake.bulk_run_id(1), fake.bulk_run_id(2), bad }
      local code = flowservice_cmd { "retrigger", ids[1], ids[2], ids[3], "--no-journal" }
      assert.equal(0, code) -- without --wait nobody looks
      local out
      server:reset()
      server:outcomes { after = 0, status = "success", by_source = { [bad] = { status = "failed" } } }
      code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--no-journal", "--wait" }
      assert.equal(1, code)
      assert.matches("re%-runs: 39 succeeded, 1 failed, 0 still running", out)
      assert.matches(lit(bad) .. " %-> [%w%-]+  failed  ", out)
      assert.equal(2, (flowservice_cmd { "retry-failed", "--flow", BULK, "--wait-timeout", "5" }))
    end)

    it("says when the listing failed: aborted, exit 1", function()
      server:scenario { match = "^GET /runs%?", status = 500, times = 0 }
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all" }
      assert.equal(1, code)
      assert.matches("aborted      could not list runs: ", out)
    end)
  end)

  describe("retry-failed", function()
    -- until client:retry_failed exists (flowservice.bulk), say so and skip
    local function it_needs_bulk(name, fn)
      if HAS_RETRY_FAILED then it(name, fn) else pending(name .. " (needs client:retry_failed)") end
    end

    it_needs_bulk("re-triggers every failed run of the flow: exit 0, the report as JSON", function()
      local code, out, err = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--no-journal", "--json",
        "--concurrency", "4" }
      assert.equal(0, code, err)
      local report = json(out)
      assert.equal(40, report.considered)
      assert.equal(40, #report.retriggered)
      assert.equal(40, server:stats().retriggers)
      for _, list in ipairs { "failed", "ambiguous", "skipped", "settled" } do
        assert.matches('"' .. list .. '":%[%]', out)
      end
      local r = report.retriggered[1]
      assert.matches("^b1fa11ed%-", r.run_id)
      assert.equal(server:run(r.new_id).etag, r.etag)
      assert.is_false(report.dry_run)
    end)

    it_needs_bulk("--dry-run --zero-record-success plans 45 runs and sends no re-trigger", function()
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--dry-run",
        "--zero-record-success", "--json" }
      assert.equal(0, code)
      local report = json(out)
      assert.equal(45, #report.planned)
      assert.is_true(report.dry_run)
      assert.equal(0, server:stats().posts)
    end)

    it_needs_bulk("--dry-run lists each run with its start and first error, its window, and runs by code", function()
      server:add_run { flowId = BULK, status = "failed", errors = { { code = "CONNECTOR-1001-500",
        message = "source unreachable" } } }
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "2025-12-17T19:33:20Z",
        "--dry-run" }
      assert.equal(0, code)
      assert.matches("window       2025%-12%-17T19:33:20Z %.%. now\n", out)
      assert.matches(lit(fake.bulk_run_id(1)) .. "  2025%-12%-17T19:33:21%.500Z  CONNECTOR%-2001%-500: Something went wrong", out)
      assert.matches("source unreachable", out)
      assert.matches("runs by first error code:\n +40  CONNECTOR%-2001%-500\n +1  CONNECTOR%-1001%-500\n", out)
      code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--dry-run", "--json",
        "--exclude-code", "CONNECTOR-2001" }
      assert.equal(0, code)
      local report = json(out)
      assert.equal(1, #report.planned)
      assert.equal("CONNECTOR-1001-500", report.planned[1].errors[1].code)
      assert.equal(40, report.by_code["CONNECTOR-2001-500"])
      assert.is_nil(report.window.since)
      code = flowservice_cmd { "retry-failed", "--flow", BULK, "--only-code", "bad code" }
      assert.equal(2, code)
      code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--no-journal",
        "--only-code", "CONNECTOR-1001" }
      assert.equal(0, code)
      assert.matches("re%-triggered:\n  [%w%-]+ %-> [%w%-]+  [%dT:%.%-]+Z  CONNECTOR%-1001%-500: source unreachable\n", out)
      assert.matches("skipped:\n  " .. lit(fake.bulk_run_id(40)) .. "  [%dT:%.%-]+Z  CONNECTOR%-2001%-500: [^\n]*"
        .. "%(no error code matching CONNECTOR%-1001%)", out)
    end)

    it_needs_bulk("looks at the last 24 hours unless told otherwise", function()
      server:add_run { flowId = BULK, status = "failed" } -- started now; the generated ones in 2025
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--dry-run", "--json" }
      assert.equal(0, code)
      local report = json(out)
      assert.equal(1, #report.planned)
      assert.is_number(report.window.since)
    end)

    it_needs_bulk("keeps a journal per org/sandbox/flow by default, so a second job does nothing", function()
      local state = tmp .. "/state"
      local env = { XDG_STATE_HOME = state }
      local code, out, err = flowservice_cmd({ "retry-failed", "--flow", BULK, "--since", "all" }, env)
      assert.equal(0, code, err)
      assert.matches("retriggered +40", out)
      local path = state .. "/flowservice/FAKEORG@AdobeOrg_prod_" .. BULK .. ".jsonl"
      assert.matches("journal +" .. lit(path), out)
      local f = io.popen("stat -c %a " .. q(state .. "/flowservice") .. " " .. q(path))
      assert.equal("700\n600\n", f:read("*a"))
      f:close()
      server:clear_requests()
      code, out = flowservice_cmd({ "retry-failed", "--flow", BULK, "--since", "all", "--json" }, env)
      assert.equal(0, code)
      local report = json(out)
      assert.equal(0, #report.retriggered)
      assert.equal(40, #report.skipped)
      assert.equal(0, #requests("/runs/")) -- no re-trigger, no check
    end)

    it_needs_bulk("exits 1 with the failed runs and their reasons", function()
      local victim = fake.bulk_run_id(7)
      server:scenario { match = "^POST /runs/" .. lit(victim), status = 400,
        body = '{"error_code":"400123","message":"refused for the test"}' }
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--no-journal" }
      assert.equal(1, code)
      assert.matches("failed +1", out)
      assert.matches(lit(victim) .. "  flowservice: HTTP 400 400123: refused for the test", out)
    end)

    it_needs_bulk("an operator's --resolve settles a run the journal holds as pending", function()
      local id = fake.bulk_run_id(3)
      local journal = tmp .. "/resolve-" .. tests .. ".jsonl"
      -- what a job killed right after sending leaves behind
      write(journal, cjson.encode { run = id, flow = BULK, state = "pending", request_id = "r-1",
        time = 1766000000000 } .. "\n")
      local code, out = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--dry-run", "--json",
        "--journal", journal, "--resolve", id .. "=done" }
      assert.equal(0, code)
      local report = json(out)
      assert.same({ { run_id = id, outcome = "done", evidence = "operator" } }, report.settled)
      assert.equal(39, #report.planned)
    end)

    it_needs_bulk("refuses --resolve of a run that is not pending or ambiguous: exit 2, nothing sent", function()
      local journal = tmp .. "/resolve-" .. tests .. ".jsonl"
      local code, _, err = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--journal", journal,
        "--resolve", fake.bulk_run_id(4) .. "=done" }
      assert.equal(2, code)
      assert.matches("run " .. lit(fake.bulk_run_id(4)) .. " is not in the journal", err)
      assert.equal(0, server:stats().posts)
      code = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--journal", journal }
      assert.equal(0, code)
      for _, decision in ipairs { "done", "retry" } do
        server:reset()
        code, _, err = flowservice_cmd { "retry-failed", "--flow", BULK, "--since", "all", "--journal", journal,
          "--resolve", fake.bulk_run_id(4) .. "=" .. decision }
        assert.equal(2, code)
        assert.matches("run " .. lit(fake.bulk_run_id(4)) .. " is done in the journal", err)
        assert.equal(0, server:stats().posts)
        assert.equal(0, server:stats().gets)
      end
    end)

    it_needs_bulk("exits 3 when the token is refused, without leaking it", function()
      local code, out, err = flowservice_cmd({ "retry-failed", "--flow", BULK, "--since", "all", "--no-journal", "--verbose" },
        { AEP_ACCESS_TOKEN = "wrong-token-value" })
      assert.equal(3, code)
      assert.is_nil((out .. err):find("wrong-token-value", 1, true))
    end)

    it_needs_bulk("draws live progress on a terminal (in-process, isatty faked)", function()
      local cli = require "flowservice.cli"
      local out, err = {}, {}
      local function sink(t) return { write = function(self, ...) for _, s in ipairs { ... } do t[#t + 1] = s end return self end } end
      local env = environment()
      local code = cli.main({ "retry-failed", "--flow", BULK, "--since", "all", "--no-journal" }, {
        getenv = function(name) return env[name] end, stdout = sink(out), stderr = sink(err),
        isatty = function() return true end })
      assert.equal(0, code)
      local progress = table.concat(err)
      assert.matches("\r", progress)
      assert.matches("40/40 done, 0 failed", progress)
      assert.matches("retriggered +40", table.concat(out))
    end)
  end)
end)
