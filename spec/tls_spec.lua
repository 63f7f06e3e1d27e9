-- HTTPS against the fake Flow Service, with a CA the suite generates.
local flowservice = require "flowservice"
local fake = require "spec.support.fake"
local tls = require "spec.support.tls"
local h = require "spec.support.helpers"

describe("flowservice.retrigger over HTTPS", function()
  local pki, server

  local function opts(extra) return h.opts(server.tls_url, extra) end

  setup(function()
    pki = tls.make()
    server = fake.start { tls = { cert = pki.cert, key = pki.key } }
  end)
  teardown(function()
    if server then server:stop() end
    tls.remove(pki)
  end)
  before_each(function() server:reset() end)

  it("verifies the server against ca_file", function()
    local run, err = flowservice.retrigger(h.runs.failed, opts { ca_file = pki.ca_file })
    assert.is_nil(err)
    assert.is_string(run.id)
    local req = server:requests()[1]
    assert.is_true(req.tls)
  end)

  it("verifies the server against ca_path, by host name too", function()
    local run, err = flowservice.retrigger(h.runs.failed,
      h.opts(server.tls_localhost_url, { ca_path = pki.ca_path }))
    assert.is_nil(err)
    assert.is_string(run.id)
  end)

  it("refuses a server its CA did not sign: kind tls, not sent", function()
    local run, err = flowservice.retrigger(h.runs.failed, opts { ca_file = pki.other_ca_file })
    assert.is_nil(run)
    assert.equal("tls", err.kind)
    assert.is_false(err.sent)
    assert.matches("^flowservice: tls error: ", tostring(err))
    assert.same({}, server:requests())
  end)

  it("refuses by default, with only the system CAs", function()
    local _, err = flowservice.retrigger(h.runs.failed, opts())
    assert.equal("tls", err.kind)
    assert.is_false(err.sent)
  end)

  it("skips verification only when insecure = true", function()
    local run, err = flowservice.retrigger(h.runs.failed,
      opts { ca_file = pki.other_ca_file, insecure = true })
    assert.is_nil(err)
    assert.is_string(run.id)
  end)

  it("plain HTTP to the TLS port gets an answer (400), not a hang", function()
    local _, err = flowservice.retrigger(h.runs.failed,
      h.opts((server.tls_url:gsub("^https:", "http:")), { timeout = 5 }))
    assert.equal("http", err.kind) -- nginx answers plain HTTP on an ssl port with 400
    assert.equal(400, err.status)
  end)
end)
