-- Credentials files as people have them: the JSON that Adobe's Developer
-- Console downloads for an OAuth Server-to-Server credential (CLIENT_ID,
-- CLIENT_SECRETS, ORG_ID, SCOPES, TECHNICAL_ACCOUNT_ID) and aepp's
-- config.json (org_id, client_id, secret, scopes, sandbox-name,
-- environment), keys in any letter case. A file holding a secret must not
-- be readable by group or others (as ssh asks of keys).
local cjson = require("cjson.safe").new()
local errors = require "flowservice.errors"

local ipairs, pairs, tonumber, tostring, type = ipairs, pairs, tonumber, tostring, type
local concat = table.concat
local format = string.format
local floor = math.floor
local io_open, io_popen = io.open, io.popen

local _M = {}

local function config_error(fmt, ...)
  return nil, errors.new { kind = "config", message = format(fmt, ...) }
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The permission bits of a file (following links), or nil.
local function mode_of(path)
  local p = io_popen("stat -L -c %a -- " .. shell_quote(path) .. " 2>/dev/null")
  if not p then return nil end
  local text = p:read("*a") or ""
  p:close()
  local octal = text:match("^(%d+)%s*$")
  return octal and tonumber(octal, 8) or nil
end

-- private(path) -> true, or nil and why (with the chmod that fixes it)
-- when group or others may read the file.
function _M.private(path)
  local mode = mode_of(path)
  if not mode then return true end -- cannot tell (no such file: reading it says so)
  local group, others = floor(mode / 32) % 2 == 1, floor(mode / 4) % 2 == 1
  if group or others then
    return nil, format("%s is readable by %s (mode %04o): run chmod 600 %s", path,
      others and "others" or "its group", mode % 512, shell_quote(path))
  end
  return true
end

-- A value of doc by any letter case of one of names.
local function pick(doc, names)
  for _, name in ipairs(names) do
    local v = doc[name]
    if v ~= nil then return v end
  end
  return nil
end

local function text_of(v)
  if type(v) == "string" and v ~= "" then return v end
  if type(v) == "number" then return format("%.0f", v) end
  return nil
end

-- aepp's environments (prod unless told): where the platform and IMS are.
local ENVIRONMENTS = {
  prod = {},
  stage = { base_url = "https://platform-stage.adobe.io/data/foundation/flowservice",
    ims_url = "https://ims-na1-stg1.adobelogin.com" },
  int = { base_url = "https://platform-int.adobe.io/data/foundation/flowservice",
    ims_url = "https://ims-na1-stg1.adobelogin.com" },
}

-- from_json(text, name) -> options for flowservice.new, or nil, err
function _M.from_json(text, name)
  local raw = cjson.decode(text)
  if type(raw) ~= "table" then return config_error("%s is not a JSON object", name) end
  local doc = {}
  for k, v in pairs(raw) do
    if type(k) == "string" then doc[k:lower():gsub("-", "_")] = v end
  end
  local secret = pick(doc, { "client_secrets", "client_secret", "secret" })
  if type(secret) == "table" then secret = secret[1] end
  local scopes = pick(doc, { "scopes", "scope" })
  if type(scopes) == "table" then
    local list = {}
    for _, s in ipairs(scopes) do list[#list + 1] = tostring(s) end
    scopes = concat(list, ",")
  end
  local env_name = text_of(doc.environment) or "prod"
  local env = ENVIRONMENTS[env_name:lower()]
  if not env then
    return config_error("%s: environment %q is not prod, stage or int", name, env_name)
  end
  local opts = {
    org_id = text_of(pick(doc, { "org_id", "ims_org_id", "ims_org" })),
    sandbox = text_of(pick(doc, { "sandbox_name", "sandbox" })),
    base_url = env.base_url,
    credentials = {
      client_id = text_of(pick(doc, { "client_id", "api_key" })),
      client_secret = text_of(secret),
      scopes = text_of(scopes),
      ims_url = env.ims_url,
    },
  }
  opts.api_key = text_of(doc.api_key) or opts.credentials.client_id
  local missing = {}
  for _, k in ipairs { "client_id", "client_secret", "scopes" } do
    if not opts.credentials[k] then missing[#missing + 1] = k end
  end
  if not opts.org_id then missing[#missing + 1] = "org_id" end
  if #missing > 0 then
    return config_error("%s has no %s", name, concat(missing, ", "))
  end
  return opts
end

-- from_file(path) -> the options table flowservice.new takes (org_id,
-- api_key, credentials, and sandbox / base_url when the file says), or
-- nil, err. Refuses a file that group or others may read.
function _M.from_file(path)
  local ok, why = _M.private(path)
  if not ok then return config_error("%s", why) end
  local f, err = io_open(path, "rb")
  if not f then return config_error("cannot read the credentials file: %s", tostring(err)) end
  local text = f:read("*a") or ""
  f:close()
  return _M.from_json(text, path)
end

return _M
