/*
** Fuzz target 4: the command's time-window parser (cli.parse_time) and
** the listing's paging-link reader (runs.next_token), in Lua.
** fuzz/parsers.lua checks them.
*/
#include "harness.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = fuzz_init("parsers", NULL);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_run(L, data, size);
  return 0;
}
