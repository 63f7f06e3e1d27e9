rockspec_format = "3.0"
package = "flowservice-postgresql"
version = "0.2.0-1"
source = {
  url = "https://github.com/lua-flowservice/lua-flowservice/archive/refs/tags/v0.2.0.tar.gz",
  file = "lua-flowservice-0.2.0.tar.gz",
  dir = "lua-flowservice-0.2.0",
}
description = {
  summary = "PostgreSQL journal for lua-flowservice: exactly once across jobs and hosts",
  detailed = [[
The journal of client:retry_failed in PostgreSQL, shared by many jobs on many hosts: each run is
claimed in a transaction that commits before its re-trigger is sent. A C module over libpq's
asynchronous API (flowservice.pg) and its Lua backend (flowservice.journal_pg). Installed apart
from the main rock, so that a user without PostgreSQL needs no libpq.
]],
  homepage = "https://github.com/lua-flowservice/lua-flowservice",
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
  "flowservice",
}
external_dependencies = {
  -- Debian (libpq-dev) keeps libpq-fe.h in /usr/include/postgresql: PQ_INCDIR
  -- points there (`pg_config --includedir`); only the library is looked up.
  PQ = { library = "pq" },
}
build = {
  type = "builtin",
  modules = {
    ["flowservice.journal_pg"] = "lua/flowservice/journal_pg.lua",
    ["flowservice.pg"] = {
      sources = { "src/pg.c" },
      libraries = { "pq" },
      incdirs = { "$(PQ_INCDIR)" },
      libdirs = { "$(PQ_LIBDIR)" },
    },
  },
}
