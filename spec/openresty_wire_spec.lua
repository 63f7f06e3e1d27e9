-- The nginx transport (transport = "nginx"): re-triggers over nginx's own
-- cosockets in a real nginx (Debian's Lua module, LuaJIT), against the
-- fake Flow Service over plain HTTP and TLS with the suite's CA. The same
-- request as libcurl's, sent once whatever fails, the same results.
local fake = require "spec.support.fake"
local nginx = require "spec.support.nginx"
local tls = require "spec.support.tls"
local h = require "spec.support.helpers"
local cjson = require "cjson"
local flowservice = require "flowservice"

local capture = nginx.util.capture

describe("transport option", function()
  local base = { access_token = "t", api_key = "k", org_id = "O@AdobeOrg" }
  local function with(extra)
    local o = {}
    for k, v in pairs(base) do o[k] = v end
    for k, v in pairs(extra) do o[k] = v end
    return o
  end

  it("takes \"curl\" or \"nginx\" and nothing else", function()
    assert.has_no.errors(function() flowservice.new(with { transport = "curl" }):close() end)
    assert.has_no.errors(function() flowservice.new(with { transport = "nginx" }):close() end)
    assert.has_error(function() flowservice.new(with { transport = "socket" }) end,
      "bad argument #1 to 'new' (option 'transport' must be \"curl\" or \"nginx\")")
    assert.has_error(function() flowservice.new(with { transport = 1 }) end)
  end)

  it("refuses what cosockets cannot do: a proxy, a CA file or path of its own", function()
    for _, key in ipairs { "proxy", "ca_file", "ca_path" } do
      local ok, err = pcall(flowservice.new, with { transport = "nginx", [key] = "/x" })
      assert.is_false(ok)
      assert.matches("option '" .. key .. "' cannot be used with transport \"nginx\"", err, 1, true)
    end
  end)

  it("outside nginx, goes through libcurl as before", function()
    local server = fake.start()
    finally(function() server:stop() end)
    local c = flowservice.new(with { transport = "nginx", base_url = server.url,
      access_token = fake.credentials.access_token, api_key = fake.credentials.api_key,
      org_id = fake.credentials.org })
    local run, err = c:retrigger(h.runs.failed)
    assert.is_table(run, tostring(err))
    assert.is_string(run.id)
    c:close()
  end)
end)

describe("#openresty the nginx transport", function()
  local flow_service, server, pki

  local function call(path, args)
    local out = capture("curl -s --noproxy '*' --max-time 20 '" .. server.url .. path .. "?" .. args .. "'")
    local ok, doc = pcall(cjson.decode, out)
    assert(ok and type(doc) == "table", "not JSON: " .. out .. "\n" .. server:error_log():sub(-2000))
    return doc
  end

  local function posts()
    local n = {}
    for _, r in ipairs(flow_service:requests()) do
      if r.method == "POST" then n[#n + 1] = r end
    end
    return n
  end

  setup(function()
    pki = tls.make()
    flow_service = fake.start { tls = { cert = pki.cert, key = pki.key } }
    server = nginx.start {
      template = "spec/support/openresty_wire.conf.in",
      vars = { ROOT = capture("pwd"):gsub("%s+$", ""), FAKE_URL = flow_service.url,
        FAKE_TLS_URL = flow_service.tls_url, CA_FILE = pki.ca_file, OTHER_CA_FILE = pki.other_ca_file },
      ready = "/health",
      timeout = 10,
    }
  end)

  teardown(function()
    if server then server:stop() end
    if flow_service then flow_service:stop() end
    tls.remove(pki)
  end)

  before_each(function()
    flow_service:reset()
    flow_service:clear_requests()
  end)

  it("sends the request libcurl sends, less nothing, and gives the same result", function()
    local wire = call("/call", "via=wire&run=" .. h.runs.failed)
    assert.is_string(wire.id, cjson.encode(wire))
    assert.matches('^".*"$', wire.etag)
    assert.equal(0, wire.in_flight) -- the engine was never involved
    local curl = call("/call", "via=curl&run=" .. h.runs.failed)
    assert.is_string(curl.id, cjson.encode(curl))
    local seen = posts()
    assert.equal(2, #seen)
    local function lines(raw)
      local list = {}
      for line in raw:gmatch("[^\r\n]+") do
        if not line:lower():match("^x%-request%-id:") then list[#list + 1] = line end
      end
      table.sort(list)
      return table.concat(list, "\n")
    end
    assert.equal(lines(seen[2].raw_header), lines(seen[1].raw_header))
    assert.matches("^[0-9a-f-]+$", seen[1].headers["x-request-id"])
    assert.is_truthy(flow_service:run(wire.id), "the fake made the run it answered with")
  end)

  -- n calls through `via`, each a success, all on one connection
  local function calls_on_one_connection(via, n)
    for _ = 1, n do
      local r = call("/call", "via=" .. via .. "&run=" .. h.runs.failed)
      assert.is_string(r.id, cjson.encode(r))
    end
    local seen = posts()
    assert.equal(n, #seen)
    for i, r in ipairs(seen) do
      assert.equal(seen[1].connection, r.connection)
      assert.equal(i, r.connection_requests - seen[1].connection_requests + 1)
    end
    return seen
  end

  it("keeps its connection: five calls, one connection", function()
    calls_on_one_connection("wire", 5)
  end)

  -- (plain HTTP: pooled TLS connections would serve the TLS tests after this one)
  it("many calls at once, most on new connections: each sends its own request, once", function()
    local N = 40 -- more than lua_socket_pool_size keeps (30)
    local out = call("/concurrent", "via=wire&n=" .. N .. "&run=" .. h.runs.failed)
    assert.equal(N, #out)
    local made = {}
    for _, o in ipairs(out) do
      assert.is_string(o.id, cjson.encode(o))
      assert.is_nil(made[o.id], "two calls got run " .. o.id)
      made[o.id] = true
      assert.is_truthy(flow_service:run(o.id), "the fake made the run it answered with")
    end
    local seen, ids, connections, shape = posts(), {}, {}, nil
    assert.equal(N, #seen)
    for _, r in ipairs(seen) do
      local id = r.headers["x-request-id"]
      assert.is_nil(ids[id], "request id " .. tostring(id) .. " sent twice")
      ids[id] = true
      connections[r.connection] = true
      local lines = r.raw_header:gsub("x%-request%-id: [^\r]*\r\n", "")
      shape = shape or lines
      assert.equal(shape, lines) -- the same request but for its id: no piece of another's
    end
    local n = 0
    for _ in pairs(connections) do n = n + 1 end
    assert.is_true(n > 30, "only " .. n .. " connections: the calls did not run at once")
  end)

  it("makes no transfer for a plain call, one for a call with options of its own, kept up to the cap", function()
    local out = call("/spares", "run=" .. h.runs.failed)
    assert.same({
      { what = "call 1", ok = true, kept = 1 }, -- it built the plain way's request
      { what = "call 2", ok = true, kept = 0 },
      { what = "call 3", ok = true, kept = 0 },
      { what = "bad run id", ok = true, kept = 0 },
      { what = "40 at once", ok = true, kept = 0 },
      { what = "40 at once, options of their own", ok = true, kept = 40 },
      { what = "80 at once, options of their own", ok = true, kept = 64 }, -- the sender's cap
      { what = "10 at once, the client closed meanwhile", ok = true, kept = 1 }, -- each next one's a spare
    }, out)
    assert.equal(173, #posts()) -- nothing sent for the bad run id
  end)

  it("reads a plain call's reply in pieces with a transfer made then, a spare the next time", function()
    -- each run made, then a 100,000-byte reply: more than one read takes
    -- (flowservice.wire's READ_SIZE, 64 KiB), however the bytes arrive
    flow_service:scenario { match = "^POST ", act_then_delay = 0, oversize = 100000, times = 0 }
    local out = call("/pieces", "run=" .. h.runs.failed)
    local id = out[2].id
    out[2].id = nil
    assert.same({
      { what = "call 1", ok = true, kept = 1 },
      { what = "call 2", ok = true, kept = 1, same = true },
      { what = "call 3", ok = true, kept = 1, same = true }, -- call 2's transfer again
    }, out)
    assert.equal("x", id) -- the canned reply's run, read whole
    assert.equal(3, #posts())
    assert.equal(3, flow_service:stats().retriggers)
  end)

  it("never sends twice: the server acts, then drops the connection before any reply", function()
    flow_service:scenario { match = "^POST ", act_then_delay = 0, drop = "after" }
    local r = call("/call", "via=wire&attempts=3&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("network", r.err.kind)
    assert.is_true(r.err.sent)
    assert.is_true(r.err.ambiguous)
    assert.equal(1, r.err.attempts)
    assert.equal(1, #posts())
    assert.equal(1, flow_service:stats().retriggers) -- it was acted on, once
  end)

  it("never sends twice on a timeout either, and ends within its timeout", function()
    flow_service:scenario { match = "^POST ", act_then_delay = 3 }
    local r = call("/call", "via=wire&attempts=3&timeout=0.5&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("timeout", r.err.kind)
    assert.is_true(r.err.sent)
    assert.is_true(r.err.ambiguous)
    assert.is_true(r.ms >= 450 and r.ms < 2500, "took " .. r.ms .. " ms")
    assert.equal(1, #posts())
  end)

  it("a reply cut short is a network error, sent, not retried", function()
    flow_service:scenario { match = "^POST ", truncate = true }
    local r = call("/call", "via=wire&attempts=3&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("network", r.err.kind)
    assert.is_true(r.err.sent)
    assert.matches("closed before the reply was complete", r.err.message, 1, true)
    assert.equal(1, #posts())
  end)

  it("retries what was never acted on: a 429 with Retry-After, then success", function()
    flow_service:scenario { match = "^POST ", status = 429, retry_after = 0 }
    local r = call("/call", "via=wire&attempts=3&run=" .. h.runs.failed)
    assert.is_string(r.id, cjson.encode(r))
    assert.equal(2, #posts())
  end)

  it("gives Adobe's error as libcurl's path does", function()
    flow_service:scenario { match = "^POST ", status = 400, times = 2,
      body = cjson.encode { code = "FLOW-1387-400", message = "not eligible" } }
    local wire = call("/call", "via=wire&run=" .. h.runs.failed)
    local curl = call("/call", "via=curl&run=" .. h.runs.failed)
    assert.is_table(wire.err, cjson.encode(wire))
    assert.equal("http", wire.err.kind)
    assert.equal(400, wire.err.status)
    wire.err.attempts, curl.err.attempts = nil, nil
    wire.err.text = wire.err.text:gsub("request[-_ ]id[^,;)]*", "")
    curl.err.text = curl.err.text:gsub("request[-_ ]id[^,;)]*", "")
    assert.same(curl.err, wire.err)
  end)

  it("a reply over max_body is refused", function()
    flow_service:scenario { match = "^POST ", oversize = 9 * 1024 * 1024 } -- max_body: 8 MiB
    local r = call("/call", "via=wire&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("decode", r.err.kind)
    assert.matches("too large", r.err.message)
  end)

  it("a connection that cannot be made was not sent, and is retried", function()
    local r = call("/call", "via=dead&attempts=2&port=" .. h.closed_port .. "&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("network", r.err.kind)
    assert.is_false(r.err.sent)
    assert.equal(2, r.err.attempts)
  end)

  it("TLS: a server its CA does not vouch for is refused before anything is sent", function()
    local r = call("/call-other-ca", "via=tls&run=" .. h.runs.failed)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("tls", r.err.kind)
    assert.is_false(r.err.sent)
    assert.equal(0, #posts())
  end)

  it("TLS: a handshake that raises inside lua-resty-core is the TLS failure, nothing sent, no path shown", function()
    local r = call("/handshake-raises", "run=" .. h.runs.failed)
    assert.is_nil(r.raised, r.raised)
    assert.is_table(r.err, cjson.encode(r))
    assert.equal("tls", r.err.kind)
    assert.is_false(r.err.sent)
    assert.matches("the handshake failed (lua-resty-core raised: assertion failed!)", r.err.message, 1, true)
    assert.not_matches("/usr/share", r.err.text, 1, true)
    assert.equal(0, #posts())
  end)

  it("TLS: the suite's CA, one handshake, the connection kept", function()
    local seen = calls_on_one_connection("tls", 3)
    assert.is_true(seen[1].tls)
  end)

  it("with IMS credentials: the token through libcurl, the re-trigger over the cosocket, a dead token refreshed once", function()
    local r = call("/call", "via=ims&run=" .. h.runs.failed)
    assert.is_string(r.id, cjson.encode(r))
    flow_service:expire_tokens()
    r = call("/call", "via=ims&run=" .. h.runs.failed)
    assert.is_string(r.id, cjson.encode(r))
    local ims, runs = 0, 0
    for _, q in ipairs(flow_service:requests()) do
      if q.path:find("^/ims/") then ims = ims + 1 elseif q.path:find("^/runs/") then runs = runs + 1 end
    end
    assert.equal(2, ims)
    assert.equal(3, runs) -- the one refused with 401 acted on nothing
    assert.equal(2, flow_service:stats().retriggers)
  end)

  it("a light thread killed while it waits leaves nothing behind and sends nothing more", function()
    flow_service:scenario { match = "^POST ", act_then_delay = 0.5 }
    assert.equal("killed\n", capture("curl -s --noproxy '*' --max-time 20 '" .. server.url
      .. "/thread-dies?run=" .. h.runs.failed .. "'"))
    h.sleep(0.8)
    assert.equal(1, #posts())
    local r = call("/call", "via=wire&run=" .. h.runs.failed) -- the worker goes on
    assert.is_string(r.id, cjson.encode(r))
  end)

  it("a bad run id raises where the call was made, as outside nginx, and sends nothing", function()
    local out = capture("curl -s --noproxy '*' --max-time 10 '" .. server.url .. "/bad-runs'")
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(4, #lines, out)
    assert.matches("^bad argument #1 to 'retrigger' %(run id may hold only", lines[1])
    assert.matches("bad argument #1 to 'retrigger' %(run id must be a non%-empty string", lines[2])
    assert.matches("bad argument #1 to 'retrigger' %(run id may not be '%.' or '%.%.'%)", lines[3])
    assert.matches("bad argument #1 to 'retrigger' %(run id may hold only", lines[4])
    assert.equal(0, #posts())
  end)

  it("in a phase without cosockets, falls back to libcurl's rules: set_by_lua gets the clear error", function()
    local out = capture("curl -s --noproxy '*' --max-time 10 '" .. server.url .. "/set-phase?run="
      .. h.runs.failed .. "'")
    assert.matches("cannot wait for the network in nginx's set phase", out, 1, true)
    assert.equal(0, #posts())
  end)
end)
