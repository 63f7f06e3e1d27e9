/*
** flowservice.pg: a thin, non-blocking face of libpq for the PostgreSQL
** journal (lua/flowservice/journal_pg.lua owns the SQL and the policy).
**
**   pg.connect(conninfo)      -> conn | nil, message   (PQconnectStart)
**   pg.conninfo_check(conninfo) -> has_password | nil, message  (PQconninfoParse)
**   pg.hostname()             -> this host's name
**   conn:connect_poll()       -> "read" | "write" | "ok" | nil, message
**   conn:fd()                 -> the connection's socket
**   conn:send(sql, params)    -> true | nil, message    (PQsendQueryParams, text;
**                                params[i] a string, or false for NULL; params.n)
**   conn:flush()              -> true (all sent) | false (more) | nil, message
**   conn:consume()            -> busy | nil, message    (PQconsumeInput, PQisBusy)
**   conn:result()             -> result | false (no more)
**                                result: { ok = bool, rows = { {col = text} }, affected,
**                                          sqlstate, message }
**   conn:poll(for_write, seconds) -> ready | nil, message   (poll(2) on the socket)
**   conn:close()                  (also __gc and __close)
**
** Nothing here blocks except conn:poll, which the caller uses only when it
** has no wait function of its own. Messages are libpq's: the Lua side
** scrubs them before they leave the module. No global mutable state.
*/
#define _POSIX_C_SOURCE 200809L  /* gethostname */

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "compat.h"

#define FS_PG_MT "flowservice.pg.conn"
#define FS_PG_MAX_PARAMS 64

typedef struct fs_pg {
  PGconn *conn;   /* NULL once closed */
  PGresult *res;  /* the result being handed to Lua, cleared on the next call */
} fs_pg;

static void pg_clear(fs_pg *c) {
  if (c->res != NULL) {
    PQclear(c->res);
    c->res = NULL;
  }
}

/* nil, message (libpq's, trailing newline cut) */
static int pg_fail(lua_State *L, const char *what, const char *msg) {
  size_t len = msg ? strlen(msg) : 0;
  while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
    len--;
  lua_pushnil(L);
  lua_pushstring(L, what);
  if (len > 0) {
    lua_pushliteral(L, ": ");
    lua_pushlstring(L, msg, len);
    lua_concat(L, 3);
  }
  return 2;
}

static fs_pg *pg_check(lua_State *L) {
  fs_pg *c = (fs_pg *)luaL_checkudata(L, 1, FS_PG_MT);
  if (c->conn == NULL)
    luaL_error(L, "flowservice: PostgreSQL connection is closed");
  return c;
}

static const char *pg_conninfo_arg(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (memchr(s, '\0', len) != NULL)
    luaL_argerror(L, 1, "connection string must not hold NUL");
  return s;
}

static int pg_conninfo_check(lua_State *L) {
  const char *conninfo = pg_conninfo_arg(L);
  char *errmsg = NULL;
  PQconninfoOption *opts = PQconninfoParse(conninfo, &errmsg), *o;
  int has_password = 0;
  if (opts == NULL) {
    char msg[512];  /* copied out, so no Lua error can leak errmsg */
    msg[0] = '\0';
    if (errmsg != NULL) {
      strncpy(msg, errmsg, sizeof msg - 1);
      msg[sizeof msg - 1] = '\0';
      PQfreemem(errmsg);
    }
    return pg_fail(L, "cannot read the connection string", msg[0] ? msg : "out of memory");
  }
  for (o = opts; o->keyword != NULL; o++)
    if (strcmp(o->keyword, "password") == 0 && o->val != NULL && o->val[0] != '\0')
      has_password = 1;
  PQconninfoFree(opts);
  lua_pushboolean(L, has_password);
  return 1;
}

