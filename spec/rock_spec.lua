-- The release as LuaRocks users get it: `make rock` packs
-- build/rock/flowservice-VERSION-1.src.rock (luarocks pack); that rock alone
-- installs into an empty tree with --deps-mode=none (Debian's lua-cjson
-- and lua-argparse serve the dependencies) and the command runs from it.
local fake = require "spec.support.fake"
local h = require "spec.support.helpers"
local flowservice = require "flowservice"

local q = h.q

-- where libpq-fe.h is (as the Makefile finds it)
local PQ_INCDIR = (function()
  local p = io.popen("pg_config --includedir 2>/dev/null")
  local dir = p and p:read("*l")
  if p then p:close() end
  return dir and dir ~= "" and dir or "/usr/include/postgresql"
end)()

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

  it("the PostgreSQL journal's release rockspec matches its scm one but for version and source", function()
    local scm = rockspec("flowservice-postgresql-scm-1.rockspec")
    local release = rockspec("rockspecs/flowservice-postgresql-" .. flowservice._VERSION .. "-1.rockspec")
    assert.equal("flowservice-postgresql", release.package)
    assert.equal(flowservice._VERSION .. "-1", release.version)
    assert.same(scm.dependencies, release.dependencies)
    assert.same(scm.external_dependencies, release.external_dependencies)
    assert.same(scm.build, release.build)
    assert.same(scm.description, release.description)
    assert.same(rockspec("rockspecs/flowservice-" .. flowservice._VERSION .. "-1.rockspec").source, release.source)
  end)

  it("packs the PostgreSQL journal's rock too, which installs beside the main one and loads libpq", function()
    local code, out = sh("make --no-print-directory rock")
    assert.equal(0, code, out)
    local tree = tmp .. "/pg-tree"
    for _, name in ipairs { "flowservice", "flowservice-postgresql" } do
      local rock = os.getenv("PWD") .. "/build/rock/" .. name .. "-" .. flowservice._VERSION .. "-1.src.rock"
      code, out = sh("cd " .. q(tmp) .. " && luarocks --lua-version=5.4 install --tree=" .. q(tree)
        .. " --deps-mode=none " .. q(rock) .. " PQ_INCDIR=" .. q(PQ_INCDIR))
      assert.equal(0, code, out)
    end
    -- only the tree (and Debian's lua-cjson): the journal's modules and libpq's own checks
    code, out = sh("env -i PATH=/usr/bin:/bin lua5.4 -e " .. q(([[
      package.path = "%s/share/lua/5.4/?.lua;/usr/share/lua/5.4/?.lua"
      package.cpath = "%s/lib/lua/5.4/?.so;/usr/lib/x86_64-linux-gnu/lua/5.4/?.so"
      local pg = require "flowservice.pg"
      assert(package.searchpath("flowservice.pg", package.cpath):find("%s", 1, true))
      require "flowservice.journal_pg"
      io.write(tostring(pg.conninfo_check("postgresql://u:secret@127.0.0.1/db")), " ",
        tostring(pg.conninfo_check("postgresql://u@127.0.0.1/db")))]]):format(tree, tree, tree)))
    assert.equal(0, code, out)
    assert.equal("true false", out)
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
