-- A throwaway PKI for TLS tests, made with the openssl CLI: a test CA, a
-- server certificate it signs (localhost and 127.0.0.1), and an unrelated CA.
local _M = {}

local function run(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  if ok ~= true and ok ~= 0 then error("tls: command failed: " .. cmd, 2) end
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function new_ca(dir, name)
  local key, pem = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".pem"
  run(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    .. " -keyout %s -out %s -days 2 -subj '/CN=lua-flowservice %s'"
    .. " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign")
    :format(key, pem, name))
  return pem, key
end

-- Returns { dir, ca_file, ca_path, cert, key, other_ca_file }; remove with _M.remove(pki).
function _M.make()
  local p = assert(io.popen("mktemp -d /tmp/flowservice-tls.XXXXXX"))
  local dir = p:read("*l")
  p:close()
  local ca_pem, ca_key = new_ca(dir, "ca")
  local other_pem = new_ca(dir, "other-ca")
  local cert, key = dir .. "/server.pem", dir .. "/server.key"
  write(dir .. "/server.ext", table.concat({
    "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:127.0.0.1", -- the last for nginx's host check (names only)
    "basicConstraints=CA:FALSE",
    "keyUsage=digitalSignature",
    "extendedKeyUsage=serverAuth",
  }, "\n") .. "\n")
  run(("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    .. " -keyout %s -out %s/server.csr -subj /CN=localhost"):format(key, dir))
  run(("openssl x509 -req -in %s/server.csr -CA %s -CAkey %s -CAcreateserial"
    .. " -out %s -days 2 -extfile %s/server.ext"):format(dir, ca_pem, ca_key, cert, dir))
  -- a hashed directory, for the ca_path option
  run(("mkdir -p %s/capath && cp %s %s/capath/ && openssl rehash %s/capath"):format(dir, ca_pem, dir, dir))
  return {
    dir = dir,
    ca_file = ca_pem,
    ca_path = dir .. "/capath",
    cert = cert,
    key = key,
    other_ca_file = other_pem,
  }
end

function _M.remove(pki)
  if pki and pki.dir and pki.dir:match("^/tmp/flowservice%-tls%.") then
    os.execute("rm -rf '" .. pki.dir .. "'")
  end
end

return _M
