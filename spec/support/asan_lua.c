/*
** A Lua 5.4 interpreter linked with AddressSanitizer, for the ASan run of the
** suite (make test-asan). Linking the sanitizer into the interpreter, not
** LD_PRELOADing it, keeps it out of the processes the tests start (curl,
** nginx, sh). Usage: asan-lua SCRIPT [ARGS...], with `arg` as lua.c sets it.
*/
#include <stdio.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

static int traceback(lua_State *L) {
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int i, status;
  if (L == NULL || argc < 2) {
    fprintf(stderr, "usage: %s SCRIPT [ARGS...]\n", argv[0]);
    return 2;
  }
  luaL_openlibs(L);
  lua_createtable(L, argc - 2, 2);  /* arg: [-1] interpreter, [0] script, [1..] args */
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  lua_pushcfunction(L, traceback);
  status = luaL_loadfile(L, argv[1]);
  if (status == LUA_OK) {
    for (i = 2; i < argc; i++)
      lua_pushstring(L, argv[i]);
    status = lua_pcall(L, argc - 2, 0, 1);
  }
  if (status != LUA_OK)
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
