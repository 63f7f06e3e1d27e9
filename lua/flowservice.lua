-- lua-flowservice: re-trigger failed Adobe Experience Platform dataflow runs.
-- The C core (flowservice.core) marshals options and runs the HTTP requests;
-- flowservice.client adds policy: retries, IMS tokens, the runs API.
local core = require "flowservice.core"
local client = require "flowservice.client"
local errors = require "flowservice.errors"
local args = require "flowservice.args"
local credentials = require "flowservice.credentials"

local _M = {
  _VERSION = core._VERSION,
  defaults = core.defaults, -- what the C core uses when an option is absent (a copy)
  curl_version = core.curl_version,
  is_error = errors.is_error,
  -- flowservice.credentials_from_file(path) -> options for new(), or nil, err
  credentials_from_file = credentials.from_file,
}

-- flowservice.new(opts) -> client (no I/O until the first call)
function _M.new(opts)
  return client.new(opts, 1, "new", 2)
end

-- Re-trigger one run: POST {base_url}/runs/{run_id}/action?op=re-trigger,
-- as a one-call client (same retry rules). Returns { id, etag } or nil, err.
function _M.retrigger(run_id, opts)
  args.run_id(run_id, 1, "retrigger", 2)
  local c = client.new(opts, 2, "retrigger", 2)
  -- no pcall (a wait may yield): if this raises, collecting c closes it
  local run, err = c:retrigger(run_id)
  c:close()
  return run, err
end

return _M
