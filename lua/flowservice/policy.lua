-- What may be re-triggered, and why a run failed: the policy the bulk job
-- (and whatever else decides on runs) reads a run with. Pure functions of
-- the service's run objects; no I/O.
local ipairs, type = ipairs, type
local lower, min = string.lower, math.min

local _M = {}

-- The run's status in lower case (sources differ in case), "?" if none.
function _M.status_of(run)
  local summary = type(run.metrics) == "table" and run.metrics.statusSummary
  return type(summary) == "table" and type(summary.status) == "string" and lower(summary.status) or "?"
end

-- Records the run ingested, or nil.
function _M.records_of(run)
  local summary = type(run.metrics) == "table" and run.metrics.recordSummary
  return type(summary) == "table" and summary.outputRecordCount or nil
end

-- The first three of a run's errors ({code, message}) and its start time:
-- why it failed, for every report entry about it.
function _M.source_facts(run)
  local metrics = type(run.metrics) == "table" and run.metrics or {}
  local summary = type(metrics.statusSummary) == "table" and metrics.statusSummary or {}
  local list = type(summary.errors) == "table" and summary.errors or {}
  local errs = {}
  for i = 1, min(3, #list) do
    local e = list[i]
    if type(e) == "table" then
      errs[#errs + 1] = { code = type(e.code) == "string" and e.code or nil,
        message = type(e.message) == "string" and e.message or nil }
    end
  end
  local duration = type(metrics.durationSummary) == "table" and metrics.durationSummary or {}
  return errs, type(duration.startedAtUTC) == "number" and duration.startedAtUTC or nil
end

-- Every error code of a run, nested ones included (Adobe nests causes).
function _M.codes_of(run)
  local metrics = type(run.metrics) == "table" and run.metrics or {}
  local summary = type(metrics.statusSummary) == "table" and metrics.statusSummary or {}
  local found = {}
  local function walk(list, depth)
    if type(list) ~= "table" or depth > 8 then return end
    for _, e in ipairs(list) do
      if type(e) == "table" then
        if type(e.code) == "string" then found[#found + 1] = e.code end
        walk(e.nestedErrors, depth + 1)
      end
    end
  end
  walk(summary.errors, 0)
  return found
end

-- The first of the run's codes that one of the prefixes starts, or nil.
function _M.matching_code(run, prefixes)
  for _, code in ipairs(_M.codes_of(run)) do
    for _, prefix in ipairs(prefixes) do
      if code:sub(1, #prefix) == prefix then return code end
    end
  end
  return nil
end

-- The run's first error code, "(none)" without errors: report.by_code's key.
function _M.first_code(run)
  local errs = _M.source_facts(run)
  return errs[1] and errs[1].code or "(none)"
end

-- The runs its re-triggers made, as the service lists them, or nil.
function _M.children_of(run)
  return type(run.childFlowRunIds) == "table" and run.childFlowRunIds or nil
end

-- Why a listed run may not be re-triggered, or nil when it may. A run
-- named by id may be a successful one with 0 records without asking.
function _M.ineligible(run, spec)
  local status = _M.status_of(run)
  if status == "failed" then return nil end
  if status == "success" and (spec.zero_record_success or spec.run_ids) and _M.records_of(run) == 0 then
    return nil
  end
  if status == "success" and _M.records_of(run) == 0 then
    return "success with 0 records (ask with zero_record_success)"
  end
  return "status " .. status .. " cannot be re-triggered"
end

return _M
