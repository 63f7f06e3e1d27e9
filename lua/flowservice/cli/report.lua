-- The reports of retry-failed and retrigger: as text for a person, as the
-- JSON document --json prints.
local window = require "flowservice.window"
local output = require "flowservice.cli.output"

local ipairs, next, pairs, tostring, type = ipairs, next, pairs, tostring, type
local concat, sort = table.concat, table.sort
local format = string.format
local iso_time = window.iso
local list, error_json = output.list, output.error_json

local _M = {}

-- One run of `retrigger`, as the report tells it; why: why a run without
-- an outcome was not attempted.
local function retrigger_line(run_id, outcome, why)
  local kind, e = outcome and outcome[1], outcome and outcome[2]
  if kind == "retriggered" then
    return format("%s -> %s %s\n", run_id, tostring(e.new_id), tostring(e.etag))
  elseif kind == "skipped" then
    return format("%s skipped: %s\n", run_id, tostring(e.reason))
  elseif kind == "planned" then
    return format("%s would be re-triggered\n", run_id)
  elseif kind == "failed" then
    return format("%s failed: %s\n", run_id, tostring(e.error))
  elseif kind == "ambiguous" then
    return format("%s ambiguous: %s  (it may have been re-triggered: the next run of this command"
      .. " settles it, or decide with retry-failed --resolve)\n", run_id, tostring(e.why))
  end
  return format("%s not attempted (%s)\n", run_id, why)
end

-- "2026-11-30T07:00:00Z  CONNECTOR-2001-500: the message" of a report entry
local function run_facts(e)
  local first = type(e.errors) == "table" and e.errors[1]
  local err = first and format("%s: %s", tostring(first.code or "-"), tostring(first.message or "-"))
    or "no error recorded"
  return format("%s  %s", e.started and iso_time(e.started) or "-", err)
end

