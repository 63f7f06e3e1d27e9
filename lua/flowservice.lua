-- lua-flowservice: re-trigger failed Adobe Experience Platform dataflow runs.
-- The C core (flowservice.core) marshals options and runs the HTTP request;
-- this face turns its plain errors into error objects.
local core = require "flowservice.core"
local errors = require "flowservice.errors"

local _M = {
  _VERSION = core._VERSION,
  defaults = core.defaults, -- what the C core uses when an option is absent (informational copy)
  curl_version = core.curl_version,
  is_error = errors.is_error,
}

-- Re-trigger one run: POST {base_url}/runs/{run_id}/action?op=re-trigger.
-- Returns { id = new run id, etag = ... } or nil, err (see README).
function _M.retrigger(run_id, opts)
  local run, err = core.retrigger(run_id, opts)
  if run then return run end
  return nil, errors.from_core(err, errors.secrets_of(opts))
end

return _M
