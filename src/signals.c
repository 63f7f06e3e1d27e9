/*
** A signal watcher for long jobs. Lua cannot handle signals, and a C
** handler would need global state; instead the watched signals are blocked
** and polled between steps of the job (POSIX: no handler, no fd, no
** global or static mutable variable):
**
**   core.signals(names)  -> watcher | nil, err
**                           names: a list among "INT", "TERM", "HUP", "QUIT"
**   watcher:pending()    -> "TERM" (one pending watched signal, consumed,
**                           so it is reported once) | nil | nil, err
**   watcher:close()      -> true | nil, err   (also __gc and __close)
**
** close() consumes the watched signals still pending, so they are not
** delivered the moment they are unblocked (lua.c turns a late SIGINT into
** an "interrupted!" error), then unblocks the signals this watcher blocked;
** a signal that was already blocked before the watcher stays blocked, and
** other changes made to the mask meanwhile are left alone. A signal that
** arrives after close() acts as usual. Idempotent.
**
** One watcher per Lua state at a time: core.signals() raises "flowservice:
** signals are already watched" until the first watcher is closed (a
** registry entry, so no C global; an abandoned watcher counts until it is
** collected). Nesting would need the watchers to be closed in order and
** would make them steal each other's signals.
**
** Fork: the watcher belongs to the process that made it. In a child (which
** inherited the blocked mask with the watcher), pending() raises and
** close()/__gc hand the mask back without consuming anything: they unblock
** what the watcher had blocked, so signals sent to the child act on it as
** if there had been no watcher, and the child can open its own.
**
** The mask is per thread (sigprocmask in the thread that runs Lua): threads
** started afterwards (libcurl's resolver) inherit it; threads that already
** run do not. A program exec'd while it is open inherits the mask (Debian's
** /bin/sh, which os.execute and io.popen run, clears it at startup).
*/
#define _POSIX_C_SOURCE 200809L  /* sigprocmask, sigpending, sigwait */

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "compat.h"
#include "signals.h"

#define FS_SIGNALS_MT "flowservice.signals"
#define FS_SIGNALS_ACTIVE "flowservice.signals.active"  /* { [1] = watcher }, weak */
#define FS_NSIGNALS 4

static const char *const signal_names[FS_NSIGNALS] = { "INT", "TERM", "HUP", "QUIT" };
static const int signal_numbers[FS_NSIGNALS] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT };

typedef struct fs_signals {
  unsigned watched;  /* bit k: signal_numbers[k] */
  unsigned added;    /* the watched ones this watcher blocked */
  pid_t pid;         /* the process that made it */
  int open;          /* 0 until blocked, and once closed */
} fs_signals;

/* nil, { kind = "signals", message = ... } */
static int signals_error(lua_State *L, const char *what, int err) {
  lua_pushnil(L);
  lua_createtable(L, 0, 2);
  lua_pushliteral(L, "signals");
  lua_setfield(L, -2, "kind");
  lua_pushfstring(L, "%s: %s", what, strerror(err));
  lua_setfield(L, -2, "message");
  return 2;
}

/* The set of the signals whose bits are set; 0 or an errno value. */
static int signals_set(unsigned bits, sigset_t *set) {
  int k;
  if (sigemptyset(set) != 0)
    return errno;
  for (k = 0; k < FS_NSIGNALS; k++)
    if ((bits & (1u << k)) && sigaddset(set, signal_numbers[k]) != 0)
      return errno;
  return 0;
}

/* Consumes one pending (and blocked) signal: returns at once. */
static int signals_take(int sig) {
  sigset_t one;
  int got;
  if (sigemptyset(&one) != 0 || sigaddset(&one, sig) != 0)
    return errno;
  return sigwait(&one, &got);  /* an error number, not errno */
}

/* Index k of the first pending watched signal, -1 for none; 0 or errno. */
static int signals_first_pending(unsigned watched, int *k) {
  sigset_t set;
  *k = -1;
  if (sigpending(&set) != 0)
    return errno;
  for (*k = 0; *k < FS_NSIGNALS; (*k)++) {
    int r;
    if (!(watched & (1u << *k)))
      continue;
    r = sigismember(&set, signal_numbers[*k]);
    if (r < 0)
      return errno;
    if (r == 1)
      return 0;
  }
  *k = -1;
  return 0;
}

/* The watcher at idx, or NULL (luaL_testudata is not in Lua 5.1). */
static fs_signals *signals_test(lua_State *L, int idx) {
  fs_signals *w = (fs_signals *)lua_touserdata(L, idx);
  int same;
  if (w == NULL || !lua_getmetatable(L, idx))
    return NULL;
  luaL_getmetatable(L, FS_SIGNALS_MT);
  same = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return same ? w : NULL;
}

/* The open watcher of this Lua state, left on the stack, or nothing. */
static fs_signals *signals_active(lua_State *L) {
  fs_signals *w = NULL;
  lua_getfield(L, LUA_REGISTRYINDEX, FS_SIGNALS_ACTIVE);
  if (lua_istable(L, -1)) {
    lua_rawgeti(L, -1, 1);
    w = (fs_signals *)signals_test(L, -1);
    lua_remove(L, -2);
    if (w == NULL || !w->open) {
      lua_pop(L, 1);
      return NULL;
    }
    return w;
  }
  lua_pop(L, 1);
  return NULL;
}