-- The retry-failed report as a table of counts, then what needs a person,
-- then the runs by their first error code.
local function report_text(r, flow_id)
  local out = {}
  local function line(fmt, ...) out[#out + 1] = format(fmt, ...) end
  local function count(t) return type(t) == "table" and #t or 0 end
  line("flow         %s", flow_id)
  if r.window then line("window       %s", window.describe(r.window.since, r.window.before)) end
  if r.aborted then line("aborted      %s", r.aborted) end
  if r.dry_run then line("dry run      nothing was sent") end
  line("considered   %s", tostring(r.considered or 0))
  if r.dry_run then
    line("would retry  %d", count(r.planned))
  else
    line("retriggered  %d", count(r.retriggered))
  end
  line("skipped      %d", count(r.skipped))
  line("failed       %d", count(r.failed))
  line("ambiguous    %d", count(r.ambiguous))
  if count(r.settled) > 0 then line("settled      %d", count(r.settled)) end
  if r.elapsed then line("elapsed      %.1f s", r.elapsed) end
  line("journal      %s", r.journal and tostring(r.journal) or "none")
  if r.dry_run and count(r.planned) > 0 then
    line("")
    line("would re-trigger:")
    for _, p in ipairs(r.planned) do line("  %s  %s", tostring(p.run_id), run_facts(p)) end
  end
  if count(r.retriggered) > 0 then
    line("")
    line("re-triggered:")
    for _, e in ipairs(r.retriggered) do
      line("  %s -> %s  %s", tostring(e.run_id), tostring(e.new_id), run_facts(e))
    end
  end
  if count(r.skipped) > 0 then
    line("")
    line("skipped:")
    for _, e in ipairs(r.skipped) do line("  %s  %s  (%s)", tostring(e.run_id), run_facts(e), tostring(e.reason)) end
  end
  if count(r.failed) > 0 then
    line("")
    line("failed:")
    for _, f in ipairs(r.failed) do line("  %s  %s", tostring(f.run_id), tostring(f.error)) end
  end
  if count(r.settled) > 0 then
    line("")
    line("settled from the journal:")
    for _, s in ipairs(r.settled) do
      local evidence = type(s.evidence) == "string" and "  (" .. s.evidence .. ")" or ""
      line("  %s  %s%s", tostring(s.run_id), tostring(s.outcome), evidence)
    end
  end
  if count(r.ambiguous) > 0 then
    line("")
    line("ambiguous (the re-trigger may or may not have been done):")
    local ids = {}
    for _, a in ipairs(r.ambiguous) do
      ids[#ids + 1] = tostring(a.run_id)
      line("  %s  %s%s", tostring(a.run_id), tostring(a.why or "outcome unknown"),
        a.request_id and " (request-id " .. tostring(a.request_id) .. ")" or "")
    end
    line("")
    line("still ambiguous: %s", concat(ids, " "))
    line("decide with --resolve RUN_ID=done|retry")
  end
  if r.outcomes then
    local o = r.outcomes
    line("")
    line("re-runs: %d succeeded, %d failed, %d still running", count(o.succeeded), count(o.failed),
      count(o.still_running))
    for _, f in ipairs(o.failed) do
      line("  %s -> %s  failed  %s", tostring(f.run_id), tostring(f.new_id), run_facts(f))
    end
    for _, f in ipairs(o.still_running) do
      line("  %s -> %s  still running", tostring(f.run_id), tostring(f.new_id))
    end
  end
  if count(r.flows) > 0 then
    line("")
    line("by flow:")
    for _, f in ipairs(r.flows) do
      line("  %s  %s: %d considered, %d retriggered, %d skipped, %d failed, %d ambiguous%s",
        tostring(f.flow_id), tostring(f.name or "-"), f.considered or 0, f.retriggered or 0,
        f.skipped or 0, f.failed or 0, f.ambiguous or 0,
        f.skipped_flow and "  (" .. f.skipped_flow .. ")" or f.error and "  (" .. tostring(f.error) .. ")" or "")
    end
  end
  if type(r.by_code) == "table" and next(r.by_code) then
    local codes = {}
    for code in pairs(r.by_code) do codes[#codes + 1] = code end
    sort(codes, function(a, b)
      if r.by_code[a] ~= r.by_code[b] then return r.by_code[a] > r.by_code[b] end
      return a < b
    end)
    line("")
    line("runs by first error code:")
    for _, code in ipairs(codes) do line("  %6d  %s", r.by_code[code], code) end
  end
  return concat(out, "\n") .. "\n"
end

local function report_json(r, flow_id, err)
  local function entries(src, shape)
    local t = list()
    for _, e in ipairs(src or {}) do t[#t + 1] = shape(e) end
    return t
  end
  -- every entry about a source run says why it failed and when it started
  local function facts(e, t)
    if e.errors then t.errors, t.started = list(e.errors), e.started end
    return t
  end
  return {
    flow_id = flow_id,
    dry_run = r.dry_run and true or false,
    considered = r.considered or 0,
    elapsed = r.elapsed,
    journal = r.journal,
    retriggered = entries(r.retriggered, function(e)
      return facts(e, { run_id = e.run_id, new_id = e.new_id, etag = e.etag, request_id = e.request_id,
        forced = e.forced and true or nil })
    end),
    skipped = entries(r.skipped, function(e) return facts(e, { run_id = e.run_id, reason = e.reason }) end),
    failed = entries(r.failed, function(e) return facts(e, { run_id = e.run_id, error = error_json(e.error) }) end),
    ambiguous = entries(r.ambiguous, function(e)
      return facts(e, { run_id = e.run_id, why = e.why, request_id = e.request_id })
    end),
    settled = entries(r.settled, function(e)
      return { run_id = e.run_id, outcome = e.outcome, evidence = e.evidence }
    end),
    planned = entries(r.planned, function(e) return facts(e, { run_id = e.run_id }) end),
    window = r.window,
    by_code = r.by_code,
    aborted = r.aborted,
    outcomes = r.outcomes and {
      succeeded = entries(r.outcomes.succeeded, function(e) return e end),
      failed = entries(r.outcomes.failed, function(e)
        return { run_id = e.run_id, new_id = e.new_id, status = e.status, errors = list(e.errors) }
      end),
      still_running = entries(r.outcomes.still_running, function(e) return e end),
    } or nil,
    flows = r.flows and entries(r.flows, function(f)
      return { flow_id = f.flow_id, name = f.name, considered = f.considered, retriggered = f.retriggered,
        skipped = f.skipped, failed = f.failed, ambiguous = f.ambiguous, journal = f.journal,
        skipped_flow = f.skipped_flow, error = f.error and error_json(f.error) or nil }
    end) or nil,
    journals = entries(r.journals, function(path) return path end),
    stopped = r.stopped,
    not_attempted = r.not_attempted,
    error = err and error_json(err) or nil,
  }
end

_M.retrigger_line, _M.text, _M.json = retrigger_line, report_text, report_json

return _M
