-- A job (client:retry_failed) as the command runs it: live progress, SIGINT
-- and SIGTERM (stop sending, let what is in flight finish and be journaled,
-- then report), and the exit status its report means.
local core = require "flowservice.core"
local output = require "flowservice.cli.output"
local progress = require "flowservice.cli.progress"
local usage = require "flowservice.cli.usage"

local error, ipairs, pcall, tostring, type = error, ipairs, pcall, tostring, type
local format = string.format

local _M = {}

local SIGNAL_EXIT = { INT = 130, TERM = 143 }

local function watch_signals()
  if type(core.signals) ~= "function" then return nil end
  return core.signals { "INT", "TERM" }
end

-- client:retry_failed(spec) with progress and interrupts; closes client.
-- Returns report, err (report nil when the job could not start), signal.
function _M.run(ctx, client, spec)
  local watcher, caught = watch_signals(), nil
  spec.stop = function()
    if not caught and watcher then caught = watcher:pending() end
    return caught and ("interrupted by SIG" .. caught) or nil
  end
  if ctx.isatty(ctx.stderr) then
    ctx.progress = progress.line(ctx.stderr)
    spec.on_progress = function(counts) ctx.progress.update(counts) end
  end
  local ok, report, err = pcall(client.retry_failed, client, spec)
  client:close()
  if ctx.progress then ctx.progress.finish() end
  if not caught and watcher then caught = watcher:pending() end
  if watcher then watcher:close() end
  if not ok then
    local inner = usage.argument_problem(tostring(report))
    if inner then usage.fail("%s", inner) end
    error(report, 0)
  end
  if not report then report = type(err) == "table" and err.report or nil end
  return report, err, caught
end

function _M.exit_status(ctx, report, err, caught)
  if output.is_auth(err) then ctx.stderr:write("flowservice: authentication failed, stopping\n") end
  if caught then
    ctx.stderr:write(format("flowservice: interrupted by SIG%s: %d run(s) not attempted; what was in"
      .. " flight is journaled; run the same command again to resume\n", caught, report.not_attempted or 0))
    return SIGNAL_EXIT[caught]
  end
  local errs = { err }
  for _, f in ipairs(report.failed or {}) do errs[#errs + 1] = f.error or "failed" end
  local code = output.failure_code(errs)
  if code == 0 and type(report.ambiguous) == "table" and #report.ambiguous > 0 then code = 1 end
  if code == 0 and report.outcomes and #report.outcomes.failed > 0 then code = 1 end
  return code
end

return _M
