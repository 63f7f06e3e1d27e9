-- When a failed attempt may be repeated, and after how long: the one place
-- that decides it, for single calls and for the bulk job alike.
--
-- A re-trigger creates a run: it is repeated only when the service cannot
-- have acted on it (429, 401 401013, or the request never left this
-- machine). After a timeout, a dropped connection or a 5xx once it was
-- sent, the outcome is unknown: the error is returned marked ambiguous,
-- never repeated blindly (and the C core never lets libcurl resend it).
-- Reads (GET) and token requests are repeated on 429, 5xx and network errors.
local math_min, random = math.min, math.random

local _M = {}

_M.defaults = { attempts = 4, base_delay = 0.5, max_delay = 30 }

local RETRYABLE_STATUS = { [429] = true, [500] = true, [502] = true, [503] = true, [504] = true }

-- CURLE_SSL_CONNECT_ERROR: the handshake broke off; verification failures
-- (a wrong CA, a wrong host) would fail the same way again.
local TLS_HANDSHAKE_FAILED = 35

local function never_sent(err)
  if err.sent ~= false then return false end
  if err.kind == "tls" then return err.curl_code == TLS_HANDSHAKE_FAILED end
  return err.kind == "network" or err.kind == "timeout"
end

-- The verdict on a failed attempt:
--   "retry"      the service did not act: repeat (after err.retry_after or a backoff)
--   "refresh"    the token died early (401 401013) and can_refresh: a new token, then repeat
--   "ambiguous"  creates only: the run may exist now; never repeat blindly
--   "stop"       final
function _M.verdict(err, creates, can_refresh)
  if err.kind == "http" and err.status == 429 then return "retry" end
  if err.kind == "http" and err.status == 401 and err.code == "401013" then
    return can_refresh and "refresh" or "stop" -- a 401: nothing was done
  end
  if never_sent(err) then return "retry" end
  if creates then
    local after_send = err.kind == "timeout" or err.kind == "network"
      or (err.kind == "http" and err.status >= 500)
      or err.kind == "decode" -- a 2xx we could not read: it was probably done
    return after_send and "ambiguous" or "stop"
  end
  if err.kind == "network" or err.kind == "timeout" then return "retry" end
  if err.kind == "http" and RETRYABLE_STATUS[err.status] then return "retry" end
  return "stop"
end

-- Exponential backoff with full jitter, for the attempt that just failed.
function _M.backoff(policy, attempt)
  return random() * math_min(policy.max_delay, policy.base_delay * 2 ^ (attempt - 1))
end

return _M
