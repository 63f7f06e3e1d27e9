-- flowservice.retrigger against the fake Flow Service, over loopback HTTP.
local flowservice = require "flowservice"
local core = require "flowservice.core"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local runs = h.runs
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

describe("flowservice.retrigger", function()
  local server

  local function opts(extra) return h.opts(server.url, extra) end

  local function only_request()
    local got = server:requests()
    assert.equal(1, #got)
    return got[1]
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function() server:reset() end)

  describe("on success", function()
    it("re-triggers a failed run into a new run and returns its id and etag", function()
      local run, err = flowservice.retrigger(runs.failed, opts())
      assert.is_nil(err)
      assert.same({ "etag", "id" }, (function()
        local keys = {}
        for k in pairs(run) do keys[#keys + 1] = k end
        table.sort(keys)
        return keys
      end)())
      assert.not_equal(runs.failed, run.id)
      assert.matches('^".+"$', run.etag) -- the etag keeps its literal quotes
      local created = server:run(run.id)
      assert.is_table(created)
      assert.equal(server:run(runs.failed).flowId, created.flowId)
      assert.equal(run.etag, created.etag)
    end)

    it("accepts a successful run with zero ingested records, and status in any case", function()
      assert.is_table((flowservice.retrigger(runs.success_no_records, opts())))
      assert.is_table((flowservice.retrigger(runs.failed_mixed_case, opts())))
    end)

    it("sends exactly the API sheet's request", function()
      assert.is_table((flowservice.retrigger(runs.failed, opts())))
      local req = only_request()
      assert.equal("POST", req.method)
      assert.equal("/runs/" .. runs.failed .. "/action?op=re-trigger", req.uri)
      assert.equal("", req.body or "")
      local hd = req.headers
      assert.equal("Bearer fake-token", hd["authorization"])
      assert.equal("fake-api-key", hd["x-api-key"])
      assert.equal("FAKEORG@AdobeOrg", hd["x-gw-ims-org-id"])
      assert.equal("prod", hd["x-sandbox-name"])
      assert.equal("application/json", hd["content-type"])
      assert.equal("application/json", hd["accept"])
      assert.equal("0", hd["content-length"])
      assert.matches(UUID, hd["x-request-id"])
      assert.matches("^lua%-flowservice/" .. flowservice._VERSION:gsub("%p", "%%%0")
        .. " libcurl/%d+%.%d+%.%d+$", hd["user-agent"])
      assert.is_nil(hd["if-match"])
      assert.is_nil(hd["expect"])
      -- nothing else: host, the nine above, content-length
      local names = {}
      for name in pairs(hd) do names[#names + 1] = name end
      table.sort(names)
      assert.same({ "accept", "authorization", "content-length", "content-type", "host",
        "user-agent", "x-api-key", "x-gw-ims-org-id", "x-request-id", "x-sandbox-name" }, names)
    end)

    it("defaults the sandbox to prod and the base URL to Adobe's", function()
      local o = opts()
      o.sandbox = nil
      assert.is_table((flowservice.retrigger(runs.failed, o)))
      assert.equal("prod", only_request().headers["x-sandbox-name"])
      assert.equal("https://platform.adobe.io/data/foundation/flowservice",
        flowservice.defaults.base_url)
      assert.equal("re-trigger", flowservice.defaults.op)
      assert.equal(60, flowservice.defaults.timeout)
      assert.equal(10, flowservice.defaults.connect_timeout)
      assert.equal(8 * 1024 * 1024, flowservice.defaults.max_body)
    end)

    it("sends if_match, request_id, user_agent, sandbox and extra headers as given", function()
      local etag = server:run(runs.failed).etag
      assert.is_table((flowservice.retrigger(runs.failed, opts {
        if_match = etag, request_id = "trace-123", user_agent = "nightly-job/2",
        sandbox = "dev", headers = { ["X-Custom"] = "one", ["x-empty"] = "" },
      })))
      local hd = only_request().headers
      assert.equal(etag, hd["if-match"])
      assert.equal("trace-123", hd["x-request-id"])
      assert.equal("nightly-job/2", hd["user-agent"])
      assert.equal("dev", hd["x-sandbox-name"])
      assert.equal("one", hd["x-custom"])
      assert.equal("", hd["x-empty"])
    end)

    it("makes a fresh request id for an empty or blank request_id", function()
      for _, blank in ipairs { "", "  ", "\t" } do
        server:reset()
        assert.is_table((flowservice.retrigger(runs.failed, opts { request_id = blank })))
        assert.matches(UUID, only_request().headers["x-request-id"])
      end
    end)

    it("lets headers replace the non-identity defaults without duplicating them", function()
      assert.is_table((flowservice.retrigger(runs.failed, opts {
        headers = { ["content-type"] = "application/json; charset=utf-8", ["X-Request-Id"] = "mine" },
      })))
      local req = only_request()
      assert.equal("application/json; charset=utf-8", req.headers["content-type"])
      assert.equal("mine", req.headers["x-request-id"])
      local _, n = req.raw_header:lower():gsub("\ncontent%-type:", "")
      assert.equal(1, n)
    end)

    it("gives every call its own x-request-id", function()
      flowservice.retrigger(runs.failed, opts())
      flowservice.retrigger(runs.failed, opts())
      local got = server:requests()
      assert.equal(2, #got)
      assert.not_equal(got[1].headers["x-request-id"], got[2].headers["x-request-id"])
    end)

    it("sends another op when asked", function()
      local run, err = flowservice.retrigger(runs.failed, opts { op = "RE_TRIGGER" })
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.equal("/runs/" .. runs.failed .. "/action?op=RE_TRIGGER", only_request().uri)
    end)

    it("joins a base_url with a trailing slash", function()
      assert.is_table((flowservice.retrigger(runs.failed, opts { base_url = server.url .. "/" })))
      assert.equal("/runs/" .. runs.failed .. "/action?op=re-trigger", only_request().uri)
    end)

    it("keeps a query string that base_url carries", function()
      local run, err = flowservice.retrigger(runs.failed, opts { base_url = server.url .. "/?tenant=a%20b" })
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.equal("/runs/" .. runs.failed .. "/action?tenant=a%20b&op=re-trigger", only_request().uri)
    end)

    -- libcurl reads a run action's URL from a URL handle kept with the easy
    -- handle, and a call after the first sets its path alone: every call
    -- must still go to its own run, whatever the handle last did.
    it("sends each call of one client to its own run's URL, a GET between them too", function()
      for _, base in ipairs { server.url, server.url .. "/data/foundation/flowservice/" } do
        server:reset()
        local client = flowservice.new(opts { base_url = base })
        local prefix = base == server.url and "" or "/data/foundation/flowservice"
        local order = { runs.failed, runs.success_no_records, "get", runs.failed_mixed_case,
          runs.failed, runs.unknown }
        for _, id in ipairs(order) do
          if id == "get" then
            client:get_run(runs.failed)
          else
            client:retrigger(id)
          end
        end
        client:close()
        local got = server:requests()
        assert.equal(#order, #got)
        for i, id in ipairs(order) do
          if id == "get" then
            assert.equal("GET", got[i].method)
            assert.equal(prefix .. "/runs/" .. runs.failed, got[i].uri)
          else
            assert.equal("POST", got[i].method)
            assert.equal(prefix .. "/runs/" .. id .. "/action?op=re-trigger", got[i].uri)
          end
        end
      end
    end)

    it("sends concurrent calls of one client each to its own run, round after round", function()
      server:scenario { match = "^POST ", delay = 0.05, times = 0 } -- all in flight at once
      local c = core.new(opts())
      local ids = { runs.failed, runs.success_no_records, runs.failed_mixed_case }
      local want = {} -- request id -> the URI it must have gone to
      local function call(id, request_id, extra)
        local o = opts(extra)
        o.request_id = request_id
        want[request_id] = "/runs/" .. id .. "/action?op=" .. (o.op or "re-trigger")
        return o
      end
      for round = 1, 3 do -- the handles, and their URL handles, come back from the pool
        local ts = {}
        for i = 1, #ids do
          local id = ids[(i + round) % #ids + 1]
          ts[i] = c:submit_retrigger(id, call(id, "r" .. round .. "-" .. i))
        end
        for _, t in ipairs(ts) do
          repeat c:step(); if not t:done() then c:wait(0.05) end until t:done()
          local run, err = t:result()
          assert.is_table(run, tostring(err))
          assert.is_string(run.id)
        end
      end
      c:retrigger(runs.unknown, call(runs.unknown, "other-op", { op = "other" })) -- its own template
      assert.is_table((c:retrigger(runs.failed, call(runs.failed, "last"))))
      c:close()
      local seen = {}
      for _, r in ipairs(server:requests()) do seen[r.headers["x-request-id"]] = r.uri end
      assert.same(want, seen)
    end)

    it("sends a run id of every unreserved character as it is, in one path segment", function()
      local id = "AZaz09-_.~"
      local run, err = flowservice.retrigger(id, opts())
      assert.is_nil(run)
      assert.equal(404, err.status)
      assert.equal("FLOW-1101-404", err.code)
      assert.equal("/runs/" .. id .. "/action?op=re-trigger", only_request().uri)
      assert.matches(id, err.message, 1, true) -- the server saw the whole id
    end)

    it("sends a blank value of a header that is not guarded as empty, not as no header", function()
      assert.is_table((flowservice.retrigger(runs.failed, opts {
        headers = { ["X-Blank"] = " \t ", ["X-Tab"] = "a\tb" } })))
      local hd = only_request().headers
      assert.equal("", hd["x-blank"])
      assert.equal("a\tb", hd["x-tab"])
    end)

    it("reads a whole run object with eTag (the OpenAPI reply shape)", function()
      server:scenario { status = 200, headers = { ["Content-Type"] = "application/json" },
        body = '{"id":"run-2","flowId":"f","eTag":"\\"e-2\\"","metrics":{}}' }
      local run, err = flowservice.retrigger(runs.failed, opts())
      assert.is_nil(err)
      assert.same({ id = "run-2", etag = '"e-2"' }, run)
    end)

    it("survives a slow body within the timeout", function()
      server:scenario { slow_body = 0.3 }
      local run, err = flowservice.retrigger(runs.failed, opts { timeout = 5 })
      assert.is_nil(err)
      assert.is_string(run.id)
    end)
  end)

  describe("errors from the service", function()
    local function check(run_id, o, want)
      local run, err = flowservice.retrigger(run_id, o or opts())
      assert.is_nil(run)
      assert.is_true(flowservice.is_error(err))
      for k, v in pairs(want) do assert.same(v, err[k], "field " .. k) end
      local sent_id = server:requests()[1].headers["x-request-id"]
      assert.equal(sent_id, err.request_id)
      assert.is_true(err.sent)
      return err
    end

    it("reads a problem document: run in a state that cannot be re-triggered", function()
      local err = check(runs.success_with_records, nil,
        { kind = "http", status = 400, code = "FLOW-1387-400" })
      assert.matches("flowRunId=" .. runs.success_with_records, err.message, 1, true)
      assert.equal("flowservice: HTTP 400 FLOW-1387-400: " .. err.message
        .. " (request-id " .. err.request_id .. ")", tostring(err))
    end)

    it("reports each eligibility rule with its code", function()
      check(runs.in_progress, nil, { status = 400, code = "FLOW-1387-400" })
      server:reset()
      check(runs.disabled_flow, nil, { status = 400, code = "FLOW-1388-400" })
      server:reset()
      check(runs.streaming_flow, nil, { status = 400, code = "FLOW-1333-400" })
      server:reset()
      check(runs.unknown, nil, { status = 404, code = "FLOW-1101-404" })
      server:reset()
      check(runs.failed, opts { if_match = '"stale"' }, { status = 412, code = "FLOW-1404-412" })
      server:reset()
      check(runs.failed, opts { op = "delete" }, { status = 400, code = "FLOW-1401-400" })
    end)

    it("reads gateway errors", function()
      local err = check(runs.failed, opts { access_token = "expired-token" },
        { kind = "http", status = 401, code = "401013", message = "Oauth token is not valid" })
      assert.matches("^flowservice: HTTP 401 401013: Oauth token is not valid %(request%-id ", tostring(err))
      server:reset()
      check(runs.failed, opts { api_key = "wrong-key" }, { status = 403, code = "403003" })
      server:reset()
      check(runs.failed, opts { sandbox = "nosuch" }, { status = 404, code = "FLOW-2100-404" })
    end)

    it("reads the old {errorMessage} shape", function()
      server:scenario { status = 500, body = '{"errorMessage":"Internal failure"}' }
      check(runs.failed, nil, { kind = "http", status = 500, message = "Internal failure" })
    end)

    it("keeps a non-JSON error body readable on one line", function()
      server:scenario { status = 502, body = "<html>\n<h1>502 Bad Gateway</h1>\n</html>" }
      local err = check(runs.failed, nil, { kind = "http", status = 502 })
      assert.is_nil(err.code)
      assert.equal("<html> <h1>502 Bad Gateway</h1> </html>", err.message)
      assert.matches("^flowservice: HTTP 502: <html> <h1>", tostring(err))
    end)

    it("reports Retry-After in seconds from a 429 (when no retry is left)", function()
      server:scenario { status = 429, retry_after = "7" }
      local err = check(runs.failed, opts { retry = { attempts = 1 } },
        { kind = "http", status = 429, code = "429050", retry_after = 7, attempts = 1 })
      assert.matches("retry after 7 s", tostring(err), 1, true)
    end)

    it("reports Retry-After given as an HTTP date from a 503", function()
      local date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 120)
      server:scenario { status = 503, retry_after = date }
      local err = check(runs.failed, nil, { kind = "http", status = 503, code = "FLOW-1103-503" })
      assert.is_number(err.retry_after)
      assert.is_true(err.retry_after >= 110 and err.retry_after <= 121, tostring(err.retry_after))
    end)

    it("has no retry_after without the header", function()
      server:scenario { status = 503 }
      assert.is_nil(check(runs.failed, nil, { status = 503 }).retry_after)
    end)
  end)

  describe("bad replies", function()
    it("a 200 that is not JSON is a decode error", function()
      server:scenario { status = 200, body = "<html>ok</html>" }
      local run, err = flowservice.retrigger(runs.failed, opts())
      assert.is_nil(run)
      assert.equal("decode", err.kind)
      assert.equal(200, err.status)
      assert.matches("not a JSON object", err.message)
      assert.matches("^flowservice: decode error %(HTTP 200%): ", tostring(err))
    end)

    it("a 200 without a run id is a decode error", function()
      server:scenario { status = 200, body = '{"etag":"\\"x\\""}' }
      local _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("decode", err.kind)
      assert.equal("reply has no run id", err.message)
    end)

    it("a reply larger than max_body is not decoded", function()
      server:scenario { oversize = 100000 }
      local run, err = flowservice.retrigger(runs.failed, opts { max_body = 4096 })
      assert.is_nil(run)
      assert.equal("decode", err.kind)
      assert.matches("too large", err.message)
      assert.is_true(err.sent)
    end)

    it("a reply larger than the default 8 MiB is not decoded", function()
      server:scenario { oversize = 9 * 1024 * 1024 }
      local _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("decode", err.kind)
      assert.matches("too large", err.message)
    end)

    it("a reply of exactly max_body bytes is fine", function()
      local body = '{"id":"x","etag":"\\"y\\""}'
      server:scenario { status = 200, body = body }
      local run = flowservice.retrigger(runs.failed, opts { max_body = #body })
      assert.same({ id = "x", etag = '"y"' }, run)
    end)
  end)

  describe("transport failures", function()
    it("connection refused is a network error, not sent", function()
      local run, err = flowservice.retrigger(runs.failed,
        opts { base_url = "http://127.0.0.1:" .. h.closed_port, retry = { attempts = 1 } })
      assert.is_nil(run)
      assert.equal("network", err.kind)
      assert.is_false(err.sent)
      assert.is_nil(err.status)
      assert.matches(UUID, err.request_id)
      assert.matches("^flowservice: network error: .*%(request%-id .*, not sent%)$", tostring(err))
    end)

    it("a server slower than timeout is a timeout within the limit", function()
      server:scenario { delay = 4 }
      local t0 = h.now()
      local run, err = flowservice.retrigger(runs.failed, opts { timeout = 0.5 })
      local elapsed = h.now() - t0
      assert.is_nil(run)
      assert.equal("timeout", err.kind)
      assert.is_true(err.sent)
      assert.is_true(elapsed < 3, "took " .. elapsed .. " s")
    end)

    it("a connection dropped before the reply is a network error after sending", function()
      server:scenario { drop = "before" }
      local _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("network", err.kind)
      assert.is_true(err.sent)
      server:scenario { drop = "after" }
      _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("network", err.kind)
      assert.is_true(err.sent)
    end)

    it("a truncated body is a network error", function()
      server:scenario { truncate = true }
      local _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("network", err.kind)
      assert.is_true(err.sent)
    end)

    it("goes through the proxy option", function()
      -- a host that cannot resolve: only the proxy (the fake) can answer
      local run, err = flowservice.retrigger(runs.failed,
        opts { base_url = "http://flowservice.example.invalid", proxy = server.url })
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.equal("flowservice.example.invalid", only_request().headers.host)
    end)

    it("ignores proxy environment variables when proxy = ''", function()
      local function retrigger_with_env_proxy(proxy_option)
        local chunk = ([[
          local fs = require "flowservice"
          local run, err = fs.retrigger(%q, { access_token = "fake-token", api_key = "fake-api-key",
            org_id = "FAKEORG@AdobeOrg", base_url = %q, proxy = %s })
          io.write(run and "ok" or err.kind)]]):format(runs.failed, server.url, proxy_option)
        local p = assert(io.popen(("env http_proxy=http://127.0.0.1:%d lua5.4 -e %q"):format(
          h.closed_port, "package.path = 'build/tree/share/lua/5.4/?.lua;' .. package.path; "
          .. "package.cpath = 'build/tree/lib/lua/5.4/?.so;' .. package.cpath; " .. chunk)))
        local out = p:read("*a")
        p:close()
        return out
      end
      assert.equal("network", retrigger_with_env_proxy("nil")) -- libcurl honours http_proxy
      assert.equal("ok", retrigger_with_env_proxy('""'))
    end)

    it("does not follow redirects (the headers carry credentials)", function()
      server:scenario { status = 307, headers = { Location = server.url .. "/elsewhere" }, body = "" }
      local _, err = flowservice.retrigger(runs.failed, opts())
      assert.equal("http", err.kind)
      assert.equal(307, err.status)
      assert.equal(1, #server:requests())
    end)
  end)

  describe("secrets", function()
    it("never appear in an error, its fields or its string", function()
      server:scenario { status = 401,
        body = '{"error_code":"401013","message":"token fake-token with key fake-api-key refused"}' }
      local _, err = flowservice.retrigger(runs.failed, opts())
      local seen = { tostring(err) }
      for _, v in pairs(err) do seen[#seen + 1] = tostring(v) end
      for _, text in ipairs(seen) do
        assert.not_matches("fake-token", text, 1, true)
        assert.not_matches("fake-api-key", text, 1, true)
      end
      assert.matches("<redacted>", err.message, 1, true)
    end)

    it("never appear in argument errors", function()
      local ok, msg = pcall(flowservice.retrigger, runs.failed, opts { access_token = "s3cr3t-token\r\nX: y" })
      assert.is_false(ok)
      assert.not_matches("s3cr3t", msg, 1, true)
      ok, msg = pcall(flowservice.retrigger, runs.failed, opts { headers = { ["X-Sig"] = "s3cr3t\n" } })
      assert.is_false(ok)
      assert.not_matches("s3cr3t", msg, 1, true)
    end)
  end)

  describe("programmer errors raise and send nothing", function()
    local function raises(pattern, run_id, o, fn)
      assert.error_matches(function() (fn or flowservice.retrigger)(run_id, o) end, pattern)
    end

    after_each(function() assert.same({}, server:requests()) end)

    it("for a run id that is not a non-empty string", function()
      raises("bad argument #1 .*run id must be a non%-empty string, got nil", nil, opts())
      raises("bad argument #1 .*run id must be a non%-empty string, got table", {}, opts())
      raises("bad argument #1 .*run id must be a non%-empty string, got number", 12345, opts())
      raises("bad argument #1 .*run id must be a non%-empty string", "", opts())
      raises("bad argument #1 .*run id may hold only letters, digits, '%-', '_', '%.' and '~'",
        "abc\r\nX-Evil: 1", opts())
      raises("bad argument #1 .*run id may hold only letters", "abc\0def", opts())
      raises("bad argument #1 .*run id may not be '%.' or '%.%.'", "..", opts())
      raises("bad argument #1 .*run id may not be '%.' or '%.%.'", ".", opts())
    end)

    it("for a run id with a reserved or non-ASCII character (a proxy could decode it)", function()
      for _, id in ipairs { "a/b", "a%2Fb", "a b", "a?b", "a#b", "a%b", "a+b", "a:b", "a@b",
        "../x", "a\\b", "caf\195\169", "a\tb", "a\127b" } do
        for _, fn in ipairs { flowservice.retrigger, core.retrigger } do
          raises("bad argument #1 .*run id may hold only letters, digits, '%-', '_', '%.' and '~'",
            id, opts(), fn)
        end
      end
    end)

    it("for options that are not a table", function()
      raises("bad argument #2 .*table expected, got nil", runs.failed, nil)
      raises("bad argument #2 .*table expected, got string", runs.failed, "fake-token")
    end)

    it("for an unknown option, misspelt or not", function()
      local o = opts()
      o.acess_token = o.access_token
      raises("bad argument #2 .*option 'acess_token' is unknown", runs.failed, o)
      o = opts()
      o[1] = "x"
      raises("bad argument #2 .*option names must be strings, got number", runs.failed, o)
    end)

    it("for a value of the wrong type", function()
      local cases = {
        { "timeout", "5", "must be a number, got string" },
        { "connect_timeout", true, "must be a number, got boolean" },
        { "max_body", "1", "must be a number, got string" },
        { "insecure", "yes", "must be a boolean, got string" },
        { "headers", "X: y", "must be a table, got string" },
        { "sandbox", 1, "must be a string, got number" },
        { "base_url", {}, "must be a string, got table" },
        { "if_match", false, "must be a string, got boolean" },
      }
      for _, c in ipairs(cases) do
        raises("option '" .. c[1] .. "' " .. c[3], runs.failed, opts { [c[1]] = c[2] })
      end
    end)

    it("for numbers out of range", function()
      raises("option 'timeout' must be a positive number", runs.failed, opts { timeout = 0 })
      raises("option 'timeout' must be a positive number", runs.failed, opts { timeout = -1 })
      raises("option 'timeout' must be a positive number", runs.failed, opts { timeout = 0 / 0 })
      raises("option 'connect_timeout' must be a positive number", runs.failed, opts { connect_timeout = math.huge })
      raises("option 'max_body' must be a whole number", runs.failed, opts { max_body = 1.5 })
      raises("option 'max_body' must be a whole number", runs.failed, opts { max_body = 0 })
    end)

    it("for a missing or empty credential", function()
      for _, key in ipairs { "access_token", "api_key", "org_id" } do
        local o = opts()
        o[key] = nil
        raises("bad argument #2 .*option '" .. key .. "' is required", runs.failed, o)
        o[key] = ""
        raises("bad argument #2 .*option '" .. key .. "' must not be empty", runs.failed, o)
      end
      raises("option 'sandbox' must not be empty", runs.failed, opts { sandbox = "" })
    end)

    it("for a control character in any header value (no header injection)", function()
      for _, key in ipairs { "access_token", "api_key", "org_id", "sandbox", "if_match",
        "request_id", "user_agent" } do
        for _, bad in ipairs { "a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b", "a\1b", "a\31b",
          "a\127b", "a\27[31m" } do
          raises("option '" .. key .. "' contains a control character", runs.failed, opts { [key] = bad })
        end
      end
      for _, bad in ipairs { "1\r\nAuthorization: Bearer other", "a\0b", "a\8b", "a\127" } do
        raises("option 'headers' holds a value for 'X%-A' with a control character",
          runs.failed, opts { headers = { ["X-A"] = bad } })
      end
    end)

    it("for a blank identity or If-Match value (libcurl would drop the header)", function()
      for _, key in ipairs { "access_token", "api_key", "org_id", "sandbox", "if_match" } do
        for _, blank in ipairs { " ", "\t", " \t  " } do
          raises("bad argument #2 .*option '" .. key .. "' must not be blank", runs.failed,
            opts { [key] = blank })
        end
      end
      raises("bad argument #2 .*option 'if_match' must not be empty", runs.failed, opts { if_match = "" })
      for _, name in ipairs { "If-Match", "if-match" } do
        for _, blank in ipairs { "", " ", "\t" } do
          raises("bad argument #2 .*option 'headers' holds a blank value for 'If%-Match'", runs.failed,
            opts { headers = { [name] = blank } })
        end
      end
    end)

    it("for headers that libcurl writes itself", function()
      local cases = { host = "Host", ["Content-Length"] = "Content-Length",
        ["TRANSFER-ENCODING"] = "Transfer-Encoding", connection = "Connection", Expect = "Expect",
        te = "TE", Upgrade = "Upgrade" }
      for name, canonical in pairs(cases) do
        raises("bad argument #2 .*option 'headers' may not set '" .. canonical:gsub("%-", "%%-")
          .. "' %(libcurl writes it%)", runs.failed, opts { headers = { [name] = "x" } })
      end
    end)

    it("for a header name that is not an HTTP token", function()
      for _, name in ipairs { "X-A\r\nX-B", "X A", "X:A", "", "X\0A", "X-\195\169" } do
        raises("option 'headers' holds a name that is not an HTTP token", runs.failed,
          opts { headers = { [name] = "v" } })
      end
      raises("option 'headers' must map header names to string values", runs.failed,
        opts { headers = { ["X-N"] = 1 } })
    end)

    it("for headers that would replace the identity headers", function()
      local cases = { Authorization = "access_token", ["X-API-KEY"] = "api_key",
        ["x-gw-ims-org-id"] = "org_id", ["X-Sandbox-Name"] = "sandbox" }
      for name, option in pairs(cases) do
        raises("option 'headers' may not set '.-' %(use the option '" .. option .. "'%)",
          runs.failed, opts { headers = { [name] = "v" } })
      end
    end)

    it("for a base_url that is not http(s)", function()
      raises("option 'base_url' must be an http:// or https:// URL", runs.failed,
        opts { base_url = "ftp://platform.adobe.io/data" })
      raises("option 'base_url' must be an http:// or https:// URL", runs.failed,
        opts { base_url = "file:///etc/passwd" })
      raises("option 'base_url' is not a valid URL", runs.failed, opts { base_url = "platform.adobe.io/data" })
      raises("option 'base_url' contains a control character", runs.failed, opts { base_url = "http://a\r\n/" })
    end)

    it("in the C function called directly, too", function()
      local o = opts()
      o.acess_token = "x"
      raises("bad argument #2 .*option 'acess_token' is unknown", runs.failed, o, core.retrigger)
      raises("bad argument #1 .*run id may hold only letters", "a\nb", opts(), core.retrigger)
      raises("option 'access_token' is required", runs.failed, { api_key = "k", org_id = "o" }, core.retrigger)
    end)
  end)

  describe("flowservice.core.retrigger", function()
    it("returns the plain error table the Lua face reads", function()
      local run, err = core.retrigger(runs.success_with_records, opts())
      assert.is_nil(run)
      assert.is_nil(getmetatable(err))
      assert.equal("http", err.kind)
      assert.equal(400, err.status)
      assert.matches("FLOW%-1387%-400", err.body)
      assert.is_true(err.sent)
    end)

    it("returns { id, etag } on success", function()
      local run = core.retrigger(runs.failed, opts())
      assert.is_string(run.id)
      assert.is_string(run.etag)
    end)

    it("refuses a self that is not its class's, with Lua's own words, and sends nothing", function()
      server:clear_requests()
      local c = core.new(opts())
      local t = c:prepare_retrigger(runs.failed, opts()) -- made, not submitted
      local other = io.tmpfile() -- a userdata with a metatable of its own
      -- how Lua names a userdata: by its metatable's __name from 5.3 on
      local function named(name) return _VERSION == "Lua 5.1" and "userdata" or name end
      for _, case in ipairs {
        { function() c.retrigger(t, runs.failed) end,
          "flowservice.client expected, got " .. named("flowservice.transfer") },
        { function() c.retrigger(other, runs.failed) end, "flowservice.client expected, got " .. named("FILE%*") },
        { function() c.retrigger({}, runs.failed) end, "flowservice.client expected, got table" },
        { function() c.wire_retrigger(nil, runs.failed) end, "flowservice.client expected, got nil" },
        { function() t.done(c) end, "flowservice.transfer expected, got " .. named("flowservice.client") },
        { function() t.feed(other, "x") end, "flowservice.transfer expected, got " .. named("FILE%*") },
      } do
        assert.error_matches(case[1], "^bad argument #1 to '[%w_]+' %(" .. case[2] .. "%)$")
      end
      other:close()
      c:close()
      assert.same({}, server:requests())
    end)
  end)
end)
