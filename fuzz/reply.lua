-- Fuzz driver 2 (fuzz/reply.c): a reply -> a result -> an error object.
--
-- Input: an HTTP reply as libcurl hands it over: header lines (each given
-- to the header callback as is, status lines included) up to the first
-- empty line, then the body (given to the body callback in 997-byte
-- chunks). The status is the last status line's ("HTTP/x NNN"), 200
-- without one. Two pseudo-headers steer the call, passing through the
-- header callback like any other: X-Fuzz-Kind: raw (a raw request, not a
-- re-trigger), X-Fuzz-Max-Body: N (default 8 MiB).
--
-- Properties: the C result has the shape the README promises for its
-- status (2xx re-trigger: {id, etag} exactly when the body is a JSON
-- object with a string id and a string or absent etag; else a decode
-- error; non-2xx: kind "http" with the body unchanged; past max_body:
-- decode "too large"); retry_after a whole number >= 0, and the seconds
-- given when Retry-After is plain digits; date the epoch of the Date
-- header; errors.from_core keeps kind and status, and its string is one
-- line that never holds a secret, nor do its fields.
local errors = require "flowservice.errors"
local decode = require("cjson.safe").new().decode

local find, format, lower, match, sub = string.find, string.format, string.lower, string.match, string.sub
local math_type, pairs, pcall, tonumber, tostring, type = math.type, pairs, pcall, tonumber, tostring, type
local fail = fuzz.fail

local SECRETS = { "fuzz-s3cr3t-token", "fuzz-api-key-1234", "fuzz-client-secret" }

local function parse(input)
  local lines, pos, status = {}, 1, 200
  local kind, max_body, retry_after, date = "run", 8 * 1024 * 1024, nil, nil
  while pos <= #input do
    local nl = find(input, "\n", pos, true)
    local line = sub(input, pos, nl or #input)
    pos = (nl or #input) + 1
    if line == "\r\n" or line == "\n" then break end
    lines[#lines + 1] = line
    if sub(line, 1, 5) == "HTTP/" then -- a new response: the engine forgets the last one's
      retry_after, date = nil, nil
      status = tonumber(match(line, "^HTTP/%S+ (%d%d%d)")) or status
    end
    local name, value = match(line, "^([^:]*):[ \t]*(.-)[ \t\r\n]*$")
    name = name and lower(name)
    if name == "x-fuzz-kind" and value == "raw" then kind = "raw" end
    if name == "x-fuzz-max-body" and match(value, "^%d%d?%d?%d?%d?%d?$") and tonumber(value) > 0 then
      max_body = tonumber(value)
    end
    if name == "retry-after" and #value < 128 then retry_after = value end
    -- kept as a C string: a NUL ends it (harmless: no date has one)
    if name == "date" and #value > 0 and #value < 40 then
      date = match(value, "^[^%z]*")
      if date == "" then date = nil end -- "" is no Date
    end
  end
  local body, chunks = sub(input, pos), {}
  for i = 1, #body, 997 do chunks[#chunks + 1] = sub(body, i, i + 996) end
  return kind, status, lines, chunks, max_body, body, retry_after, date
end

local function check_error(err, status, body, too_large, retry_after)
  if type(err) ~= "table" then fail("no error table") end
  if too_large then
    if err.kind ~= "decode" or not find(tostring(err.message), "too large", 1, true) then
      fail(format("a body past max_body gave kind %s: %s", tostring(err.kind), tostring(err.message)))
    end
  end
  if err.retry_after ~= nil then
    if math_type(err.retry_after) ~= "integer" or err.retry_after < 0 then
      fail("retry_after is not a whole number >= 0: " .. tostring(err.retry_after))
    end
  end
  if retry_after and match(retry_after, "^%d+$") and #retry_after < 18 and not too_large
     and err.retry_after ~= tonumber(retry_after) then
    fail(format("Retry-After: %s read as %s", retry_after, tostring(err.retry_after)))
  end
  if err.date ~= nil and math_type(err.date) ~= "integer" then fail("date is not an integer") end
  local e = errors.from_core(err, SECRETS)
  if e.kind ~= err.kind or e.status ~= status and not too_large then fail("from_core changed kind or status") end
  local ok, line = pcall(tostring, e)
  if not ok or type(line) ~= "string" then fail("tostring(err) raised: " .. tostring(line)) end
  if find(line, "[\r\n]") then fail(format("tostring(err) is not one line: %q", line)) end
  for _, secret in pairs(SECRETS) do
    for _, field in pairs { "message", "body", "code", "request_id" } do
      if type(e[field]) == "string" and find(e[field], secret, 1, true) then
        fail(format("err.%s holds a secret", field))
      end
    end
    if find(line, secret, 1, true) then fail(format("tostring(err) holds a secret: %q", line)) end
  end
end

return function(input)
  local kind, status, lines, chunks, max_body, body, retry_after, date = parse(input)
  local ok, a, b, c, d = pcall(fuzz.reply, kind, status, lines, chunks, max_body)
  if not ok then fail("transfer:result() raised: " .. tostring(a)) end
  local too_large = #body > max_body
  local two = status >= 200 and status <= 299
  if too_large then
    if a ~= nil then fail("a body past max_body gave a result") end
    return check_error(b, nil, body, true, retry_after)
  end
  if not two then
    if a ~= nil or type(b) ~= "table" or b.kind ~= "http" or b.status ~= status or b.body ~= body then
      fail(format("HTTP %d did not give nil, {kind = 'http', status, body}", status))
    end
    return check_error(b, status, body, false, retry_after)
  end
  if kind == "raw" then
    if type(a) ~= "table" or a.status ~= status or a.body ~= body or a.request_id ~= "fuzz-request-id" then
      fail("a raw 2xx did not give {status, body, request_id}")
    end
    if date and a.date ~= nil and math_type(a.date) ~= "integer" then fail("date is not an integer") end
    return
  end
  -- the oracle for push_run: the same reading, in Lua
  local doc = decode(body)
  local want_id, etag = nil, nil
  if type(doc) == "table" and type(doc.id) == "string" then
    etag = doc.etag
    if etag == nil then etag = doc.eTag end
    if etag == nil or type(etag) == "string" then want_id = doc.id end
  end
  if want_id then
    if type(a) ~= "table" or a.id ~= want_id or a.etag ~= etag or b ~= status or c ~= "fuzz-request-id" then
      fail("a 2xx run reply did not give {id, etag}, status, request id")
    end
    if d ~= date then fail(format("raw Date %q came back as %q", tostring(date), tostring(d))) end
  else
    if a ~= nil or type(b) ~= "table" or b.kind ~= "decode" or b.status ~= status then
      fail(format("a 2xx reply that is no run did not give a decode error: %s", tostring(a)))
    end
    check_error(b, status, body, false, retry_after)
  end
end
