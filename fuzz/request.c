/*
** Fuzz target 1: an options table (and a request shape) -> the request
** builder of src/request.c, through flowservice.core as Lua calls it:
** core.new(opts), client:prepare_retrigger(run_id, opts) or
** client:submit(opts, shape), then transfer:cancel(). Nothing is sent:
** no transfer is ever driven. The URL and header lines are seen through
** the FS_FUZZING hooks of src/request.c; fuzz/request.lua checks them.
*/
#define _POSIX_C_SOURCE 200809L  /* strdup */

#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "harness.h"
#include "../src/request.h"

static lua_State *L;
static char *url;                     /* the last URL built */
static struct curl_slist *headers;    /* a copy of the last header list */

static void on_url(const char *built) {
  free(url);
  url = strdup(built);
}

static void on_headers(const struct curl_slist *list) {
  curl_slist_free_all(headers);
  headers = NULL;
  for (; list != NULL; list = list->next)
    headers = curl_slist_append(headers, list->data);
}

/* fuzz.wire() -> url, { header line, ... } of the last request built, then
** forgets them (nil, nil when none was built since). */
static int fuzz_wire(lua_State *L) {
  const struct curl_slist *h;
  int i = 1;
  if (url == NULL) {
    lua_pushnil(L);
    lua_pushnil(L);
    return 2;
  }
  lua_pushstring(L, url);
  lua_newtable(L);
  for (h = headers; h != NULL; h = h->next) {
    lua_pushstring(L, h->data);
    lua_rawseti(L, -2, i++);
  }
  free(url);
  url = NULL;
  curl_slist_free_all(headers);
  headers = NULL;
  return 2;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  static const luaL_Reg extra[] = {{"wire", fuzz_wire}, {NULL, NULL}};
  (void)argc;
  (void)argv;
  fs_fuzz_on_url = on_url;
  fs_fuzz_on_headers = on_headers;
  L = fuzz_init("request", extra);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_run(L, data, size);
  return 0;
}
