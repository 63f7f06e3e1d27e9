-- Waiting under cqueues: a call's wait function that sleeps in the cqueues
-- loop until the client's engine has something to do (its epoll fd turns
-- readable) or libcurl's next timer is due, instead of polling.
--
--   local client = flowservice.new { ..., wait = require("flowservice.cqueues").wait }
--   cq:wrap(function() local run, err = client:retrigger(id) end)
--
-- Needs lua-cqueues (Debian: lua-cqueues); loading this module without it raises.
local cqueues = require "cqueues"
local ngxwait = require "flowservice.ngx"

local poll, sleep = cqueues.poll, cqueues.sleep

local _M = {}

-- wait(seconds, fd): fd is the client's (client:fd()), or nil in a build
-- without epoll, where this sleeps like any polling waiter.
function _M.wait(seconds, fd)
  if fd then
    poll({ pollfd = fd, events = "r" }, seconds)
  else
    sleep(seconds)
  end
end

ngxwait.watches_fd(_M.wait)

return _M
