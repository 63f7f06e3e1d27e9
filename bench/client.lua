-- Contender: the module under test (see bench/subject.lua), N sequential
-- re-triggers.
--   lua5.4 bench/client.lua BASE_URL CAFILE N
-- Prints the line bench/run.lua parses: calls=N seconds=S etag=E label=L
-- Run from the repository root.
package.path = "./?.lua;" .. package.path

local subject = require "bench.subject"
local monotime = require("system").monotime

local assert, error, tonumber, tostring = assert, error, tonumber, tostring

local base, ca, n = arg[1], arg[2], tonumber(arg[3])
assert(base and ca and n, "usage: client.lua BASE_URL CAFILE N")

-- Client creation stays outside the clock, as the floor's handle setup does;
-- the first connection is inside it for every contender.
local s = subject.open(base, ca)
local call = s.call
local run, err
local start = monotime()
for _ = 1, n do
  run, err = call()
  if not run then error("call failed: " .. tostring(err)) end
end
local seconds = monotime() - start
s.close()

io.write(("calls=%d seconds=%.6f etag=%s label=%s\n"):format(n, seconds, run.etag, s.label))
