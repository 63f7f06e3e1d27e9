-- The command line, on argparse: the root parser and one sub-parser per
-- command (flowservice.cli.commands), each with its own help and examples;
-- argparse's errors said the way the command says them (usage errors), and
-- --help / help COMMAND answered by the caller, never by os.exit.
local argparse = require "argparse"
local config = require "flowservice.cli.config"
local usage = require "flowservice.cli.usage"

local ipairs, type = ipairs, type
local concat, unpack = table.concat, table.unpack or unpack -- luacheck: compat

local _M = {}

local ROOT_DESCRIPTION = [[
Re-trigger failed Adobe Experience Platform dataflow runs (Flow Service API), each at most once.]]

local ROOT_EPILOG = [[
Every command that talks to the service takes these (flags win over the environment):
  --org ORG_ID               or AEP_ORG_ID
  --sandbox NAME             or AEP_SANDBOX_NAME (default prod)
  --api-key KEY              or AEP_API_KEY (default: the client id)
  --url BASE_URL             or FLOWSERVICE_URL
  --access-token-file FILE   the access token, read from FILE; or AEP_ACCESS_TOKEN
  --client-id ID             or AEP_CLIENT_ID      \
  --client-secret-file FILE  or AEP_CLIENT_SECRET   > OAuth Server-to-Server credentials
  --scopes SCOPES            or AEP_SCOPES         /
  --ims-url URL              or AEP_IMS_URL
  --credentials FILE         a credentials JSON file; or AEP_CREDENTIALS_FILE
  --timeout SECONDS, --ca-file FILE, --json, --verbose, --quiet

TIME: 30m, 24h, 7d (before now), today, yesterday (UTC midnight), 2026-11-30,
2026-11-30T07:00:00Z (or +hh:mm / -hh:mm), epoch milliseconds, or all.

exit status: 0 done, 1 some runs failed or are ambiguous, 2 usage or configuration error,
3 authentication failed, 130/143 interrupted (SIGINT/SIGTERM; the same command resumes).

Run 'flowservice help COMMAND' (or 'flowservice COMMAND --help') for a command's flags and examples.]]

local function nonempty(name)
  return function(v)
    if v == "" then return nil, "missing value for " .. name end
    return v
  end
end

-- def: what a command's define(def) adds its flags and arguments with;
-- each element lands in the list (a help group) it is given.
local function definer(cmd, list, flags, names)
  local def = {}
  local function add(e, name)
    list[#list + 1] = e
    for alias in (name or ""):gmatch("%S+") do flags[alias], names[#names + 1] = true, alias end
    return e
  end
  -- --name VALUE, at most once
  function def.value(name, argname, description)
    return add(cmd:option(name, description):argname(argname):args(1):overwrite(false)
      :convert(nonempty(name)), name)
  end
  -- --name VALUE, as often as needed: a list (nil when not given)
  function def.list(name, argname, description)
    return add(cmd:option(name, description):argname(argname):args(1):count("*"):init(nil)
      :convert(nonempty(name)), name)
  end
  -- --name VALUE where VALUE is one of choices
  function def.choice(name, choices, description)
    return add(cmd:option(name, description):choices(choices):args(1):overwrite(false), name)
  end
  -- --name, a switch
  function def.flag(name, description)
    return add(cmd:flag(name, description), name)
  end
  -- the positional arguments (ctx.args, a list); how: argparse's args ("*", "?", "1")
  function def.argument(name, description, how)
    return add(cmd:argument(name, description):args(how or "*"):target("args"))
  end
  return def
end

local function help_flag(p, state)
  return p:flag("-h --help", "show this help"):action(function() state.help = state.help or p end)
end

local function layout(p)
  return p:add_help(false):help_max_width(100):help_usage_margin(2):help_description_margin(32)
end

-- The parser for these commands; state gets .help (the parser whose help
-- was asked for) and .version as the flags are seen, and .names the names
-- a slip may be near: .commands, .flags[command name] ("" for the root).
-- Returns the root parser, the command parsers by name and the set of
-- every command's flags.
function _M.build(commands, state)
  local flags = {}
  state.names = { commands = {}, flags = { [""] = { "--help", "--version" } } }
  local root = layout(argparse("flowservice")):command_target("command")
    :usage("usage: flowservice COMMAND [FLAGS]"):description(ROOT_DESCRIPTION):epilog(ROOT_EPILOG)
  local by_name, cmds = {}, {}
  for _, c in ipairs(commands) do
    local cmd = layout(root:command(c.name)):summary(c.summary)
      :description(c.description or c.summary):usage("usage: " .. c.usage)
    if c.examples then cmd:epilog("examples:\n  " .. concat(c.examples, "\n  ")) end
    local args, own, shared, names = {}, {}, {}, { "--help" }
    state.names.flags[c.name] = names
    state.names.commands[#state.names.commands + 1] = c.name
    local def = definer(cmd, own, flags, names)
    local plain_argument = def.argument
    function def.argument(...) -- listed under "arguments", not "flags"
      local e = plain_argument(...)
      own[#own] = nil
      args[#args + 1] = e
      return e
    end
    c.define(def)
    -- no arguments of its own: any word left is caught, for its own message
    if #args == 0 then cmd:argument("args"):args("*"):hidden(true) end
    if c.client then
      def.flag("--json", "one JSON document on stdout")
      def.flag("--verbose", "one line per HTTP attempt on stderr, with a UTC time and the host"
        .. " (never a secret)")
      def.flag("--quiet", "no progress and no notes on stderr: only errors")
      config.define(definer(cmd, shared, flags, names))
    end
    own[#own + 1] = help_flag(cmd, state)
    if #args > 0 then cmd:group("arguments", unpack(args)) end
    cmd:group("flags", unpack(own))
    if #shared > 0 then cmd:group("connection and credentials", unpack(shared)) end
    by_name[c.name], cmds[#cmds + 1] = cmd, cmd
  end
  root:group("commands", unpack(cmds))
  root:group("flags", help_flag(root, state),
    root:flag("--version", "print the version and libcurl's"):action(function() state.version = true end))
  return root, by_name, flags
end

-- argparse's messages, as the command words them.
local TRANSLATIONS = {
  { "^unknown option '(.-)'$", "unknown flag %s" },
  { "^unknown command '(.-)'$", "unknown command %q" },
  { "^option '(.-)' requires an argument$", "missing value for %s" },
  { "^option '(.-)' requires .*$", "missing value for %s" },
  { "^option '(.-)' does not take arguments$", "%s takes no value" },
  { "^option '(.-)' must be used at most 1 time$", "%s given twice" },
  { "^argument for option '(.-)' must be one of (.*)$", "%s takes %s" },
  { "^argument '(.-)' must be one of (.*)$", "%s must be one of %s" },
  { "^missing argument '(.-)'$", "missing %s" },
  { "^too many arguments$", "unexpected argument" },
}

-- names: the names this slip may be near of (commands, or one command's flags)
local function translate(msg, names)
  local text, tip = msg:match("^(.-)\n(.*)$")
  text = text or msg
  local suggestion
  if tip then
    local one = tip:match("^Did you mean '(.-)'%?$")
    local many = tip:match("^Did you mean one of these: (.-)%?$")
    if one then
      suggestion = one
    elseif many then
      local near = {}
      for name in many:gmatch("'(.-)'") do near[#near + 1] = name end
      suggestion = concat(near, " or ")
    end
  end
  local unknown = text:match("^unknown option '(.-)'$") or text:match("^unknown command '(.-)'$")
  if unknown and names then suggestion = usage.nearest(unknown, names) or suggestion end
  for _, t in ipairs(TRANSLATIONS) do
    local a, b = text:match(t[1])
    if a or text:match(t[1]) then
      text = t[2]:format(a, b)
      break
    end
  end
  return suggestion and (text .. "; did you mean " .. suggestion .. "?") or text
end

-- parse(parser, argv, state) -> the parsed flags (result.command: the
-- command's name), or nil when help or the version was asked for (state
-- says which); raises a usage error for anything else.
function _M.parse(parser, argv, state)
  local ok, result = parser:pparse(argv)
  if state.help or state.version then return nil end
  if not ok then
    local msg = type(result) == "string" and result or "bad arguments"
    local names = msg:match("^unknown command") and state.names.commands
      or state.names.flags[state.names.flags[argv[1]] and argv[1] or ""]
    usage.syntax("%s", translate(msg, names))
  end
  return result
end

_M.translate = translate

return _M
