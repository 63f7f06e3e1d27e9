-- I/O Events deliveries made by the suite: a payload as Adobe sends it,
-- signed with the suite's key pair (spec/support/signing.lua, openssl CLI),
-- POSTed to a webhook with curl (not the code under test).
local cjson = require "cjson"
local nginx = require "spec.support.nginx"

local q, capture, write_file = nginx.util.quote, nginx.util.capture, nginx.util.write_file

local _M = {}

_M.KEY1, _M.KEY2 = "/prod/keys/pub-key-suite1.pem", "/prod/keys/pub-key-suite2.pem"

local counter = 0
function _M.event_id()
  counter = counter + 1
  return ("suite-%d-%d"):format(os.time(), counter)
end

-- The payload of a "flow run failed" event for run (table with id, flowId).
-- opts: code (default sources_flow_run_failed), meta (true: the code in
-- _eventNotificationMeta.type instead of the header), recipient, event_id.
function _M.payload(run, opts)
  opts = opts or {}
  local event = { body = { id = run.id, flowId = run.flowId, sandboxName = "prod" } }
  if opts.meta then
    event = { id = run.id, flowId = run.flowId,
      _eventNotificationMeta = { type = opts.code or "sources_flow_run_failure" } }
  else
    event.header = { _adobeio = { eventCode = opts.code or "sources_flow_run_failed",
      providerMetadata = "platform_notifications" } }
  end
  return cjson.encode { event_id = opts.event_id, event = event,
    recipient_client_id = opts.recipient }
end

-- Headers Adobe sends with body, signed by keys (signature 1 with the
-- suite key, signature 2 with the other pair); overrides replace any.
function _M.headers(keys, body, event_id, overrides)
  local h = {
    ["x-adobe-event-id"] = event_id,
    ["x-adobe-digital-signature-1"] = keys:sign(body),
    ["x-adobe-digital-signature-2"] = keys:sign(body, keys.other_private_path),
    ["x-adobe-public-key1-path"] = _M.KEY1,
    ["x-adobe-public-key2-path"] = _M.KEY2,
    ["content-type"] = "application/json",
  }
  for k, v in pairs(overrides or {}) do
    if v == false then h[k] = nil else h[k] = v end
  end
  return h
end

local function curl_args(dir, n, url, body, headers)
  local file = ("%s/event-%d.json"):format(dir, n)
  write_file(file, body)
  local args = { "-X POST", "--data-binary @" .. q(file) }
  for k, v in pairs(headers) do args[#args + 1] = "-H " .. q(k .. ": " .. v) end
  args[#args + 1] = q(url)
  return table.concat(args, " ")
end

-- POST one event: status, body, seconds, worker pid (X-Worker-Pid).
function _M.post(dir, url, body, headers)
  local out = capture(("curl -s --noproxy '*' --max-time 10 -D %s/hdr -o %s/resp -w '%%{http_code} %%{time_total}' %s")
    :format(dir, dir, curl_args(dir, 0, url, body, headers)))
  local code, secs = out:match("(%d+) ([%d%.]+)")
  local hdr = capture("cat " .. q(dir .. "/hdr"))
  return tonumber(code), capture("cat " .. q(dir .. "/resp")), tonumber(secs),
    tonumber(hdr:match("[Xx]%-[Ww]orker%-[Pp]id: (%d+)"))
end

-- POST many at once (curl --parallel, one config file): a list of { code, seconds }.
function _M.post_parallel(dir, url, list, max)
  local cfg = {}
  for i, e in ipairs(list) do
    local file = ("%s/event-%d.json"):format(dir, i)
    write_file(file, e.body)
    cfg[#cfg + 1] = ('url = "%s"\noutput = "/dev/null"\nrequest = "POST"\ndata-binary = "@%s"'
      .. '\nnoproxy = "*"\nmax-time = 20\nsilent\nwrite-out = "%%{http_code} %%{time_total}\\n"'):format(url, file)
    for k, v in pairs(e.headers) do cfg[#cfg + 1] = ('header = "%s: %s"'):format(k, v) end
    cfg[#cfg + 1] = i < #list and "next" or ""
  end
  write_file(dir .. "/parallel.cfg", table.concat(cfg, "\n"))
  local out = capture(("curl -s --parallel --parallel-immediate --parallel-max %d -K %s 2>/dev/null")
    :format(max or 50, q(dir .. "/parallel.cfg")))
  local results = {}
  for code, secs in out:gmatch("(%d+) ([%d%.]+)") do results[#results + 1] = { tonumber(code), tonumber(secs) } end
  return results
end

return _M
