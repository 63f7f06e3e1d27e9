-- flowservice get-run RUN_ID: one run, as a summary or as the service's JSON.
local config = require "flowservice.cli.config"
local output = require "flowservice.cli.output"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local function run(ctx)
  if #ctx.args ~= 1 then usage.fail("get-run takes one RUN_ID") end
  local id = values.check_id("run id", ctx.args[1])
  local client = config.client(ctx)
  local r, err = client:get_run(id)
  client:close()
  if not r then return output.fail(ctx, err) end
  if ctx.json then output.print_json(ctx.stdout, r) else ctx.stdout:write(output.run_summary(r)) end
  return 0
end

return {
  name = "get-run",
  summary = "show one run",
  usage = "flowservice get-run RUN_ID [FLAGS]",
  examples = { "flowservice get-run 4fb0418e-1804-45d6-8d56-dd51f05c0baf --json" },
  client = true,
  define = function(def) def.argument("RUN_ID", "the run to show", "*") end,
  run = run,
}
