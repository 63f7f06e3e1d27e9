/*
** spec_fork: a test-only Lua C module for specs that need a second process
** (built by `make testlib` into build/testlib/<5.4|5.3|5.1>/spec_fork.so;
** LuaJIT loads the 5.1 one; .busted puts those dirs on every profile's cpath).
**
**   local F = require "spec_fork"
**   F.fork()      -> pid in the parent, 0 in the child; raises if fork fails.
**                    The child is a copy of the whole busted process: open
**                    sockets, fds, the fake server's client side and stdio
**                    buffers included.
**   F.wait(pid)   -> the child's exit code (0..255), or 128 + signal number
**                    if a signal ended it (the shell's convention); blocks;
**                    raises if waitpid fails (no such child).
**   F.exit(code)  -> does not return: _exit(code), code defaulting to 0.
**                    No atexit handlers, no Lua finalizers, no stdio flush, so
**                    a child never writes busted's buffered output a second
**                    time or runs the rest of the suite. Every child must end
**                    with it, even when its body raises:
**                      local pid = F.fork()
**                      if pid == 0 then
**                        local ok = pcall(body)
**                        F.exit(ok and 0 or 1)
**                      end
**                      assert.equal(0, F.wait(pid))
**   F.getpid()    -> the calling process's pid.
**
** No global state; C99 and POSIX.1-2008 only.
*/
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"

static int f_fork(lua_State *L) {
  pid_t pid = fork();
  if (pid < 0)
    return luaL_error(L, "spec_fork: fork failed: %s", strerror(errno));
  lua_pushinteger(L, (lua_Integer)pid);
  return 1;
}

static int f_wait(lua_State *L) {
  lua_Number n = luaL_checknumber(L, 1);
  pid_t pid = (pid_t)n;
  int status;
  if (!(n >= 1 && (lua_Number)pid == n))
    return luaL_argerror(L, 1, "pid must be a positive whole number");
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR)
      return luaL_error(L, "spec_fork: waitpid(%d) failed: %s", (int)pid, strerror(errno));
  lua_pushinteger(L, WIFEXITED(status) ? WEXITSTATUS(status)
                     : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255);
  return 1;
}

static int f_exit(lua_State *L) {
  lua_Number code = luaL_optnumber(L, 1, 0);
  _exit(code >= 0 && code <= 255 ? (int)code : 255);
  return 0;  /* not reached */
}

static int f_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

int luaopen_spec_fork(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"fork", f_fork}, {"wait", f_wait}, {"exit", f_exit}, {"getpid", f_getpid},
    {NULL, NULL}
  };
  lua_createtable(L, 0, 4);
#if LUA_VERSION_NUM < 502
  luaL_register(L, NULL, funcs);
#else
  luaL_setfuncs(L, funcs, 0);
#endif
  return 1;
}
