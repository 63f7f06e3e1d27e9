-- Bulk speed: retry_failed on 500 failed runs, the fake Flow Service
-- answering each re-trigger after 50 ms, journal on; concurrency 32 against
-- the ideal (500 x 50 ms / 32) and against concurrency 1.
--   lua5.4 bench/bulk.lua            (from the repository root, after make build)
-- Environment: BULK_RUNS [500], BULK_DELAY [0.05], BULK_CONCURRENCY [32],
-- BULK_SEQUENTIAL [1]: 0 skips the (slow) concurrency-1 baseline;
-- BULK_POSTGRESQL [0]: 1 also measures the PostgreSQL journal, against a
-- PostgreSQL this starts (spec/support/pg.lua; `make bench-postgresql`).
package.path = "./?.lua;build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;" .. package.path
package.cpath = "build/tree/lib/lua/5.4/?.so;" .. package.cpath

local cjson = require "cjson"
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local RUNS = tonumber(os.getenv("BULK_RUNS") or "500")
local DELAY = tonumber(os.getenv("BULK_DELAY") or "0.05")
local CONCURRENCY = tonumber(os.getenv("BULK_CONCURRENCY") or "32")
local SEQUENTIAL = os.getenv("BULK_SEQUENTIAL") ~= "0"
local FLOW = "5b0e7a11-0000-4000-8000-000000000500"

-- the project's fixture plus one flow of RUNS failed runs
local function fixture()
  local f = assert(io.open("fake/runs.json"))
  local doc = cjson.decode(f:read("*a"))
  f:close()
  doc.flows[#doc.flows + 1] = { id = FLOW, name = "bench flow", enabled = true, source = "batch" }
  doc.generated[#doc.generated + 1] = { flowId = FLOW, count = RUNS, status = "failed",
    id_prefix = "5b0e7a11", start = 1764000000000, step_ms = 1000, duration_ms = 500,
    outputRecordCount = 0, createdClient = "scheduler" }
  local path = os.tmpname()
  f = assert(io.open(path, "w"))
  f:write(cjson.encode(doc))
  f:close()
  return path
end

local function measure(server, concurrency, db)
  server:reset()
  server:scenario { match = "^POST ", delay = DELAY, times = 0 }
  local journal = os.tmpname()
  os.remove(journal)
  if db then
    db:psql("DROP TABLE IF EXISTS flowservice_journal")
    assert(require("flowservice.journal").migrate(db.uri)) -- the schema's creation is not timed
    journal = db.uri
  end
  local client = flowservice.new(h.opts(server.url, { timeout = 30 }))
  local t0 = h.now()
  local report = assert(client:retry_failed { flow_id = FLOW, concurrency = concurrency, journal = journal })
  local elapsed = h.now() - t0
  client:close()
  local lines = 0
  if db then
    lines = tonumber(db:psql("SELECT count(*) FROM flowservice_journal WHERE flow <> ''"):match("%d+"))
  else
    for _ in io.lines(journal) do lines = lines + 1 end
    os.remove(journal)
  end
  assert(#report.retriggered == RUNS, "not every run was re-triggered")
  return elapsed, server:stats().max_in_flight, lines
end

local fixture_path = fixture()
local server = fake.start { fixture = fixture_path }
local ok, err = pcall(function()
  local ideal = RUNS * DELAY / CONCURRENCY
  local elapsed, peak, lines = measure(server, CONCURRENCY)
  print(("| concurrency | runs | seconds | ideal | × ideal | peak in flight | journal lines |"))
  print("|--:|--:|--:|--:|--:|--:|--:|")
  print(("| %d | %d | %.2f | %.2f | %.2f | %d | %d |"):format(CONCURRENCY, RUNS, elapsed, ideal,
    elapsed / ideal, peak, lines))
  if os.getenv("BULK_POSTGRESQL") == "1" then
    local db = require("spec.support.pg").start()
    local pok, perr = pcall(function()
      local pg_elapsed, pg_peak, rows = measure(server, CONCURRENCY, db)
      print(("\nPostgreSQL journal (one transaction a round; %d rows):"):format(rows))
      print("| journal | concurrency | runs | seconds | ideal | × ideal | peak in flight |")
      print("|---|--:|--:|--:|--:|--:|--:|")
      print(("| file | %d | %d | %.2f | %.2f | %.2f | %d |"):format(CONCURRENCY, RUNS, elapsed, ideal,
        elapsed / ideal, peak))
      print(("| PostgreSQL | %d | %d | %.2f | %.2f | %.2f | %d |"):format(CONCURRENCY, RUNS, pg_elapsed, ideal,
        pg_elapsed / ideal, pg_peak))
    end)
    db:destroy()
    if not pok then error(perr, 0) end
  end
  if SEQUENTIAL then
    local seq = measure(server, 1)
    print(("| 1 | %d | %.2f | %.2f | %.2f | 1 | %d |"):format(RUNS, seq, RUNS * DELAY, seq / (RUNS * DELAY), lines))
  end
  print(("\nTarget, under 1.5× the ideal at concurrency %d: %s"):format(CONCURRENCY,
    elapsed < 1.5 * ideal and "PASS" or "FAIL"))
end)
server:stop()
os.remove(fixture_path)
if not ok then error(err, 0) end
