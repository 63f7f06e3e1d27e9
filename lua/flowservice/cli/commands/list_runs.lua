-- flowservice list-runs: a flow's runs (or every flow's), newest first.
local config = require "flowservice.cli.config"
local output = require "flowservice.cli.output"
local values = require "flowservice.cli.values"

local ipairs = ipairs

local function define(def)
  def.value("--flow", "FLOW_ID", "the flow (default: every flow of the sandbox)")
  def.value("--status", "S[,S]", "only runs with these statuses: failed, success, partialSuccess,"
    .. " inProgress, cancelled")
  def.value("--since", "TIME", "runs that started at or after TIME")
  def.value("--before", "TIME", "runs that started before TIME")
end

local function run(ctx)
  ctx.no_arguments()
  local o = ctx.options
  local flow_id = o.flow and values.check_id("--flow", o.flow) -- none: every flow
  local since, before = values.time_window(o)
  local status = o.status and values.statuses(o.status)
  local client = config.client(ctx)
  local runs, err = client:list_runs { flow_id = flow_id, status = status, since = since, before = before }
  client:close()
  if not runs then return output.fail(ctx, err, true) end
  if ctx.json then
    output.print_json(ctx.stdout, output.list(runs))
  else
    ctx.stdout:write(output.RUN_HEADER)
    for _, r in ipairs(runs) do ctx.stdout:write(output.run_line(r)) end
  end
  return 0
end

return {
  name = "list-runs",
  summary = "list a flow's runs (without --flow: every flow's), newest first",
  usage = "flowservice list-runs [--flow FLOW_ID] [--status S[,S]] [--since TIME] [--before TIME] [FLAGS]",
  examples = {
    "flowservice list-runs --flow 0a1b2c3d-... --status failed --since 24h",
    "flowservice list-runs --status failed,partialSuccess --since yesterday --json",
  },
  client = true,
  define = define,
  run = run,
}
