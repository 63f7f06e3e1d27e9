-- flowservice.metrics: the auto-heal's counters in Prometheus text format.
-- Kept in an ngx.shared dict (every worker counts into it; /metrics reads
-- it) or, outside nginx, in a table (a watch loop writes them to a file for
-- node_exporter's textfile collector).
--
--   local m = metrics.new(ngx.shared.flowservice_webhook)   -- or metrics.new()
--   m:inc("events_received")  m:inc("runs_skipped", { reason = "budget" })
--   m:count_decision(decision)   -- a flowservice.heal decision
--   m:render() -> text           m:write_file(path) -> true | nil, err
local concat, format, sort = table.concat, string.format, table.sort
local error, ipairs, pairs, setmetatable, tostring = error, ipairs, pairs, setmetatable, tostring
local io_open, os_rename = io.open, os.rename

local _M = {}

local PREFIX = "flowservice_heal_"
local KEY = "metric:" -- the dict is shared with the webhook's other keys

-- name -> help; only these exist (a typo raises).
_M.COUNTERS = {
  events_received = "Webhook POSTs received",
  events_verified = "Events whose signature and recipient verified",
  events_rejected = "Events refused with 401 (signature, key path, recipient, body)",
  events_duplicate = "Verified events whose x-adobe-event-id was seen before (acknowledged, dropped)",
  events_ignored = "Verified events that are not flow run failures (acknowledged, ignored)",
  runs_retriggered = "Failed runs re-triggered",
  runs_scheduled = "Failed runs whose re-trigger waits for its backoff",
  runs_skipped = "Failed runs not re-triggered, by reason",
  runs_failed = "Re-triggers the service refused, or that could not be decided",
  runs_ambiguous = "Re-triggers whose outcome is unknown (journaled as ambiguous)",
  budget_spent = "Failed runs at max_chain: retry budget spent",
}

local Metrics = {}
Metrics.__index = Metrics

function _M.new(dict)
  return setmetatable({ dict = dict, values = {} }, Metrics)
end

local function escape(v)
  return (tostring(v):gsub("[\\\n\"]", { ["\\"] = "\\\\", ["\n"] = "\\n", ["\""] = "\\\"" }))
end

local function key_of(name, labels)
  if not _M.COUNTERS[name] then error("flowservice.metrics: unknown counter " .. tostring(name), 3) end
  if not labels then return name end
  local names = {}
  for k in pairs(labels) do names[#names + 1] = k end
  sort(names)
  local parts = {}
  for i, k in ipairs(names) do parts[i] = format('%s="%s"', k, escape(labels[k])) end
  return name .. "{" .. concat(parts, ",") .. "}"
end

function Metrics:inc(name, labels, n)
  local key = key_of(name, labels)
  n = n or 1
  if self.dict then
    local _, err = self.dict:incr(KEY .. key, n, 0)
    if err then return nil, err end
  else
    self.values[key] = (self.values[key] or 0) + n
  end
  return true
end

-- A heal decision into the counters.
function Metrics:count_decision(d)
  local a = d.action
  if a == "retriggered" then
    self:inc("runs_retriggered")
  elseif a == "wait" then
    self:inc("runs_scheduled")
  elseif a == "skip" then
    self:inc("runs_skipped", { reason = d.why or "other" })
    if d.why == "budget" then self:inc("budget_spent") end
  elseif a == "ambiguous" then
    self:inc("runs_ambiguous")
  elseif a == "failed" or a == "error" then
    self:inc("runs_failed")
  end
end

-- key -> value, from the dict or the table
function Metrics:snapshot()
  if not self.dict then return self.values end
  local out = {}
  for _, k in ipairs(self.dict:get_keys(0)) do
    if k:sub(1, #KEY) == KEY then out[k:sub(#KEY + 1)] = self.dict:get(k) end
  end
  return out
end

function Metrics:render()
  local values, by_name = self:snapshot(), {}
  for key, v in pairs(values) do
    local name = key:match("^[%w_]+")
    by_name[name] = by_name[name] or {}
    by_name[name][#by_name[name] + 1] = { key = key, value = v }
  end
  local names = {}
  for name in pairs(_M.COUNTERS) do names[#names + 1] = name end
  sort(names)
  local lines = {}
  for _, name in ipairs(names) do
    lines[#lines + 1] = format("# HELP %s%s_total %s", PREFIX, name, _M.COUNTERS[name])
    lines[#lines + 1] = format("# TYPE %s%s_total counter", PREFIX, name)
    local series = by_name[name] or {}
    sort(series, function(a, b) return a.key < b.key end)
    if #series == 0 and name ~= "runs_skipped" then series[1] = { key = name, value = 0 } end
    for _, s in ipairs(series) do
      local labels = s.key:sub(#name + 1)
      lines[#lines + 1] = format("%s%s_total%s %.0f", PREFIX, name, labels, s.value)
    end
  end
  return concat(lines, "\n") .. "\n"
end

-- For node_exporter's textfile collector: written beside, then renamed, so
-- the collector never reads half a file.
function Metrics:write_file(path)
  local tmp = path .. ".tmp"
  local f, err = io_open(tmp, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(self:render())
  f:close()
  if not ok then return nil, werr end
  local renamed, rerr = os_rename(tmp, path)
  if not renamed then return nil, rerr end
  return true
end

return _M
