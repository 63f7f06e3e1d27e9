-- IMS access tokens for OAuth Server-to-Server credentials: fetched on first
-- use, cached until five minutes before they expire (short-lived ones for
-- three quarters of their life), fetched again after a 401 401013. The client secret stays in this object; no error or log line
-- carries it.
local errors = require "flowservice.errors"
local core = require "flowservice.core"

local decode = require("cjson.safe").new().decode
local escape, now = core.escape, core.now
local min, setmetatable, type = math.min, setmetatable, type
local running, co_status = coroutine.running, coroutine.status

local _M = {}

local Auth = {}
Auth.__index = Auth

_M.default_ims_url = "https://ims-na1.adobelogin.com"
_M.fields = { client_id = "string", client_secret = "string", scopes = "string", ims_url = "string" }

local MARGIN = 300 -- seconds before expiry that a token stops being used
local STALE_FETCH = 300 -- a token request older than this is no longer waited for

function _M.new(credentials)
  return setmetatable({
    client_id = credentials.client_id,
    secret = credentials.client_secret,
    scopes = credentials.scopes,
    ims_url = credentials.ims_url or _M.default_ims_url,
    cached = nil,       -- the access token in use
    valid_until = 0,
    fetching = nil,     -- the token request in flight: { by = coroutine, until_ = time }
  }, Auth)
end

function Auth:form()
  return "grant_type=client_credentials&client_id=" .. escape(self.client_id)
    .. "&client_secret=" .. escape(self.secret) .. "&scope=" .. escape(self.scopes)
end

-- IMS answers {"error": ..., "error_description": ...}: an auth error.
local function refused(err)
  err.kind = "auth"
  return err
end

-- Whether another coroutine's token request is still worth waiting for:
-- not when it was this coroutine's own (it raised and left its marker),
-- when that coroutine is dead, or when it is older than its bound.
local function still_fetching(f)
  if not f then return false end
  local me = running()
  if f.by == me then return false end
  if f.by and co_status(f.by) == "dead" then return false end
  return now() < f.until_
end

local function deadline_error()
  return errors.new { kind = "timeout", sent = false,
    message = "deadline passed while another call was fetching the IMS token" }
end

-- request(form) does the POST (with the client's retry rules for safe
-- calls) and returns the raw response or nil, err. ends: the asking call's
-- deadline (monotonic seconds) or nil; waiting for another coroutine's
-- request stops there too.
function Auth:token(request, wait, ends)
  if self.cached and now() < self.valid_until then return self.cached end
  -- another coroutine is asking already: share its answer. No pcall around
  -- the request (a wait may yield, which PUC Lua 5.1 forbids inside pcall),
  -- so a request that raised is recognised by its marker instead.
  while still_fetching(self.fetching) do
    if ends and now() >= ends then return nil, deadline_error() end
    wait(0.01)
  end
  if self.cached and now() < self.valid_until then return self.cached end
  local asked_at = now()
  self.fetching = { by = running(), until_ = asked_at + (ends and min(ends - asked_at, STALE_FETCH) or STALE_FETCH) }
  local res, err = request(self:form())
  self.fetching = nil
  if not res then
    if err.kind == "http" then return nil, refused(err) end
    return nil, err
  end
  local doc = decode(res.body)
  if type(doc) ~= "table" or type(doc.access_token) ~= "string" or doc.access_token == ""
    or type(doc.expires_in) ~= "number" then
    return nil, errors.new { kind = "auth", status = res.status, request_id = res.request_id,
      message = "IMS answered without an access_token and expires_in" }
  end
  self.cached = doc.access_token
  -- stop using a token five minutes before it expires; one that lives less
  -- than twenty minutes, after three quarters of its life
  self.valid_until = asked_at + doc.expires_in - min(MARGIN, doc.expires_in / 4)
  return self.cached
end

-- After a 401 401013 with this token: forget it, so the next call asks again.
function Auth:invalidate(token)
  if self.cached == token then
    self.cached, self.valid_until = nil, 0
  end
end

function Auth:secrets()
  return { self.secret, self.cached }
end

return _M
