-- Replies and how they leave the fake: JSON bodies in the three error
-- shapes (gateway, Flow Service problem document, old style), the raw-socket
-- writer for exact or closing replies, truncation, oversize, and the canned
-- replies of scenarios.
--
-- A reply: { status = n, headers = { name = value }, body = string, json = bool }

local ngx = ngx
local util = require("fake.util")

local pairs, tonumber, tostring = pairs, tonumber, tostring
local math_floor = math.floor
local str_format, str_rep, str_sub = string.format, string.rep, string.sub
local table_concat = table.concat
local encode = util.encode

local _M = {}

local ERROR_TYPE_BASE = "https://ns.adobe.com/aep/errors/"
_M.ERROR_TYPE_BASE = ERROR_TYPE_BASE

local function json_reply(status, value)
  return { status = status, headers = {}, body = encode(value), json = true }
end

local function gateway_error(status, code, message)
  return json_reply(status, { error_code = code, message = message })
end

local function problem(code, status, title, detail, request_id)
  return json_reply(status, {
    type = ERROR_TYPE_BASE .. code,
    title = title,
    status = status,
    report = { ["detailed-message"] = detail, ["request-id"] = request_id },
    errorMessage = title,
    errorDetails = detail,
  })
end

local REASONS = {
  [200] = "OK", [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden",
  [404] = "Not Found", [412] = "Precondition Failed", [429] = "Too Many Requests",
  [500] = "Internal Server Error", [502] = "Bad Gateway", [503] = "Service Unavailable",
  [504] = "Gateway Timeout",
}

local function is_http2()
  return (ngx.req.http_version() or 1) >= 2
end

-- Write a hand-made HTTP/1.1 response on the raw connection. Used where the
-- bytes on the wire must be exact (a short body) or the connection must
-- close after this reply. Taking the raw socket makes nginx drop keepalive.
local function send_raw(status, headers, first, rest, pause, declared_length)
  local sock, err = ngx.req.socket(true)
  if not sock then error("raw request socket: " .. tostring(err)) end
  local body_length = #first + #(rest or "")
  local head = { str_format("HTTP/1.1 %d %s", status, REASONS[status] or "Unknown") }
  for name, value in pairs(headers) do
    head[#head + 1] = name .. ": " .. tostring(value)
  end
  head[#head + 1] = "Content-Length: " .. tostring(declared_length or body_length)
  head[#head + 1] = "Connection: close"
  head[#head + 1] = "\r\n"
  local ok, serr = sock:send(table_concat(head, "\r\n") .. first)
  if not ok then return ngx.log(ngx.INFO, "fake: raw send: ", serr) end
  if rest and rest ~= "" then
    if pause then ngx.sleep(pause) end
    sock:send(rest)
  end
end

-- The one way a reply leaves the fake (besides drops and truncation).
local function deliver(reply, sc, request_id)
  local headers = {}
  if reply.json then headers["Content-Type"] = "application/json" end
  if request_id then headers["x-request-id"] = request_id end
  if sc and sc.retry_after then headers["Retry-After"] = tostring(sc.retry_after) end
  for name, value in pairs(reply.headers or {}) do headers[name] = value end
  if sc and type(sc.headers) == "table" then
    for name, value in pairs(sc.headers) do headers[name] = value end
  end

  local body = reply.body or ""
  local slow = sc and tonumber(sc.slow_body)
  local half = math_floor(#body / 2)

  if sc and sc.close and not is_http2() then
    return send_raw(reply.status, headers, slow and str_sub(body, 1, half) or body,
                    slow and str_sub(body, half + 1) or nil, slow)
  end

  ngx.status = reply.status
  for name, value in pairs(headers) do ngx.header[name] = value end
  -- An explicit length keeps nginx from chunking, also when the body goes
  -- out in two parts.
  ngx.header["Content-Length"] = #body
  if slow and #body > 0 then
    ngx.print(str_sub(body, 1, half))
    ngx.flush(true)
    ngx.sleep(slow)
    ngx.print(str_sub(body, half + 1))
  else
    ngx.print(body)
  end
end

local function send_truncated(request_id)
  local partial = '{"id":"'
  local headers = { ["Content-Type"] = "application/json" }
  if request_id then headers["x-request-id"] = request_id end
  if not is_http2() then
    return send_raw(200, headers, partial, nil, nil, 100)
  end
  -- No raw socket on HTTP/2: promise 100 bytes, send fewer, then reset.
  ngx.status = 200
  for name, value in pairs(headers) do ngx.header[name] = value end
  ngx.header["Content-Length"] = 100
  ngx.print(partial)
  ngx.flush(true)
  return "abort"
end

local function oversize_reply(size)
  local skeleton = '{"id":"x","etag":"\\"y\\"","pad":""}'
  local pad = str_rep("a", size - #skeleton)   -- rep of a negative count is ""
  return {
    status = 200, headers = {}, json = true,
    body = '{"id":"x","etag":"\\"y\\"","pad":"' .. pad .. '"}',
  }
end

-- A scenario's canned reply. 429 and 5xx without a body get the body the
-- real service would send, so a client's error parsing is exercised too.
local function scenario_reply(sc, request_id)
  local status = tonumber(sc.status)
  if sc.body ~= nil then
    return { status = status, headers = {}, body = tostring(sc.body), json = true }
  end
  if status == 429 then
    return gateway_error(429, "429050", "Too many requests")
  elseif status == 500 then
    return problem("FLOW-1102-500", 500, "Internal server error",
                   "An internal error occurred.", request_id)
  elseif status == 503 then
    return problem("FLOW-1103-503", 503, "Service unavailable",
                   "The service is temporarily unavailable. Please retry later.", request_id)
  elseif status == 504 then
    return problem("FLOW-1104-504", 504, "Gateway timeout",
                   "The upstream service did not answer in time.", request_id)
  end
  return { status = status, headers = {}, body = "" }
end


-- A gateway's own failure, in the gateway's body shape (the code is made up).
local function bad_gateway()
  return gateway_error(502, "502000", "Bad gateway")
end

-- A 200 with {"items": [...]} (and "_links" when given, already encoded):
-- spliced by hand, as cjson 2.1.0 has no empty-array marker.
local function items_reply(list, links)
  local body = '{"items":' .. util.encode_array(list)
  if links then body = body .. ',"_links":' .. links end
  return { status = 200, headers = {}, json = true, body = body .. '}' }
end

_M.json_reply = json_reply
_M.gateway_error = gateway_error
_M.problem = problem
_M.deliver = deliver
_M.send_truncated = send_truncated
_M.oversize_reply = oversize_reply
_M.scenario_reply = scenario_reply
_M.bad_gateway = bad_gateway
_M.items_reply = items_reply

return _M
