-- The flowservice command run as a user runs it: a process with a clean
-- environment (env -i) pointed at a fake server, the exit status through the
-- shell (Lua 5.1's os.execute cannot report it). Every run checks what the
-- command promises of any output: no secret, no internal file path, no
-- traceback.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local q = h.q
local TOKEN, SECRET = fake.credentials.access_token, fake.ims_client.client_secret

local _M = {}

-- bin/flowservice from the source tree, with the 5.4 rock's modules
_M.SOURCE = "lua5.4 bin/flowservice"
_M.LUA_PATH = "build/tree/share/lua/5.4/?.lua;build/tree/share/lua/5.4/?/init.lua;;"
_M.LUA_CPATH = "build/tree/lib/lua/5.4/?.so;;"

-- The environment the fake accepts; extra: name -> value, or false to drop it.
function _M.environment(server_url, home, state_home, extra)
  local env = {
    PATH = os.getenv("PATH") or "/usr/bin:/bin", HOME = home, XDG_STATE_HOME = state_home,
    AEP_ACCESS_TOKEN = TOKEN, AEP_API_KEY = fake.credentials.api_key,
    AEP_ORG_ID = fake.credentials.org, FLOWSERVICE_URL = server_url,
  }
  for k, v in pairs(extra or {}) do env[k] = v or nil end
  return env
end

-- The shell words: env -i NAME=value ... command argv...
function _M.line(command, env, argv)
  local words = { "env -i" }
  for k, v in pairs(env) do words[#words + 1] = k .. "=" .. q(v) end
  words[#words + 1] = command
  for _, a in ipairs(argv) do words[#words + 1] = q(a) end
  return table.concat(words, " ")
end

function _M.no_secret(...)
  for _, text in ipairs { ... } do
    assert(not text:find(TOKEN, 1, true), "the access token leaked")
    assert(not text:find(SECRET, 1, true), "the client secret leaked")
  end
end

-- The checks every output gets, whatever the command and its outcome.
function _M.check(out, err)
  _M.no_secret(out, err)
  assert(not (out .. err):find("%.lua:%d"), "an internal file path in: " .. out .. err)
  assert(not (out .. err):find("traceback", 1, true), "a traceback in: " .. out .. err)
end

-- Runs it with stdin (a string, default empty), its files in dir:
-- exit status, stdout, stderr.
function _M.run(dir, command, env, argv, stdin)
  h.write(dir .. "/stdin", stdin or "")
  os.execute(_M.line(command, env, argv) .. " <" .. q(dir .. "/stdin") .. " >" .. q(dir .. "/stdout")
    .. " 2>" .. q(dir .. "/stderr") .. "; echo $? >" .. q(dir .. "/status"))
  local out, err = h.read(dir .. "/stdout") or "", h.read(dir .. "/stderr") or ""
  _M.check(out, err)
  return tonumber((h.read(dir .. "/status") or ""):match("%d+")), out, err
end

return _M
