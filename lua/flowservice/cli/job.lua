-- A job (client:retry_failed) as the command runs it: live progress, SIGINT
-- and SIGTERM (stop sending, let what is in flight finish and be journaled,
-- then report), and the exit status its report means.
local core = require "flowservice.core"
local output = require "flowservice.cli.output"
local progress = require "flowservice.cli.progress"
local usage = require "flowservice.cli.usage"

local hints = require "flowservice.cli.hints"

local error, ipairs, pcall, tonumber, tostring, type = error, ipairs, pcall, tonumber, tostring, type
local format = string.format

local _M = {}

-- The flags of a command that runs a job.
function _M.define(def)
  def.choice("--progress", { "auto", "always", "never" }, "auto (default): a live line with an ETA"
    .. " on a terminal, a line every 10 s elsewhere; always: the live line even off a terminal;"
    .. " never: none")
end

-- How progress shows: --progress, --quiet, and whether stderr is a terminal.
local function progress_for(ctx)
  local how = ctx.options.progress or (ctx.options.quiet and "never") or "auto"
  if how == "auto" then how = ctx.isatty(ctx.stderr) and "live" or "lines" end
  if how == "always" then how = "live" end
  local interval = tonumber(ctx.getenv("FLOWSERVICE_PROGRESS_INTERVAL") or "")
  return progress.new(ctx.stderr, how, interval and interval > 0 and interval or 10)
end

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
  ctx.progress = progress_for(ctx)
  if ctx.progress then
    spec.on_progress = function(counts) ctx.progress.update(counts) end
  end
  -- the wait before counting what a stopped job may have re-triggered
  spec.on_wait = function(seconds, pending)
    ctx.note(format("waiting %s (--grace) for runs that %d pending re-trigger(s) of an earlier job"
      .. " may have made to show up, then counting them", progress.duration(seconds), pending))
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

-- listing: the job's own error came from a listing (retry-failed)
function _M.exit_status(ctx, report, err, caught, listing)
  hints.show(ctx, err, listing)
  for _, f in ipairs(report.failed or {}) do hints.show(ctx, f.error) end
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
