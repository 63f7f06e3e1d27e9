/*
** flowservice.core: the Lua-facing side of the C module.
** Checks arguments, marshals the options table into a libcurl request,
** runs it on the engine and hands Lua a finished result. Nothing of a
** caller's options outlives the call; no state lives outside Lua.
*/
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

#include "compat.h"
#include "engine.h"
#include "request.h"

#define FS_VERSION "0.1.0"
#define FS_CALL_MT "flowservice.call"

/* Request defaults: kept beside the code that marshals them. */
#define FS_DEFAULT_BASE_URL "https://platform.adobe.io/data/foundation/flowservice"
#define FS_DEFAULT_SANDBOX "prod"
#define FS_DEFAULT_OP "re-trigger"
#define FS_DEFAULT_TIMEOUT 60.0
#define FS_DEFAULT_CONNECT_TIMEOUT 10.0
#define FS_DEFAULT_MAX_BODY (8.0 * 1024 * 1024)
#define FS_MAX_SECONDS 86400.0  /* a longer wait is a mistake, not a wish */
#define FS_MAX_MAX_BODY (1024.0 * 1024 * 1024)

/* Upvalues of the request functions. */
#define FS_UV_DECODE lua_upvalueindex(1)
#define FS_UV_USER_AGENT lua_upvalueindex(2)

/* lua-cjson's config-table style: every option, with the type it takes. */
static const struct {
  const char *name;
  int type;
} fs_options[] = {
  {"access_token", LUA_TSTRING}, {"api_key", LUA_TSTRING},
  {"org_id", LUA_TSTRING}, {"sandbox", LUA_TSTRING},
  {"base_url", LUA_TSTRING}, {"op", LUA_TSTRING},
  {"if_match", LUA_TSTRING}, {"request_id", LUA_TSTRING},
  {"headers", LUA_TTABLE}, {"timeout", LUA_TNUMBER},
  {"connect_timeout", LUA_TNUMBER}, {"ca_file", LUA_TSTRING},
  {"ca_path", LUA_TSTRING}, {"proxy", LUA_TSTRING},
  {"insecure", LUA_TBOOLEAN}, {"user_agent", LUA_TSTRING},
  {"max_body", LUA_TNUMBER}, {NULL, LUA_TNONE}
};

/* The headers every call sends, in wire order. The first four carry
** identity and may only come from their options. */
enum {
  H_AUTHORIZATION, H_API_KEY, H_ORG_ID, H_SANDBOX, H_PROTECTED = H_SANDBOX,
  H_CONTENT_TYPE, H_ACCEPT, H_REQUEST_ID, H_IF_MATCH, H_USER_AGENT, H_COUNT
};

static const char *const fs_header_names[H_COUNT] = {
  "Authorization", "x-api-key", "x-gw-ims-org-id", "x-sandbox-name",
  "Content-Type", "Accept", "x-request-id", "If-Match", "User-Agent"
};

static const char *const fs_header_options[H_PROTECTED + 1] = {
  "access_token", "api_key", "org_id", "sandbox"
};

typedef struct fs_args {
  const char *run_id;
  const char *base_url;
  const char *op;
  const char *header[H_COUNT];   /* NULL: not sent */
  int headers_table;             /* stack index of opts.headers, or 0 */
  size_t max_body;
  fs_transport transport;
} fs_args;

/* A call's C resources, owned by a userdata so a Lua error frees them. */
typedef struct fs_call {
  fs_engine engine;
  fs_transfer transfer;
} fs_call;


/* ---------------------------------------------------------------------
** Argument checks
*/

static int opt_error(lua_State *L, const char *name, const char *what) {
  return luaL_argerror(L, 2, lua_pushfstring(L, "option '%s' %s", name, what));
}

static void check_option_keys(lua_State *L, int opts) {
  lua_pushnil(L);
  while (lua_next(L, opts) != 0) {
    const char *key;
    int i;
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_argerror(L, 2, lua_pushfstring(L, "option names must be strings, got %s",
                                          luaL_typename(L, -2)));
    key = lua_tostring(L, -2);
    for (i = 0; fs_options[i].name != NULL; i++)
      if (strcmp(fs_options[i].name, key) == 0)
        break;
    if (fs_options[i].name == NULL)
      opt_error(L, key, "is unknown");
    if (lua_type(L, -1) != fs_options[i].type)
      opt_error(L, key, lua_pushfstring(L, "must be a %s, got %s",
                                        lua_typename(L, fs_options[i].type),
                                        luaL_typename(L, -1)));
    lua_pop(L, 1);
  }
}

