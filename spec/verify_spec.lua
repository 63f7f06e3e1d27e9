-- flowservice.verify: RSA-SHA256 in C over OpenSSL's EVP API, against keys
-- and signatures the openssl CLI makes.
local verify = require "flowservice.verify"
local signing = require "spec.support.signing"

describe("flowservice.verify.rsa_sha256", function()
  local keys
  local body = '{"event_id":"e-1","event":{"header":{}},"recipient_client_id":"c"}\n'

  setup(function() keys = signing.make() end)
  teardown(function() signing.remove(keys) end)

  it("accepts a signature of the exact bytes, wrapped in lines or not", function()
    assert.is_true(verify.rsa_sha256(keys.public, body, keys:sign(body)))
    assert.is_true((verify.rsa_sha256(keys.public, body, keys:sign(body, nil, true))))
    local binary = "\0\1\2\255" .. body
    assert.is_true((verify.rsa_sha256(keys.public, binary, keys:sign(binary))))
  end)

  it("refuses a body changed by one byte, or with a newline less", function()
    local sig = keys:sign(body)
    local ok, why = verify.rsa_sha256(keys.public, body:gsub("e%-1", "e-2"), sig)
    assert.is_false(ok)
    assert.equal("the signature does not verify", why)
    assert.is_false((verify.rsa_sha256(keys.public, body:sub(1, -2), sig)))
  end)

  it("refuses another key's signature, and a signature under another key", function()
    assert.is_false((verify.rsa_sha256(keys.public, body, keys:sign(body, keys.other_private_path))))
    assert.is_false((verify.rsa_sha256(keys.other_public, body, keys:sign(body))))
  end)

  it("says why for what is not a signature", function()
    local cases = {
      { "", "the signature is empty" },
      { "not base64 !!", "the signature is not base64" },
      { "AAAA", "the signature does not verify" },
      { ("A"):rep(2049), "the signature is too large" },
    }
    for _, c in ipairs(cases) do
      local ok, why = verify.rsa_sha256(keys.public, body, c[1])
      assert.is_false(ok)
      assert.equal(c[2], why)
    end
  end)

  it("refuses keys that are not RSA public keys of 2048 bits or more", function()
    local sig = keys:sign(body)
    local rsa1024, rsa1024_key = keys:odd_public("rsa1024")
    local ec = keys:odd_public("ec")
    local cases = {
      { "", "the key is not a PEM public key" },
      { "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "the key is not a PEM public key" },
      { keys.public:gsub("PUBLIC", "PRIVATE"), "the key is not a PEM public key" },
      { ec, "the key is not an RSA key" },
      { rsa1024, "the RSA key is shorter than 2048 bits" },
      { keys.public .. ("x"):rep(16384), "the key is too large" },
    }
    for _, c in ipairs(cases) do
      local ok, why = verify.rsa_sha256(c[1], body, sig)
      assert.is_false(ok)
      assert.equal(c[2], why)
    end
    -- the short key's own signature is refused for its size, not its bytes
    local _, why = verify.rsa_sha256(rsa1024, body, keys:sign(body, rsa1024_key))
    assert.equal("the RSA key is shorter than 2048 bits", why)
  end)

  -- fuzz/webhook: OpenSSL compares a PEM's BEGIN line as a C string, so a
  -- NUL after "PUBLIC KEY" passed; a key with a NUL byte is refused first.
  it("refuses a key with a NUL byte (its BEGIN line cut short)", function()
    local sig = keys:sign(body)
    local cut = keys.public:gsub("BEGIN PUBLIC KEY%-%-%-%-%-", "BEGIN PUBLIC KEY\0\0\0-----", 1)
    local ok, why = verify.rsa_sha256(cut, body, sig)
    assert.is_false(ok)
    assert.equal("the key is not a PEM public key", why)
    assert.is_false((verify.rsa_sha256(keys.public .. "\0", body, sig)))
    assert.is_true((verify.rsa_sha256("leading text\n" .. keys.public, body, sig)))
  end)

  it("refuses a message past max_message without reading it", function()
    local big = ("x"):rep(verify.max_message + 1)
    local ok, why = verify.rsa_sha256(keys.public, big, keys:sign(body))
    assert.is_false(ok)
    assert.equal("the message is too large", why)
    local exact = ("y"):rep(verify.max_message)
    assert.is_true((verify.rsa_sha256(keys.public, exact, keys:sign(exact))))
  end)

  it("raises on arguments that are not strings", function()
    assert.has_error(function() verify.rsa_sha256(nil, body, "AAAA") end)
    assert.has_error(function() verify.rsa_sha256(keys.public, {}, "AAAA") end)
    local ok, err = pcall(verify.rsa_sha256, keys.public, body)
    assert.is_false(ok)
    assert.matches("bad argument #3 to", err)
  end)

  it("many checks in a row leave nothing behind (one key parse a call)", function()
    local sig = keys:sign(body)
    for _ = 1, 200 do
      assert.is_true((verify.rsa_sha256(keys.public, body, sig)))
      assert.is_false((verify.rsa_sha256(keys.public, body .. "x", sig)))
      assert.is_false((verify.rsa_sha256("junk", body, sig)))
    end
  end)

  it("reports its OpenSSL", function()
    assert.matches("^OpenSSL %d", verify.openssl_version)
    assert.is_string(verify._VERSION)
  end)
end)
