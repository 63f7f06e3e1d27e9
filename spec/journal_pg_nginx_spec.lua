-- The PostgreSQL journal inside nginx: two nginx instances (two "hosts"),
-- each running retry_failed from a timer on one ledger; the database waits
-- go through ngx.sleep, so each worker keeps answering meanwhile.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local nginx = require "spec.support.nginx"
local pgserver = require "spec.support.pg"
local cjson = require "cjson"

local WIDE = "5b0e7a11-0000-4000-8000-000000000200"
local WIDE_RUNS = 200

local function capture(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

local function get(url)
  return capture("curl -s --noproxy '*' --max-time 20 " .. h.q(url))
end

-- seconds one GET of url takes
local function timed_get(url)
  local t0 = h.now()
  get(url)
  return h.now() - t0
end

local CONF = [[
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
@USER@
daemon on;
master_process on;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log notice;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body_temp;
    proxy_temp_path       @PREFIX@/proxy_temp;
    fastcgi_temp_path     @PREFIX@/fastcgi_temp;
    uwsgi_temp_path       @PREFIX@/uwsgi_temp;
    scgi_temp_path        @PREFIX@/scgi_temp;
    lua_package_path  "@ROOT@/build/tree-5.1/share/lua/5.1/?.lua;@ROOT@/build/tree-5.1/share/lua/5.1/?/init.lua;;";
    lua_package_cpath "@ROOT@/build/tree-5.1/lib/lua/5.1/?.so;/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;";
    lua_shared_dict results 1m;
    server {
        listen 127.0.0.1:@PORT1@;
        location = /health { return 200 "ok\n"; }
        location = /job {
            content_by_lua_block {
                local cjson = require "cjson"
                ngx.shared.results:delete("job")
                local ok, err = ngx.timer.at(0, function(premature)
                    if premature then return end
                    local client = require("flowservice").new { access_token = "fake-token",
                        api_key = "fake-api-key", org_id = "FAKEORG@AdobeOrg", base_url = "@FAKE_URL@",
                        timeout = 30 }
                    local report, job_err = client:retry_failed { flow_id = "@FLOW@", journal = "@JOURNAL@",
                        concurrency = 8, grace = 0 }
                    client:close()
                    local ids = {}
                    for i, r in ipairs(report and report.retriggered or {}) do ids[i] = r.run_id end
                    ngx.shared.results:set("job", report and cjson.encode { retriggered = ids,
                        skipped = #report.skipped, failed = #report.failed, ambiguous = #report.ambiguous }
                        or cjson.encode { error = tostring(job_err) })
                end)
                ngx.say(ok and "started" or err)
            }
        }
        location = /job-result {
            content_by_lua_block { ngx.say(ngx.shared.results:get("job") or "pending") }
        }
    }
}
]]

describe("#openresty #postgresql journal in nginx", function()
  local flow_service, db, servers, fixture_path = nil, nil, {}, nil

  setup(function()
    local doc = cjson.decode((assert(h.read("fake/runs.json"))))
    doc.flows[#doc.flows + 1] = { id = WIDE, name = "wide flow", enabled = true, source = "batch" }
    doc.generated[#doc.generated + 1] = { flowId = WIDE, count = WIDE_RUNS, status = "failed",
      id_prefix = "5b0e7a11", start = 1764000000000, step_ms = 1000, duration_ms = 500,
      outputRecordCount = 0, createdClient = "scheduler" }
    fixture_path = os.tmpname()
    h.write(fixture_path, cjson.encode(doc))
    flow_service = fake.start { fixture = fixture_path }
    db = pgserver.start()
    -- the worker reads the passfile, which is root's when the suite runs as root
    local user = capture("id -u"):match("^0") and "user root root;" or ""
    local root = capture("pwd"):gsub("%s+$", "")
    for i = 1, 2 do
      servers[i] = nginx.start { text = CONF, ready = "/health", timeout = 10,
        vars = { USER = user, ROOT = root, FAKE_URL = flow_service.url, FLOW = WIDE, JOURNAL = db.uri } }
    end
  end)

  teardown(function()
    for _, s in ipairs(servers) do s:stop() end
    if flow_service then flow_service:stop() end
    if db then db:destroy() end
    if fixture_path then os.remove(fixture_path) end
  end)

  it("two nginx instances, each running the job from a timer, one ledger: every run once, no worker blocked", function()
    flow_service:scenario { match = "^POST ", delay = 0.02, times = 0 }
    assert(require("flowservice.journal").migrate(db.uri))
    -- another session holds the table for 1 s: both jobs wait on the database first
    h.sh(("%s >/dev/null 2>&1 &"):format(db:as_owner(("%s/psql -X -q -h %s -p %d -U postgres -d flowservice -c %s")
      :format(db.bin, h.q(db.dir), db.port, h.q("BEGIN; LOCK TABLE flowservice_journal IN ACCESS EXCLUSIVE MODE;"
        .. " SELECT pg_sleep(1); COMMIT;")))))
    local deadline = h.now() + 10
    while not db:psql("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation ="
      .. " 'flowservice_journal'::regclass"):match("^1") and h.now() < deadline do h.sleep(0.02) end
    for _, s in ipairs(servers) do assert.equal("started", (get(s.url .. "/job"):gsub("%s+$", ""))) end
    -- while the jobs wait on the locked table, each worker answers at once
    local slowest = 0
    for _ = 1, 5 do
      for _, s in ipairs(servers) do slowest = math.max(slowest, timed_get(s.url .. "/health")) end
      h.sleep(0.05)
    end
    assert.is_true(slowest < 0.5, "a worker was blocked for " .. slowest .. " s")
    local results = {}
    for i, s in ipairs(servers) do
      local text = "pending"
      local until_t = h.now() + 120
      while h.now() < until_t do
        text = get(s.url .. "/job-result"):gsub("%s+$", "")
        if text ~= "pending" then break end
        h.sleep(0.1)
      end
      results[i] = cjson.decode(text)
      assert.is_nil(results[i].error)
      assert.equal(0, results[i].failed)
      assert.equal(0, results[i].ambiguous)
      assert.equal(WIDE_RUNS, #results[i].retriggered + results[i].skipped)
    end
    assert.equal(WIDE_RUNS, #results[1].retriggered + #results[2].retriggered)
    local by_source = flow_service:stats().by_source
    for i = 1, WIDE_RUNS do
      assert.equal(1, by_source[("5b0e7a11-0000-4000-8000-%012d"):format(i)], "run " .. i)
    end
    assert.equal(WIDE_RUNS, flow_service:stats().posts)
  end)
end)
