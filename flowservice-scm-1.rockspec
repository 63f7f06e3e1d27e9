rockspec_format = "3.0"
package = "flowservice"
version = "scm-1"
source = {
  url = "git+https://github.com/lua-flowservice/lua-flowservice.git",
}
description = {
  summary = "Re-trigger failed Adobe Experience Platform dataflow runs (Flow Service API)",
  detailed = [[
A Lua module with its HTTP core in C over libcurl: flowservice.retrigger(run_id, opts)
calls POST {base}/runs/{RUN_ID}/action?op=re-trigger on Adobe's Flow Service and returns
the new run's { id, etag }, or nil and a structured error. Needs libcurl 7.66.0 or later
(the build stops below it); 7.80.0 or later refuses libcurl's own resends of a re-trigger in
CURLOPT_PREREQFUNCTION, older ones give every re-trigger a fresh, never-reused connection.
]],
  homepage = "https://github.com/lua-flowservice/lua-flowservice",
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
  "lua-cjson >= 2.1.0",
  "argparse >= 0.7.1",
}
external_dependencies = {
  -- Only the library is looked up: Debian keeps curl.h under
  -- /usr/include/<multiarch>, which LuaRocks does not search but gcc does.
  -- Elsewhere, CURL_DIR (or CURL_INCDIR and CURL_LIBDIR) points at libcurl.
  CURL = { library = "curl" },
  -- flowservice.verify (the I/O Events webhook's signatures): OpenSSL's libcrypto
  CRYPTO = { library = "crypto" },
}
build = {
  type = "builtin",
  modules = {
    ["flowservice"] = "lua/flowservice.lua",
    ["flowservice.args"] = "lua/flowservice/args.lua",
    ["flowservice.auth"] = "lua/flowservice/auth.lua",
    ["flowservice.bulk"] = "lua/flowservice/bulk.lua",
    ["flowservice.bulk.spec"] = "lua/flowservice/bulk/spec.lua",
    ["flowservice.bulk.report"] = "lua/flowservice/bulk/report.lua",
    ["flowservice.bulk.job"] = "lua/flowservice/bulk/job.lua",
    ["flowservice.bulk.follow"] = "lua/flowservice/bulk/follow.lua",
    ["flowservice.bulk.learn"] = "lua/flowservice/bulk/learn.lua",
    ["flowservice.bulk.answer"] = "lua/flowservice/bulk/answer.lua",
    ["flowservice.bulk.rounds"] = "lua/flowservice/bulk/rounds.lua",
    ["flowservice.bulk.settle"] = "lua/flowservice/bulk/settle.lua",
    ["flowservice.bulk.flow"] = "lua/flowservice/bulk/flow.lua",
    ["flowservice.bulk.flows"] = "lua/flowservice/bulk/flows.lua",
    ["flowservice.cli"] = "lua/flowservice/cli.lua",
    ["flowservice.cli.hints"] = "lua/flowservice/cli/hints.lua",
    ["flowservice.cli.usage"] = "lua/flowservice/cli/usage.lua",
    ["flowservice.cli.values"] = "lua/flowservice/cli/values.lua",
    ["flowservice.cli.config"] = "lua/flowservice/cli/config.lua",
    ["flowservice.cli.output"] = "lua/flowservice/cli/output.lua",
    ["flowservice.cli.report"] = "lua/flowservice/cli/report.lua",
    ["flowservice.cli.progress"] = "lua/flowservice/cli/progress.lua",
    ["flowservice.cli.journals"] = "lua/flowservice/cli/journals.lua",
    ["flowservice.cli.job"] = "lua/flowservice/cli/job.lua",
    ["flowservice.cli.parser"] = "lua/flowservice/cli/parser.lua",
    ["flowservice.cli.commands"] = "lua/flowservice/cli/commands.lua",
    ["flowservice.cli.commands.retry_failed"] = "lua/flowservice/cli/commands/retry_failed.lua",
    ["flowservice.cli.commands.retrigger"] = "lua/flowservice/cli/commands/retrigger.lua",
    ["flowservice.cli.commands.watch"] = "lua/flowservice/cli/commands/watch.lua",
    ["flowservice.cli.commands.get_run"] = "lua/flowservice/cli/commands/get_run.lua",
    ["flowservice.cli.commands.list_runs"] = "lua/flowservice/cli/commands/list_runs.lua",
    ["flowservice.cli.commands.list_flows"] = "lua/flowservice/cli/commands/list_flows.lua",
    ["flowservice.cli.commands.journal"] = "lua/flowservice/cli/commands/journal.lua",
    ["flowservice.cli.commands.help"] = "lua/flowservice/cli/commands/help.lua",
    ["flowservice.cli.commands.completion"] = "lua/flowservice/cli/commands/completion.lua",
    ["flowservice.client"] = "lua/flowservice/client.lua",
    ["flowservice.credentials"] = "lua/flowservice/credentials.lua",
    ["flowservice.cqueues"] = "lua/flowservice/cqueues.lua",
    ["flowservice.errors"] = "lua/flowservice/errors.lua",
    ["flowservice.heal"] = "lua/flowservice/heal.lua",
    ["flowservice.journal"] = "lua/flowservice/journal.lua",
    ["flowservice.metrics"] = "lua/flowservice/metrics.lua",
    ["flowservice.ngx"] = "lua/flowservice/ngx.lua",
    ["flowservice.policy"] = "lua/flowservice/policy.lua",
    ["flowservice.retry"] = "lua/flowservice/retry.lua",
    ["flowservice.runs"] = "lua/flowservice/runs.lua",
    ["flowservice.webhook"] = "lua/flowservice/webhook.lua",
    ["flowservice.window"] = "lua/flowservice/window.lua",
    ["flowservice.wire"] = "lua/flowservice/wire.lua",
    ["flowservice.verify"] = {
      sources = { "src/verify.c" },
      libraries = { "crypto" },
      incdirs = { "$(CRYPTO_INCDIR)" },
      libdirs = { "$(CRYPTO_LIBDIR)" },
    },
    ["flowservice.core"] = {
      sources = { "src/core.c", "src/engine.c", "src/journal.c", "src/request.c",
                  "src/signals.c", "src/wire.c" },
      libraries = { "curl" },
      incdirs = { "$(CURL_INCDIR)" },
      libdirs = { "$(CURL_LIBDIR)" },
    },
  },
  install = { bin = { flowservice = "bin/flowservice" } },
  -- the man page, flowservice.1: DIR/lib/luarocks/rocks-5.x/flowservice/VERSION/doc/
  copy_directories = { "doc" },
}
test = {
  type = "command",
  command = "make test",
}
