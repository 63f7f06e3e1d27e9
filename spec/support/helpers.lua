-- Small things every spec needs: valid options for a fake server, fixture
-- run ids, the suite's one monotonic clock (spec/support/nginx.lua's:
-- luasystem, which busted itself depends on, else /proc/uptime).
local fake = require "spec.support.fake"
local nginx = require "spec.support.nginx"

local _M = {}

_M.creds = fake.credentials

-- Runs of fake/runs.json, by what they are good for.
_M.runs = {
  failed = "4fb0418e-1804-45d6-8d56-dd51f05c0baf",
  failed_mixed_case = "7cb50575-f551-4357-ae96-9dd3a00a4260",
  success_no_records = "85207196-0b5a-4a30-810d-652a7c9bba19",
  success_with_records = "74bf93af-1a48-495c-a676-129b8c7c88fa",
  in_progress = "4b4d9994-47a0-49a4-a74c-4fae634d1444",
  disabled_flow = "6f04fa55-31e7-4f05-9b82-9ff5a7d1f6f3",
  streaming_flow = "dad368aa-a84e-4222-b76e-1da9ba55b673",
  unknown = "00000000-0000-4000-8000-000000000000",
}

-- Options that the fake accepts, pointed at base_url, with overrides.
function _M.opts(base_url, extra)
  local o = {
    access_token = _M.creds.access_token,
    api_key = _M.creds.api_key,
    org_id = _M.creds.org,
    sandbox = _M.creds.sandbox,
    base_url = base_url,
    timeout = 10,
  }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

_M.now = nginx.util.monotonic
-- luasystem's sleep (no process per call), else the shell's
local has_system, system = pcall(require, "system")
_M.sleep = has_system and system.sleep or nginx.util.sleep

-- Shell and file helpers the specs share (spec/support/nginx.lua's).
_M.q = nginx.util.quote           -- a shell word, single-quoted
_M.alive = nginx.util.alive       -- a process that has not exited (zombies count as gone)
_M.read = nginx.util.read_file    -- whole file, or nil
_M.write = nginx.util.write_file

-- os.execute's exit status, the same on Lua 5.1 (a number) and 5.2+.
function _M.sh(cmd)
  local ok, _, code = os.execute(cmd)
  if type(ok) == "number" then return ok end
  return ok and 0 or code
end

-- s as a Lua pattern that matches itself (run ids have dashes).
function _M.literal(s)
  return (tostring(s):gsub("%p", "%%%0"))
end

-- The ids of the bulk flow's failed runs (all of them eligible).
function _M.bulk_failed_ids()
  local ids = {}
  for i = 1, fake.bulk_runs.failed.count do ids[#ids + 1] = fake.bulk_run_id(i, "failed") end
  return ids
end

-- A fresh journal path under /tmp (not created).
function _M.tmp_journal()
  local p = assert(io.popen("mktemp -u /tmp/flowservice-journal.XXXXXX"))
  local path = p:read("*l") .. ".jsonl"
  p:close()
  return path
end

-- A loopback port where nothing listens: bound by nobody, below the
-- ephemeral range, and refused at once.
-- Waits up to seconds for pid to exit; true once it has.
function _M.wait_gone(pid, seconds)
  local deadline = _M.now() + seconds
  while _M.alive(pid) and _M.now() < deadline do _M.sleep(0.02) end
  return not _M.alive(pid)
end

_M.closed_port = 9

return _M
