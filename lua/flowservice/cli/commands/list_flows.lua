-- flowservice list-flows: the sandbox's flows; with --since, the failed runs
-- of each in that window.
local config = require "flowservice.cli.config"
local output = require "flowservice.cli.output"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local ipairs, tostring = ipairs, tostring
local format = string.format

local function define(def)
  def.value("--state", "enabled|disabled", "only flows in this state")
  def.value("--since", "TIME", "also count each flow's failed runs since TIME")
end

local function run(ctx)
  ctx.no_arguments()
  local o = ctx.options
  if o.state and o.state ~= "enabled" and o.state ~= "disabled" then
    usage.fail("--state takes enabled or disabled, got %q", o.state)
  end
  local since = o.since and values.parse_time("since", o.since)
  local client = config.client(ctx)
  local flows, err = client:list_flows { state = o.state }
  if not flows then
    client:close()
    return output.fail(ctx, err, true)
  end
  if since then
    for _, flow in ipairs(flows) do
      local n, cerr = client:count_runs { flow_id = flow.id, status = "failed", since = since }
      if not n then
        client:close()
        return output.fail(ctx, cerr, true)
      end
      flow.failed_runs = n
    end
  end
  client:close()
  if ctx.json then
    local out = output.list()
    for i, flow in ipairs(flows) do
      out[i] = { id = flow.id, name = flow.name, state = flow.state, failed_runs = flow.failed_runs }
    end
    output.print_json(ctx.stdout, out)
    return 0
  end
  ctx.stdout:write(format("%-36s  %-8s  %s%s\n", "FLOW", "STATE", since and "FAILED  " or "", "NAME"))
  for _, flow in ipairs(flows) do
    ctx.stdout:write(format("%-36s  %-8s  %s%s\n", tostring(flow.id), tostring(flow.state or "-"),
      since and format("%6d  ", flow.failed_runs) or "", tostring(flow.name or "-")))
  end
  return 0
end

return {
  name = "list-flows",
  summary = "the sandbox's flows; with --since, the failed runs of each",
  usage = "flowservice list-flows [--state enabled|disabled] [--since TIME] [FLAGS]",
  examples = { "flowservice list-flows --state enabled --since 24h" },
  client = true,
  define = define,
  run = run,
}
