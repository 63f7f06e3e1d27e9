/*
** Fuzz target 3: journal text -> the journal's fold (lua/flowservice/
** journal.lua), and the real open/append/read round trip through the C
** core's durable appends (src/journal.c). fuzz/journal.lua checks them.
*/
#include "harness.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = fuzz_init("journal", NULL);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_run(L, data, size);
  return 0;
}