/* Raw field access: a metatable on the options must not add options. */
static int opt_get(lua_State *L, int opts, const char *name) {
  lua_pushstring(L, name);
  lua_rawget(L, opts);
  return lua_type(L, -1);
}

/* The string stays alive: the options table on the stack refers to it. */
static const char *opt_string(lua_State *L, int opts, const char *name,
                              const char *def, int required) {
  size_t len;
  const char *s;
  if (opt_get(L, opts, name) == LUA_TNIL) {
    lua_pop(L, 1);
    if (required)
      opt_error(L, name, "is required");
    return def;
  }
  s = lua_tolstring(L, -1, &len);
  lua_pop(L, 1);
  if (!fs_header_value_ok(s, len))
    opt_error(L, name, "contains CR, LF or NUL");
  if (len == 0 && (required || def != NULL))
    opt_error(L, name, "must not be empty");
  return s;
}

static long opt_milliseconds(lua_State *L, int opts, const char *name,
                             double def) {
  double seconds = def;
  if (opt_get(L, opts, name) != LUA_TNIL)
    seconds = (double)lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(seconds > 0 && seconds <= FS_MAX_SECONDS))  /* also rejects NaN */
    opt_error(L, name, "must be a positive number of seconds (at most a day)");
  return (long)ceil(seconds * 1000);
}

static size_t opt_bytes(lua_State *L, int opts, const char *name, double def) {
  double n = def;
  if (opt_get(L, opts, name) != LUA_TNIL)
    n = (double)lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(n >= 1 && n <= FS_MAX_MAX_BODY && floor(n) == n))
    opt_error(L, name, "must be a whole number of bytes from 1 to 1 GiB");
  return (size_t)n;
}

static int opt_boolean(lua_State *L, int opts, const char *name) {
  int b;
  opt_get(L, opts, name);
  b = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return b;
}

static void check_run_id(lua_State *L, fs_args *a) {
  size_t len;
  if (lua_type(L, 1) != LUA_TSTRING)  /* not even a number: ids are text */
    luaL_argerror(L, 1, lua_pushfstring(L,
                  "run id must be a non-empty string, got %s", luaL_typename(L, 1)));
  a->run_id = lua_tolstring(L, 1, &len);
  if (len == 0)
    luaL_argerror(L, 1, "run id must be a non-empty string");
  if (!fs_header_value_ok(a->run_id, len))
    luaL_argerror(L, 1, "run id contains CR, LF or NUL");
  if (strcmp(a->run_id, ".") == 0 || strcmp(a->run_id, "..") == 0)
    luaL_argerror(L, 1, "run id may not be '.' or '..'");  /* path traversal */
}

static int header_index(const char *name) {
  int i;
  for (i = 0; i < H_COUNT; i++)
    if (curl_strequal(name, fs_header_names[i]))
      return i;
  return -1;
}

/* opts.headers, first pass: validate all, let them replace our defaults. */
static void check_extra_headers(lua_State *L, fs_args *a) {
  if (a->headers_table == 0)
    return;
  lua_pushnil(L);
  while (lua_next(L, a->headers_table) != 0) {
    size_t nlen, vlen;
    const char *name, *value;
    int i;
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      opt_error(L, "headers", "must map header names to string values");
    name = lua_tolstring(L, -2, &nlen);
    value = lua_tolstring(L, -1, &vlen);
    if (!fs_header_name_ok(name, nlen))
      opt_error(L, "headers", "holds a name that is not an HTTP token");
    if (!fs_header_value_ok(value, vlen))
      opt_error(L, "headers", lua_pushfstring(L,
                "holds a value for '%s' with CR, LF or NUL", name));
    i = header_index(name);
    if (i >= 0 && i <= H_PROTECTED)
      opt_error(L, "headers", lua_pushfstring(L,
                "may not set '%s' (use the option '%s')",
                fs_header_names[i], fs_header_options[i]));
    if (i >= 0)
      a->header[i] = value;
    lua_pop(L, 1);
  }
}

