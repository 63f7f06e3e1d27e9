-- The report of a retry_failed job: a new one, a job's answer (report, or
-- nil and err carrying the partial report), and several flows' parts merged.
local core = require "flowservice.core"

local now = core.now
local ipairs, pairs = ipairs, pairs

local _M = {}

function _M.new(spec)
  return { considered = 0, retriggered = {}, skipped = {}, failed = {}, ambiguous = {},
    settled = {}, dry_run = spec.dry_run or false, journals = {} }
end

-- A job's answer: its report, or nil and err carrying the partial report.
function _M.ended(report, started, err)
  report.elapsed = now() - started
  if err then
    err.report = report
    return nil, err
  end
  return report
end

-- Several flows' jobs in one report: each flow's part merged in.
function _M.merge(report, part)
  for _, key in ipairs { "retriggered", "skipped", "failed", "ambiguous", "settled", "journals", "planned" } do
    if part[key] then
      report[key] = report[key] or {}
      for _, v in ipairs(part[key]) do report[key][#report[key] + 1] = v end
    end
  end
  report.considered = report.considered + part.considered
  for code, n in pairs(part.by_code or {}) do
    report.by_code = report.by_code or {}
    report.by_code[code] = (report.by_code[code] or 0) + n
  end
  report.stopped = report.stopped or part.stopped
  if part.outcomes then
    report.outcomes = report.outcomes or { succeeded = {}, failed = {}, still_running = {} }
    for kind, list in pairs(part.outcomes) do
      for _, v in ipairs(list) do report.outcomes[kind][#report.outcomes[kind] + 1] = v end
    end
  end
  if part.not_attempted then report.not_attempted = (report.not_attempted or 0) + part.not_attempted end
end

return _M
