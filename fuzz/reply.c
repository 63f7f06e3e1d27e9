/*
** Fuzz target 2: a reply -> a result, through the real readers: the
** header callback (Retry-After, Date) and the body callback (max_body) of
** src/engine.c, then call_results of src/core.c (the 2xx decoder and the
** plain error table), then errors.from_core and tostring in Lua
** (fuzz/reply.lua checks them).
**
** Those readers are static and run only inside a libcurl transfer, and
** a fuzzer opens no sockets: this file includes engine.c and core.c to
** call them directly on an fs_call it fills itself, as libcurl would.
** (So this target links the other sources only; see the Makefile.)
*/
#include "../src/engine.c"
#include "../src/core.c"

#include "harness.h"

static lua_State *L;

/* fuzz.reply(kind, status, header_lines, body_chunks, max_body) -> what
** transfer:result() would return. kind: "run" (a re-trigger) or "raw". */
static int fuzz_reply(lua_State *L) {
  fs_call c;
  size_t i, n, len;
  memset(&c, 0, sizeof c);
  c.kind = strcmp(luaL_checkstring(L, 1), "run") == 0 ? FS_RUN_ACTION : FS_RAW;
  c.request_id = (char *)"fuzz-request-id";
  c.t.status = (long)luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  c.t.max_body = (size_t)luaL_checkinteger(L, 5);
  c.t.retry_after = -1;  /* as fs_transfer_prepare leaves it */
  c.t.sent = 1;
  n = (size_t)lua_rawlen(L, 3);
  for (i = 1; i <= n; i++) {
    const char *line;
    lua_rawgeti(L, 3, (lua_Integer)i);
    line = luaL_checklstring(L, -1, &len);
    /* libcurl's buffer is not NUL-terminated: give the callback a copy
    ** of exactly len bytes, so ASan sees any read past it */
    {
      char *copy = (char *)malloc(len ? len : 1);
      if (copy == NULL)
        abort();
      memcpy(copy, line, len);
      if (transfer_on_header(copy, 1, len, &c.t) != len)
        abort();  /* the header callback never stops a transfer */
      free(copy);
    }
    lua_pop(L, 1);
  }
  n = (size_t)lua_rawlen(L, 4);
  for (i = 1; i <= n && c.t.result == CURLE_OK; i++) {
    const char *chunk;
    char *copy;
    lua_rawgeti(L, 4, (lua_Integer)i);
    chunk = luaL_checklstring(L, -1, &len);
    copy = (char *)malloc(len ? len : 1);
    if (copy == NULL)
      abort();
    memcpy(copy, chunk, len);
    if (transfer_on_body(copy, 1, len, &c.t) != len)
      c.t.result = CURLE_WRITE_ERROR;  /* what libcurl makes of a short write */
    free(copy);
    lua_pop(L, 1);
  }
  c.t.done = 1;
  lua_settop(L, 0);
  return call_results(L, &c, 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = fuzz_init("reply", NULL);
  /* with the upvalues core.c's functions have: decoder, user agent */
  lua_getglobal(L, "fuzz");
  push_decoder(L);
  lua_pushliteral(L, "lua-flowservice/fuzz");
  lua_pushcclosure(L, fuzz_reply, 2);
  lua_setfield(L, -2, "reply");
  lua_pop(L, 1);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_run(L, data, size);
  return 0;
}
