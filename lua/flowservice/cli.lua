-- The `flowservice` command: argv and the environment -> client options ->
-- one subcommand -> human or JSON output and an exit code.
--
--   0  everything asked for succeeded (or was skipped, with the reason)
--   1  some runs failed, or their outcome is unknown (ambiguous)
--   2  usage or configuration error (nothing was sent)
--   3  authentication failed (IMS refused, or HTTP 401/403)
--   130, 143  interrupted by SIGINT, SIGTERM: what was in flight finished
--      and was journaled; the same command resumes
--
-- cli.main(argv, env) takes env = { getenv, stdin, stdout, stderr, isatty }
-- (each optional, the real ones by default) so it runs in-process in tests.
-- Secrets come from the environment or from files, never from a flag value:
-- flags show in `ps`.
local flowservice = require "flowservice"
local core = require "flowservice.core"
local window = require "flowservice.window"
local cjson = require("cjson").new()

local error, getmetatable, ipairs, next, pairs, pcall, select, setmetatable, tonumber,
  tostring, type, xpcall = error, getmetatable, ipairs, next, pairs, pcall, select, setmetatable,
  tonumber, tostring, type, xpcall
local traceback = debug.traceback
local concat = table.concat
local huge = math.huge
local format = string.format
local io_open, os_execute, os_getenv = io.open, os.execute, os.getenv
local io_stdin, io_stdout, io_stderr = io.stdin, io.stdout, io.stderr

local _M = {}

local USAGE = [==[
usage: flowservice COMMAND [ARGS] [FLAGS]

commands:
  retry-failed --flow FLOW_ID      re-trigger every eligible failed run of a flow
  retry-failed --all-flows         ... of every flow of the sandbox (each its own journal)
      [--since TIME] [--before TIME]        window on the run's start (inclusive, exclusive;
                                            default: the last 24 hours; --since all: no bound)
      [--status S[,S]]                      statuses to list (default: failed); the service
                                            re-triggers only failed runs, and successful ones
                                            with 0 records (--zero-record-success)
      [--zero-record-success]               also successful runs that ingested no record
      [--only-code CODE[,CODE]]             only runs with an error code starting so (any
                                            code of the run, nested ones too)
      [--exclude-code CODE[,CODE]]          skip runs with such an error code
      [--concurrency N]                     re-triggers in flight at once (default 8)
      [--journal FILE | --no-journal]       where progress is kept (default: one file per
                                            org/sandbox/flow under $XDG_STATE_HOME/flowservice)
      [--grace SECONDS]                     how long a run may take to show up before an
                                            ambiguous re-trigger counts as not done
      [--resolve RUN_ID=done|retry ...]     decide a run left ambiguous by an earlier job
      [--dry-run]                           list what would be re-triggered, send nothing
      [--wait] [--wait-timeout SECONDS]     follow each re-run until it finishes (default 2 h);
                                            exit 1 if one failed
      [--max-active N]                      at most N re-runs of one flow executing at once
                                            (follows them as --wait does)
  retrigger RUN_ID [RUN_ID ...] | -  re-trigger runs (-: run ids from stdin, one a line), each
                                     at most once: each run is read first, and one its flow's
                                     journal or its childFlowRunIds show re-triggered is skipped
      [--force]                             re-trigger runs already re-triggered (journaled too)
      [--journal FILE | --no-journal]       as for retry-failed (default: its flow's journal)
      [--concurrency N] [--grace SECONDS] [--dry-run]
  get-run RUN_ID                     show one run
  list-runs [--flow FLOW_ID]         list a flow's runs (without --flow: every flow's), newest first
      [--status S[,S]] [--since TIME] [--before TIME]
  list-flows [--state enabled|disabled] [--since TIME]
                                     the sandbox's flows; with --since, failed runs of each

  TIME: 30m, 24h, 7d (before now), today, yesterday (UTC midnight), 2026-11-30,
  2026-11-30T07:00:00Z (or +hh:mm / -hh:mm), epoch milliseconds, or all.
  S: failed, success, partialSuccess, inProgress, cancelled.

flags for every command:
  --json                 one JSON document on stdout
  --verbose              one line per HTTP attempt on stderr (never a secret)
  --org ORG_ID           or AEP_ORG_ID
  --sandbox NAME         or AEP_SANDBOX_NAME (default prod)
  --api-key KEY          or AEP_API_KEY (default: the client id)
  --url BASE_URL         or FLOWSERVICE_URL
  --access-token-file F  the access token, read from F; or AEP_ACCESS_TOKEN
  --client-id ID         or AEP_CLIENT_ID   \
  --client-secret-file F or AEP_CLIENT_SECRET  > OAuth Server-to-Server credentials
  --scopes S             or AEP_SCOPES      /
  --ims-url URL          or AEP_IMS_URL
  --help, --version

exit status: 0 done, 1 some runs failed or are ambiguous, 2 usage or configuration error,
3 authentication failed, 130/143 interrupted (SIGINT/SIGTERM; the same command resumes).
]==]

