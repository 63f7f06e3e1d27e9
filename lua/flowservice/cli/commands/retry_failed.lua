-- flowservice retry-failed: re-trigger every eligible failed run of a flow,
-- or of every flow of the sandbox, each at most once (the journal).
local config = require "flowservice.cli.config"
local hints = require "flowservice.cli.hints"
local job = require "flowservice.cli.job"
local journals = require "flowservice.cli.journals"
local output = require "flowservice.cli.output"
local report = require "flowservice.cli.report"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local tostring, type = tostring, type
local usage_error = usage.fail

local function define(def)
  def.value("--flow", "FLOW_ID", "the flow whose failed runs to re-trigger")
  def.flag("--all-flows", "every flow of the sandbox instead (each its own journal)")
  def.value("--since", "TIME", "runs that started at or after TIME (default: 24h; all: no bound)")
  def.value("--before", "TIME", "runs that started before TIME")
  def.value("--status", "S[,S]", "statuses to list (default: failed); the service re-triggers only"
    .. " failed runs, and successful ones with 0 records (--zero-record-success)")
  def.flag("--zero-record-success", "also successful runs that ingested no record")
  def.value("--only-code", "CODE[,CODE]", "only runs with an error code starting so (any code of"
    .. " the run, nested ones too)")
  def.value("--exclude-code", "CODE[,CODE]", "skip runs with such an error code")
  def.value("--concurrency", "N", "re-triggers in flight at once (default 8)")
  def.value("--journal", "FILE|URI", "where progress is kept (or FLOWSERVICE_JOURNAL; default: one"
    .. " file per org/sandbox/flow under $XDG_STATE_HOME/flowservice); a postgresql:// URI: one"
    .. " journal that many jobs on many hosts share")
  def.flag("--no-journal", "keep no journal")
  def.value("--grace", "SECONDS", "how long a run may take to show up before an ambiguous"
    .. " re-trigger counts as not done")
  def.list("--resolve", "RUN_ID=done|retry", "decide a run left ambiguous by an earlier job"
    .. " (repeatable)")
  def.flag("--dry-run", "list what would be re-triggered, send nothing")
  def.flag("--wait", "follow each re-run until it finishes; exit 1 if one failed")
  def.value("--wait-timeout", "SECONDS", "how long --wait follows (default 2 h)")
  def.value("--max-active", "N", "at most N re-runs of one flow executing at once (follows them"
    .. " as --wait does)")
  job.define(def)
end

local function run(ctx)
  local o = ctx.options
  ctx.no_arguments()
  if o.all_flows and o.flow then usage_error("give --flow FLOW_ID or --all-flows, not both") end
  if o.all_flows and o.resolve then usage_error("--resolve needs --flow FLOW_ID") end
  if not o.all_flows and not o.flow then usage_error("missing --flow FLOW_ID") end
  local flow_id = not o.all_flows and values.check_id("--flow", o.flow) or nil
  local since, before = values.time_window(o, "24h")
  local spec = {
    flow_id = flow_id, all_flows = o.all_flows and true or nil, since = since, before = before,
    status = o.status and values.statuses(o.status),
    zero_record_success = o.zero_record_success and true or nil,
    codes = o.only_code and values.error_codes("only-code", o.only_code),
    exclude_codes = o.exclude_code and values.error_codes("exclude-code", o.exclude_code),
    concurrency = o.concurrency and values.positive_integer("concurrency", o.concurrency),
    grace = o.grace and values.seconds("grace", o.grace),
    resolve = values.resolutions(o.resolve),
    dry_run = o.dry_run and true or nil,
    wait_runs = o.wait and true or nil,
    wait_timeout = o.wait_timeout and values.seconds("wait-timeout", o.wait_timeout),
    max_active = o.max_active and values.positive_integer("max-active", o.max_active),
  }
  if spec.wait_timeout and not (spec.wait_runs or spec.max_active) then
    usage_error("--wait-timeout needs --wait or --max-active")
  end
  local client, copts = config.client(ctx)
  local journal = journals.choice(o, ctx.getenv, copts, spec.dry_run)
  if flow_id and type(journal) == "function" then journal = journal(flow_id) end
  spec.journal = journal
  local r, err, caught = job.run(ctx, client, spec)
  if not r then return output.fail(ctx, err) end
  if ctx.json then
    output.print_json(ctx.stdout, report.json(r, flow_id, err))
  else
    ctx.stdout:write(report.text(r, flow_id or "every flow of the sandbox"))
    if err then ctx.stderr:write(tostring(err), "\n") end
  end
  -- a flow that does not exist or cannot run: nothing was sent
  if err and (err.not_found or err.kind == "flow") then
    hints.show(ctx, err)
    return 2
  end
  return job.exit_status(ctx, r, err, caught, true)
end

return {
  name = "retry-failed",
  summary = "re-trigger every eligible failed run of a flow (or of every flow)",
  description = "Re-trigger every eligible failed run of a flow, or with --all-flows of every flow"
    .. " of the sandbox, each at most once: a journal per org/sandbox/flow remembers what was sent,"
    .. " so the same command run again (after a crash, a kill, Ctrl-C) never re-triggers twice.",
  usage = "flowservice retry-failed (--flow FLOW_ID | --all-flows) [FLAGS]",
  examples = {
    "flowservice retry-failed --flow 0a1b2c3d-... --dry-run        # what would be re-triggered",
    "flowservice retry-failed --flow 0a1b2c3d-... --since 7d --wait  # re-trigger, follow the re-runs",
    "flowservice retry-failed --all-flows --only-code CONNECTOR-2001 --max-active 4",
  },
  client = true,
  define = define,
  run = run,
}