/* A fresh id per attempt lets Adobe support find the exact request. */
static void push_request_id(lua_State *L) {
  unsigned char b[16];
  char id[37];
  size_t got = 0;
#if defined(__linux__)
  ssize_t n = getrandom(b, sizeof b, GRND_NONBLOCK);
  got = n > 0 ? (size_t)n : 0;
#endif
  if (got < sizeof b) {  /* a tracing id, not a secret: a weak fallback is fine */
    unsigned long x = (unsigned long)time(NULL) ^ (unsigned long)clock()
                      ^ (unsigned long)(size_t)&got;
    for (; got < sizeof b; got++) {
      x = x * 6364136223846793005UL + 1442695040888963407UL;
      b[got] = (unsigned char)(x >> 33);
    }
  }
  b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);  /* version 4 */
  b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);  /* RFC 4122 variant */
  snprintf(id, sizeof id,
           "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
           b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
           b[11], b[12], b[13], b[14], b[15]);
  lua_pushstring(L, id);
}

/* Leaves on the stack the strings it makes (bearer value, request id). */
static void check_args(lua_State *L, fs_args *a) {
  const int opts = 2;
  const char **h;
  memset(a, 0, sizeof *a);
  h = a->header;
  check_run_id(L, a);
  luaL_checktype(L, opts, LUA_TTABLE);
  check_option_keys(L, opts);
  h[H_AUTHORIZATION] = lua_pushfstring(L, "Bearer %s",
      opt_string(L, opts, "access_token", NULL, 1));
  h[H_API_KEY] = opt_string(L, opts, "api_key", NULL, 1);
  h[H_ORG_ID] = opt_string(L, opts, "org_id", NULL, 1);
  h[H_SANDBOX] = opt_string(L, opts, "sandbox", FS_DEFAULT_SANDBOX, 0);
  h[H_CONTENT_TYPE] = "application/json";
  h[H_ACCEPT] = "application/json";
  h[H_REQUEST_ID] = opt_string(L, opts, "request_id", NULL, 0);
  if (h[H_REQUEST_ID] == NULL || *h[H_REQUEST_ID] == '\0') {
    push_request_id(L);
    h[H_REQUEST_ID] = lua_tostring(L, -1);
  }
  h[H_IF_MATCH] = opt_string(L, opts, "if_match", NULL, 0);
  h[H_USER_AGENT] = opt_string(L, opts, "user_agent",
                               lua_tostring(L, FS_UV_USER_AGENT), 0);
  a->base_url = opt_string(L, opts, "base_url", FS_DEFAULT_BASE_URL, 0);
  a->op = opt_string(L, opts, "op", FS_DEFAULT_OP, 0);
  a->max_body = opt_bytes(L, opts, "max_body", FS_DEFAULT_MAX_BODY);
  a->transport.timeout_ms = opt_milliseconds(L, opts, "timeout",
                                             FS_DEFAULT_TIMEOUT);
  a->transport.connect_timeout_ms = opt_milliseconds(L, opts,
      "connect_timeout", FS_DEFAULT_CONNECT_TIMEOUT);
  a->transport.ca_file = opt_string(L, opts, "ca_file", NULL, 0);
  a->transport.ca_path = opt_string(L, opts, "ca_path", NULL, 0);
  a->transport.proxy = opt_string(L, opts, "proxy", NULL, 0);
  a->transport.insecure = opt_boolean(L, opts, "insecure");
  if (opt_get(L, opts, "headers") == LUA_TTABLE)
    a->headers_table = lua_gettop(L);  /* stays: pass two reads it again */
  else
    lua_pop(L, 1);
  check_extra_headers(L, a);
}


/* ---------------------------------------------------------------------
** The call object
*/

static int call_gc(lua_State *L) {
  fs_call *c = (fs_call *)luaL_checkudata(L, 1, FS_CALL_MT);
  fs_transfer_free(&c->transfer);
  fs_engine_free(&c->engine);
  return 0;
}

