-- The flags and environment variables every command that talks to the
-- service shares, and how they become the options flowservice.new takes:
-- flags win over the environment, which wins over a credentials file.
-- Secrets come from the environment or from files (never readable by group
-- or others), never from a flag's value: flags show in `ps`.
local flowservice = require "flowservice"
local core = require "flowservice.core"
local credentials = require "flowservice.credentials"
local usage = require "flowservice.cli.usage"

local pcall, tonumber, tostring = pcall, tonumber, tostring
local format = string.format
local io_open, os_date = io.open, os.date
local usage_error = usage.fail

local _M = {}

-- The connection and credential flags, for def (flowservice.cli.parser).
function _M.define(def)
  def.value("--org", "ORG_ID", "the IMS organization (or AEP_ORG_ID)")
  def.value("--sandbox", "NAME", "the sandbox (or AEP_SANDBOX_NAME; default prod)")
  def.value("--api-key", "KEY", "the API key (or AEP_API_KEY; default: the client id)")
  def.value("--url", "BASE_URL", "the Flow Service base URL (or FLOWSERVICE_URL)")
  def.value("--credentials", "FILE", "a credentials JSON file: the Developer Console's OAuth"
    .. " Server-to-Server download or aepp's config.json (or AEP_CREDENTIALS_FILE)")
  def.value("--access-token-file", "FILE", "an access token, read from FILE (or AEP_ACCESS_TOKEN)")
  def.value("--client-id", "ID", "OAuth Server-to-Server client id (or AEP_CLIENT_ID)")
  def.value("--client-secret-file", "FILE", "its client secret, read from FILE (or AEP_CLIENT_SECRET)")
  def.value("--scopes", "SCOPES", "its scopes, comma-separated (or AEP_SCOPES)")
  def.value("--ims-url", "URL", "the IMS token endpoint (or AEP_IMS_URL)")
  def.value("--timeout", "SECONDS", "how long one HTTP request may take (default 60)")
  def.value("--ca-file", "FILE", "trust the CA certificates in FILE (PEM) instead of the system's")
end

-- A secret from a file: its first line's worth, the trailing newline trimmed.
local function read_secret(flag, path)
  local ok, why = credentials.private(path)
  if not ok then usage_error("--%s: %s", flag, why) end
  local f, err = io_open(path, "rb")
  if not f then usage_error("cannot read --%s: %s", flag, err) end
  local text = f:read("*a") or ""
  f:close()
  text = text:gsub("[\r\n]+$", "")
  if text == "" then usage_error("--%s: %s is empty", flag, path) end
  if text:find("[\r\n%z]") then usage_error("--%s: %s holds more than one line", flag, path) end
  return text
end

-- A token pasted with its "Bearer " prefix: the prefix goes, with a note.
local function bare_token(token, source, note)
  local bare = token:match("^[Bb]earer%s+(.+)$")
  if not bare then return token end
  note(format("the access token from %s starts with 'Bearer '; using it without that prefix", source))
  return bare
end

local function host_of(url)
  return url and url:match("^%a[%w+.-]*://([^/?#]+)") or "?"
end

-- --verbose: each HTTP attempt the client logs, with a UTC time and the
-- host it went to (the token endpoint's paths are under /ims/).
local function verbose_log(ctx, opts)
  local base = host_of(opts.base_url or core.defaults.base_url)
  local ims = host_of(opts.credentials and opts.credentials.ims_url or "https://ims-na1.adobelogin.com")
  return function(line)
    if ctx.progress then ctx.progress.clear() end
    local host = line:match("^%u+ /ims/") and ims or base
    ctx.stderr:write(os_date("!%Y-%m-%dT%H:%M:%SZ"), " ", host, " ", line, "\n")
  end
end

-- options: the parsed flags; note(text): tells the person something.
-- Returns the options for flowservice.new (without log).
function _M.client_options(options, getenv, note)
  local file_path = options.credentials or getenv("AEP_CREDENTIALS_FILE")
  if file_path == "" then file_path = nil end
  local file = {}
  if file_path then
    local from, err = credentials.from_file(file_path)
    if not from then usage_error("--credentials: %s", tostring(err.message or err)) end
    file = from
  end
  local fc = file.credentials or {}
  local function setting(flag, var, from_file)
    local v = flag and options[flag]
    if v == nil and var then v = getenv(var) end
    if v == "" then v = nil end
    if v == nil then v = from_file end
    return v
  end
  local opts = {
    org_id = setting("org", "AEP_ORG_ID", file.org_id),
    sandbox = setting("sandbox", "AEP_SANDBOX_NAME", file.sandbox) or "prod",
    base_url = setting("url", "FLOWSERVICE_URL", file.base_url),
  }
  if not opts.org_id then usage_error("missing org id: set AEP_ORG_ID or pass --org") end
  if options.timeout then
    local t = options.timeout:match("^%d+%.?%d*$") and tonumber(options.timeout)
    if not t or t <= 0 then usage_error("--timeout must be a number of seconds, got %q", options.timeout) end
    opts.timeout = t
  end
  if options.ca_file then
    local f, err = io_open(options.ca_file, "rb")
    if not f then usage_error("cannot read --ca-file: %s", err) end
    f:close()
    opts.ca_file = options.ca_file
  end

  local token, token_source
  if options.access_token_file then
    token, token_source = read_secret("access-token-file", options.access_token_file), "--access-token-file"
  else
    token, token_source = setting(nil, "AEP_ACCESS_TOKEN"), "AEP_ACCESS_TOKEN"
  end
  local client_id = setting("client_id", "AEP_CLIENT_ID", fc.client_id)
  local secret = options.client_secret_file and read_secret("client-secret-file", options.client_secret_file)
    or setting(nil, "AEP_CLIENT_SECRET", fc.client_secret)
  local scopes = setting("scopes", "AEP_SCOPES", fc.scopes)
  local wants_credentials = options.client_id or options.client_secret_file or file_path
  if client_id and secret and scopes then
    if token then
      note(format("both an access token (%s) and client credentials are set: using the client"
        .. " credentials, since their tokens refresh", token_source))
    end
    opts.credentials = { client_id = client_id, client_secret = secret, scopes = scopes,
      ims_url = setting("ims_url", "AEP_IMS_URL", fc.ims_url) }
  elseif token and not wants_credentials then
    opts.access_token = bare_token(token, token_source, note)
  else
    usage_error("missing credentials: set AEP_ACCESS_TOKEN (or --access-token-file), or "
      .. "AEP_CLIENT_ID, AEP_CLIENT_SECRET (or --client-secret-file) and AEP_SCOPES, or --credentials FILE"
      .. (client_id and "" or " (no client id)") .. (secret and "" or " (no client secret)")
      .. (scopes and "" or " (no scopes)"))
  end
  opts.api_key = setting("api_key", "AEP_API_KEY", file.api_key) or client_id
  if not opts.api_key then usage_error("missing API key: set AEP_API_KEY or pass --api-key") end
  return opts
end

-- flowservice.new raises on options it refuses (a bad URL): a usage error.
function _M.new_client(opts)
  local ok, client = pcall(flowservice.new, opts)
  if not ok then
    local msg = tostring(client)
    usage_error("invalid configuration: %s", usage.argument_problem(msg) or (msg:gsub("^[^\n]-%.lua:%d+: ", "")))
  end
  return client
end

-- The client a command uses, from its flags and the environment.
function _M.client(ctx)
  local copts = _M.client_options(ctx.options, ctx.getenv, ctx.note)
  if ctx.options.verbose then copts.log = verbose_log(ctx, copts) end
  return _M.new_client(copts), copts
end

return _M
