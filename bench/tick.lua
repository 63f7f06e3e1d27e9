-- The pump's tick with nothing ready: what one client:step() costs while
-- N re-triggers wait on a backend that answers after 30 s (the engine's
-- idle tick inside nginx, where the pump steps every 1 ms).
--
--   lua5.4 bench/tick.lua     from the repository root, after `make build`
-- Environment: BENCH_TICK_N [100,1000] transfers in flight, BENCH_TICK_STEPS [20000].
-- Before the epoll socket set (6d22e4a^), a step was curl_multi_perform
-- over every transfer; the README shows both, measured with this script
-- against a build of each (LUA_CPATH pointing at it).
package.path = "./?.lua;" .. package.path

local nginx = require "spec.support.nginx"
local core = require "flowservice.core"

local clock, getenv = os.clock, os.getenv
local format = string.format

local STEPS = tonumber(getenv("BENCH_TICK_STEPS") or "20000")
local SIZES = {}
for n in (getenv("BENCH_TICK_N") or "100,1000"):gmatch("%d+") do SIZES[#SIZES + 1] = tonumber(n) end

local backend = nginx.start { template = "bench/nginx_backend.conf.in", name = "bench_tick", vars = { DELAY = 30 } }
local ok, err = pcall(function()
  for _, n in ipairs(SIZES) do
    local opts = { access_token = "t", api_key = "k", org_id = "O@AdobeOrg", timeout = 60,
      base_url = "http://127.0.0.1:" .. backend.ports[1] }
    local c = core.new(opts)
    local held = {}
    for i = 1, n do held[i] = c:submit_retrigger("4fb0418e-1804-45d6-8d56-dd51f05c0baf", opts) end
    -- let every connection open and every request go out
    local t_end = core.now() + 3
    while core.now() < t_end do c:step() c:wait(0.01) end
    local running = c:step()
    local t0 = clock()
    for _ = 1, STEPS do c:step() end
    local us = (clock() - t0) / STEPS * 1e6
    print(format("in flight %5d (running %d): %.2f us CPU per idle step (%d steps)", n, running, us, STEPS))
    c:close()
  end
end)
backend:stop()
if not ok then error(err, 0) end
