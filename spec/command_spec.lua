-- The `flowservice` command as a user has it: installed by LuaRocks into
-- build/tree (`make build`), run as build/tree/bin/flowservice in a clean
-- environment (no LUA_PATH) against the fake Flow Service: help,
-- suggestions, completion in a real bash, the man page, credentials files,
-- hints, progress, --verbose, --timeout, --ca-file, --quiet.
local fake = require "spec.support.fake"
local tls = require "spec.support.tls"
local h = require "spec.support.helpers"
local command = require "spec.support.command"
local cjson = require "cjson"
local flowservice = require "flowservice"

local COMMAND = "build/tree/bin/flowservice"
local TOKEN, SECRET = fake.credentials.access_token, fake.ims_client.client_secret
local ENABLED, BULK = fake.flows.enabled, fake.bulk_flow
local q, lit, write = h.q, h.literal, h.write
local function read(path) return assert(h.read(path), "cannot read " .. path) end

describe("the installed flowservice command", function()
  local server, tmp, tests = nil, nil, 0

  local function environment(extra)
    return command.environment(server.url, tmp .. "/home", tmp .. "/state-" .. tests, extra)
  end

  -- run(argv, env changes, stdin) -> exit status, stdout, stderr
  local function run(argv, extra, stdin)
    return command.run(tmp, COMMAND, environment(extra), argv, stdin)
  end

  local function secret_file(name, text, mode)
    local path = tmp .. "/" .. name
    write(path, text)
    assert(os.execute("chmod " .. (mode or "600") .. " " .. q(path)))
    return path
  end

  local function count(path_prefix)
    local n = 0
    for _, r in ipairs(server:requests()) do
      if r.path:sub(1, #path_prefix) == path_prefix then n = n + 1 end
    end
    return n
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
  end)

  describe("first contact", function()
    it("runs from the tree LuaRocks installed it in, without luarocks path", function()
      local code, out = run { "--version" }
      assert.equal(0, code)
      assert.equal(("flowservice %s (libcurl %s)\n"):format(flowservice._VERSION, flowservice.curl_version), out)
      code, out = run { "get-run", h.runs.failed }
      assert.equal(0, code)
      assert.matches("status +failed", out)
    end)

    it("eval \"$(make -s env)\": the command on the PATH and the module for lua5.4, from anywhere", function()
      local p = io.popen("env -i PATH=/usr/bin:/bin HOME=" .. q(tmp) .. " bash -c " .. q('eval "$(make -s env)" && cd / && '
        .. 'command -v flowservice && flowservice --version && lua5.4 -e \'print(require("flowservice")._VERSION)\'') .. " 2>&1")
      local out = p:read("*a")
      p:close()
      assert.equal(os.getenv("PWD") .. "/build/tree/bin/flowservice\n"
        .. ("flowservice %s (libcurl %s)\n"):format(flowservice._VERSION, flowservice.curl_version)
        .. flowservice._VERSION .. "\n", out)
    end)

    it("make demo shows the command as a user runs it", function()
      local p = io.popen("env -u http_proxy -u https_proxy lua5.4 examples/demo.lua 2>&1")
      local out = p:read("*a")
      local ok = p:close()
      assert.truthy(ok, out)
      assert.matches('\n%$ export PATH="%$PWD/build/tree/bin:%$PATH"\n', out)
      assert.matches("\n%$ flowservice retry%-failed %-%-flow " .. lit(BULK) .. " %-%-since all | head %-14\n"
        .. "flow +" .. lit(BULK) .. "\n", out)
      assert.matches("retriggered  40\n", out)
      assert.matches("retriggered  0\nskipped      40\n", out)
      assert.matches("flowservice: unknown flag %-%-dry%-rn; did you mean %-%-dry%-run%?\n", out)
    end)
  end)

  describe("help", function()
    it("COMMAND --help and help COMMAND: that command's flags and examples only", function()
      local code, out, err = run { "retry-failed", "--help" }
      assert.equal(0, code)
      assert.equal("", err)
      assert.matches("^usage: flowservice retry%-failed", out)
      assert.matches("\n  %-%-resolve RUN_ID=done|retry +decide", out)
      assert.matches("\nexamples:\n  flowservice retry%-failed ", out)
      assert.is_nil(out:find("--force", 1, true)) -- retrigger's
      local code2, out2 = run { "help", "retry-failed" }
      assert.equal(0, code2)
      assert.equal(out, out2)
      code, out = run { "retrigger", "-h" }
      assert.equal(0, code)
      assert.matches("%-%-force", out)
      assert.is_nil(out:find("--resolve", 1, true))
    end)

    it("--help and help list the commands", function()
      local code, out = run { "--help" }
      assert.equal(0, code)
      local _, listed = run { "help" }
      assert.equal(out, listed)
      for _, name in ipairs { "retry-failed", "retrigger", "get-run", "list-runs", "list-flows", "help", "completion" } do
        assert.matches("\n  " .. lit(name) .. " +%S", out)
      end
    end)

    it("suggests the nearest flag or command: one line, exit 2, nothing sent", function()
      local cases = {
        { { "retry-failed", "--flow", BULK, "--dry-rn" }, "unknown flag --dry-rn; did you mean --dry-run?" },
        { { "list-runs", "--stauts", "failed" }, "unknown flag --stauts; did you mean --status?" },
        { { "retrigre", h.runs.failed }, "unknown command \"retrigre\"; did you mean retrigger?" },
        { { "help", "list-run" }, "unknown command \"list-run\"; did you mean list-runs?" },
        { { "completion", "bsh" }, "completion takes one of bash, zsh, fish, got \"bsh\"" },
      }
      for _, case in ipairs(cases) do
        local code, out, err = run(case[1])
        assert.equal(2, code, err)
        assert.equal("", out)
        assert.equal("flowservice: " .. case[2], err:match("^([^\n]*)\n"))
      end
      assert.same({}, server:requests())
    end)
  end)

  describe("completion", function()
    -- completions bash offers for the words typed so far (the last one being completed)
    local function complete(words)
      local script = tmp .. "/complete.bash"
      local typed = {}
      for i, w in ipairs(words) do typed[i] = q(w) end
      write(script, table.concat({
        "source <(" .. q(COMMAND) .. " completion bash) || exit 9",
        "COMP_WORDS=(" .. table.concat(typed, " ") .. ")",
        "COMP_CWORD=" .. (#words - 1),
        "_flowservice",
        'printf "%s\\n" "${COMPREPLY[@]}"',
      }, "\n") .. "\n")
      local p = io.popen("env -i PATH=\"$PATH\" bash " .. q(script) .. " 2>&1")
      local text = p:read("*a")
      p:close()
      local set = {}
      for word in text:gmatch("%S+") do set[word] = true end
      return set, text
    end

    it("bash: the script loads, registers the command and completes commands, flags and values", function()
      local p = io.popen("env -i PATH=\"$PATH\" bash -c " .. q("source <(" .. COMMAND .. " completion bash); complete -p flowservice"))
      local registered = p:read("*a")
      p:close()
      assert.matches("^complete .*%-F _flowservice flowservice\n$", registered)
      local got, text = complete { "flowservice", "re" }
      assert.is_true(got["retry-failed"] and got["retrigger"], text)
      assert.is_nil(got["list-runs"])
      got, text = complete { "flowservice", "retry-failed", "--dry" }
      assert.is_true(got["--dry-run"], text)
      got, text = complete { "flowservice", "retry-failed", "--progress", "" }
      assert.same({ auto = true, always = true, never = true }, got, text)
      got = complete { "flowservice", "list-runs", "--" }
      assert.is_true(got["--status"] and got["--credentials"])
      assert.is_nil(got["--resolve"]) -- retry-failed's, not list-runs'
    end)

    it("zsh and fish: a script for each", function()
      local code, out = run { "completion", "zsh" }
      assert.equal(0, code)
      assert.matches("^#compdef flowservice\n", out)
      assert.matches("retry%-failed", out)
      code, out = run { "completion", "fish" }
      assert.equal(0, code)
      assert.matches("complete %-c flowservice ", out)
      assert.matches("%-l dry%-run", out)
    end)
  end)

  describe("the man page", function()
    it("is installed by the rockspec and names every command and every flag", function()
      local page = read("build/tree/lib/luarocks/rocks-5.4/flowservice/scm-1/doc/flowservice.1")
      assert.matches("^%.TH FLOWSERVICE 1", page)
      local roff = page:gsub("\\%-", "-")
      local _, list = run { "--help" }
      for name in list:gmatch("\n  ([%l-]+)  ") do
        assert.truthy(roff:find(name, 1, true), "the man page lacks " .. name)
        local _, help = run { "help", name }
        for flag in help:gmatch("\n  (%-%-[%w-]+)") do
          assert.truthy(roff:find(flag, 1, true), "the man page lacks " .. flag .. " of " .. name)
        end
      end
      local p = io.popen("man -l " .. q("build/tree/lib/luarocks/rocks-5.4/flowservice/scm-1/doc/flowservice.1")
        .. " 2>&1 | col -b")
      local shown = p:read("*a")
      p:close()
      assert.matches("EXIT STATUS", shown)
    end)
  end)

  describe("credentials as people have them", function()
    local IMS = { AEP_ACCESS_TOKEN = false, AEP_API_KEY = false, AEP_ORG_ID = false }

    local function console_json()
      return cjson.encode {
        CLIENT_ID = fake.ims_client.client_id, CLIENT_SECRETS = { SECRET, "an-older-secret" },
        ORG_ID = fake.credentials.org, SCOPES = { "openid", "AdobeID", "read_organizations" },
        TECHNICAL_ACCOUNT_ID = "ABC123@techacct.adobe.com",
      }
    end

    it("--credentials: the Developer Console's OAuth Server-to-Server download", function()
      local path = secret_file("console.json", console_json())
      local code, out, err = run({ "get-run", h.runs.failed, "--credentials", path, "--ims-url", server.ims_url }, IMS)
      assert.equal(0, code, err)
      assert.matches("status +failed", out)
      assert.equal(1, count("/ims/token/v3"))
      local r = server:requests()[2]
      assert.equal(fake.ims_client.client_id, r.headers["x-api-key"])
    end)

    it("AEP_CREDENTIALS_FILE: aepp's config.json, keys in any letter case; flags and variables win", function()
      local path = secret_file("config.json", cjson.encode {
        Org_Id = fake.credentials.org, CLIENT_id = fake.ims_client.client_id, secret = SECRET,
        scopes = fake.ims_client.scopes, ["sandbox-name"] = "dev", environment = "prod" })
      local env = { AEP_ACCESS_TOKEN = false, AEP_API_KEY = false, AEP_ORG_ID = false,
        AEP_CREDENTIALS_FILE = path, AEP_IMS_URL = server.ims_url }
      local code, _, err = run({ "get-run", h.runs.failed }, env)
      assert.equal(0, code, err)
      local function sandbox()
        local reqs = server:requests()
        return reqs[#reqs].headers["x-sandbox-name"]
      end
      assert.equal("dev", sandbox())
      code = run({ "get-run", h.runs.failed, "--sandbox", "prod" }, env)
      assert.equal(0, code)
      assert.equal("prod", sandbox())
      env.AEP_SANDBOX_NAME = "prod"
      code = run({ "get-run", h.runs.failed }, env)
      assert.equal(0, code)
      assert.equal("prod", sandbox())
      env.AEP_ORG_ID = "WRONG@AdobeOrg" -- the variable wins over the file: the gateway refuses it
      code = run({ "get-run", h.runs.failed }, env)
      assert.equal(3, code)
    end)

    it("flowservice.credentials_from_file: the options flowservice.new takes", function()
      local path = secret_file("lua.json", console_json())
      local opts = assert(flowservice.credentials_from_file(path))
      assert.same({ org_id = fake.credentials.org, api_key = fake.ims_client.client_id,
        credentials = { client_id = fake.ims_client.client_id, client_secret = SECRET,
          scopes = fake.ims_client.scopes } }, opts)
      opts.base_url, opts.credentials.ims_url = server.url, server.ims_url
      local client = flowservice.new(opts)
      local run_, err = client:get_run(h.runs.failed)
      client:close()
      assert.is_nil(err)
      assert.equal(h.runs.failed, run_.id)
      local missing, why = flowservice.credentials_from_file(tmp .. "/nonexistent.json")
      assert.is_nil(missing)
      assert.equal("config", why.kind)
      write(tmp .. "/open.json", console_json())
      os.execute("chmod 644 " .. q(tmp .. "/open.json"))
      missing, why = flowservice.credentials_from_file(tmp .. "/open.json")
      assert.is_nil(missing)
      assert.matches("chmod 600", tostring(why))
    end)

    it("refuses a secret file that group or others may read, with the chmod to run; sends nothing", function()
      for _, case in ipairs {
        { "--credentials", secret_file("c.json", console_json(), "640"), "its group" },
        { "--access-token-file", secret_file("t", TOKEN .. "\n", "604"), "others" },
        { "--client-secret-file", secret_file("s", SECRET .. "\n", "644"), "others" },
      } do
        local code, out, err = run({ "get-run", h.runs.failed, case[1], case[2] },
          { AEP_CLIENT_ID = fake.ims_client.client_id, AEP_SCOPES = fake.ims_client.scopes })
        assert.equal(2, code, err)
        assert.equal("", out)
        assert.matches("^flowservice: " .. lit(case[1]) .. ": " .. lit(case[2]) .. " is readable by "
          .. case[3] .. " %(mode 0%d%d%d%): run chmod 600 '" .. lit(case[2]) .. "'\n$", err)
      end
      assert.same({}, server:requests())
    end)

    it("a bad credentials file: one line, exit 2", function()
      local code, _, err = run({ "get-run", h.runs.failed, "--credentials", secret_file("bad.json", "{not json") }, IMS)
      assert.equal(2, code)
      assert.matches("^flowservice: %-%-credentials: .*bad%.json is not a JSON object\n$", err)
      code, _, err = run({ "get-run", h.runs.failed, "--credentials",
        secret_file("partial.json", '{"client_id": "x"}') }, IMS)
      assert.equal(2, code)
      assert.matches("has no client_secret, scopes, org_id", err)
    end)

    it("a token and client credentials: says it uses the credentials (they refresh); --quiet does not", function()
      local env = { AEP_API_KEY = false, AEP_CLIENT_ID = fake.ims_client.client_id, AEP_CLIENT_SECRET = SECRET,
        AEP_SCOPES = fake.ims_client.scopes, AEP_IMS_URL = server.ims_url }
      local code, _, err = run({ "get-run", h.runs.failed }, env)
      assert.equal(0, code, err)
      assert.equal("flowservice: both an access token (AEP_ACCESS_TOKEN) and client credentials are set: using"
        .. " the client credentials, since their tokens refresh\n", err)
      assert.equal(1, count("/ims/token/v3"))
      code, _, err = run({ "get-run", h.runs.failed, "--quiet" }, env)
      assert.equal(0, code)
      assert.equal("", err)
    end)

    it("strips a 'Bearer ' prefix from the token, with a note", function()
      local code, _, err = run({ "get-run", h.runs.failed }, { AEP_ACCESS_TOKEN = "Bearer " .. TOKEN })
      assert.equal(0, code, err)
      assert.matches("starts with 'Bearer '; using it without that prefix", err)
      assert.equal("Bearer " .. TOKEN, server:requests()[1].headers["authorization"])
    end)
  end)

  describe("errors that say what to do", function()
    it("401013: the token expired or is not valid, use client credentials", function()
      local code, _, err = run({ "get-run", h.runs.failed }, { AEP_ACCESS_TOKEN = "expired-token" })
      assert.equal(3, code)
      assert.matches("HTTP 401 401013", err)
      assert.matches("\nhint: the access token expired or is not valid: use client credentials", err)
    end)

    it("403025: check --org; 403003: check the API key", function()
      local code, _, err = run({ "list-runs", "--flow", ENABLED }, { AEP_ORG_ID = "OTHER@AdobeOrg" })
      assert.equal(3, code)
      assert.matches("403025.*\nhint: check %-%-org", err)
      code, _, err = run({ "retrigger", h.runs.failed }, { AEP_API_KEY = "not-the-key" })
      assert.equal(3, code)
      assert.matches("\nhint: check the API key", err)
    end)

    it("a 404 on a listing: the base URL must end in /data/foundation/flowservice", function()
      local code, _, err = run({ "list-runs", "--flow", ENABLED }, { FLOWSERVICE_URL = server.url .. "/data" })
      assert.equal(1, code)
      assert.matches("HTTP 404", err)
      assert.matches("\nhint: the base URL %(%-%-url or FLOWSERVICE_URL%) must end in /data/foundation/flowservice\n", err)
      -- a flow the wrong path cannot find: the same hint; a run the service does not know: none
      code, _, err = run({ "retry-failed", "--flow", BULK }, { FLOWSERVICE_URL = server.url .. "/data" })
      assert.equal(2, code)
      assert.matches("\nhint: the base URL %(%-%-url or FLOWSERVICE_URL%) must end in", err)
      code, _, err = run { "get-run", h.runs.unknown }
      assert.equal(1, code)
      assert.matches("FLOW%-1101%-404", err)
      assert.is_nil(err:find("hint:", 1, true))
    end)

    it("no internal file path or line in any message", function()
      for _, argv in ipairs {
        { "get-run", h.runs.failed, "--url", "notaurl" },
        { "get-run", h.runs.failed, "--url", "https://exa mple.com/x" },
        { "get-run", h.runs.failed, "--timeout", "soon" },
        { "get-run", h.runs.failed, "--ca-file", tmp .. "/no-such-ca.pem" },
        { "list-runs", "--since", "tomorrow-ish" },
        { "retry-failed", "--flow", BULK, "--progress", "sometimes" },
        { "completion" },
      } do
        local code, _, err = run(argv)
        assert.equal(2, code, err)
        assert.matches("^flowservice: [^\n]+\n", err) -- run() checks for paths and tracebacks
      end
    end)
  end)

  describe("connection flags", function()
    it("--timeout bounds each request", function()
      server:scenario { match = "^GET /runs/", delay = 5, times = 0 }
      local code, _, err = run { "get-run", h.runs.failed, "--timeout", "0.5", "--verbose" }
      assert.equal(1, code)
      assert.matches("\nflowservice: timeout error: ", err)
      local attempts = 0
      for ms in err:gmatch(" %-> timeout %(attempt %d+, request%-id [^,]+, (%d+) ms%)\n") do
        attempts = attempts + 1
        assert.is_true(tonumber(ms) < 2500, ms .. " ms: the 5 s reply was waited for")
      end
      assert.is_true(attempts >= 1, err)
    end)

    it("--ca-file: trust that CA (an HTTPS fake with a CA the suite makes)", function()
      local pki = tls.make()
      local secure = fake.start { tls = { cert = pki.cert, key = pki.key } }
      local ok, failure = pcall(function()
        local code, _, err = run { "get-run", h.runs.failed, "--url", secure.tls_url, "--ca-file", pki.ca_file }
        assert.equal(0, code, err)
        code, _, err = run { "get-run", h.runs.failed, "--url", secure.tls_url, "--ca-file", pki.other_ca_file }
        assert.equal(1, code)
        assert.matches("tls error", err)
      end)
      secure:stop()
      tls.remove(pki)
      assert(ok, failure)
    end)
  end)

  describe("progress", function()
    it("off a terminal: a time-stamped line every interval with an ETA; --progress never: none", function()
      -- each re-trigger answers after 0.4 s, one at a time: 8 runs take over 3 s
      server:scenario { match = "^POST /runs/", act_then_delay = 0.4, times = 0 }
      local ids = {}
      for i = 1, 8 do ids[i] = fake.bulk_run_id(i) end
      local argv = { "retrigger", "--no-journal", "--concurrency", "1" }
      for _, id in ipairs(ids) do argv[#argv + 1] = id end
      local code, out, err = run(argv, { FLOWSERVICE_PROGRESS_INTERVAL = "1" })
      assert.equal(0, code, err)
      assert.equal(8, select(2, out:gsub("\n", "")))
      local lines = 0
      for line in err:gmatch("[^\n]+") do
        lines = lines + 1
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ flowservice: %d/8 done, 0 failed, 0 ambiguous, "
          .. "%d in flight, %d queued, [%d.]+/s, ETA %d+s$", line)
      end
      assert.is_true(lines >= 1, err)
      server:reset()
      server:scenario { match = "^POST /runs/", act_then_delay = 0.4, times = 0 }
      argv[#argv + 1] = "--progress=never"
      code, out, err = run(argv, { FLOWSERVICE_PROGRESS_INTERVAL = "1" })
      assert.equal(0, code)
      assert.equal(8, select(2, out:gsub("\n", "")))
      assert.equal("", err)
    end)

    it("--progress always: the live line, with an ETA while runs are left", function()
      server:scenario { match = "^POST /runs/", act_then_delay = 0.3, times = 0 }
      local code, _, err = run { "retry-failed", "--flow", BULK, "--since", "all", "--no-journal",
        "--concurrency", "4", "--progress", "always" }
      assert.equal(0, code, err)
      assert.matches("\r\27%[K%d+/40 done, 0 failed, 0 ambiguous, %d+ in flight, %d+ queued, [%d.]+/s, ETA ", err)
      assert.matches("\r\27%[K40/40 done, 0 failed, 0 ambiguous, 0 in flight, 0 queued, [%d.]+/s\n$", err)
    end)

    it("says what the --grace wait waits for and how long", function()
      local journal = tmp .. "/grace-" .. tests .. ".jsonl"
      server:scenario { match = "^POST ", act_then_delay = 0, status = 503 }
      local code = run { "retrigger", "--journal", journal, h.runs.failed }
      assert.equal(1, code) -- ambiguous: the 503 came after the run was made
      local started = h.now()
      local _, err
      code, _, err = run { "retrigger", "--journal", journal, "--grace", "5", h.runs.failed }
      assert.equal(0, code, err)
      assert.matches("flowservice: waiting %ds %(%-%-grace%) for runs that 1 pending re%-trigger%(s%) of an"
        .. " earlier job may have made to show up, then counting them\n", err)
      assert.is_true(h.now() - started >= 1)
    end)
  end)

  describe("--verbose", function()
    it("one line per attempt with a UTC time and the host", function()
      local code, _, err = run { "get-run", h.runs.failed, "--verbose" }
      assert.equal(0, code)
      local host = server.url:match("^http://(.+)$")
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ " .. lit(host) .. " GET /runs/"
        .. lit(h.runs.failed) .. " %-> 200 %(attempt 1, ", err)
    end)
  end)
end)
