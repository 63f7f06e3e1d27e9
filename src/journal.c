/*
** Durable appends for the bulk job's journal. Lua's io library can neither
** fsync nor create a file 0600 atomically nor lock it, so this small piece
** lives in C:
**
**   core.journal_open(path) -> journal | nil, err   (exclusive, 0600, O_APPEND)
**   journal:append(text)    -> true | nil, err      (all of text, then fsync)
**   journal:close()                                  (also __gc and __close)
**
** A journal belongs to the process that opened it: after a fork the child
** shares the fd and its lock, so its append returns nil, err instead of
** writing lines its parent does not know of; its close (or __gc) closes
** only its own copy of the fd, never unlocks (flock would free the lock for
** the parent too).
*/
#define _DEFAULT_SOURCE  /* flock, O_CLOEXEC, O_DIRECTORY */

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "compat.h"
#include "journal.h"

#define FS_JOURNAL_MT "flowservice.journal"

typedef struct fs_journal {
  int fd;     /* -1 once closed */
  pid_t pid;  /* the process that opened it */
} fs_journal;

/* nil, { kind = "journal", message = ... } */
static int journal_error(lua_State *L, const char *what, const char *path, int err) {
  lua_pushnil(L);
  lua_createtable(L, 0, 2);
  lua_pushliteral(L, "journal");
  lua_setfield(L, -2, "kind");
  lua_pushfstring(L, "%s %s: %s", what, path, strerror(err));
  lua_setfield(L, -2, "message");
  return 2;
}

/* A file's name is durable only once its directory is synced: done on every
** open, since a name that an earlier crash left unsynced looks like any
** other. */
static int sync_parent_dir(const char *path) {
  char dir[4096];
  const char *slash = strrchr(path, '/');
  size_t len = slash == NULL ? 1 : slash == path ? 1 : (size_t)(slash - path);
  int fd, rc, err;
  if (len >= sizeof dir)
    return 0;  /* a path this long was opened fine; skip the extra sync */
  memcpy(dir, slash == NULL ? "." : path, len);
  dir[len] = '\0';
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  while ((rc = fsync(fd)) != 0 && errno == EINTR)
    ;
  err = errno;
  close(fd);
  errno = err;  /* fsync's, for the message */
  return rc;
}

/* Everything after open() that fails closes the fd (and so the lock) now,
** not at the next collection: the caller may retry at once. */
static int journal_abandon(fs_journal *j) {
  int err = errno;
  close(j->fd);
  j->fd = -1;
  return err;
}

static int journal_open(lua_State *L) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  fs_journal *j;
  if (len == 0 || memchr(path, '\0', len) != NULL)
    return luaL_argerror(L, 1, "journal path must be a non-empty string without NUL");
  j = (fs_journal *)lua_newuserdata(L, sizeof *j);
  j->fd = -1;
  j->pid = getpid();
  luaL_getmetatable(L, FS_JOURNAL_MT);
  lua_setmetatable(L, -2);  /* from here on __gc closes what we open */
  j->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (j->fd < 0)
    return journal_error(L, "cannot open journal", path, errno);
  if (flock(j->fd, LOCK_EX | LOCK_NB) != 0) {
    int err = journal_abandon(j);
    if (err == EWOULDBLOCK) {
      lua_pushnil(L);
      lua_createtable(L, 0, 2);
      lua_pushliteral(L, "journal");
      lua_setfield(L, -2, "kind");
      lua_pushfstring(L, "journal %s is in use by another job", path);
      lua_setfield(L, -2, "message");
      return 2;
    }
    return journal_error(L, "cannot lock journal", path, err);
  }
  if (sync_parent_dir(path) != 0) {
    int err = journal_abandon(j);
    return journal_error(L, "cannot sync the directory of journal", path, err);
  }
  return 1;
}

static fs_journal *journal_check(lua_State *L) {
  fs_journal *j = (fs_journal *)luaL_checkudata(L, 1, FS_JOURNAL_MT);
  if (j->fd < 0)
    luaL_error(L, "flowservice: journal is closed");
  return j;
}

/* All of text, then fsync: the lines are on disk when this returns true. */
static int journal_append(lua_State *L) {
  fs_journal *j = journal_check(L);
  size_t len, done = 0;
  const char *text = luaL_checklstring(L, 2, &len);
  if (j->pid != getpid()) {  /* a forked child: the lines would be its own */
    lua_pushnil(L);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "journal");
    lua_setfield(L, -2, "kind");
    lua_pushfstring(L, "journal belongs to process %d", (int)j->pid);
    lua_setfield(L, -2, "message");
    return 2;
  }
  while (done < len) {
    ssize_t n = write(j->fd, text + done, len - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return journal_error(L, "cannot write", "journal", n < 0 ? errno : EIO);
    done += (size_t)n;
  }
  while (fsync(j->fd) != 0)
    if (errno != EINTR)
      return journal_error(L, "cannot fsync", "journal", errno);
  lua_pushboolean(L, 1);
  return 1;
}

static int journal_close(lua_State *L) {
  fs_journal *j = (fs_journal *)luaL_checkudata(L, 1, FS_JOURNAL_MT);
  if (j->fd >= 0) {
    close(j->fd);  /* the opener's last copy releases the lock; a child's does not */
    j->fd = -1;
  }
  return 0;
}

void fs_journal_register(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"append", journal_append}, {"close", journal_close}, {NULL, NULL}
  };
  luaL_newmetatable(L, FS_JOURNAL_MT);
  fs_setfuncs(L, methods, 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, journal_close);
  lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
  lua_pushcfunction(L, journal_close);
  lua_setfield(L, -2, "__close");
#endif
  lua_pop(L, 1);
  lua_pushcfunction(L, journal_open);
  lua_setfield(L, -2, "journal_open");
}
