/*
** flowservice.core: the Lua-facing side of the C module.
**
**   retrigger(run_id, opts)       one call on a fresh engine (blocking)
**   new(opts [, token_later])     a client: an engine whose connections last
**   client:retrigger(run_id, opts [, lean]) / client:request(opts, shape)
**                                 blocking (retrigger: false for a bad run
**                                 id; lean: no request id on success)
**     (a run action's opts nil: the client's own, as new() checked them)
**   client:submit_retrigger(...) / client:submit(...) -> transfer  non-blocking
**   client:prepare_retrigger(...) -> transfer, built but not yet sent
**   client:step() / client:wait(s) / client:timeout() / client:close()
**   client:fd() / client:pump()   for event loops: the epoll set, a step
**   transfer:submit() / transfer:done() / transfer:result([lean]) / transfer:cancel()
**   transfer:watch() -> key; client:step(list) lists finished watched keys
**
** A run action (re-trigger) is never sent twice: a resend libcurl would
** make on a dead reused connection is refused (core.resend_guard).
**
** Lua sees only finished results: no Lua runs while libcurl works.
*/
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compat.h"
#include "engine.h"
#include "journal.h"
#include "request.h"
#include "signals.h"
#include "wire.h"

#define FS_CLIENT_MT "flowservice.client"
#define FS_TRANSFER_MT "flowservice.transfer"
#define FS_UV_DECODE lua_upvalueindex(1)  /* cjson.safe.new().decode */
#define FS_UV_USER_AGENT lua_upvalueindex(2)  /* the default User-Agent */
#define FS_UV_CLIENT_MT lua_upvalueindex(3)   /* the classes' metatables: */
#define FS_UV_TRANSFER_MT lua_upvalueindex(4) /* checked without a lookup by name */
#define FS_UPVALUES 4

/* The userdata at idx if its metatable is the one at upvalue mt (every
** call on a client or a transfer checks its self: compared with the
** metatable the function holds, not looked up by name each time); else
** luaL_checkudata's verdict (and its message) on it. */
static void *check_class(lua_State *L, int idx, int mt, const char *name) {
  void *p = lua_touserdata(L, idx);
  if (p != NULL && lua_getmetatable(L, idx)) {
    int same = lua_rawequal(L, -1, mt);
    lua_pop(L, 1);
    if (same)
      return p;
  }
  return luaL_checkudata(L, idx, name);
}

enum { FS_RUN_ACTION, FS_RAW };

/*
** A transfer owned by Lua: freed by __gc whatever happens to the call.
** What an nginx-transport call reads and writes once its reply comes is
** first, together (with the transfer's own such fields, engine.h): the
** reply reader, then the transfer. A call's own target is read only when
** it has one (targeted).
*/
typedef struct fs_call {
  int kind;
  int taken;          /* its result was handed to Lua */
  int targeted;       /* wire_target holds strings (a base_url not its client's) */
  char *request_id;   /* the x-request-id sent: id_buf, or malloc'd when longer */
  fs_wire *wire;      /* the reply reader of an nginx-transport transfer, or NULL */
  fs_wire wire_state; /* where wire points */
  fs_transfer t;
  char id_buf[40];
  fs_wire_target wire_target;  /* where its request went, unless its client's */
} fs_call;

typedef struct fs_client {
  fs_engine engine;
  fs_url_cache urls;
  fs_template *tmpl;  /* its run actions' constant part (request.h) */
  fs_bytes wire_bytes;  /* the nginx transport's request pieces, put together */
  /* the blocking calls' transfer, reused from call to call (plain memory,
  ** freed with the client); busy while a call uses it (a finalizer that
  ** makes a blocking call meanwhile gets a transfer of its own), and left
  ** busy by a call that raised (its transfer stays the engine's until close) */
  fs_call *scratch;
  int scratch_busy;
  /* the nginx transport's plain calls' reply reader (client:wire_reply),
  ** the same way: busy while a reply is read, left busy by one that raised */
  fs_call *wire_scratch;
  int wire_scratch_busy;
  int closed;
} fs_client;


/* ---------------------------------------------------------------------
** Results
*/

static void set_string(lua_State *L, const char *key, const char *value) {
  lua_pushstring(L, value);
  lua_setfield(L, -2, key);
}

static void set_integer(lua_State *L, const char *key, long long value) {
  lua_pushinteger(L, (lua_Integer)value);
  lua_setfield(L, -2, key);
}

static void set_boolean(lua_State *L, const char *key, int value) {
  lua_pushboolean(L, value);
  lua_setfield(L, -2, key);
}

static void set_body(lua_State *L, const fs_transfer *t) {
  lua_pushlstring(L, t->body ? t->body : "", t->body_len);
  lua_setfield(L, -2, "body");
}

static const char *transport_error_kind(const fs_transfer *t) {
  switch (t->result) {
    case CURLE_OPERATION_TIMEDOUT:
      return "timeout";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_USE_SSL_FAILED:
      return "tls";
    case CURLE_FILESIZE_EXCEEDED:
      return "decode";
    case CURLE_WRITE_ERROR:  /* our body callback aborted on purpose */
      return t->too_large ? "decode" : "network";
    default:
      return "network";
  }
}

/* What every result and error says about the exchange itself. */
static void set_exchange(lua_State *L, const fs_call *c) {
  const fs_transfer *t = &c->t;
  set_string(L, "request_id", c->request_id);
  if (t->date[0] != '\0') {
    time_t when = curl_getdate(t->date, NULL);
    if (when != (time_t)-1)
      set_integer(L, "date", (long long)when);
  }
}

/* The common fields of every error: the Lua face adds Adobe's reading. */
static void push_error(lua_State *L, const fs_call *c, const char *kind) {
  lua_createtable(L, 0, 8);
  set_string(L, "kind", kind);
  set_boolean(L, "sent", c->t.sent);
  set_exchange(L, c);
}

