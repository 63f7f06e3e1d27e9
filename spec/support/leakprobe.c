/* A deliberately leaking Lua module: proves the valgrind step can go red. */
#include <stdlib.h>
#include <string.h>

#include "lua.h"

static int probe_leak(lua_State *L) {
  char *lost = malloc(4096);
  if (lost != NULL)
    memset(lost, 1, 4096);
  lua_pushboolean(L, lost != NULL);
  return 1;  /* lost goes out of scope: a definite leak */
}

int luaopen_leakprobe(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, probe_leak);
  lua_setfield(L, -2, "leak");
  return 1;
}
