#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lauxlib.h"
#include "lualib.h"

#include "harness.h"

#ifndef FUZZ_ROOT
#error "build with -DFUZZ_ROOT=\"/path/of/the/checkout\" (make fuzz does)"
#endif

int luaopen_flowservice_core(lua_State *L);

/*
** Lua line coverage: each (previous line, line) pair of a function in
** lua/ bumps a counter in libFuzzer's extra-counters section, so inputs
** that reach new Lua lines are kept like inputs that reach new C edges.
*/
#define FUZZ_LUA_COUNTERS 65536
__attribute__((section("__libfuzzer_extra_counters")))
static uint8_t lua_counters[FUZZ_LUA_COUNTERS];
static uintptr_t previous_line;

static void on_line(lua_State *L, lua_Debug *ar) {
  uintptr_t here;
  if (lua_getinfo(L, "S", ar) == 0 || ar->source[0] != '@')
    return;
  here = ((uintptr_t)ar->source * 31u) ^ (uintptr_t)ar->currentline * 2654435761u;
  lua_counters[(here ^ (previous_line >> 1)) % FUZZ_LUA_COUNTERS]++;
  previous_line = here;
}

/* fuzz.fail(why): a property does not hold. */
static int fuzz_fail(lua_State *L) {
  fprintf(stderr, "\nfuzz: property failed: %s\n", luaL_tolstring(L, 1, NULL));
  luaL_traceback(L, L, NULL, 1);
  fprintf(stderr, "%s\n", lua_tostring(L, -1));
  abort();
  return 0;
}

lua_State *fuzz_init(const char *name, const luaL_Reg *extra) {
  lua_State *L = luaL_newstate();
  if (L == NULL)
    abort();
  luaL_openlibs(L);
  /* the checkout's Lua sources, Debian's lua-cjson, our core */
  luaL_dostring(L, "package.path = '" FUZZ_ROOT "/lua/?.lua;" FUZZ_ROOT "/lua/?/init.lua'"
                   " package.cpath = '/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;"
                   "/usr/local/lib/lua/5.4/?.so'");
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_flowservice_core);
  lua_setfield(L, -2, "flowservice.core");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, fuzz_fail);
  lua_setfield(L, -2, "fail");
  lua_pushstring(L, FUZZ_ROOT);
  lua_setfield(L, -2, "root");
  for (; extra != NULL && extra->name != NULL; extra++) {
    lua_pushcfunction(L, extra->func);
    lua_setfield(L, -2, extra->name);
  }
  lua_setglobal(L, "fuzz");
  {
    char path[4096];
    snprintf(path, sizeof path, "%s/fuzz/%s.lua", FUZZ_ROOT, name);
    if (luaL_loadfile(L, path) != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK
        || lua_type(L, -1) != LUA_TFUNCTION) {
      fprintf(stderr, "fuzz: cannot load %s: %s\n", path, lua_tostring(L, -1));
      abort();
    }
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.driver");
  lua_sethook(L, on_line, LUA_MASKLINE, 0);
  return L;
}

void fuzz_run(lua_State *L, const uint8_t *data, size_t size) {
  lua_settop(L, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.driver");
  lua_pushlstring(L, (const char *)data, size);
  previous_line = 0;
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {  /* drivers catch what they expect */
    fprintf(stderr, "\nfuzz: the driver raised: %s\n", luaL_tolstring(L, -1, NULL));
    abort();
  }
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
}
