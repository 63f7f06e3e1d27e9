-- Learning how this server behaves, once, on a run re-triggered for sure:
-- whether it changes a run's etag when it re-triggers it, and whether it
-- links a run to its children. Settling (flowservice.bulk.settle) goes by it.
local policy = require "flowservice.policy"

local ipairs = ipairs
local children_of = policy.children_of

local _M = {}

function _M.learn(job, source_id, used_etag, new_id)
  local learned = job.state.learned
  if learned.etag_changes ~= nil and learned.linkage ~= nil then return true end
  local source = job.client:get_run(source_id)
  if not source then return true end -- try again on a later success
  local made = job.client:get_run(new_id)
  local children = children_of(source) or {}
  local linked = made and made.parentFlowRunId == source_id
  for _, id in ipairs(children) do linked = linked or id == new_id end
  return job:write { { learned = { etag_changes = source.etag ~= used_etag, linkage = linked and true or false } } }
end

return _M