static int signals_open(lua_State *L) {
  unsigned watched = 0, added = 0;
  sigset_t set, old;
  fs_signals *w;
  int i, k, n, err;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (int)fs_rawlen(L, 1);
  if (n == 0)
    return luaL_argerror(L, 1, "expected a non-empty list of signal names");
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *name;
    lua_rawgeti(L, 1, i);
    if (lua_type(L, -1) != LUA_TSTRING)
      return luaL_argerror(L, 1, lua_pushfstring(L, "signal name %d is a %s, expected a string",
                                                 i, luaL_typename(L, -1)));
    name = lua_tolstring(L, -1, &len);
    for (k = 0; k < FS_NSIGNALS; k++)
      if (len == strlen(signal_names[k]) && memcmp(name, signal_names[k], len) == 0)
        break;
    if (k == FS_NSIGNALS)
      return luaL_argerror(L, 1, lua_pushfstring(L,
        "unknown signal name '%s' (expected INT, TERM, HUP or QUIT)", name));
    watched |= 1u << k;
    lua_pop(L, 1);
  }
  if (signals_active(L) != NULL)
    return luaL_error(L, "flowservice: signals are already watched");
  w = (fs_signals *)lua_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  luaL_getmetatable(L, FS_SIGNALS_MT);
  lua_setmetatable(L, -2);  /* from here on __gc unblocks what we block */
  w->watched = watched;
  w->pid = getpid();
  if (sigprocmask(SIG_BLOCK, NULL, &old) != 0)
    return signals_error(L, "cannot read the signal mask", errno);
  for (k = 0; k < FS_NSIGNALS; k++) {
    int r;
    if (!(watched & (1u << k)))
      continue;
    r = sigismember(&old, signal_numbers[k]);
    if (r < 0)
      return signals_error(L, "cannot read the signal mask", errno);
    if (r == 0)
      added |= 1u << k;
  }
  if ((err = signals_set(watched, &set)) != 0)
    return signals_error(L, "cannot make a signal set", err);
  if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
    return signals_error(L, "cannot block signals", errno);
  w->added = added;
  w->open = 1;
  lua_getfield(L, LUA_REGISTRYINDEX, FS_SIGNALS_ACTIVE);  /* remember it */
  if (lua_istable(L, -1)) {
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, 1);
  }
  lua_pop(L, 1);
  return 1;
}

static fs_signals *signals_check(lua_State *L) {
  fs_signals *w = (fs_signals *)luaL_checkudata(L, 1, FS_SIGNALS_MT);
  if (!w->open)
    luaL_error(L, "flowservice: signal watcher is closed");
  if (w->pid != getpid())
    luaL_error(L, "flowservice: signal watcher belongs to process %d, not to this one",
               (int)w->pid);
  return w;
}

static int signals_pending(lua_State *L) {
  fs_signals *w = signals_check(L);
  int k = -1, err;
  if ((err = signals_first_pending(w->watched, &k)) != 0)
    return signals_error(L, "cannot read pending signals", err);
  if (k < 0) {
    lua_pushnil(L);
    return 1;
  }
  if ((err = signals_take(signal_numbers[k])) != 0)
    return signals_error(L, "cannot consume a pending signal", err);
  lua_pushstring(L, signal_names[k]);
  return 1;
}

static int signals_close(lua_State *L) {
  fs_signals *w = (fs_signals *)luaL_checkudata(L, 1, FS_SIGNALS_MT);
  const char *what = NULL;
  sigset_t set;
  int err = 0;
  if (!w->open) {
    lua_pushboolean(L, 1);
    return 1;
  }
  w->open = 0;  /* once, whatever happens below */
  if (signals_active(L) == w) {  /* forget it */
    lua_pop(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, FS_SIGNALS_ACTIVE);
    lua_pushnil(L);
    lua_rawseti(L, -2, 1);
    lua_pop(L, 1);
  }
  if (w->pid == getpid()) {  /* a child never watched: it consumes nothing */
    int k = -1;
    for (;;) {
      if ((err = signals_first_pending(w->watched, &k)) != 0) {
        what = "cannot read pending signals";
        break;
      }
      if (k < 0)
        break;
      if ((err = signals_take(signal_numbers[k])) != 0) {
        what = "cannot consume a pending signal";
        break;
      }
    }
  }
  if (w->added != 0) {  /* unblock even when consuming failed */
    int e = signals_set(w->added, &set);
    if (e == 0 && sigprocmask(SIG_UNBLOCK, &set, NULL) != 0)
      e = errno;
    if (e != 0 && what == NULL) {
      what = "cannot unblock signals";
      err = e;
    }
  }
  if (what != NULL)
    return signals_error(L, what, err);
  lua_pushboolean(L, 1);
  return 1;
}

void fs_signals_register(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"pending", signals_pending}, {"close", signals_close}, {NULL, NULL}
  };
  luaL_newmetatable(L, FS_SIGNALS_MT);
  fs_setfuncs(L, methods, 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, signals_close);
  lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
  lua_pushcfunction(L, signals_close);
  lua_setfield(L, -2, "__close");
#endif
  lua_pop(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, FS_SIGNALS_ACTIVE);
  if (!lua_istable(L, -1)) {  /* weak, so an abandoned watcher can be collected */
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, FS_SIGNALS_ACTIVE);
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, signals_open);
  lua_setfield(L, -2, "signals");
}
