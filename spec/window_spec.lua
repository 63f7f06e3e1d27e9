-- Time windows as people type them (flowservice.window), on a fixed "now".
local window = require "flowservice.window"

local NOW = 1796113946000 -- 2026-12-01T08:32:26Z
local DAY = 86400000

describe("flowservice.window", function()
  local function ms(text) return assert(window.parse(text, NOW)) end
  local function why(text)
    local v, err = window.parse(text, NOW)
    assert.is_nil(v)
    return err
  end

  it("reads durations before now", function()
    assert.equal(NOW - 30 * 60000, ms("30m"))
    assert.equal(NOW - 24 * 3600000, ms("24h"))
    assert.equal(NOW - 7 * DAY, ms("7d"))
    assert.equal(NOW, ms("0m"))
  end)

  it("reads today and yesterday as UTC midnights", function()
    assert.equal("2026-12-01T00:00:00Z", window.iso(ms("today")))
    assert.equal("2026-11-30T00:00:00Z", window.iso(ms("yesterday")))
  end)

  it("reads dates and ISO-8601 times with a zone", function()
    assert.equal("2026-11-30T00:00:00Z", window.iso(ms("2026-11-30")))
    assert.equal(1764547200000, ms("2025-12-01T00:00:00Z"))
    assert.equal(ms("2026-11-30T05:00:00Z"), ms("2026-11-30T07:00:00+02:00"))
    assert.equal(ms("2026-11-30T12:30:00Z"), ms("2026-11-30T07:00:00-05:30"))
    assert.equal(ms("2026-11-30T07:00:00Z"), ms("2026-11-30T07:00:00+0000"))
    assert.equal(ms("2026-11-30T07:00:00Z") + 250, ms("2026-11-30T07:00:00.25Z"))
    assert.equal(ms("2026-11-30T07:00:00Z") + 123, ms("2026-11-30T07:00:00.123456Z"))
    assert.equal("2024-02-29T00:00:00Z", window.iso(ms("2024-02-29")))
    assert.equal("2026-11-30T07:00:00.250Z", window.iso(ms("2026-11-30T07:00:00.25Z")))
  end)

  it("reads epoch milliseconds, and refuses what looks like epoch seconds", function()
    assert.equal(1764000000000, ms("1764000000000"))
    assert.equal(1764000000000, ms(1764000000000))
    assert.matches("1764000000 looks like epoch seconds; give epoch milliseconds %(1764000000000%)",
      why("1764000000"))
    assert.matches("looks like epoch seconds", why("99999999999"))
    assert.equal(100000000000, ms("100000000000"))
  end)

  it("refuses anything else, saying what it takes", function()
    for _, bad in ipairs { "", "now", "24 h", "1w", "-1d", "2026-02-30", "2025-02-29", "2026-13-01",
      "2026-11-30T24:00:00Z", "2026-11-30T07:00:00", "2026-11-30T07:00:00+25:00", "2026-11-30T07:00:00.Z",
      "2026-11-30 07:00:00Z", "1234567890123456789" } do
      assert.matches("is not a time", why(bad), 1, true)
    end
    assert.matches("must be a time, got table", why({}))
  end)

  it("describes a window", function()
    assert.equal("2026-11-30T07:00:00Z .. now", window.describe(ms("2026-11-30T07:00:00Z")))
    assert.equal("the beginning .. 2026-12-01T00:00:00Z", window.describe(nil, ms("today")))
  end)
end)
