-- The auto-heal webhook for examples/openresty/webhook.conf: one hook per
-- nginx, made in init_by_lua (before the fork), used by every worker.
--
--   init_by_lua_block        { require("flowservice_webhook").init() }      -- or .init(opts)
--   init_worker_by_lua_block { require("flowservice_webhook").resume() }
--   location = /adobe-events { content_by_lua_block { require("flowservice_webhook").handle() } }
--   location = /metrics      { content_by_lua_block { require("flowservice_webhook").metrics() } }
local flowservice = require "flowservice"
local webhook = require "flowservice.webhook"

local getenv = os.getenv

local _M = {}
local hook

-- opts: webhook.new's; without, from the environment the command reads
-- (AEP_CLIENT_ID, AEP_CLIENT_SECRET, AEP_SCOPES, AEP_ORG_ID, AEP_SANDBOX_NAME)
-- and FLOWSERVICE_JOURNAL (one journal for every flow: a PostgreSQL URI that
-- several nginx hosts share, needing the flowservice-postgresql rock, or a
-- path) or else FLOWSERVICE_JOURNAL_DIR (one file per flow, as the command keeps).
function _M.init(opts)
  if not opts then
    local dir = getenv("FLOWSERVICE_JOURNAL_DIR") or "/var/lib/flowservice"
    local client_id = getenv("AEP_CLIENT_ID")
    opts = {
      client = flowservice.new {
        org_id = getenv("AEP_ORG_ID"), sandbox = getenv("AEP_SANDBOX_NAME") or "prod",
        credentials = { client_id = client_id, client_secret = getenv("AEP_CLIENT_SECRET"),
          scopes = getenv("AEP_SCOPES") },
      },
      client_id = client_id, -- events carry it as recipient_client_id
      dict = "flowservice_webhook",
      heal = { journal = (getenv("FLOWSERVICE_JOURNAL") ~= "" and getenv("FLOWSERVICE_JOURNAL"))
        or function(flow_id) return dir .. "/" .. flow_id .. ".jsonl" end },
    }
  end
  hook = webhook.new(opts)
  return hook
end

function _M.hook() return hook end
function _M.handle() return hook:handle() end
function _M.metrics() return hook:metrics() end
function _M.resume() return hook:resume() end

return _M
