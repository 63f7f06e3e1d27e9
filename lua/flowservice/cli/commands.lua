-- The commands, in the order `flowservice --help` lists them. Adding one:
-- a module under flowservice/cli/commands/ returning { name, summary, usage,
-- examples, client, define, run } (see get_run.lua), and its line here (and
-- in the rockspec's modules).
return {
  "flowservice.cli.commands.retry_failed",
  "flowservice.cli.commands.retrigger",
  "flowservice.cli.commands.watch",
  "flowservice.cli.commands.get_run",
  "flowservice.cli.commands.list_runs",
  "flowservice.cli.commands.list_flows",
  "flowservice.cli.commands.journal",
  "flowservice.cli.commands.help",
  "flowservice.cli.commands.completion",
}
