-- flowservice retrigger RUN_ID ...: the guarded path of retry-failed, for
-- runs named by id (each read first, each at most once).
local config = require "flowservice.cli.config"
local job = require "flowservice.cli.job"
local journals = require "flowservice.cli.journals"
local output = require "flowservice.cli.output"
local report = require "flowservice.cli.report"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local ipairs, tostring = ipairs, tostring
local format = string.format

local function define(def)
  def.argument("RUN_ID", "a run to re-trigger; - reads run ids from stdin, one a line", "*")
  def.flag("--force", "re-trigger runs already re-triggered (journaled too)")
  def.value("--journal", "FILE|URI", "where progress is kept (or FLOWSERVICE_JOURNAL; default: its"
    .. " flow's journal); a postgresql:// URI: shared by many jobs")
  def.flag("--no-journal", "keep no journal")
  def.value("--concurrency", "N", "re-triggers in flight at once (default 8)")
  def.value("--grace", "SECONDS", "how long a run may take to show up before an ambiguous"
    .. " re-trigger counts as not done")
  def.flag("--dry-run", "say what would be re-triggered, send nothing")
  job.define(def)
end

local function run_ids_of(ctx)
  local ids, seen = {}, {}
  local function add(id)
    values.check_id("run id", id)
    if seen[id] then
      ctx.stderr:write("flowservice: ignoring repeated run id ", id, "\n")
    else
      seen[id], ids[#ids + 1] = true, id
    end
  end
  for _, a in ipairs(ctx.args) do
    if a == "-" then
      for line in ctx.stdin:lines() do
        local id = line:match("^%s*(.-)%s*$")
        if id ~= "" then add(id) end
      end
    else
      add(a)
    end
  end
  if #ids == 0 then usage.fail("retrigger needs at least one RUN_ID (or - to read them from stdin)") end
  return ids
end

local function run(ctx)
  local ids = run_ids_of(ctx)
  local o = ctx.options
  local client, copts = config.client(ctx)
  local spec = {
    run_ids = ids, force = o.force and true or nil, dry_run = o.dry_run and true or nil,
    concurrency = o.concurrency and values.positive_integer("concurrency", o.concurrency),
    grace = o.grace and values.seconds("grace", o.grace),
  }
  spec.journal = journals.choice(o, ctx.getenv, copts, spec.dry_run)
  local r, err, caught = job.run(ctx, client, spec)
  if not r then return output.fail(ctx, err) end
  if ctx.json then
    output.print_json(ctx.stdout, report.json(r, nil, err))
  else
    local outcome = {}
    for _, kind in ipairs { "retriggered", "skipped", "failed", "ambiguous" } do
      for _, e in ipairs(r[kind] or {}) do outcome[e.run_id] = { kind, e } end
    end
    for _, e in ipairs(r.planned or {}) do outcome[e.run_id] = { "planned", e } end
    local why = r.stopped or (err and "the job stopped: " .. tostring(err)) or "?"
    for _, id in ipairs(ids) do ctx.stdout:write(report.retrigger_line(id, outcome[id], why)) end
    for _, st in ipairs(r.settled or {}) do
      ctx.stdout:write(format("%s settled from the journal: %s (%s)\n", tostring(st.run_id),
        tostring(st.outcome), tostring(st.evidence)))
    end
    if err then ctx.stderr:write(tostring(err), "\n") end
  end
  return job.exit_status(ctx, r, err, caught)
end

return {
  name = "retrigger",
  summary = "re-trigger runs by id, each at most once",
  description = "Re-trigger runs by id, each at most once: each run is read first, and one its"
    .. " flow's journal or its childFlowRunIds show re-triggered is skipped.",
  usage = "flowservice retrigger RUN_ID [RUN_ID ...] [FLAGS]\n"
    .. "       flowservice retrigger - [FLAGS]      (run ids from stdin, one a line)",
  examples = {
    "flowservice retrigger 4fb0418e-1804-45d6-8d56-dd51f05c0baf",
    "flowservice list-runs --flow 0a1b2c3d-... --status failed --json | jq -r '.[].id' | flowservice retrigger -",
  },
  client = true,
  define = define,
  run = run,
}