FS_COLD static int push_transport_error(lua_State *L, const fs_call *c) {
  const fs_transfer *t = &c->t;
  lua_pushnil(L);
  push_error(L, c, transport_error_kind(t));
  if (t->resend_refused)
    lua_pushliteral(L, "the connection died after the request went out, before any reply;"
                    " libcurl's resend was refused (the run may have been created)");
  else if (t->too_large || t->result == CURLE_FILESIZE_EXCEEDED)
    lua_pushfstring(L, "reply too large: more than max_body (%d bytes)", (int)t->max_body);
  else if (t->out_of_memory)
    lua_pushliteral(L, "out of memory while reading the reply");
  else
    lua_pushstring(L, t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->result));
  lua_setfield(L, -2, "message");
  set_integer(L, "curl_code", (long long)t->result);
  return 2;
}

FS_COLD static int push_http_error(lua_State *L, const fs_call *c, const char *kind) {
  lua_pushnil(L);
  push_error(L, c, kind);
  set_integer(L, "status", c->t.status);
  set_body(L, &c->t);
  if (c->t.retry_after >= 0)
    set_integer(L, "retry_after", c->t.retry_after);
  return 2;
}

FS_COLD static int push_decode_error(lua_State *L, const fs_call *c, const char *message) {
  push_http_error(L, c, "decode");
  set_string(L, "message", message);
  return 2;
}

/* The decoded reply at idx is the result as it stands: {id = string,
** etag = string} and nothing else (the docs' shape, as the service sends
** it), so no second table is made. */
static int reply_is_run(lua_State *L, int idx) {
  int n = 0;
  lua_getfield(L, idx, "id");
  lua_getfield(L, idx, "etag");
  if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 2);
    return 0;
  }
  lua_pop(L, 2);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    lua_pop(L, 1);
    if (++n > 2) {
      lua_pop(L, 1);
      return 0;
    }
  }
  return 1;
}

/* 2xx: {id, etag} from either reply shape (the docs' or the OpenAPI run). */
static int push_run(lua_State *L, const fs_call *c, int lean) {
  const fs_transfer *t = &c->t;
  int reply;
  lua_pushvalue(L, FS_UV_DECODE);
  lua_pushlstring(L, t->body ? t->body : "", t->body_len);
  lua_call(L, 1, 2);
  if (lua_type(L, -2) != LUA_TTABLE)
    return push_decode_error(L, c, lua_isstring(L, -1)
                             ? lua_pushfstring(L, "reply is not a JSON object: %s",
                                               lua_tostring(L, -1))
                             : "reply is not a JSON object");
  lua_pop(L, 1);
  reply = lua_gettop(L);
  if (!reply_is_run(L, reply)) {  /* the OpenAPI run, or more: {id, etag} of it */
    lua_createtable(L, 0, 2);
    lua_getfield(L, reply, "id");
    if (lua_type(L, -1) != LUA_TSTRING)
      return push_decode_error(L, c, "reply has no run id");
    lua_setfield(L, -2, "id");
    lua_getfield(L, reply, "etag");
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_getfield(L, reply, "eTag");
    }
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
      return push_decode_error(L, c, "reply has a non-string etag");
    lua_setfield(L, -2, "etag");
  }
  lua_pushinteger(L, (lua_Integer)t->status);  /* for the caller's log */
  if (lean)  /* a caller that keeps no record of its attempts */
    lua_pushnil(L);
  else
    lua_pushstring(L, c->request_id);
  if (t->date[0] == '\0')
    return 3;
  lua_pushstring(L, t->date);  /* raw: parsed only if wanted (core.parse_date) */
  return 4;
}

/* 2xx of a raw request: the body for the Lua side to read. */
static int push_response(lua_State *L, const fs_call *c) {
  lua_createtable(L, 0, 6);
  set_integer(L, "status", c->t.status);
  set_body(L, &c->t);
  set_exchange(L, c);
  return 1;
}

/* A reply buffer is kept for a wire transfer's next call up to this size
** (a spare's: the nginx transport reuses them; its bytes are never read
** again, the next reply's length starts at 0). */
#define WIRE_KEEP_BODY 4096

/* What c's transfer holds, freed; a wire transfer keeps a small reply
** buffer's memory (freed with it in the end, fs_transfer_free). */
static void transfer_release(fs_call *c) {
  char *body = NULL;
  size_t cap = 0;
  if (c->wire != NULL && c->t.body_cap <= WIRE_KEEP_BODY) {
    body = c->t.body;
    cap = c->t.body_cap;
    c->t.body = NULL;
  }
  fs_transfer_free(&c->t);
  c->t.body = body;
  c->t.body_cap = cap;
}

/* Push what a finished call gives Lua, then free its buffers; lean: a
** run action's success gives no request id (nil in its place). */
static int call_results(lua_State *L, fs_call *c, int lean) {
  int n;
  if (c->taken)
    return luaL_error(L, "flowservice: transfer result already taken");
  if (c->t.result != CURLE_OK)
    n = push_transport_error(L, c);
  else if (c->t.status < 200 || c->t.status > 299)
    n = push_http_error(L, c, "http");
  else
    n = c->kind == FS_RUN_ACTION ? push_run(L, c, lean) : push_response(L, c);
  c->taken = 1;
  transfer_release(c);
  return n;
}


/* ---------------------------------------------------------------------
** Transfers
*/

static void call_release(fs_call *c) {
  fs_transfer_free(&c->t);
  if (c->wire != NULL) {
    fs_wire_free(c->wire);
    c->wire = NULL;
  }
  if (c->targeted) {
    fs_wire_target_free(&c->wire_target);
    c->targeted = 0;
  }
  if (c->request_id != c->id_buf)
    free(c->request_id);
  c->request_id = NULL;
}

static int call_gc(lua_State *L) {
  call_release((fs_call *)luaL_checkudata(L, 1, FS_TRANSFER_MT));
  return 0;
}

/* A blocking call's transfer: the client's reused one, or NULL (in use,
** or no memory: the caller makes one that Lua owns). */
static fs_call *call_scratch(fs_client *client) {
  fs_call *c = client->scratch;
  if (client->scratch_busy)
    return NULL;
  if (c == NULL)
    c = client->scratch = (fs_call *)malloc(sizeof *c);
  else
    call_release(c);
  if (c != NULL) {
    memset(c, 0, sizeof *c);
    client->scratch_busy = 1;
  }
  return c;
}

