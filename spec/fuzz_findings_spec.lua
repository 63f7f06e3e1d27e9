-- Cases the fuzz targets (fuzz/, make fuzz) found, kept as specs so every
-- Lua version checks them. Each names the target that found it.
local core = require "flowservice.core"
local errors = require "flowservice.errors"
local journal = require "flowservice.journal"

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

  -- fuzz/reply: Adobe's code and the report's request-id come from the
  -- body, yet went into the error's one line as they were, unredacted
  it("an error's code and request-id from the body are redacted and kept on one line", function()
    local secret = "fuzz-s3cr3t-token"
    local e = errors.from_core({ kind = "http", status = 403,
      body = '{"error_code":"' .. secret .. '","message":"no"}' }, { secret })
    assert.is_nil(tostring(e):find(secret, 1, true))
    assert.is_nil(e.code:find(secret, 1, true))
    e = errors.from_core({ kind = "http", status = 409,
      body = '{"type":"x/FLOW-1\\nInjected: 1","report":{"request-id":"a\\r\\nb ' .. secret .. '"}}' },
      { secret })
    local line = tostring(e)
    assert.is_nil(line:find("[\r\n]"), line)
    assert.matches("HTTP 409 FLOW-1 Injected: 1", line, 1, true)
    assert.is_nil(line:find(secret, 1, true))
    assert.is_nil(e.request_id:find(secret, 1, true))
  end)

  -- fuzz/journal: a foreign line's own "pendings" field was kept, and a
  -- later pending line of the same run then raised inside the fold, so
  -- the journal could not be read at all
  it("a journal line's own pendings field cannot break reading the journal", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write('{"run":"a","state":"done","pendings":"x","new_ids":7}\n',
      '{"run":"a","state":"ambiguous"}\n',
      '{"run":"a","flow":"f","state":"pending","request_id":"r1"}\n')
    f:close()
    local ok, state = pcall(journal.read, path)
    os.remove(path)
    assert.is_true(ok, tostring(state))
    assert.equal("pending", state.runs.a.state)
    assert.same({ { request_id = "r1" } }, state.runs.a.pendings)
    assert.same({}, state.runs.a.new_ids)
  end)

  -- fuzz/parsers: the old parse_time took a fraction without its dot, so a
  -- mistyped "23:59:529Z" was read as 23:59:52.9; flowservice.window takes
  -- a fraction only after a dot.
  it("a time with digits right after the seconds is refused", function()
    local window = require "flowservice.window"
    local cli = require "flowservice.cli"
    for _, text in ipairs { "2024-02-29T23:59:529Z", "2026-11-24T00:00:001+00:00" } do
      local ms, why = window.parse(text)
      assert.is_nil(ms, text)
      assert.matches("is not a time", why)
      local ok, err = pcall(cli.parse_time, "since", text)
      assert.is_false(ok, text)
      assert.matches("is not a time", err.message)
    end
  end)
end)
