/*
** Fuzz target 5: the I/O Events webhook's border: flowservice.verify
** (src/verify.c, compiled in, over OpenSSL) with fuzzed keys, bodies and
** signatures, and the webhook's key-path and payload readers, in Lua.
** fuzz/webhook.lua checks them.
*/
#include "harness.h"

int luaopen_flowservice_verify(lua_State *L);

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  static const luaL_Reg extra[] = { {"open_verify", luaopen_flowservice_verify}, {NULL, NULL} };
  (void)argc;
  (void)argv;
  L = fuzz_init("webhook", extra);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_run(L, data, size);
  return 0;
}
