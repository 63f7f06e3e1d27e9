-- The exactly-once fault campaign: hundreds of failed runs across several
-- flows, re-triggered by jobs (real processes) while the fake injects, at
-- random but reproducibly (CAMPAIGN_SEED), every fault a client must
-- survive, and the jobs are SIGKILLed at random moments and resumed, with a
-- second job started on the same journals meanwhile. At the end, counted by
-- the fake: every failed run re-triggered exactly once, none twice, and
-- every re-trigger's pending line was on disk when its POST arrived.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local cjson = require "cjson"

local SEED = tonumber(os.getenv("CAMPAIGN_SEED") or "") or 20261201
local KILL_CYCLES = 12 -- SIGKILLs of a running job, each followed by a resume
local FLOWS = { fake.flows.paging, fake.flows.bulk, fake.flows.enabled }
local EXTRA_RUNS = 200 -- injected into the enabled flow: work for every kill cycle
local API_KEY, OTHER_KEY = fake.credentials.api_key, fake.ims_client.client_id

local function sh(cmd)
  local ok, _, code = os.execute(cmd)
  if type(ok) == "number" then return ok end
  return ok and 0 or code
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local text = f:read("*a")
  f:close()
  return text
end

local alive, wait_gone = h.alive, h.wait_gone

describe("#campaign exactly once under faults", function()
  local server, dir

  setup(function()
    server = fake.start()
    local p = assert(io.popen("mktemp -d /tmp/flowservice-campaign.XXXXXX"))
    dir = p:read("*l")
    p:close()
  end)
  teardown(function()
    server:stop()
    sh("rm -rf " .. q(dir))
  end)

  -- a job in the background: pid, and its output file
  local jobs = 0
  local function start_job(api_key)
    jobs = jobs + 1
    local out = dir .. "/job-" .. jobs .. ".out"
    local pidfile = dir .. "/job-" .. jobs .. ".pid"
    assert.equal(0, sh(("env -u http_proxy -u https_proxy lua5.4 spec/support/campaign_job.lua %s %s %s %s"
      .. " >%s 2>&1 & echo $! >%s"):format(q(server.url), q(dir), q(table.concat(FLOWS, ",")), q(api_key),
      q(out), q(pidfile))))
    return assert(tonumber(read(pidfile):match("%d+"))), out
  end

  local function run_job()
    local pid, out = start_job(API_KEY)
    assert.is_true(wait_gone(pid, 300), "a job did not finish")
    return read(out)
  end

  it("re-triggers every failed run exactly once", function()
    math.randomseed(SEED)
    server:reset()
    for _ = 1, EXTRA_RUNS do
      server:add_run { flowId = fake.flows.enabled, status = "failed", outputRecordCount = 0 }
    end
    -- the eligible set, as the fake holds it before the first job
    local eligible, in_flow = {}, {}
    for _, f in ipairs(FLOWS) do in_flow[f] = true end
    for _, run in ipairs(server:runs()) do
      local status = run.metrics and run.metrics.statusSummary and run.metrics.statusSummary.status
      if in_flow[run.flowId] and type(status) == "string" and status:lower() == "failed"
        and not (type(run.childFlowRunIds) == "table" and #run.childFlowRunIds > 0) then
        eligible[#eligible + 1] = run.id
      end
    end
    assert.is_true(#eligible >= 300, #eligible .. " runs")
    local journals = {}
    for i, f in ipairs(FLOWS) do journals[i] = dir .. "/" .. f .. ".jsonl" end
    server:witness(journals)
    server:ims { expires_in = 60 }
    local chaos = server:chaos { seed = SEED, drop_after = 0.04, status_502 = 0.03, throttle = 0.03,
      throttle_burst = 3, retry_after = 1, slow = 0.02, slow_seconds = 3, revoke = 0.01, get_502 = 0.02,
      latency = 0.05 }
    local t0 = h.now()

    -- kill at random moments, resume; now and then a second job meanwhile
    local kills, second_jobs, refused_second = 0, 0, 0
    -- true once the fake has seen n POSTs; false if pid ended first
    local function posts_or_exit(n, pid)
      local deadline = h.now() + 60
      while h.now() < deadline do
        if server:stats().posts >= n then return true end
        if not alive(pid) then return false end
        h.sleep(0.02)
      end
      return false
    end

    local cycle = 0
    while kills < KILL_CYCLES and cycle < 2 * KILL_CYCLES do
      cycle = cycle + 1
      -- killed after a random number of its POSTs have arrived, plus a moment
      local target = server:stats().posts + math.random(1, 20)
      local pid = start_job(API_KEY)
      if cycle % 3 == 0 and posts_or_exit(target - math.random(0, 10), pid) then
        -- a second job on the same journals: refused where the first holds one;
        -- where it got one, it is a job like any other, and is killed too
        second_jobs = second_jobs + 1
        local other, out = start_job(OTHER_KEY)
        if not wait_gone(other, 1) then
          sh("kill -9 " .. other)
          assert.is_true(wait_gone(other, 10))
        end
        local _, n = read(out):gsub("is in use by another job", "")
        refused_second = refused_second + n
      end
      posts_or_exit(target, pid)
      h.sleep(math.random() * 0.1)
      if alive(pid) then
        sh("kill -9 " .. pid)
        kills = kills + 1
      end
      assert.is_true(wait_gone(pid, 10))
    end

    -- resume until a job finds nothing to do: first with the faults on,
    -- then without them; the last job must find nothing at all
    local passes, settled = 0, 0
    local function resume_until_quiet(max_passes)
      local out
      for _ = 1, max_passes do
        passes = passes + 1
        out = run_job()
        local quiet, lines = true, 0
        for line in out:gmatch("[^\n]+") do
          lines = lines + 1
          local r, a, f, s = line:match("retriggered (%d+) ambiguous (%d+) failed (%d+) settled (%d+)")
          if not r then
            quiet = false -- an error: go again
          else
            settled = settled + tonumber(s)
            if r ~= "0" or a ~= "0" or f ~= "0" or s ~= "0" then quiet = false end
          end
        end
        if quiet and lines == #FLOWS then return true, out end
      end
      return false, out
    end
    resume_until_quiet(8)
    local c = server:stats().chaos -- counted until chaos is turned off
    server:chaos {}
    local quiet, final = resume_until_quiet(4)
    assert.is_true(quiet, "jobs still found work without faults:\n" .. final)

    local stats = server:stats()
    local by_source, once, twice, never = stats.by_source, 0, 0, {}
    for _, id in ipairs(eligible) do
      local n = by_source[id] or 0
      if n == 1 then once = once + 1 elseif n > 1 then twice = twice + 1 else never[#never + 1] = id end
    end
    -- what second jobs sent: only where they held a journal (then counted like any job's)
    local other_posts = 0
    for _, r in ipairs(server:requests()) do
      if r.method == "POST" and r.headers["x-api-key"] == OTHER_KEY then other_posts = other_posts + 1 end
    end
    io.stderr:write(("\ncampaign (seed %d): %d runs in %d flows; faults: %d dropped after acting, %d 502 after"
      .. " acting, %d 429, %d slow past the timeout, %d token revocations, %d GET 502; %d SIGKILLs, %d second"
      .. " jobs (%d refused a held journal, %d POSTs where one got a journal); %d resume passes, %d outcomes settled from journals;"
      .. " %d POSTs witnessed, %d before their pending line; result: %d exactly once, %d twice, %d never;"
      .. " %.1f s\n"):format(SEED, #eligible, #FLOWS, c.drop_after, c.status_502, c.throttle, c.slow,
      c.revoke, c.get_502, kills, second_jobs, refused_second, other_posts, passes, settled, stats.witness.checked,
      stats.witness.missing, once, twice, #never, h.now() - t0))
    assert.is_true(chaos.on)
    assert.equal(0, twice)
    assert.same({}, never)
    assert.equal(#eligible, once)
    assert.equal(0, stats.witness.missing, cjson.encode(stats.witness.missing_runs))
    assert.is_true(stats.witness.checked >= #eligible)
    assert.is_true(kills >= 10, kills .. " kills")
    for _, k in ipairs { "drop_after", "status_502", "throttle", "slow", "revoke" } do
      assert.is_true(c[k] > 0, "no " .. k .. " fault was injected")
    end
  end)
end)
