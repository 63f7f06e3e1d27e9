-- lua-flowservice inside a real nginx with Debian's Lua module (LuaJIT):
-- calls wait with ngx.sleep, so one worker serves many at once and stays
-- responsive; init_by_lua may block; phases that cannot yield refuse.
local fake = require "spec.support.fake"
local nginx = require "spec.support.nginx"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local function sh_capture(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

local function get(url, extra)
  return sh_capture("curl -s --noproxy '*' --max-time 10 " .. (extra or "") .. " '" .. url .. "'")
end

local function repo_root()
  return sh_capture("pwd"):gsub("%s+$", "")
end

describe("#openresty lua-flowservice in nginx", function()
  local flow_service, server, journal, tmp

  setup(function()
    flow_service = fake.start()
    tmp = sh_capture("mktemp -d /tmp/flowservice-openresty.XXXXXX"):gsub("%s+$", "")
    os.execute("chmod 777 " .. tmp) -- the nginx worker (nobody) writes the journal here
    journal = tmp .. "/job.jsonl"
    server = nginx.start {
      template = "spec/support/openresty.conf.in",
      vars = { ROOT = repo_root(), FAKE_URL = flow_service.url, INIT_RUN = h.runs.failed,
        BULK_FLOW = fake.flows.bulk, PAGING_FLOW = fake.paging_flow, JOURNAL = journal },
      ready = "/health",
      timeout = 10,
    }
  end)

  teardown(function()
    if server then server:stop() end
    if flow_service then flow_service:stop() end
    if tmp then os.execute("rm -rf '" .. tmp .. "'") end
  end)

  it("lets init_by_lua make a blocking call, and no worker reuses its connection", function()
    local id = get(server.url .. "/init-result"):gsub("%s+$", "")
    local made = flow_service:run(id)
    assert.is_table(made, "init_by_lua said: " .. id)
    flow_service:clear_requests()
    assert.matches('"id"', get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST"))
    local seen = flow_service:requests()
    assert.equal(1, #seen)
    assert.equal(1, seen[1].connection_requests) -- a fresh connection, the worker's own
  end)

  it("serves 50 concurrent re-triggers in one worker in far less than 50 x 200 ms, /health staying fast", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 0.2, times = 0 }
    local urls = {}
    for i = 1, 50 do urls[i] = "-o /dev/null '" .. server.url .. "/retrigger?run=" .. h.runs.failed .. "'" end
    local out = tmp .. "/parallel"
    os.execute(("( s=$(date +%%s%%N); curl -s --noproxy '*' --max-time 20 --parallel --parallel-immediate "
      .. "--parallel-max 50 -X POST -w '%%{http_code}\\n' %s > %s.codes; e=$(date +%%s%%N); "
      .. "echo $(( (e - s) / 1000000 )) > %s.ms ) 2>/dev/null &"):format(table.concat(urls, " "), out, out))
    os.execute("sleep 0.1")
    local health = {}
    for i = 1, 3 do
      health[i] = tonumber(get(server.url .. "/health", "-o /dev/null -w '%{time_total}'"))
    end
    local total_ms
    for _ = 1, 200 do
      local f = io.open(out .. ".ms")
      total_ms = f and tonumber(f:read("*a"))
      if f then f:close() end
      if total_ms then break end
      os.execute("sleep 0.05")
    end
    assert.is_number(total_ms, "the parallel requests never finished")
    local codes = {}
    for code in io.lines(out .. ".codes") do codes[#codes + 1] = code end
    assert.equal(50, #codes)
    for _, code in ipairs(codes) do assert.equal("200", code) end
    assert.is_true(total_ms < 1000, "50 re-triggers took " .. total_ms .. " ms (blocking would take 10 s)")
    for _, t in ipairs(health) do
      assert.is_true(t < 0.05, "/health took " .. t .. " s while re-triggers were in flight")
    end
    assert.is_true(flow_service:stats().max_in_flight >= 40)
    assert.equal("0", get(server.url .. "/in-flight"):gsub("%s+$", ""))
  end)

  it("drives the engine from one pump per worker: no request polls, the pump stops when idle", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 0.2, times = 0 }
    local before = cjson.decode(get(server.url .. "/pump"))
    local urls = {}
    for i = 1, 50 do urls[i] = "-o /dev/null '" .. server.url .. "/retrigger?run=" .. h.runs.failed .. "'" end
    local codes = sh_capture("curl -s --noproxy '*' --max-time 20 --parallel --parallel-immediate "
      .. "--parallel-max 50 -X POST -w '%{http_code}\\n' " .. table.concat(urls, " ") .. " 2>/dev/null")
    local n = 0
    for code in codes:gmatch("%d+") do
      assert.equal("200", code)
      n = n + 1
    end
    assert.equal(50, n)
    local after = cjson.decode(get(server.url .. "/pump"))
    assert.is_false(after.running) -- nothing in flight: the pump stopped
    -- 50 pollers would have stepped ~50 x 200 times (1-20 ms each); one pump
    -- with a 1 ms tick steps about once per ms of the ~0.25 s it ran
    local ticks = after.ticks - before.ticks
    assert.is_true(ticks > 0 and ticks < 2000, "the pump stepped " .. ticks .. " times")
    assert.is_true(after.starts - before.starts <= 5, "the pump started " .. (after.starts - before.starts) .. " times")
    assert.equal(before.late, after.late) -- every call was woken by the pump, none by the safety net
  end)

  it("takes the transfer of a light thread killed while it waits away with the garbage", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 2, times = 0 }
    assert.equal("1 0", get(server.url .. "/thread-dies"):gsub("%s+$", ""))
    flow_service:reset()
    assert.matches('"id"', get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST"))
  end)

  it("ends a waiting call at once, sent and ambiguous, when its client is closed", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 1, times = 0 }
    assert.equal("true true promptly", get(server.url .. "/close-while-waiting"):gsub("%s+$", ""))
  end)

  it("removes the transfer of an aborted request by __gc, before its reply comes", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 2, times = 0 }
    get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST --max-time 0.1")
    -- the reply comes 2 s after the POST: only __gc can empty the engine before
    local deadline, in_flight = h.now() + 1.5
    repeat
      in_flight = (get(server.url .. "/in-flight"):gsub("%s+$", ""))
      if in_flight ~= "0" then h.sleep(0.05) end
    until in_flight == "0" or h.now() > deadline
    assert.equal("0", in_flight)
    flow_service:reset()
    assert.matches('"id"', get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST"))
  end)

  it("leaves no transfer behind when the client of a request goes away", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 0.5, times = 0 }
    get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST --max-time 0.1")
    os.execute("sleep 0.7")
    assert.equal("0", get(server.url .. "/in-flight"):gsub("%s+$", ""))
  end)

  it("finishes a waiting request while the worker exits (reload), and serves on in the new worker", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 1.5, times = 1 } -- this request's only
    local old_pid = cjson.decode(get(server.url .. "/pump")).pid
    local out = tmp .. "/exiting"
    os.execute(("curl -s --noproxy '*' --max-time 10 -X POST -o %s.body -w '%%{http_code}' '%s' > %s.code 2>/dev/null &")
      :format(out, server.url .. "/retrigger?run=" .. h.runs.failed, out))
    os.execute("sleep 0.2")
    os.execute("kill -HUP " .. server.pid) -- the old worker exits once its requests are done
    local new_pid
    for _ = 1, 100 do -- a new worker takes over while the request still waits in the old one
      new_pid = cjson.decode(get(server.url .. "/pump")).pid
      if new_pid ~= old_pid then break end
      os.execute("sleep 0.02")
    end
    assert.are_not.equal(old_pid, new_pid)
    local f = io.open(out .. ".code")
    assert.equal("", f and f:read("*a") or "")
    if f then f:close() end
    local code
    for _ = 1, 100 do
      f = io.open(out .. ".code")
      code = f and f:read("*a")
      if f then f:close() end
      if code and code ~= "" then break end
      os.execute("sleep 0.05")
    end
    assert.equal("200", code)
    assert.matches('"id"', get(server.url .. "/retrigger?run=" .. h.runs.failed, "-X POST"))
  end)

  it("lists runs across pages and reads one run the same way", function()
    flow_service:reset()
    flow_service:scenario { match = "^GET ", delay = 0.05, times = 0 }
    assert.equal(fake.paging_runs.failed.count .. " " .. h.runs.failed, get(server.url .. "/runs"):gsub("%s+$", ""))
  end)

  it("refuses to wait in a phase that cannot yield, with a clear error", function()
    local body = get(server.url .. "/set-phase")
    assert.matches("cannot wait for the network in nginx's set phase, which cannot yield", body, 1, true)
  end)

  it("runs retry_failed from a timer, journal and all", function()
    flow_service:reset()
    flow_service:scenario { match = "^POST ", delay = 0.05, times = 0 }
    assert.equal("started", get(server.url .. "/job"):gsub("%s+$", ""))
    -- nothing but the job is in flight: the pump runs for it (it stops
    -- between the job's rounds when nothing is in flight)
    local pumped = false
    for _ = 1, 20 do
      if cjson.decode(get(server.url .. "/pump")).running then pumped = true break end
      os.execute("sleep 0.01")
    end
    assert.is_true(pumped, "the pump never ran for the job")
    -- handlers meanwhile share the worker's pump with the job
    local urls = {}
    for i = 1, 20 do urls[i] = "-o /dev/null '" .. server.url .. "/retrigger?run=" .. h.runs.failed .. "'" end
    local codes = sh_capture("curl -s --noproxy '*' --max-time 20 --parallel --parallel-immediate "
      .. "--parallel-max 20 -X POST -w '%{http_code}\\n' " .. table.concat(urls, " ") .. " 2>/dev/null")
    assert.equal(("200\n"):rep(20), codes)
    local result = "pending"
    for _ = 1, 200 do
      result = get(server.url .. "/job-result"):gsub("%s+$", "")
      if result ~= "pending" then break end
      os.execute("sleep 0.05")
    end
    local report = cjson.decode(result)
    assert.equal(fake.bulk_runs.failed.count, report.retriggered)
    assert.equal(0, report.failed)
    local lines = 0
    for _ in io.lines(journal) do lines = lines + 1 end
    assert.is_true(lines >= 2 * fake.bulk_runs.failed.count)
    assert.is_true(flow_service:stats().max_in_flight >= 8)
    assert.is_false(cjson.decode(get(server.url .. "/pump")).running)
  end)
end)
