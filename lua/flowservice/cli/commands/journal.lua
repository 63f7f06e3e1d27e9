-- flowservice journal migrate|show: a journal's schema brought up to date
-- (PostgreSQL), or what a journal (file or PostgreSQL) holds.
local journal = require "flowservice.journal"
local journals = require "flowservice.cli.journals"
local output = require "flowservice.cli.output"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local concat = table.concat
local format = string.format
local ipairs, tostring = ipairs, tostring
local usage_error = usage.fail

-- --journal / FLOWSERVICE_JOURNAL, or with --flow the default file of that
-- org (AEP_ORG_ID) and sandbox (AEP_SANDBOX_NAME).
local function target_of(ctx, flow)
  local given = journals.given(ctx.options, ctx.getenv)
  if given then return given end
  local org = ctx.getenv("AEP_ORG_ID")
  if flow and org and org ~= "" then
    local sandbox = ctx.getenv("AEP_SANDBOX_NAME")
    return journals.default_path(ctx.getenv, org, sandbox ~= "" and sandbox or "prod", flow, false)
  end
  usage_error("which journal? give --journal FILE|URI or set FLOWSERVICE_JOURNAL (or --flow with AEP_ORG_ID"
    .. " for that flow's default file)")
end

-- A journal the command cannot use is a configuration error: exit 2.
local function cannot(err)
  usage_error("cannot use the journal: %s", tostring(err and err.message or err))
end

local function migrate(ctx)
  local r, err = journal.migrate(target_of(ctx, nil))
  if not r then cannot(err) end
  if ctx.json then
    output.print_json(ctx.stdout, r)
  elseif r.from == "file" then
    ctx.stdout:write("a file journal has no schema: nothing to migrate\n")
  else
    ctx.stdout:write(format("journal schema: version %s -> %s\n", tostring(r.from), tostring(r.to)))
  end
  return 0
end

local function claim_of(row)
  if not row.job or not (row.state == "pending" or row.state == "ambiguous") then return "-" end
  return format("job %s on host %s until %s", row.job, tostring(row.host), tostring(row.lease_until or "-"))
end

local function show(ctx, flow)
  local list, err = journal.show(target_of(ctx, flow), { flow = flow })
  if not list then cannot(err) end
  if ctx.json then
    for _, row in ipairs(list) do row.new_ids = output.list(row.new_ids) end
    output.print_json(ctx.stdout, { runs = output.list(list) })
    return 0
  end
  ctx.stdout:write(format("%-36s  %-36s  %-9s  %-36s  %s\n", "FLOW", "RUN", "STATE", "NEW RUNS", "CLAIM"))
  for _, row in ipairs(list) do
    ctx.stdout:write(format("%-36s  %-36s  %-9s  %-36s  %s\n", tostring(row.flow or "-"), row.run,
      tostring(row.state), #row.new_ids > 0 and concat(row.new_ids, ",") or "-", claim_of(row)))
  end
  ctx.stdout:write(format("%d runs\n", #list))
  return 0
end

local function run(ctx)
  local o = ctx.options
  local action = ctx.args[1]
  if ctx.args[2] then usage_error("unexpected argument %q", ctx.args[2]) end
  local flow = o.flow and values.check_id("--flow", o.flow) or nil
  if action == "migrate" then
    if flow then usage_error("--flow goes with show") end
    return migrate(ctx)
  elseif action == "show" then
    return show(ctx, flow)
  end
  usage_error(action and format("journal takes migrate or show, not %q", action)
    or "journal takes migrate or show")
end

return {
  name = "journal",
  summary = "bring a journal's schema up to date, or show what it holds",
  usage = "flowservice journal migrate|show [--journal FILE|URI] [--flow FLOW_ID] [--json]",
  description = "migrate: create or upgrade a PostgreSQL journal's schema (a file has none).\n"
    .. "show: every run the journal holds, with its state, the runs it made and (PostgreSQL) who claims it.",
  examples = { "flowservice journal migrate --journal postgresql://flowservice@db.internal/ops",
    "FLOWSERVICE_JOURNAL=postgresql://flowservice@db.internal/ops flowservice journal show --flow FLOW_ID" },
  define = function(def)
    def.argument("ACTION", "migrate or show", "*")
    def.value("--journal", "FILE|URI", "the journal (or FLOWSERVICE_JOURNAL)")
    def.value("--flow", "FLOW_ID", "show only this flow's runs")
    def.flag("--json", "one JSON document on stdout")
  end,
  run = run,
}
