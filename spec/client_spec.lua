-- Client objects: connection reuse, HTTP/2, silent resends, retry rules,
-- deadlines, logging, lifecycle. Against the fake Flow Service.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local tls = require "spec.support.tls"
local h = require "spec.support.helpers"

local runs = h.runs

-- Sockets this process holds: what a closed client must give back.
-- The sockets this process holds for live clients: garbage is collected
-- first, so clients earlier tests dropped (and their sockets) do not count.
local function own_sockets()
  collectgarbage()
  collectgarbage()
  local pid = assert(io.open("/proc/self/stat")):read("*l"):match("^(%d+)")
  local p = assert(io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null"))
  local n = select(2, p:read("*a"):gsub("socket:", ""))
  p:close()
  return n
end

local FAST = { attempts = 4, base_delay = 0.01, max_delay = 0.05 }
-- Built without CURLOPT_PREREQFUNCTION (make noprereq), a re-trigger gets a
-- fresh connection that is never reused: libcurl has nothing to resend it on.
local FRESH = require("flowservice.core").resend_guard == "fresh_connection"

describe("flowservice.new", function()
  local server

  local function new(extra)
    local o = h.opts(server.url, extra)
    if o.retry == nil then o.retry = FAST end
    return flowservice.new(o)
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function() server:reset() end)

  describe("connections", function()
    it("makes N calls over one TCP connection", function()
      local client = new()
      for _ = 1, 5 do
        local run, err = client:retrigger(runs.failed)
        assert.is_nil(err)
        assert.is_string(run.id)
      end
      client:close()
      local got = server:requests()
      assert.equal(5, #got)
      if FRESH then
        for i = 2, 5 do assert.not_equal(got[i - 1].connection, got[i].connection) end
        assert.is_table((new():get_run(runs.failed))) -- reads still share one
      else
        for i = 2, 5 do assert.equal(got[1].connection, got[i].connection) end
        assert.equal(5, got[5].connection_requests)
      end
    end)

    it("can be shared by coroutines, each call getting its own result", function()
      local client = new()
      local results = {}
      local workers = {}
      for w = 1, 3 do
        workers[w] = coroutine.create(function()
          for i = 1, 2 do
            local id = w == 2 and h.runs.success_with_records or h.runs.failed
            local run, err = client:retrigger(id, { request_id = ("w%d-%d"):format(w, i) })
            results[#results + 1] = { w = w, run = run, err = err }
            coroutine.yield()
          end
        end)
      end
      for _ = 1, 2 do
        for w = 1, 3 do assert(coroutine.resume(workers[w])) end
      end
      client:close()
      assert.equal(6, #results)
      for _, r in ipairs(results) do
        if r.w == 2 then
          assert.is_nil(r.run)
          assert.equal("FLOW-1387-400", r.err.code)
          assert.matches("^w2%-", r.err.request_id)
        else
          assert.is_string(r.run.id)
        end
      end
    end)

    it("does no I/O in new", function()
      local client = new()
      assert.same({}, server:requests())
      client:close()
    end)

    -- libcurl resends a request on a reused connection that dies before any
    -- reply byte; for a re-trigger the server may have acted already.
    it("never resends a re-trigger on a reused connection that died after the server acted", function()
      local client = new()
      assert.is_table((client:retrigger(runs.failed)))
      server:scenario { match = "^POST ", act_then_delay = 0, drop = "after" }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(run)
      assert.equal("network", err.kind)
      assert.is_true(err.sent)
      assert.is_true(err.ambiguous)
      assert.equal(1, err.attempts)
      assert.is_nil(err.resent)
      if require("flowservice.core").resend_guard == "prereq" then
        assert.matches("connection died after the request went out", err.message, 1, true)
      end
      local got = server:requests()
      assert.equal(2, #got) -- one POST per call: the dead one never went out again
      assert.equal(2, server:stats().by_source[runs.failed])
    end)

    it("may resend a read on a reused connection that died", function()
      local client = new()
      assert.is_table((client:get_run(runs.failed)))
      server:scenario { match = "^GET ", drop = "after" }
      local run, err = client:get_run(runs.failed)
      client:close()
      assert.is_nil(err)
      assert.equal(runs.failed, run.id)
      assert.is_nil(run.resent)
    end)

    it("counts a re-trigger in flight when its client is closed as sent (it may be done)", function()
      local client
      local posted = false
      client = new { wait = function(s)
        if not posted and server:stats().posts >= 1 then -- the server has it, and acts
          posted = true
          client:close()
        end
        h.sleep(s)
      end }
      server:scenario { match = "^POST ", act_then_delay = 1 }
      local run, err = client:retrigger(runs.failed)
      assert.is_true(posted)
      assert.is_nil(run)
      assert.is_true(err.sent)
      assert.is_true(err.ambiguous)
      assert.equal(1, server:stats().posts)
    end)
  end)

  describe("retries", function()
    it("waits out a 429's Retry-After and retries a re-trigger", function()
      local client = new { retry = { base_delay = 0.01, max_delay = 5 } }
      server:scenario { status = 429, retry_after = "1" }
      local t0 = h.now()
      local run, err = client:retrigger(runs.failed)
      local elapsed = h.now() - t0
      client:close()
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.equal(2, #server:requests())
      assert.is_true(elapsed >= 0.95, "waited only " .. elapsed .. " s")
    end)

    it("returns a Retry-After longer than max_delay instead of waiting", function()
      local client = new { retry = { max_delay = 2 } }
      server:scenario { status = 429, retry_after = "5" }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(run)
      assert.equal(429, err.status)
      assert.equal(5, err.retry_after)
      assert.equal(1, err.attempts)
      assert.equal(1, #server:requests())
    end)

    it("returns a Retry-After past the deadline instead of waiting", function()
      local client = new { deadline = 0.5 }
      server:scenario { status = 429, retry_after = "1" }
      local _, err = client:retrigger(runs.failed)
      client:close()
      assert.equal(429, err.status)
      assert.equal(1, err.attempts)
    end)

    it("does not repeat a re-trigger answered 503 after it was sent: ambiguous", function()
      local client = new()
      server:scenario { status = 503 }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(run)
      assert.equal(503, err.status)
      assert.is_true(err.ambiguous)
      assert.equal(1, err.attempts)
      assert.equal(1, #server:requests())
    end)

    it("does not repeat a re-trigger that timed out after it was sent: ambiguous", function()
      local client = new { timeout = 0.3 }
      server:scenario { delay = 2 }
      local _, err = client:retrigger(runs.failed)
      client:close()
      assert.equal("timeout", err.kind)
      assert.is_true(err.sent)
      assert.is_true(err.ambiguous)
      assert.equal(1, err.attempts)
    end)

    it("repeats a re-trigger that was never sent, up to attempts", function()
      local client = flowservice.new(h.opts("http://127.0.0.1:" .. h.closed_port,
        { retry = { attempts = 3, base_delay = 0.01, max_delay = 0.02 } }))
      local _, err = client:retrigger(runs.failed)
      client:close()
      assert.equal("network", err.kind)
      assert.is_false(err.sent)
      assert.is_nil(err.ambiguous)
      assert.equal(3, err.attempts)
      assert.equal(3, #err.request_ids)
      assert.not_equal(err.request_ids[1], err.request_ids[2])
      assert.equal(err.request_ids[3], err.request_id)
    end)

    it("stops at once on a 400 (nothing to gain by repeating)", function()
      local client = new()
      local _, err = client:retrigger(runs.success_with_records)
      client:close()
      assert.equal("FLOW-1387-400", err.code)
      assert.is_nil(err.ambiguous)
      assert.equal(1, err.attempts)
    end)

    it("keeps the whole call within deadline, retries included", function()
      local client = new { deadline = 0.6, timeout = 5 }
      server:scenario { delay = 3, times = 0 }
      local t0 = h.now()
      local _, err = client:retrigger(runs.failed)
      local elapsed = h.now() - t0
      client:close()
      assert.equal("timeout", err.kind)
      assert.is_true(elapsed < 1.5, "took " .. elapsed .. " s")
    end)

    it("takes a per-call deadline and per-call options", function()
      local client = new()
      server:scenario { delay = 3 }
      local t0 = h.now()
      local _, err = client:retrigger(runs.failed, { deadline = 0.3, request_id = "call-1" })
      assert.is_true(h.now() - t0 < 1.5)
      assert.equal("timeout", err.kind)
      assert.equal("call-1", err.request_id)
      server:reset()
      local run = client:retrigger(runs.failed, { if_match = server:run(runs.failed).etag,
        headers = { ["X-Job"] = "nightly" } })
      assert.is_string(run.id)
      local hd = server:requests()[1].headers
      assert.equal("nightly", hd["x-job"])
      assert.equal(server:run(runs.failed).etag, hd["if-match"])
      client:close()
    end)
  end)

  describe("a client's constant part, built once", function()
    local core = require "flowservice.core"
    local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

    it("applies per-call options to their call only: If-Match, headers, request_id, timeout", function()
      local client = new()
      local etag = server:run(runs.failed).etag
      assert.is_table((client:retrigger(runs.failed, { if_match = etag, request_id = "call-a", timeout = 5,
        headers = { ["X-Job"] = "nightly", Accept = "application/vnd.adobe+json" } })))
      assert.is_table((client:retrigger(runs.failed)))
      assert.is_table((client:retrigger(runs.failed, { headers = { ["X-Other"] = "2" } })))
      local log = server:requests()
      assert.equal(3, #log)
      local a, b, c = log[1].headers, log[2].headers, log[3].headers
      assert.equal(etag, a["if-match"])
      assert.equal("call-a", a["x-request-id"])
      assert.equal("nightly", a["x-job"])
      assert.equal("application/vnd.adobe+json", a["accept"])
      for _, hd in ipairs { b, c } do
        assert.is_nil(hd["if-match"])
        assert.is_nil(hd["x-job"])
        assert.equal("application/json", hd["accept"])
        assert.matches(UUID, hd["x-request-id"])
      end
      assert.not_equal(b["x-request-id"], c["x-request-id"])
      assert.equal("2", c["x-other"])
      assert.is_nil(b["x-other"])
      for _, hd in ipairs { a, b, c } do -- the constant lines, once each
        assert.equal("Bearer " .. h.creds.access_token, hd["authorization"])
        assert.equal(h.creds.api_key, hd["x-api-key"])
        assert.equal(h.creds.org, hd["x-gw-ims-org-id"])
        assert.equal(h.creds.sandbox, hd["x-sandbox-name"])
        assert.equal("application/json", hd["content-type"])
        assert.matches("^lua%-flowservice/", hd["user-agent"])
      end
      -- a per-call timeout ends its call, and the next call has the client's again
      server:scenario { delay = 1 }
      local _, err = client:retrigger(runs.failed, { timeout = 0.2 })
      assert.equal("timeout", err.kind)
      server:reset()
      server:scenario { delay = 0.5 }
      assert.is_table((client:retrigger(runs.failed)))
      client:close()
    end)

    it("sends changed client options on the next call, and the old ones again after", function()
      local o = h.opts(server.url)
      local c = core.new(o)
      local other = h.opts(server.url, { user_agent = "other-agent/1", connect_timeout = 3 })
      assert.is_table((c:retrigger(runs.failed, o)))
      assert.is_table((c:retrigger(runs.failed, other)))
      assert.is_table((c:retrigger(runs.failed, o)))
      c:close()
      local log = server:requests()
      assert.matches("^lua%-flowservice/", log[1].headers["user-agent"])
      assert.equal("other-agent/1", log[2].headers["user-agent"])
      assert.equal(log[1].headers["user-agent"], log[3].headers["user-agent"])
      if not FRESH then -- the same connection throughout (the fallback never reuses one)
        assert.equal(log[1].connection, log[2].connection)
        assert.equal(log[1].connection, log[3].connection)
      end
    end)

    it("sends a run action given no options with the client's own, copied when it was made", function()
      local headers = { ["X-Job"] = "nightly" }
      local o = h.opts(server.url, { user_agent = "own-agent/1", headers = headers })
      local c = core.new(o)
      o.user_agent, o.sandbox, o.bogus = "changed/1", "other", true -- the caller's table, not the client's
      local other = h.opts(server.url, { user_agent = "other-agent/1" })
      assert.is_table((c:retrigger(runs.failed)))
      assert.is_table((c:retrigger(runs.failed, other)))
      assert.is_table((c:retrigger(runs.failed, nil)))
      local t = c:submit_retrigger(runs.failed)
      repeat c:step(); if not t:done() then c:wait(0.05) end until t:done()
      assert.is_table((t:result()))
      c:prepare_retrigger(runs.failed):cancel()
      local log = server:requests()
      assert.equal(4, #log)
      for _, i in ipairs { 1, 3, 4 } do
        assert.equal("own-agent/1", log[i].headers["user-agent"])
        assert.equal(h.creds.sandbox, log[i].headers["x-sandbox-name"])
        assert.equal("nightly", log[i].headers["x-job"])
        assert.equal(h.creds.api_key, log[i].headers["x-api-key"])
      end
      assert.equal("other-agent/1", log[2].headers["user-agent"])
      assert.is_nil(log[2].headers["x-job"])
      -- opts.headers is the caller's table: read again on every call, and checked
      headers["X-Job"] = "weekly"
      assert.is_table((c:retrigger(runs.failed)))
      assert.equal("weekly", server:requests()[5].headers["x-job"])
      headers["Bad Name"] = "x"
      assert.error_matches(function() c:retrigger(runs.failed) end,
        "bad argument #2 to 'retrigger' %(option 'headers' holds a name that is not an HTTP token%)")
      headers["Bad Name"] = nil
      -- a client the core made for one call has no options of its own
      assert.error_matches(function() core.retrigger(runs.failed, nil) end, "bad argument #2 .*table expected, got nil")
      c:close()
      assert.equal(5, #server:requests())
    end)

    it("keeps its own options' If-Match and request id for every call without options", function()
      local c = core.new(h.opts(server.url, { if_match = '"e1"', request_id = "fixed-id-1" }))
      for _ = 1, 3 do c:retrigger(runs.failed) end -- answered or refused (412): each sent
      local blank = core.new(h.opts(server.url, { request_id = "  " })) -- blank: a fresh one each call
      for _ = 1, 3 do assert.is_table((blank:retrigger(runs.failed))) end
      local log = server:requests()
      assert.equal(6, #log)
      for i = 1, 3 do
        assert.equal('"e1"', log[i].headers["if-match"])
        assert.equal("fixed-id-1", log[i].headers["x-request-id"])
      end
      local seen = {}
      for i = 4, 6 do
        assert.is_nil(log[i].headers["if-match"])
        assert.matches(UUID, log[i].headers["x-request-id"])
        assert.is_nil(seen[log[i].headers["x-request-id"]])
        seen[log[i].headers["x-request-id"]] = true
      end
      c:close()
      blank:close()
    end)

    it("gives every call a fresh request id (version-4 UUIDs, never repeated)", function()
      local o = h.opts(server.url)
      local c = core.new(o)
      local seen = {}
      for _ = 1, 300 do -- more than one batch of random bytes
        local t = c:prepare_retrigger(runs.failed, o)
        local id = t:request_id()
        assert.matches(UUID, id)
        assert.is_nil(seen[id])
        seen[id] = true
        t:cancel()
      end
      c:close()
      assert.equal(0, server:stats().posts)
    end)
  end)

  describe("log", function()
    it("gets one redacted line per attempt", function()
      local lines = {}
      local client = new { log = function(line) lines[#lines + 1] = line end }
      server:scenario { status = 429, retry_after = "0" }
      assert.is_table((client:retrigger(runs.failed)))
      client:close()
      assert.equal(2, #lines)
      local ids = {}
      for i, r in ipairs(server:requests()) do ids[i] = r.headers["x-request-id"] end
      assert.matches("^POST /runs/" .. runs.failed:gsub("%-", "%%-")
        .. "/action%?op=re%-trigger %-> 429 %(attempt 1, request%-id " .. ids[1]:gsub("%-", "%%-")
        .. ", %d+ ms%)$", lines[1])
      assert.matches("%-> 200 %(attempt 2, request%-id " .. ids[2]:gsub("%-", "%%-"), lines[2])
      for _, line in ipairs(lines) do
        assert.not_matches("fake%-token", line)
        assert.not_matches("fake%-api%-key", line)
      end
    end)
  end)

  describe("the engine's transfers (flowservice.core)", function()
    local core = require "flowservice.core"

    local function drive(c, t)
      repeat
        c:step()
        if not t:done() then c:wait(0.05) end
      until t:done()
    end

    it("sends a prepared re-trigger only once submitted, whatever drives the engine meanwhile", function()
      local o = h.opts(server.url)
      local c = core.new(o)
      local t = c:prepare_retrigger(runs.failed, o)
      assert.is_table((c:request(o, { method = "GET", path = { "runs", runs.failed } })))
      for _ = 1, 5 do
        c:step()
        c:wait(0.01)
      end
      assert.equal(0, server:stats().posts)
      assert.is_false(t:done())
      assert.is_true(t:submit())
      assert.has_error(function() t:submit() end, "flowservice: transfer already submitted")
      drive(c, t)
      assert.is_string((t:result()).id)
      assert.equal(1, server:stats().posts)
      assert.is_false(t:submit()) -- finished: nothing to send
      c:close()
    end)

    it("ends a prepared transfer unsent when the client closes, a submitted one as sent", function()
      local o = h.opts(server.url)
      server:scenario { match = "^POST ", act_then_delay = 1 }
      local c = core.new(o)
      local prepared = c:prepare_retrigger(runs.failed, o)
      local submitted = c:submit_retrigger(runs.failed, o)
      repeat
        c:step()
        c:wait(0.01)
      until server:stats().posts == 1
      c:close()
      assert.is_true(prepared:done())
      assert.is_true(submitted:done())
      local _, e1 = prepared:result()
      local _, e2 = submitted:result()
      assert.is_false(e1.sent)
      assert.is_true(e2.sent)
      assert.is_false(prepared:submit())
    end)

    it("a cancelled transfer is done, and its result is gone", function()
      local o = h.opts(server.url)
      local c = core.new(o)
      local t = c:submit_retrigger(runs.failed, o)
      t:cancel()
      assert.is_true(t:done())
      assert.error_matches(function() t:result() end, "already taken")
      assert.equal(0, c:in_flight())
      c:close()
    end)

    it("waits no time for a NaN or negative number of seconds", function()
      local c = core.new(h.opts(server.url))
      local t0 = h.now()
      c:wait(0 / 0)
      c:wait(-1)
      c:wait(-math.huge)
      assert.is_true(h.now() - t0 < 0.5)
      c:close()
    end)

    it("reads Retry-After in seconds and as an HTTP date, and the Date header", function()
      local client = new { retry = { attempts = 1 } }
      server:scenario { status = 429, retry_after = "7" }
      local _, err = client:retrigger(runs.failed)
      assert.equal(7, err.retry_after)
      assert.is_number(err.date)
      server:scenario { status = 429, retry_after = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 100) }
      _, err = client:retrigger(runs.failed)
      assert.is_true(err.retry_after >= 95 and err.retry_after <= 101, tostring(err.retry_after))
      server:scenario { status = 503 }
      _, err = client:retrigger(runs.failed)
      assert.is_nil(err.retry_after)
      client:close()
    end)
  end)

  -- A client without credentials, deadline, log or wait function makes a
  -- call's first attempt in client:retrigger itself; a failure is handed to
  -- the general loop, which goes on from that attempt.
  describe("a plain call's first attempt, handed over when it fails", function()
    local function post_ids()
      local ids = {}
      for _, r in ipairs(server:requests()) do
        assert.equal("POST", r.method)
        ids[#ids + 1] = r.headers["x-request-id"]
      end
      return ids
    end

    it("a 429, then success: one more attempt with its own request id", function()
      local client = new { retry = { attempts = 3, base_delay = 0.01, max_delay = 1 } }
      server:scenario { match = "^POST ", status = 429, retry_after = "0" }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(err)
      assert.is_string(run.id)
      local ids = post_ids()
      assert.equal(2, #ids)
      assert.not_equal(ids[1], ids[2])
    end)

    it("429s until attempts run out: attempts and request_ids count the first attempt", function()
      local client = new { retry = { attempts = 3, base_delay = 0.01, max_delay = 1 } }
      server:scenario { match = "^POST ", status = 429, retry_after = "0", times = 0 }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(run)
      assert.equal(429, err.status)
      assert.is_nil(err.ambiguous)
      assert.equal(3, err.attempts)
      assert.same(post_ids(), err.request_ids)
      assert.equal(3, #err.request_ids)
      assert.equal(err.request_ids[3], err.request_id)
    end)

    it("an ambiguous failure of the first attempt is not retried", function()
      local client = new { retry = { attempts = 3, base_delay = 0.01, max_delay = 1 } }
      server:scenario { match = "^POST ", status = 503 }
      local run, err = client:retrigger(runs.failed)
      client:close()
      assert.is_nil(run)
      assert.is_true(err.ambiguous)
      assert.is_true(err.sent)
      assert.equal(1, err.attempts)
      assert.same(post_ids(), err.request_ids)
      assert.equal(1, #err.request_ids)
      assert.equal(err.request_ids[1], err.request_id)
    end)

    it("a first attempt never sent is retried, and counted", function()
      local client = flowservice.new(h.opts("http://127.0.0.1:" .. h.closed_port,
        { retry = { attempts = 2, base_delay = 0.01, max_delay = 0.02 } }))
      local _, err = client:retrigger(runs.failed)
      client:close()
      assert.equal("network", err.kind)
      assert.is_false(err.sent)
      assert.equal(2, err.attempts)
      assert.equal(2, #err.request_ids)
      assert.not_equal(err.request_ids[1], err.request_ids[2])
    end)

    it("reads the server's clock from a failed first attempt, and from a success", function()
      local client = new { retry = { attempts = 1 } }
      assert.is_nil(client:_server_time())
      server:scenario { match = "^POST ", status = 429, retry_after = "5" }
      local _, err = client:retrigger(runs.failed)
      assert.equal(429, err.status)
      local t = client:_server_time()
      assert.is_number(t)
      assert.is_true(math.abs(t - os.time()) < 5, tostring(t))
      assert.is_table((client:retrigger(runs.failed)))
      t = client:_server_time()
      assert.is_number(t)
      assert.is_true(math.abs(t - os.time()) < 5, tostring(t))
      client:close()
    end)

    it("raises for a bad run id, as the general path does, and sends nothing", function()
      local client = new()
      for _, case in ipairs { { 12345, "got number" }, { "", "got an empty string" },
        { "a/b", "may hold only letters" }, { "..", "may not be" } } do
        assert.error_matches(function() client:retrigger(case[1]) end,
          "bad argument #1 to 'retrigger' %(run id [^)]*" .. case[2]:gsub("%-", "%%-"))
      end
      client:close()
      assert.same({}, server:requests())
    end)
  end)

  describe("lifecycle", function()
    it("raises on a call after close; close twice is fine", function()
      local client = new()
      client:close()
      client:close()
      assert.error_matches(function() client:retrigger(runs.failed) end, "flowservice: client is closed")
      assert.error_matches(function() client:get_run(runs.failed) end, "flowservice: client is closed")
      assert.error_matches(function() client:list_runs { flow_id = "x" } end, "flowservice: client is closed")
    end)

    it("gives its connections back on close", function()
      local before = own_sockets()
      local client = new()
      assert.is_table((client:retrigger(runs.failed)))
      assert.is_true(own_sockets() > before)
      client:close()
      assert.equal(before, own_sockets())
    end)

    it("gives its connections back when collected", function()
      local before = own_sockets()
      do
        local client = new()
        assert.is_table((client:retrigger(runs.failed)))
        assert.is_true(own_sockets() > before)
      end
      collectgarbage()
      collectgarbage()
      assert.equal(before, own_sockets())
    end)

    if _VERSION == "Lua 5.4" then
      it("closes as a <close> variable", function()
        local before = own_sockets()
        local chunk = assert(load([[
          local flowservice, opts, run_id = ...
          local client <close> = flowservice.new(opts)
          assert(client:retrigger(run_id))
          return client
        ]]))
        local client = chunk(flowservice, h.opts(server.url), runs.failed)
        assert.equal(before, own_sockets())
        assert.error_matches(function() client:retrigger(runs.failed) end, "client is closed")
      end)
    end

    it("prints base URL, org and sandbox, and keeps secrets out of its fields", function()
      local client = new { sandbox = "dev" }
      assert.equal("flowservice.client(" .. server.url .. ", org FAKEORG@AdobeOrg, sandbox dev)",
        tostring(client))
      local function dump(t, seen)
        seen = seen or {}
        if seen[t] then return "" end
        seen[t] = true
        local out = {}
        for k, v in pairs(t) do
          out[#out + 1] = tostring(k) .. "=" .. (type(v) == "table" and dump(v, seen) or tostring(v))
        end
        local mt = getmetatable(t)
        if type(mt) == "table" then out[#out + 1] = dump(mt, seen) end
        return table.concat(out, " ")
      end
      local text = dump(client)
      assert.not_matches("fake-token", text, 1, true)
      assert.not_matches("fake-api-key", text, 1, true)
      client:close()
    end)
  end)

  describe("argument errors", function()
    it("raise in new for unknown or mistyped options, Lua's and C's", function()
      local function raises(pattern, extra)
        assert.error_matches(function() flowservice.new(h.opts(server.url, extra)) end, pattern)
      end
      raises("bad argument #1 to 'new' %(option 'acess_token' is unknown%)", { acess_token = "x" })
      raises("bad argument #1 to 'new' %(option 'timeout' must be a number, got string%)", { timeout = "1" })
      raises("option 'retry' field 'attemps' is unknown", { retry = { attemps = 2 } })
      raises("option 'retry' field 'attempts' must be a whole number >= 1", { retry = { attempts = 0 } })
      raises("option 'credentials' field 'secret' is unknown",
        { credentials = { client_id = "a", secret = "b", scopes = "c" } })
      raises("option 'credentials' field 'client_secret' is required",
        { credentials = { client_id = "a", scopes = "c" } })
      raises("option 'deadline' must be a positive number", { deadline = -1 })
      raises("option 'log' must be a function, got string", { log = "stderr" })
      assert.error_matches(function() flowservice.new() end, "bad argument #1 to 'new' %(table expected, got nil%)")
      local o = h.opts(server.url)
      o.access_token = nil
      assert.error_matches(function() flowservice.new(o) end, "option 'access_token' is required")
    end)

    it("raise for per-call options a call may not change", function()
      local client = new()
      assert.error_matches(function() client:retrigger(runs.failed, { access_token = "x" }) end,
        "bad argument #2 to 'retrigger' %(per%-call option 'access_token' is unknown%)")
      assert.error_matches(function() client:retrigger(runs.failed, { timeout = "x" }) end,
        "per%-call option 'timeout' must be a number, got string")
      assert.error_matches(function() client:retrigger(runs.failed, { timeout = -1 }) end,
        "option 'timeout' must be a positive number")
      assert.error_matches(function() client:retrigger(nil) end,
        "bad argument #1 to 'retrigger' %(run id must be a non%-empty string, got nil%)")
      client:close()
      assert.same({}, server:requests())
    end)
  end)
end)

describe("flowservice.new over HTTPS", function()
  local pki, server

  setup(function()
    pki = tls.make()
    server = fake.start { tls = { cert = pki.cert, key = pki.key, http2 = true } }
  end)
  teardown(function()
    if server then server:stop() end
    tls.remove(pki)
  end)

  it("negotiates HTTP/2 when the server offers it, and multiplexes on one connection", function()
    local client = flowservice.new(h.opts(server.tls_url, { ca_file = pki.ca_file }))
    for _ = 1, 3 do assert.is_table((client:retrigger(runs.failed))) end
    client:close()
    local got = server:requests()
    assert.equal(3, #got)
    for i, r in ipairs(got) do
      assert.equal(2, r.http_version)
      assert.is_true(r.tls)
      if FRESH then
        if i > 1 then assert.not_equal(got[i - 1].connection, r.connection) end
      else
        assert.equal(got[1].connection, r.connection)
      end
    end
  end)
end)
