-- Run by `make test` under LuaJIT (busted --run=luajit): the nginx
-- transport's calls stay low in their callers' registers. lua-nginx-module
-- reuses request coroutines with the stacks they grew to, and LuaJIT puts a
-- callee's frame at the call's register, so each value live at the
-- transport's deepest call is a stack slot every waiting request holds
-- (README, "The evening of 2026-12-03": at 1000 connections 1.47 -> 0.92 KiB
-- of heap a request in flight when these calls moved ~16 slots lower; then
-- the plain call a tail call through, its stacks the floor's, "The night of
-- 2026-12-03"). A change that puts them back up fails here, to be measured
-- before it lands.

-- Each call instruction of f: { a = the callee's register, tail = a tail
-- call (it leaves no frame of f's below the callee), callee = the field or
-- upvalue name last read into that register (TGETS, UGET), if any }.
-- LuaJIT's own modules are required here, when a test runs: the other
-- profiles load this file and skip its tests.
local function calls(f)
  local jutil, vmdef, bit = require "jit.util", require "jit.vmdef", require "bit"
  local band, rshift = bit.band, bit.rshift
  local list, name = {}, {}
  local pc = 1
  while true do
    local ins = jutil.funcbc(f, pc)
    if not ins then break end
    local code = band(ins, 0xff)
    local op = vmdef.bcnames:sub(code * 6 + 1, code * 6 + 6):gsub(" +$", "")
    local a = band(rshift(ins, 8), 0xff)
    if op == "CALL" or op == "CALLM" or op == "CALLT" or op == "CALLMT" then
      list[#list + 1] = { a = a, tail = op == "CALLT" or op == "CALLMT", callee = name[a] }
    elseif op == "TGETS" then
      name[a] = jutil.funck(f, -band(rshift(ins, 16), 0xff) - 1) -- C: a string constant, -(C+1)
    elseif op == "UGET" then
      name[a] = jutil.funcuvname(f, rshift(ins, 16))
    end
    pc = pc + 1
  end
  return list
end

local function at(f, callee, tail)
  for _, c in ipairs(calls(f)) do
    if c.callee == callee and c.tail == (tail or false) then return c.a end
  end
  error("no " .. (tail and "tail " or "") .. "call to " .. callee)
end

-- The calls a plain call makes while its reply is on its way, and the
-- highest register each may be at (the frames above: client:retrigger's,
-- replaced by wire.plain's, as the tail calls below make them).
local PLAIN_WAY = { wire_plain = 9, learn = 9, now = 12, tcp = 10, settimeouts = 10, connect = 10,
  getreusedtimes = 12, send = 12, receiveany = 6, wire_reply = 8, setkeepalive = 14, close = 14 }

describe("#luajit the nginx transport's stack", function()
  it("makes client:retrigger's plain call a tail call to wire.plain, at register 5", function()
    local flowservice = require "flowservice"
    local client = flowservice.new { access_token = "t", api_key = "k", org_id = "o@AdobeOrg",
      sandbox = "prod", base_url = "http://127.0.0.1:9" }
    assert.equals(5, at(client.retrigger, "plain", true)) -- raises if not a tail call
    client:close()
  end)

  it("keeps wire.plain's calls low (the connect at 10, the read at 6, was 24 and 12)", function()
    local wire = require "flowservice.wire"
    local seen = {}
    for _, c in ipairs(calls(wire.plain)) do
      local limit = PLAIN_WAY[c.callee]
      if limit then
        assert.is_true(c.a <= limit, c.callee .. " called at register " .. c.a .. ", above " .. limit)
        seen[c.callee] = true
      end
    end
    for callee in pairs(PLAIN_WAY) do assert.is_true(seen[callee], "no call to " .. callee) end
  end)

  it("ends every plain call in a tail call to the client's finish", function()
    local wire = require "flowservice.wire"
    local tails = 0
    for _, c in ipairs(calls(wire.plain)) do
      if c.callee == "finish" then
        assert.is_true(c.tail, "finish called (not tail-called) at register " .. c.a)
        tails = tails + 1
      end
    end
    assert.is_true(tails >= 6, "finish tail-called " .. tails .. " times")
    -- and nothing else ends it: every return of wire.plain is one of those
    local jutil, vmdef, bit = require "jit.util", require "jit.vmdef", require "bit"
    for pc = 1, math.huge do
      local ins = jutil.funcbc(wire.plain, pc)
      if not ins then break end
      local code = bit.band(ins, 0xff)
      local op = vmdef.bcnames:sub(code * 6 + 1, code * 6 + 6):gsub(" +$", "")
      assert.is_nil(op:match("^RET[01M]?$") and op, "wire.plain returns (" .. op .. ") at " .. pc)
    end
  end)
end)
