-- What the suite's I/O Events deliveries share: the key paths the fake
-- serves the suite's key pair at (spec/support/signing.lua makes it with
-- the openssl CLI) and fresh event ids. The fake builds, signs and sends the
-- events itself (fake/fake/emitter.lua, server:emit).
local _M = {}

_M.KEY1, _M.KEY2 = "/prod/keys/pub-key-suite1.pem", "/prod/keys/pub-key-suite2.pem"

local counter = 0
function _M.event_id()
  counter = counter + 1
  return ("suite-%d-%d"):format(os.time(), counter)
end

return _M
