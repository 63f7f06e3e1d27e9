-- The I/O Events public keys, as static.adobeioevents.com serves them: PEM
-- text at a path (GET, no gateway, no identity). Tests register them with
-- POST /_fake/keys {"keys": {"/prod/keys/pub-key-1.pem": "-----BEGIN ..."}};
-- they stay across /_fake/reset (the suite's key pair lives as long as the
-- server). GET /_fake/keys: {"fetches": {path: n}, "paths": [...]}, since
-- the keys were last set.
local util = require("fake.util")
local reply_m = require("fake.reply")

local next, pairs, pcall, type = next, pairs, pcall, type
local cjson = util.cjson
local json_reply = reply_m.json_reply

local _M = {}

local keys, fetches = {}, {}

-- The reply for GET path when it is a registered key, else nil.
function _M.serve(method, path)
  if method ~= "GET" or not keys[path] then return nil end
  fetches[path] = (fetches[path] or 0) + 1
  return { status = 200, headers = { ["Content-Type"] = "application/x-pem-file" }, body = keys[path] }
end

function _M.set(text)
  local t = util.decode_object(text)
  if not t or type(t.keys) ~= "table" then
    return json_reply(400, { errorMessage = 'expected {"keys": {path: pem}}' })
  end
  keys, fetches = {}, {}
  for path, pem in pairs(t.keys) do
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" or type(pem) ~= "string" then
      return json_reply(400, { errorMessage = "keys map absolute paths to PEM text" })
    end
    keys[path] = pem
  end
  return json_reply(200, { ok = true })
end

function _M.stats()
  local paths = {}
  for path in pairs(keys) do paths[#paths + 1] = path end
  local body = '{"fetches":' .. (next(fetches) and cjson.encode(fetches) or "{}")
    .. ',"paths":' .. util.encode_array(paths) .. "}"
  return { status = 200, headers = {}, body = body, json = true }
end

return _M
