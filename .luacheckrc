-- luacheck (Debian's lua-check) over lua/, bin/ and spec/: `make lint`,
-- which `make test` runs. The code runs on Lua 5.1 to 5.4 and LuaJIT.
std = "max"
max_line_length = 140
self = false -- an unused self of a method is no finding
include_files = { "lua/**/*.lua", "bin/flowservice", "spec/**/*.lua", ".busted", ".luacheckrc" }

-- OpenResty's globals, where the module runs inside nginx
files["lua/flowservice/ngx.lua"] = { read_globals = { "ngx" } }
files["lua/flowservice/heal.lua"] = { read_globals = { "ngx" } }
files["lua/flowservice/webhook.lua"] = { globals = { "ngx" } } -- a content handler sets ngx.status

files["spec/**/*.lua"] = { std = "+busted" }
files["spec/support/wire_handler.lua"] = { read_globals = { "ngx" } } -- runs inside nginx
files[".busted"] = { std = "+busted" }
-- the fake's spec reads some replies only for their side effects
files["spec/fake_spec.lua"] = { ignore = { "311" } }
