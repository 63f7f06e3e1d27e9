-- The nginx transport's request (client:wire_retrigger in the C core): the
-- bytes a cosocket sends must be, byte for byte, the request libcurl sends
-- for the same options, as the fake Flow Service records it. Plain Lua: no
-- nginx needed, so this runs under every profile, ASan and valgrind too.
local core = require "flowservice.core"
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"

local RUN = "4fb0418e-1804-45d6-8d56-dd51f05c0baf"
local ID = "11111111-2222-4333-8444-555555555555"
local RUN_PATTERN = h.literal(RUN)

-- client:wire_retrigger's results with the request's three pieces as the
-- one string they go out as (a cosocket sends them as one)
local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local unpack = table.unpack or unpack -- luacheck: ignore 143 (5.1's)
local function wire_retrigger(c, ...)
  local r = pack(c:wire_retrigger(...))
  if not r[1] then return r[1] end
  return r[1], r[2] .. r[3] .. r[4], unpack(r, 5, r.n)
end

describe("the nginx transport's request", function()
  local server

  setup(function() server = fake.start() end)
  teardown(function() if server then server:stop() end end)
  before_each(function() server:clear_requests() end)

  local function options(extra)
    local o = { access_token = fake.credentials.access_token, api_key = fake.credentials.api_key,
      org_id = fake.credentials.org, base_url = server.url, request_id = ID }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end

  -- what libcurl sent for opts (recorded by the fake), and the wire's bytes
  local function both(client_opts, call_opts, run)
    local c = core.new(client_opts)
    c:retrigger(run or RUN, call_opts)
    local seen = server:requests()
    assert.equal(1, #seen, "libcurl's request did not reach the fake")
    local t, bytes, host, port, pool, tls, verify, timeout_ms, connect_ms = wire_retrigger(c, run or RUN, call_opts)
    c:close()
    return seen[1].raw_header, bytes, { t = t, host = host, port = port, pool = pool, tls = tls,
      verify = verify, timeout_ms = timeout_ms, connect_ms = connect_ms }
  end

  it("is libcurl's request, byte for byte, with the client's options", function()
    local o = options()
    local curl, wire, info = both(o, o)
    assert.equal(curl, wire)
    assert.matches("^POST /runs/" .. RUN_PATTERN .. "/action%?op=re%-trigger HTTP/1%.1\r\nHost: 127%.0%.0%.1:%d+\r\n", wire)
    assert.equal("127.0.0.1", info.host)
    assert.equal(server.port, info.port)
    assert.equal("flowservice http://127.0.0.1:" .. server.port, info.pool)
    assert.is_false(info.tls)
    assert.is_true(info.verify)
    assert.equal(60000, info.timeout_ms)
    assert.equal(core.defaults.connect_timeout * 1000, info.connect_ms)
    assert.is_false(info.t:done())
  end)

  it("comes in three pieces: request line and Host, the call's own lines, the template's", function()
    local c = core.new(options())
    local o = options { headers = { ["X-Trace"] = "t1" } }
    local t1, head1, lines1, tail1 = c:wire_retrigger(RUN, nil)
    local _, head2, lines2, tail2 = c:wire_retrigger("5fb0418e-1804-45d6-8d56-dd51f05c0baf", o)
    local _, head3, lines3, tail3 = c:wire_retrigger(RUN, options { request_id = "33333333-2222-4333-8444-555555555555" })
    c:close()
    assert.equal("userdata", type(t1))
    assert.matches("^POST /runs/" .. RUN_PATTERN .. "/action%?op=re%-trigger HTTP/1%.1\r\nHost: [^\r]+\r\n$", head1)
    assert.equal(head1, head3)
    assert.not_equal(head1, head2)
    -- the call's own lines: its x-request-id, and what this call adds
    assert.equal("x-request-id: " .. ID .. "\r\n", lines1)
    assert.equal("x-request-id: 33333333-2222-4333-8444-555555555555\r\n", lines3)
    assert.equal("X-Trace: t1\r\nx-request-id: " .. ID .. "\r\n", lines2)
    -- every call of the template sends the same last piece
    assert.equal(tail1, tail3)
    assert.matches("^Authorization: Bearer ", tail1)
    assert.matches("\r\nContent%-Length: 0\r\n\r\n$", tail1)
    assert.not_matches("x%-request%-id", tail1)
    assert.matches("\r\nContent%-Length: 0\r\n\r\n$", tail2)
  end)

  it("keeps its template's strings while the template lives, and lets them go with it", function()
    local c = core.new(options())
    local _, _, _, tail, host, _, pool = c:wire_retrigger(RUN, nil)
    local again = { c:wire_retrigger(RUN, nil) }
    assert.same({ tail, host, pool }, { again[4], again[5], again[7] })
    local function heap() collectgarbage(); collectgarbage(); return collectgarbage("count") end
    -- a token of 1 MiB: a template whose last piece is as long (the collector's own tables
    -- grow and shrink by some 100 KiB between two readings: far less than that)
    local function call(i)
      local o = options { access_token = ("t"):rep(2 ^ 20) .. i }
      local _, _, _, last = c:wire_retrigger(RUN, o)
      return #last
    end
    call(0) -- what the first call of that shape makes, made
    local base = heap()
    assert.is_true(call(1) > 2 ^ 20)
    local one = heap() - base -- call(0)'s template let go, call(1)'s kept: about nothing
    for i = 2, 20 do call(i) end -- each a new template: the last one's strings let go
    -- kept, they would be 19 MiB more; a dead slot of LuaJIT's stack may still hold the last
    -- call's token and piece (2 MiB)
    local many = heap() - base
    assert.is_true(many < one + 3072, "kept " .. many .. " KiB after 20 templates, " .. one .. " after one")
    local kept = heap()
    c:close()
    local freed = kept - heap()
    assert.is_true(freed > 768, "close let go of " .. freed .. " KiB, not the template's 1 MiB")
  end)

  it("is libcurl's request with no per-call options (the client's own copy of its options)", function()
    local curl, wire = both(options(), nil)
    assert.equal(curl, wire)
    assert.matches("\r\nx%-request%-id: " .. h.literal(ID) .. "\r\n", wire)
  end)

  -- The commonest call: the client's own options with no request_id, If-Match or
  -- headers of theirs, so that only the run id and a fresh request id differ from
  -- call to call (from the second such call on, the core makes it from the
  -- template alone). x-request-id's value set to one, to compare requests.
  local ID_LINE = "\r\nx%-request%-id: ([^\r]*)\r\n"
  local function one_id(bytes) return (bytes:gsub(ID_LINE, "\r\nx-request-id: ID\r\n", 1)) end
  local UUID4 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

  -- a client whose own options name no request id (each call makes a fresh one)
  local function own_client(extra)
    local o = options(extra)
    o.request_id = nil
    return core.new(o), o
  end

  -- n calls with no per-call options (the last ones on a spare): each one's bytes
  -- and values; their ids are fresh v4 UUIDs, no two the same.
  local function own_calls(c, n, run)
    local out, ids, spare = {}, {}, nil
    for i = 1, n do
      local r = pack(c:wire_retrigger(run or RUN, nil, spare))
      local t = r[1]
      local bytes = r[2] .. r[3] .. r[4]
      local id = bytes:match(ID_LINE)
      assert.matches(UUID4, id)
      assert.is_nil(ids[id], "an id sent twice")
      ids[id] = true
      assert.equal("x-request-id: " .. id .. "\r\n", r[3], "the call's own piece is its id's line")
      out[i] = { bytes = bytes, values = { unpack(r, 5, r.n) }, head = r[2], tail = r[4] }
      t:fail("connect", "connect to 127.0.0.1:1 failed: refused", false)
      assert.equal(id, select(2, t:result()).request_id)
      if i >= n - 1 then spare = t end
    end
    return out
  end

  it("with the client's own options: libcurl's request but for a fresh request id, every call", function()
    local c = own_client()
    assert.is_table(c:retrigger(RUN))
    local curl = server:requests()[1].raw_header
    assert.matches(UUID4, curl:match(ID_LINE))
    local calls = own_calls(c, 4)
    c:close()
    for i, call in ipairs(calls) do
      assert.equal(one_id(curl), one_id(call.bytes), "call " .. i)
      assert.same(calls[1].values, call.values, "call " .. i)
      assert.equal(calls[1].head, call.head) -- the same strings, found again
      assert.equal(calls[1].tail, call.tail)
    end
    assert.same({ "127.0.0.1", server.port, "flowservice http://127.0.0.1:" .. server.port, false, true,
      60000, core.defaults.connect_timeout * 1000 }, calls[1].values)
  end)

  it("with the client's own options: the same bytes under a base path, an op to escape, a user agent,"
    .. " insecure, timeouts, another run id each call", function()
    local c, o = own_client { base_url = server.url .. "/data/foundation/flowservice/",
      op = "re trigger&x", user_agent = "ua/2", insecure = true, timeout = 9, connect_timeout = 2,
      max_body = 4096 }
    local runs = { RUN, "run-2", "a.b_c~d", RUN }
    local via_table = {}
    for i, run in ipairs(runs) do -- the options as a table: the general way, each call
      local r = pack(c:wire_retrigger(run, o))
      via_table[i] = { bytes = r[2] .. r[3] .. r[4], values = { unpack(r, 5, r.n) } }
      r[1]:cancel()
    end
    for i, run in ipairs(runs) do
      local call = own_calls(c, 2, run)
      for _, own in ipairs(call) do
        assert.equal(one_id(via_table[i].bytes), one_id(own.bytes), run)
        assert.same(via_table[i].values, own.values, run)
      end
    end
    assert.matches("^POST /data/foundation/flowservice/runs/a%.b_c~d/action%?op=re%%20trigger%%26x ",
      own_calls(c, 1, "a.b_c~d")[1].bytes)
    assert.same({ "127.0.0.1", server.port, "flowservice http://127.0.0.1:" .. server.port .. " insecure",
      false, false, 9000, 2000 }, via_table[1].values)
    c:close()
  end)

  it("with the client's own request_id, If-Match or headers: those on every call, the first and the rest", function()
    local c = core.new(options { if_match = '"etag-9"', headers = { ["x-trace"] = "t1", ["x-empty"] = "" } })
    for _ = 1, 3 do
      local _, bytes = wire_retrigger(c, RUN, nil)
      assert.matches('\r\nIf%-Match: "etag%-9"\r\n', bytes)
      assert.matches("\r\nx%-trace: t1\r\n", bytes)
      assert.matches("\r\nx%-empty:\r\n", bytes)
      assert.matches("\r\nx%-request%-id: " .. h.literal(ID) .. "\r\n", bytes)
    end
    c:close()
  end)

  it("with the client's own options after calls with others: each call's own options, in any order", function()
    local c = own_client()
    local plain = own_calls(c, 2)[2].bytes
    local other = options { access_token = "another-token" }
    local _, with_other = wire_retrigger(c, RUN, other) -- a new template, not the client's own
    assert.matches("Authorization: Bearer another%-token\r\n", with_other)
    local again = own_calls(c, 3)
    for _, call in ipairs(again) do
      assert.equal(one_id(plain), one_id(call.bytes))
      assert.matches("Authorization: Bearer fake%-token\r\n", call.bytes)
    end
    local _, with_if = wire_retrigger(c, RUN, options { if_match = '"e"' })
    assert.matches('\r\nIf%-Match: "e"\r\n', with_if)
    assert.equal(one_id(plain), one_id(own_calls(c, 1)[1].bytes))
    c:close()
  end)

  it("with the client's own options: a bad run id is false, before and after the first call", function()
    local c = own_client()
    for round = 1, 2 do
      for _, bad in ipairs { "a/b", "", "..", ".", "x y", 42 } do
        assert.is_false(c:wire_retrigger(bad, nil), tostring(bad) .. " in round " .. round)
      end
      own_calls(c, 2)
    end
    c:close()
  end)

  it("is libcurl's request with per-call If-Match, extra headers (an empty one too), timeout", function()
    local o = options()
    local call = options { if_match = '"etag-1"', timeout = 7,
      headers = { ["x-trace"] = "abc", ["x-empty"] = "" } }
    local curl, wire, info = both(o, call)
    assert.equal(curl, wire)
    assert.matches('\r\nIf%-Match: "etag%-1"\r\n', wire)
    assert.matches("\r\nx%-empty:\r\n", wire)
    assert.equal(7000, info.timeout_ms)
  end)

  it("is libcurl's request when a call overrides a line of the client's (User-Agent, Accept)", function()
    local o = options()
    local curl, wire = both(o, options { headers = { ["User-Agent"] = "mine/1", Accept = "text/plain" } })
    assert.equal(curl, wire)
    assert.matches("\r\nUser%-Agent: mine/1\r\n", wire)
  end)

  it("is libcurl's request under a base path, with an op to escape, with a user agent option", function()
    local o = options { base_url = server.url .. "/data/foundation/flowservice/", op = "re trigger&x",
      user_agent = "ua/2" }
    local curl, wire = both(o, o)
    assert.equal(curl, wire)
    assert.matches("^POST /data/foundation/flowservice/runs/" .. RUN_PATTERN .. "/action%?op=re%%20trigger%%26x ", wire)
  end)

  it("is libcurl's request for a base with a query (no run-id template)", function()
    local o = options { base_url = server.url .. "/?tenant=a%20b" }
    local curl, wire = both(o, o)
    assert.equal(curl, wire)
  end)

  it("is libcurl's request after the options change (a new token: a new template)", function()
    local c = core.new(options())
    local _, first = wire_retrigger(c, RUN, options())
    local o = options { access_token = "another-token" }
    c:retrigger(RUN, o)
    local _, second = wire_retrigger(c, RUN, o)
    c:close()
    assert.matches("Authorization: Bearer fake%-token\r\n", first)
    assert.matches("Authorization: Bearer another%-token\r\n", second)
    assert.equal(server:requests()[1].raw_header, second)
  end)

  it("names the host and port as libcurl would in Host, and the target for the socket", function()
    local function wire(base, extra)
      local o = options { base_url = base }
      for k, v in pairs(extra or {}) do o[k] = v end
      local c = core.new(o)
      local _, bytes, host, port, pool, tls, verify = wire_retrigger(c, RUN, o)
      c:close()
      return bytes:match("\r\nHost: ([^\r]*)\r\n"), host, port, pool, tls, verify
    end
    assert.same({ "example.com", "example.com", 443, "flowservice https://example.com:443", true, true },
      { wire("https://example.com") })
    assert.same({ "example.com", "example.com", 443, "flowservice https://example.com:443", true, true },
      { wire("https://example.com:443/") })
    assert.same({ "example.com:8443", "example.com", 8443, "flowservice https://example.com:8443 insecure",
      true, false }, { wire("https://example.com:8443", { insecure = true }) })
    assert.same({ "[::1]:8080", "::1", 8080, "flowservice http://[::1]:8080", false, true },
      { wire("http://[::1]:8080/") })
    assert.same({ "example.com", "example.com", 80, "flowservice http://example.com:80", false, true },
      { wire("http://example.com") })
  end)

  it("refuses what a cosocket cannot do: a proxy, user info in base_url", function()
    local c = core.new(options())
    assert.has_error(function() c:wire_retrigger(RUN, options { proxy = "http://127.0.0.1:1" }) end,
      "flowservice: the nginx transport cannot go through a proxy")
    local ok, err = pcall(c.wire_retrigger, c, RUN, options { base_url = "http://user:pw@127.0.0.1:1" })
    assert.is_false(ok)
    assert.matches("the nginx transport cannot send to this base_url", err, 1, true)
    assert.not_matches("pw", err)
    c:close()
  end)

  it("checks its options and run id as every call does (a bad run id: false, for the caller to raise)", function()
    local c = core.new(options())
    for _, bad in ipairs { "a/b", "", "..", "a b", {}, 7 } do
      assert.equal(false, (c:wire_retrigger(bad, options())))
      assert.equal(false, (c:retrigger(bad, options())))
      -- the core's other run actions raise on the same check
      assert.error_matches(function() c:submit_retrigger(bad, options()) end,
        "^bad argument #1 to 'submit_retrigger' %(run id ")
      assert.error_matches(function() c:prepare_retrigger(bad, options()) end,
        "^bad argument #1 to 'prepare_retrigger' %(run id ")
      assert.error_matches(function() core.retrigger(bad, options()) end, "^bad argument #1 to '[%w_.]+' %(run id ")
    end
    assert.same({}, server:requests())
    assert.has_error(function() c:wire_retrigger(RUN, options { no_such_option = 1 }) end)
    assert.has_error(function() c:wire_retrigger(RUN, options { timeout = "soon" }) end)
    c:close()
  end)

  it("a transfer that failed gives the error libcurl's would: kind, sent, message", function()
    local c = core.new(options())
    local t = c:wire_retrigger(RUN, options())
    t:fail("connect", "connect to 127.0.0.1:1 failed: connection refused", false)
    local run, err = t:result()
    assert.is_nil(run)
    assert.equal("network", err.kind)
    assert.is_false(err.sent)
    assert.equal("connect to 127.0.0.1:1 failed: connection refused", err.message)
    assert.equal(ID, err.request_id)
    local t2 = c:wire_retrigger(RUN, options())
    t2:fail("timeout", "reading the reply from 127.0.0.1:1 failed: timeout", true)
    local _, err2 = t2:result()
    assert.equal("timeout", err2.kind)
    assert.is_true(err2.sent)
    local t3 = c:wire_retrigger(RUN, options())
    t3:fail("tls", "TLS with 127.0.0.1:1 failed: handshake failed", false)
    assert.equal("tls", select(2, t3:result()).kind)
    assert.has_error(function() t3:fail("tls", "again", false) end, "flowservice: transfer already ended")
    assert.has_error(function() c:wire_retrigger(RUN, options()):fail("later", "x") end)
    c:close()
  end)

  describe("with a spare (the transfer of an earlier call, its result taken)", function()
    local REPLY = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    local function reply(body) return REPLY:format(#body, body) end

    it("makes it into the new call's transfer: the same userdata, nothing of the last call in it", function()
      local c = core.new(options())
      local t1 = c:wire_retrigger(RUN, nil)
      assert.is_true(t1:feed(reply('{"id":"one","etag":"\\"1\\""}')))
      local run1, status1, id1 = t1:result()
      assert.same({ id = "one", etag = '"1"' }, run1)
      assert.equal(200, status1)
      assert.equal(ID, id1)
      local o = options { request_id = "22222222-2222-4333-8444-555555555555", timeout = 7 }
      local t2, bytes, _, _, _, _, _, timeout_ms = wire_retrigger(c, RUN, o, t1)
      assert.is_true(rawequal(t1, t2))
      assert.is_false(t2:done())
      assert.equal(7000, timeout_ms)
      assert.matches("\r\nx%-request%-id: 22222222%-2222%-4333%-8444%-555555555555\r\n", bytes)
      -- a half-read reply of the last call would show here: the reader starts anew
      assert.is_false(t2:feed("HTTP/1.1 200 OK\r\nContent-Length: 40\r\n"))
      t2:fail("receive", "reading the reply from 127.0.0.1:1 failed: closed", true)
      local run2, err2 = t2:result()
      assert.is_nil(run2)
      assert.equal("network", err2.kind)
      assert.is_true(err2.sent)
      assert.equal("22222222-2222-4333-8444-555555555555", err2.request_id)
      assert.is_nil(err2.status)
      -- and once more: an error's transfer is a spare too
      local t3 = c:wire_retrigger(RUN, nil, t2)
      assert.is_true(rawequal(t1, t3))
      assert.is_true(t3:feed(reply('{"id":"three","etag":"\\"3\\""}')))
      assert.equal("three", t3:result().id)
      c:close()
    end)

    it("is refused while its result is not taken, or when it is not a wire transfer", function()
      local c = core.new(options())
      local t1 = c:wire_retrigger(RUN, nil)
      assert.has_error(function() c:wire_retrigger(RUN, nil, t1) end,
        "bad argument #3 to 'wire_retrigger' (a wire transfer whose result was taken expected)")
      assert.is_true(t1:feed(reply('{"id":"one","etag":"\\"1\\""}')))
      assert.has_error(function() c:wire_retrigger(RUN, nil, t1) end,
        "bad argument #3 to 'wire_retrigger' (a wire transfer whose result was taken expected)")
      local other = c:submit_retrigger(RUN, options())
      assert.has_error(function() c:wire_retrigger(RUN, nil, other) end,
        "bad argument #3 to 'wire_retrigger' (a wire transfer whose result was taken expected)")
      assert.has_error(function() c:wire_retrigger(RUN, nil, {}) end)
      assert.equal("one", t1:result().id) -- the refused calls left it as it was
      c:close()
    end)

    it("lean: a success gives no request id, the rest as ever (libcurl's path the same)", function()
      local c = core.new(options())
      local t = c:wire_retrigger(RUN, nil)
      t:feed(reply('{"id":"r1","etag":"\\"e\\""}'))
      local run, status, request_id = t:result(true)
      assert.same({ id = "r1", etag = '"e"' }, run)
      assert.equal(200, status)
      assert.is_nil(request_id)
      t = c:wire_retrigger(RUN, nil, t)
      t:fail("connect", "connect to 127.0.0.1:1 failed: refused", false)
      local none, err = t:result(true) -- an error is whole: its request id in it
      assert.is_nil(none)
      assert.equal(ID, err.request_id)
      local run2, status2, id2, date2 = c:retrigger(RUN, nil, true)
      assert.is_string(run2.id)
      assert.equal(200, status2)
      assert.is_nil(id2)
      assert.is_string(date2)
      local run3, _, id3 = c:retrigger(RUN, nil)
      assert.is_string(run3.id)
      assert.equal(ID, id3)
      c:close()
    end)

    it("gives the reply's table when it is {id, etag} alone, a table of those two otherwise", function()
      local c = core.new(options())
      local t = c:wire_retrigger(RUN, nil)
      t:feed(reply('{"id":"r1","etag":"\\"e\\"","state":"running","runId":"x"}'))
      assert.same({ id = "r1", etag = '"e"' }, t:result())
      t = c:wire_retrigger(RUN, nil, t)
      t:feed(reply('{"id":"r2","eTag":"\\"e2\\""}'))
      assert.same({ id = "r2", etag = '"e2"' }, t:result())
      t = c:wire_retrigger(RUN, nil, t)
      t:feed(reply('{"id":"r3"}'))
      assert.same({ id = "r3" }, t:result())
      t = c:wire_retrigger(RUN, nil, t)
      t:feed(reply('{"id":"r4","etag":7}'))
      local run, err = t:result()
      assert.is_nil(run)
      assert.equal("decode", err.kind)
      assert.equal("reply has a non-string etag", err.message)
      c:close()
    end)
  end)

  -- client:wire_plain, wire_reply and wire_transfer: the commonest call with no
  -- transfer while its reply is awaited (flowservice.wire's plain way)
  describe("the plain way", function()
    local REPLY = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    local function reply(body) return REPLY:format(#body, body) end
    local ONE = '{"id":"one","etag":"\\"1\\""}'
    -- a plain call's own line, which holds its request id
    local function line(id) return "x-request-id: " .. id .. "\r\n" end
    local function id_of(l) return l:match("^x%-request%-id: (.*)\r\n$") end

    it("is not open before a first call built the template; then gives wire_retrigger's bytes and values", function()
      local c = own_client { max_body = 4096, timeout = 9 }
      assert.is_nil(c:wire_plain(RUN)) -- nothing built yet: the caller takes wire_retrigger
      local general = own_calls(c, 2)[2]
      local seen = {}
      for i = 1, 4 do
        local lean = i > 2
        local r = pack(c:wire_plain(RUN, lean))
        assert.equal(lean and 3 or 11, r.n)
        local bytes = r[1] .. r[2] .. r[3]
        local id = id_of(r[2])
        assert.matches(UUID4, id) -- the call's line: its request id, the one it sends
        assert.is_nil(seen[id], "a fresh request id each call")
        seen[id] = true
        assert.equal(one_id(general.bytes), one_id(bytes))
        assert.equal(general.head, r[1])
        assert.equal(general.tail, r[3])
        if not lean then
          assert.same(general.values, { unpack(r, 4, 10) })
          assert.equal(4096, r[11]) -- max_body, for the reply
        end
      end
      c:close()
    end)

    it("is not taken for a client whose own options name a request id, If-Match or headers", function()
      for _, extra in ipairs { {}, { if_match = '"e"' }, { headers = { ["x-a"] = "b" } } } do
        local c = core.new(options(extra)) -- options() name a request_id
        for _ = 1, 2 do c:wire_retrigger(RUN, nil):cancel() end
        assert.is_nil(c:wire_plain(RUN))
        c:close()
      end
    end)

    it("gives false for a bad run id, as wire_retrigger", function()
      local c = own_client()
      own_calls(c, 1)
      for _, bad in ipairs { "a/b", "", "..", "x y", 42 } do
        assert.is_false(c:wire_plain(bad), tostring(bad))
        assert.same({ false, n = 1 }, pack(c:wire_plain(bad, true)), tostring(bad))
      end
      c:close()
    end)

    it("reads a whole reply as a transfer would, lean or not, again and again", function()
      local c = own_client()
      own_calls(c, 1)
      for i = 1, 3 do
        local l = select(2, c:wire_plain(RUN, true))
        local id = id_of(l)
        local r = pack(c:wire_reply(reply(ONE), l, 1024, i ~= 2))
        local t = c:wire_transfer(l, 1024)
        local want = pack(t:feed_result(reply(ONE), i ~= 2))
        assert.same(want, r)
        local expected = { true, true, { id = "one", etag = '"1"' }, 200, id, n = 5 }
        if i ~= 2 then expected[5] = nil end -- lean: no request id on success
        assert.same(expected, r)
      end
      -- an error, its request id in it; bytes after the reply: not reusable
      local done, reusable, run, err = c:wire_reply(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", line("id-404"), 1024, true)
      assert.is_true(done)
      assert.is_true(reusable)
      assert.is_nil(run)
      assert.same({ kind = "http", sent = true, request_id = "id-404", status = 404, body = "{}" }, err)
      local done2, reusable2, run2 = c:wire_reply(reply(ONE) .. "HTTP/1.1", line("id-2"), 1024, true)
      assert.is_true(done2)
      assert.is_false(reusable2)
      assert.equal("one", run2.id)
      local _, _, _, too_large = c:wire_reply(reply(ONE), line("id-3"), 4, true) -- max_body
      assert.equal("decode", too_large.kind)
      c:close()
    end)

    it("gives false and keeps nothing for a reply not whole: a transfer reads it from the start", function()
      local c = own_client()
      own_calls(c, 1)
      local whole = reply(ONE)
      local part = whole:sub(1, #whole - 5)
      assert.same({ false, n = 1 }, pack(c:wire_reply(part, line("id-1"), 1024)))
      local t = c:wire_transfer(line("id-1"), 1024)
      assert.is_false(t:feed_result(part))
      local r = pack(t:feed_result(whole:sub(#whole - 4)))
      assert.same({ true, true, { id = "one", etag = '"1"' }, 200, "id-1", n = 5 }, r)
      -- the next whole reply is its own, nothing of the part before in it
      assert.equal("one", select(3, c:wire_reply(whole, line("id-2"), 1024)).id)
      c:close()
    end)

    it("makes a transfer with a request id and max_body, from a spare when given one", function()
      local c = own_client()
      local t = c:wire_transfer(line("id-a"), 1024)
      t:fail("connect", "connect to 127.0.0.1:1 failed: refused", false)
      local _, err = t:result()
      assert.equal("id-a", err.request_id)
      assert.is_false(err.sent)
      local t2 = c:wire_transfer(line("id-b"), 2, t)
      assert.is_true(rawequal(t, t2))
      local _, _, _, err2 = t2:feed_result(reply(ONE))
      assert.equal("decode", err2.kind) -- its own max_body
      assert.equal("id-b", err2.request_id)
      assert.has_error(function() c:wire_transfer(line("id-c"), 1024, c:wire_transfer(line("x"), 1)) end,
        "bad argument #3 to 'wire_transfer' (a wire transfer whose result was taken expected)")
      assert.has_error(function() c:wire_transfer(line("id-c"), -1) end,
        "bad argument #2 to 'wire_transfer' (max_body must be >= 0)")
      -- a request id alone, or a line not ended by CRLF, is not a call's line
      for _, bad in ipairs { "id-c", "x-request-id: id-c", "x-request-id: id-c\n", "X-Request-Id: a\r\n",
          "x-request-id:\r\n" } do
        assert.has_error(function() c:wire_transfer(bad, 1024) end,
          "bad argument #1 to 'wire_transfer' (the call's line from wire_plain expected)")
        assert.has_error(function() c:wire_reply(reply(ONE), bad, 1024) end,
          "bad argument #2 to 'wire_reply' (the call's line from wire_plain expected)")
      end
      local empty = c:wire_transfer(line(""), 1024) -- what the line holds is the id, even none
      assert.equal("", select(5, empty:feed_result(reply(ONE))))
      c:close()
    end)

    it("reads a reply without the scratch for a request id too long for it (a transfer then)", function()
      local c = own_client()
      assert.same({ false, n = 1 }, pack(c:wire_reply(reply(ONE), line(("x"):rep(40)), 1024)))
      assert.is_true((c:wire_reply(reply(ONE), line(("x"):rep(39)), 1024)))
      local long = c:wire_transfer(line(("x"):rep(100)), 1024)
      assert.equal(("x"):rep(100), select(5, long:feed_result(reply(ONE))))
      c:close()
    end)

    it("ends a call in flight when its client was closed meanwhile: false, then a transfer", function()
      local c = own_client()
      own_calls(c, 1)
      local l = select(2, c:wire_plain(RUN, true))
      local id = id_of(l)
      c:close()
      assert.has_error(function() c:wire_plain(RUN) end, "flowservice: client is closed")
      assert.same({ false, n = 1 }, pack(c:wire_reply(reply(ONE), l, 1024)))
      local t = c:wire_transfer(l, 1024)
      assert.same({ true, true, { id = "one", etag = '"1"' }, 200, id, n = 5 }, pack(t:feed_result(reply(ONE))))
    end)
  end)
end)
