-- Key pairs and signatures made by the suite with the openssl CLI, for the
-- I/O Events webhook (RSA-SHA256 over the raw body, base64), as Adobe signs.
--
--   local signing = require "spec.support.signing"
--   local keys = signing.make()      -- keys.dir, keys.private, keys.public (PEM text),
--                                    -- keys.other_public (an unrelated key pair's)
--   keys:sign(body [, private_path]) -- base64 signature of body
--   signing.remove(keys)
local _M = {}

local Keys = {}
Keys.__index = Keys

local function run(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  if ok ~= true and ok ~= 0 then error("signing: command failed: " .. cmd, 2) end
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- An RSA key pair of `bits` under dir/name.key and dir/name.pub.pem.
local function pair(dir, name, bits)
  local key, pub = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".pub.pem"
  run(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:%d -out %s"):format(bits, key))
  run(("openssl pkey -in %s -pubout -out %s"):format(key, pub))
  return key, read(pub)
end

function _M.make()
  local p = assert(io.popen("mktemp -d /tmp/flowservice-signing.XXXXXX"))
  local dir = p:read("*l")
  p:close()
  local keys = setmetatable({ dir = dir }, Keys)
  keys.private_path, keys.public = pair(dir, "adobe", 2048)
  keys.other_private_path, keys.other_public = pair(dir, "other", 2048)
  return keys
end

-- A key of another kind or size, as PEM text: "rsa1024", "ec".
function Keys:odd_public(kind)
  local key = self.dir .. "/" .. kind .. ".key"
  if kind == "ec" then
    run(("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out %s"):format(key))
  else
    run(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out %s"):format(key))
  end
  run(("openssl pkey -in %s -pubout -out %s.pub"):format(key, key))
  return read(key .. ".pub"), key
end

-- base64 of the RSA-SHA256 signature of body; lines: wrapped at 64 columns
function Keys:sign(body, private_path, lines)
  local msg = self.dir .. "/message"
  write(msg, body)
  run(("openssl dgst -sha256 -sign %s -out %s.sig %s"):format(private_path or self.private_path, msg, msg))
  run(("openssl base64 %s -in %s.sig -out %s.b64"):format(lines and "" or "-A", msg, msg))
  return (read(msg .. ".b64"):gsub("%s+$", ""))
end

function _M.remove(keys)
  if keys and keys.dir and keys.dir:match("^/tmp/flowservice%-signing%.") then
    os.execute("rm -rf '" .. keys.dir .. "'")
  end
end

return _M
