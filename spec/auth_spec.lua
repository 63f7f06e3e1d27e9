-- IMS tokens: fetched on first use, cached, refreshed after a 401, errors.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local system = require "system"

describe("IMS credentials", function()
  local server

  local function new(extra)
    local o = {
      org_id = fake.credentials.org, base_url = server.url,
      credentials = {
        client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
        scopes = fake.ims_client.scopes, ims_url = server.ims_url,
      },
      retry = { base_delay = 0.01, max_delay = 0.05 },
    }
    for k, v in pairs(extra or {}) do o[k] = v end
    return flowservice.new(o)
  end

  local function requests(prefix)
    local list = {}
    for _, r in ipairs(server:requests()) do
      if r.path:sub(1, #prefix) == prefix then list[#list + 1] = r end
    end
    return list
  end

  setup(function() server = fake.start() end)
  teardown(function() server:stop() end)
  before_each(function() server:reset() end)

  it("fetches a token on first use, with the client-credentials form", function()
    local client = new()
    assert.same({}, server:requests()) -- new does no I/O
    local run, err = client:retrigger(h.runs.failed)
    client:close()
    assert.is_nil(err)
    assert.is_string(run.id)
    local ims = requests("/ims/")
    assert.equal(1, #ims)
    assert.equal("POST", ims[1].method)
    assert.equal("/ims/token/v3", ims[1].path)
    assert.equal("application/x-www-form-urlencoded", ims[1].headers["content-type"])
    assert.is_nil(ims[1].headers["authorization"])
    assert.is_nil(ims[1].headers["x-api-key"])
    local form = {}
    for k, v in ims[1].body:gmatch("([^&=]+)=([^&]*)") do form[k] = v end
    assert.same({ grant_type = "client_credentials", client_id = "fake-client-id",
      client_secret = "fake-client-secret", scope = "openid%2CAdobeID%2Cread_organizations" }, form)
    local api = requests("/runs/")[1]
    assert.matches("^Bearer .+", api.headers["authorization"])
    assert.not_equal("Bearer fake-token", api.headers["authorization"])
    assert.equal("fake-client-id", api.headers["x-api-key"]) -- api_key defaults to client_id
  end)

  it("caches the token across calls", function()
    local client = new()
    for _ = 1, 3 do assert.is_table((client:retrigger(h.runs.failed))) end
    assert.is_table((client:get_run(h.runs.failed)))
    client:close()
    assert.equal(1, #requests("/ims/"))
    local tokens = {}
    for _, r in ipairs(requests("/runs")) do tokens[r.headers["authorization"]] = true end
    assert.equal(1, (function() local n = 0 for _ in pairs(tokens) do n = n + 1 end return n end)())
  end)

  it("stops using a token before it expires (a short-lived one after 3/4 of its life)", function()
    server:ims { expires_in = 2 } -- usable for 1.5 s
    local client = new()
    assert.is_table((client:retrigger(h.runs.failed)))
    assert.is_table((client:retrigger(h.runs.failed)))
    assert.equal(1, #requests("/ims/"))
    system.sleep(1.7)
    assert.is_table((client:retrigger(h.runs.failed)))
    assert.equal(2, #requests("/ims/"))
    server:ims { expires_in = 60 } -- an hour's token less the 5-minute margin would be nothing
    server:expire_tokens()
    assert.is_table((client:retrigger(h.runs.failed)))
    assert.is_table((client:retrigger(h.runs.failed)))
    assert.is_table((client:retrigger(h.runs.failed)))
    client:close()
    assert.equal(3, #requests("/ims/"))
  end)

  it("refreshes the token once on a 401 401013 and replays the call", function()
    local lines = {}
    local client = new { log = function(line) lines[#lines + 1] = line end }
    assert.is_table((client:retrigger(h.runs.failed)))
    server:expire_tokens()
    local run, err = client:retrigger(h.runs.failed)
    client:close()
    assert.is_nil(err)
    assert.is_string(run.id)
    assert.equal(2, #requests("/ims/"))
    local posts = requests("/runs/")
    assert.equal(3, #posts)
    assert.not_equal(posts[2].headers["authorization"], posts[3].headers["authorization"])
    for _, line in ipairs(lines) do
      assert.not_matches("fake-client-secret", line, 1, true)
      for _, p in ipairs(posts) do
        assert.not_matches(p.headers["authorization"]:sub(8), line, 1, true)
      end
    end
    assert.matches("^POST /ims/token/v3 %-> 200", lines[1])
  end)

  it("refreshes only once: a second 401 is returned", function()
    local client = new()
    server:scenario { match = "^POST /runs/", status = 401, times = 0,
      body = '{"error_code":"401013","message":"Oauth token is not valid"}' }
    local _, err = client:retrigger(h.runs.failed)
    client:close()
    assert.equal(401, err.status)
    assert.equal("401013", err.code)
    assert.equal(2, #requests("/ims/"))
    assert.equal(2, #requests("/runs/"))
  end)

  it("returns IMS's refusal as kind auth, without the secret", function()
    local client = new { credentials = { client_id = "fake-client-id", client_secret = "wrong-secret-123",
      scopes = "openid", ims_url = server.ims_url } }
    local run, err = client:retrigger(h.runs.failed)
    client:close()
    assert.is_nil(run)
    assert.equal("auth", err.kind)
    assert.equal(401, err.status)
    assert.equal("invalid_client", err.code)
    assert.equal("invalid client_id or client_secret parameter", err.message)
    assert.not_matches("wrong-secret-123", tostring(err), 1, true)
    for _, v in pairs(err) do assert.not_matches("wrong-secret-123", tostring(v), 1, true) end
    assert.same({}, requests("/runs/"))
  end)

  it("retries IMS on a 503 like any safe call", function()
    server:scenario { match = "^POST /ims/", status = 503 }
    local client = new()
    local run, err = client:retrigger(h.runs.failed)
    client:close()
    assert.is_nil(err)
    assert.is_string(run.id)
    assert.equal(2, #requests("/ims/"))
  end)

  it("keeps credentials out of tostring and the client's fields", function()
    local client = new()
    assert.is_table((client:retrigger(h.runs.failed)))
    local text = tostring(client)
    for k, v in pairs(client) do text = text .. tostring(k) .. tostring(v) end
    assert.not_matches("fake-client-secret", text, 1, true)
    client:close()
  end)

  it("works for the one-call flowservice.retrigger too", function()
    local run, err = flowservice.retrigger(h.runs.failed, {
      org_id = fake.credentials.org, base_url = server.url,
      credentials = { client_id = fake.ims_client.client_id, client_secret = fake.ims_client.client_secret,
        scopes = fake.ims_client.scopes, ims_url = server.ims_url },
    })
    assert.is_nil(err)
    assert.is_string(run.id)
    assert.equal(1, #requests("/ims/"))
  end)

  describe("a token fetch that goes wrong", function()
    it("checks ims_url in new, before any I/O", function()
      for _, url in ipairs { "not a url", "ftp://ims.example", "" } do
        assert.has_error(function()
          new { credentials = { client_id = "a", client_secret = "b", scopes = "c", ims_url = url } }
        end)
      end
      local ok, err = pcall(new, { credentials = { client_id = "a", client_secret = "b", scopes = "c",
        ims_url = "ftp://ims.example" } })
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'new' %(option 'credentials' field 'ims_url' must be an http", err)
      assert.same({}, server:requests())
    end)

    it("does not stall later calls when a fetch raised (its marker is its own)", function()
      local raised = false
      local client = new { wait = function(s)
        if not raised then
          raised = true
          error("the caller's wait function broke")
        end
        system.sleep(s)
      end }
      assert.has_error(function() client:retrigger(h.runs.failed) end, "the caller's wait function broke")
      local t0 = h.now()
      local run, err = client:retrigger(h.runs.failed, { deadline = 20 })
      client:close()
      assert.is_nil(err)
      assert.is_string(run.id)
      assert.is_true(h.now() - t0 < 10, "the second call waited for the dead fetch")
    end)

    it("bounds the token fetch by the call's deadline", function()
      server:scenario { match = "^POST /ims/", delay = 5 }
      local client = new()
      local t0 = h.now()
      local run, err = client:retrigger(h.runs.failed, { deadline = 1 })
      local waited = h.now() - t0
      client:close()
      assert.is_nil(run)
      assert.equal("timeout", err.kind)
      assert.is_true(waited < 4, "waited " .. waited .. " s past a 1 s deadline")
      assert.same({}, requests("/runs/"))
    end)

    it("bounds waiting for another coroutine's fetch by the call's deadline", function()
      server:scenario { match = "^POST /ims/", delay = 5 }
      local client = new { wait = function(s) coroutine.yield(s) end }
      local first = coroutine.create(function() return client:retrigger(h.runs.failed) end)
      local second = coroutine.create(function() return client:retrigger(h.runs.failed, { deadline = 0.5 }) end)
      assert(coroutine.resume(first)) -- now fetching the token
      local t0 = h.now()
      local ok, run, err
      repeat
        ok, run, err = coroutine.resume(second)
        assert(ok, run)
        system.sleep(0.01)
      until coroutine.status(second) == "dead"
      assert.is_nil(run)
      assert.equal("timeout", err.kind)
      assert.matches("another call was fetching the IMS token", err.message, 1, true)
      assert.is_true(h.now() - t0 < 3)
      client:close()
    end)
  end)
end)
