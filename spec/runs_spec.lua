-- The runs API of a client: get_run, list_runs, each_run, count_runs.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local PAGING = fake.paging_flow
local FAILED = fake.paging_runs.failed -- 250 failed runs, one a minute

-- createdAt / startedAtUTC of generated failed run i
local function started(i) return FAILED.start + (i - 1) * FAILED.step_ms + 1500 end

describe("runs API", function()
  local server, client

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function()
    server:reset()
    client = flowservice.new(h.opts(server.url, { retry = { base_delay = 0.01, max_delay = 0.05 } }))
  end)
  after_each(function() client:close() end)

  local function gets()
    local list = {}
    for _, r in ipairs(server:requests()) do
      if r.method == "GET" then list[#list + 1] = r end
    end
    return list
  end

  -- the property filters of a recorded request, sorted
  local function properties(req)
    local p = req.args.property
    p = type(p) == "table" and p or { p }
    table.sort(p)
    return p
  end

  describe("get_run", function()
    it("returns the run, unwrapped from items", function()
      local run, err = client:get_run(h.runs.failed)
      assert.is_nil(err)
      assert.equal(h.runs.failed, run.id)
      assert.equal("failed", run.metrics.statusSummary.status)
      assert.equal("/runs/" .. h.runs.failed, gets()[1].path)
    end)

    it("returns a 404 as an http error", function()
      local run, err = client:get_run(h.runs.unknown)
      assert.is_nil(run)
      assert.equal("http", err.kind)
      assert.equal(404, err.status)
      assert.equal("FLOW-1101-404", err.code)
    end)

    it("retries a 503 on a GET", function()
      server:scenario { match = "^GET ", status = 503, times = 2 }
      local run, err = client:get_run(h.runs.failed)
      assert.is_nil(err)
      assert.equal(h.runs.failed, run.id)
      assert.equal(3, #gets())
    end)

    it("gives up after attempts, with every request id", function()
      server:scenario { match = "^GET ", status = 502, times = 0 }
      local _, err = client:get_run(h.runs.failed)
      assert.equal(502, err.status)
      assert.equal(4, err.attempts)
      assert.equal(4, #err.request_ids)
      assert.is_nil(err.ambiguous)
    end)
  end)

  describe("list_runs", function()
    it("follows every page, repeating the original query", function()
      local list, err = client:list_runs { flow_id = PAGING, status = "failed" }
      assert.is_nil(err)
      assert.equal(250, #list)
      local seen = {}
      for i, run in ipairs(list) do
        assert.is_nil(seen[run.id])
        seen[run.id] = true
        assert.equal(fake.paging_run_id(251 - i), run.id) -- newest first
      end
      local pages = gets()
      assert.equal(3, #pages)
      for i, req in ipairs(pages) do
        assert.same({ "flowId==" .. PAGING, "metrics.statusSummary.status==failed" }, properties(req))
        assert.equal("-createdAt", req.args.orderby)
        assert.equal("100", req.args.limit)
        if i == 1 then assert.is_nil(req.args.continuationToken)
        else assert.is_string(req.args.continuationToken) end
      end
    end)

    it("sends filters as the API sheet says: any-of status, since inclusive, before exclusive", function()
      local list = assert(client:list_runs { flow_id = PAGING, status = { "failed", "success" },
        since = started(10), before = started(20), order = "+createdAt", page_size = 5,
        filters = { "metrics.recordSummary.outputRecordCount==0" } })
      assert.equal(10, #list)
      assert.equal(fake.paging_run_id(10), list[1].id)
      assert.equal(fake.paging_run_id(19), list[10].id)
      local req = gets()[1]
      assert.same({
        "flowId==" .. PAGING,
        "metrics.durationSummary.startedAtUTC<" .. string.format("%d", started(20)),
        "metrics.durationSummary.startedAtUTC>=" .. string.format("%d", started(10)),
        "metrics.recordSummary.outputRecordCount==0",
        "metrics.statusSummary.status==failed,success",
      }, properties(req))
      assert.equal("+createdAt", req.args.orderby)
      assert.equal("5", req.args.limit)
      assert.equal(2, #gets())
    end)

    it("sends epoch milliseconds as integers even when they come back as floats", function()
      local run = assert(client:get_run(fake.paging_run_id(7)))
      local since = run.metrics.durationSummary.startedAtUTC -- a float on Lua 5.3+
      local list = assert(client:list_runs { flow_id = PAGING, status = "failed", since = since })
      assert.equal(250 - 6, #list)
      for _, p in ipairs(properties(gets()[2])) do assert.not_matches("%.0", p) end
    end)

    it("stops at max", function()
      local list = assert(client:list_runs { flow_id = PAGING, status = "failed", max = 120 })
      assert.equal(120, #list)
      assert.equal(2, #gets())
    end)

    it("follows a next link that carries the whole query", function()
      server:scenario { match = "^GET /runs%?", link_style = "full", times = 0 }
      local list = assert(client:list_runs { flow_id = PAGING, status = "failed" })
      assert.equal(250, #list)
    end)

    it("refuses to loop on a repeated continuationToken", function()
      server:scenario { match = "^GET /runs%?", repeat_token = true, times = 0 }
      local list, err = client:list_runs { flow_id = PAGING, status = "failed" }
      assert.is_nil(list)
      assert.equal("protocol", err.kind)
      assert.matches("continuationToken", tostring(err))
      assert.equal(1, err.attempts)
      assert.equal(err.request_ids[1], err.request_id)
      assert.is_true(#gets() <= 3)
    end)

    it("returns a failing page's error", function()
      server:scenario { match = "continuationToken", status = 400,
        body = '{"type":"https://ns.adobe.com/aep/errors/FLOW-1110-400","title":"bad token","status":400}' }
      local list, err = client:list_runs { flow_id = PAGING, status = "failed" }
      assert.is_nil(list)
      assert.equal("FLOW-1110-400", err.code)
    end)

    it("returns an empty list for no match", function()
      local list = assert(client:list_runs { flow_id = "no-such-flow" })
      assert.same({}, list)
    end)

    it("raises on a bad query", function()
      local function raises(pattern, q)
        assert.error_matches(function() client:list_runs(q) end, pattern)
      end
      raises("bad argument #1 to 'list_runs' %(query field 'flow' is unknown%)", { flow = PAGING })
      raises("query field 'since' must be a whole number", { since = 1.5 })
      raises("query field 'since' \"the 24th\" is not a time", { since = "the 24th" })
      raises("query field 'before' 1764000000 looks like epoch seconds", { before = 1764000000 .. "" })
      raises("query field 'since' must be epoch ms or a time string, got table", { since = {} })
      raises("query field 'page_size' must be from 1 to 100", { page_size = 500 })
      raises("query 'status' entries must be non%-empty strings without ','", { status = "failed,success" })
      raises("query must be a table, got nil", nil)
      assert.same({}, server:requests())
    end)
  end)

  describe("each_run", function()
    it("iterates page by page", function()
      local n = 0
      for run in client:each_run { flow_id = PAGING, status = "failed", page_size = 100 } do
        n = n + 1
        if n == 1 then assert.equal(1, #gets()) end -- lazily: one page so far
        assert.equal(fake.paging_run_id(251 - n), run.id)
      end
      assert.equal(250, n)
      assert.equal(3, #gets())
    end)

    it("raises the error object of a page that fails", function()
      server:scenario { match = "continuationToken", status = 404, times = 0 }
      local n = 0
      local ok, err = pcall(function()
        for _ in client:each_run { flow_id = PAGING, status = "failed" } do n = n + 1 end
      end)
      assert.is_false(ok)
      assert.is_true(flowservice.is_error(err))
      assert.equal(404, err.status)
      assert.equal(100, n)
    end)
  end)

  describe("count_runs", function()
    it("asks with count=true and returns a number", function()
      local n, err = client:count_runs { flow_id = PAGING, status = "failed" }
      assert.is_nil(err)
      assert.equal(250, n)
      local req = gets()[1]
      assert.equal("true", req.args.count)
      assert.is_nil(req.args.limit)
      assert.equal(20, (client:count_runs { flow_id = PAGING, status = "success" }))
    end)
  end)
end)