---------------------------------------------------------------------------
-- usage errors: raised anywhere before the first request, caught in main

local Usage = {}

local function usage_error(fmt, ...)
  error(setmetatable({ message = select("#", ...) > 0 and format(fmt, ...) or fmt }, Usage), 0)
end

---------------------------------------------------------------------------
-- argv: long flags only, `--flag value` or `--flag=value`; kinds are
-- "flag" (no value), "value" (once) and "list" (repeatable)

local COMMON_FLAGS = {
  org = "value", sandbox = "value", ["api-key"] = "value", url = "value",
  ["access-token-file"] = "value", ["client-id"] = "value", ["client-secret-file"] = "value",
  scopes = "value", ["ims-url"] = "value",
  json = "flag", verbose = "flag", help = "flag",
}

-- argv[first..] against flags -> options (name -> value, true or list), positionals
local function parse(argv, first, flags)
  local options, positionals = {}, {}
  local i, only_positionals = first, false
  while argv[i] ~= nil do
    local word = argv[i]
    if only_positionals or word == "-" or word:sub(1, 1) ~= "-" then
      positionals[#positionals + 1] = word
    elseif word == "--" then
      only_positionals = true
    else
      local name, value = word:match("^%-%-([^=]+)=(.*)$")
      name = name or word:match("^%-%-(.+)$")
      local kind = name and (flags[name] or COMMON_FLAGS[name])
      if not kind then usage_error("unknown flag %s", (word:match("^[^=]*"))) end
      if kind == "flag" then
        if value then usage_error("--%s takes no value", name) end
        value = true
      elseif value == nil then
        value = argv[i + 1]
        if value == nil or (value:sub(1, 2) == "--" and #value > 2) then
          usage_error("missing value for --%s", name)
        end
        i = i + 1
      end
      if kind ~= "flag" and value == "" then usage_error("missing value for --%s", name) end
      if kind == "list" then
        options[name] = options[name] or {}
        options[name][#options[name] + 1] = value
      elseif kind == "value" and options[name] ~= nil then
        usage_error("--%s given twice", name)
      else
        options[name] = value
      end
    end
    i = i + 1
  end
  return options, positionals
end

---------------------------------------------------------------------------
-- values

local function check_id(what, id)
  if not id:match("^[%w%-]+$") then
    usage_error("%s must be letters, digits and dashes, got %q", what, id)
  end
  return id
end

-- a time as people type it (flowservice.window) -> epoch ms; "all": no bound
local function parse_time(flag, text)
  if text == "all" then return nil end
  local ms, why = window.parse(text)
  if not ms then usage_error("--%s %s", flag, why) end
  return ms
end

local iso_time = window.iso

-- The statuses the service knows, by lower case (it answers in mixed case).
local STATUSES = { failed = "failed", success = "success", partialsuccess = "partialSuccess",
  inprogress = "inProgress", cancelled = "cancelled" }

local function parse_statuses(text)
  local list = {}
  for s in (text .. ","):gmatch("([^,]*),") do
    local known = STATUSES[s:lower()]
    if not known then
      usage_error("--status: unknown status %q (the service knows failed, success, partialSuccess,"
        .. " inProgress, cancelled)", s)
    end
    list[#list + 1] = known
  end
  return list
end

-- "CONNECTOR-2001,INGEST-1212" -> a list of code prefixes
local function error_codes(flag, text)
  local list = {}
  for code in (text .. ","):gmatch("([^,]*),") do
    if not code:match("^[%w%-_]+$") then
      usage_error("--%s takes error codes (or their start) like CONNECTOR-2001, got %q", flag, code)
    end
    list[#list + 1] = code
  end
  return list
end

local function positive_integer(flag, text)
  local n = text:match("^%d+$") and tonumber(text)
  if not n or n < 1 or n > 1e6 then usage_error("--%s must be a positive integer, got %q", flag, text) end
  return n
end

local function seconds(flag, text)
  local n = text:match("^%d+%.?%d*$") and tonumber(text)
  if not n then usage_error("--%s must be a number of seconds, got %q", flag, text) end
  return n
end

-- --since/--before; default_since: the bound when --since is not given
local function time_window(options, default_since)
  local since = parse_time("since", options.since or default_since or "all")
  local before = options.before and parse_time("before", options.before)
  if since and before and since >= before then usage_error("--since must be earlier than --before") end
  return since, before
end

---------------------------------------------------------------------------
-- client options from flags and the environment (flags win)

-- A secret from a file: its first line's worth, the trailing newline trimmed.
local function read_secret(flag, path)
  local f, err = io_open(path, "rb")
  if not f then usage_error("cannot read --%s: %s", flag, err) end
  local text = f:read("*a") or ""
  f:close()
  text = text:gsub("[\r\n]+$", "")
  if text == "" then usage_error("--%s: %s is empty", flag, path) end
  if text:find("[\r\n%z]") then usage_error("--%s: %s holds more than one line", flag, path) end
  return text
end

local function client_options(options, getenv, log)
  local function setting(flag, var)
    local v = options[flag]
    if v == nil and var then v = getenv(var) end
    if v == "" then v = nil end
    return v
  end
  local opts = {
    org_id = setting("org", "AEP_ORG_ID"),
    sandbox = setting("sandbox", "AEP_SANDBOX_NAME") or "prod",
    base_url = setting("url", "FLOWSERVICE_URL"),
    log = log,
  }
  if not opts.org_id then usage_error("missing org id: set AEP_ORG_ID or pass --org") end

  local client_id = setting("client-id", "AEP_CLIENT_ID")
  local wants_credentials = options["client-id"] or options["client-secret-file"]
  if options["access-token-file"] and options["client-secret-file"] then
    usage_error("give --access-token-file or --client-secret-file, not both")
  end
  local token
  if options["access-token-file"] then
    token = read_secret("access-token-file", options["access-token-file"])
  elseif not wants_credentials then
    token = setting(nil, "AEP_ACCESS_TOKEN")
  end
  if token then
    opts.access_token = token
  else
    local secret = options["client-secret-file"]
      and read_secret("client-secret-file", options["client-secret-file"])
      or setting(nil, "AEP_CLIENT_SECRET")
    local scopes = setting("scopes", "AEP_SCOPES")
    if not (client_id and secret and scopes) then
      usage_error("missing credentials: set AEP_ACCESS_TOKEN (or --access-token-file), or "
        .. "AEP_CLIENT_ID, AEP_CLIENT_SECRET (or --client-secret-file) and AEP_SCOPES"
        .. (client_id and "" or " (no client id)") .. (secret and "" or " (no client secret)")
        .. (scopes and "" or " (no scopes)"))
    end
    opts.credentials = { client_id = client_id, client_secret = secret, scopes = scopes,
      ims_url = setting("ims-url", "AEP_IMS_URL") }
  end
  opts.api_key = setting("api-key", "AEP_API_KEY") or client_id
  if not opts.api_key then usage_error("missing API key: set AEP_API_KEY or pass --api-key") end
  return opts
end

-- What an argument error says, without where it was raised (a file path
-- and line of ours would mean nothing to the person at the prompt).
local function argument_problem(msg)
  return msg:match("bad argument #%d+ to '[^']*' %((.*)%)$")
end

-- flowservice.new raises on options it refuses (a bad URL): a usage error.
local function new_client(opts)
  local ok, client = pcall(flowservice.new, opts)
  if not ok then
    local msg = tostring(client)
    usage_error("invalid configuration: %s", argument_problem(msg) or msg)
  end
  return client
end

---------------------------------------------------------------------------
-- JSON output: lists are marked, so an empty list stays [] (lua-cjson 2.1.0
-- has no empty_array_mt and would write {})

local LIST = {}
local function list(t) return setmetatable(t or {}, LIST) end

-- Fields of the service's runs that are lists: empty, they come back from
-- cjson as {} and go out as [] again.
local LIST_KEYS = { items = true, errors = true, activities = true, labels = true,
  sourceConnectionIds = true, targetConnectionIds = true, transformations = true }

-- Only what may leave: never the body (it may echo what we sent).
local function error_json(err)
  if type(err) ~= "table" then return { kind = "error", message = tostring(err) } end
  return { kind = err.kind, status = err.status, code = err.code, message = err.message,
    request_id = err.request_id }
end

-- lua-cjson writes the JSON; this marker, swapped for [] afterwards, is how
-- an empty list gets out as a list.
local EMPTY_LIST = "flowservice_empty_list_6f1d2c"

-- A copy fit for cjson.encode: errors reduced to what may leave, functions
-- dropped, empty lists marked.
local function prepare(v, key)
  if type(v) ~= "table" then
    if type(v) == "function" then return nil end
    return v
  end
  if flowservice.is_error(v) then return error_json(v) end
  if next(v) == nil then
    return (getmetatable(v) == LIST or LIST_KEYS[key]) and EMPTY_LIST or v
  end
  local copy = {}
  for k, item in pairs(v) do copy[k] = prepare(item, k) end
  return copy
end

local function encode(v)
  local text = cjson.encode(prepare(v))
  text = text:gsub('"' .. EMPTY_LIST .. '"', "[]")
  return (text:gsub("\\/", "/")) -- lua-cjson writes / as \/; a path reads better without
end

local function print_json(out, v)
  out:write(encode(v), "\n")
end

---------------------------------------------------------------------------
-- human output

local function is_auth(err)
  return type(err) == "table" and (err.kind == "auth" or err.status == 401 or err.status == 403)
end

-- exit status for a list of errors: 3 if one is about authentication
local function failure_code(errs)
  local code = 0
  for _, err in ipairs(errs) do
    if is_auth(err) then return 3 end
    code = 1
  end
  return code
end

local function field(t, ...)
  for i = 1, select("#", ...) do
    if type(t) ~= "table" then return nil end
    t = t[(select(i, ...))]
  end
  return t
end

local function records(run)
  local n = field(run, "metrics", "recordSummary", "outputRecordCount")
  return type(n) == "number" and format("%.0f", n) or "-"
end

local function run_summary(run)
  local lines = {}
  local function add(label, value)
    if value ~= nil then lines[#lines + 1] = format("%-10s %s", label, tostring(value)) end
  end
  add("id", run.id)
  add("flow", run.flowId)
  add("status", field(run, "metrics", "statusSummary", "status") or "-")
  add("records", records(run))
  add("created", iso_time(run.createdAt))
  local started = field(run, "metrics", "durationSummary", "startedAtUTC")
  local completed = field(run, "metrics", "durationSummary", "completedAtUTC")
  if started then add("started", iso_time(started)) end
  if completed then add("completed", iso_time(completed)) end
  add("etag", run.etag or run.eTag)
  local errs = field(run, "metrics", "statusSummary", "errors")
  if type(errs) == "table" and #errs > 0 then
    for i, e in ipairs(errs) do
      add(i == 1 and "errors" or "", format("%s: %s", tostring(field(e, "code") or "-"),
        tostring(field(e, "message") or "-")))
    end
  else
    add("errors", "none")
  end
  return concat(lines, "\n") .. "\n"
end

local RUN_HEADER = format("%-36s  %-14s  %-24s  %7s  %s\n", "RUN", "STATUS", "CREATED", "RECORDS", "ERROR")

-- one run of list-runs: id, status, created, records, its first error code
local function run_line(run)
  local errs = field(run, "metrics", "statusSummary", "errors")
  local first = type(errs) == "table" and type(errs[1]) == "table" and errs[1].code
  return format("%-36s  %-14s  %-24s  %7s  %s\n", tostring(run.id),
    tostring(field(run, "metrics", "statusSummary", "status") or "-"), iso_time(run.createdAt),
    records(run), type(first) == "string" and first or "-")
end

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
    table.sort(codes, function(a, b)
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

-- One error that ends a command: on stderr, and as {"error": ...} with --json.
local function fail(ctx, err)
  if ctx.json then print_json(ctx.stdout, { error = error_json(err) }) end
  ctx.stderr:write(tostring(err), "\n")
  return is_auth(err) and 3 or 1
end

---------------------------------------------------------------------------
-- live progress on a terminal: one line, redrawn in place

local function progress_line(stderr)
  local drawn, last, counts, shown = false, -huge, nil, nil
  local self = {}
  local function draw(c)
    stderr:write(format("\r\27[K%d/%d done, %d failed, %d ambiguous, %d in flight, %d queued, %.1f/s",
      c.done or 0, c.total or 0, c.failed or 0, c.ambiguous or 0, c.in_flight or 0, c.queued or 0,
      c.rate or 0))
    drawn, shown = true, c
  end
  -- at most ten redraws a second
  function self.update(c)
    counts = c
    local t = core.now()
    if t - last >= 0.1 then
      last = t
      draw(c)
    end
  end
  -- before another line goes to stderr (--verbose)
  function self.clear()
    if drawn then stderr:write("\r\27[K") end
    drawn, shown = false, nil
  end
  -- the last counts stay on screen
  function self.finish()
    if counts and counts ~= shown then draw(counts) end
    if drawn then stderr:write("\n") end
    drawn = false
  end
  return self
end

---------------------------------------------------------------------------
-- the journal: one file per org/sandbox/flow under $XDG_STATE_HOME/flowservice

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function succeeded(a, _, c)
  if type(a) == "number" then return a == 0 end
  return a == true and (c == nil or c == 0)
end

-- Each missing directory of an absolute path, made mode 0700 (mkdir -p
-- would leave the parents at the umask's mode).
local function make_dirs(dir)
  local steps, prefix = {}, ""
  for part in dir:gmatch("[^/]+") do
    prefix = prefix .. "/" .. part
    steps[#steps + 1] = shell_quote(prefix)
  end
  return succeeded(os_execute("for d in " .. concat(steps, " ")
    .. "; do [ -d \"$d\" ] || mkdir -m 700 \"$d\" || exit 1; done 2>/dev/null"))
end

-- create: make the directory (a dry run writes nothing, so it does not)
local function default_journal(getenv, org, sandbox, flow_id, create)
  local state = getenv("XDG_STATE_HOME")
  if not (state and state:sub(1, 1) == "/") then
    local home = getenv("HOME")
    if not (home and home:sub(1, 1) == "/") then
      usage_error("no place for the journal: set HOME or XDG_STATE_HOME, or pass --journal FILE or --no-journal")
    end
    state = home .. "/.local/state"
  end
  local dir = state:gsub("/+$", "") .. "/flowservice"
  if create and not make_dirs(dir) then usage_error("cannot create the journal directory %s", dir) end
  local function safe(s) return (s:gsub("[^%w%-@]", "_")) end
  return dir .. "/" .. safe(org) .. "_" .. safe(sandbox) .. "_" .. safe(flow_id) .. ".jsonl"
end

-- Open (creating it 0600) and close the journal now, so that a path that
-- cannot be written is a usage error before anything is sent.
local function check_journal(path)
  if core.journal_open then
    local j, err = core.journal_open(path)
    if not j then usage_error("cannot use the journal: %s", tostring(err and err.message or err)) end
    j:close()
  else
    local f, err = io_open(path, "ab")
    if not f then usage_error("cannot use the journal: %s", err) end
    f:close()
  end
  return path
end

---------------------------------------------------------------------------
-- commands: each gets ctx (options, positionals, streams, getenv) and
-- returns an exit status

local function no_positionals(ctx)
  if #ctx.args > 0 then usage_error("unexpected argument %q", ctx.args[1]) end
end

local function required_flow(ctx)
  if not ctx.options.flow then usage_error("missing --flow FLOW_ID") end
  return check_id("--flow", ctx.options.flow)
end

local function verbose_log(ctx)
  if not ctx.options.verbose then return nil end
  return function(line)
    if ctx.progress then ctx.progress.clear() end
    ctx.stderr:write(line, "\n")
  end
end

local function run_ids_of(ctx)
  local ids, seen = {}, {}
  local function add(id)
    check_id("run id", id)
    if seen[id] then
      ctx.stderr:write("flowservice: ignoring repeated run id ", id, "\n")
    else
      seen[id], ids[#ids + 1] = true, id
    end
  end
  for _, a in ipairs(ctx.args) do
    if a == "-" then
      for line in ctx.stdin:lines() do
        local id = line:match("^%s*(.-)%s*$")
        if id ~= "" then add(id) end
      end
    else
      add(a)
    end
  end
  if #ids == 0 then usage_error("retrigger needs at least one RUN_ID (or - to read them from stdin)") end
  return ids
end

-- spec.journal from --journal / --no-journal: a path, false, or by default
-- a function giving each flow its own file (checked before it is used).
local function journal_choice(ctx, copts, dry_run)
  local o = ctx.options
  if o.journal and o["no-journal"] then usage_error("give --journal FILE or --no-journal, not both") end
  if o["no-journal"] then return false end
  if o.journal then return dry_run and o.journal or check_journal(o.journal) end
  return function(flow_id)
    local path = default_journal(ctx.getenv, copts.org_id, copts.sandbox, flow_id, not dry_run)
    return dry_run and path or check_journal(path)
  end
end

-- SIGINT and SIGTERM during a job: stop sending, let what is in flight
-- finish (bounded by the call timeout) and be journaled, then report.
local SIGNAL_EXIT = { INT = 130, TERM = 143 }

local function watch_signals()
  if type(core.signals) ~= "function" then return nil end
  local watcher = core.signals { "INT", "TERM" }
  return watcher
end

-- client:retry_failed(spec) with progress and interrupts; closes client.
-- Returns report, err (report nil when the job could not start), signal.
local function run_job(ctx, client, spec)
  local watcher, caught = watch_signals(), nil
  spec.stop = function()
    if not caught and watcher then caught = watcher:pending() end
    return caught and ("interrupted by SIG" .. caught) or nil
  end
  if ctx.isatty(ctx.stderr) then
    ctx.progress = progress_line(ctx.stderr)
    spec.on_progress = function(counts) ctx.progress.update(counts) end
  end
  local ok, report, err = pcall(client.retry_failed, client, spec)
  client:close()
  if ctx.progress then ctx.progress.finish() end
  if not caught and watcher then caught = watcher:pending() end
  if watcher then watcher:close() end
  if not ok then
    local msg = tostring(report)
    local inner = argument_problem(msg)
    if inner then usage_error("%s", inner) end
    error(report, 0)
  end
  if not report then report = type(err) == "table" and err.report or nil end
  return report, err, caught
end

local function job_exit(ctx, report, err, caught)
  if is_auth(err) then ctx.stderr:write("flowservice: authentication failed, stopping\n") end
  if caught then
    ctx.stderr:write(format("flowservice: interrupted by SIG%s: %d run(s) not attempted; what was in"
      .. " flight is journaled; run the same command again to resume\n", caught, report.not_attempted or 0))
    return SIGNAL_EXIT[caught]
  end
  local errs = { err }
  for _, f in ipairs(report.failed or {}) do errs[#errs + 1] = f.error or "failed" end
  local code = failure_code(errs)
  if code == 0 and type(report.ambiguous) == "table" and #report.ambiguous > 0 then code = 1 end
  if code == 0 and report.outcomes and #report.outcomes.failed > 0 then code = 1 end
  return code
end

-- retrigger: the guarded path of retry-failed, for runs named by id.
local function retrigger_cmd(ctx)
  local ids = run_ids_of(ctx)
  local o = ctx.options
  local copts = client_options(o, ctx.getenv, verbose_log(ctx))
  local client = new_client(copts)
  local spec = {
    run_ids = ids, force = o.force and true or nil, dry_run = o["dry-run"] and true or nil,
    concurrency = o.concurrency and positive_integer("concurrency", o.concurrency),
    grace = o.grace and seconds("grace", o.grace),
  }
  spec.journal = journal_choice(ctx, copts, spec.dry_run)
  local report, err, caught = run_job(ctx, client, spec)
  if not report then return fail(ctx, err) end
  if ctx.json then
    print_json(ctx.stdout, report_json(report, nil, err))
  else
    local outcome = {}
    for _, kind in ipairs { "retriggered", "skipped", "failed", "ambiguous" } do
      for _, e in ipairs(report[kind] or {}) do outcome[e.run_id] = { kind, e } end
    end
    for _, e in ipairs(report.planned or {}) do outcome[e.run_id] = { "planned", e } end
    local why = report.stopped or (err and "the job stopped: " .. tostring(err)) or "?"
    for _, id in ipairs(ids) do ctx.stdout:write(retrigger_line(id, outcome[id], why)) end
    for _, st in ipairs(report.settled or {}) do
      ctx.stdout:write(format("%s settled from the journal: %s (%s)\n", tostring(st.run_id),
        tostring(st.outcome), tostring(st.evidence)))
    end
    if err then ctx.stderr:write(tostring(err), "\n") end
  end
  return job_exit(ctx, report, err, caught)
end

local function get_run_cmd(ctx)
  if #ctx.args ~= 1 then usage_error("get-run takes one RUN_ID") end
  local id = check_id("run id", ctx.args[1])
  local client = new_client(client_options(ctx.options, ctx.getenv, verbose_log(ctx)))
  local run, err = client:get_run(id)
  client:close()
  if not run then return fail(ctx, err) end
  if ctx.json then print_json(ctx.stdout, run) else ctx.stdout:write(run_summary(run)) end
  return 0
end

local function list_runs_cmd(ctx)
  no_positionals(ctx)
  local flow_id = ctx.options.flow and check_id("--flow", ctx.options.flow) -- none: every flow
  local since, before = time_window(ctx.options)
  local status = ctx.options.status and parse_statuses(ctx.options.status)
  local client = new_client(client_options(ctx.options, ctx.getenv, verbose_log(ctx)))
  local runs, err = client:list_runs { flow_id = flow_id, status = status, since = since, before = before }
  client:close()
  if not runs then return fail(ctx, err) end
  if ctx.json then
    print_json(ctx.stdout, list(runs))
  else
    ctx.stdout:write(RUN_HEADER)
    for _, run in ipairs(runs) do ctx.stdout:write(run_line(run)) end
  end
  return 0
end

local function resolutions(texts)
  local t = {}
  for _, text in ipairs(texts or {}) do
    local id, decision = text:match("^(.-)=(.*)$")
    if not id or (decision ~= "done" and decision ~= "retry") then
      usage_error("--resolve takes RUN_ID=done or RUN_ID=retry, got %q", text)
    end
    check_id("--resolve run id", id)
    if t[id] and t[id] ~= decision then usage_error("--resolve %s given both done and retry", id) end
    t[id] = decision
  end
  return next(t) and t or nil
end

local function retry_failed_cmd(ctx)
  no_positionals(ctx)
  local o = ctx.options
  if o["all-flows"] and o.flow then usage_error("give --flow FLOW_ID or --all-flows, not both") end
  if o["all-flows"] and o.resolve then usage_error("--resolve needs --flow FLOW_ID") end
  local flow_id = not o["all-flows"] and required_flow(ctx) or nil
  local since, before = time_window(o, "24h")
  local spec = {
    flow_id = flow_id, all_flows = o["all-flows"] and true or nil, since = since, before = before,
    status = o.status and parse_statuses(o.status),
    zero_record_success = o["zero-record-success"] and true or nil,
    codes = o["only-code"] and error_codes("only-code", o["only-code"]),
    exclude_codes = o["exclude-code"] and error_codes("exclude-code", o["exclude-code"]),
    concurrency = o.concurrency and positive_integer("concurrency", o.concurrency),
    grace = o.grace and seconds("grace", o.grace),
    resolve = resolutions(o.resolve),
    dry_run = o["dry-run"] and true or nil,
    wait_runs = o.wait and true or nil,
    wait_timeout = o["wait-timeout"] and seconds("wait-timeout", o["wait-timeout"]),
    max_active = o["max-active"] and positive_integer("max-active", o["max-active"]),
  }
  if spec.wait_timeout and not (spec.wait_runs or spec.max_active) then
    usage_error("--wait-timeout needs --wait or --max-active")
  end
  local copts = client_options(o, ctx.getenv, verbose_log(ctx))
  local client = new_client(copts)
  local journal = journal_choice(ctx, copts, spec.dry_run)
  if flow_id and type(journal) == "function" then journal = journal(flow_id) end
  spec.journal = journal
  local report, err, caught = run_job(ctx, client, spec)
  if not report then return fail(ctx, err) end
  local label = flow_id or "every flow of the sandbox"
  if ctx.json then
    print_json(ctx.stdout, report_json(report, flow_id, err))
  else
    ctx.stdout:write(report_text(report, label))
    if err then ctx.stderr:write(tostring(err), "\n") end
  end
  -- a flow that does not exist or cannot run: nothing was sent
  if err and (err.not_found or err.kind == "flow") then return 2 end
  return job_exit(ctx, report, err, caught)
end

-- list-flows: id, state, name; with --since, each flow's failed runs in the window.
local function list_flows_cmd(ctx)
  no_positionals(ctx)
  local o = ctx.options
  if o.state and o.state ~= "enabled" and o.state ~= "disabled" then
    usage_error("--state takes enabled or disabled, got %q", o.state)
  end
  local since = o.since and parse_time("since", o.since)
  local client = new_client(client_options(o, ctx.getenv, verbose_log(ctx)))
  local flows, err = client:list_flows { state = o.state }
  if not flows then
    client:close()
    return fail(ctx, err)
  end
  if since then
    for _, flow in ipairs(flows) do
      local n, cerr = client:count_runs { flow_id = flow.id, status = "failed", since = since }
      if not n then
        client:close()
        return fail(ctx, cerr)
      end
      flow.failed_runs = n
    end
  end
  client:close()
  if ctx.json then
    local out = list()
    for i, flow in ipairs(flows) do
      out[i] = { id = flow.id, name = flow.name, state = flow.state, failed_runs = flow.failed_runs }
    end
    print_json(ctx.stdout, out)
    return 0
  end
  ctx.stdout:write(format("%-36s  %-8s  %s%s\n", "FLOW", "STATE", since and "FAILED  " or "", "NAME"))
  for _, flow in ipairs(flows) do
    ctx.stdout:write(format("%-36s  %-8s  %s%s\n", tostring(flow.id), tostring(flow.state or "-"),
      since and format("%6d  ", flow.failed_runs) or "", tostring(flow.name or "-")))
  end
  return 0
end

local COMMANDS = {
  ["retry-failed"] = { run = retry_failed_cmd, flags = {
    flow = "value", since = "value", before = "value", status = "value",
    ["zero-record-success"] = "flag", concurrency = "value", journal = "value",
    ["only-code"] = "value", ["exclude-code"] = "value", ["all-flows"] = "flag",
    wait = "flag", ["wait-timeout"] = "value", ["max-active"] = "value",
    ["no-journal"] = "flag", grace = "value", resolve = "list", ["dry-run"] = "flag" } },
  retrigger = { run = retrigger_cmd, flags = {
    force = "flag", journal = "value", ["no-journal"] = "flag", concurrency = "value",
    grace = "value", ["dry-run"] = "flag" } },
  ["get-run"] = { run = get_run_cmd, flags = {} },
  ["list-runs"] = { run = list_runs_cmd, flags = {
    flow = "value", status = "value", since = "value", before = "value" } },
  ["list-flows"] = { run = list_flows_cmd, flags = { state = "value", since = "value" } },
}

---------------------------------------------------------------------------

local function real_isatty(stream)
  local fd = stream == io_stdin and 0 or stream == io_stdout and 1 or stream == io_stderr and 2
  return fd and succeeded(os_execute("test -t " .. fd)) or false
end

local function run(argv, ctx)
  local first = argv[1]
  if first == nil then
    ctx.stderr:write(USAGE)
    return 2
  elseif first == "--help" or first == "-h" or first == "help" then
    ctx.stdout:write(USAGE)
    return 0
  elseif first == "--version" then
    ctx.stdout:write(format("flowservice %s (libcurl %s)\n", flowservice._VERSION, flowservice.curl_version))
    return 0
  end
  local command = COMMANDS[first]
  if not command then
    if first:sub(1, 1) == "-" then usage_error("the command comes first: flowservice COMMAND [FLAGS]") end
    usage_error("unknown command %q", first)
  end
  ctx.options, ctx.args = parse(argv, 2, command.flags)
  if ctx.options.help then
    ctx.stdout:write(USAGE)
    return 0
  end
  ctx.json = ctx.options.json
  return command.run(ctx)
end

-- cli.main(argv, env) -> exit status
function _M.main(argv, env)
  env = env or {}
  local ctx = {
    getenv = env.getenv or os_getenv,
    stdin = env.stdin or io_stdin,
    stdout = env.stdout or io_stdout,
    stderr = env.stderr or io_stderr,
    isatty = env.isatty or real_isatty,
  }
  local ok, code = xpcall(function() return run(argv or {}, ctx) end, function(e)
    if getmetatable(e) == Usage then return e end
    return { bug = tostring(e), traceback = traceback(tostring(e), 2) }
  end)
  if ok then return code end
  if getmetatable(code) == Usage then
    ctx.stderr:write("flowservice: ", code.message, "\n")
    ctx.stderr:write("run 'flowservice --help' for usage\n")
    return 2
  end
  -- lua.c turns a SIGINT outside a job into this error
  if code.bug:match("interrupted!$") then
    ctx.stderr:write("flowservice: interrupted\n")
    return 130
  end
  -- a bug: one line, without our file paths; the traceback when asked for
  ctx.stderr:write("flowservice: internal error: ", (code.bug:gsub("^[^\n]-%.lua:%d+: ", "")),
    "\n(set FLOWSERVICE_DEBUG=1 for the details, and please report it)\n")
  if ctx.getenv("FLOWSERVICE_DEBUG") then ctx.stderr:write(code.traceback, "\n") end
  return 1
end

_M.parse_time = parse_time -- for tests
_M.encode = encode

return _M
