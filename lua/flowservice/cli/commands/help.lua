-- flowservice help [COMMAND]: the list of commands, or one command's help.
local usage = require "flowservice.cli.usage"

local function run(ctx)
  local name = ctx.args[1]
  if ctx.args[2] then usage.fail("help takes one COMMAND") end
  if not name then
    ctx.stdout:write(ctx.parser:get_help(), "\n")
    return 0
  end
  local cmd = ctx.commands[name]
  if not cmd then
    local near = usage.nearest(name, ctx.command_names)
    usage.fail("unknown command %q%s", name, near and "; did you mean " .. near .. "?" or "")
  end
  ctx.stdout:write(cmd:get_help(), "\n")
  return 0
end

return {
  name = "help",
  summary = "show the commands, or a command's flags and examples",
  usage = "flowservice help [COMMAND]",
  examples = { "flowservice help retry-failed" },
  define = function(def) def.argument("COMMAND", "the command to show help for", "*") end,
  run = run,
}
