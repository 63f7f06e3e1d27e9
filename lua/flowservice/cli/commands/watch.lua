-- flowservice watch: the auto-heal's watch loop (flowservice.heal.watch):
-- every interval, each flow's failed runs since its last scan, through the
-- heal policy, each re-triggered at most once (the flows' journals).
local core = require "flowservice.core"
local heal = require "flowservice.heal"
local config = require "flowservice.cli.config"
local journals = require "flowservice.cli.journals"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"

local ipairs, tonumber, tostring, type = ipairs, tonumber, tostring, type
local format = string.format
local floor, min = math.floor, math.min
local usage_error = usage.fail

local SIGNAL_EXIT = { INT = 130, TERM = 143 }
local UNIT = { s = 1, m = 60, h = 3600, d = 86400 }

-- "5m", "30s", "2h", "1d" or plain seconds -> seconds
local function duration(flag, text)
  local n, unit = text:match("^(%d+%.?%d*)([smhd]?)$")
  n = tonumber(n)
  if not n then usage_error("--%s takes a duration like 30s, 5m, 2h, 1d (or seconds), got %q", flag, text) end
  return n * UNIT[unit ~= "" and unit or "s"]
end

local function define(def)
  def.list("--flow", "FLOW_ID", "a flow to watch (repeatable)")
  def.flag("--all-flows", "every enabled flow of the sandbox (each its own journal)")
  def.value("--every", "DURATION", "time between passes: 30s, 5m, 2h (default 5m)")
  def.value("--since", "TIME", "the first window, for a flow never scanned before (default 24h)")
  def.value("--only-code", "CODE[,CODE]", "only runs with an error code starting so")
  def.value("--exclude-code", "CODE[,CODE]", "skip runs with such an error code (replaces the"
    .. " default: CONNECTOR-2001, MAPPER-, INGEST-, which a re-run does not fix)")
  def.flag("--zero-record-success", "also successful runs that ingested no record")
  def.value("--max-chain", "N", "re-triggers per original failure (default 3)")
  def.value("--backoff", "D[,D...]", "wait before each step of a chain (default 5m,30m,2h)")
  def.value("--journal", "FILE|URI", "one journal for every flow, a file or a PostgreSQL URI many"
    .. " hosts share (default: one file per org/sandbox/flow under $XDG_STATE_HOME/flowservice,"
    .. " shared with retry-failed)")
  def.value("--metrics-file", "FILE", "the counters in Prometheus text format, rewritten after"
    .. " each pass (node_exporter's textfile collector)")
  def.value("--passes", "N", "stop after N passes (default: until SIGINT/SIGTERM)")
  def.flag("--dry-run", "decide and print, send nothing, write nothing")
end

local function decision_line(d)
  return format("%-11s %s%s%s%s", d.action, tostring(d.run_id),
    d.new_id and ("  new run " .. d.new_id) or "",
    d.step and ("  step " .. d.step) or "",
    d.reason and ("  " .. d.reason) or (d.action == "wait" and d.due
      and format("  due in %.0f s", d.due / 1000 - os.time()) or ""))
end

local function run(ctx)
  local o = ctx.options
  ctx.no_arguments()
  if o.all_flows and o.flow then usage_error("give --flow FLOW_ID ... or --all-flows, not both") end
  if not o.all_flows and not o.flow then usage_error("missing --flow FLOW_ID (or --all-flows)") end
  local flows
  if o.flow then
    flows = {}
    for i, f in ipairs(o.flow) do flows[i] = values.check_id("--flow", f) end
  end
  local every = o.every and duration("every", o.every) or 300
  local since = values.parse_time("since", o.since or "24h")
  local backoff
  if o.backoff then
    backoff = {}
    for part in (o.backoff .. ","):gmatch("([^,]*),") do backoff[#backoff + 1] = duration("backoff", part) end
  end
  local max_chain = o.max_chain and tonumber(o.max_chain)
  if o.max_chain and not (max_chain and max_chain >= 0 and floor(max_chain) == max_chain) then
    usage_error("--max-chain must be a whole number >= 0, got %q", o.max_chain)
  end
  local passes = o.passes and values.positive_integer("passes", o.passes)
  local client, copts = config.client(ctx)
  local journal = journals.choice(o, ctx.getenv, copts, o.dry_run)
  local json = ctx.json and require("cjson.safe").new() or nil
  local healer = heal.new(client, {
    journal = journal, codes = o.only_code and values.error_codes("only-code", o.only_code),
    exclude_codes = o.exclude_code and values.error_codes("exclude-code", o.exclude_code),
    zero_record_success = o.zero_record_success and true or nil, max_chain = max_chain,
    backoff = backoff, dry_run = o.dry_run and true or nil,
    count = function(d)
      if json then
        ctx.stdout:write(json.encode { run_id = d.run_id, flow_id = d.flow_id, action = d.action,
          why = d.why, reason = d.reason, step = d.step, due = d.due, new_id = d.new_id }, "\n")
      else
        ctx.stdout:write(decision_line(d), "\n")
      end
      ctx.stdout:flush()
    end,
  })
  -- SIGINT/SIGTERM: finish the pass's current decision, then stop
  local watcher = type(core.signals) == "function" and core.signals { "INT", "TERM" } or nil
  local caught
  local function stop()
    if not caught and watcher then caught = watcher:pending() end
    return caught ~= nil
  end
  local function sleep(seconds)
    local wake = core.now() + seconds
    while not stop() do
      local left = wake - core.now()
      if left <= 0 then return end
      os.execute(format("sleep %.3f", min(left, 0.5)))
    end
  end
  local summary = heal.watch(healer, { flows = flows, all_flows = o.all_flows and true or nil,
    every = every, since = since, passes = passes, stop = stop, sleep = sleep,
    metrics_file = o.metrics_file })
  client:close()
  if watcher then watcher:close() end
  for _, e in ipairs(summary.errors) do ctx.stderr:write("flowservice: ", e, "\n") end
  if caught then
    ctx.stderr:write(format("flowservice: interrupted by SIG%s after %d pass(es); the journals keep"
      .. " every schedule\n", caught, summary.passes))
    return SIGNAL_EXIT[caught]
  end
  local d = summary.decisions
  if #summary.errors > 0 or (d.failed or 0) > 0 or (d.ambiguous or 0) > 0 or (d.error or 0) > 0 then
    return 1
  end
  return 0
end

return {
  name = "watch",
  summary = "re-trigger failed runs as they fail, within a budget (auto-heal)",
  description = "Every --every, list each flow's failed runs since its last scan and re-trigger"
    .. " the eligible ones through the auto-heal policy: default exclusions (CONNECTOR-2001, MAPPER-,"
    .. " INGEST-), at most --max-chain re-triggers per original failure, --backoff between the steps"
    .. " of a chain (kept in the journal, so a restart keeps the schedule). Each run at most once:"
    .. " the same journals as retry-failed and the OpenResty webhook, so all three may run together.",
  usage = "flowservice watch (--flow FLOW_ID ... | --all-flows) [--every 5m] [FLAGS]",
  examples = {
    "flowservice watch --all-flows --every 5m --metrics-file /var/lib/node_exporter/flowservice.prom",
    "flowservice watch --flow 0a1b2c3d-... --max-chain 2 --backoff 10m,1h --dry-run --passes 1",
  },
  client = true,
  define = define,
  run = run,
}
