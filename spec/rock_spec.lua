-- The release as LuaRocks users get it: `make rock` packs
-- build/rock/flowservice-VERSION-1.src.rock (luarocks pack); that rock alone
-- installs into an empty tree with --deps-mode=none (Debian's lua-cjson
-- and lua-argparse serve the dependencies) and the command runs from it.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local flowservice = require "flowservice"

local q = h.q

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"exit=$?\"")
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)\n$"))
  return code, (out:gsub("exit=%d+\n$", ""))
end

-- a rockspec's fields, read as LuaRocks reads them (a Lua chunk of assignments)
local function rockspec(path)
  local t = {}
  local chunk = assert(loadfile and (setfenv and loadfile(path) or loadfile(path, "t", t)))
  if setfenv then setfenv(chunk, t) end
  chunk()
  return t
end

describe("the source rock (make rock)", function()
  local tmp

  setup(function()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -m 700 " .. q(tmp)))
  end)
  teardown(function() os.execute("rm -rf " .. q(tmp)) end)

  it("the release rockspec matches the scm one but for version and source", function()
    local scm, release = rockspec("flowservice-scm-1.rockspec"), rockspec("rockspecs/flowservice-"
      .. flowservice._VERSION .. "-1.rockspec")
    assert.equal(flowservice._VERSION .. "-1", release.version)
    assert.same(scm.dependencies, release.dependencies)
    assert.same(scm.build, release.build)
    assert.matches("/v" .. flowservice._VERSION:gsub("%.", "%%.") .. "%.tar%.gz$", release.source.url)
  end)

  it("packs, installs on its own into an empty tree with --deps-mode=none, and runs", function()
    local code, out = sh("make --no-print-directory rock")
    assert.equal(0, code, out)
    local rock = "build/rock/flowservice-" .. flowservice._VERSION .. "-1.src.rock"
    local tree = tmp .. "/tree"
    code, out = sh("cd " .. q(tmp) .. " && luarocks --lua-version=5.4 install --tree=" .. q(tree)
      .. " --deps-mode=none " .. q(os.getenv("PWD") .. "/" .. rock))
    assert.equal(0, code, out)
    code, out = sh("env -i PATH=/usr/bin:/bin " .. q(tree .. "/bin/flowservice") .. " --version")
    assert.equal(0, code, out)
    assert.equal(("flowservice %s (libcurl %s)\n"):format(flowservice._VERSION, flowservice.curl_version), out)
    local server = fake.start()
    local ok, failure = pcall(function()
      code, out = sh("env -i PATH=/usr/bin:/bin HOME=" .. q(tmp) .. " AEP_ACCESS_TOKEN=" .. q(fake.credentials.access_token)
        .. " AEP_API_KEY=" .. q(fake.credentials.api_key) .. " AEP_ORG_ID=" .. q(fake.credentials.org)
        .. " FLOWSERVICE_URL=" .. q(server.url) .. " " .. q(tree .. "/bin/flowservice") .. " retrigger --no-journal "
        .. h.runs.failed)
      assert.equal(0, code, out)
      assert.matches("^" .. h.literal(h.runs.failed) .. " %-> ", out)
      assert.equal(1, server:stats().retriggers)
    end)
    server:stop()
    assert(ok, failure)
    local man = tree .. "/lib/luarocks/rocks-5.4/flowservice/" .. flowservice._VERSION .. "-1/doc/flowservice.1"
    assert.truthy(h.read(man), "no man page in the tree")
  end)
end)
