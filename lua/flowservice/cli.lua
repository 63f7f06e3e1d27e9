-- The `flowservice` command: argv and the environment -> one command
-- (flowservice.cli.commands) -> human or JSON output and an exit code.
--
--   0  everything asked for succeeded (or was skipped, with the reason)
--   1  some runs failed, or their outcome is unknown (ambiguous)
--   2  usage or configuration error (nothing was sent)
--   3  authentication failed (IMS refused, or HTTP 401/403)
--   130, 143  interrupted by SIGINT, SIGTERM: what was in flight finished
--      and was journaled; the same command resumes
--
-- cli.main(argv, env) takes env = { getenv, stdin, stdout, stderr, isatty }
-- (each optional, the real ones by default) so it runs in-process in tests;
-- it never exits the interpreter (bin/flowservice does, with its result).
local flowservice = require "flowservice"
local usage = require "flowservice.cli.usage"
local values = require "flowservice.cli.values"
local output = require "flowservice.cli.output"

local ipairs, require, tostring, type, xpcall = ipairs, require, tostring, type, xpcall
local traceback = debug.traceback
local format = string.format
local os_execute, os_getenv = os.execute, os.getenv
local io_stdin, io_stdout, io_stderr = io.stdin, io.stdout, io.stderr

local _M = {}

local function succeeded(a, _, c)
  if type(a) == "number" then return a == 0 end
  return a == true and (c == nil or c == 0)
end

local function real_isatty(stream)
  local fd = stream == io_stdin and 0 or stream == io_stdout and 1 or stream == io_stderr and 2
  return fd and succeeded(os_execute("test -t " .. fd)) or false
end

-- The commands and their parser (argparse is loaded only when the command
-- runs: flowservice.cli.values serves without it).
local function load_commands()
  local list, by_name, names = {}, {}, {}
  for _, module in ipairs(require "flowservice.cli.commands") do
    local c = require(module)
    list[#list + 1], by_name[c.name], names[#names + 1] = c, c, c.name
  end
  return list, by_name, names
end

local function run(argv, ctx)
  local parser = require "flowservice.cli.parser"
  local list, by_name, names = load_commands()
  local state = {}
  local root, parsers, flags = parser.build(list, state)
  ctx.parser, ctx.commands, ctx.command_names = root, parsers, names
  if argv[1] == nil then
    ctx.stderr:write(root:get_help(), "\n")
    return 2
  end
  local first = argv[1]
  if first:sub(1, 1) == "-" and first ~= "-h" and first ~= "--help" and first ~= "--version"
    and flags[first:match("^[^=]*")] then
    usage.fail("the command comes first: flowservice COMMAND [FLAGS]")
  end
  ctx.command = by_name[first] and first ~= "help" and first or nil
  local options = parser.parse(root, argv, state)
  if state.help then
    ctx.stdout:write(state.help:get_help(), "\n")
    return 0
  elseif state.version then
    ctx.stdout:write(format("flowservice %s (libcurl %s)\n", flowservice._VERSION, flowservice.curl_version))
    return 0
  end
  local command = by_name[options.command]
  ctx.options, ctx.args, ctx.json = options, options.args or {}, options.json
  function ctx.no_arguments()
    if #ctx.args > 0 then usage.fail("unexpected argument %q", ctx.args[1]) end
  end
  -- something the person should know that is not an error (--quiet: nothing)
  function ctx.note(text)
    if options.quiet then return end
    if ctx.progress then ctx.progress.clear() end
    ctx.stderr:write("flowservice: ", text, "\n")
  end
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
    if usage.is(e) then return e end
    return { bug = tostring(e), traceback = traceback(tostring(e), 2) }
  end)
  if ok then return code end
  if usage.is(code) then
    ctx.stderr:write("flowservice: ", code.message, "\n")
    if code.syntax then
      ctx.stderr:write(ctx.command and format("run 'flowservice help %s' for its flags and examples\n",
        ctx.command) or "run 'flowservice --help' for usage\n")
    end
    return 2
  end
  -- lua.c turns a SIGINT outside a job into this error
  if code.bug:match("interrupted!$") then
    ctx.stderr:write("flowservice: interrupted\n")
    return 130
  end
  -- a bug: one line, without our file paths; the traceback when asked for
  ctx.stderr:write("flowservice: internal error: ", (code.bug:match("^[^\n]*"):gsub("^.-%.lua:%d+: ", "")),
    "\n(set FLOWSERVICE_DEBUG=1 for the details, and please report it)\n")
  if ctx.getenv("FLOWSERVICE_DEBUG") then ctx.stderr:write(code.traceback, "\n") end
  return 1
end

_M.parse_time = values.parse_time -- for tests and fuzz/parsers.lua
_M.encode = output.encode

return _M
