/*
** Lua 5.1 / LuaJIT shims, so the rest of src/ reads as Lua 5.4 code.
** LuaJIT 2.1 already ships luaL_setfuncs and luaL_newlib: the shims carry
** their own names so they can never clash with its exported symbols.
*/
#ifndef FLOWSERVICE_COMPAT_H
#define FLOWSERVICE_COMPAT_H

#include "lua.h"
#include "lauxlib.h"

/* The release every C module of the project reports as _VERSION
** (spec/rock_spec.lua holds it to the release rockspec's version). */
#define FS_VERSION "0.2.0"

#if LUA_VERSION_NUM < 502

static inline void fs_compat_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  luaL_checkstack(L, nup + 1, "too many upvalues");
  for (; l->name != NULL; l++) {
    int i;
    for (i = 0; i < nup; i++)  /* copy upvalues to the top */
      lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}

#define fs_setfuncs fs_compat_setfuncs
#define fs_rawlen(L, i) lua_objlen((L), (i))
/* a userdata's one Lua value (a table): its environment on 5.1 */
#define fs_setuservalue(L, i) lua_setfenv((L), (i))
#define fs_getuservalue(L, i) lua_getfenv((L), (i))

#else

#define fs_setfuncs luaL_setfuncs
#define fs_rawlen(L, i) lua_rawlen((L), (i))
#if LUA_VERSION_NUM >= 504
#define fs_setuservalue(L, i) lua_setiuservalue((L), (i), 1)
#define fs_getuservalue(L, i) lua_getiuservalue((L), (i), 1)
#else
#define fs_setuservalue(L, i) lua_setuservalue((L), (i))
#define fs_getuservalue(L, i) lua_getuservalue((L), (i))
#endif

#endif

#endif
