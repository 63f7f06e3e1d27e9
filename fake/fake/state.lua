-- All the fake's module-level state, in one table, and what a reset puts
-- back. Every other module reads and writes this table; none keeps state of
-- its own (but util's math.random seed flag and behaviour defaults below).
--
-- That is sound only because fake/nginx.conf.in runs a single worker.

local pairs = pairs

local IMS_DEFAULT_EXPIRES_IN = 86399   -- seconds, as IMS answers

local state = {
  fixture_path = nil,
  fixture_text = nil,
  credentials = nil,   -- { access_tokens = set, api_keys = set, orgs = set, sandboxes = set }
  flows = nil,         -- id -> flow
  flow_list = nil,     -- the flows in fixture order (sandbox flows appended)
  runs = nil,          -- array of run objects, fixture order, new runs appended
  run_index = nil,     -- id -> run (every run in runs)
  scenarios = {},      -- FIFO queue
  requests = {},       -- request log, oldest first
  next_scenario_id = 1,
  ims_clients = nil,   -- client_id -> client_secret
  ims_tokens = {},     -- access token -> { expires = ngx.now() deadline, client_id, scope }
  ims_expires_in = IMS_DEFAULT_EXPIRES_IN,
  behaviour = nil,     -- see DEFAULT_BEHAVIOUR; set by reset
  retriggered = {},    -- id -> how many times re-triggered since reset
  chaos = nil,         -- chaos settings and generators; nil: off (POST /_fake/chaos)
  chaos_counts = nil,  -- faults dealt since chaos was set or reset
  witness = nil,       -- { journals = paths, caches = path -> cache }; nil: off
  witness_stats = nil, -- { checked, missing, missing_runs, errors }
  outcomes = nil,      -- how re-triggered runs finish (POST /_fake/outcomes); nil: never
  unfinished = {},     -- run id -> { run, flowId, outcome, finish_at (ngx.now() s) }:
                       -- re-triggered runs with an outcome, not finished yet
  executing = {},      -- flow id -> re-triggered runs not finished yet
  max_executing = {},  -- flow id -> the most of them at once, since reset
  sandbox = nil,       -- what POST /_fake/sandbox added (its answer); nil: nothing
  deliveries = {},     -- I/O Events deliveries since reset (emitter.lua), oldest first
  webhook = nil,       -- where failure events go on their own (POST /_fake/webhook); nil: nowhere
  emit_generation = 0, -- bumped by reset: deliveries of before stop retrying
  -- In-flight accounting. in_flight is never reset: handlers still running
  -- across a reset decrement it when they finish.
  in_flight = 0,
  stats = { max_in_flight = 0, posts = 0, gets = 0, retriggers = 0, ims = 0 },
}

state.IMS_DEFAULT_EXPIRES_IN = IMS_DEFAULT_EXPIRES_IN

-- The built-in behaviour defaults; every switch is listed here.
state.DEFAULT_BEHAVIOUR = {
  linkage = true,
  etag_changes = false,
  eligible_after_retrigger = true,
}
state.server_defaults = state.DEFAULT_BEHAVIOUR   -- init may override some

function state.default_behaviour()
  local b = {}
  for k, v in pairs(state.server_defaults) do b[k] = v end
  return b
end

-- What GET /_fake/stats reports of chaos and of the witness, from zero.
function state.chaos_zero_counts()
  return { drop_after = 0, status_502 = 0, throttle = 0, slow = 0, revoke = 0, get_502 = 0 }
end
function state.witness_zero_stats()
  return { checked = 0, missing = 0, missing_runs = {}, errors = {} }
end

-- Everything but the fixture-derived tables (the store reloads those).
function state.clear()
  state.scenarios = {}
  state.requests = {}
  state.ims_tokens = {}
  state.ims_expires_in = IMS_DEFAULT_EXPIRES_IN
  state.behaviour = state.default_behaviour()
  state.retriggered = {}
  state.stats = { max_in_flight = state.in_flight, posts = 0, gets = 0, retriggers = 0, ims = 0 }
  state.chaos = nil
  state.chaos_counts = state.chaos_zero_counts()
  state.witness = nil
  state.witness_stats = state.witness_zero_stats()
  state.outcomes = nil
  state.unfinished = {}
  state.executing = {}
  state.max_executing = {}
  state.sandbox = nil
  state.deliveries = {}
  state.webhook = nil
  state.emit_generation = state.emit_generation + 1
end

state.behaviour = state.default_behaviour()
state.chaos_counts = state.chaos_zero_counts()
state.witness_stats = state.witness_zero_stats()

return state
