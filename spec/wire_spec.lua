-- The nginx transport's reply reader (src/wire.c) through its bindings:
-- crafted replies fed to core.wire_reader_for_tests (a run action's
-- transfer with nothing sent), then transfer:result() and
-- transfer:reusable(). No server: the bytes are the test's.
--
-- Every reply is read several ways: in one piece, byte by byte, cut after
-- each CR (the CR and LF of a line end in two feeds) and at random points
-- (a fixed seed); each way must give the same outcome, and byte by byte a
-- complete reply must be ready at its last byte, not before or after.
-- Each way is read twice: by feed, then result(), and by feed_result
-- (the nginx transport's: the result with the feed that ends the reply),
-- which must give the same; and the reply in one piece by a client's
-- wire_reply too (a plain call's: no transfer), which must give what
-- feed_result gives where that one piece ends the reply, else false.
local core = require "flowservice.core"

-- wire_reply's client: no request of its own is made, any options do
local reply_client = core.new { access_token = "t", api_key = "k", org_id = "O@AdobeOrg",
  base_url = "http://127.0.0.1:1" }

local HEAD_MAX = 64 * 1024 -- FS_WIRE_HEAD_MAX
local CHUNK_LINE_MAX = 4096 -- FS_WIRE_CHUNK_LINE_MAX
local MAX_BODY = 1024 * 1024

local concat, sort = table.concat, table.sort
local unpack = table.unpack or unpack -- luacheck: ignore 143 (5.1's)

-- Cut points for one way of reading: after each byte, after each CR, or
-- up to 8 points from a Park-Miller generator (exact in doubles on 5.1).
local function cuts(reply, how)
  local at, n = {}, #reply
  if how == "bytes" then
    for i = 1, n - 1 do at[#at + 1] = i end
  elseif how == "cr" then
    for i in reply:gmatch("()\r") do if i < n then at[#at + 1] = i end end
  elseif type(how) == "number" and n > 1 then
    local x, seen = how, {}
    for _ = 1, 1 + how % 8 do
      x = (x * 16807) % 2147483647
      local i = 1 + x % (n - 1)
      if not seen[i] then seen[i], at[#at + 1] = true, i end
    end
    sort(at)
  end
  return at
end

local function pieces(reply, how)
  local out, from = {}, 1
  for _, i in ipairs(cuts(reply, how)) do
    out[#out + 1] = reply:sub(from, i)
    from = i + 1
  end
  if from <= #reply then out[#out + 1] = reply:sub(from) end
  return out
end

local WAYS = { "whole", "bytes", "cr", 7, 1234, 99991, 31337 }

-- Feeds reply one way (then EOF when eof); the outcome: what the last feed
-- said, where the reply first was ready (bytes fed, or "eof"), reusable(),
-- and result()'s values once ready.
local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local function count_first(...) return select("#", ...), (...) end

-- The same values, a retry_after read a second apart aside (the clock ticked).
local function same_result(want, got, what, at)
  at = at or 1 -- where the result starts (after feed_result's two booleans: 3)
  local w, g = want[at + 1], got[at + 1]
  if want[at] == nil and type(w) == "table" and type(g) == "table" and w.retry_after
     and g.retry_after and math.abs(w.retry_after - g.retry_after) <= 1 then
    g.retry_after = w.retry_after
  end
  assert.same(want, got, what)
end

local function read(reply, how, o)
  local t = core.wire_reader_for_tests(o.max_body or MAX_BODY)
  local t2 = core.wire_reader_for_tests(o.max_body or MAX_BODY) -- read by feed_result
  local fed, out, ended = 0, { ready = false }, nil
  -- feed_result on the piece feed took: its values where that piece ended the
  -- reply, else one value, false before the end and true after it (asserts only on
  -- a difference, and no table a piece: a reply byte by byte is thousands of feeds)
  local function feed2(piece, ends)
    if ends then
      ended = pack(t2:feed_result(piece))
      assert.is_true(ended[1], "feed_result ends the reply where feed does")
      assert.is_boolean(ended[2])
      return
    end
    local n, first = count_first(t2:feed_result(piece))
    if n ~= 1 or first ~= (ended ~= nil) then
      assert.same({ ended ~= nil }, { first, n = n }, "feed_result apart from the end: one boolean")
    end
  end
  for _, piece in ipairs(pieces(reply, how)) do
    local ready, reusable = t:feed(piece)
    feed2(piece, ready and not ended)
    out.ready = ready
    -- a feed that ends the reply says what reusable() says then; others say nothing more
    if ready and not out.at then assert.equal(t:reusable(), reusable) else assert.is_nil(reusable) end
    fed = fed + #piece
    if out.ready and not out.at then out.at = fed end
  end
  if how == "whole" then
    local plain = pack(reply_client:wire_reply(reply, "x-request-id: test\r\n", o.max_body or MAX_BODY))
    if ended then
      same_result(ended, plain, "wire_reply gives what feed_result gives", 3)
    else
      assert.same({ false, n = 1 }, plain, "wire_reply: false for a reply not whole in its bytes")
    end
  end
  if o.eof then
    out.ready = t:feed(nil)
    feed2(nil, out.ready and not ended)
    if out.ready and not out.at then out.at = "eof" end
  end
  out.reusable = t:reusable()
  assert.equal(out.reusable, t2:reusable())
  if out.ready then
    local r = pack(t:result())
    same_result(r, pack(unpack(ended, 3, ended.n)), "feed_result's result is result()'s")
    assert.has_error(function() t2:result() end, "flowservice: transfer result already taken")
    out.res, out.err, out.request_id, out.date = r[1], r[1] == nil and r[2] or nil, r[3], r[4]
    out.status = r[1] ~= nil and r[2] or nil
  else
    assert.is_nil(ended)
  end
  return out
end

-- The outcome of reply read every way (o.max_body, o.eof; o.at: where a
-- good reply is ready byte by byte, default its end; o.timely: skip the
-- retry_after may differ by a second between ways: it is read against the clock).
local function run(reply, o)
  o = o or {}
  local whole = read(reply, "whole", o)
  for i = 2, #WAYS do
    local got = read(reply, WAYS[i], o)
    local at = got.at
    if o.timely and got.err and whole.err and got.err.retry_after and whole.err.retry_after
       and math.abs(got.err.retry_after - whole.err.retry_after) <= 1 then -- the clock ticked
      got.err.retry_after = whole.err.retry_after
    end
    got.at = whole.at
    if WAYS[i] ~= "bytes" then at = nil end
    assert.same(whole, got, "read " .. tostring(WAYS[i]) .. " differs from one piece")
    if at ~= nil and not (got.err and got.err.curl_code) then
      assert.equal(o.at or (o.eof and "eof") or #reply, at, "byte by byte: ready at")
    end
  end
  return whole
end

-- A reply that must be refused: ready, kind network, the message given.
local function refused(reply, message, o)
  local out = run(reply, o)
  assert.is_true(out.ready, "not ready")
  assert.is_nil(out.res)
  assert.equal("network", out.err.kind)
  assert.equal(message, out.err.message)
  assert.is_true(out.err.sent)
  assert.is_false(out.reusable)
  return out
end

local RUN = '{"id":"run-1","etag":"\\"e1\\""}'

local function reply(head_lines, body)
  return concat(head_lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end

local function ok_run(extra_lines, body)
  local lines = { "HTTP/1.1 200 OK", "Content-Length: " .. #(body or RUN) }
  for _, l in ipairs(extra_lines or {}) do lines[#lines + 1] = l end
  return reply(lines, body or RUN)
end

local function chunked(body, size)
  local out = {}
  for i = 1, #body, size do
    local piece = body:sub(i, i + size - 1)
    out[#out + 1] = ("%x\r\n%s\r\n"):format(#piece, piece)
  end
  return concat(out) .. "0\r\n\r\n"
end

local function assert_run(out)
  assert.is_true(out.ready)
  assert.is_nil(out.err)
  assert.same({ id = "run-1", etag = '"e1"' }, out.res)
  assert.equal(200, out.status)
  assert.equal("test", out.request_id)
end

local INCOMPLETE = "the connection closed before the reply was complete"
local NOTHING = "the connection closed before any reply"
local BAD_STATUS = "the reply's status line is not HTTP/1.x and a status code"
local BAD_FIELD = "a header line of the reply is not 'name: value'"
local BAD_LENGTH = "the reply's Content-Length is not a number"
local BAD_CODING = "the reply has an unsupported transfer-encoding"
local BAD_CHUNK = "a chunk size of the reply is not hexadecimal"

describe("the wire reply reader", function()
  describe("a 2xx run action reply", function()
    it("gives { id, etag }, the status, the request id and the raw Date, like libcurl's path", function()
      local out = run(ok_run { "Date: Tue, 01 Dec 2026 10:00:00 GMT", "Content-Type: application/json" })
      assert_run(out)
      assert.equal("Tue, 01 Dec 2026 10:00:00 GMT", out.date)
      assert.is_true(out.reusable)
    end)

    it("reads the docs' eTag shape, and a reply with no etag", function()
      local out = run(ok_run({}, '{"id":"run-1","eTag":"\\"e1\\""}'))
      assert_run(out)
      out = run(ok_run({}, '{"id":"run-2"}'))
      assert.same({ id = "run-2" }, out.res)
      assert.is_nil(out.date)
    end)

    it("gives a decode error for a body that is not a run", function()
      local out = run(ok_run({}, "[1,2]"))
      assert.equal("decode", out.err.kind)
      assert.equal(200, out.err.status)
      assert.equal("[1,2]", out.err.body)
      assert.is_true(out.reusable)
    end)

    it("reads lines that end in a bare LF", function()
      local out = run("HTTP/1.1 200 OK\nContent-Length: " .. #RUN .. "\nDate: Tue, 01 Dec 2026 10:00:00 GMT\n\n" .. RUN)
      assert_run(out)
      assert.equal("Tue, 01 Dec 2026 10:00:00 GMT", out.date)
      assert.is_true(out.reusable)
    end)

    it("takes 201, a status line without a reason, and one with an empty reason", function()
      local out = run(reply({ "HTTP/1.1 201 Created", "Content-Length: " .. #RUN }, RUN))
      assert.equal(201, out.status)
      assert_run(run(reply({ "HTTP/1.1 200", "Content-Length: " .. #RUN }, RUN)))
      assert_run(run(reply({ "HTTP/1.1 200 ", "Content-Length: " .. #RUN }, RUN)))
      assert_run(run(reply({ "HTTP/1.1 200 OK fine \1 really", "Content-Length: " .. #RUN }, RUN)))
    end)
  end)

  describe("4xx and 5xx", function()
    it("give kind http with the status, the body, retry_after in seconds and the date", function()
      local body = '{"error_code":"429001","message":"slow down"}'
      local out = run(reply({ "HTTP/1.1 429 Too Many Requests", "Retry-After: 30",
        "Date: Tue, 01 Dec 2026 10:00:00 GMT", "Content-Length: " .. #body }, body))
      assert.is_nil(out.res)
      assert.equal("http", out.err.kind)
      assert.equal(429, out.err.status)
      assert.equal(body, out.err.body)
      assert.equal(30, out.err.retry_after)
      assert.equal(core.parse_date("Tue, 01 Dec 2026 10:00:00 GMT"), out.err.date)
      assert.equal("test", out.err.request_id)
      assert.is_true(out.err.sent)
      assert.is_true(out.reusable)
    end)

    it("read Retry-After as an HTTP date", function()
      local when = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 120)
      local out = run(reply({ "HTTP/1.1 503 Service Unavailable", "Retry-After: " .. when,
        "Content-Length: 2" }, "no"), { timely = true })
      assert.equal(503, out.err.status)
      assert.equal("no", out.err.body)
      assert.is_true(out.err.retry_after >= 100 and out.err.retry_after <= 120, tostring(out.err.retry_after))
    end)

    it("get every header value whole, however its line is cut", function()
      local out = run(reply({ "HTTP/1.1 503 Busy", "Retry-After:" .. (" "):rep(40) .. ("0"):rep(40) .. "30" .. (" "):rep(40),
        "Date:" .. (" \t"):rep(30) .. "Tue, 01 Dec 2026 10:00:00 GMT" .. (" "):rep(30),
        "Content-Length: " .. ("0"):rep(60) .. "2" }, "ab"))
      assert.equal(30, out.err.retry_after)
      assert.equal(core.parse_date("Tue, 01 Dec 2026 10:00:00 GMT"), out.err.date)
      assert.equal("ab", out.err.body)
      assert.is_true(out.reusable)
    end)

    it("have no retry_after or date without those headers", function()
      local out = run(reply({ "HTTP/1.1 500 Oops", "Content-Length: 0" }))
      assert.equal(500, out.err.status)
      assert.equal("", out.err.body)
      assert.is_nil(out.err.retry_after)
      assert.is_nil(out.err.date)
    end)

    it("read a chunked body", function()
      local body = ("x"):rep(100)
      local out = run(reply({ "HTTP/1.1 502 Bad Gateway", "Transfer-Encoding: chunked" }, chunked(body, 7)))
      assert.equal(502, out.err.status)
      assert.equal(body, out.err.body)
      assert.is_true(out.reusable)
    end)
  end)

  describe("max_body", function()
    it("takes a body of exactly max_body bytes, and refuses one byte more (kind decode)", function()
      local out = run(ok_run(), { max_body = #RUN })
      assert_run(out)
      for _, r in ipairs { ok_run(), reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: chunked" }, chunked(RUN, 5)),
                           reply({ "HTTP/1.1 500 Oops" }, RUN) } do
        out = run(r, { max_body = #RUN - 1, eof = true })
        assert.is_true(out.ready)
        assert.equal("decode", out.err.kind)
        assert.matches("too large", out.err.message, 1, true)
        assert.equal(23, out.err.curl_code) -- CURLE_WRITE_ERROR, as libcurl's path
        assert.is_false(out.reusable)
      end
    end)

    it("with max_body 0, takes only an empty body", function()
      local out = run(reply({ "HTTP/1.1 500 Oops", "Content-Length: 0" }), { max_body = 0 })
      assert.equal("http", out.err.kind)
      out = run(reply({ "HTTP/1.1 500 Oops", "Content-Length: 1" }, "x"), { max_body = 0 })
      assert.equal("decode", out.err.kind)
    end)
  end)

  describe("the status line", function()
    it("takes HTTP/1.0", function()
      local out = run(reply({ "HTTP/1.0 200 OK", "Content-Length: " .. #RUN }, RUN))
      assert_run(out)
    end)

    it("refuses anything but HTTP/1.x SP three digits [SP reason]", function()
      for _, line in ipairs { "HTTP/1.2 200 OK", "HTTP/2 200 OK", "HTTP/2.0 200 OK", "http/1.1 200 OK",
                              "HTTP/1.1 20 OK", "HTTP/1.1 2000 OK", "HTTP/1.1  200 OK", "HTTP/1.1 200OK",
                              "HTTP/1.1 2x0 OK", "HTTP/1.1\t200 OK", " HTTP/1.1 200 OK", "HTTP/1.1", "",
                              "ICY 200 OK", "HTTP/1.1 -20 OK" } do
        refused(reply({ line, "Content-Length: 0" }), BAD_STATUS)
      end
    end)

    it("refuses status codes outside 100-599", function()
      for _, code in ipairs { "000", "099", "600", "999" } do
        refused(reply({ "HTTP/1.1 " .. code .. " X", "Content-Length: 0" }),
          "the reply's status code is not between 100 and 599")
      end
      local out = run(reply({ "HTTP/1.1 599 X", "Content-Length: 0" }))
      assert.equal(599, out.err.status)
    end)

    it("refuses a 101", function()
      refused(reply({ "HTTP/1.1 101 Switching Protocols", "Upgrade: h2c" }), "the server switched protocols (101)")
    end)
  end)

  describe("header lines", function()
    it("refuse an obs-folded line, also in the trailers", function()
      refused(ok_run { "X-A: one", " two" }, "the reply has a folded header line")
      refused(ok_run { "X-A: one", "\ttwo" }, "the reply has a folded header line")
      refused(reply({ "HTTP/1.1 200 OK", " X-A: 1", "Content-Length: 0" }), "the reply has a folded header line")
      refused(reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: chunked" }, "0\r\nX-T: 1\r\n continued\r\n\r\n"),
        "the reply has a folded header line")
    end)

    it("refuse a line that is not a token name, a colon and a value", function()
      for _, line in ipairs { "X-A", "X-A : 1", ": 1", "X A: 1", "X(A): 1", "X-\1A: 1", "\"X\": 1" } do
        refused(ok_run { line }, BAD_FIELD)
      end
    end)

    it("take every token character in a name, and an empty value", function()
      assert_run(run(ok_run { "!#$%&'*+-.^_`|~09azAZ: 1", "X-Empty:", "X-Spaces:   " }))
    end)

    it("refuse a NUL or a bare CR", function()
      local why = "a line of the reply holds a NUL or a bare CR"
      refused(ok_run { "X-A: a\0b" }, why)
      refused(ok_run { "X-A: a\rb" }, why)
      refused(ok_run { "X-A: a\r" }, why) -- CR CR LF
      refused(reply({ "HTTP/1.1 200 O\rK", "Content-Length: 0" }), why)
    end)

    it("are capped at FS_WIRE_HEAD_MAX bytes, status line and empty line included", function()
      local function head_of(size) -- a 200 whose head is size bytes
        local start, pad = "HTTP/1.1 200 OK\r\nContent-Length: " .. #RUN .. "\r\nX-Pad: ", "\r\n\r\n"
        return start .. ("p"):rep(size - #start - #pad) .. pad
      end
      assert.equal(HEAD_MAX, #head_of(HEAD_MAX))
      assert_run(run(head_of(HEAD_MAX) .. RUN))
      refused(head_of(HEAD_MAX + 1) .. RUN, "the reply's head is too large")
      -- one line longer than the cap, no LF in sight
      refused("HTTP/1.1 200 OK\r\nX-Pad: " .. ("p"):rep(HEAD_MAX), "the reply's head is too large")
    end)

    it("count interim responses and trailers against the same cap", function()
      local interim = "HTTP/1.1 100 Continue\r\nX-Pad: " .. ("p"):rep(HEAD_MAX - 200) .. "\r\n\r\n"
      refused(interim .. ok_run({ "X-B: " .. ("b"):rep(200) }), "the reply's head is too large")
      assert_run(run(interim .. ok_run()))
      local head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: " .. ("p"):rep(HEAD_MAX - 200) .. "\r\n\r\n"
      assert_run(run(head .. chunked(RUN, 8)))
      refused(head .. chunked(RUN, 8):gsub("\r\n$", "X-T: " .. ("t"):rep(200) .. "\r\n\r\n"),
        "the reply's head is too large")
    end)
  end)

  describe("interim responses", function()
    it("skip 1xx (not 101) before the reply, with their headers", function()
      assert_run(run("HTTP/1.1 100 Continue\r\n\r\n" .. ok_run()))
      local out = run("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"
        .. "Retry-After: 5\r\nDate: Tue, 01 Dec 2026 09:00:00 GMT\r\nContent-Length: 9\r\n\r\n"
        .. reply({ "HTTP/1.1 503 Busy", "Content-Length: 0" }))
      assert.equal(503, out.err.status)
      assert.is_nil(out.err.retry_after) -- the interim response's, forgotten
      assert.is_nil(out.err.date)
      assert.is_true(out.reusable)
    end)

    it("refuse a 101 after a 100", function()
      refused("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
        "the server switched protocols (101)")
    end)

    it("are not the reply: a close after one is an incomplete reply", function()
      local out = refused("HTTP/1.1 100 Continue\r\n\r\n", INCOMPLETE, { eof = true })
      assert.equal(8, out.err.curl_code) -- CURLE_WEIRD_SERVER_REPLY
    end)
  end)

  describe("204 and 304", function()
    it("have no body, whatever Content-Length or Transfer-Encoding say", function()
      for _, r in ipairs { reply({ "HTTP/1.1 204 No Content" }), reply({ "HTTP/1.1 204 No Content", "Content-Length: 5" }),
                           reply({ "HTTP/1.1 204 No Content", "Transfer-Encoding: chunked" }) } do
        local out = run(r)
        assert.equal("decode", out.err.kind) -- a 2xx re-trigger whose body is no run
        assert.equal(204, out.err.status)
        assert.equal("", out.err.body)
        assert.is_true(out.reusable)
      end
      local out = run(reply({ "HTTP/1.1 304 Not Modified", "Content-Length: 10" }))
      assert.equal("http", out.err.kind)
      assert.equal(304, out.err.status)
      assert.is_true(out.reusable)
    end)

    it("followed by bytes: done, the connection not reusable", function()
      local r = reply({ "HTTP/1.1 204 No Content", "Content-Length: 5" })
      local out = run(r .. "hello", { at = #r })
      assert.equal(204, out.err.status)
      assert.equal("", out.err.body)
      assert.is_false(out.reusable)
    end)
  end)

  describe("Transfer-Encoding", function()
    it("reads chunked, in any case, chunks of any size", function()
      for _, coding in ipairs { "chunked", "Chunked", "CHUNKED", " chunked ", "chunked," } do
        for _, size in ipairs { 1, 3, 64 } do
          local out = run(reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: " .. coding }, chunked(RUN, size)))
          assert_run(out)
          assert.is_true(out.reusable)
        end
      end
    end)

    it("refuses any other coding, chunked not last, chunked twice, an empty one", function()
      for _, lines in ipairs { { "Transfer-Encoding: gzip" }, { "Transfer-Encoding: gzip, chunked" },
                               { "Transfer-Encoding: chunked, gzip" }, { "Transfer-Encoding: identity" },
                               { "Transfer-Encoding: chunked, chunked" }, { "Transfer-Encoding: chunked;q=1" },
                               { "Transfer-Encoding: gzip", "Transfer-Encoding: chunked" },
                               { "Transfer-Encoding: chunked", "Transfer-Encoding: chunked" },
                               { "Transfer-Encoding:" }, { "Transfer-Encoding: ," },
                               { "Transfer-Encoding: chunked", "Transfer-Encoding:" } } do
        table.insert(lines, 1, "HTTP/1.1 200 OK")
        refused(reply(lines, chunked(RUN, 8)), BAD_CODING)
      end
    end)

    it("beats Content-Length, and then the connection is not reused", function()
      local out = run(reply({ "HTTP/1.1 200 OK", "Content-Length: 3", "Transfer-Encoding: chunked" }, chunked(RUN, 4)))
      assert_run(out)
      assert.is_false(out.reusable)
      out = run(reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 3000" }, chunked(RUN, 4)))
      assert_run(out)
      assert.is_false(out.reusable)
    end)

    it("on HTTP/1.0: read chunked, the connection not reused even with keep-alive", function()
      local out = run(reply({ "HTTP/1.0 200 OK", "Connection: keep-alive", "Transfer-Encoding: chunked" },
        chunked(RUN, 4)))
      assert_run(out)
      assert.is_false(out.reusable)
    end)
  end)

  describe("chunks", function()
    local function chunked_reply(body) return reply({ "HTTP/1.1 500 Oops", "Transfer-Encoding: chunked" }, body) end

    it("take hex sizes in either case, leading zeros, BWS and extensions", function()
      local body = ("y"):rep(26)
      for _, chunks in ipairs { "1A\r\n" .. body .. "\r\n0\r\n\r\n", "1a\r\n" .. body .. "\r\n0\r\n\r\n",
                                "001a\r\n" .. body .. "\r\n000\r\n\r\n",
                                "1a;name=value;x\r\n" .. body .. "\r\n0;last\r\n\r\n",
                                "1a \t;ext\r\n" .. body .. "\r\n0  \r\n\r\n",
                                "1a\n" .. body .. "\n0\n\n" } do
        local out = run(chunked_reply(chunks))
        assert.equal(body, out.err.body)
        assert.is_true(out.reusable)
      end
    end)

    it("refuse a size that is not hex, or has something after it but an extension", function()
      for _, chunks in ipairs { "g\r\nx\r\n0\r\n\r\n", "\r\nx\r\n0\r\n\r\n", "-1\r\nx\r\n0\r\n\r\n",
                                "0x1\r\nx\r\n0\r\n\r\n", "1 x\r\nx\r\n0\r\n\r\n", " 1\r\nx\r\n0\r\n\r\n",
                                "+1\r\nx\r\n0\r\n\r\n" } do
        refused(chunked_reply(chunks), BAD_CHUNK)
      end
    end)

    it("check the size for overflow", function()
      -- the largest size is a size (the reply then ends early), one hex digit more is not
      local out = refused(chunked_reply("ffffffffffffffff\r\nabc"), INCOMPLETE, { eof = true })
      assert.equal(8, out.err.curl_code)
      refused(chunked_reply("10000000000000000\r\nabc"), "a chunk size of the reply is too large")
      refused(chunked_reply("00000000000000000000ffffffffffffffff0\r\nabc"), "a chunk size of the reply is too large")
    end)

    it("require CRLF (or LF) after each chunk's data", function()
      local why = "a chunk of the reply does not end with CRLF"
      refused(chunked_reply("3\r\nabcX\r\n0\r\n\r\n"), why)
      refused(chunked_reply("3\r\nabc\rX0\r\n\r\n"), why)
      refused(chunked_reply("3\r\nabc\r\r\n0\r\n\r\n"), why)
      refused(chunked_reply("3\r\nabcd\r\n0\r\n\r\n"), why)
      local out = run(chunked_reply("3\r\nabc\n0\r\n\r\n"))
      assert.equal("abc", out.err.body)
    end)

    it("have a chunk-size line of at most FS_WIRE_CHUNK_LINE_MAX bytes", function()
      local function size_line(len) return "3;" .. ("e"):rep(len - 4) .. "\r\n" end
      assert.equal(CHUNK_LINE_MAX, #size_line(CHUNK_LINE_MAX))
      local out = run(chunked_reply(size_line(CHUNK_LINE_MAX) .. "abc\r\n0\r\n\r\n"))
      assert.equal("abc", out.err.body)
      refused(chunked_reply(size_line(CHUNK_LINE_MAX + 1) .. "abc\r\n0\r\n\r\n"),
        "a chunk-size line of the reply is too long")
    end)

    it("end with trailers, read and dropped", function()
      local out = run(chunked_reply("3\r\nabc\r\n0\r\nRetry-After: 9\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n"))
      assert.equal("abc", out.err.body)
      assert.is_nil(out.err.retry_after) -- a trailer is not a header
      assert.is_nil(out.err.date)
      assert.is_true(out.reusable)
      refused(chunked_reply("3\r\nabc\r\n0\r\nnot a field\r\n\r\n"), BAD_FIELD)
    end)
  end)

  describe("Content-Length", function()
    it("takes digits, leading zeros, repeats of one value and a list of equal values", function()
      for _, lines in ipairs { { "Content-Length: " .. #RUN }, { "Content-Length: 000" .. #RUN },
                               { "Content-Length: " .. #RUN, "Content-Length: " .. #RUN },
                               { ("Content-Length: %d, %d,%d"):format(#RUN, #RUN, #RUN) },
                               { "content-length:\t" .. #RUN .. "\t" } } do
        table.insert(lines, 1, "HTTP/1.1 200 OK")
        local out = run(reply(lines, RUN))
        assert_run(out)
        assert.is_true(out.reusable)
      end
    end)

    it("is read under its name in any case, and only under its name", function()
      for _, name in ipairs { "CONTENT-LENGTH", "cOnTeNt-LeNgTh" } do
        local out = run(reply({ "HTTP/1.1 200 OK", name .. ": " .. #RUN }, RUN))
        assert_run(out)
        assert.is_true(out.reusable)
      end
      -- names one byte off (a tchar whose bit 0x20 is the only difference from
      -- a letter of it, and '_' for '-'), or longer, or shorter: not the length;
      -- read to the close, as a reply without one is
      for _, name in ipairs { "Content_Length", "Content-Lengt", "Content-Lengths", "Content-Lengtj",
                              "XContent-Length", "Content-Length~" } do
        local out = run(reply({ "HTTP/1.1 200 OK", name .. ": 3" }, RUN), { eof = true })
        assert_run(out)
        assert.is_false(out.reusable)
      end
    end)

    it("refuses anything but digits", function()
      for _, v in ipairs { "", "+5", "-1", "5a", "0x10", "5 5", "5,,5", "5,", ",5", "1e3", "5;" } do
        refused(reply({ "HTTP/1.1 200 OK", "Content-Length: " .. v }, RUN), BAD_LENGTH)
      end
    end)

    it("refuses two different values", function()
      local why = "the reply has two different Content-Lengths"
      refused(reply({ "HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 6" }, RUN), why)
      refused(reply({ "HTTP/1.1 200 OK", "Content-Length: 5, 6" }, RUN), why)
      refused(reply({ "HTTP/1.1 200 OK", "Content-Length: 05", "Content-Length: 5", "Content-Length: 6" }, RUN), why)
    end)

    it("checks for overflow", function()
      -- 2^64 - 1 is a length (the reply then ends early); 2^64 is not
      refused(reply({ "HTTP/1.1 200 OK", "Content-Length: 18446744073709551615" }, "abc"), INCOMPLETE, { eof = true })
      for _, v in ipairs { "18446744073709551616", "99999999999999999999999" } do
        refused(reply({ "HTTP/1.1 200 OK", "Content-Length: " .. v }, RUN), "the reply's Content-Length is too large")
      end
    end)

    it("0 is a reply without a body", function()
      local r = reply({ "HTTP/1.1 503 Busy", "Content-Length: 0" })
      local out = run(r)
      assert.equal("", out.err.body)
      assert.is_true(out.reusable)
    end)
  end)

  describe("a body without a length", function()
    it("lasts until the connection closes: done then, not reusable", function()
      local r = reply({ "HTTP/1.1 200 OK" }, RUN)
      local out = run(r)
      assert.is_false(out.ready)
      assert.is_false(out.reusable)
      out = run(r, { eof = true })
      assert_run(out)
      assert.is_false(out.reusable)
      out = run(reply({ "HTTP/1.0 500 Oops", "Connection: keep-alive" }, "abc"), { eof = true })
      assert.equal("abc", out.err.body)
      assert.is_false(out.reusable)
    end)
  end)

  describe("Connection", function()
    it("close, as any token of its list, in any case: the connection is not reused", function()
      for _, v in ipairs { "close", "Close", "keep-alive, close", "upgrade,CLOSE", " close ," } do
        local out = run(ok_run { "Connection: " .. v })
        assert_run(out)
        assert.is_false(out.reusable, v)
      end
      local out = run(ok_run { "Connection: keep-alive", "Connection: close" })
      assert.is_false(out.reusable)
    end)

    it("other tokens leave an HTTP/1.1 connection reusable", function()
      for _, v in ipairs { "keep-alive", "closed", "x-close", "Upgrade", "" } do
        local out = run(ok_run { "Connection: " .. v })
        assert_run(out)
        assert.is_true(out.reusable, v)
      end
    end)

    it("HTTP/1.0 is reusable only with keep-alive", function()
      local function v10(lines)
        table.insert(lines, 1, "HTTP/1.0 200 OK")
        lines[#lines + 1] = "Content-Length: " .. #RUN
        return reply(lines, RUN)
      end
      assert.is_false(run(v10 {}).reusable)
      assert.is_false(run(v10 { "Connection: close" }).reusable)
      assert.is_false(run(v10 { "Connection: keep-alive, close" }).reusable)
      assert.is_false(run(v10 { "Connection: keep-alives" }).reusable)
      assert.is_true(run(v10 { "Connection: keep-alive" }).reusable)
      assert.is_true(run(v10 { "Connection: Keep-Alive" }).reusable)
      assert.is_true(run(v10 { "Connection: foo, keep-alive" }).reusable)
    end)
  end)

  describe("the connection closing", function()
    it("before any byte: a network error saying so, nothing came", function()
      local out = refused("", NOTHING, { eof = true })
      assert.equal(52, out.err.curl_code) -- CURLE_GOT_NOTHING
    end)

    it("before the reply is complete: a network error saying so", function()
      local full = reply({ "HTTP/1.1 200 OK", "Content-Length: " .. #RUN }, RUN)
      local chunked_full = reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: chunked" }, chunked(RUN, 8))
      for _, r in ipairs { "H", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK\r", "HTTP/1.1 200 OK\r\nDate: x",
                           "HTTP/1.1 200 OK\r\n", full:sub(1, -2), full:sub(1, #full - #RUN),
                           chunked_full:sub(1, -2), chunked_full:sub(1, -3), chunked_full:sub(1, -6),
                           chunked_full:sub(1, 60) } do
        local out = refused(r, INCOMPLETE, { eof = true })
        assert.equal(8, out.err.curl_code)
      end
    end)

    it("after a complete reply: still done, the connection not reusable", function()
      local out = run(ok_run(), { eof = true, at = #ok_run() })
      assert_run(out)
      assert.is_false(out.reusable)
    end)
  end)

  describe("bytes after a complete reply", function()
    it("leave it done, its result unchanged, the connection not reusable", function()
      local r = ok_run()
      for _, after in ipairs { "\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "x" } do
        local out = run(r .. after, { at = #r })
        assert_run(out)
        assert.is_false(out.reusable)
      end
      local c = reply({ "HTTP/1.1 200 OK", "Transfer-Encoding: chunked" }, chunked(RUN, 8))
      local out = run(c .. "0\r\n\r\n", { at = #c })
      assert_run(out)
      assert.is_false(out.reusable)
    end)

    it("in a later feed, even after the result was taken", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.is_true(t:feed(ok_run()))
      assert.is_true(t:reusable())
      assert.same({ id = "run-1", etag = '"e1"' }, (t:result()))
      assert.is_true(t:feed("more"))
      assert.is_false(t:reusable())
      assert.is_true(t:feed(nil))
      assert.is_false(t:reusable())
    end)
  end)

  describe("a done or bad reply stays so", function()
    it("a bad one, whatever comes next", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.is_true(t:feed("HTTP/1.1 2000 OK\r\n"))
      assert.is_true(t:feed(ok_run()))
      assert.is_true(t:feed(nil))
      local res, err = t:result()
      assert.is_nil(res)
      assert.equal(BAD_STATUS, err.message)
      assert.is_false(t:reusable())
    end)

    it("a done one keeps its result", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.is_true(t:feed(reply({ "HTTP/1.1 503 Busy", "Content-Length: 1" }, "a")))
      assert.is_true(t:feed("HTTP/1.1 200 OK\r\n\r\n"))
      local res, err = t:result()
      assert.is_nil(res)
      assert.equal(503, err.status)
      assert.equal("a", err.body)
    end)
  end)

  -- A feed that holds a whole head from the reply's first byte is read in one
  -- pass (wire_fast) where the reply is of the common kind; run() reads each
  -- reply whole and cut every other way (line by line, the general way): the
  -- same outcome, whichever way took it.
  describe("a whole head in one feed", function()
    local BODY = '{"id":"run-1","etag":"\\"e1\\""}'
    local function head(lines, body)
      return concat(lines, "\r\n") .. "\r\n\r\n" .. (body or BODY)
    end

    it("reads the common reply as every cut of it does", function()
      for _, lines in ipairs {
        { "HTTP/1.1 200 OK", "Content-Length: " .. #BODY },
        { "HTTP/1.1 201 Created", "Server: nginx", "Date: Tue, 01 Dec 2026 10:00:00 GMT",
          "Content-Type: application/json", "Connection: keep-alive", "Content-Length: " .. #BODY },
        { "HTTP/1.1 202", "CONTENT-LENGTH:\t" .. #BODY .. " ", "connection: Keep-Alive" },
        { "HTTP/1.1 299 ", "Content-Length: 00" .. #BODY, "Content-Length: " .. #BODY },
        { "HTTP/1.1 200 OK", "Connection: close", "Content-Length: " .. #BODY, "Retry-After: 7" },
        { "HTTP/1.1 200 a reason, with: colons \1 and \127", "X-Empty:", "x: y",
          "Content-Length: " .. #BODY },
      } do
        local out = run(head(lines))
        assert.is_nil(out.err)
        assert.same({ id = "run-1", etag = '"e1"' }, out.res)
        assert.equal(tonumber(lines[1]:match("^HTTP/1%.1 (%d+)")), out.status)
      end
      local close = run(head { "HTTP/1.1 200 OK", "Connection: close", "Content-Length: " .. #BODY })
      assert.is_false(close.reusable)
      local keep = run(head { "HTTP/1.1 200 OK", "Content-Length: " .. #BODY, "Connection: keep-alive" })
      assert.is_true(keep.reusable)
    end)

    it("reads a body of any length, none, or one still to come", function()
      for _, body in ipairs { "", "1", "1234567", ("x"):rep(5000) } do
        local out = run(head({ "HTTP/1.1 200 OK", "Content-Length: " .. #body }, body))
        assert.is_true(out.ready)
        assert.equal(200, out.err.status)
        assert.equal(body, out.err.body)
      end
      local short = run(head({ "HTTP/1.1 200 OK", "Content-Length: 40" }, "abc"), { eof = true })
      assert.equal(INCOMPLETE, short.err.message)
      local whole = head({ "HTTP/1.1 200 OK", "Content-Length: " .. #BODY }, BODY)
      local extra = run(whole .. "HTTP/1.1", { at = #whole })
      assert_run(extra)
      assert.is_false(extra.reusable)
    end)

    it("leaves every other kind to the general way, with the same outcome", function()
      local len = "Content-Length: " .. #BODY
      for _, case in ipairs {
        { { "HTTP/1.1 200 OK", "Connection: keep-alive, close", len }, reusable = false },
        { { "HTTP/1.1 200 OK", "Connection: upgrade", len }, reusable = true },
        { { "HTTP/1.1 200 OK", "Content-Length: 3, " .. #BODY } },
        { { "HTTP/1.1 200 OK", "Content-Length: " .. #BODY .. ", " .. #BODY } },
        { { "HTTP/1.1 200 OK", "Content-Length: 99999999999999999999" } },
        { { "HTTP/1.1 200 OK", "Transfer-Encoding: chunked" }, body = chunked(BODY, 5) },
        { { "HTTP/1.1 204 No Content", len }, body = "" },
        { { "HTTP/1.0 200 OK", len } },
        { { "HTTP/1.1 100 Continue", "", "HTTP/1.1 200 OK", len } },
        { { "HTTP/1.1 503 Busy", "Retry-After: 30", len } },
        { { "HTTP/1.1 200 OK", " folded", len } },
        { { "HTTP/1.1 200 OK", "Bad Name: x", len } },
        { { "HTTP/1.1 200 OK", "X-Nul: a\0b", len } },
        { { "HTTP/1.1 200 OK", "X-Cr: a\rb", len } },
        { { "HTTP/1.1 200 O\0K", len } },
        { { "HTTP/1.1 200 OK", "X: 1" }, eof = true },
      } do
        local out = run(head(case[1], case.body), { eof = case.eof })
        assert.is_true(out.ready)
        if case.reusable ~= nil then assert.equal(case.reusable, out.reusable) end
      end
      -- bare LF line ends: the general way too
      assert_run(run("HTTP/1.1 200 OK\nContent-Length: " .. #BODY .. "\n\n" .. BODY))
      -- a head just within the cap and one just past it
      local pad = "X-Pad: "
      local base = #head({ "HTTP/1.1 200 OK", len, pad }, "") -- the head bytes, the pad empty
      local fits = run(head({ "HTTP/1.1 200 OK", len, pad .. ("p"):rep(HEAD_MAX - base) }))
      assert_run(fits)
      refused(head({ "HTTP/1.1 200 OK", len, pad .. ("p"):rep(HEAD_MAX - base + 1) }),
        "the reply's head is too large")
    end)
  end)

  describe("the transfer methods", function()
    it("feed says false until the reply is complete; result() before that raises", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      local r = ok_run()
      assert.is_false(t:feed(r:sub(1, 20)))
      assert.is_false(t:feed(""))
      assert.is_false(t:done())
      assert.is_false(t:reusable())
      assert.has_error(function() t:result() end, "flowservice: transfer is still in flight")
      assert.is_true(t:feed(r:sub(21)))
      assert.is_true(t:done())
      assert.equal("run-1", t:result().id)
      assert.has_error(function() t:result() end, "flowservice: transfer result already taken")
    end)

    it("feed_result gives the result with the feed that ends the reply (lean: no request id)", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      local r = ok_run()
      assert.same({ false }, { t:feed_result(r:sub(1, 20), true) })
      local done, reusable, res, status, request_id = t:feed_result(r:sub(21), true)
      assert.is_true(done)
      assert.is_true(reusable)
      assert.same({ id = "run-1", etag = '"e1"' }, res)
      assert.equal(200, status)
      assert.is_nil(request_id)
      assert.same({ true }, { t:feed_result("HTTP/1.1 200 OK\r\n") })
      assert.is_false(t:reusable())
      assert.has_error(function() t:result() end, "flowservice: transfer result already taken")
      local t2 = core.wire_reader_for_tests(MAX_BODY)
      assert.equal("test", select(5, t2:feed_result(r)))
    end)

    it("a cancelled transfer takes bytes and gives nothing", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.is_false(t:feed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"))
      t:cancel()
      assert.is_true(t:feed("cde"))
      assert.is_false(t:reusable())
      assert.has_error(function() t:result() end, "flowservice: transfer result already taken")
    end)

    it("feed and reusable raise on a libcurl transfer", function()
      local client = core.new { access_token = "t", api_key = "k", org_id = "o@AdobeOrg",
        base_url = "http://127.0.0.1:9/data/foundation/flowservice" }
      local t = client:prepare_retrigger("run-1", { access_token = "t", api_key = "k", org_id = "o@AdobeOrg",
        base_url = "http://127.0.0.1:9/data/foundation/flowservice" })
      assert.has_error(function() t:feed("HTTP/1.1 200 OK\r\n") end, "flowservice: not a wire transfer")
      assert.has_error(function() t:reusable() end, "flowservice: not a wire transfer")
      t:cancel()
      client:close()
    end)

    it("feed takes a string or nil; the test constructor a max_body >= 0", function()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.has_error(function() t:feed({}) end)
      assert.has_error(function() core.wire_reader_for_tests(-1) end)
      assert.has_error(function() core.wire_reader_for_tests("x") end)
    end)

    it("many readers, fed and dropped unfinished, are collected", function()
      for i = 1, 200 do
        local t = core.wire_reader_for_tests(MAX_BODY)
        t:feed("HTTP/1.1 200 OK\r\nX-Long: " .. ("l"):rep(300 + i)) -- a line kept in the reader
      end
      collectgarbage()
      collectgarbage()
      local t = core.wire_reader_for_tests(MAX_BODY)
      assert.is_false(t:feed("HTTP/1.1 200 OK\r\nX-Long: " .. ("l"):rep(300)))
    end)
  end)
end)
