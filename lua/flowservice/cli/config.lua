-- The flags and environment variables every command that talks to the
-- service shares, and how they become the options flowservice.new takes
-- (flags win over the environment). Secrets come from the environment or
-- from files, never from a flag's value: flags show in `ps`.
local flowservice = require "flowservice"
local usage = require "flowservice.cli.usage"

local pcall, tostring = pcall, tostring
local io_open = io.open
local usage_error = usage.fail

local _M = {}

-- The connection and credential flags, for def (flowservice.cli.parser).
function _M.define(def)
  def.value("--org", "ORG_ID", "the IMS organization (or AEP_ORG_ID)")
  def.value("--sandbox", "NAME", "the sandbox (or AEP_SANDBOX_NAME; default prod)")
  def.value("--api-key", "KEY", "the API key (or AEP_API_KEY; default: the client id)")
  def.value("--url", "BASE_URL", "the Flow Service base URL (or FLOWSERVICE_URL)")
  def.value("--access-token-file", "FILE", "an access token, read from FILE (or AEP_ACCESS_TOKEN)")
  def.value("--client-id", "ID", "OAuth Server-to-Server client id (or AEP_CLIENT_ID)")
  def.value("--client-secret-file", "FILE", "its client secret, read from FILE (or AEP_CLIENT_SECRET)")
  def.value("--scopes", "SCOPES", "its scopes, comma-separated (or AEP_SCOPES)")
  def.value("--ims-url", "URL", "the IMS token endpoint (or AEP_IMS_URL)")
end

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

-- options: the parsed flags; log: flowservice.new's log function or nil.
function _M.client_options(options, getenv, log)
  local function setting(flag, var)
    local v = flag and options[flag]
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

  local client_id = setting("client_id", "AEP_CLIENT_ID")
  local wants_credentials = options.client_id or options.client_secret_file
  if options.access_token_file and options.client_secret_file then
    usage_error("give --access-token-file or --client-secret-file, not both")
  end
  local token
  if options.access_token_file then
    token = read_secret("access-token-file", options.access_token_file)
  elseif not wants_credentials then
    token = setting(nil, "AEP_ACCESS_TOKEN")
  end
  if token then
    opts.access_token = token
  else
    local secret = options.client_secret_file
      and read_secret("client-secret-file", options.client_secret_file)
      or setting(nil, "AEP_CLIENT_SECRET")
    local scopes = setting("scopes", "AEP_SCOPES")
    if not (client_id and secret and scopes) then
      usage_error("missing credentials: set AEP_ACCESS_TOKEN (or --access-token-file), or "
        .. "AEP_CLIENT_ID, AEP_CLIENT_SECRET (or --client-secret-file) and AEP_SCOPES"
        .. (client_id and "" or " (no client id)") .. (secret and "" or " (no client secret)")
        .. (scopes and "" or " (no scopes)"))
    end
    opts.credentials = { client_id = client_id, client_secret = secret, scopes = scopes,
      ims_url = setting("ims_url", "AEP_IMS_URL") }
  end
  opts.api_key = setting("api_key", "AEP_API_KEY") or client_id
  if not opts.api_key then usage_error("missing API key: set AEP_API_KEY or pass --api-key") end
  return opts
end

-- flowservice.new raises on options it refuses (a bad URL): a usage error.
function _M.new_client(opts)
  local ok, client = pcall(flowservice.new, opts)
  if not ok then
    local msg = tostring(client)
    usage_error("invalid configuration: %s", usage.argument_problem(msg) or msg)
  end
  return client
end

-- The client a command uses, from its flags and the environment.
function _M.client(ctx)
  local copts = _M.client_options(ctx.options, ctx.getenv, ctx.log)
  return _M.new_client(copts), copts
end

return _M
