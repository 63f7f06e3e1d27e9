-- Errors as values: the C core's plain error table -> one error object that
-- reads Adobe's three error body shapes, prints as one line, and never
-- carries a secret.
local decode = require("cjson.safe").new().decode

local format, gsub, match, sub = string.format, string.gsub, string.match, string.sub
local setmetatable, getmetatable, tostring, type, ipairs = setmetatable, getmetatable, tostring, type, ipairs

local _M = {}

local Error = {}
Error.__index = Error

local MAX_MESSAGE = 400 -- one readable line, not a page of HTML

local function one_line(s)
  s = gsub(gsub(s, "[%c]+", " "), "^%s+", "")
  if #s > MAX_MESSAGE then s = sub(s, 1, MAX_MESSAGE) .. "..." end
  return s
end

-- lua-cjson decodes numbers as floats on Lua 5.3+: "401013.0" is not a code
local function code_string(v)
  if type(v) == "number" then return format("%.0f", v) end
  if type(v) == "string" and v ~= "" then return v end
  return nil
end

-- Gateway {error_code, message}; problem document {type, report, errorMessage,
-- title}; old style {errorMessage}; IMS {error, error_description}.
local function read_adobe_body(body)
  local doc = decode(body)
  if type(doc) ~= "table" then return nil end
  local report = type(doc.report) == "table" and doc.report or {}
  local code = code_string(doc.error_code)
  if not code and type(doc.type) == "string" then
    code = match(doc.type, "([^/]+)$")
  end
  if not code and type(doc.error) == "string" then code = doc.error end
  local message = report["detailed-message"] or doc.errorMessage or doc.message
    or doc.error_description or doc.detail or doc.title
  return code, type(message) == "string" and message or nil,
    type(report["request-id"]) == "string" and report["request-id"] or nil
end

local function redact(s, secrets)
  if type(s) ~= "string" then return s end
  for _, secret in ipairs(secrets) do
    if #secret >= 4 then -- shorter ones would blank out ordinary words
      s = gsub(s, gsub(secret, "%p", "%%%0"), "<redacted>")
    end
  end
  return s
end

-- The strings that must never leave: whatever of them the options hold.
function _M.secrets_of(opts)
  local list = {}
  if type(opts) == "table" then
    for _, key in ipairs { "access_token", "api_key", "client_secret" } do
      if type(opts[key]) == "string" then list[#list + 1] = opts[key] end
    end
  end
  return list
end

function _M.new(fields)
  return setmetatable(fields, Error)
end

function _M.is_error(v)
  return getmetatable(v) == Error
end

-- raw: the table flowservice.core returns after nil; secrets: strings to hide.
function _M.from_core(raw, secrets)
  local err = _M.new(raw)
  if err.body and (err.kind == "http" or err.kind == "decode") then
    local code, message, server_request_id = read_adobe_body(err.body)
    err.code = err.code or code
    if err.kind == "http" then
      err.message = message or (err.body ~= "" and one_line(err.body)) or nil
    end
    err.request_id = err.request_id or server_request_id
  end
  secrets = secrets or {}
  err.message = redact(err.message, secrets)
  err.body = redact(err.body, secrets)
  err.code = redact(err.code, secrets) -- the server's words too (found by fuzz/reply)
  err.request_id = redact(err.request_id, secrets)
  return err
end

function Error:__tostring()
  local head
  if self.kind == "http" then
    head = "HTTP " .. tostring(self.status)
  else
    head = tostring(self.kind) .. " error"
    if self.status then head = head .. " (HTTP " .. tostring(self.status) .. ")" end
  end
  -- code and request id may come from the body: one line too (found by fuzz/reply)
  if self.code then head = head .. " " .. one_line(tostring(self.code)) end
  local line = "flowservice: " .. head
  if self.message then line = line .. ": " .. one_line(self.message) end
  local notes = {}
  if self.request_id then notes[#notes + 1] = "request-id " .. one_line(tostring(self.request_id)) end
  if self.sent == false then notes[#notes + 1] = "not sent" end
  if self.retry_after then notes[#notes + 1] = "retry after " .. tostring(self.retry_after) .. " s" end
  if #notes > 0 then line = line .. " (" .. table.concat(notes, ", ") .. ")" end
  return line
end

return _M
