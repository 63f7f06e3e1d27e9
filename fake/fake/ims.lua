-- IMS: POST /ims/token/v3 (another host in reality; no Flow Service
-- gateway), the tokens it issued, and its control settings.

local ngx = ngx
local util = require("fake.util")
local state = require("fake.state")
local reply = require("fake.reply")

local pairs, pcall, tostring, type = pairs, pcall, tostring, type
local math_floor = math.floor
local cjson, encode, uuid4, now_ms = util.cjson, util.encode, util.uuid4, util.now_ms
local single, query_table, parse_query = util.single, util.query_table, util.parse_query
local json_reply = reply.json_reply

local _M = {}

_M.TOKEN_PATH = "/ims/token/v3"

-- A token from POST /ims/token/v3, neither expired nor expired by control.
function _M.token_valid(token)
  local info = state.ims_tokens[token]
  if not info then return false end
  ngx.update_time()
  return ngx.now() < info.expires
end

local function ims_error(status, err, description)
  return json_reply(status, { error = err, error_description = description })
end

local function b64url(raw)
  return (ngx.encode_base64(raw):gsub("[+/=]", { ["+"] = "-", ["/"] = "_", ["="] = "" }))
end

local function ims_token(rec)
  if rec.method ~= "POST" then
    return ims_error(405, "invalid_request", "method " .. rec.method .. " not allowed")
  end
  local ctype = single(rec.headers["content-type"])
  local media = ctype and ctype:lower():match("^%s*([^;%s]+)%s*;?")
  if media ~= "application/x-www-form-urlencoded" then
    return ims_error(400, "invalid_request",
                     "Content-Type must be application/x-www-form-urlencoded")
  end
  local form = query_table(parse_query(rec.body))
  if form.grant_type ~= "client_credentials" then
    return ims_error(400, "unsupported_grant_type",
                     "unsupported grant_type " .. tostring(form.grant_type or "(none)")
                     .. "; expected client_credentials")
  end
  local client_id, secret = form.client_id, form.client_secret
  if not client_id or not secret or state.ims_clients[client_id] ~= secret then
    return ims_error(401, "invalid_client", "invalid client_id or client_secret parameter")
  end
  local scope = form.scope
  if not scope or not scope:match("%S") then
    return ims_error(400, "invalid_scope", "missing scope parameter")
  end
  ngx.update_time()
  local expires_in = state.ims_expires_in
  -- JWT-shaped like the real ones; opaque to the client all the same.
  local token = "eyJhbGciOiJSUzI1NiIsIng1dSI6ImltcyJ9."
    .. b64url(encode({ client_id = client_id, scope = scope, as = "fake-ims",
                       created_at = now_ms(), expires_in = expires_in * 1000 }))
    .. "." .. b64url(ngx.md5_bin(uuid4()) .. ngx.md5_bin(uuid4()))
  state.ims_tokens[token] = { expires = ngx.now() + expires_in, client_id = client_id,
                              scope = scope }
  return json_reply(200, { access_token = token, token_type = "bearer",
                           expires_in = expires_in })
end

-- Every token issued so far answers 401013 from now on (POST
-- /_fake/expire_tokens, and chaos's revoke fault).
local function expire_ims_tokens()
  local n = 0
  for _, info in pairs(state.ims_tokens) do
    info.expires = 0
    n = n + 1
  end
  return n
end

-- POST /_fake/ims { "expires_in": N }: the expires_in (and server-side
-- lifetime, seconds) of tokens issued from now on.
local function ims_settings(text)
  local t = util.decode_object(text)
  if not t then
    return json_reply(400, { errorMessage = "ims settings must be a JSON object" })
  end
  for k, v in pairs(t) do
    if k ~= "expires_in" then
      return json_reply(400, { errorMessage = "unknown ims setting " .. tostring(k) })
    end
    if type(v) ~= "number" or v < 0 or v ~= math_floor(v) then
      return json_reply(400, { errorMessage = "expires_in must be a whole number of seconds >= 0" })
    end
  end
  if t.expires_in then state.ims_expires_in = t.expires_in end
  return json_reply(200, { ok = true, expires_in = state.ims_expires_in })
end


_M.token = ims_token
_M.expire_tokens = expire_ims_tokens
_M.settings = ims_settings

return _M
