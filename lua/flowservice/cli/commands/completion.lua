-- flowservice completion bash|zsh|fish: a completion script (argparse's),
-- to load with `source <(flowservice completion bash)` and the like.
local usage = require "flowservice.cli.usage"

local SHELLS = { bash = "get_bash_complete", zsh = "get_zsh_complete", fish = "get_fish_complete" }

local function run(ctx)
  local shell = ctx.args[1]
  if #ctx.args ~= 1 or not SHELLS[shell] then
    usage.fail("completion takes one of bash, zsh, fish%s", shell and (", got %q"):format(shell) or "")
  end
  ctx.stdout:write(ctx.parser[SHELLS[shell]](ctx.parser))
  return 0
end

return {
  name = "completion",
  summary = "print a completion script for bash, zsh or fish",
  usage = "flowservice completion bash|zsh|fish",
  examples = {
    "source <(flowservice completion bash)                 # in ~/.bashrc",
    "flowservice completion zsh > ~/.zfunc/_flowservice     # with fpath+=~/.zfunc",
    "flowservice completion fish > ~/.config/fish/completions/flowservice.fish",
  },
  define = function(def) def.argument("SHELL", "bash, zsh or fish", "*") end,
  run = run,
}
