-- Fuzz driver 1 (fuzz/request.c): options table -> request builder.
--
-- Input: records split by "\30", each "key\31value"; a value holding
-- "\29" splits once more into name and value. Keys:
--   run            the run id            token_later   core.new's flag
--   h              headers[name] = value  n / b / t     opts[name] = number / boolean / {}
--   i              opts[number] = value  -              opts[value] = nil
--   s.method s.path s.query s.body s.content_type s.identity
--                  a request shape (client:submit instead of prepare_retrigger)
--   anything else  opts[key] = value (a string)
-- Options start valid (token, key, org on a loopback base URL) so every
-- input reaches the builder; records take them apart.
--
-- Properties: a refusal is a luaL_argerror ("bad argument #..."), never
-- another error; an accepted request has an http(s) URL without control
-- bytes or spaces, header lines "Name: value" or "Name;" with a token name
-- and no control byte but tab, each of our nine headers once, the
-- identity values exactly as given, and every opts.headers entry on the
-- wire whole (a NUL must not cut one short); the nginx transport's bytes
-- for the same run action carry the same lines (check_bytes).
local core = require "flowservice.core"

local byte, find, format, lower, sub = string.byte, string.find, string.format, string.lower, string.sub
local pairs, pcall, tonumber, type = pairs, pcall, tonumber, type
local fail, wire = fuzz.fail, fuzz.wire

local OURS = { "authorization", "x-api-key", "x-gw-ims-org-id", "x-sandbox-name", "content-type",
  "accept", "x-request-id", "if-match", "user-agent" }
local IS_OURS = {}
for _, n in pairs(OURS) do IS_OURS[n] = true end

local function split(s, sep)
  local i = find(s, sep, 1, true)
  if not i then return s, nil end
  return sub(s, 1, i - 1), sub(s, i + 1)
end

