-- Cases the fuzz targets (fuzz/, make fuzz) found, kept as specs so every
-- Lua version checks them. Each names the target that found it.
local core = require "flowservice.core"

local function opts(extra)
  local o = { access_token = "fake-token", api_key = "fake-api-key", org_id = "FAKEORG@AdobeOrg",
    base_url = "http://127.0.0.1:9/data/foundation/flowservice" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("fuzz findings", function()
  -- fuzz/request: option names were compared as C strings, so a name with
  -- a NUL in it passed as the option before the NUL
  it("an option name with a NUL in it is unknown, not the option before the NUL", function()
    for _, name in ipairs { "sandbox\0", "sandbox\0\11", "base_url\0x", "headers\0" } do
      local ok, err = pcall(core.new, opts { [name] = "x" })
      assert.is_false(ok, name)
      assert.matches("option '" .. name:match("^[%w_]+") .. "' is unknown", err, 1, true)
    end
    local client = core.new(opts())
    local ok, err = pcall(client.prepare_retrigger, client, "r1", opts { ["org_id\0"] = "x" })
    assert.is_false(ok)
    assert.matches("is unknown", err, 1, true)
    client:close()
  end)

  it("a request shape field with a NUL in it is unknown", function()
    local client = core.new(opts())
    local ok, err = pcall(client.submit, client, opts(), { method = "GET", path = { "runs" }, ["query\0"] = {} })
    assert.is_false(ok)
    assert.matches("request field 'query' is unknown", err, 1, true)
    client:close()
  end)
end)
