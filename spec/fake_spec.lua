-- Tests of the fake Flow Service itself (fake/ and spec/support/fake.lua),
-- driven with the curl command line, so they do not depend on the client.

local fake = require "spec.support.fake"
local cjson = require("cjson").new()

local RUN = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"          -- failed, enabled batch flow
local FLOW = "fb5d688d-7698-4db6-a45e-8d510fa38dba"
local RUN_SUCCESS_EMPTY = "85207196-0b5a-4a30-810d-652a7c9bba19"
local RUN_SUCCESS_RECORDS = "74bf93af-1a48-495c-a676-129b8c7c88fa"
local RUN_IN_PROGRESS = "4b4d9994-47a0-49a4-a74c-4fae634d1444"
local RUN_PARTIAL = "2d233407-f793-42e3-9656-26a8318c1a05"
local RUN_CAPITAL_FAILED = "7cb50575-f551-4357-ae96-9dd3a00a4260"
local RUN_DISABLED_FLOW = "6f04fa55-31e7-4f05-9b82-9ff5a7d1f6f3"
local RUN_STREAMING = "dad368aa-a84e-4222-b76e-1da9ba55b673"

local FIXTURE_RUNS = 13                  -- literal runs in fake/runs.json
local BULK_RUNS = 40 + 5 + 5 + 3 + 2       -- the bulk flow's generated runs
local ALL_RUNS = FIXTURE_RUNS + 250 + 20 + BULK_RUNS   -- plus the paging flow's