static fs_call *call_new(lua_State *L) {
  fs_call *c = (fs_call *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  luaL_getmetatable(L, FS_CALL_MT);
  lua_setmetatable(L, -2);  /* from here on __gc frees what we acquire */
  return c;
}

static void call_check(lua_State *L, CURLcode rc) {
  if (rc != CURLE_OK)
    luaL_error(L, "flowservice: libcurl setup failed: %s",
               curl_easy_strerror(rc));
}

static void call_add_header(lua_State *L, fs_transfer *t, const char *name,
                            const char *value) {
  /* "Name;" is libcurl's way to send a header with an empty value */
  const char *line = *value ? lua_pushfstring(L, "%s: %s", name, value)
                            : lua_pushfstring(L, "%s;", name);
  struct curl_slist *list = curl_slist_append(t->headers, line);
  lua_pop(L, 1);
  if (list == NULL)
    luaL_error(L, "flowservice: out of memory");
  t->headers = list;
}

static void call_add_headers(lua_State *L, fs_call *c, const fs_args *a) {
  int i;
  for (i = 0; i < H_COUNT; i++)
    if (a->header[i] != NULL)
      call_add_header(L, &c->transfer, fs_header_names[i], a->header[i]);
  if (a->headers_table == 0)
    return;
  lua_pushnil(L);  /* second pass: the names that are not ours */
  while (lua_next(L, a->headers_table) != 0) {
    const char *name = lua_tostring(L, -2);
    if (header_index(name) < 0)
      call_add_header(L, &c->transfer, name, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

static void call_prepare(lua_State *L, fs_call *c, const fs_args *a) {
  fs_transfer *t = &c->transfer;
  const char *why;
  char *url;
  if (fs_engine_init(&c->engine) != 0)
    luaL_error(L, "flowservice: libcurl setup failed: no multi handle");
  call_check(L, fs_transfer_init(t, a->max_body));
  why = fs_url_run_action(t->easy, a->base_url, a->run_id, a->op, &url);
  if (why != NULL)
    opt_error(L, "base_url", why);
  call_add_headers(L, c, a);
  call_check(L, fs_request_transport(t, &a->transport));
  {
    CURLcode rc = fs_request_post_empty(t, url);  /* libcurl copied url */
    curl_free(url);
    call_check(L, rc);
  }
}


/* ---------------------------------------------------------------------
** Results
*/

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

static void set_string(lua_State *L, const char *key, const char *value) {
  lua_pushstring(L, value);
  lua_setfield(L, -2, key);
}

static void set_integer(lua_State *L, const char *key, double value) {
  lua_pushnumber(L, (lua_Number)value);
#if LUA_VERSION_NUM >= 503
  if (value == (double)(lua_Integer)value) {
    lua_pop(L, 1);
    lua_pushinteger(L, (lua_Integer)value);
  }
#endif
  lua_setfield(L, -2, key);
}

static void set_boolean(lua_State *L, const char *key, int value) {
  lua_pushboolean(L, value);
  lua_setfield(L, -2, key);
}

/* The common fields of every error: the Lua face adds Adobe's reading. */
static void push_error(lua_State *L, const fs_transfer *t, const char *kind,
                       const char *request_id) {
  lua_createtable(L, 0, 8);
  set_string(L, "kind", kind);
  set_string(L, "request_id", request_id);
  set_boolean(L, "sent", fs_transfer_sent(t));
  if (t->sends > 1)
    set_boolean(L, "resent", 1);
}

static int push_transport_error(lua_State *L, const fs_transfer *t,
                                const char *request_id) {
  lua_pushnil(L);
  push_error(L, t, transport_error_kind(t), request_id);
  if (t->too_large || t->result == CURLE_FILESIZE_EXCEEDED)
    lua_pushfstring(L, "reply too large: more than max_body (%d bytes)",
                    (int)t->max_body);
  else if (t->out_of_memory)
    lua_pushliteral(L, "out of memory while reading the reply");
  else
    lua_pushstring(L, t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->result));
  lua_setfield(L, -2, "message");
  set_integer(L, "curl_code", (double)t->result);
  return 2;
}

static void set_retry_after(lua_State *L, const fs_transfer *t) {
#if FS_CURL_AT_LEAST(7, 83, 0)
  struct curl_header *h;
  curl_off_t seconds;
  if (curl_easy_header(t->easy, "Retry-After", 0, CURLH_HEADER, -1, &h)
          == CURLHE_OK
      && curl_easy_getinfo(t->easy, CURLINFO_RETRY_AFTER, &seconds) == CURLE_OK)
    set_integer(L, "retry_after", (double)seconds);
#else
  (void)L; (void)t;
#endif
}

static int push_http_error(lua_State *L, const fs_transfer *t, long status,
                           const char *kind, const char *request_id) {
  lua_pushnil(L);
  push_error(L, t, kind, request_id);
  set_integer(L, "status", (double)status);
  lua_pushlstring(L, t->body ? t->body : "", t->body_len);
  lua_setfield(L, -2, "body");
  set_retry_after(L, t);
  return 2;
}

static int push_decode_error(lua_State *L, const fs_transfer *t, long status,
                             const char *message, const char *request_id) {
  push_http_error(L, t, status, "decode", request_id);
  set_string(L, "message", message);
  return 2;
}

/* 2xx: {id, etag} from either reply shape (the docs' or the OpenAPI run). */
static int push_reply(lua_State *L, const fs_transfer *t, long status,
                      const char *request_id) {
  int reply;
  lua_pushvalue(L, FS_UV_DECODE);
  lua_pushlstring(L, t->body ? t->body : "", t->body_len);
  lua_call(L, 1, 2);
  if (lua_type(L, -2) != LUA_TTABLE)
    return push_decode_error(L, t, status, lua_isstring(L, -1)
                             ? lua_pushfstring(L, "reply is not a JSON object: %s",
                                               lua_tostring(L, -1))
                             : "reply is not a JSON object", request_id);
  lua_pop(L, 1);
  reply = lua_gettop(L);
  lua_createtable(L, 0, 3);
  lua_getfield(L, reply, "id");
  if (lua_type(L, -1) != LUA_TSTRING)
    return push_decode_error(L, t, status, "reply has no run id", request_id);
  lua_setfield(L, -2, "id");
  lua_getfield(L, reply, "etag");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_getfield(L, reply, "eTag");
  }
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
    return push_decode_error(L, t, status, "reply has a non-string etag",
                             request_id);
  lua_setfield(L, -2, "etag");
  if (t->sends > 1)
    set_boolean(L, "resent", 1);
  return 1;
}

static int push_outcome(lua_State *L, const fs_transfer *t,
                        const char *request_id) {
  long status = 0;
  if (t->result != CURLE_OK)
    return push_transport_error(L, t, request_id);
  if (curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK)
    status = 0;
  if (status < 200 || status > 299)
    return push_http_error(L, t, status, "http", request_id);
  return push_reply(L, t, status, request_id);
}


/* ---------------------------------------------------------------------
** Module
*/

static int core_retrigger(lua_State *L) {
  fs_args a;
  fs_call *c;
  CURLMcode mc;
  int n;
  check_args(L, &a);
  c = call_new(L);
  call_prepare(L, c, &a);
  mc = fs_engine_run(&c->engine, &c->transfer);
  if (mc != CURLM_OK)
    return luaL_error(L, "flowservice: libcurl engine failed: %s",
                      curl_multi_strerror(mc));
  n = push_outcome(L, &c->transfer, a.header[H_REQUEST_ID]);
  fs_transfer_free(&c->transfer);  /* now, not at the next collection */
  fs_engine_free(&c->engine);
  return n;
}

static void push_defaults(lua_State *L) {
  lua_createtable(L, 0, 7);
  set_string(L, "base_url", FS_DEFAULT_BASE_URL);
  set_string(L, "sandbox", FS_DEFAULT_SANDBOX);
  set_string(L, "op", FS_DEFAULT_OP);
  set_integer(L, "timeout", FS_DEFAULT_TIMEOUT);
  set_integer(L, "connect_timeout", FS_DEFAULT_CONNECT_TIMEOUT);
  set_integer(L, "max_body", FS_DEFAULT_MAX_BODY);
  lua_pushvalue(L, -2);  /* the user agent string below it */
  lua_setfield(L, -2, "user_agent");
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

int luaopen_flowservice_core(lua_State *L) {
  static const luaL_Reg functions[] = {
    {"retrigger", core_retrigger},
    {NULL, NULL}
  };
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)  /* ref-counted */
    return luaL_error(L, "flowservice: curl_global_init failed");
  luaL_newmetatable(L, FS_CALL_MT);
  lua_pushcfunction(L, call_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_newtable(L);
  push_decoder(L);
  lua_pushfstring(L, "lua-flowservice/%s libcurl/%s", FS_VERSION,
                  curl_version_info(CURLVERSION_NOW)->version);
  push_defaults(L);
  lua_setfield(L, -4, "defaults");
  fs_setfuncs(L, functions, 2);
  set_string(L, "_VERSION", FS_VERSION);
  /* not curl_version(): it initialises libldap/libsasl, whose memory is
  ** lost when Lua unloads the library at exit */
  set_string(L, "curl_version", curl_version_info(CURLVERSION_NOW)->version);
  return 1;
}