static fs_call *call_check(lua_State *L, int idx) {
  return (fs_call *)check_class(L, idx, FS_UV_TRANSFER_MT, FS_TRANSFER_MT);
}

/* Fill c (zeroed): its kind and the x-request-id it sends (n bytes). */
static void call_init(lua_State *L, fs_call *c, int kind, const char *request_id, size_t n) {
  c->kind = kind;
  c->request_id = n < sizeof c->id_buf ? c->id_buf : (char *)malloc(n + 1);
  if (c->request_id == NULL)
    luaL_error(L, "flowservice: out of memory");
  memcpy(c->request_id, request_id, n);
  c->request_id[n] = '\0';
}

/* A transfer's userdata, pushed; nothing acquired for it yet. */
static fs_call *call_new(lua_State *L, int kind, const char *request_id, size_t n) {
  fs_call *c = (fs_call *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  luaL_getmetatable(L, FS_TRANSFER_MT);
  lua_setmetatable(L, -2);  /* from here on __gc frees what we acquire */
  call_init(L, c, kind, request_id, n);
  return c;
}

/* c (a run action's, from call_init) given a reply reader. */
static void wire_call_fill(fs_call *c, size_t max_body) {
  c->t.max_body = max_body;
  c->t.once = 1;
  c->t.retry_after = -1;  /* as fs_transfer_prepare leaves it */
  c->wire = &c->wire_state;
  fs_wire_init(c->wire);
}

/* A run action's transfer with a reply reader: the nginx transport's,
** fed by transfer:feed or ended by transfer:fail. */
static fs_call *wire_call_new(lua_State *L, size_t max_body, const char *request_id,
                              size_t n) {
  fs_call *c = call_new(L, FS_RUN_ACTION, request_id, n);
  wire_call_fill(c, max_body);
  return c;
}

/* The spare at idx, if any: a wire transfer whose result was taken, which
** the nginx transport hands back so that a call makes no new userdata for
** the collector to finalise. */
static fs_call *wire_spare(lua_State *L, int idx) {
  fs_call *c;
  if (lua_isnoneornil(L, idx))
    return NULL;
  c = (fs_call *)check_class(L, idx, FS_UV_TRANSFER_MT, FS_TRANSFER_MT);
  luaL_argcheck(L, c->wire != NULL && c->taken, idx,
                "a wire transfer whose result was taken expected");
  return c;
}

/* c, a wire transfer whose result was taken (or a zeroed one), zeroed
** again but for a small reply buffer's memory, which it keeps. */
static void wire_call_renew(fs_call *c) {
  char *body = NULL;
  size_t body_cap = 0;
  if (c->t.body_cap <= WIRE_KEEP_BODY) {  /* its result taken: nothing else is left */
    body = c->t.body;
    body_cap = c->t.body_cap;
    c->t.body = NULL;
  }
  call_release(c);
  memset(c, 0, sizeof *c);
  c->t.body = body;  /* freed with the transfer, as a new one would be */
  c->t.body_cap = body_cap;
}

/* wire_call_new, in the spare at idx (made anew in place: nothing of its
** last call kept but a small reply buffer's memory) when there is one;
** pushed. */
static fs_call *wire_call_reuse(lua_State *L, fs_call *spare, int idx, size_t max_body,
                                const char *request_id, size_t n) {
  if (spare == NULL)
    return wire_call_new(L, max_body, request_id, n);
  wire_call_renew(spare);
  call_init(L, spare, FS_RUN_ACTION, request_id, n);
  wire_call_fill(spare, max_body);
  lua_pushvalue(L, idx);
  return spare;
}

/* Prepare, build and (not yet) submit a transfer; pushes its userdata,
** unless blocking (finish() follows at once) and the client's reused
** transfer is free. */
static fs_call *call_start(lua_State *L, fs_client *client, int kind,
                           const fs_request *r, int blocking) {
  fs_call *c = blocking ? call_scratch(client) : NULL;
  CURLcode rc;
  if (c == NULL) {
    c = call_new(L, kind, r->header[H_REQUEST_ID], strlen(r->header[H_REQUEST_ID]));
  } else {
    call_init(L, c, kind, r->header[H_REQUEST_ID], strlen(r->header[H_REQUEST_ID]));
    c->t.kept = 1;  /* freed only after the engine (client_free) */
  }
  rc = fs_transfer_prepare(&c->t, &client->engine, r->max_body, kind == FS_RUN_ACTION,
                           r->tmpl != NULL ? fs_template_config(r->tmpl) : 0);
  if (rc != CURLE_OK)
    luaL_error(L, "flowservice: libcurl setup failed: %s", curl_easy_strerror(rc));
  fs_request_apply(L, &c->t, r);
  return c;
}

static void engine_check(lua_State *L, CURLMcode rc) {
  if (rc != CURLM_OK)
    luaL_error(L, "flowservice: libcurl engine failed: %s", curl_multi_strerror(rc));
}

/* In a forked child, a transfer of the parent's has ended (aborted). */
static fs_call *call_current(lua_State *L, int idx) {
  fs_call *c = call_check(L, idx);
  if (c->t.engine != NULL)
    (void)fs_engine_after_fork(c->t.engine);  /* forgets; no I/O */
  return c;
}

static int transfer_done(lua_State *L) {
  lua_pushboolean(L, call_current(L, 1)->t.done);
  return 1;
}

static int transfer_result(lua_State *L) {
  fs_call *c = call_current(L, 1);
  if (!c->t.done)
    return luaL_error(L, "flowservice: transfer is still in flight");
  return call_results(L, c, lua_toboolean(L, 2));
}

static int transfer_request_id(lua_State *L) {
  fs_call *c = call_check(L, 1);
  lua_pushstring(L, c->request_id);
  return 1;
}

/* Have the engine list t when it finishes (client:step(list)); returns
** the key it will be listed by. */
static int transfer_watch(lua_State *L) {
  fs_call *c = call_check(L, 1);
  c->t.watched = 1;
  lua_pushlightuserdata(L, (void *)&c->t);
  return 1;
}

/* Stop a transfer in flight; its result becomes unavailable. */
static int transfer_cancel(lua_State *L) {
  fs_call *c = call_check(L, 1);
  fs_transfer_free(&c->t);
  c->t.done = 1;
  c->taken = 1;
  return 0;
}

/* Hand a prepared transfer to its engine: from here on, anything that
** drives the engine may send it. false when it ended before (its client
** was closed, or the process forked). */
static int transfer_submit(lua_State *L) {
  fs_call *c = call_current(L, 1);
  if (c->t.submitted)
    return luaL_error(L, "flowservice: transfer already submitted");
  if (c->t.done || c->t.engine == NULL || c->t.engine->multi == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  engine_check(L, fs_engine_submit(c->t.engine, &c->t));
  lua_pushboolean(L, 1);
  return 1;
}


/* ---------------------------------------------------------------------
** Transfers of the nginx transport: a cosocket moves the bytes, and the
** reply is read here (src/wire.h) into the fields libcurl would fill, so
** transfer:result() gives what it gives for a libcurl transfer
*/

/* c, its lines asked for at once: a reply's first bytes find their call
** out of every cache, and what reading them touches (fs_call's first
** fields) then costs one trip to memory, not one a line as the code meets
** them. A hint only: nothing without GCC's builtin. */
static fs_call *call_prefetch(fs_call *c) {
#if defined(__GNUC__)
  const char *p = (const char *)c;
  const char *end = (const char *)(&c->t.date + 1);
  for (; p < end; p += 64)
    __builtin_prefetch(p, 1);
#endif
  return c;
}

static fs_call *wire_check(lua_State *L, int idx) {
  fs_call *c = call_prefetch(call_check(L, idx));
  if (c->wire == NULL)
    luaL_error(L, "flowservice: not a wire transfer");
  return c;
}

/* The reply is read (or bad): the result is ready, as after libcurl. */
static void wire_settle(fs_call *c, fs_wire_state state) {
  fs_transfer *t = &c->t;
  t->done = 1;
  t->sent = 1;
  if (state == FS_WIRE_DONE) {
    t->result = CURLE_OK;
    return;
  }
  t->result = t->too_large ? CURLE_WRITE_ERROR
              : t->out_of_memory ? CURLE_OUT_OF_MEMORY
              : !fs_wire_started(c->wire) ? CURLE_GOT_NOTHING
              : CURLE_WEIRD_SERVER_REPLY;
  strncpy(t->errbuf, fs_wire_error(c->wire), sizeof t->errbuf - 1);
  t->errbuf[sizeof t->errbuf - 1] = '\0';
}

/* What one feed did: the reply is still coming, it ended with this
** feed, or it had ended before (the bytes only noted). */
enum { FEED_MORE, FEED_ENDED, FEED_AFTER };

/* The bytes of the feed at stack index 2 (none: the server closed the
** connection) to c's reader. */
static int feed_once(lua_State *L, fs_call *c) {
  size_t n = 0;
  const char *data = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &n);
  fs_wire_state state;
  if (c->t.done) {
    /* a reply read already: the reader notes what comes after it; a
    ** cancelled transfer's reader (still reading) is left alone */
    if (fs_wire_feed(c->wire, &c->t, "", 0) != FS_WIRE_MORE)
      (void)fs_wire_feed(c->wire, &c->t, data, n);
    return FEED_AFTER;
  }
  state = fs_wire_feed(c->wire, &c->t, data, n);
  if (state == FS_WIRE_MORE)
    return FEED_MORE;
  wire_settle(c, state);
  return FEED_ENDED;
}

/* transfer:feed(data): the next bytes of the reply, nil when the server
** closed the connection; true once the result is ready, and then whether
** the connection can carry the next request (transfer:reusable()). Bytes
** after that only make the connection not reusable. */
static int transfer_feed(lua_State *L) {
  fs_call *c = wire_check(L, 1);
  int fed = feed_once(L, c);
  lua_pushboolean(L, fed != FEED_MORE);
  if (fed != FEED_ENDED)
    return 1;
  lua_pushboolean(L, fs_wire_reusable(c->wire));
  return 2;
}

/* transfer:feed_result(data, lean): transfer:feed, and when this feed
** ends the transfer, its result too: true, reusable, then what
** transfer:result(lean) gives (one call where a reply comes in one read,
** as most do). false: more to come; true alone: it had ended before. */
static int transfer_feed_result(lua_State *L) {
  fs_call *c = wire_check(L, 1);
  int lean = lua_toboolean(L, 3), fed = feed_once(L, c), n;
  if (fed != FEED_ENDED) {
    lua_pushboolean(L, fed == FEED_AFTER);
    return 1;
  }
  n = call_results(L, c, lean);  /* its last n values: what it leaves below them stays */
  /* the two booleans: with the arguments and what call_results pushed, well
  ** within the LUA_MINSTACK slots Lua gives a C function */
  lua_pushboolean(L, 1);
  lua_insert(L, -(n + 1));
  lua_pushboolean(L, fs_wire_reusable(c->wire));
  lua_insert(L, -(n + 1));
  return n + 2;
}

/* transfer:reusable(): the connection can carry the next request. */
static int transfer_reusable(lua_State *L) {
  lua_pushboolean(L, fs_wire_reusable(wire_check(L, 1)->wire));
  return 1;
}

/* core.wire_reader_for_tests(max_body): a run action's transfer with a
** reply reader and nothing sent, for spec/wire_spec.lua to feed replies
** to. Test-only: the nginx transport makes its transfers with
** client:wire_retrigger. */
static int core_wire_reader_for_tests(lua_State *L) {
  lua_Integer max_body = luaL_checkinteger(L, 1);
  luaL_argcheck(L, max_body >= 0, 1, "max_body must be >= 0");
  (void)wire_call_new(L, (size_t)max_body, "test", 4);
  return 1;
}


/* ---------------------------------------------------------------------
** Clients
*/

static void client_free(lua_State *L, fs_client *c) {
  fs_engine_free(&c->engine);
  if (c->scratch != NULL) {  /* its transfer, if any, ended with the engine */
    call_release(c->scratch);
    free(c->scratch);
    c->scratch = NULL;
  }
  if (c->wire_scratch != NULL) {
    call_release(c->wire_scratch);
    free(c->wire_scratch);
    c->wire_scratch = NULL;
  }
  fs_url_cache_free(&c->urls);
  fs_bytes_free(&c->wire_bytes);
  fs_template_free(L, c->tmpl);  /* transfers hold their own share of its lines */
  c->tmpl = NULL;
  c->closed = 1;
}

static int client_gc(lua_State *L) {
  client_free(L, (fs_client *)luaL_checkudata(L, 1, FS_CLIENT_MT));
  return 0;
}

static fs_client *client_check(lua_State *L, int idx) {
  fs_client *c = (fs_client *)check_class(L, idx, FS_UV_CLIENT_MT, FS_CLIENT_MT);
  if (c->closed)
    luaL_error(L, "flowservice: client is closed");
  if (fs_engine_after_fork(&c->engine) != 0)
    luaL_error(L, "flowservice: libcurl setup failed: no multi handle");
  return c;
}

static fs_client *client_new(lua_State *L) {
  fs_client *c = (fs_client *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->closed = 1;  /* until the engine exists */
  luaL_getmetatable(L, FS_CLIENT_MT);
  lua_setmetatable(L, -2);
  if (fs_engine_init(&c->engine) != 0)
    luaL_error(L, "flowservice: libcurl setup failed: no multi handle");
  c->closed = 0;
  return c;
}

/* nil options: the client's own copy, checked when it was made. */
static void own_options(lua_State *L, int client_arg, int opts_arg, fs_request *r) {
  if (!lua_isnoneornil(L, opts_arg))
    return;
  if (lua_gettop(L) < opts_arg)
    lua_settop(L, opts_arg);
  fs_getuservalue(L, client_arg);
  lua_replace(L, opts_arg);  /* where errors about them point, as before */
  r->own_options = lua_istable(L, opts_arg);
}

/* Build a run action's transfer; submit it too unless only prepared
** (submit 0), and for finish() (2) in the client's reused transfer.
** Options nil: the client's own, as core.new checked and copied them. A
** bad run id raises, or with soft gives NULL, nothing built or sent. */
static fs_call *start_run_action(lua_State *L, fs_client *client, int client_arg,
                                 int run_arg, int opts_arg, int submit, int soft) {
  fs_request r;
  const char *why;
  fs_call *c;
  memset(&r, 0, sizeof r);
  r.cache = &client->urls;
  r.default_user_agent = lua_tostring(L, FS_UV_USER_AGENT);
  r.engine = &client->engine;
  r.tmpl_slot = &client->tmpl;
  if (client_arg != 0)
    own_options(L, client_arg, opts_arg, &r);
  fs_request_options(L, opts_arg, 0, &r);
  why = fs_request_run_action(L, run_arg, &r);
  if (why != NULL) {
    if (soft)
      return NULL;
    luaL_argerror(L, run_arg, why);
  }
  c = call_start(L, client, FS_RUN_ACTION, &r, submit == 2);
  if (submit)
    engine_check(L, fs_engine_submit(&client->engine, &c->t));
  return c;
}

static fs_call *submit_raw(lua_State *L, fs_client *client, int opts_arg,
                           int shape_arg, int blocking) {
  fs_request r;
  fs_call *c;
  memset(&r, 0, sizeof r);
  r.cache = &client->urls;
  r.default_user_agent = lua_tostring(L, FS_UV_USER_AGENT);
  r.engine = &client->engine;
  fs_request_shape(L, shape_arg, &r);
  fs_request_options(L, opts_arg, r.identity ? 0 : FS_NO_IDENTITY, &r);
  c = call_start(L, client, FS_RAW, &r, blocking);
  engine_check(L, fs_engine_submit(&client->engine, &c->t));
  return c;
}

/* Drive until c is done, then hand over its result. */
static int finish(lua_State *L, fs_client *client, fs_call *c, int lean) {
  int n;
  engine_check(L, fs_engine_finish(&client->engine, &c->t));
  n = call_results(L, c, lean);
  if (c == client->scratch)
    client->scratch_busy = 0;
  return n;
}

/* client:retrigger(run_id [, opts [, lean]]): a run id that is not one
** gives false, nothing sent, for the Lua side to raise its argument error
** where its caller made the call (flowservice.client's plain path checks
** no more itself); lean: a success gives no request id. */
static int client_retrigger(lua_State *L) {
  fs_client *client = client_check(L, 1);
  int lean = lua_toboolean(L, 4);  /* before the options' values go on the stack */
  fs_call *c = start_run_action(L, client, 1, 2, 3, 2, 1);
  if (c == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  return finish(L, client, c, lean);
}

static int client_request(lua_State *L) {
  fs_client *client = client_check(L, 1);
  return finish(L, client, submit_raw(L, client, 2, 3, 1), 0);
}

static int client_submit_retrigger(lua_State *L) {
  start_run_action(L, client_check(L, 1), 1, 2, 3, 1, 0);
  return 1;
}

static int client_prepare_retrigger(lua_State *L) {
  start_run_action(L, client_check(L, 1), 1, 2, 3, 0, 0);
  return 1;
}

/* After the pieces, host, port, pool and tls: the rest of wire_retrigger's results. */
static int wire_results(lua_State *L, const fs_request *r) {
  lua_pushboolean(L, !r->insecure);
  lua_pushinteger(L, (lua_Integer)r->timeout_ms);
  lua_pushinteger(L, (lua_Integer)r->connect_timeout_ms);
  return 11;
}

/* A wire call's request: the client's caches, engine, template and bytes. */
static void wire_request_init(lua_State *L, fs_client *client, fs_request *r) {
  memset(r, 0, sizeof *r);
  r->cache = &client->urls;
  r->default_user_agent = lua_tostring(L, FS_UV_USER_AGENT);
  r->engine = &client->engine;
  r->tmpl_slot = &client->tmpl;
  r->wire_bytes = &client->wire_bytes;
}

/*
** The nginx transport (flowservice.wire): the run action client:retrigger
** would send, as bytes for a cosocket, and a transfer that reads the reply
** from the bytes fed to it (transfer:feed) or ends by transfer:fail; its
** result is a libcurl transfer's.
**   client:wire_retrigger(run_id, opts [, spare]) -> transfer, head, lines,
**     tail, host, port, pool, tls, verify, timeout_ms, connect_timeout_ms
**     (false for a bad run id, as client:retrigger)
** head, lines and tail: the request's bytes in three strings, to be sent
** as one (fs_request_wire says why three).
** spare: a transfer of an earlier call whose result was taken, made into
** this call's transfer (and returned) instead of a new one.
*/
static int client_wire_retrigger(lua_State *L) {
  fs_client *client = client_check(L, 1);
  fs_call *spare = wire_spare(L, 4);
  fs_request r;
  fs_call *c;
  wire_request_init(L, client, &r);
  if (lua_isnoneornil(L, 3) && fs_request_wire_plain(client->tmpl, &r)) {
    size_t len;  /* the client's own options, its pieces made: the same bytes, directly */
    const char *run_id = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
    if (run_id == NULL || fs_run_id_problem(run_id, len) != NULL) {
      lua_pushboolean(L, 0);
      return 1;
    }
    (void)wire_call_reuse(L, spare, 4, r.max_body, r.header[H_REQUEST_ID],
                          strlen(r.header[H_REQUEST_ID]));
    luaL_checkstack(L, 12, "too many results");
    fs_request_wire_plain_push(L, &r, run_id, len, 1);
    return wire_results(L, &r);
  }
  own_options(L, 1, 3, &r);
  fs_request_options(L, 3, 0, &r);
  if (fs_request_run_action(L, 2, &r) != NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  c = wire_call_reuse(L, spare, 4, r.max_body, r.header[H_REQUEST_ID],
                      strlen(r.header[H_REQUEST_ID]));
  luaL_checkstack(L, 12, "too many results");  /* the pieces, then the values after them */
  c->targeted = 1;  /* fs_request_wire may fill it, then raise */
  /* pushes the bytes (three pieces), host, port, pool, tls */
  fs_request_wire(L, &c->t, &r, &c->wire_target);
  /* what built the bytes is not kept for the reply: freed now, while its
  ** memory is in the cache (by the reply it would not be) */
  fs_transfer_free(&c->t);
  fs_wire_target_free(&c->wire_target);
  c->targeted = 0;
  return wire_results(L, &r);
}

/*
** The commonest call of the nginx transport, a run action on the client's
** own options (wire_retrigger's plain way), made without a transfer: while
** its reply is awaited the call holds its own line of the request (its
** request id in it) and nothing else, and a reply that comes whole in one
** read (as nearly every one does) is read in the client's one reused
** transfer, in the cache from the last reply,
** where a transfer of the call's own was last touched when its request
** went out, the reply's whole latency before. A reply in pieces, or a
** failure, gets a transfer of its own then, which reads it as
** wire_retrigger's does.
**   client:wire_plain(run_id [, lean]) -> head, line, tail, host, port,
**     pool, tls, verify, timeout_ms, connect_timeout_ms, max_body; lean:
**     the request's three pieces only (false for a bad run id, as
**     client:retrigger; nil: not this way, the call takes wire_retrigger).
**     line, the middle piece, is the call's own: "x-request-id: ID\r\n".
**   client:wire_reply(data, line, max_body, lean) -> true, reusable and
**     what transfer:result(lean) gives, when data is the whole reply (with
**     whatever came after it); else false, nothing kept
**   client:wire_transfer(line, max_body [, spare]) -> the call's transfer
**     (its reply to be fed from the start, or transfer:fail)
** The call keeps its line, not a request id string of its own (one string
** a call fewer made): wire_reply and wire_transfer read the id from it.
** wire_reply and wire_transfer work on a closed client too: a call in
** flight ends as a transfer of wire_retrigger's would.
*/
static int client_wire_plain(lua_State *L) {
  fs_client *client = client_check(L, 1);
  int lean = lua_toboolean(L, 3);
  fs_request r;
  size_t len;
  const char *run_id;
  wire_request_init(L, client, &r);
  if (!fs_request_wire_plain(client->tmpl, &r)) {
    lua_pushnil(L);
    return 1;
  }
  run_id = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
  if (run_id == NULL || fs_run_id_problem(run_id, len) != NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (lean) {
    fs_request_wire_plain_push(L, &r, run_id, len, 0);  /* within LUA_MINSTACK */
    return 3;
  }
  luaL_checkstack(L, 12, "too many results");
  fs_request_wire_plain_push(L, &r, run_id, len, 1);
  (void)wire_results(L, &r);
  lua_pushinteger(L, (lua_Integer)r.max_body);
  return 11;
}

/* The request id in a plain call's line at idx ("x-request-id: ID\r\n",
** as wire_plain gave it), and its length; raises for anything else. */
static const char *wire_line_id(lua_State *L, int idx, size_t *id_len) {
  size_t n, p = sizeof FS_ID_LINE - 1;
  const char *line = luaL_checklstring(L, idx, &n);
  luaL_argcheck(L, n >= p + 2 && memcmp(line, FS_ID_LINE, p) == 0 && line[n - 2] == '\r'
                && line[n - 1] == '\n', idx, "the call's line from wire_plain expected");
  *id_len = n - p - 2;
  return line + p;
}

static size_t check_max_body(lua_State *L, int idx) {
  lua_Integer max_body = luaL_checkinteger(L, idx);
  luaL_argcheck(L, max_body >= 0, idx, "max_body must be >= 0");
  return (size_t)max_body;
}

/* The client's wire scratch, made ready for a call's reply and busy; NULL
** when closed, busy, out of memory, or for a request id too long for it. */
static fs_call *wire_scratch(lua_State *L, fs_client *client, size_t max_body,
                             const char *request_id, size_t id_len) {
  fs_call *c = client->wire_scratch;
  if (client->closed || client->wire_scratch_busy || id_len >= sizeof c->id_buf)
    return NULL;
  if (c == NULL) {
    c = client->wire_scratch = (fs_call *)calloc(1, sizeof *c);
    if (c == NULL)
      return NULL;
  } else {
    wire_call_renew(c);
  }
  call_init(L, c, FS_RUN_ACTION, request_id, id_len);  /* into id_buf: nothing to raise */
  wire_call_fill(c, max_body);
  client->wire_scratch_busy = 1;
  return c;
}

static int client_wire_reply(lua_State *L) {
  /* closed or not (wire_scratch says no for a closed one) */
  fs_client *client = (fs_client *)check_class(L, 1, FS_UV_CLIENT_MT, FS_CLIENT_MT);
  size_t n, id_len;
  const char *data = luaL_checklstring(L, 2, &n);
  const char *request_id = wire_line_id(L, 3, &id_len);
  size_t max_body = check_max_body(L, 4);
  int lean = lua_toboolean(L, 5), results;
  fs_call *c = wire_scratch(L, client, max_body, request_id, id_len);
  fs_wire_state state;
  if (c == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  state = fs_wire_feed(c->wire, &c->t, data, n);
  if (state == FS_WIRE_MORE) {
    client->wire_scratch_busy = 0;
    lua_pushboolean(L, 0);
    return 1;
  }
  wire_settle(c, state);
  results = call_results(L, c, lean);
  client->wire_scratch_busy = 0;
  lua_pushboolean(L, 1);  /* within LUA_MINSTACK, as in transfer:feed_result */
  lua_insert(L, -(results + 1));
  lua_pushboolean(L, fs_wire_reusable(c->wire));
  lua_insert(L, -(results + 1));
  return results + 2;
}

static int client_wire_transfer(lua_State *L) {
  const char *request_id;
  size_t max_body, id_len;
  (void)check_class(L, 1, FS_UV_CLIENT_MT, FS_CLIENT_MT);  /* closed or not */
  request_id = wire_line_id(L, 2, &id_len);
  max_body = check_max_body(L, 3);
  (void)wire_call_reuse(L, wire_spare(L, 4), 4, max_body, request_id, id_len);
  return 1;
}

/* transfer:fail(what, message, sent): the cosocket failed before a whole
** reply came; what names the step ("connect", "tls", "send", "receive")
** or "timeout"; sent: any byte of the request may have left. */
static int transfer_fail(lua_State *L) {
  static const char *const steps[] = { "connect", "tls", "send", "receive", "timeout", NULL };
  static const CURLcode codes[] = { CURLE_COULDNT_CONNECT, CURLE_SSL_CONNECT_ERROR,
                                    CURLE_SEND_ERROR, CURLE_RECV_ERROR,
                                    CURLE_OPERATION_TIMEDOUT };
  fs_call *c = wire_check(L, 1);
  int step = luaL_checkoption(L, 2, NULL, steps);
  const char *message = luaL_checkstring(L, 3);
  if (c->t.done)
    return luaL_error(L, "flowservice: transfer already ended");
  c->t.done = 1;
  c->t.result = codes[step];
  c->t.sent = lua_toboolean(L, 4);
  snprintf(c->t.errbuf, sizeof c->t.errbuf, "%s", message);
  return 0;
}

static int client_submit(lua_State *L) {
  submit_raw(L, client_check(L, 1), 2, 3, 0);
  return 1;
}

/* Non-blocking: returns how many transfers are still running. With a
** table, also lists there (from 1) the keys of the watched transfers that
** finished since the last such call, and returns their count and whether
** some could not be listed (then every watcher must look). */
static int client_step(lua_State *L) {
  fs_client *client = client_check(L, 1);
  int running = 0, n, i, lost;
  const void **finished;
  if (lua_isnoneornil(L, 2)) {
    engine_check(L, fs_engine_step(&client->engine, &running));
    lua_pushinteger(L, running);
    return 1;
  }
  luaL_checktype(L, 2, LUA_TTABLE);
  engine_check(L, fs_engine_step(&client->engine, &running));
  n = fs_engine_take_finished(&client->engine, &finished, &lost);
  for (i = 0; i < n; i++) {
    lua_pushlightuserdata(L, (void *)finished[i]);
    lua_rawseti(L, 2, i + 1);
  }
  lua_pushinteger(L, running);
  lua_pushinteger(L, n);
  lua_pushboolean(L, lost);
  return 3;
}

static int client_wait(lua_State *L) {
  fs_client *client = client_check(L, 1);
  lua_Number seconds = luaL_checknumber(L, 2);
  int ms = !(seconds > 0) ? 0  /* NaN too */
           : seconds >= 3600 ? 3600000 : (int)(seconds * 1000 + 0.5);
  engine_check(L, fs_engine_wait(&client->engine, ms));
  return 0;
}

/* The fd an event loop watches for the client (readable: a step has
** something to do), or nil in a build without epoll. */
static int client_fd(lua_State *L) {
  int fd = fs_engine_fd(&client_check(L, 1)->engine);
  if (fd < 0)
    lua_pushnil(L);
  else
    lua_pushinteger(L, fd);
  return 1;
}

/* An event loop's step: act on what is ready; returns the transfers still
** running and the seconds until the engine wants the next step (nil: only
** when client:fd() becomes readable). */
static int client_pump(lua_State *L) {
  fs_client *client = client_check(L, 1);
  int running = 0;
  long ms;
  engine_check(L, fs_engine_step(&client->engine, &running));
  lua_pushinteger(L, running);
  ms = fs_engine_timer_ms(&client->engine);
  if (ms < 0)
    lua_pushnil(L);
  else
    lua_pushnumber(L, (lua_Number)ms / 1000);
  return 2;
}

/* Seconds until libcurl wants the next step, or nil if it has no timer. */
static int client_timeout(lua_State *L) {
  fs_client *client = client_check(L, 1);
  long ms = -1;
  engine_check(L, fs_engine_timeout(&client->engine, &ms));
  if (ms < 0)
    lua_pushnil(L);
  else
    lua_pushnumber(L, (lua_Number)ms / 1000);
  return 1;
}

/* How many transfers the engine holds: none once every call has ended. */
static int client_in_flight(lua_State *L) {
  lua_pushinteger(L, fs_engine_attached(&client_check(L, 1)->engine));
  return 1;
}

static int client_close(lua_State *L) {
  return client_gc(L);
}


/* ---------------------------------------------------------------------
** Module
*/

/* One call on a fresh engine, closed before returning. */
static int core_retrigger(lua_State *L) {
  fs_client *client;
  int n;
  lua_settop(L, 2);
  client = client_new(L);
  n = finish(L, client, start_run_action(L, client, 0, 1, 2, 2, 0), 0);
  client_free(L, client);
  return n;
}

/* Validates the options a client will use. The Lua face keeps them; the
** client keeps a copy no one else holds (raw, as they are read): its run
** actions given no options use it, read once (fs_request.own_options). */
static int core_new(lua_State *L) {
  fs_request r;
  int token_later = lua_toboolean(L, 2);
  memset(&r, 0, sizeof r);
  lua_settop(L, 1);
  fs_request_options(L, 1, token_later ? FS_TOKEN_LATER : 0, &r);
  lua_settop(L, 1);
  client_new(L);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, 1) != 0) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, 3);
  }
  fs_setuservalue(L, 2);
  return 1;
}

static int core_escape(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  char *escaped = curl_easy_escape(NULL, s, (int)len);
  if (escaped == NULL)
    return luaL_error(L, "flowservice: out of memory");
  lua_pushstring(L, escaped);
  curl_free(escaped);
  return 1;
}

static int core_unescape(lua_State *L) {
  size_t len;
  int outlen = 0;
  const char *s = luaL_checklstring(L, 1, &len);
  char *plain = curl_easy_unescape(NULL, s, (int)len, &outlen);
  if (plain == NULL)
    return luaL_error(L, "flowservice: out of memory");
  lua_pushlstring(L, plain, (size_t)outlen);
  curl_free(plain);
  return 1;
}

/* core.check_url(url) -> true, or nil and why not (the base_url rules). */
static int core_check_url(lua_State *L) {
  const char *why = fs_url_problem(luaL_checkstring(L, 1));
  if (why == NULL) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, why);
  return 2;
}

/* core.run_id_problem(s) -> nil, or why s is no run id (args.run_id). */
static int core_run_id_problem(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *why = fs_run_id_problem(s, len);
  if (why == NULL)
    lua_pushnil(L);
  else
    lua_pushstring(L, why);
  return 1;
}

/* An HTTP date (a reply's Date header) -> epoch seconds, or nil. */
static int core_parse_date(lua_State *L) {
  time_t when = curl_getdate(luaL_checkstring(L, 1), NULL);
  if (when == (time_t)-1)
    lua_pushnil(L);
  else
    lua_pushinteger(L, (lua_Integer)when);
  return 1;
}

/* Monotonic seconds: deadlines and backoff must not jump with the clock. */
static int core_now(lua_State *L) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
    return luaL_error(L, "flowservice: no monotonic clock");
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
  return 1;
}