local UUID4 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- Percent-escape all but unreserved characters (as a careful client does).
local function esc(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function action(id, op)
  return "/runs/" .. id .. "/action?op=" .. (op or "re-trigger")
end

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local alive = require("spec.support.helpers").alive

local function dir_exists(path)
  return sh("test -d '" .. path .. "'")
end

-- The clock server:wait_for_posts measures its deadlines with: one clock
-- for the suite, so a wait of 0.3 s never reads as less.
local now = require("spec.support.nginx").util.monotonic

describe("fake Flow Service", function()
  local server

  setup(function()
    server = fake.start()
  end)

  teardown(function()
    server:stop()
  end)

  before_each(function()
    server:reset()
  end)

  describe("start", function()
    it("runs nginx in its own prefix and answers health", function()
      assert.matches("^http://127%.0%.0%.1:%d+$", server.url)
      assert.is_nil(server.tls_url)
      assert.is_number(server.pid)
      assert.is_true(alive(server.pid))
      assert.is_true(dir_exists(server.prefix))
      local res = server:http{ path = "/_fake/health" }
      assert.equal(200, res.status)
      assert.is_true(cjson.decode(res.body).ok)
    end)

    it("refuses a fixture that is not JSON, with nginx's message", function()
      local dir = server.prefix .. "/badfixture"
      assert.is_true(sh("mkdir -p '" .. dir .. "' && echo 'not json' > '" .. dir .. "/runs.json'"))
      local ok, err = pcall(fake.start, { fixture = dir .. "/runs.json" })
      assert.is_false(ok)
      assert.matches("not a JSON object", tostring(err))
    end)
  end)

  describe("seed", function()
    it("loads the fixture runs with exact epoch-ms values and quoted etags", function()
      local runs = server:runs()
      assert.equal(ALL_RUNS, #runs)
      local run = server:run(RUN)
      assert.equal(FLOW, run.flowId)
      assert.equal('"0a00c1b2-0000-0200-0000-6390a5c90000"', run.etag)
      assert.equal(1670444672602, run.createdAt)
      assert.equal("1670444672602", string.format("%.0f", run.createdAt))
      assert.equal("failed", run.metrics.statusSummary.status)
      assert.equal(0, run.metrics.recordSummary.outputRecordCount)
      assert.is_nil(server:run("00000000-0000-4000-8000-000000000000"))
    end)
  end)

  describe("re-trigger", function()
    it("answers with a new run and leaves the original as it was", function()
      local before = server:run(RUN)
      local res = server:http{ method = "POST", path = action(RUN), auth = true,
                               headers = { ["x-request-id"] = "req-1" } }
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      assert.equal("req-1", res.headers["x-request-id"])
      local body = cjson.decode(res.body)
      assert.matches(UUID4, body.id)
      assert.matches('^"%x+%-0000%-0200%-0000%-%x+"$', body.etag)
      assert.not_equal(RUN, body.id)

      local new = server:run(body.id)
      assert.equal(FLOW, new.flowId)
      assert.equal(body.etag, new.etag)
      assert.equal("inProgress", new.metrics.statusSummary.status)
      assert.equal(0, new.metrics.recordSummary.outputRecordCount)
      assert.is_true(math.abs(new.createdAt / 1000 - os.time()) < 5)
      -- the original keeps all it had; linkage (on by default) adds the child
      assert.equal(RUN, new.parentFlowRunId)
      local after = server:run(RUN)
      assert.same({ body.id }, after.childFlowRunIds)
      after.childFlowRunIds = nil
      assert.same(before, after)
      assert.equal(ALL_RUNS + 1, #server:runs())
      assert.equal("scheduler", before.createdClient)
      assert.equal("fake-api-key", new.createdClient)

      -- a failed run can be re-triggered again, with another new run
      local again = cjson.decode(server:http{ method = "POST", path = action(RUN), auth = true }.body)
      assert.not_equal(body.id, again.id)
      assert.equal(ALL_RUNS + 2, #server:runs())
      assert.same({ body.id, again.id }, server:run(RUN).childFlowRunIds)
    end)

    it("accepts RE_TRIGGER, percent-escaped ids and a matching If-Match", function()
      assert.equal(200, server:http{ method = "POST", path = action(RUN, "RE_TRIGGER"), auth = true }.status)
      local escaped = RUN:gsub("%-", "%%2D")
      assert.equal(200, server:http{ method = "POST", path = action(escaped), auth = true }.status)
      local etag = server:run(RUN_SUCCESS_EMPTY).etag
      assert.equal(200, server:http{ method = "POST", path = action(RUN_SUCCESS_EMPTY), auth = true,
                                     headers = { ["If-Match"] = etag } }.status)
      assert.equal(200, server:http{ method = "POST", path = action(RUN_CAPITAL_FAILED), auth = true }.status)
      server:reset()
      assert.equal(ALL_RUNS, #server:runs())
    end)

    local function problem(path, headers)
      local res = server:http{ method = "POST", path = path, auth = true, headers = headers }
      local body = cjson.decode(res.body)
      return res.status, body.type and body.type:match("[^/]+$"), body, res
    end

    it("answers Flow Service problem documents for refused actions", function()
      local cases = {
        { action(RUN, "delete"), 400, "FLOW-1401-400" },
        { action(RUN, ""), 400, "FLOW-1401-400" },
        { action("00000000-0000-4000-8000-000000000000"), 404, "FLOW-1101-404" },
        { action(RUN_DISABLED_FLOW), 400, "FLOW-1388-400" },
        { action(RUN_STREAMING), 400, "FLOW-1333-400" },
        { action(RUN_SUCCESS_RECORDS), 400, "FLOW-1387-400" },
        { action(RUN_IN_PROGRESS), 400, "FLOW-1387-400" },
        { action(RUN_PARTIAL), 400, "FLOW-1387-400" },
      }
      for _, c in ipairs(cases) do
        local status, code, body = problem(c[1])
        assert.equal(c[2], status, c[1])
        assert.equal(c[3], code, c[1])
        assert.equal(c[2], body.status)
        assert.is_string(body.title)
        assert.is_string(body.errorMessage)
        assert.is_string(body.report["detailed-message"])
        assert.is_string(body.report["request-id"])
      end
      local _, _, body = problem(action(RUN_IN_PROGRESS), { ["x-request-id"] = "trace-7" })
      assert.equal("The flowRunId=" .. RUN_IN_PROGRESS
                   .. " is in an invalid state inProgress for the action re-trigger",
                   body.report["detailed-message"])
      assert.equal("trace-7", body.report["request-id"])
      local _, _, missing = problem(action("no-such-run"))
      assert.matches("flowRunId=no%-such%-run", missing.report["detailed-message"])
      assert.equal(ALL_RUNS, #server:runs())
    end)

    it("answers 412 when If-Match differs from the run's etag", function()
      local status, code = problem(action(RUN), { ["If-Match"] = '"stale"' })
      assert.equal(412, status)
      assert.equal("FLOW-1404-412", code)
    end)

    it("answers an old-style 404 for unknown paths and methods", function()
      local res = server:http{ path = "/flowSpecs", auth = true }
      assert.equal(404, res.status)
      assert.same({ errorMessage = "Not found: GET /flowSpecs" }, cjson.decode(res.body))
      res = server:http{ method = "DELETE", path = "/runs", auth = true }
      assert.equal(404, res.status)
      res = server:http{ method = "GET", path = action(RUN), auth = true }
      assert.equal(404, res.status)
    end)
  end)

  describe("gateway", function()
    local full = {
      ["Authorization"] = "Bearer fake-token",
      ["x-api-key"] = "fake-api-key",
      ["x-gw-ims-org-id"] = "FAKEORG@AdobeOrg",
      ["x-sandbox-name"] = "prod",
    }
    local function with(changes)
      local h = {}
      for k, v in pairs(full) do h[k] = v end
      for k, v in pairs(changes) do h[k] = v or nil end
      return h
    end

    it("checks credentials in order, with Adobe's bodies", function()
      local cases = {
        { { Authorization = false }, 403, "403010" },
        { { Authorization = "Basic abc" }, 401, "401013" },
        { { Authorization = "Bearer wrong" }, 401, "401013" },
        { { Authorization = false, ["x-api-key"] = false }, 403, "403010" },
        { { ["x-api-key"] = false }, 403, "403000" },
        { { ["x-api-key"] = "wrong" }, 403, "403003" },
        { { ["x-gw-ims-org-id"] = false }, 400, "400003" },
        { { ["x-gw-ims-org-id"] = "OTHER@AdobeOrg" }, 403, "403025" },
      }
      for i, c in ipairs(cases) do
        local res = server:http{ method = "POST", path = action(RUN), headers = with(c[1]) }
        assert.equal(c[2], res.status, "case " .. i)
        local body = cjson.decode(res.body)
        assert.equal(c[3], body.error_code, "case " .. i)
        assert.is_string(body.message)
      end
      local res = server:http{ method = "POST", path = action(RUN),
                               headers = with{ ["x-sandbox-name"] = false } }
      assert.equal(400, res.status)
      assert.matches("/FLOW%-2105%-400$", cjson.decode(res.body).type)
      res = server:http{ method = "POST", path = action(RUN), headers = with{ ["x-sandbox-name"] = "Prod" } }
      assert.equal(404, res.status)
      assert.matches("/FLOW%-2100%-404$", cjson.decode(res.body).type)
      -- the second sandbox of the fixture is valid too
      assert.equal(200, server:http{ method = "POST", path = action(RUN),
                                     headers = with{ ["x-sandbox-name"] = "dev" } }.status)
      -- nothing refused created a run
      assert.equal(ALL_RUNS + 1, #server:runs())
    end)
  end)

  describe("scenarios", function()
    local function retrigger(extra)
      local opts = { method = "POST", path = action(RUN), auth = true }
      for k, v in pairs(extra or {}) do opts[k] = v end
      return server:http(opts)
    end

    it("answers 429 with Retry-After and the gateway body", function()
      server:scenario{ match = "^POST /runs/", status = 429, retry_after = "2" }
      local res = retrigger()
      assert.equal(429, res.status)
      assert.equal("2", res.headers["retry-after"])
      assert.same({ error_code = "429050", message = "Too many requests" }, cjson.decode(res.body))
      assert.equal(200, retrigger().status)  -- times defaults to 1
    end)

    it("answers 503 with a FLOW-1103-503 problem document, skipping the gateway", function()
      server:scenario{ status = 503, times = 2 }
      local res = server:http{ method = "POST", path = action(RUN) }   -- no credentials
      assert.equal(503, res.status)
      assert.matches("/FLOW%-1103%-503$", cjson.decode(res.body).type)
      assert.equal(503, retrigger().status)
      assert.equal(200, retrigger().status)
    end)

    it("sends a given status, headers and body verbatim", function()
      server:scenario{ status = 502, body = "<html>bad gateway</html>",
                       headers = { ["Content-Type"] = "text/html", ["X-Extra"] = "1" } }
      local res = retrigger()
      assert.equal(502, res.status)
      assert.equal("<html>bad gateway</html>", res.body)
      assert.equal("text/html", res.headers["content-type"])
      assert.equal("1", res.headers["x-extra"])
    end)

    it("matches by pattern, in FIFO order, and times = -1 lasts until reset", function()
      server:scenario{ match = "^GET /teapot", status = 418, times = -1 }
      server:scenario{ status = 500 }
      server:scenario{ status = 501 }
      assert.equal(418, server:http{ path = "/teapot" }.status)
      assert.equal(418, server:http{ path = "/teapot" }.status)
      assert.equal(500, retrigger().status)
      assert.equal(501, retrigger().status)
      assert.equal(200, retrigger().status)
      assert.equal(418, server:http{ path = "/teapot" }.status)
      server:reset()
      assert.equal(403, server:http{ path = "/teapot" }.status)
    end)

    it("refuses malformed scenarios", function()
      assert.has_error(function() server:scenario{ bogus = 1 } end)
      assert.has_error(function() server:scenario{ match = "[(" } end)
      assert.has_error(function() server:scenario{ drop = "sometimes" } end)
    end)

    it("delays", function()
      server:scenario{ delay = 0.2 }
      local t0 = now()
      assert.equal(200, retrigger().status)
      assert.is_true(now() - t0 >= 0.2)
    end)

    it("drops the connection before and after reading the body", function()
      server:scenario{ drop = "before" }
      local res = retrigger{ body = "payload-1" }
      assert.equal(0, res.status)
      assert.equal(52, res.curl_exit)   -- empty reply from server
      server:scenario{ drop = "after" }
      res = retrigger{ body = "payload-2" }
      assert.equal(0, res.status)
      local log = server:requests()
      assert.equal(2, #log)
      assert.is_nil(log[1].body)
      assert.equal("payload-2", log[2].body)
      assert.equal(ALL_RUNS, #server:runs())
    end)

    it("truncates a reply", function()
      server:scenario{ truncate = true }
      local res = retrigger()
      assert.equal(200, res.status)
      assert.equal(18, res.curl_exit)   -- partial file
      assert.equal('{"id":"', res.body)
      assert.equal("100", res.headers["content-length"])
    end)

    it("sends an oversized valid JSON body", function()
      server:scenario{ oversize = 100000 }
      local res = retrigger()
      assert.equal(200, res.status)
      assert.equal(100000, #res.body)
      assert.equal("x", cjson.decode(res.body).id)
    end)

    it("sends the body slowly, complete and with a correct length", function()
      server:scenario{ slow_body = 0.3 }
      local t0 = now()
      local res = retrigger()
      assert.is_true(now() - t0 >= 0.3)
      assert.equal(200, res.status)
      assert.equal(0, res.curl_exit)
      assert.equal(tostring(#res.body), res.headers["content-length"])
      assert.matches(UUID4, cjson.decode(res.body).id)
    end)

    it("closes the connection after a reply when asked, and keeps it alive otherwise", function()
      local creds = "-H 'Authorization: Bearer fake-token' -H 'x-api-key: fake-api-key'"
        .. " -H 'x-gw-ims-org-id: FAKEORG@AdobeOrg' -H 'x-sandbox-name: prod'"
      local function two_posts()
        server:clear_requests()
        local url = server.url .. action(RUN)
        assert.is_true(sh("curl -s --noproxy '*' --max-time 5 -X POST " .. creds
                          .. " -o /dev/null -o /dev/null '" .. url .. "' '" .. url .. "'"))
        return server:requests()
      end
      local log = two_posts()
      assert.equal(log[1].connection, log[2].connection)
      assert.equal(2, log[2].connection_requests)

      server:scenario{ close = true }
      local res = retrigger()
      assert.equal("close", res.headers["connection"])
      assert.matches(UUID4, cjson.decode(res.body).id)
      server:scenario{ close = true }
      log = two_posts()
      assert.not_equal(log[1].connection, log[2].connection)
      assert.equal(1, log[2].connection_requests)
    end)
  end)

  describe("reading runs", function()
    it("GET /runs/{id} answers a list of one, and 404 for an unknown id", function()
      local res = server:http{ path = "/runs/" .. RUN, auth = true }
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      local body = cjson.decode(res.body)
      assert.equal(1, #body.items)
      assert.same(server:run(RUN), body.items[1])
      assert.matches('"createdAt":1670444672602[,}]', res.body)   -- exact, not 1.6704446726e+12
      res = server:http{ path = "/runs/" .. RUN:gsub("%-", "%%2D"), auth = true }
      assert.equal(RUN, cjson.decode(res.body).items[1].id)

      res = server:http{ path = "/runs/00000000-0000-4000-8000-000000000000", auth = true,
                         headers = { ["x-request-id"] = "get-1" } }
      assert.equal(404, res.status)
      body = cjson.decode(res.body)
      assert.matches("/FLOW%-1101%-404$", body.type)
      assert.equal("get-1", body.report["request-id"])
      -- the gateway checks apply, and the request is recorded
      assert.equal(403, server:http{ path = "/runs/" .. RUN }.status)
      assert.equal(3 + 1, #server:requests())
    end)
  end)

  describe("listing", function()
    local PAGING = fake.paging_flow
    local S = fake.paging_runs.failed.start

    local function list(query, extra)
      local opts = { path = "/runs?" .. query, auth = true }
      for k, v in pairs(extra or {}) do opts[k] = v end
      local res = server:http(opts)
      local ok, body = pcall(cjson.decode, res.body)
      return res.status, ok and body or res.body, res
    end
    local function count(...)
      local parts = { "count=true" }
      for _, expr in ipairs({ ... }) do parts[#parts + 1] = "property=" .. esc(expr) end
      local status, body = list(table.concat(parts, "&"))
      assert.equal(200, status)
      return body.count
    end
    local function code_of(status, body)
      return status, type(body) == "table" and body.type and body.type:match("[^/]+$")
    end

    it("filters with == on strings, any of, case-insensitively", function()
      assert.equal(ALL_RUNS, count())
      assert.equal(11, count("flowId==" .. FLOW))
      assert.equal(11, count("flowId==" .. FLOW:upper()))
      assert.equal(270, count("flowId==" .. PAGING))
      assert.equal(281, count("flowId==" .. FLOW .. "," .. PAGING))
      assert.equal(7, count("flowId==" .. FLOW, "metrics.statusSummary.status==FAILED"))
      assert.equal(9, count("flowId==" .. FLOW, "metrics.statusSummary.status==failed,Success"))
      assert.equal(1 + 3, count("metrics.statusSummary.status==partialsuccess"))
      assert.equal(250, count("flowId==" .. PAGING, "metrics.statusSummary.status==failed"))
      assert.equal(ALL_RUNS, count("createdClient==SCHEDULER"))
      assert.equal(0, count("flowId==no-such-flow"))
      assert.equal(0, count("no.such.field==x"))
      -- the raw expression (escapes as a client may leave them) works as well
      local status, body = list("property=flowId==" .. FLOW .. "&count=true")
      assert.equal(200, status)
      assert.equal(11, body.count)
    end)

    it("filters numbers with ==, >, <, >= and <= (ANDed)", function()
      local started = "metrics.durationSummary.startedAtUTC"
      local first = S + 1500
      local failed = { "flowId==" .. PAGING, "metrics.statusSummary.status==failed" }
      local function c(expr) return count(failed[1], failed[2], expr) end
      assert.equal(249, c(started .. ">" .. first))
      assert.equal(250, c(started .. ">=" .. first))
      assert.equal(10, c(started .. "<" .. (first + 10 * 60000)))
      assert.equal(11, c(started .. "<=" .. (first + 10 * 60000)))
      assert.equal(5, count(failed[1], failed[2], "createdAt>=" .. (S + 100 * 60000),
                            "createdAt<" .. (S + 105 * 60000)))
      assert.equal(20, count("metrics.recordSummary.outputRecordCount==500"))
      assert.equal(20, count("metrics.recordSummary.outputRecordCount==500.0,7"))
      assert.equal(1, count("createdAt==1670444672602"))
      assert.equal(0, count("flowId>5"))   -- not a number: no match
    end)

    it("answers 400 FLOW-1107-400 for a malformed property filter", function()
      for _, expr in ipairs({ "flowId=x", "flowId", "==x", "flowId==a,,b", "createdAt>",
                              "createdAt<=1e5", "1abc==x", "a..b==x", "createdAt=>5",
                              "createdAt!=5" }) do
        local status, code = code_of(list("property=" .. esc(expr)))
        assert.equal(400, status, expr)
        assert.equal("FLOW-1107-400", code, expr)
      end
      local _, body = list("property=" .. esc("flowId=x"))
      assert.equal("Invalid property filter", body.title)
      assert.matches("invalid property filter", body.report["detailed-message"])
    end)

    it("decodes +, %2B and %3D in values the form-urlencoded way", function()
      local dir = server.prefix .. "/plusfixture"
      local doc = cjson.decode(assert(io.open("fake/runs.json")):read("*a"))
      doc.runs[1].createdClient = "ci+bot/1=x y"
      doc.generated = nil
      sh("mkdir -p '" .. dir .. "'")
      local out = assert(io.open(dir .. "/runs.json", "w"))
      out:write(cjson.encode(doc))
      out:close()
      local other = fake.start{ fixture = dir .. "/runs.json" }
      local ok, err = pcall(function()
        local function n(query)
          local res = other:http{ path = "/runs?count=true&" .. query, auth = true }
          assert.equal(200, res.status, query)
          return cjson.decode(res.body).count
        end
        assert.equal(1, n("property=createdClient%3D%3Dci%2Bbot%2F1%3Dx%20y"))
        assert.equal(1, n("property=createdClient==ci%2Bbot/1=x+y"))
        assert.equal(0, n("property=createdClient==ci+bot/1=x+y"))   -- "+" is a space
        assert.equal(FIXTURE_RUNS, n(""))
      end)
      other:stop()
      assert(ok, err)
    end)

    local function ids(body)
      local t = {}
      for i, run in ipairs(body.items) do t[i] = run.id end
      return t
    end

    it("orders by -createdAt by default, or by any field either way", function()
      local base = "property=" .. esc("flowId==" .. FLOW) .. "&"
      local _, default = list(base:sub(1, -2))
      assert.equal(11, #default.items)
      for i = 2, #default.items do
        assert.is_true(default.items[i - 1].createdAt > default.items[i].createdAt)
      end
      assert.equal(RUN, default.items[11].id)
      assert.same(ids(default), ids(select(2, list(base .. "orderby=-createdAt"))))
      local _, asc = list(base .. "orderby=%2BcreatedAt")
      assert.equal(RUN, asc.items[1].id)
      for i = 2, #asc.items do
        assert.is_true(asc.items[i - 1].createdAt < asc.items[i].createdAt)
      end
      assert.same(ids(asc), ids(select(2, list(base .. "orderby=createdAt"))))
      assert.same(ids(asc), ids(select(2, list(base .. "orderby=+createdAt"))))   -- raw "+"
      local _, by_start = list(base .. "orderby=-metrics.durationSummary.startedAtUTC")
      assert.same(ids(default), ids(by_start))
      local _, by_records = list(base .. "orderby=-metrics.recordSummary.outputRecordCount&limit=2")
      assert.equal(RUN_SUCCESS_RECORDS, by_records.items[1].id)   -- 48213
      assert.equal(RUN_PARTIAL, by_records.items[2].id)           -- 1200
      for _, bad in ipairs({ "-", "--createdAt", "created At", "a..b" }) do
        local status, code = code_of(list(base .. "orderby=" .. esc(bad)))
        assert.equal(400, status, bad)
        assert.equal("FLOW-1111-400", code, bad)
      end
    end)

    it("takes limit 1..100, 100 by default", function()
      local paging = "property=" .. esc("flowId==" .. PAGING)
      local _
      local status, body, res = list(paging .. "&limit=1")
      assert.equal(200, status)
      assert.equal(1, #body.items)
      assert.equal(fake.paging_run_id(250), body.items[1].id)
      assert.is_string(body._links.next.href)
      assert.equal(100, #select(2, list(paging .. "&limit=100")).items)
      _, body = list(paging)
      assert.equal(100, #body.items)
      assert.is_string(body._links.next.href)
      for _, bad in ipairs({ "0", "101", "1.5", "" }) do
        local s, code = code_of(list(paging .. "&limit=" .. bad))
        assert.equal(400, s, bad)
        assert.equal("FLOW-1108-400", code, bad)
      end
      local s, code = code_of(list(paging .. "&limit=5&limit=5"))
      assert.equal(400, s)
      assert.equal("FLOW-1111-400", code)
      -- everything fits on one page: no next link, and {} rather than []
      status, body, res = list("property=" .. esc("flowId==" .. FLOW) .. "&limit=11")
      assert.equal(11, #body.items)
      assert.matches(',"_links":{}}$', res.body)
      -- nothing matches: an empty array, not {}
      _, _, res = list("property=" .. esc("flowId==nothing"))
      assert.equal('{"items":[],"_links":{}}', res.body)
    end)

    it("counts with count=true, and refuses count together with limit", function()
      local failed = "property=" .. esc("flowId==" .. PAGING)
        .. "&property=" .. esc("metrics.statusSummary.status==failed")
      local status, _, res = list(failed .. "&count=true")
      assert.equal(200, status)
      assert.equal('{"count":250}', res.body)
      local s, code = code_of(list(failed .. "&count=true&limit=5"))
      assert.equal(400, s)
      assert.equal("FLOW-1109-400", code)
    end)

    local FAILED_Q = "property=" .. esc("flowId==" .. PAGING)
      .. "&property=" .. esc("metrics.statusSummary.status==failed")

    local function token_of(body)
      local href = body._links and body._links.next and body._links.next.href
      return href and href:match("[?&]continuationToken=([^&]+)")
    end

    it("pages through all 250 failed runs when the query is repeated with the token", function()
      local seen, order, pages = {}, {}, 0
      local query = FAILED_Q .. "&limit=100"
      local status, body, res = list(query)
      while true do
        assert.equal(200, status)
        pages = pages + 1
        for _, run in ipairs(body.items) do
          assert.is_nil(seen[run.id])
          seen[run.id] = true
          order[#order + 1] = run
        end
        local token = token_of(body)
        if not token then
          assert.matches(',"_links":{}}$', res.body)
          break
        end
        assert.matches("^/runs%?continuationToken=[^&]+$", body._links.next.href)
        -- opaque, and escaped: it holds "+", "/" and "="
        assert.matches("%%2B", token)
        assert.matches("%%2F", token)
        assert.matches("%%3D$", token)
        status, body, res = list(FAILED_Q .. "&continuationToken=" .. token)   -- limit from the token
      end
      assert.equal(3, pages)
      assert.equal(250, #order)
      for i, run in ipairs(order) do
        assert.equal(fake.paging_run_id(251 - i), run.id)
        assert.equal(fake.paging_runs.failed.start + (250 - i) * 60000, run.createdAt)
      end
    end)

    it("refuses a continuationToken with another query", function()
      local _, first = list(FAILED_Q .. "&limit=10")
      local token = token_of(first)
      -- the same filters in another order and an explicit default order are the same query
      local reordered = "property=" .. esc("metrics.statusSummary.status==failed")
        .. "&property=" .. esc("flowId==" .. PAGING) .. "&orderby=-createdAt"
      local status, body = list(reordered .. "&limit=10&continuationToken=" .. token)
      assert.equal(200, status)
      assert.equal(fake.paging_run_id(240), body.items[1].id)
      for _, q in ipairs({
        "continuationToken=" .. token,                                        -- token alone
        "property=" .. esc("flowId==" .. PAGING) .. "&continuationToken=" .. token,
        FAILED_Q .. "&orderby=%2BcreatedAt&continuationToken=" .. token,
        FAILED_Q .. "&property=" .. esc("createdAt>1") .. "&continuationToken=" .. token,
      }) do
        local s, b = list(q)
        assert.equal(400, s, q)
        assert.matches("/FLOW%-1110%-400$", b.type)
        assert.equal("continuationToken does not match the query", b.title)
      end
      for _, bad in ipairs({ "garbage", esc("+/+/AAAA"), "" }) do
        local s, b = list(FAILED_Q .. "&continuationToken=" .. bad)
        assert.equal(400, s, bad)
        assert.matches("/FLOW%-1110%-400$", b.type)
      end
    end)

    it("repeats a token when told to (repeat_token)", function()
      local _, p1 = list(FAILED_Q .. "&limit=100")
      local _, p2 = list(FAILED_Q .. "&continuationToken=" .. token_of(p1))
      assert.not_equal(token_of(p1), token_of(p2))
      server:scenario{ match = "^GET /runs%?", repeat_token = true, times = 2 }
      _, p1 = list(FAILED_Q .. "&limit=100")
      local t1 = token_of(p1)
      _, p2 = list(FAILED_Q .. "&continuationToken=" .. t1)
      assert.equal(fake.paging_run_id(150), p2.items[1].id)   -- the page itself is right
      assert.equal(t1, token_of(p2))                          -- but the link goes nowhere new
      local _, p3 = list(FAILED_Q .. "&continuationToken=" .. t1)
      assert.same(ids(p2), ids(p3))                           -- a client that follows loops
      assert.not_equal(t1, token_of(p3))                      -- scenario used up
      local _, p4 = list(FAILED_Q .. "&continuationToken=" .. token_of(p3))
      assert.equal(fake.paging_run_id(50), p4.items[1].id)
    end)

    it("puts the whole query in the next link with link_style = full", function()
      server:scenario{ link_style = "full", times = -1 }
      local status, body = list(FAILED_Q .. "&limit=100")
      assert.equal(200, status)
      local href = body._links.next.href
      assert.equal("/runs?" .. FAILED_Q .. "&orderby=-createdAt&limit=100&continuationToken="
                   .. token_of(body), href)
      local seen = #body.items
      while href do
        local res = server:http{ path = href, auth = true }
        assert.equal(200, res.status)
        body = cjson.decode(res.body)
        seen = seen + #body.items
        href = body._links.next and body._links.next.href
      end
      assert.equal(250, seen)
      assert.has_error(function() server:scenario{ link_style = "partial" } end)
    end)
  end)

  describe("flows", function()
    local FLOW_IDS = { fake.flows.enabled, fake.flows.disabled, fake.flows.streaming,
                       fake.flows.paging, fake.flows.bulk }   -- fixture order

    local function get(path, headers)
      local res = server:http{ path = path, auth = true, headers = headers }
      local ok, body = pcall(cjson.decode, res.body)
      return res.status, ok and body or res.body, res
    end
    local function code_of(body)
      return type(body) == "table" and body.type and body.type:match("[^/]+$") or nil
    end
    local function ids(items)
      local t = {}
      for i, item in ipairs(items) do t[i] = item.id end
      return t
    end
    local function count(...)
      local parts = { "count=true" }
      for _, expr in ipairs({ ... }) do parts[#parts + 1] = "property=" .. esc(expr) end
      local status, body = get("/flows?" .. table.concat(parts, "&"))
      assert.equal(200, status)
      return body.count
    end

    it("GET /flows lists the fixture's flows, newest first, with the service's fields", function()
      local status, body, res = get("/flows")
      assert.equal(200, status)
      assert.equal("application/json", res.headers["content-type"])
      assert.matches(',"_links":{}}$', res.body)
      assert.same({ FLOW_IDS[5], FLOW_IDS[4], FLOW_IDS[3], FLOW_IDS[2], FLOW_IDS[1] }, ids(body.items))
      local by_id = {}
      for _, flow in ipairs(body.items) do by_id[flow.id] = flow end
      local enabled = by_id[fake.flows.enabled]
      assert.equal("enabled flow", enabled.name)
      assert.equal("enabled", enabled.state)
      assert.same({ id = fake.flow_specs.batch, version = "1.0" }, enabled.flowSpec)
      assert.is_string(enabled.description)
      assert.equal(1, #enabled.sourceConnectionIds)
      assert.equal(1, #enabled.targetConnectionIds)
      assert.matches('^"[%x%-]+"$', enabled.etag)
      assert.equal(1669000000000, enabled.createdAt)
      assert.matches('"createdAt":1669000000000[,}]', res.body)
      assert.is_string(enabled.createdBy)
      assert.equal("FAKEORG@AdobeOrg", enabled.imsOrgId)
      assert.equal("/runs?property=flowId==" .. enabled.id, enabled.runs)
      local src = enabled.inheritedAttributes.sourceConnections[1]
      assert.equal(enabled.sourceConnectionIds[1], src.id)
      assert.is_string(src.connectionSpec.id)
      assert.equal(enabled.targetConnectionIds[1],
                   enabled.inheritedAttributes.targetConnections[1].id)
      assert.is_nil(enabled.enabled)        -- the fixture's shorthand is not served
      assert.is_nil(enabled.source)
      assert.equal("disabled", by_id[fake.flows.disabled].state)
      local streaming = by_id[fake.flows.streaming]
      assert.equal("enabled", streaming.state)
      assert.same({ id = fake.flow_specs.streaming, version = "1.0" }, streaming.flowSpec)
      assert.not_equal(src.connectionSpec.id,
                       streaming.inheritedAttributes.sourceConnections[1].connectionSpec.id)
    end)

    it("filters by state, name and flowSpec.id, and counts", function()
      assert.equal(5, count())
      assert.equal(4, count("state==enabled"))
      assert.equal(1, count("state==disabled"))
      assert.equal(5, count("state==enabled,disabled"))
      local _, body = get("/flows?property=" .. esc("state==disabled"))
      assert.same({ fake.flows.disabled }, ids(body.items))
      _, body = get("/flows?property=" .. esc("name==Paging Flow"))   -- case-insensitive
      assert.same({ fake.flows.paging }, ids(body.items))
      _, body = get("/flows?property=" .. esc("flowSpec.id==" .. fake.flow_specs.streaming))
      assert.same({ fake.flows.streaming }, ids(body.items))
      _, body = get("/flows?property=" .. esc("flowSpec.id==" .. fake.flow_specs.batch)
                    .. "&property=" .. esc("state==enabled"))
      assert.same({ fake.flows.bulk, fake.flows.paging, fake.flows.enabled }, ids(body.items))
      _, body = get("/flows?property=" .. esc("createdAt>=1669172800000"))   -- day 3 on
      assert.same({ FLOW_IDS[5], FLOW_IDS[4], FLOW_IDS[3] }, ids(body.items))
      _, body = get("/flows?orderby=%2Bname")
      assert.same({ FLOW_IDS[5], FLOW_IDS[2], FLOW_IDS[1], FLOW_IDS[4], FLOW_IDS[3] }, ids(body.items))
      local status
      status, body = get("/flows?property=" .. esc("state=enabled"))
      assert.equal(400, status)
      assert.equal("FLOW-1107-400", code_of(body))
      status, body = get("/flows?count=true&limit=2")
      assert.equal("FLOW-1109-400", code_of(body))
    end)

    it("pages with limit and continuationToken, bound to /flows", function()
      local seen, pages = {}, 0
      local status, body = get("/flows?limit=2")
      while true do
        assert.equal(200, status)
        pages = pages + 1
        for _, id in ipairs(ids(body.items)) do seen[#seen + 1] = id end
        local href = body._links.next and body._links.next.href
        if not href then break end
        assert.matches("^/flows%?continuationToken=[^&]+$", href)
        status, body = get(href)
      end
      assert.equal(3, pages)
      assert.same({ FLOW_IDS[5], FLOW_IDS[4], FLOW_IDS[3], FLOW_IDS[2], FLOW_IDS[1] }, seen)
      local limit_status, limit_body = get("/flows?limit=0")
      assert.equal(400, limit_status)
      assert.equal("FLOW-1108-400", code_of(limit_body))
      -- a token of /runs is not one of /flows, nor the other way round
      local _, runs = get("/runs?limit=1")
      local token = runs._links.next.href:match("continuationToken=([^&]+)")
      local bad_status, bad = get("/flows?continuationToken=" .. token)
      assert.equal(400, bad_status)
      assert.equal("FLOW-1110-400", code_of(bad))
      local _, flows = get("/flows?limit=1")
      token = flows._links.next.href:match("continuationToken=([^&]+)")
      bad_status, bad = get("/runs?continuationToken=" .. token)
      assert.equal(400, bad_status)
      assert.equal("FLOW-1110-400", code_of(bad))
    end)

    it("GET /flows/{id} answers a list of one, and FLOW-1101-404 for an unknown id", function()
      local _, list = get("/flows")
      local status, body, res = get("/flows/" .. fake.flows.bulk)
      assert.equal(200, status)
      assert.equal(1, #body.items)
      assert.same(list.items[1], body.items[1])
      assert.is_nil(body._links)
      assert.equal(fake.flows.bulk, cjson.decode(res.body).items[1].id)
      status, body = get("/flows/" .. fake.flows.bulk:gsub("%-", "%%2D"))
      assert.equal(fake.flows.bulk, body.items[1].id)
      status, body = get("/flows/00000000-0000-4000-8000-000000000000", { ["x-request-id"] = "f-1" })
      assert.equal(404, status)
      assert.equal("FLOW-1101-404", code_of(body))
      assert.equal(404, body.status)
      assert.equal("The flowId=00000000-0000-4000-8000-000000000000 was not found.",
                   body.report["detailed-message"])
      assert.equal("f-1", body.report["request-id"])
      -- the gateway checks apply
      assert.equal(403, server:http{ path = "/flows/" .. fake.flows.bulk }.status)
      assert.equal(403, server:http{ path = "/flows" }.status)
    end)
  end)

  describe("sandbox", function()
    local function get(path)
      local res = server:http{ path = path, auth = true }
      return res.status, cjson.decode(res.body), res
    end
    local function count(path, ...)
      local parts = { "count=true" }
      for _, expr in ipairs({ ... }) do parts[#parts + 1] = "property=" .. esc(expr) end
      local status, body = get(path .. "?" .. table.concat(parts, "&"))
      assert.equal(200, status)
      return body.count
    end
    local function post(id)
      local res = server:http{ method = "POST", path = action(id), auth = true }
      local body = cjson.decode(res.body)
      return res.status, body.type and body.type:match("[^/]+$") or body
    end

    it("adds 20 flows and 1000 failed runs with realistic errors, until reset", function()
      local failed_before = count("/runs", "metrics.statusSummary.status==failed")
      local sb = server:sandbox()
      assert.equal(1, sb.seed)
      assert.equal(1000, sb.runs)
      assert.equal(20, #sb.flows)
      local total = 0
      for i, f in ipairs(sb.flows) do
        assert.equal(fake.sandbox_flow_id(i), f.id)
        assert.equal(string.format("sandbox flow %02d", i), f.name)
        assert.equal(i >= 17 and i <= 19 and "disabled" or "enabled", f.state)
        assert.equal(i == 20 and "streaming" or "batch", f.source)
        assert.is_true(f.runs > 0, "flow " .. i .. " has runs")
        assert.equal(f.runs, count("/runs", "flowId==" .. f.id))
        total = total + f.runs
      end
      assert.equal(1000, total)
      assert.equal(ALL_RUNS + 1000, count("/runs"))
      assert.equal(ALL_RUNS + 1000, #server:runs())
      assert.equal(failed_before + 1000, count("/runs", "metrics.statusSummary.status==failed"))
      assert.equal(5 + 20, count("/flows"))
      assert.equal(1 + 3, count("/flows", "state==disabled"))
      assert.equal(2, count("/flows", "flowSpec.id==" .. fake.flow_specs.streaming))
      -- a mix of codes; a run may carry both CONNECTOR codes
      for _, code in ipairs({ "CONNECTOR-2001-500", "CONNECTOR-1001-500", "INGEST-1212-400" }) do
        assert.is_true(sb.by_code[code] > 100, code .. " " .. tostring(sb.by_code[code]))
      end
      assert.equal(sb.by_code["CONNECTOR-1001-500"], sb.by_code["INGEST-1212-400"])
      assert.is_true(sb.by_code["CONNECTOR-2001-500"] + sb.by_code["CONNECTOR-1001-500"] > 1000)

      -- GET /runs without a flowId filter: every flow's runs, newest first (the night's)
      local _, page = get("/runs?limit=100")
      local flows_seen, n = {}, 0
      for _, run in ipairs(page.items) do
        if not flows_seen[run.flowId] then flows_seen[run.flowId] = true n = n + 1 end
        assert.matches("^5a9d", run.id)
      end
      assert.is_true(n >= 10, n .. " flows on the first page")

      server:reset()
      assert.equal(ALL_RUNS, count("/runs"))
      assert.equal(5, count("/flows"))
      assert.equal(404, server:http{ path = "/flows/" .. fake.sandbox_flow_id(1), auth = true }.status)
    end)

    it("gives runs deterministic ids, etags and errors with nestedErrors", function()
      local sb = server:sandbox()
      local run = server:run(fake.sandbox_run_id(1, 1))
      assert.equal(fake.sandbox_flow_id(1), run.flowId)
      assert.equal('"5a9d0001-0000-0200-0000-000000000001"', run.etag)
      assert.equal("scheduler", run.createdClient)
      assert.equal(0, run.metrics.recordSummary.outputRecordCount)
      assert.is_number(run.metrics.durationSummary.completedAtUTC)
      assert.is_nil(server:run(fake.sandbox_run_id(1, sb.flows[1].runs + 1)))
      assert.equal(fake.sandbox_run_id(20, 1),
                   server:run(fake.sandbox_run_id(20, sb.flows[20].runs)).id:gsub("%d+$", "000000000001"))
      -- find one of each error shape among flow 2's runs
      local shapes = {}
      for j = 1, sb.flows[2].runs do
        local errors = server:run(fake.sandbox_run_id(2, j)).metrics.statusSummary.errors
        local key = {}
        for i, e in ipairs(errors) do
          assert.is_string(e.message)
          key[i] = e.code
          if e.nestedErrors then
            assert.equal("CONNECTOR-1001-500", e.code)
            assert.equal(1, #e.nestedErrors)
            assert.equal("INGEST-1212-400", e.nestedErrors[1].code)
            assert.matches("^Encountered %d+ errors in the data", e.nestedErrors[1].message)
            key[i] = e.code .. ">" .. e.nestedErrors[1].code
          end
        end
        shapes[table.concat(key, ",")] = true
      end
      assert.same({ ["CONNECTOR-2001-500"] = true, ["CONNECTOR-1001-500>INGEST-1212-400"] = true,
                    ["CONNECTOR-2001-500,CONNECTOR-1001-500>INGEST-1212-400"] = true }, shapes)
      -- the same seed gives the same sandbox; another seed another spread
      server:reset()
      assert.same(sb, server:sandbox{ seed = 1 })
      server:reset()
      local other = server:sandbox{ seed = 2 }
      assert.not_same(sb.flows, other.flows)
    end)

    it("re-triggers by the usual rules: enabled batch flows only", function()
      server:sandbox()
      local status, body = post(fake.sandbox_run_id(1, 1))
      assert.equal(200, status)
      assert.matches(UUID4, body.id)
      assert.equal(fake.sandbox_flow_id(1), server:run(body.id).flowId)
      assert.same({ 400, "FLOW-1388-400" }, { post(fake.sandbox_run_id(17, 1)) })
      assert.same({ 400, "FLOW-1333-400" }, { post(fake.sandbox_run_id(20, 1)) })
    end)

    it("takes its sizes, once per reset, and refuses bad settings", function()
      local sb = server:sandbox{ flows = 4, runs = 10, seed = 99, disabled = 1, streaming = 0 }
      assert.equal(4, #sb.flows)
      assert.same({ "enabled", "enabled", "enabled", "disabled" },
                  { sb.flows[1].state, sb.flows[2].state, sb.flows[3].state, sb.flows[4].state })
      assert.equal(ALL_RUNS + 10, count("/runs"))
      local ok, err = pcall(server.sandbox, server)
      assert.is_false(ok)
      assert.matches("409", tostring(err))
      server:reset()
      for _, bad in ipairs({ { flows = 0 }, { runs = -1 }, { seed = 1.5 }, { colour = 1 },
                             { flows = 2, disabled = 2, streaming = 1 } }) do
        ok, err = pcall(server.sandbox, server, bad)
        assert.is_false(ok)
        assert.matches("400", tostring(err))
      end
      assert.equal(ALL_RUNS, count("/runs"))
    end)
  end)

  describe("outcomes", function()
    local BULK = fake.bulk_flow
    local CREDS = "-H 'Authorization: Bearer fake-token' -H 'x-api-key: fake-api-key'"
      .. " -H 'x-gw-ims-org-id: FAKEORG@AdobeOrg' -H 'x-sandbox-name: prod'"
    local function retrigger(id)
      local res = server:http{ method = "POST", path = action(id), auth = true }
      assert.equal(200, res.status, res.body)
      return cjson.decode(res.body).id
    end
    local function read(id)
      local res = server:http{ path = "/runs/" .. id, auth = true }
      assert.equal(200, res.status)
      return cjson.decode(res.body).items[1]
    end
    local function sleep(s) os.execute("sleep " .. s) end

    it("by default new runs stay inProgress, and count as executing", function()
      assert.same({ on = false }, server:outcomes())
      local a = retrigger(fake.bulk_run_id(1))
      local b = retrigger(fake.bulk_run_id(2))
      sleep(0.3)
      assert.equal("inProgress", read(a).metrics.statusSummary.status)
      assert.is_nil(read(b).metrics.durationSummary.completedAtUTC)
      local stats = server:stats()
      assert.same({ [BULK] = 2 }, stats.executing)
      assert.same({ [BULK] = 2 }, stats.max_executing)
      server:reset()
      stats = server:stats()
      assert.same({}, stats.executing)
      assert.same({}, stats.max_executing)
    end)

    it("finishes a new run as success with records after the delay, seen on read", function()
      local o = server:outcomes{ after = 0.6, status = "success", records = 42 }
      assert.is_true(o.on)
      assert.same({ after = 0.6, status = "success", records = 42 }, o.default)
      local id = retrigger(fake.bulk_run_id(3))
      local run = read(id)
      assert.equal("inProgress", run.metrics.statusSummary.status)
      assert.is_nil(run.metrics.durationSummary.completedAtUTC)
      assert.same({ [BULK] = 1 }, server:stats().executing)
      sleep(0.8)
      run = read(id)
      assert.equal("success", run.metrics.statusSummary.status)
      assert.equal(42, run.metrics.recordSummary.outputRecordCount)
      assert.is_nil(run.metrics.statusSummary.errors)
      assert.equal(run.metrics.durationSummary.startedAtUTC + 600,
                   run.metrics.durationSummary.completedAtUTC)
      assert.equal(run.metrics.durationSummary.completedAtUTC, run.updatedAt)
      local stats = server:stats()
      assert.same({}, stats.executing)
      assert.same({ [BULK] = 1 }, stats.max_executing)
      -- a success with records is not re-triggerable
      assert.equal(400, server:http{ method = "POST", path = action(id), auth = true }.status)
      -- the listing sees it too, and the control API
      local res = server:http{ path = "/runs?property=" .. esc("parentFlowRunId==" .. fake.bulk_run_id(3)),
                               auth = true }
      assert.equal("success", cjson.decode(res.body).items[1].metrics.statusSummary.status)
      assert.equal("success", server:run(id).metrics.statusSummary.status)
    end)

    it("finishes as failed with the given or default errors; by_source and by_flow first", function()
      local nested = { { code = "CONNECTOR-1001-500", message = "Error occurred at promotion activity.",
                         nestedErrors = { { code = "INGEST-1212-400", message = "Encountered 3 errors" } } } }
      local src = fake.bulk_run_id(4)
      server:outcomes{ after = 5, status = "success",
                       by_source = { [src] = { status = "failed", errors = nested } },
                       by_flow = { [FLOW] = { status = "failed" } } }
      local failed = retrigger(src)
      local default_failed = retrigger(RUN)         -- the enabled flow: by_flow
      local slow = retrigger(fake.bulk_run_id(5))   -- the default: 5 s
      local run = read(failed)
      assert.equal("failed", run.metrics.statusSummary.status)
      assert.same(nested, run.metrics.statusSummary.errors)
      assert.equal(0, run.metrics.recordSummary.outputRecordCount)
      assert.equal(run.metrics.durationSummary.startedAtUTC, run.metrics.durationSummary.completedAtUTC)
      run = read(default_failed)
      assert.equal("failed", run.metrics.statusSummary.status)
      assert.same({ { code = "CONNECTOR-2001-500",
                      message = "Something went wrong while reading data from the source." } },
                  run.metrics.statusSummary.errors)
      assert.equal("inProgress", read(slow).metrics.statusSummary.status)
      assert.same({ [BULK] = 1 }, server:stats().executing)
      -- a run that finished failed can be re-triggered in turn
      local again = retrigger(failed)
      assert.equal(failed, read(again).parentFlowRunId)
      -- {} turns outcomes off: runs made from now on stay inProgress
      assert.same({ on = false }, server:outcomes{})
      local stays = retrigger(fake.bulk_run_id(6))
      assert.equal("inProgress", read(stays).metrics.statusSummary.status)
    end)

    it("counts executing and max_executing per flow, for --max-active", function()
      server:outcomes{ after = 1, status = "success" }
      local curls = {}
      for i = 1, 4 do
        curls[i] = "curl -s --noproxy '*' --max-time 5 -X POST " .. CREDS .. " -o /dev/null '"
          .. server.url .. action(fake.bulk_run_id(10 + i)) .. "' &"
      end
      assert.is_true(sh(table.concat(curls, " ") .. " wait"))
      retrigger(fake.paging_run_id(1))
      local stats = server:stats()
      assert.same({ [BULK] = 4, [fake.paging_flow] = 1 }, stats.executing)
      assert.same({ [BULK] = 4, [fake.paging_flow] = 1 }, stats.max_executing)
      sleep(1.3)
      retrigger(fake.bulk_run_id(20))   -- the four have finished: one at a time now
      stats = server:stats()
      assert.same({ [BULK] = 1 }, stats.executing)
      assert.same({ [BULK] = 4, [fake.paging_flow] = 1 }, stats.max_executing)
      if math.type then assert.equal("integer", math.type(stats.max_executing[BULK])) end
    end)

    it("refuses malformed outcomes", function()
      for _, bad in ipairs({ { status = "partialSuccess" }, { after = -1 }, { colour = 1 },
                             { status = "success", errors = { { code = "X" } } },
                             { status = "failed", records = 3 }, { status = "failed", errors = {} },
                             { by_source = { [RUN] = { after = "soon" } } }, { by_flow = 5 } }) do
        local ok, err = pcall(server.outcomes, server, bad)
        assert.is_false(ok)
        assert.matches("400", tostring(err))
      end
    end)
  end)

  describe("IMS", function()
    local FORM = { ["Content-Type"] = "application/x-www-form-urlencoded" }

    local function token_request(fields, headers)
      local parts = {}
      for _, kv in ipairs(fields) do parts[#parts + 1] = kv[1] .. "=" .. esc(kv[2]) end
      local res = server:http{ method = "POST", path = "/ims/token/v3", headers = headers or FORM,
                               body = table.concat(parts, "&") }
      local ok, body = pcall(cjson.decode, res.body)
      return res.status, ok and body or res.body, res
    end
    local function good(overrides)
      overrides = overrides or {}
      local c = fake.ims_client
      local fields = {}
      for _, k in ipairs({ "grant_type", "client_id", "client_secret", "scope" }) do
        local v = overrides[k]
        if v == nil then
          v = ({ grant_type = "client_credentials", client_id = c.client_id,
                 client_secret = c.client_secret, scope = c.scopes })[k]
        end
        if v then fields[#fields + 1] = { k, v } end
      end
      return fields
    end
    local function runs_with(token)
      return server:http{ path = "/runs?limit=1", auth = true,
                          headers = { Authorization = "Bearer " .. token } }
    end

    it("issues a bearer token that the Flow Service then accepts", function()
      assert.equal(server.url, server.ims_url)
      server:clear_requests()
      local status, body, res = token_request(good())
      assert.equal(200, status)
      assert.equal("application/json", res.headers["content-type"])
      assert.equal("bearer", body.token_type)
      assert.equal(86399, body.expires_in)
      assert.is_string(body.access_token)
      assert.is_true(#body.access_token > 40)
      local _, again = token_request(good())
      assert.not_equal(body.access_token, again.access_token)
      assert.equal(200, runs_with(body.access_token).status)
      assert.equal(200, runs_with(again.access_token).status)
      assert.equal(401, runs_with(body.access_token .. "x").status)
      local log = server:requests()
      assert.equal(5, #log)   -- two token requests, three /runs
      assert.equal("/ims/token/v3", log[1].path)
      assert.equal("POST", log[1].method)
      assert.matches("client_secret=fake%-client%-secret", log[1].body)
      -- percent-escaped values decode; "+" in a form is a space
      assert.equal(200, (token_request(good{ scope = "openid, AdobeID" })))
    end)

    it("refuses a wrong client, grant type or scope with IMS error bodies", function()
      local cases = {
        { good{ client_secret = "wrong" }, 401, "invalid_client" },
        { good{ client_id = "other-client" }, 401, "invalid_client" },
        { good{ client_secret = false }, 401, "invalid_client" },
        { good{ grant_type = "authorization_code" }, 400, "unsupported_grant_type" },
        { good{ grant_type = false }, 400, "unsupported_grant_type" },
        { good{ scope = false }, 400, "invalid_scope" },
        { good{ scope = "" }, 400, "invalid_scope" },
      }
      for i, c in ipairs(cases) do
        local status, body, res = token_request(c[1])
        assert.equal(c[2], status, "case " .. i)
        assert.equal(c[3], body.error, "case " .. i)
        assert.is_string(body.error_description)
        assert.equal("application/json", res.headers["content-type"])
      end
      local _, body = token_request(good{ client_secret = "wrong" })
      assert.equal("invalid client_id or client_secret parameter", body.error_description)
      local status
      status, body = token_request(good(), { ["Content-Type"] = "application/json" })
      assert.equal(400, status)
      assert.equal("invalid_request", body.error)
      assert.equal(400, (token_request(good(), { ["Content-Type"] = "application/x-www-form-urlencodedx" })))
      assert.equal(200, (token_request(good(), { ["Content-Type"] = "Application/X-WWW-Form-Urlencoded; charset=UTF-8" })))
      -- no Flow Service gateway on IMS, but the gateway still guards /runs
      assert.equal(403, server:http{ path = "/runs" }.status)
    end)

    it("expires issued tokens on request and after expires_in", function()
      local _, t1 = token_request(good())
      assert.equal(200, runs_with(t1.access_token).status)
      assert.same({ ok = true, expired = 1 }, server:expire_tokens())
      local res = runs_with(t1.access_token)
      assert.equal(401, res.status)
      assert.equal("401013", cjson.decode(res.body).error_code)
      assert.equal(200, server:http{ path = "/runs?limit=1", auth = true }.status)   -- fixture token
      local _, t2 = token_request(good())
      assert.equal(200, runs_with(t2.access_token).status)

      assert.equal(1, server:ims{ expires_in = 1 }.expires_in)
      local _, t3 = token_request(good())
      assert.equal(1, t3.expires_in)
      assert.equal(200, runs_with(t3.access_token).status)
      os.execute("sleep 1")   -- the fake issued it before our clock started
      res = runs_with(t3.access_token)
      assert.equal(401, res.status)
      assert.equal("401013", cjson.decode(res.body).error_code)
      assert.equal(200, runs_with(t2.access_token).status)
      assert.has_error(function() server:ims{ expires_in = -1 } end)
      assert.has_error(function() server:ims{ lifetime = 5 } end)

      server:reset()   -- defaults back, issued tokens forgotten
      assert.equal(401, runs_with(t2.access_token).status)
      local _, t4 = token_request(good())
      assert.equal(86399, t4.expires_in)
    end)
  end)

  describe("bulk job support", function()
    local BULK = fake.bulk_flow
    local CREDS = "-H 'Authorization: Bearer fake-token' -H 'x-api-key: fake-api-key'"
      .. " -H 'x-gw-ims-org-id: FAKEORG@AdobeOrg' -H 'x-sandbox-name: prod'"
    local ETAG = '^"%x+%-0000%-0200%-0000%-%x+"$'

    local function post(id, headers)
      local res = server:http{ method = "POST", path = action(id), auth = true, headers = headers }
      local ok, body = pcall(cjson.decode, res.body)
      return res.status, ok and body or res.body, res
    end
    local function code(body)
      return type(body) == "table" and body.type and body.type:match("[^/]+$") or nil
    end
    local function count(...)
      local parts = { "count=true" }
      for _, expr in ipairs({ ... }) do parts[#parts + 1] = "property=" .. esc(expr) end
      local res = server:http{ path = "/runs?" .. table.concat(parts, "&"), auth = true }
      assert.equal(200, res.status)
      return cjson.decode(res.body).count
    end
    -- A re-trigger by curl in the background (a stand-in for a job); its pid.
    local function background_post(id)
      local p = io.popen("curl -s --noproxy '*' --max-time 10 -X POST " .. CREDS
                         .. " -o /dev/null '" .. server.url .. action(id) .. "' >/dev/null 2>&1 & echo $!")
      local pid = tonumber(p:read("*a"))
      p:close()
      return pid
    end
    local function wait_until(fn, timeout)
      local deadline = now() + (timeout or 5)
      while not fn() do
        if now() > deadline then return false end
        os.execute("sleep 0.02")
      end
      return true
    end
    local function idle() return server:stats().in_flight == 0 end

    it("has a bulk flow with deterministic runs of every kind", function()
      assert.equal("b0c1d2e3-4f50-4a61-9b72-c3d4e5f60718", BULK)
      assert.equal(BULK, fake.flows.bulk)
      assert.equal(BULK_RUNS, count("flowId==" .. BULK))
      local function n(status) return count("flowId==" .. BULK, "metrics.statusSummary.status==" .. status) end
      assert.equal(40, n("failed"))
      assert.equal(10, n("success"))
      assert.equal(3, n("partialSuccess"))
      assert.equal(2, n("inProgress"))
      assert.equal(5, count("flowId==" .. BULK, "metrics.statusSummary.status==success",
                            "metrics.recordSummary.outputRecordCount==0"))
      local total = 0
      for kind, gen in pairs(fake.bulk_runs) do
        total = total + gen.count
        for _, i in ipairs({ 1, gen.count }) do
          local id = fake.bulk_run_id(i, kind)
          assert.equal(string.format("%s-0000-4000-8000-%012d", gen.id_prefix, i), id)
          local run = assert(server:run(id), id)
          assert.equal(BULK, run.flowId)
          assert.equal(gen.status, run.metrics.statusSummary.status)
          assert.equal(gen.outputRecordCount, run.metrics.recordSummary.outputRecordCount)
          assert.equal(gen.start + (i - 1) * gen.step_ms, run.createdAt)
          assert.equal(string.format('"%s-0000-0200-0000-%012d"', gen.id_prefix, i), run.etag)
          assert.equal("scheduler", run.createdClient)
          assert.equal(kind == "inProgress", run.metrics.durationSummary.completedAtUTC == nil)
        end
      end
      assert.equal(BULK_RUNS, total)
      assert.equal(fake.bulk_run_id(1), fake.bulk_run_id(1, "failed"))
      assert.has_error(function() fake.bulk_run_id(1, "success") end)
      assert.has_error(function() fake.bulk_run_id(41) end)
      -- integers on the wire
      local res = server:http{ path = "/runs/" .. fake.bulk_run_id(1), auth = true }
      assert.matches('"createdAt":1766000000000[,}]', res.body)
      assert.matches('"startedAtUTC":1766000001500[,}]', res.body)
      -- what can be re-triggered, and what cannot
      for kind, gen in pairs(fake.bulk_runs) do
        local status, body = post(fake.bulk_run_id(gen.count, kind))
        assert.equal(gen.eligible and 200 or 400, status, kind)
        if not gen.eligible then assert.equal("FLOW-1387-400", code(body), kind) end
      end
    end)

    it("links a re-triggered run and its source, or not (linkage)", function()
      assert.same({ linkage = true, etag_changes = false, eligible_after_retrigger = true },
                  server:behaviour())
      local source = fake.bulk_run_id(1)
      local status, body = post(source)
      assert.equal(200, status)
      assert.equal(source, server:run(body.id).parentFlowRunId)
      assert.same({ body.id }, server:run(source).childFlowRunIds)
      -- an array on the wire even with one element
      local res = server:http{ path = "/runs/" .. source, auth = true }
      assert.matches('"childFlowRunIds":%["' .. body.id:gsub("%-", "%%-") .. '"%]', res.body)
      assert.equal(1, count("parentFlowRunId==" .. source))
      -- runs without children have no such key
      assert.not_matches("childFlowRunIds",
                         server:http{ path = "/runs/" .. fake.bulk_run_id(2), auth = true }.body)

      assert.same({ linkage = false, etag_changes = false, eligible_after_retrigger = true },
                  server:behaviour{ linkage = false })
      local other = fake.bulk_run_id(2)
      status, body = post(other)
      assert.equal(200, status)
      assert.is_nil(server:run(body.id).parentFlowRunId)
      assert.is_nil(server:run(other).childFlowRunIds)
      assert.not_matches("parentFlowRunId", server:http{ path = "/runs/" .. body.id, auth = true }.body)
      assert.same({ body.id }, { server:runs()[ALL_RUNS + 2].id })   -- it was created all the same
    end)

    it("gives the source a new etag on re-trigger, so the old If-Match gets 412 (etag_changes)", function()
      local source = fake.bulk_run_id(3)
      local etag0 = server:run(source).etag
      -- off by default: the etag stays and If-Match keeps matching
      assert.equal(200, (post(source, { ["If-Match"] = etag0 })))
      assert.equal(etag0, server:run(source).etag)
      assert.equal(200, (post(source, { ["If-Match"] = etag0 })))

      assert.is_true(server:behaviour{ etag_changes = true }.etag_changes)
      local status, body = post(source, { ["If-Match"] = etag0 })
      assert.equal(200, status)
      local etag1 = server:run(source).etag
      assert.matches(ETAG, etag1)
      assert.not_equal(etag0, etag1)
      assert.not_equal(body.etag, etag1)   -- the new run has an etag of its own
      status, body = post(source, { ["If-Match"] = etag0 })   -- the repeat after a crash
      assert.equal(412, status)
      assert.equal("FLOW-1404-412", code(body))
      assert.equal(ALL_RUNS + 3, #server:runs())                -- nothing created by the 412
      assert.equal(200, (post(source, { ["If-Match"] = etag1 })))
      assert.equal(200, (post(source)))                         -- no If-Match: no check

      server:reset()
      assert.is_false(server:behaviour().etag_changes)
    end)

    it("refuses a second re-trigger of the same run with eligible_after_retrigger = false", function()
      server:behaviour{ eligible_after_retrigger = false }
      local source, fresh = fake.bulk_run_id(4), fake.bulk_run_id(5)
      assert.equal(200, (post(source)))
      local status, body = post(source)
      assert.equal(400, status)
      assert.equal("FLOW-1387-400", code(body))
      assert.matches("already been re%-triggered", body.report["detailed-message"])
      assert.equal("failed", server:run(source).metrics.statusSummary.status)
      assert.equal(200, (post(fresh)))
      server:behaviour{ eligible_after_retrigger = true }
      assert.equal(200, (post(source)))
    end)

    it("sets behaviour until reset, refuses unknown switches, and takes defaults at start", function()
      assert.has_error(function() server:behaviour{ bogus = true } end)
      assert.has_error(function() server:behaviour{ linkage = "yes" } end)
      server:behaviour{ linkage = false, eligible_after_retrigger = false }
      assert.same({ linkage = false, etag_changes = false, eligible_after_retrigger = false },
                  server:behaviour{})
      server:reset()
      assert.same({ linkage = true, etag_changes = false, eligible_after_retrigger = true },
                  server:behaviour())

      assert.has_error(function() fake.start{ behaviour = { bogus = true } } end)
      local other = fake.start{ behaviour = { etag_changes = true, linkage = false } }
      local ok, err = pcall(function()
        local want = { linkage = false, etag_changes = true, eligible_after_retrigger = true }
        assert.same(want, other:behaviour())
        other:behaviour{ etag_changes = false }
        other:reset()
        assert.same(want, other:behaviour())
      end)
      other:stop()
      assert(ok, err)
    end)

    it("counts requests, and how many were in flight at once", function()
      local ZERO = { in_flight = 0, max_in_flight = 0, posts = 0, gets = 0, retriggers = 0, ims = 0,
                     by_source = {},
                     chaos = { drop_after = 0, status_502 = 0, throttle = 0, slow = 0, revoke = 0,
                               get_502 = 0 },
                     witness = { checked = 0, missing = 0, missing_runs = {}, errors = {} },
                     executing = {}, max_executing = {} }
      assert.same(ZERO, server:stats())
      server:scenario{ match = "^POST /runs/", delay = 0.3, times = 5 }
      local curls = {}
      for i = 1, 5 do
        curls[i] = "curl -s --noproxy '*' --max-time 5 -X POST " .. CREDS .. " -o /dev/null '"
          .. server.url .. action(fake.bulk_run_id(i)) .. "' &"
      end
      local t0 = now()
      assert.is_true(sh(table.concat(curls, " ") .. " wait"))
      assert.is_true(now() - t0 < 1.5)   -- side by side, not one after another
      local stats = server:stats()
      assert.is_true(stats.max_in_flight >= 5, "max_in_flight " .. stats.max_in_flight)
      assert.equal(0, stats.in_flight)
      assert.equal(5, stats.posts)
      assert.equal(5, stats.retriggers)
      assert.equal(0, stats.gets)
      if math.type then assert.equal("integer", math.type(stats.posts)) end   -- 5, not 5.0

      server:http{ path = "/runs/" .. RUN, auth = true }
      server:http{ path = "/runs/" .. RUN }                                   -- refused: counted
      server:http{ method = "POST", path = action(RUN_IN_PROGRESS), auth = true }   -- 400: counted
      server:http{ method = "POST", path = "/ims/token/v3", body = "grant_type=x",
                   headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
      server:runs()                                                           -- control: not
      stats = server:stats()
      assert.same({ in_flight = 0, max_in_flight = 5, posts = 6, gets = 2, retriggers = 5, ims = 1 },
                  { in_flight = stats.in_flight, max_in_flight = math.min(stats.max_in_flight, 5),
                    posts = stats.posts, gets = stats.gets, retriggers = stats.retriggers,
                    ims = stats.ims })
      for i = 1, 5 do assert.equal(1, stats.by_source[fake.bulk_run_id(i)]) end
      server:reset()
      assert.same(ZERO, server:stats())
    end)

    it("acts, then stalls the reply (act_then_delay), for a job killed before it hears back", function()
      local source = fake.bulk_run_id(6)
      server:scenario{ match = "^POST /runs/", act_then_delay = 0.6 }
      local pid = background_post(source)
      assert.is_true(server:wait_for_posts(1, 5))
      -- the new run exists while the reply is still pending
      local children = server:run(source).childFlowRunIds
      assert.equal(1, #children)
      local new = server:run(children[1])
      assert.equal(source, new.parentFlowRunId)
      assert.equal("fake-api-key", new.createdClient)
      local stats = server:stats()
      assert.equal(1, stats.in_flight)
      assert.equal(1, stats.retriggers)
      assert.is_true(alive(pid))
      sh("kill -KILL " .. pid)            -- the job dies without its answer
      assert.is_true(wait_until(idle, 3))
      assert.equal(ALL_RUNS + 1, #server:runs())

      -- the plain delay stalls before acting
      server:scenario{ match = "^POST /runs/", delay = 0.4 }
      background_post(source)   -- finishes on its own (curl --max-time)
      assert.is_true(server:wait_for_posts(2, 5))
      assert.equal(1, server:stats().retriggers)
      assert.equal(1, #server:run(source).childFlowRunIds)
      assert.is_true(wait_until(idle, 3))
      assert.equal(2, server:stats().retriggers)
      assert.equal(2, #server:run(source).childFlowRunIds)

      -- with a status, the canned reply follows the real action
      server:scenario{ act_then_delay = 0, status = 503 }
      local status, body = post(source)
      assert.equal(503, status)
      assert.equal("FLOW-1103-503", code(body))
      assert.equal(3, #server:run(source).childFlowRunIds)
      -- with drop = "after", the connection closes after acting
      server:scenario{ act_then_delay = 0, drop = "after" }
      local _, _, res = post(source)
      assert.equal(0, res.status)
      assert.equal(4, #server:run(source).childFlowRunIds)

      -- match and times apply as to any scenario
      server:clear_requests()
      server:scenario{ match = "^POST /runs/" .. source:gsub("%-", "%%-"), act_then_delay = 0.05,
                       times = 2 }
      assert.equal(200, (post(fake.bulk_run_id(7))))   -- no match
      for _ = 1, 3 do assert.equal(200, (post(source))) end
      local log = server:requests()
      assert.is_nil(log[1].scenario)
      assert.is_number(log[2].scenario)
      assert.equal(log[2].scenario, log[3].scenario)
      assert.is_nil(log[4].scenario)
      assert.has_error(function() server:scenario{ act_then_delay = -1 } end)
      assert.has_error(function() server:scenario{ act_then_delay = "1" } end)
    end)

    it("adds runs, as a scheduler or another user would", function()
      local t0 = os.time() * 1000 - 1000
      local run = server:add_run{ flowId = BULK }
      assert.matches(UUID4, run.id)
      assert.matches(ETAG, run.etag)
      assert.equal("success", run.metrics.statusSummary.status)
      assert.equal(0, run.metrics.recordSummary.outputRecordCount)
      assert.equal("scheduler", run.createdClient)
      assert.is_true(math.abs(run.createdAt / 1000 - os.time()) < 5)
      assert.same(run, server:run(run.id))
      assert.equal(ALL_RUNS + 1, #server:runs())

      local failed = server:add_run{ flowId = BULK, id = "injected-1", status = "failed",
                                     createdClient = "fake-client-id", createdAt = 1766000000123,
                                     errors = { { code = "X-1", message = "boom" } } }
      assert.equal("injected-1", failed.id)
      assert.equal(1766000000123, failed.createdAt)
      assert.equal("boom", failed.metrics.statusSummary.errors[1].message)
      assert.matches('"createdAt":1766000000123[,}]',
                     server:http{ path = "/runs/injected-1", auth = true }.body)
      assert.equal(41, count("flowId==" .. BULK, "metrics.statusSummary.status==failed"))
      assert.equal(200, (post("injected-1")))   -- as re-triggerable as any failed run

      local parent = fake.bulk_run_id(8)
      local child = server:add_run{ flowId = BULK, parentFlowRunId = parent,
                                    createdClient = "someone-else", status = "inProgress" }
      assert.same({ child.id }, server:run(parent).childFlowRunIds)
      assert.is_nil(child.metrics.durationSummary.completedAtUTC)

      -- the "runs created since t by this client" question a job asks after a crash
      assert.equal(1, count("flowId==" .. BULK, "createdClient==fake-api-key", "createdAt>=" .. t0))
      -- the injected runs created now, the re-trigger; not injected-1 (createdAt in the past)
      assert.equal(3, count("flowId==" .. BULK, "createdAt>=" .. t0))

      assert.has_error(function() server:add_run{ status = "failed" } end)          -- no flowId
      assert.has_error(function() server:add_run{ flowId = BULK, id = "injected-1" } end)
      assert.has_error(function() server:add_run{ flowId = BULK, etag = '"x"' } end)
      assert.has_error(function() server:add_run{ flowId = BULK, createdAt = 1.5 } end)
      server:reset()
      assert.is_nil(server:run("injected-1"))
      assert.equal(ALL_RUNS, #server:runs())
    end)

    it("waits for the Nth POST to arrive, or gives up after the timeout", function()
      local t0 = now()
      local ok, stats = server:wait_for_posts(1, 0.3)
      assert.is_false(ok)
      assert.equal(0, stats.posts)
      local waited = now() - t0
      assert.is_true(waited >= 0.3 and waited < 2, "waited " .. waited)

      server:scenario{ match = "^POST /runs/", delay = 0.5, times = 2 }
      local pids = { background_post(fake.bulk_run_id(9)), background_post(fake.bulk_run_id(10)) }
      assert.is_true(server:wait_for_posts(2, 5))
      stats = server:stats()
      assert.equal(2, stats.in_flight)
      assert.equal(0, stats.retriggers)      -- the delay stalls before acting
      for _, pid in ipairs(pids) do sh("kill -KILL " .. pid) end
      assert.is_true(wait_until(idle, 3))
      assert.equal(2, server:stats().retriggers)   -- the server acts all the same
    end)
  end)

  describe("chaos", function()
    local BULK_FAILED = 40   -- fake.bulk_run_id(1..40): failed, re-triggerable again and again

    local function post(id, headers, opts)
      local o = { method = "POST", path = action(id), auth = true, headers = headers }
      for k, v in pairs(opts or {}) do o[k] = v end
      return server:http(o)
    end
    local function children(id)
      return #(server:run(id).childFlowRunIds or {})
    end
    -- What a client sees of one POST: "ok", "drop", "502", "429" (or the status).
    local function outcome(res)
      if res.status == 0 then return res.curl_exit == 52 and "drop" or ("curl " .. res.curl_exit) end
      if res.status == 200 then return "ok" end
      return tostring(res.status)
    end
    -- n POSTs over the bulk flow's failed runs; their outcomes, in order.
    local function campaign(n, between)
      local seen = {}
      for i = 1, n do
        seen[i] = outcome(post(fake.bulk_run_id((i - 1) % BULK_FAILED + 1)))
        if between then between(i) end
      end
      return seen
    end
    local function tally(list)
      local t = {}
      for _, v in ipairs(list) do t[v] = (t[v] or 0) + 1 end
      return t
    end
    local function ims_token()
      local c = fake.ims_client
      local res = server:http{ method = "POST", path = "/ims/token/v3",
                               headers = { ["Content-Type"] = "application/x-www-form-urlencoded" },
                               body = "grant_type=client_credentials&client_id=" .. esc(c.client_id)
                                 .. "&client_secret=" .. esc(c.client_secret) .. "&scope=" .. esc(c.scopes) }
      assert.equal(200, res.status)
      return cjson.decode(res.body).access_token
    end

    it("is off by default; nil or {} turns it off, and so does reset", function()
      assert.same({ on = false }, server:chaos())
      assert.same(campaign(10), { "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok" })
      local stats = server:stats()
      assert.same({ drop_after = 0, status_502 = 0, throttle = 0, slow = 0, revoke = 0, get_502 = 0 },
                  stats.chaos)
      assert.equal(10, stats.retriggers)

      local settings = server:chaos{ seed = 5, drop_after = 1 }
      assert.same({ on = true, seed = 5, drop_after = 1, status_502 = 0, throttle = 0, slow = 0,
                    revoke = 0, get_502 = 0, retry_after = 1, throttle_burst = 0, slow_seconds = 3,
                    latency = 0 },
                  settings)
      assert.equal("drop", outcome(post(RUN)))
      assert.same({ on = false }, server:chaos{})
      assert.equal("ok", outcome(post(RUN)))
      assert.equal(0, server:stats().chaos.drop_after)   -- counts start again when set
      server:chaos{ drop_after = 1 }
      assert.is_number(server:chaos{ drop_after = 1 }.seed)   -- a seed from the clock, reported
      server:reset()
      assert.equal("ok", outcome(post(RUN)))
      assert.equal(0, server:stats().chaos.drop_after)
    end)

    it("drop_after creates the run, then closes without a reply byte", function()
      server:chaos{ drop_after = 1 }
      local source = fake.bulk_run_id(1)
      local res = post(source, { ["x-request-id"] = "drop-1" })
      assert.equal(0, res.status)
      assert.equal(52, res.curl_exit)   -- empty reply from server
      assert.equal("", res.body)
      assert.equal(1, children(source))
      local stats = server:stats()
      assert.equal(1, stats.retriggers)
      assert.equal(1, stats.by_source[source])
      assert.equal(1, stats.chaos.drop_after)
      -- only POSTs the service would accept: refusals and reads go on as usual
      assert.equal(400, post(RUN_IN_PROGRESS).status)
      assert.equal(403, server:http{ method = "POST", path = action(source) }.status)
      assert.equal(200, server:http{ path = "/runs/" .. source, auth = true }.status)
      assert.equal(1, server:stats().chaos.drop_after)
      -- an explicit scenario wins over chaos
      server:scenario{ status = 503 }
      assert.equal(503, post(source).status)
      assert.equal(1, children(source))
    end)

    it("status_502 creates the run, then answers a gateway 502", function()
      server:chaos{ status_502 = 1 }
      local source = fake.bulk_run_id(2)
      local res = post(source, { ["x-request-id"] = "r-502" })
      assert.equal(502, res.status)
      assert.equal("application/json", res.headers["content-type"])
      assert.equal("r-502", res.headers["x-request-id"])
      local body = cjson.decode(res.body)
      assert.equal("502000", body.error_code)
      assert.is_string(body.message)
      assert.equal(1, children(source))
      local stats = server:stats()
      assert.equal(1, stats.retriggers)
      assert.equal(1, stats.by_source[source])
      assert.equal(1, stats.chaos.status_502)
    end)

    it("throttle answers 429 with Retry-After and does not act; throttle_burst makes a storm", function()
      server:chaos{ throttle = 1, retry_after = 2 }
      local source = fake.bulk_run_id(3)
      local res = post(source)
      assert.equal(429, res.status)
      assert.equal("2", res.headers["retry-after"])
      assert.equal("429050", cjson.decode(res.body).error_code)
      assert.equal(0, children(source))
      local stats = server:stats()
      assert.equal(0, stats.retriggers)
      assert.is_nil(stats.by_source[source])
      assert.equal(1, stats.chaos.throttle)
      server:chaos{ throttle = 1 }
      assert.equal("1", post(source).headers["retry-after"])   -- the default

      -- Each drawn throttle brings throttle_burst more: runs of 429s come
      -- in whole blocks of 1 + burst (the last may be cut short).
      local function runs_of_429(seen)
        local lengths, n = {}, 0
        for i = 1, #seen + 1 do
          if seen[i] == "429" then n = n + 1
          elseif n > 0 then lengths[#lengths + 1] = n; n = 0 end
        end
        return lengths, seen[#seen] == "429"
      end
      server:chaos{ seed = 11, throttle = 0.25, throttle_burst = 3 }
      local seen = campaign(40)
      local lengths, cut = runs_of_429(seen)
      assert.is_true(#lengths >= 2, table.concat(seen, " "))
      for i, n in ipairs(lengths) do
        if not (cut and i == #lengths) then
          assert.equal(0, n % 4, table.concat(seen, " "))
        end
      end
      local t = tally(seen)
      stats = server:stats()
      assert.equal(t["429"], stats.chaos.throttle)
      assert.equal(t.ok, stats.retriggers)
      -- without a burst the same seed draws single 429s too
      server:chaos{ seed = 11, throttle = 0.25 }
      lengths = runs_of_429(campaign(40))
      local short = false
      for _, n in ipairs(lengths) do if n % 4 ~= 0 then short = true end end
      assert.is_true(short)
    end)

    it("slow creates the run, then stalls the reply past a client's timeout", function()
      server:chaos{ slow = 1, slow_seconds = 0.6 }
      local source = fake.bulk_run_id(4)
      local p = io.popen("curl -s --noproxy '*' --max-time 0.3 -o /dev/null -X POST"
        .. " -H 'Authorization: Bearer fake-token' -H 'x-api-key: fake-api-key'"
        .. " -H 'x-gw-ims-org-id: FAKEORG@AdobeOrg' -H 'x-sandbox-name: prod' '"
        .. server.url .. action(source) .. "'; echo $?")
      local exit_code = tonumber(p:read("*a"))
      p:close()
      assert.equal(28, exit_code)         -- timed out...
      assert.equal(1, children(source))   -- ...after the server acted
      local t0 = now()
      local res = post(source)
      assert.is_true(now() - t0 >= 0.6)
      assert.equal(200, res.status)
      assert.equal(cjson.decode(res.body).id, server:run(source).childFlowRunIds[2])
      assert.equal(2, server:stats().chaos.slow)
    end)

    it("latency: a POST without a fault acts at once, then answers after it", function()
      server:chaos{ latency = 0.4 }
      local source = fake.bulk_run_id(6)
      local p = io.popen("curl -s --noproxy '*' --max-time 0.2 -o /dev/null -X POST"
        .. " -H 'Authorization: Bearer fake-token' -H 'x-api-key: fake-api-key'"
        .. " -H 'x-gw-ims-org-id: FAKEORG@AdobeOrg' -H 'x-sandbox-name: prod' '"
        .. server.url .. action(source) .. "'; echo $?")
      local exit_code = tonumber(p:read("*a"))
      p:close()
      assert.equal(28, exit_code)         -- no answer yet...
      assert.equal(1, children(source))   -- ...but acted
      local t0 = now()
      assert.equal(200, post(source).status)
      assert.is_true(now() - t0 >= 0.4)
      assert.same({ drop_after = 0, status_502 = 0, throttle = 0, slow = 0, revoke = 0, get_502 = 0 },
                  server:stats().chaos) -- latency is not a fault
    end)

    it("revoke acts and replies, then expires every IMS token issued so far", function()
      local token = ims_token()
      local with_token = { Authorization = "Bearer " .. token }
      assert.equal(200, server:http{ path = "/runs?limit=1", auth = true, headers = with_token }.status)
      server:chaos{ revoke = 1 }
      local source = fake.bulk_run_id(5)
      local res = post(source, with_token)
      assert.equal(200, res.status)
      assert.equal(1, children(source))
      res = server:http{ path = "/runs?limit=1", auth = true, headers = with_token }
      assert.equal(401, res.status)
      assert.equal("401013", cjson.decode(res.body).error_code)
      res = post(source, with_token)   -- refused by the gateway: no fault, no run
      assert.equal(401, res.status)
      assert.equal(1, children(source))
      assert.equal(200, server:http{ path = "/runs?limit=1", auth = true }.status)   -- fixture token
      local fresh = ims_token()
      assert.equal(200, server:http{ path = "/runs?limit=1", auth = true,
                                     headers = { Authorization = "Bearer " .. fresh } }.status)
      assert.equal(1, server:stats().chaos.revoke)
    end)

    it("get_502 answers reads with 502 and does nothing", function()
      server:chaos{ get_502 = 1 }
      local res = server:http{ path = "/runs?limit=1", auth = true }
      assert.equal(502, res.status)
      assert.equal("502000", cjson.decode(res.body).error_code)
      assert.equal(502, server:http{ path = "/runs/" .. RUN, auth = true }.status)
      assert.equal(200, server:http{ path = "/flows", auth = true }.status)   -- not a read of runs
      assert.equal(200, post(RUN).status)                                     -- POSTs untouched
      local stats = server:stats()
      assert.equal(2, stats.chaos.get_502)
      assert.equal(3, stats.gets)
      server:chaos{ seed = 3, get_502 = 0.5 }
      local statuses = {}
      for i = 1, 20 do statuses[i] = server:http{ path = "/runs/" .. RUN, auth = true }.status end
      local t = tally(statuses)
      assert.is_true(t[200] > 0 and t[502] > 0)
      assert.equal(t[502], server:stats().chaos.get_502)
    end)

    it("reproduces the fault sequence from the seed, reads aside; another seed gives another", function()
      local mix = { drop_after = 0.15, status_502 = 0.15, throttle = 0.15, revoke = 0.1 }
      local function with_seed(seed, extra)
        local t = { seed = seed }
        for k, v in pairs(mix) do t[k] = v end
        for k, v in pairs(extra or {}) do t[k] = v end
        return t
      end
      server:chaos(with_seed(42))
      local first = campaign(50)
      local t = tally(first)
      assert.is_true(t.drop > 0 and t["502"] > 0 and t["429"] > 0 and t.ok > 0, table.concat(first, " "))
      -- every run an act fault made counts, by source too
      local stats = server:stats()
      assert.equal(t.drop + t["502"] + t.ok, stats.retriggers)
      local by_source = 0
      for _, n in pairs(stats.by_source) do by_source = by_source + n end
      assert.equal(stats.retriggers, by_source)
      assert.equal(ALL_RUNS + stats.retriggers, #server:runs())
      assert.equal(t.drop, stats.chaos.drop_after)
      assert.equal(t["502"], stats.chaos.status_502)
      assert.equal(t["429"], stats.chaos.throttle)
      assert.is_true(stats.chaos.revoke > 0)   -- among the oks: revoke replies normally

      server:reset()
      server:chaos(with_seed(42))
      assert.same(first, campaign(50))

      -- reads, failing or not, and refused POSTs draw nothing from the POST faults
      server:reset()
      server:chaos(with_seed(42, { get_502 = 0.5 }))
      assert.same(first, campaign(50, function(i)
        server:http{ path = "/runs/" .. RUN, auth = true }
        if i % 5 == 0 then post(RUN_IN_PROGRESS) end
      end))
      assert.is_true(server:stats().chaos.get_502 > 0)

      server:reset()
      server:chaos(with_seed(43))
      assert.not_same(first, campaign(50))
    end)

    it("refuses malformed settings", function()
      local bad = {
        { bogus = 1 }, { drop_after = 1.5 }, { throttle = -0.1 }, { get_502 = 2 },
        { slow = "0.5" }, { seed = 1.5 }, { seed = "x" }, { seed = 1e15 },
        { drop_after = 0.6, status_502 = 0.5 },   -- more than 1 in all
        { throttle_burst = -1 }, { throttle_burst = 1.5 }, { retry_after = 0.5 },
        { slow_seconds = -1 },
      }
      for _, t in ipairs(bad) do
        assert.has_error(function() server:chaos(t) end, nil, cjson.encode(t))
      end
      assert.equal(400, server:http{ method = "POST", path = "/_fake/chaos", body = "[1" }.status)
      assert.equal(400, server:http{ method = "POST", path = "/_fake/chaos", body = "3" }.status)
      -- the POST faults may add up to exactly 1
      assert.is_true(server:chaos{ drop_after = 0.5, status_502 = 0.25, throttle = 0.125,
                                   slow = 0.0625, revoke = 0.0625, get_502 = 1 }.on)
      assert.same({ on = false }, server:chaos())   -- a refused setting changed nothing else
    end)
  end)

  describe("journal witness", function()
    local dir

    before_each(function()
      dir = server.prefix .. "/journals"
      assert.is_true(sh("rm -rf '" .. dir .. "' && mkdir -p '" .. dir .. "'"))
    end)

    local function write(path, text, mode)
      local f = assert(io.open(path, mode or "wb"))
      f:write(text)
      f:close()
    end
    local function line(run, state, request_id)
      return cjson.encode({ run = run, state = state, request_id = request_id, time = 1 }) .. "\n"
    end
    local function post(id, request_id)
      local headers = request_id and { ["x-request-id"] = request_id } or nil
      return server:http{ method = "POST", path = action(id), auth = true, headers = headers }.status
    end
    local function witness() return server:stats().witness end

    it("counts POSTs whose pending line is there, and lists those whose line is not", function()
      local j1, j2 = dir .. "/job-1.jsonl", dir .. "/job-2.jsonl"
      write(j1, line(RUN, "pending", "r-1") .. line(RUN, "done", "r-2")
                .. line(RUN_SUCCESS_EMPTY, "pending", "r-3") .. '{"run":"' .. RUN .. '","sta')
      assert.is_true(sh("chmod 600 '" .. j1 .. "'"))   -- as the journal is
      assert.same({ journals = { j1, j2 } }, server:witness{ j1, j2 })   -- j2: not yet there

      assert.equal(200, post(RUN, "r-1"))                   -- pending: present
      assert.equal(200, post(RUN, "r-2"))                   -- only a done line
      assert.equal(200, post(RUN, "r-3"))                   -- another run's request id
      assert.equal(200, post(RUN))                          -- no request id at all
      assert.equal(200, post(RUN_SUCCESS_EMPTY:gsub("%-", "%%2D"), "r-3"))   -- escaped id: present
      assert.equal(400, post(RUN_IN_PROGRESS, "r-4"))       -- refused, but sent all the same
      local w = witness()
      assert.equal(6, w.checked)
      assert.equal(4, w.missing)
      assert.same({ { run = RUN, request_id = "r-2" }, { run = RUN, request_id = "r-3" },
                    { run = RUN, request_id = cjson.null },
                    { run = RUN_IN_PROGRESS, request_id = "r-4" } }, w.missing_runs)
      assert.same({}, w.errors)

      -- the torn line stays torn; lines appended after it are read
      write(j1, "\n" .. line(RUN, "pending", "r-5"), "ab")
      -- a file that appears later, its last line not yet ended
      write(j2, line(RUN_IN_PROGRESS, "pending", "r-6"):sub(1, -2))
      assert.equal(200, post(RUN, "r-5"))
      assert.equal(400, post(RUN_IN_PROGRESS, "r-6"))
      assert.equal(200, post(RUN, "r-1"))   -- still known from the first read
      w = witness()
      assert.equal(9, w.checked)
      assert.equal(4, w.missing)

      -- a journal replaced by a shorter one is read again from the start
      write(j1, line(RUN, "pending", "r-7"))
      assert.equal(200, post(RUN, "r-1"))
      assert.equal(200, post(RUN, "r-7"))
      w = witness()
      assert.equal(11, w.checked)
      assert.equal(5, w.missing)
      assert.same({ run = RUN, request_id = "r-1" }, w.missing_runs[5])

      -- the raw stats say [] for empty lists, and settle as integers here
      server:witness{ j1 }
      local res = server:http{ path = "/_fake/stats" }
      assert.matches('"witness":{"checked":0,"missing":0,"missing_runs":%[%],"errors":%[%]}', res.body)
      if math.type then assert.equal("integer", math.type(witness().checked)) end
    end)

    it("checks every listed journal and keeps at most 50 missing runs", function()
      local a, b = dir .. "/a.jsonl", dir .. "/b.jsonl"
      write(a, line(RUN, "pending", "in-a"))
      write(b, "not json\n" .. line(RUN, "pending", "in-b"))
      server:witness{ a, b }
      assert.equal(200, post(RUN, "in-a"))
      assert.equal(200, post(RUN, "in-b"))
      for i = 1, 52 do assert.equal(200, post(fake.bulk_run_id((i - 1) % 40 + 1), "none-" .. i)) end
      local w = witness()
      assert.equal(54, w.checked)
      assert.equal(52, w.missing)
      assert.equal(50, #w.missing_runs)
      assert.same({ run = fake.bulk_run_id(1), request_id = "none-1" }, w.missing_runs[1])
    end)

    it("is off by default, off with nil or {}, and off after reset", function()
      local j = dir .. "/j.jsonl"
      write(j, line(RUN, "pending", "r-1"))
      post(RUN, "r-1")
      assert.equal(0, witness().checked)
      server:witness{ j }
      post(RUN, "r-1")
      post(RUN, "other")
      assert.same({ checked = 2, missing = 1, missing_runs = { { run = RUN, request_id = "other" } },
                    errors = {} }, witness())
      assert.same({ journals = {} }, server:witness())
      post(RUN, "other")
      assert.equal(0, witness().checked)
      server:witness{ j }
      server:reset()
      post(RUN, "other")
      assert.equal(0, witness().checked)
      assert.same({ journals = {} }, server:witness{})
      -- relative paths are made absolute by the helper; the endpoint wants them absolute
      local rel = server:witness{ "spec/x.jsonl" }
      assert.matches("^/.+/spec/x%.jsonl$", rel.journals[1])
      local function raw(body)
        return server:http{ method = "POST", path = "/_fake/witness", body = body }.status
      end
      assert.equal(400, raw('{"journals":["relative.jsonl"]}'))
      assert.equal(400, raw('{"journals":"/a"}'))
      assert.equal(400, raw('{"journals":[1]}'))
      assert.equal(400, raw('{"files":["/a"]}'))
      assert.equal(400, raw('nope'))
      assert.equal(200, raw('{"journals":["/a"]}'))
    end)

    it("reports a journal it cannot read; a missing one just has no lines", function()
      local unreadable = dir .. "/unreadable.jsonl"
      assert.is_true(sh("mkdir -p '" .. unreadable .. "'"))   -- a directory: opens, reads fail
      local gone, good = dir .. "/gone/x.jsonl", dir .. "/good.jsonl"
      write(good, line(RUN, "pending", "r-2"))
      server:witness{ gone, unreadable, good }
      assert.equal(200, post(RUN, "r-1"))
      assert.equal(200, post(RUN, "r-2"))
      local w = witness()
      assert.equal(2, w.checked)
      assert.equal(1, w.missing)
      assert.equal(1, #w.errors)   -- once, however often it failed
      assert.matches("unreadable%.jsonl: ", w.errors[1])
    end)
  end)

  describe("I/O Events emitter", function()
    local signing = require "spec.support.signing"
    local keys
    local KEY1, KEY2 = "/prod/keys/pub-key-e1.pem", "/prod/keys/pub-key-e2.pem"
    setup(function()
      keys = signing.make()
      server:keys { [KEY1] = keys.public, [KEY2] = keys.other_public }
      server:signing { key1 = { path = KEY1, private_key = keys.private_path },
                       key2 = { path = KEY2, private_key = keys.other_private_path } }
    end)
    teardown(function() signing.remove(keys) end)

    local function hook_posts()
      local list = {}
      for _, r in ipairs(server:requests()) do
        if r.method == "POST" and r.path == "/hook" then list[#list + 1] = r end
      end
      return list
    end
    -- openssl's verdict on a base64 signature of body by the PEM public key
    local function verified(body, b64, pem)
      local dir = keys.dir
      local f = assert(io.open(dir .. "/v.body", "wb")) f:write(body) f:close()
      f = assert(io.open(dir .. "/v.b64", "wb")) f:write(b64) f:close()
      f = assert(io.open(dir .. "/v.pem", "wb")) f:write(pem) f:close()
      return sh(("openssl base64 -d -A -in %s/v.b64 -out %s/v.sig && openssl dgst -sha256 -verify %s/v.pem"
        .. " -signature %s/v.sig %s/v.body >/dev/null 2>&1"):format(dir, dir, dir, dir, dir))
    end

    it("POSTs a Flow Run Failed event built from the run, signed over the raw body", function()
      server:scenario { match = "^POST /hook", status = 200, body = "ok", times = 0 }
      local ids = server:emit { url = server.url .. "/hook", recipient = "client-1",
                                events = { { run = RUN, event_id = "ev-1" } } }
      assert.same({ 1 }, ids)
      local ok, d = server:wait_deliveries(ids, 10)
      assert.is_true(ok)
      assert.equal("delivered", d[1].outcome)
      assert.equal(200, d[1].status)
      assert.equal(1, #d[1].attempts)
      assert.is_true(d[1].latency >= 0 and d[1].latency < 5)
      assert.equal("ok", d[1].attempts[1].body)
      local posts = hook_posts()
      assert.equal(1, #posts)
      local r = posts[1]
      assert.equal("ev-1", r.headers["x-adobe-event-id"])
      assert.equal(KEY1, r.headers["x-adobe-public-key1-path"])
      assert.equal(KEY2, r.headers["x-adobe-public-key2-path"])
      assert.equal("application/json", r.headers["content-type"])
      local event = cjson.decode(r.body)
      assert.equal("ev-1", event.event_id)
      assert.equal("client-1", event.recipient_client_id)
      assert.equal("sources_flow_run_failed", event.event.header._adobeio.eventCode)
      assert.equal("platform_notifications", event.event.header._adobeio.providerMetadata)
      assert.equal(RUN, event.event.body.id)
      assert.equal(FLOW, event.event.body.flowId)
      assert.equal("failed", event.event.body.metrics.statusSummary.status)
      assert.is_true(verified(r.body, r.headers["x-adobe-digital-signature-1"], keys.public))
      assert.is_true(verified(r.body, r.headers["x-adobe-digital-signature-2"], keys.other_public))
      assert.is_false(verified(r.body, r.headers["x-adobe-digital-signature-1"], keys.other_public))
    end)

    it("tampers when asked: another body signed, headers replaced or left out, the meta shape", function()
      server:scenario { match = "^POST /hook", status = 200, times = 0 }
      local ok = server:wait_deliveries(server:emit { url = server.url .. "/hook", concurrency = 1, events = {
        { run = RUN, bad_signature = true },
        { run = RUN, headers = { ["x-adobe-public-key1-path"] = "/x.pem", ["x-adobe-digital-signature-2"] = false } },
        { run = RUN, meta = true },
      } }, 10)
      assert.is_true(ok)
      local posts = hook_posts()
      assert.equal(3, #posts)
      assert.is_false(verified(posts[1].body, posts[1].headers["x-adobe-digital-signature-1"], keys.public))
      assert.equal("/x.pem", posts[2].headers["x-adobe-public-key1-path"])
      assert.is_nil(posts[2].headers["x-adobe-digital-signature-2"])
      assert.is_true(verified(posts[2].body, posts[2].headers["x-adobe-digital-signature-1"], keys.public))
      local flat = cjson.decode(posts[3].body).event
      assert.equal(RUN, flat.id)
      assert.equal("sources_flow_run_failure", flat._eventNotificationMeta.type)
    end)

    it("redelivers after a 503, a 429 or no answer in time, and stops at a 4xx or the last retry", function()
      server:scenario { match = "^POST /hook", status = 503, times = 1 }
      server:scenario { match = "^POST /hook", status = 429, times = 1 }
      server:scenario { match = "^POST /hook", delay = 1.5, status = 200, times = 1 }
      server:scenario { match = "^POST /hook", status = 200, times = 1 }
      local ok, d = server:wait_deliveries(server:emit { url = server.url .. "/hook", timeout = 0.5,
        retry_intervals = { 0.1, 0.1, 0.1, 0.1 }, events = { { run = RUN } } }, 15)
      assert.is_true(ok)
      local statuses = {}
      for i, a in ipairs(d[1].attempts) do statuses[i] = a.status end
      assert.same({ 503, 429, 0, 200 }, statuses)
      assert.matches("timeout", d[1].attempts[3].error)
      assert.equal("delivered", d[1].outcome)
      -- a 401 is an answer: not retried
      server:scenario { match = "^POST /hook", status = 401, times = 1 }
      ok, d = server:wait_deliveries(server:emit { url = server.url .. "/hook",
        retry_intervals = { 0.1 }, events = { { run = RUN } } }, 10)
      assert.is_true(ok)
      assert.equal("refused", d[1].outcome)
      assert.equal(1, #d[1].attempts)
      -- 503 each time: the last retry, then given up
      server:scenario { match = "^POST /hook", status = 503, times = 0 }
      ok, d = server:wait_deliveries(server:emit { url = server.url .. "/hook",
        retry_intervals = { 0.1, 0.1 }, events = { { run = RUN } } }, 10)
      assert.is_true(ok)
      assert.equal("gave up", d[1].outcome)
      assert.equal(3, #d[1].attempts)
    end)

    it("emits the failure event of a re-triggered run that fails, to the registered webhook", function()
      server:scenario { match = "^POST /hook", status = 200, times = 0 }
      server:outcomes { after = 0.3, status = "failed" }
      server:webhook { url = server.url .. "/hook", recipient = "client-2" }
      local r = server:http { method = "POST", path = action(RUN), auth = true,
                              headers = { ["If-Match"] = server:run(RUN).etag } }
      assert.equal(200, r.status, r.body)
      local new_id = cjson.decode(r.body).id
      local deadline = os.time() + 10
      while #server:deliveries() == 0 and os.time() < deadline do sh("sleep 0.05") end
      local ok, d = server:wait_deliveries({ 1 }, 10)
      assert.is_true(ok)
      assert.equal(new_id, d[1].run)
      assert.equal("delivered", d[1].outcome)
      local event = cjson.decode(hook_posts()[1].body)
      assert.equal(new_id, event.event.body.id)
      assert.equal(RUN, event.event.body.parentFlowRunId)
      assert.equal("failed", event.event.body.metrics.statusSummary.status)
      assert.equal("client-2", event.recipient_client_id)
      -- a success emits nothing; reset forgets the webhook
      server:outcomes { after = 0, status = "success" }
      server:reset()
      assert.same({}, server:deliveries())
    end)

    it("refuses what it cannot send", function()
      local function code(body) return (server:http { method = "POST", path = "/_fake/emit", body = body }).status end
      assert.equal(400, code('{"url": "https://x.example/hook", "events": [{"run": "' .. RUN .. '"}]}'))
      assert.equal(400, code('{"url": "' .. server.url .. '/hook", "events": []}'))
      assert.equal(404, code('{"url": "' .. server.url .. '/hook", "events": [{"run": "nope"}]}'))
      assert.equal(400, code('{"url": "' .. server.url .. '/hook", "events": [{"run": "' .. RUN .. '", "x": 1}]}'))
      assert.equal(400, code('{"url": "' .. server.url .. '/hook", "timeout": 0, "events": [{"run": "' .. RUN .. '"}]}'))
      assert.equal(400, (server:http { method = "POST", path = "/_fake/signing",
        body = '{"key1": {"path": "/k.pem", "private_key": "/nonexistent"}, "key2": {}}' }).status)
    end)
  end)

  describe("request log", function()
    it("records requests as received, but not control requests", function()
      server:clear_requests()
      server:http{ method = "POST", path = action(RUN:gsub("%-", "%%2D"), "re-trigger") .. "&x=1&x=2",
                   auth = true, body = '{"a":1}',
                   headers = { ["Content-Type"] = "application/json", ["X-Request-Id"] = "r-9" } }
      server:http{ path = "/_fake/health" }
      server:runs()
      local log = server:requests()
      assert.equal(1, #log)
      local r = log[1]
      assert.equal("POST", r.method)
      assert.equal("/runs/" .. RUN:gsub("%-", "%%2D") .. "/action?op=re-trigger&x=1&x=2", r.uri)
      assert.equal("/runs/" .. RUN:gsub("%-", "%%2D") .. "/action", r.path)
      assert.same({ op = "re-trigger", x = { "1", "2" } }, r.args)
      assert.equal("Bearer fake-token", r.headers["authorization"])
      assert.equal("r-9", r.headers["x-request-id"])
      assert.matches("\r\nX%-Request%-Id: r%-9\r\n", r.raw_header)
      assert.equal('{"a":1}', r.body)
      assert.equal(1.1, r.http_version)
      assert.is_false(r.tls)
      assert.is_number(r.connection)
      assert.equal(1, r.connection_requests)
      assert.is_true(math.abs(r.time - os.time()) < 5)

      server:clear_requests()
      assert.same({}, server:requests())
    end)

    it("keeps repeated headers as arrays and records refused requests", function()
      server:clear_requests()
      assert.is_true(sh("curl -s --noproxy '*' -o /dev/null -H 'X-Dup: a' -H 'X-Dup: b' '"
                        .. server.url .. "/runs'"))
      local r = server:requests()[1]
      assert.same({ "a", "b" }, r.headers["x-dup"])
      assert.equal("", r.body)
    end)
  end)

  describe("handler errors", function()
    it("answer 500 with a JSON problem document", function()
      -- a run whose metrics is a number makes the handler fail on purpose
      local dir = server.prefix .. "/brokenfixture"
      local f = assert(io.open("fake/runs.json")):read("*a")
      local doc = cjson.decode(f)
      doc.runs[1].metrics = 5
      sh("mkdir -p '" .. dir .. "'")
      local out = assert(io.open(dir .. "/runs.json", "w"))
      out:write(cjson.encode(doc))
      out:close()
      local broken = fake.start{ fixture = dir .. "/runs.json" }
      local ok, err = pcall(function()
        local res = broken:http{ method = "POST", path = action(RUN), auth = true }
        assert.equal(500, res.status)
        assert.equal("application/json", res.headers["content-type"])
        assert.matches("/FLOW%-1102%-500$", cjson.decode(res.body).type)
      end)
      broken:stop()
      assert(ok, err)
    end)
  end)

  describe("TLS", function()
    local tls_server, certdir

    setup(function()
      certdir = server.prefix .. "/certs"
      assert.is_true(sh("mkdir -p '" .. certdir .. "' && openssl req -x509 -newkey ec"
        .. " -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost"
        .. " -addext subjectAltName=DNS:localhost,IP:127.0.0.1"
        .. " -keyout '" .. certdir .. "/server.key' -out '" .. certdir .. "/server.pem'"
        .. " >/dev/null 2>&1"))
      tls_server = fake.start{ tls = { cert = certdir .. "/server.pem", key = certdir .. "/server.key",
                                       http2 = true } }
    end)

    teardown(function()
      if tls_server then tls_server:stop() end
    end)

    it("serves the same API over TLS, HTTP/1.1 and HTTP/2", function()
      assert.matches("^https://127%.0%.0%.1:%d+$", tls_server.tls_url)
      assert.matches("^https://localhost:%d+$", tls_server.tls_localhost_url)
      local cacert = certdir .. "/server.pem"
      local res = tls_server:http{ method = "POST", path = action(RUN), auth = true,
                                   tls = true, cacert = cacert }
      assert.equal(200, res.status)
      res = tls_server:http{ method = "POST", path = action(RUN), auth = true,
                             tls = true, cacert = cacert, http2 = true }
      assert.equal(200, res.status)
      local log = tls_server:requests()
      assert.is_true(log[1].tls)
      assert.equal(1.1, log[1].http_version)
      assert.equal(2, log[2].http_version)
      assert.is_nil(log[2].raw_header)   -- nginx cannot give it for HTTP/2
    end)

    it("truncates and closes over TLS too", function()
      local cacert = certdir .. "/server.pem"
      tls_server:scenario{ truncate = true }
      local res = tls_server:http{ method = "POST", path = action(RUN), auth = true,
                                   tls = true, cacert = cacert }
      assert.equal(18, res.curl_exit)
      tls_server:scenario{ close = true }
      res = tls_server:http{ method = "POST", path = action(RUN), auth = true,
                             tls = true, cacert = cacert }
      assert.equal(200, res.status)
      assert.equal("close", res.headers["connection"])
      tls_server:scenario{ truncate = true }
      res = tls_server:http{ method = "POST", path = action(RUN), auth = true,
                             tls = true, cacert = cacert, http2 = true }
      assert.not_equal(0, res.curl_exit)
    end)
  end)

  describe("stop", function()
    it("stops nginx by pid, removes the prefix, and is idempotent", function()
      local other = fake.start()
      local pid, worker, prefix = other.pid, other.worker_pid, other.prefix
      assert.is_true(alive(pid))
      other:stop()
      assert.is_false(alive(pid))
      assert.is_false(alive(worker))
      assert.is_false(dir_exists(prefix))
      other:stop()
      assert.has_error(function() other:runs() end)
    end)
  end)
end)
