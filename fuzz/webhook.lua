-- Fuzz driver 5 (fuzz/webhook.c): the webhook's border, one way per input
-- by its first byte (the rest is the fuzzed part):
--   0  a body, checked against a fixed key and the signature of a fixed
--      body: verifies exactly when it is that body
--   1  a signature of the fixed body: never a raise; false comes with one of
--      verify's reasons; the real signature verifies
--   2  a key: the same; only a key that holds the fixed RSA key (modulus and
--      exponent) verifies
--   3  a key path and a payload: webhook.key_segments gives nil or the
--      path's plain segments (no ".", "..", empty or odd byte; .pem at the
--      end; joined back they are the path); event_code and run_id_of of the
--      input read as JSON give nil or a string (a run id: letters, digits,
--      - _ . ~, at most 128), never a raise
package.preload["flowservice.verify"] = fuzz.open_verify
local verify = require "flowservice.verify"
local webhook = require "flowservice.webhook"
local decode = require("cjson.safe").new().decode

local format, concat = string.format, table.concat
local pcall, tostring, type = pcall, tostring, type
local fail = fuzz.fail

local KEY = "-----BEGIN PUBLIC KEY-----\n"
  .. "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA2XC3rwDMh1/fipUrsRsL\n"
  .. "Nfc9DU1tX7Kw19/2M98EWRb4dCqmuNL63G5zIU6XI808XptqFE/X++AHFXg+Ir47\n"
  .. "RNt4AKsxioAJfTXwh0HlzyX/eYDXaHDxwh7R0KVFpP0OMhpp85cHH4KGr6IaLE77\n"
  .. "mpu+axEQXieMpr8BtCsjx9MeGEl2a3bC5YfDPQsbHRG2CZxP9wYh1Cz9u3mGSja+\n"
  .. "sXIy5jtAMGEhlBPyvCJAvNDzhdX43EaRWlELhQYseKfvaDndEEg8jI8gHlE6Lhug\n"
  .. "7hL9kMpMfyXxpEVBSrhUdsghlqQ7lhNly7/0aQ3KZynTxC6UueLFGO6xJThG2I+P\n"
  .. "dQIDAQAB\n"
  .. "-----END PUBLIC KEY-----"
local SIG = "uwlWKnjtj1uD/iyepVSKVQqTYSYkqTFmJ62p0m4AOserZXNTICYQa+80s9Nk6b2+1af/rFMbVNM9HOOH8KCB8qNluGS4tRL5"
  .. "8i7AneAc2oTIhQo5F5fZHiawvQI/b9In0A3tZkVgcxDVeuluR4HvHmU97mWuHCMKQjK/7vry8AK7MQMyLDYuA919G4NMQaYI"
  .. "OFo8bim4XaEM1rvRszCAa0KTGQ6dr4Tz86+Dle3d/LWW+cLVeIyaLwpbSK1Oxlnfs8RuScgAVetKXVELnOCaHchhfcdmvlTs"
  .. "9l8YVqzlfKnENX1K3w2PxMqk7EXr+3KM5QNBQUQTgnKz3bIH/NUtNg=="
local BODY = '{"event_id":"fuzz-1","event":{"header":{"_adobeio":{"eventCode":"sources_flow_run_failed"}},"bod'
  .. 'y":{"id":"4fb0418e-1804-45d6-8d56-dd51f05c0baf","flowId":"fb5d688d-7698-4db6-a45e-8d510fa38dba"}'
  .. '},"recipient_client_id":"fuzz-client"}'

local REASONS = {
  ["the key is too large"] = true, ["the signature is too large"] = true,
  ["the message is too large"] = true, ["the signature is empty"] = true,
  ["the signature is not base64"] = true, ["the key is not a PEM public key"] = true,
  ["the key is not an RSA key"] = true, ["the RSA key is shorter than 2048 bits"] = true,
  ["the signature does not verify"] = true, ["the signature could not be checked"] = true,
  ["out of memory"] = true,
}

-- The bytes of a PEM's first PUBLIC KEY block (whitespace dropped; a plain
-- decoder: the driver must not lean on the code under test).
local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function der_of(pem)
  -- the first PUBLIC KEY block, as PEM_read_bio_PUBKEY looks for it
  local inner = pem:match("%-%-%-%-%-BEGIN PUBLIC KEY%-%-%-%-%-(.-)%-%-%-%-%-END") or ""
  local text = inner:gsub("[^%w%+/]", "")
  local out, bits, n = {}, 0, 0
  for i = 1, #text do
    bits = bits * 64 + (ALPHABET:find(text:sub(i, i), 1, true) - 1)
    n = n + 6
    if n >= 8 then
      n = n - 8
      local byte = math.floor(bits / 2 ^ n)
      out[#out + 1] = string.char(byte)
      bits = bits - byte * 2 ^ n
    end
  end
  return table.concat(out)
end
-- The RSAPublicKey inside the fixed key's SubjectPublicKeyInfo (after its
-- AlgorithmIdentifier and the BIT STRING's header): modulus and exponent.
-- OpenSSL reads rsaEncryption's parameters leniently (the fuzzer found a
-- SET where the NULL goes, taken), so only this part must be there.
local RSA_KEY = der_of(KEY):sub(25)

local function check(what, key, body, sig)
  local ok, good, why = pcall(verify.rsa_sha256, key, body, sig)
  if not ok then fail(format("%s: rsa_sha256 raised: %s", what, tostring(good))) end
  if good == true then return true end
  if good ~= false or not REASONS[why] then
    fail(format("%s: rsa_sha256 gave %s, %s", what, tostring(good), tostring(why)))
  end
  return false
end

local function check_path(path)
  local ok, segs = pcall(webhook.key_segments, path)
  if not ok then fail("key_segments raised: " .. tostring(segs)) end
  if segs == nil then return end
  if "/" .. concat(segs, "/") ~= path or not path:match("%.pem$") then
    fail(format("key_segments(%q) took it", path))
  end
  for _, s in ipairs(segs) do
    if s == "." or s == ".." or not s:match("^[%w%-_%.]+$") then
      fail(format("key_segments(%q): segment %q", path, s))
    end
  end
end

local function check_payload(text)
  local doc = decode(text)
  if type(doc) ~= "table" then return end
  local ok, code = pcall(webhook.event_code, doc)
  if not ok or (code ~= nil and type(code) ~= "string") then fail("event_code: " .. tostring(code)) end
  local ok2, id = pcall(webhook.run_id_of, doc)
  if not ok2 then fail("run_id_of raised: " .. tostring(id)) end
  if id ~= nil and (type(id) ~= "string" or #id > 128 or not id:match("^[%w%-_%.~]+$")) then
    fail(format("run_id_of gave %q", tostring(id)))
  end
end

if not check("seed", KEY, BODY, SIG) then fail("the fixed signature does not verify") end

return function(input)
  local mode, rest = (input:byte(1) or 0) % 4, input:sub(2)
  if mode == 0 then
    if check("body", KEY, rest, SIG) ~= (rest == BODY) then
      fail(format("body %q verified wrongly", rest))
    end
  elseif mode == 1 then
    local good = check("signature", KEY, BODY, rest)
    if rest == SIG and not good then fail("the real signature failed") end
  elseif mode == 2 then
    local good = check("key", rest, BODY, SIG)
    if good and not der_of(rest):find(RSA_KEY, 1, true) then fail(format("key %q verified", rest)) end
    if rest == KEY and not good then fail("the real key failed") end
  else
    check_path(rest)
    check_payload(rest)
  end
end