local function decode(input)
  local opts = { access_token = "fuzz-token", api_key = "fuzz-key", org_id = "FUZZ@AdobeOrg",
    base_url = "http://127.0.0.1:9/data/foundation/flowservice" }
  local run, shape, token_later, headers = "4fb0418e-1804-45d6-8d56-dd51f05c0baf", nil, false, nil
  for record in (input .. "\30"):gmatch("(.-)\30") do
    local key, value = split(record, "\31")
    value = value or ""
    local name, v = split(value, "\29")
    if key == "run" then run = value
    elseif key == "token_later" then token_later = true
    elseif key == "h" then
      headers = headers or {}
      opts.headers = headers
      headers[name] = v or ""
    elseif key == "n" then opts[name] = tonumber(v or "")
    elseif key == "b" then opts[name] = v == "1"
    elseif key == "t" then opts[name] = {}
    elseif key == "i" then opts[tonumber(name) or 1] = v
    elseif key == "-" then opts[value] = nil
    elseif sub(key, 1, 2) == "s." then
      shape = shape or { method = "GET", path = {} }
      local field = sub(key, 3)
      if field == "path" then shape.path[#shape.path + 1] = value
      elseif field == "query" then
        shape.query = shape.query or {}
        shape.query[#shape.query + 1] = { name, v or "" }
      elseif field == "identity" then shape.identity = value == "1"
      else shape[field] = value end
    else
      opts[key] = value
    end
  end
  return opts, run, shape, token_later
end

local check_own -- below

local function refused(err, what)
  if type(err) ~= "string" or not find(err, "^bad argument #%d") then
    fail(format("%s raised something other than an argument error: %s", what, tostring(err)))
  end
  if wire() then fail(what .. " refused but a request was built") end
end

local function is_token(s)
  return #s > 0 and not find(s, "[^%w!#$%%&'*+%-.^_`|~]")
end

local function has_control(s)
  return find(s, "[%z\1-\8\10-\31\127]") ~= nil
end

-- line -> name, value ("" for "Name;")
local function parse_line(line)
  local name, value = line:match("^([^:;]+): (.*)$")
  if not name then name, value = line:match("^([^:;]+);$"), "" end
  if not name or not is_token(name) then fail(format("header line %q is not 'Name: value'", line)) end
  if has_control(value) then fail(format("header line %q holds a control byte", line)) end
  return name, value
end

local function check_wire(opts, run, shape)
  local url, lines = wire()
  if not url then fail("accepted, but no request was built") end
  if not find(url, "^https?://") then fail(format("URL %q is not http(s)", url)) end
  if find(url, "[%z\1-\32\127]") then fail(format("URL %q holds a control byte or space", url)) end
  -- a base URL with a query keeps it: ...action?x=1&op=...
  if not shape and not (find(url, "/runs/" .. run:gsub("%p", "%%%0") .. "/action%?")
                        and (find(url, "[?&]op=[^&#]*$") or find(url, "[?&]op=[^&#]*#"))) then
    fail(format("URL %q is not the run action of %q", url, run))
  end
  local seen = {}
  for _, line in ipairs(lines) do
    local name, value = parse_line(line)
    local lname = lower(name)
    if IS_OURS[lname] and seen[lname] then fail(format("header %s sent twice", name)) end
    seen[lname] = seen[lname] or {}
    seen[lname][#seen[lname] + 1] = value
  end
  local identity = not shape or shape.identity ~= false
  if identity then
    local want = {
      authorization = "Bearer " .. opts.access_token, ["x-api-key"] = opts.api_key,
      ["x-gw-ims-org-id"] = opts.org_id, ["x-sandbox-name"] = opts.sandbox or "prod" }
    for name, value in pairs(want) do
      local got = seen[name] and seen[name][1]
      if got ~= value then fail(format("%s went out as %q, not %q", name, tostring(got), value)) end
    end
  else
    if seen.authorization or seen["x-api-key"] then fail("a request without identity sent identity") end
  end
  -- one of ours named twice ("Accept", "accept") goes out once, with one
  -- of the values given; any other name goes out as often as it is given
  local given = {}
  for name, value in pairs(opts.headers or {}) do
    local key = IS_OURS[lower(name)] and lower(name) or name
    given[key] = given[key] or {}
    given[key][#given[key] + 1] = not find(value, "[^ \t]") and "" or value
  end
  for key, values in pairs(given) do
    local wanted = IS_OURS[key] and 1 or #values
    local found = 0
    for _, want in ipairs(values) do
      for _, v in ipairs(seen[lower(key)] or {}) do
        if v == want then found = found + 1 break end
      end
    end
    if found < wanted then
      fail(format("headers[%q] (%d value(s)) is not on the wire whole", key, #values))
    end
  end
  return lines
end

-- The request id's value, whatever it is, as one: two requests compare.
local function one_id(bytes)
  return (bytes:gsub("\r\n([Xx]%-[Rr]equest%-[Ii][Dd]): [^\r]*\r\n", "\r\n%1: ID\r\n", 1))
end

-- The client's own options (no per-call table), three calls: the first reads
-- them, the later ones may be made from its template alone (request.c's
-- fs_request_wire_plain); each sends the bytes the call with the table sent,
-- its request id aside (a fresh one, unless the options name one).
function check_own(client, run, bytes)
  for i = 1, 3 do
    local ok, t, head, own, tail = pcall(client.wire_retrigger, client, run)
    wire()
    if not ok then fail(format("call %d with the client's own options raised: %s", i, tostring(t))) end
    if not t then fail(format("call %d with the client's own options refused the run id", i)) end
    t:cancel()
    local got = head .. own .. tail
    if one_id(got) ~= one_id(bytes) then
      fail(format("call %d with the client's own options sent %q, with the table %q", i, got, bytes))
    end
    -- the plain way (client:wire_plain, lean on the last call): the same
    -- bytes, its middle piece the call's x-request-id line alone
    local pok, phead, pline, ptail = pcall(client.wire_plain, client, run, i == 3)
    wire()
    if not pok then fail(format("wire_plain, call %d, raised: %s", i, tostring(phead))) end
    if phead == false then fail(format("wire_plain, call %d, refused the run id", i)) end
    if phead then
      if not find(pline, "^x%-request%-id: [^%z\1-\31\127]+\r\n$") then
        fail(format("wire_plain's line %q is not one x-request-id line", pline))
      end
      got = phead .. pline .. ptail
      if one_id(got) ~= one_id(bytes) then
        fail(format("wire_plain, call %d, sent %q, with the table %q", i, got, bytes))
      end
    end
  end
end

-- The nginx transport's bytes for the same run action: the request line,
-- Host, libcurl's header lines in libcurl's order ("Name;" sent as
-- "Name:"; x-request-id aside, a new one per request), Content-Length: 0,
-- the blank line, nothing after. Refused only for a proxy or user info.
local function check_bytes(client, run, opts, lines)
  local ok, t, head, own, tail = pcall(client.wire_retrigger, client, run, opts)
  local bytes = ok and t and head .. own .. tail
  wire()
  if not ok then
    if opts.proxy ~= nil or find(tostring(t), "cannot send to this base_url", 1, true) then return end
    fail("wire_retrigger refused what prepare_retrigger took: " .. tostring(t))
  end
  if opts.proxy ~= nil then fail("the nginx transport took a proxy") end
  if t == false then fail("wire_retrigger refused a run id prepare_retrigger took") end
  t:cancel()
  local head = bytes:match("^(.-\r\n)\r\n$")
  if not head then fail(format("%q is not one head and an empty body", bytes)) end
  local got = {}
  for line in head:gmatch("(.-)\r\n") do got[#got + 1] = line end
  if not find(got[1], "^POST /[^%z\1-\32\127]* HTTP/1%.1$") then
    fail(format("request line %q", got[1]))
  end
  if not find(got[2], "^Host: [^%z\1-\32\127]+$") then fail(format("host line %q", got[2])) end
  if got[#got] ~= "Content-Length: 0" then fail(format("last line %q", got[#got])) end
  local want = {}
  for _, line in ipairs(lines) do
    if not find(lower(line), "^x%-request%-id[:;]") then want[#want + 1] = (line:gsub(";$", ":")) end
  end
  local k = 0
  for i = 3, #got - 1 do
    if not find(lower(got[i]), "^x%-request%-id:") then
      parse_line((got[i]:gsub(":$", ";")))
      k = k + 1
      if got[i] ~= want[k] then
        fail(format("wire line %d is %q, libcurl's %q", i, got[i], tostring(want[k])))
      end
    end
  end
  if k ~= #want then fail(format("%d header lines on the wire, libcurl's %d", k, #want)) end
  check_own(client, run, bytes)
end

return function(input)
  local opts, run, shape, token_later = decode(input)
  wire()
  local ok, client = pcall(core.new, opts, token_later)
  if not ok then return refused(client, "core.new") end
  wire()
  local t
  if shape then
    ok, t = pcall(client.submit, client, opts, shape)
  else
    ok, t = pcall(client.prepare_retrigger, client, run, opts)
  end
  if ok then
    t:cancel()
    local lines = check_wire(opts, run, shape)
    if not shape then
      check_bytes(client, run, opts, lines)
      -- again: the handle comes back holding this URL and the call sets its
      -- path alone (request.c checks that it names the URL libcurl is given)
      ok, t = pcall(client.prepare_retrigger, client, run, opts)
      if not ok then fail("a second prepare_retrigger refused what the first took: " .. tostring(t)) end
      t:cancel()
      check_wire(opts, run, shape)
    end
  else
    refused(t, shape and "client:submit" or "client:prepare_retrigger")
  end
  client:close()
end
