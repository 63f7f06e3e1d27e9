-- Run by `make test` under LuaJIT (busted --run=luajit): the nginx
-- transport's calls stay low in their callers' registers. lua-nginx-module
-- reuses request coroutines with the stacks they grew to, and LuaJIT puts a
-- callee's frame at the call's register, so each value live at the
-- transport's deepest call is a stack slot every waiting request holds
-- (README, "The evening of 2026-12-03": at 1000 connections 1.47 -> 0.92 KiB
-- of heap a request in flight when these calls moved ~16 slots lower). A
-- change that puts them back up fails here, to be measured before it lands.

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

local function highest(f)
  local top = -1
  for _, c in ipairs(calls(f)) do if not c.tail and c.a > top then top = c.a end end
  return top
end

local function at(f, callee, tail)
  for _, c in ipairs(calls(f)) do
    if c.callee == callee and c.tail == (tail or false) then return c.a end
  end
  error("no " .. (tail and "tail " or "") .. "call to " .. callee)
end

local function upvalue(f, wanted)
  for i = 1, math.huge do
    local name, value = debug.getupvalue(f, i)
    if name == nil then error("no upvalue " .. wanted) end
    if name == wanted then return value end
  end
end

describe("#luajit the nginx transport's stack", function()
  it("calls nothing from wire.retrigger above register 27 (was 33), and reads at 12 (was 25)", function()
    local wire = require "flowservice.wire"
    assert.is_true(highest(wire.retrigger) <= 27, "highest call at " .. highest(wire.retrigger))
    assert.equals(12, at(wire.retrigger, "receiveany"))
  end)

  it("calls the first attempt from client:retrigger at register 5 (was 9), a tail call there", function()
    local flowservice = require "flowservice"
    local client = flowservice.new { access_token = "t", api_key = "k", org_id = "o@AdobeOrg",
      sandbox = "prod", base_url = "http://127.0.0.1:9" }
    local retrigger = client.retrigger
    assert.equals(5, at(retrigger, "first_attempt"))
    at(upvalue(retrigger, "first_attempt"), "retrigger", true) -- wire.retrigger's: raises if not a tail call
    client:close()
  end)
end)
