-- Request shapes through a client of the C core (client:request), the seam
-- that client.lua's reads and the IMS request go through.
local core = require "flowservice.core"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

describe("client:request with a request shape", function()
  local server, client

  local function opts(extra) return h.opts(server.url, extra) end

  setup(function()
    server = fake.start()
    client = core.new(opts())
  end)
  teardown(function()
    client:close()
    server:stop()
  end)
  before_each(function() server:reset() end)

  -- A shape whose every field is made afresh by __index, with a collection
  -- on each read: a value borrowed from it would be freed before use.
  local function indexed(fields)
    return setmetatable({}, { __index = function(_, key)
      collectgarbage()
      local v = fields[key]
      if type(v) == "table" then
        local copy = {}
        for i, x in ipairs(v) do copy[i] = x .. "" end
        return copy
      end
      return type(v) == "string" and (v .. "") or v
    end })
  end

  it("sends a valid shape, with path segments escaped", function()
    local res, err = client:request(opts(), { method = "GET", path = { "runs", h.runs.failed },
      query = { { "x", "a b" } } })
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.matches(h.runs.failed, res.body, 1, true)
    local _, err2 = client:request(opts(), { method = "GET", path = { "runs", "a/b c" } })
    assert.equal(404, err2.status)
    local got = server:requests()
    assert.equal(2, #got)
    assert.equal("/runs/" .. h.runs.failed .. "?x=a+b", got[1].uri) -- libcurl form-escapes the query
    assert.equal("/runs/a%2fb%20c", got[2].uri:lower())
  end)

  it("sends a valid shape whose tables have metatables without __index", function()
    local mt = { __tostring = function() return "shape" end }
    local res, err = client:request(opts(), setmetatable({ method = "GET",
      path = setmetatable({ "runs", h.runs.failed }, mt) }, mt))
    assert.is_nil(err)
    assert.equal(200, res.status)
  end)

  describe("refuses before any I/O", function()
    after_each(function() assert.same({}, server:requests()) end)

    local function refuses(pattern, shape)
      local ok, msg = pcall(client.request, client, opts(), shape)
      assert.is_false(ok)
      assert.matches("bad argument #3 to '[^']*' %(" .. pattern, msg)
    end

    it("a shape whose fields come only from an __index metamethod", function()
      local fields = { method = "POST", path = { "runs", h.runs.failed, "action" },
        query = { { "op", "re-trigger" } }, body = string.rep("b", 64),
        content_type = "text/plain; charset=utf-8" }
      refuses("request shape may not have an __index metamethod %(fields are read raw%)", indexed(fields))
      -- one field through __index is as bad as all of them
      refuses("request shape may not have an __index metamethod", setmetatable({ method = "GET" },
        { __index = { path = { "runs", h.runs.failed } } }))
    end)

    it("path, query or a query pair whose items come from __index", function()
      local through = function(t) return setmetatable({}, { __index = t }) end
      refuses("request path may not have an __index metamethod",
        { method = "GET", path = through { "runs", h.runs.failed } })
      refuses("request query may not have an __index metamethod",
        { method = "GET", path = { "runs" }, query = through { { "a", "b" } } })
      refuses("request query pair may not have an __index metamethod",
        { method = "GET", path = { "runs" }, query = { through { "a", "b" } } })
    end)

    it("a control character in a path segment or content_type", function()
      refuses("path segment contains a control character", { method = "GET", path = { "a\nb" } })
      refuses("path segment contains a control character", { method = "GET", path = { "a\127" } })
      refuses("request content_type contains a control character",
        { method = "POST", path = { "x" }, content_type = "text/plain\r\nX-Evil: 1" })
      refuses("request content_type contains a control character",
        { method = "POST", path = { "x" }, content_type = "text/plain\1" })
    end)
  end)
end)