/* cjson.safe.new().decode: a private instance, so nobody's settings leak in */
static void push_decoder(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson.safe");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "new");
  lua_call(L, 0, 1);
  lua_getfield(L, -1, "decode");
  lua_replace(L, -3);
  lua_pop(L, 1);
}

/* Every function gets the same upvalues: the FS_UV_ ones, in that order
** on the stack from index uv. */
static void push_upvalues(lua_State *L, int uv) {
  int i;
  for (i = 0; i < FS_UPVALUES; i++)
    lua_pushvalue(L, uv + i);
}

static void new_class(lua_State *L, int uv, const char *name, const luaL_Reg *methods,
                      lua_CFunction gc) {
  luaL_getmetatable(L, name);
  push_upvalues(L, uv);
  fs_setfuncs(L, methods, FS_UPVALUES);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__close");
#endif
  lua_pop(L, 1);
}

int luaopen_flowservice_core(lua_State *L) {
  static const luaL_Reg module[] = {
    {"retrigger", core_retrigger}, {"new", core_new}, {"escape", core_escape},
    {"unescape", core_unescape}, {"now", core_now}, {"parse_date", core_parse_date},
    {"check_url", core_check_url}, {"run_id_problem", core_run_id_problem},
    {"wire_reader_for_tests", core_wire_reader_for_tests},
    {NULL, NULL}
  };
  static const luaL_Reg client[] = {
    {"retrigger", client_retrigger}, {"request", client_request},
    {"submit_retrigger", client_submit_retrigger}, {"submit", client_submit},
    {"prepare_retrigger", client_prepare_retrigger},
    {"wire_retrigger", client_wire_retrigger}, {"wire_plain", client_wire_plain},
    {"wire_reply", client_wire_reply}, {"wire_transfer", client_wire_transfer},
    {"step", client_step}, {"wait", client_wait}, {"timeout", client_timeout},
    {"in_flight", client_in_flight}, {"fd", client_fd}, {"pump", client_pump},
    {"close", client_close}, {NULL, NULL}
  };
  static const luaL_Reg transfer[] = {
    {"done", transfer_done}, {"result", transfer_result}, {"submit", transfer_submit},
    {"request_id", transfer_request_id}, {"cancel", transfer_cancel},
    {"watch", transfer_watch}, {"feed", transfer_feed}, {"feed_result", transfer_feed_result},
    {"reusable", transfer_reusable},
    {"fail", transfer_fail}, {NULL, NULL}
  };
  int uv;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)  /* ref-counted */
    return luaL_error(L, "flowservice: curl_global_init failed");
  push_decoder(L);
  fs_request_push_defaults(L);
  lua_getfield(L, -1, "user_agent");
  lua_replace(L, -2);
  luaL_newmetatable(L, FS_CLIENT_MT);
  luaL_newmetatable(L, FS_TRANSFER_MT);
  uv = lua_gettop(L) - FS_UPVALUES + 1;  /* decoder, user agent, the metatables */
  new_class(L, uv, FS_CLIENT_MT, client, client_gc);
  new_class(L, uv, FS_TRANSFER_MT, transfer, call_gc);
  lua_newtable(L);
  push_upvalues(L, uv);
  fs_setfuncs(L, module, FS_UPVALUES);
  fs_journal_register(L);
  fs_signals_register(L);
  fs_request_push_defaults(L);
  lua_setfield(L, -2, "defaults");
  set_string(L, "_VERSION", FS_VERSION);
  set_string(L, "resend_guard", FS_RESEND_GUARD);
  set_string(L, "socket_set", FS_SOCKET_SET);
  /* not curl_version(): it initialises libldap/libsasl, whose memory is
  ** lost when Lua unloads the library at exit */
  set_string(L, "curl_version", curl_version_info(CURLVERSION_NOW)->version);
  return 1;
}
