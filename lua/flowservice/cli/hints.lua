-- What to do about an error whose cause is known: one "hint:" line beside
-- the error (never a secret: only the error's status and code are read).
local tostring, type = tostring, type

local _M = {}

-- hint(err, listing) -> text or nil; listing: the error answered a listing
-- (a 404 there means the base URL is wrong, not that a run is missing; so
-- does a 404 without an Adobe error code anywhere).
function _M.hint(err, listing)
  if type(err) ~= "table" then return nil end
  local code = err.code ~= nil and tostring(err.code) or nil
  if code == "401013" then
    return "the access token expired or is not valid: use client credentials (--credentials FILE,"
      .. " or --client-id, --client-secret-file and --scopes) so that it refreshes"
  elseif code == "403025" then
    return "check --org (AEP_ORG_ID): the organization does not match the credentials"
  elseif code == "403003" then
    return "check the API key (--api-key or AEP_API_KEY; by default the client id)"
  elseif err.status == 404 and (listing or code == nil) then -- no Adobe code: not its path
    return "the base URL (--url or FLOWSERVICE_URL) must end in /data/foundation/flowservice"
  end
  return nil
end

-- Write the hint for err, if there is one, once per hint.
function _M.show(ctx, err, listing)
  local text = _M.hint(err, listing)
  ctx.hinted = ctx.hinted or {}
  if text and not ctx.hinted[text] then
    ctx.hinted[text] = true
    ctx.stderr:write("hint: ", text, "\n")
  end
end

return _M