/* libpq prints NOTICEs on stderr by default: the journal's own, not the user's */
static void pg_quiet(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

static int pg_connect(lua_State *L) {
  const char *conninfo = pg_conninfo_arg(L);
  fs_pg *c = (fs_pg *)lua_newuserdata(L, sizeof *c);
  c->conn = NULL;
  c->res = NULL;
  luaL_getmetatable(L, FS_PG_MT);
  lua_setmetatable(L, -2);  /* from here on __gc frees what we make */
  c->conn = PQconnectStart(conninfo);
  if (c->conn == NULL)
    return pg_fail(L, "cannot connect to PostgreSQL", "out of memory");
  if (PQstatus(c->conn) == CONNECTION_BAD)
    return pg_fail(L, "cannot connect to PostgreSQL", PQerrorMessage(c->conn));
  PQsetNoticeProcessor(c->conn, pg_quiet, NULL);
  if (PQsetnonblocking(c->conn, 1) != 0)
    return pg_fail(L, "cannot make the PostgreSQL connection non-blocking", PQerrorMessage(c->conn));
  return 1;
}

static int pg_connect_poll(lua_State *L) {
  fs_pg *c = pg_check(L);
  switch (PQconnectPoll(c->conn)) {
    case PGRES_POLLING_READING: lua_pushliteral(L, "read"); return 1;
    case PGRES_POLLING_WRITING: lua_pushliteral(L, "write"); return 1;
    case PGRES_POLLING_OK: lua_pushliteral(L, "ok"); return 1;
    default: return pg_fail(L, "cannot connect to PostgreSQL", PQerrorMessage(c->conn));
  }
}

static int pg_fd(lua_State *L) {
  fs_pg *c = pg_check(L);
  int fd = PQsocket(c->conn);
  if (fd < 0)
    return pg_fail(L, "PostgreSQL connection has no socket", PQerrorMessage(c->conn));
  lua_pushinteger(L, fd);
  return 1;
}

static int pg_send(lua_State *L) {
  fs_pg *c = pg_check(L);
  const char *sql = luaL_checkstring(L, 2);
  const char *values[FS_PG_MAX_PARAMS];
  lua_Integer n = 0, i;
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_getfield(L, 3, "n");
  if (lua_type(L, -1) != LUA_TNUMBER)
    return luaL_argerror(L, 3, "params.n must be the number of parameters");
  n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (n < 0 || n > FS_PG_MAX_PARAMS)
    return luaL_argerror(L, 3, "params.n out of range");
  luaL_checkstack(L, (int)n, "too many parameters");
  for (i = 1; i <= n; i++) {  /* the strings stay on the stack until sent */
    lua_rawgeti(L, 3, (int)i);
    if (lua_type(L, -1) == LUA_TSTRING) {
      values[i - 1] = lua_tostring(L, -1);
    } else if (lua_isnil(L, -1) || (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
      values[i - 1] = NULL;
    } else {
      return luaL_argerror(L, 3, "parameters must be strings, or false for NULL");
    }
  }
  pg_clear(c);
  if (!PQsendQueryParams(c->conn, sql, (int)n, NULL, values, NULL, NULL, 0))
    return pg_fail(L, "cannot send the query", PQerrorMessage(c->conn));
  lua_pushboolean(L, 1);
  return 1;
}

static int pg_flush(lua_State *L) {
  fs_pg *c = pg_check(L);
  int rc = PQflush(c->conn);
  if (rc < 0)
    return pg_fail(L, "cannot send to PostgreSQL", PQerrorMessage(c->conn));
  lua_pushboolean(L, rc == 0);
  return 1;
}

static int pg_consume(lua_State *L) {
  fs_pg *c = pg_check(L);
  if (!PQconsumeInput(c->conn))
    return pg_fail(L, "lost the connection to PostgreSQL", PQerrorMessage(c->conn));
  lua_pushboolean(L, PQisBusy(c->conn));
  return 1;
}

static void pg_field(lua_State *L, fs_pg *c, const char *key, int code) {
  const char *v = PQresultErrorField(c->res, code);
  if (v != NULL) {
    lua_pushstring(L, v);
    lua_setfield(L, -2, key);
  }
}

static int pg_result(lua_State *L) {
  fs_pg *c = pg_check(L);
  ExecStatusType st;
  int nrows, ncols, r, k;
  pg_clear(c);
  c->res = PQgetResult(c->conn);  /* held by c until the next call: an error longjmp leaks nothing */
  if (c->res == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  st = PQresultStatus(c->res);
  lua_createtable(L, 0, 4);
  lua_pushboolean(L, st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
  lua_setfield(L, -2, "ok");
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
    pg_field(L, c, "sqlstate", PG_DIAG_SQLSTATE);
    pg_field(L, c, "message", PG_DIAG_MESSAGE_PRIMARY);
    if (PQresultErrorField(c->res, PG_DIAG_MESSAGE_PRIMARY) == NULL) {
      lua_pushstring(L, PQresultErrorMessage(c->res));
      lua_setfield(L, -2, "message");
    }
    pg_clear(c);
    return 1;
  }
  nrows = PQntuples(c->res);
  ncols = PQnfields(c->res);
  lua_createtable(L, nrows, 0);
  for (r = 0; r < nrows; r++) {
    lua_createtable(L, 0, ncols);
    for (k = 0; k < ncols; k++) {
      if (PQgetisnull(c->res, r, k))
        continue;
      lua_pushlstring(L, PQgetvalue(c->res, r, k), (size_t)PQgetlength(c->res, r, k));
      lua_setfield(L, -2, PQfname(c->res, k));
    }
    lua_rawseti(L, -2, r + 1);
  }
  lua_setfield(L, -2, "rows");
  {
    const char *affected = PQcmdTuples(c->res);
    if (affected != NULL && affected[0] != '\0') {
      lua_pushinteger(L, (lua_Integer)strtol(affected, NULL, 10));
      lua_setfield(L, -2, "affected");
    }
  }
  pg_clear(c);
  return 1;
}

static int pg_poll(lua_State *L) {
  fs_pg *c = pg_check(L);
  int for_write = lua_toboolean(L, 2);
  lua_Number seconds = luaL_checknumber(L, 3);
  struct pollfd p;
  int ms, rc;
  if (!(seconds >= 0))
    return luaL_argerror(L, 3, "seconds must be >= 0");
  ms = seconds * 1000 > INT_MAX ? INT_MAX : (int)(seconds * 1000);
  p.fd = PQsocket(c->conn);
  if (p.fd < 0)
    return pg_fail(L, "PostgreSQL connection has no socket", PQerrorMessage(c->conn));
  p.events = for_write ? POLLOUT : POLLIN;
  p.revents = 0;
  rc = poll(&p, 1, ms);
  if (rc < 0 && errno != EINTR)
    return pg_fail(L, "cannot poll the PostgreSQL socket", strerror(errno));
  lua_pushboolean(L, rc > 0);
  return 1;
}

static int pg_close(lua_State *L) {
  fs_pg *c = (fs_pg *)luaL_checkudata(L, 1, FS_PG_MT);
  pg_clear(c);
  if (c->conn != NULL) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  return 0;
}

static int pg_hostname(lua_State *L) {
  char name[256];
  if (gethostname(name, sizeof name) != 0)
    return pg_fail(L, "cannot read the host name", strerror(errno));
  name[sizeof name - 1] = '\0';
  lua_pushstring(L, name);
  return 1;
}

int luaopen_flowservice_pg(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"connect_poll", pg_connect_poll}, {"fd", pg_fd}, {"send", pg_send}, {"flush", pg_flush},
    {"consume", pg_consume}, {"result", pg_result}, {"poll", pg_poll}, {"close", pg_close},
    {NULL, NULL}
  };
  static const luaL_Reg functions[] = {
    {"connect", pg_connect}, {"conninfo_check", pg_conninfo_check}, {"hostname", pg_hostname},
    {NULL, NULL}
  };
  luaL_newmetatable(L, FS_PG_MT);
  fs_setfuncs(L, methods, 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, pg_close);
  lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
  lua_pushcfunction(L, pg_close);
  lua_setfield(L, -2, "__close");
#endif
  lua_pop(L, 1);
  lua_createtable(L, 0, 4);
  fs_setfuncs(L, functions, 0);
  lua_pushliteral(L, FS_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_pushinteger(L, PQlibVersion());
  lua_setfield(L, -2, "libpq_version");
  return 1;
}
