#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

#include "compat.h"
#include "request.h"

/* Request defaults: kept beside the code that applies them. */
#define FS_DEFAULT_BASE_URL "https://platform.adobe.io/data/foundation/flowservice"
#define FS_DEFAULT_SANDBOX "prod"
#define FS_DEFAULT_OP "re-trigger"
#define FS_DEFAULT_TIMEOUT 60.0
#define FS_DEFAULT_CONNECT_TIMEOUT 10.0
#define FS_DEFAULT_MAX_BODY (8.0 * 1024 * 1024)
#define FS_MAX_SECONDS 86400.0  /* a longer wait is a mistake, not a wish */
#define FS_MAX_MAX_BODY (1024.0 * 1024 * 1024)

/* lua-cjson's config-table style: every option, with the type it takes. */
enum {
  O_ACCESS_TOKEN, O_API_KEY, O_ORG_ID, O_SANDBOX, O_BASE_URL, O_OP,
  O_IF_MATCH, O_REQUEST_ID, O_HEADERS, O_TIMEOUT, O_CONNECT_TIMEOUT,
  O_CA_FILE, O_CA_PATH, O_PROXY, O_INSECURE, O_USER_AGENT, O_MAX_BODY,
  O_COUNT
};

static const struct {
  const char *name;
  int type;
} request_options[O_COUNT] = {
  {"access_token", LUA_TSTRING}, {"api_key", LUA_TSTRING},
  {"org_id", LUA_TSTRING}, {"sandbox", LUA_TSTRING},
  {"base_url", LUA_TSTRING}, {"op", LUA_TSTRING},
  {"if_match", LUA_TSTRING}, {"request_id", LUA_TSTRING},
  {"headers", LUA_TTABLE}, {"timeout", LUA_TNUMBER},
  {"connect_timeout", LUA_TNUMBER}, {"ca_file", LUA_TSTRING},
  {"ca_path", LUA_TSTRING}, {"proxy", LUA_TSTRING},
  {"insecure", LUA_TBOOLEAN}, {"user_agent", LUA_TSTRING},
  {"max_body", LUA_TNUMBER}
};

/* The options table read in one pass; strings stay alive in the table. */
typedef struct opt_values {
  int opts;  /* stack index, for error messages */
  int present[O_COUNT];
  const char *str[O_COUNT];
  size_t len[O_COUNT];
  lua_Number num[O_COUNT];
  int boolean[O_COUNT];
} opt_values;

static const char *const header_names[H_COUNT] = {
  "Authorization", "x-api-key", "x-gw-ims-org-id", "x-sandbox-name",
  "Content-Type", "Accept", "x-request-id", "If-Match", "User-Agent"
};

static const char *const header_options[H_PROTECTED + 1] = {
  "access_token", "api_key", "org_id", "sandbox"
};


/* ---------------------------------------------------------------------
** Byte-level checks
*/

/* RFC 9110 token characters: anything else could end or split a header. */
static int is_token(const char *s, size_t len) {
  static const char extra[] = "!#$%&'*+-.^_`|~";
  size_t i;
  if (len == 0)
    return 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z')
                || (c >= 'A' && c <= 'Z');
    if (!alnum && (c == '\0' || strchr(extra, c) == NULL))
      return 0;
  }
  return 1;
}

/* Bytes below 0x20 but tab, and DEL: CR and LF would split a header, NUL
** would cut it short, and no header or URL needs the others. */
static int has_control(const char *s, size_t len) {
  size_t i;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if ((c < 0x20 && c != '\t') || c == 0x7f)
      return 1;
  }
  return 0;
}

/* Empty, or only spaces and tabs: libcurl would send "Name: " as no header. */
static int is_blank(const char *s, size_t len) {
  size_t i;
  for (i = 0; i < len; i++)
    if (s[i] != ' ' && s[i] != '\t')
      return 0;
  return 1;
}

/* RFC 3986 unreserved: the only bytes a run id needs, and none that a
** decoding proxy could turn into another path. */
static int is_unreserved(const char *s, size_t len) {
  static const unsigned char unreserved[256] = {
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1,
    ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1,
    ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1,
    ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1,
    ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1,
    ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1,
    ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1, ['-'] = 1, ['_'] = 1,
    ['.'] = 1, ['~'] = 1
  };
  size_t i;
  for (i = 0; i < len; i++)
    if (!unreserved[(unsigned char)s[i]])
      return 0;
  return 1;
}

const char *fs_run_id_problem(const char *s, size_t len) {
  if (len == 0)
    return "run id must be a non-empty string";
  if (!is_unreserved(s, len))
    return "run id may hold only letters, digits, '-', '_', '.' and '~'";
  if (s[0] == '.' && (len == 1 || (len == 2 && s[1] == '.')))
    return "run id may not be '.' or '..'";
  return NULL;
}

static int header_index(const char *name) {
  int i;
  for (i = 0; i < H_COUNT; i++)
    if (curl_strequal(name, header_names[i]))
      return i;
  return -1;
}

/* Headers that frame the message: libcurl writes them, opts.headers may not. */
static const char *transport_header(const char *name) {
  static const char *const names[] = {
    "Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "TE",
    "Upgrade", NULL
  };
  int i;
  for (i = 0; names[i] != NULL; i++)
    if (curl_strequal(name, names[i]))
      return names[i];
  return NULL;
}


/* ---------------------------------------------------------------------
** Options
*/

static int opt_error(lua_State *L, int opts, const char *name, const char *what) {
  return luaL_argerror(L, opts, lua_pushfstring(L, "option '%s' %s", name, what));
}

/* By length too: "sandbox\0x" is not "sandbox" (found by fuzz/request). */
static int option_index(const char *key, size_t len) {
  int i;
  for (i = 0; i < O_COUNT; i++)
    if (len > 0 && request_options[i].name[0] == key[0]
        && strlen(request_options[i].name) == len && memcmp(request_options[i].name, key, len) == 0)
      return i;
  return -1;
}

/* One pass over the table (raw: a metatable must not add options). */
static void read_options(lua_State *L, int opts, opt_values *v) {
  memset(v, 0, sizeof *v);
  v->opts = opts;
  lua_pushnil(L);
  while (lua_next(L, opts) != 0) {
    int i;
    size_t len;
    const char *key;
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_argerror(L, opts, lua_pushfstring(L,
                    "option names must be strings, got %s", luaL_typename(L, -2)));
    key = lua_tolstring(L, -2, &len);
    i = option_index(key, len);
    if (i < 0)
      opt_error(L, opts, lua_tostring(L, -2), "is unknown");
    if (lua_type(L, -1) != request_options[i].type)
      opt_error(L, opts, request_options[i].name, lua_pushfstring(L,
                "must be a %s, got %s", lua_typename(L, request_options[i].type),
                luaL_typename(L, -1)));
    v->present[i] = 1;
    if (request_options[i].type == LUA_TSTRING)
      v->str[i] = lua_tolstring(L, -1, &v->len[i]);  /* the table keeps it */
    else if (request_options[i].type == LUA_TNUMBER)
      v->num[i] = lua_tonumber(L, -1);
    else if (request_options[i].type == LUA_TBOOLEAN)
      v->boolean[i] = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
}

static const char *opt_string(lua_State *L, const opt_values *v, int i,
                              const char *def, int required) {
  const char *name = request_options[i].name;
  if (!v->present[i]) {
    if (required)
      opt_error(L, v->opts, name, "is required");
    return def;
  }
  if (has_control(v->str[i], v->len[i]))
    opt_error(L, v->opts, name, "contains a control character");
  if (v->len[i] == 0 && (required || def != NULL))
    opt_error(L, v->opts, name, "must not be empty");
  return v->str[i];
}

/* A header value that must carry something: not even spaces alone. */
static const char *opt_nonblank(lua_State *L, const opt_values *v, int i,
                                const char *def, int required) {
  const char *s = opt_string(L, v, i, def, required);
  if (v->present[i] && is_blank(v->str[i], v->len[i]))
    opt_error(L, v->opts, request_options[i].name,
              v->len[i] == 0 ? "must not be empty" : "must not be blank");
  return s;
}

static long opt_milliseconds(lua_State *L, const opt_values *v, int i, double def) {
  double seconds = v->present[i] ? (double)v->num[i] : def;
  if (!(seconds > 0 && seconds <= FS_MAX_SECONDS))  /* also rejects NaN */
    opt_error(L, v->opts, request_options[i].name,
              "must be a positive number of seconds (at most a day)");
  return (long)ceil(seconds * 1000);
}

static size_t opt_bytes(lua_State *L, const opt_values *v, int i, double def) {
  double n = v->present[i] ? (double)v->num[i] : def;
  if (!(n >= 1 && n <= FS_MAX_MAX_BODY && floor(n) == n))
    opt_error(L, v->opts, request_options[i].name,
              "must be a whole number of bytes from 1 to 1 GiB");
  return (size_t)n;
}

/* opts.headers, first pass: validate all, let them replace our defaults. */
static void check_extra_headers(lua_State *L, int opts, fs_request *r) {
  if (r->headers_table == 0)
    return;
  lua_pushnil(L);
  while (lua_next(L, r->headers_table) != 0) {
    size_t nlen, vlen;
    const char *name, *value;
    int i;
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      opt_error(L, opts, "headers", "must map header names to string values");
    name = lua_tolstring(L, -2, &nlen);
    value = lua_tolstring(L, -1, &vlen);
    if (!is_token(name, nlen))
      opt_error(L, opts, "headers", "holds a name that is not an HTTP token");
    if (has_control(value, vlen))
      opt_error(L, opts, "headers", lua_pushfstring(L,
                "holds a value for '%s' with a control character", name));
    if (transport_header(name) != NULL)
      opt_error(L, opts, "headers", lua_pushfstring(L,
                "may not set '%s' (libcurl writes it)", transport_header(name)));
    i = header_index(name);
    if (i >= 0 && i <= H_PROTECTED)
      opt_error(L, opts, "headers", lua_pushfstring(L,
                "may not set '%s' (use the option '%s')",
                header_names[i], header_options[i]));
    if (i == H_IF_MATCH && is_blank(value, vlen))  /* would go out unconditional */
      opt_error(L, opts, "headers", "holds a blank value for 'If-Match'");
    if (i >= 0)
      r->header[i] = value;
    lua_pop(L, 1);
  }
}

/* A fresh id per attempt lets Adobe support find the exact request:
** random bytes from the client's engine (kernel randomness, fetched in
** batches), else from getrandom() itself; written into r (no Lua string). */
static const char *make_request_id(fs_request *r) {
  fs_engine *engine = r->engine;
  unsigned char b[16];
  char *id = r->request_id;
  size_t got = 0;
  if (engine != NULL) {
    fs_engine_random(engine, b, sizeof b);
    got = sizeof b;
  }
#if defined(__linux__)
  if (got < sizeof b) {
    ssize_t n = getrandom(b, sizeof b, GRND_NONBLOCK);
    got = n > 0 ? (size_t)n : 0;
  }
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
  {
    /* 8-4-4-4-12 hex digits: where each byte's two go */
    static const char hex[] = "0123456789abcdef";
    static const unsigned char at[16] = { 0, 2, 4, 6, 9, 11, 14, 16,
                                          19, 21, 24, 26, 28, 30, 32, 34 };
    size_t i;
    for (i = 0; i < sizeof b; i++) {
      id[at[i]] = hex[b[i] >> 4];
      id[at[i] + 1] = hex[b[i] & 15];
    }
    id[8] = id[13] = id[18] = id[23] = '-';
    id[36] = '\0';
  }
  return id;
}

static int url_scheme_is_http(CURLU *u) {
  char *scheme = NULL;
  int ok = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK
           && (strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0);
  curl_free(scheme);
  return ok;
}

void fs_url_cache_free(fs_url_cache *cache) {
  free(cache->base_url);
  curl_free(cache->prefix);
  cache->base_url = NULL;
  cache->prefix = NULL;
}

/* The base's URL minus trailing slashes; NULL if it carries a query or
** fragment (then every run URL goes through libcurl's URL API). */
static char *url_prefix(CURLU *u) {
  char *part = NULL, *url = NULL;
  size_t len;
  if (curl_url_get(u, CURLUPART_QUERY, &part, 0) == CURLUE_OK
      || curl_url_get(u, CURLUPART_FRAGMENT, &part, 0) == CURLUE_OK) {
    curl_free(part);
    return NULL;
  }
  if (curl_url_get(u, CURLUPART_URL, &url, 0) != CURLUE_OK)
    return NULL;
  len = strlen(url);
  while (len > 0 && url[len - 1] == '/')
    url[--len] = '\0';
  return url;
}

const char *fs_url_problem(const char *url) {
  const char *why = NULL;
  CURLU *u = curl_url();
  if (u == NULL)
    return "could not be checked (out of memory)";
  if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK)
    why = "is not a valid URL";
  else if (!url_scheme_is_http(u))
    why = "must be an http:// or https:// URL";
  curl_url_cleanup(u);
  return why;
}

/* Checks base_url, once per distinct value when the client keeps a cache. */
static void check_base_url(lua_State *L, int opts, const char *base_url,
                           fs_url_cache *cache) {
  const char *why;
  CURLU *u;
  if (cache != NULL && cache->base_url != NULL && strcmp(cache->base_url, base_url) == 0)
    return;
  why = fs_url_problem(base_url);
  if (why != NULL)
    opt_error(L, opts, "base_url", why);
  if (cache == NULL)
    return;
  u = curl_url();
  fs_url_cache_free(cache);
  if (u != NULL && curl_url_set(u, CURLUPART_URL, base_url, 0) == CURLUE_OK) {
    cache->base_url = (char *)malloc(strlen(base_url) + 1);
    if (cache->base_url != NULL) {
      strcpy(cache->base_url, base_url);
      cache->prefix = url_prefix(u);
    }
  }
  curl_url_cleanup(u);
}

/* The runtime libcurl, not the headers we compiled against. */
static const char *push_user_agent(lua_State *L) {
  return lua_pushfstring(L, "lua-flowservice/%s libcurl/%s", FS_VERSION,
                         curl_version_info(CURLVERSION_NOW)->version);
}

static void read_identity(lua_State *L, const opt_values *v, int flags, fs_request *r) {
  const char *token = opt_nonblank(L, v, O_ACCESS_TOKEN, NULL, !(flags & FS_TOKEN_LATER));
  if (token != NULL)
    r->header[H_AUTHORIZATION] = lua_pushfstring(L, "Bearer %s", token);
  r->header[H_API_KEY] = opt_nonblank(L, v, O_API_KEY, NULL, 1);
  r->header[H_ORG_ID] = opt_nonblank(L, v, O_ORG_ID, NULL, 1);
  r->header[H_SANDBOX] = opt_nonblank(L, v, O_SANDBOX, FS_DEFAULT_SANDBOX, 0);
}

/* The options one call may change; every other one is the template's. */
static int per_call_option(int i) {
  return i == O_IF_MATCH || i == O_REQUEST_ID || i == O_HEADERS || i == O_TIMEOUT;
}

/* The headers a template sends, in wire order after the call's own. */
static const int template_headers[] = {
  H_AUTHORIZATION, H_API_KEY, H_ORG_ID, H_SANDBOX, H_CONTENT_TYPE, H_ACCEPT, H_USER_AGENT
};
#define FS_TEMPLATE_HEADERS (sizeof template_headers / sizeof template_headers[0])

/* fs_template.wire_refs: a run action's last piece, the host, the pool */
enum { WIRE_REF_TAIL, WIRE_REF_HOST, WIRE_REF_POOL, WIRE_REFS };

struct fs_template {
  unsigned long config;       /* the engine's number for these options */
  int flags;
  /* made from, or matched by, the client's own copy of its options (see
  ** fs_request.own_options): what read_per_call made of that table, which
  ** keeps these strings alive (NULL: none; a fresh request id each call) */
  int own;
  const char *own_request_id, *own_if_match;
  long own_timeout_ms;
  int own_headers;  /* it has headers: a table of the caller's, read each call */
  /* what they mean, checked: strings in block (what a call reads first,
  ** the raw values last) */
  const char *header[H_COUNT];
  const char *base_url, *op, *ca_file, *ca_path, *proxy;
  long connect_timeout_ms;
  int insecure;
  size_t max_body;
  char *url_head;             /* "{prefix}/runs/", or NULL: no fast URL */
  char *url_tail;             /* "/action?op={escaped op}" */
  size_t url_head_len, url_tail_len;
  char *path_head;            /* "{base path}/runs/" as libcurl reads url_head,
                              ** or NULL: a call sets the whole URL */
  size_t path_head_len;
  fs_tail *tail;              /* the header lines above, shared */
  char *block;
  fs_wire_target wire;        /* url_head read for the nginx transport, once */
  char *wire_tail;            /* the tail's lines as the wire has them, once,
                              ** then a run action's end (RUN_ACTION_END) */
  size_t wire_tail_len;       /* the lines' bytes */
  /* the nginx transport's strings of it, made at its first call there and
  ** kept in the registry (LUA_NOREF: not yet): pushed again by reference,
  ** not interned anew each call */
  int wire_refs[WIRE_REFS];
  /* the raw values it was made from, to recognise them: copies in block */
  int present[O_COUNT];
  const char *str[O_COUNT];
  size_t len[O_COUNT];
  lua_Number num[O_COUNT];
  int boolean[O_COUNT];
};

void fs_template_free(lua_State *L, fs_template *tmpl) {
  int i;
  if (tmpl == NULL)
    return;
  for (i = 0; i < WIRE_REFS; i++)
    if (tmpl->wire_refs[i] != LUA_NOREF)
      luaL_unref(L, LUA_REGISTRYINDEX, tmpl->wire_refs[i]);
  fs_tail_release(tmpl->tail);
  fs_wire_target_free(&tmpl->wire);
  free(tmpl->wire_tail);
  free(tmpl->block);
  free(tmpl->url_head);
  curl_free(tmpl->path_head);
  free(tmpl);
}

unsigned long fs_template_config(const fs_template *tmpl) {
  return tmpl->config;
}

static int template_matches(const fs_template *t, const opt_values *v, int flags) {
  int i;
  if (t->flags != flags)
    return 0;
  for (i = 0; i < O_COUNT; i++) {
    if (per_call_option(i))
      continue;
    if (v->present[i] != t->present[i])
      return 0;
    if (!v->present[i])
      continue;
    if (request_options[i].type == LUA_TSTRING) {
      if (v->len[i] != t->len[i] || memcmp(v->str[i], t->str[i], v->len[i]) != 0)
        return 0;
    } else if (request_options[i].type == LUA_TNUMBER) {
      if (!(v->num[i] == t->num[i]))  /* NaN never matches: checked again */
        return 0;
    } else if (v->boolean[i] != t->boolean[i]) {
      return 0;
    }
  }
  return 1;
}

/* Copies s (len bytes, or to its NUL) into *at; NULL stays NULL. */
static const char *block_copy(char **at, const char *s, size_t len) {
  char *d = *at;
  if (s == NULL)
    return NULL;
  memcpy(d, s, len);
  d[len] = '\0';
  *at += len + 1;
  return d;
}

static size_t block_size(const char *s) {
  return s != NULL ? strlen(s) + 1 : 0;
}

static struct curl_slist *append_line(struct curl_slist *list, const char *name,
                                      const char *value, int *failed);

/* The path of the template's run URLs before the run id, as libcurl reads
** them: "{base path}/runs/" (so that a call can set the path alone, see
** set_template_url), or NULL when libcurl reads them otherwise. */
static char *path_head(const fs_template *t, size_t *len) {
  static const char tail[] = "0/action";
  CURLU *u = curl_url();
  char *url = (char *)malloc(t->url_head_len + 1 + t->url_tail_len + 1), *path = NULL;
  size_t n = 0;
  if (u != NULL && url != NULL) {
    memcpy(url, t->url_head, t->url_head_len);
    url[t->url_head_len] = '0';
    memcpy(url + t->url_head_len + 1, t->url_tail, t->url_tail_len + 1);
    if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK
        && curl_url_get(u, CURLUPART_PATH, &path, 0) == CURLUE_OK) {
      n = strlen(path);
      if (n >= sizeof tail - 1 + sizeof "/runs/" - 1
          && strcmp(path + n - (sizeof tail - 1), tail) == 0
          && strncmp(path + n - (sizeof tail - 1) - (sizeof "/runs/" - 1), "/runs/",
                     sizeof "/runs/" - 1) == 0) {
        n -= sizeof tail - 1;
        path[n] = '\0';
      } else {
        curl_free(path);
        path = NULL;
      }
    }
  }
  free(url);
  curl_url_cleanup(u);
  *len = path != NULL ? n : 0;
  return path;
}

/* A template for r's options as checked (before opts.headers): NULL when
** out of memory (then the call is built without one). */
static fs_template *template_new(const opt_values *v, int flags, const fs_request *r) {
  fs_template *t = (fs_template *)calloc(1, sizeof *t);
  size_t size = 0, k;
  int i, failed = 0;
  char *at;
  if (t == NULL)
    return NULL;
  for (k = 0; k < WIRE_REFS; k++)
    t->wire_refs[k] = LUA_NOREF;
  for (i = 0; i < O_COUNT; i++)
    if (!per_call_option(i) && v->present[i] && request_options[i].type == LUA_TSTRING)
      size += v->len[i] + 1;
  for (k = 0; k < FS_TEMPLATE_HEADERS; k++)
    size += block_size(r->header[template_headers[k]]);
  size += block_size(r->base_url) + block_size(r->op) + block_size(r->ca_file)
          + block_size(r->ca_path) + block_size(r->proxy);
  t->block = at = (char *)malloc(size + 1);
  t->tail = (fs_tail *)calloc(1, sizeof *t->tail);
  if (t->block == NULL || t->tail == NULL) {
    free(t->tail);
    t->tail = NULL;
    fs_template_free(NULL, t);  /* no references yet */
    return NULL;
  }
  t->tail->refs = 1;
  t->flags = flags;
  for (i = 0; i < O_COUNT; i++) {
    if (per_call_option(i) || !v->present[i])
      continue;
    t->present[i] = 1;
    t->num[i] = v->num[i];
    t->boolean[i] = v->boolean[i];
    t->len[i] = v->len[i];
    if (request_options[i].type == LUA_TSTRING)
      t->str[i] = block_copy(&at, v->str[i], v->len[i]);
  }
  for (k = 0; k < FS_TEMPLATE_HEADERS; k++) {
    int h = template_headers[k];
    const char *value = r->header[h];
    t->header[h] = block_copy(&at, value, value ? strlen(value) : 0);
    if (value != NULL)
      t->tail->list = append_line(t->tail->list, header_names[h], t->header[h], &failed);
  }
  t->base_url = block_copy(&at, r->base_url, strlen(r->base_url));
  t->op = block_copy(&at, r->op, strlen(r->op));
  t->ca_file = block_copy(&at, r->ca_file, r->ca_file ? strlen(r->ca_file) : 0);
  t->ca_path = block_copy(&at, r->ca_path, r->ca_path ? strlen(r->ca_path) : 0);
  t->proxy = block_copy(&at, r->proxy, r->proxy ? strlen(r->proxy) : 0);
  t->connect_timeout_ms = r->connect_timeout_ms;
  t->insecure = r->insecure;
  t->max_body = r->max_body;
  /* the hot URL: the run id (unreserved bytes only) goes between the two */
  if (r->cache != NULL && r->cache->prefix != NULL && strcmp(r->cache->base_url, r->base_url) == 0) {
    char *op = curl_easy_escape(NULL, r->op, 0);
    size_t plen = strlen(r->cache->prefix);
    if (op != NULL) {
      t->url_head_len = plen + sizeof "/runs/" - 1;
      t->url_tail_len = sizeof "/action?op=" - 1 + strlen(op);
      t->url_head = (char *)malloc(t->url_head_len + t->url_tail_len + 2);
      if (t->url_head != NULL) {
        t->url_tail = t->url_head + t->url_head_len + 1;
        memcpy(t->url_head, r->cache->prefix, plen);
        strcpy(t->url_head + plen, "/runs/");
        strcpy(t->url_tail, "/action?op=");
        strcpy(t->url_tail + sizeof "/action?op=" - 1, op);
      }
      curl_free(op);
    }
    if (t->url_head == NULL)
      failed = 1;
    else
      t->path_head = path_head(t, &t->path_head_len);
  }
  if (failed) {
    fs_template_free(NULL, t);  /* no references yet */
    return NULL;
  }
  return t;
}

/* The template's checked values into r. */
static void use_template(fs_request *r, fs_template *t) {
  size_t k;
  for (k = 0; k < FS_TEMPLATE_HEADERS; k++)
    r->header[template_headers[k]] = t->header[template_headers[k]];
  r->base_url = t->base_url;
  r->op = t->op;
  r->max_body = t->max_body;
  r->connect_timeout_ms = t->connect_timeout_ms;
  r->ca_file = t->ca_file;
  r->ca_path = t->ca_path;
  r->proxy = t->proxy;
  r->insecure = t->insecure;
  r->tmpl = t;
}

/* What one call may change, its options read: its request id (the
** option's, or else a fresh one), If-Match, the timeout, and opts.headers
** (headers: it is there), a table of the caller's, read on every call. */
static void per_call(lua_State *L, int opts, const char *request_id, const char *if_match,
                     long timeout_ms, int headers, fs_request *r) {
  const char **h = r->header;
  h[H_REQUEST_ID] = request_id != NULL ? request_id : make_request_id(r);
  h[H_IF_MATCH] = if_match;  /* NULL: unconditional */
  r->timeout_ms = timeout_ms;
  r->headers_table = 0;
  if (headers) {
    lua_pushliteral(L, "headers");
    lua_rawget(L, opts);
    r->headers_table = lua_gettop(L);  /* stays: fs_request_apply reads it again */
  }
  check_extra_headers(L, opts, r);
}

/* The same, checked on every call; own: the template the client's own
** options use, which keeps what they give for the calls to come (a table
** no one else holds never changes). */
static void read_per_call(lua_State *L, int opts, const opt_values *v, fs_request *r,
                          fs_template *own) {
  const char *id = opt_string(L, v, O_REQUEST_ID, NULL, 0);
  const char *if_match = opt_nonblank(L, v, O_IF_MATCH, NULL, 0);
  long timeout_ms = opt_milliseconds(L, v, O_TIMEOUT, FS_DEFAULT_TIMEOUT);
  if (id != NULL && is_blank(id, v->len[O_REQUEST_ID]))
    id = NULL;  /* every attempt has an id to trace */
  if (own != NULL) {
    own->own_request_id = id;
    own->own_if_match = if_match;
    own->own_timeout_ms = timeout_ms;
    own->own_headers = v->present[O_HEADERS];
    own->own = 1;
  }
  per_call(L, opts, id, if_match, timeout_ms, v->present[O_HEADERS], r);
}

void fs_request_options(lua_State *L, int opts, int flags, fs_request *r) {
  const char **h = r->header;
  opt_values v;
  fs_template *made = NULL;
  luaL_checktype(L, opts, LUA_TTABLE);
  luaL_checkstack(L, 12, "request options");  /* what we keep, and pairs */
  if (r->own_options && r->tmpl_slot != NULL && *r->tmpl_slot != NULL
      && (*r->tmpl_slot)->own && (*r->tmpl_slot)->flags == flags) {
    const fs_template *t = *r->tmpl_slot;  /* read and checked before */
    use_template(r, *r->tmpl_slot);
    per_call(L, opts, t->own_request_id, t->own_if_match, t->own_timeout_ms, t->own_headers, r);
    return;
  }
  read_options(L, opts, &v);
  if (r->tmpl_slot != NULL && *r->tmpl_slot != NULL
      && template_matches(*r->tmpl_slot, &v, flags)) {  /* checked before */
    use_template(r, *r->tmpl_slot);
    read_per_call(L, opts, &v, r, r->own_options ? *r->tmpl_slot : NULL);
    return;
  }
  if (!(flags & FS_NO_IDENTITY))
    read_identity(L, &v, flags, r);
  if (h[H_CONTENT_TYPE] == NULL)
    h[H_CONTENT_TYPE] = "application/json";
  h[H_ACCEPT] = "application/json";
  (void)opt_string(L, &v, O_REQUEST_ID, NULL, 0);  /* checked in this order */
  (void)opt_nonblank(L, &v, O_IF_MATCH, NULL, 0);
  h[H_USER_AGENT] = opt_string(L, &v, O_USER_AGENT, NULL, 0);
  if (h[H_USER_AGENT] == NULL)
    h[H_USER_AGENT] = r->default_user_agent ? r->default_user_agent : push_user_agent(L);
  r->base_url = opt_string(L, &v, O_BASE_URL, FS_DEFAULT_BASE_URL, 0);
  check_base_url(L, opts, r->base_url, r->cache);
  r->op = opt_string(L, &v, O_OP, FS_DEFAULT_OP, 0);
  r->max_body = opt_bytes(L, &v, O_MAX_BODY, FS_DEFAULT_MAX_BODY);
  (void)opt_milliseconds(L, &v, O_TIMEOUT, FS_DEFAULT_TIMEOUT);
  r->connect_timeout_ms = opt_milliseconds(L, &v, O_CONNECT_TIMEOUT,
                                           FS_DEFAULT_CONNECT_TIMEOUT);
  r->ca_file = opt_string(L, &v, O_CA_FILE, NULL, 0);
  r->ca_path = opt_string(L, &v, O_CA_PATH, NULL, 0);
  r->proxy = opt_string(L, &v, O_PROXY, NULL, 0);
  r->insecure = v.boolean[O_INSECURE];
  if (r->tmpl_slot != NULL && r->engine != NULL) {  /* run actions: remember them */
    made = template_new(&v, flags, r);
    if (made != NULL) {
      made->config = fs_engine_new_config(r->engine);
      fs_template_free(L, *r->tmpl_slot);
      *r->tmpl_slot = made;
      use_template(r, made);
    }
  }
  read_per_call(L, opts, &v, r, r->own_options ? made : NULL);
}


/* ---------------------------------------------------------------------
** Request shapes
*/

static void check_segment(lua_State *L, int arg, const char *what,
                          const char *s, size_t len) {
  if (len == 0)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a non-empty string", what));
  if (has_control(s, len))
    luaL_argerror(L, arg, lua_pushfstring(L, "%s contains a control character", what));
  if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)  /* path traversal */
    luaL_argerror(L, arg, lua_pushfstring(L, "%s may not be '.' or '..'", what));
}

const char *fs_request_run_action(lua_State *L, int arg, fs_request *r) {
  size_t len;
  const char *run_id, *why;
  if (lua_type(L, arg) != LUA_TSTRING)  /* not even a number: ids are text */
    return lua_pushfstring(L, "run id must be a non-empty string, got %s", luaL_typename(L, arg));
  run_id = lua_tolstring(L, arg, &len);
  why = fs_run_id_problem(run_id, len);  /* '/' would reach a proxy as %2F */
  if (why != NULL)
    return why;
  r->get = 0;
  r->identity = 1;
  r->run_action = 1;
  r->action_path[0] = "runs";
  r->action_path[1] = run_id;
  r->action_path[2] = "action";
  r->segments = r->action_path;
  r->nsegments = 3;
  r->action_query[0].name = "op";
  r->action_query[0].value = r->op;
  r->query = r->action_query;
  r->nquery = 1;
  r->body = "";
  r->body_len = 0;
  return NULL;
}

static int shape_error(lua_State *L, int spec, const char *what) {
  return luaL_argerror(L, spec, lua_pushfstring(L, "request %s", what));
}

static const char *shape_string(lua_State *L, int spec, int idx, const char *what,
                                size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING)
    shape_error(L, spec, lua_pushfstring(L, "%s must be a string", what));
  return lua_tolstring(L, idx, len);
}

/* Pushes spec[key], raw: a metamethod could hand us a value that nothing
** else holds (the GC would free what r points into). Returns its type. */
static int shape_field(lua_State *L, int spec, const char *key) {
  lua_pushstring(L, key);
  lua_rawget(L, spec);
  return lua_type(L, -1);
}

/* Fields read raw would silently miss what an __index supplies: refuse it. */
static void check_plain(lua_State *L, int spec, int idx, const char *what) {
  if (luaL_getmetafield(L, idx, "__index") != 0)  /* a raw read, too */
    shape_error(L, spec, lua_pushfstring(L,
                "%s may not have an __index metamethod (fields are read raw)", what));
}

/* Leaves the path table (it holds the segments r points to) and the array
** of pointers (userdata: collected, never leaked) on the stack. */
static void read_path(lua_State *L, int spec, fs_request *r) {
  size_t i, n;
  int path;
  if (shape_field(L, spec, "path") != LUA_TTABLE)
    shape_error(L, spec, "path must be a list of segments");
  path = lua_gettop(L);
  check_plain(L, spec, path, "path");
  n = (size_t)fs_rawlen(L, path);
  r->segments = (const char **)lua_newuserdata(L, (n + 1) * sizeof(char *));
  for (i = 0; i < n; i++) {
    size_t len;
    lua_rawgeti(L, path, (int)i + 1);
    r->segments[i] = shape_string(L, spec, -1, "path segment", &len);
    check_segment(L, spec, "path segment", r->segments[i], len);
    lua_pop(L, 1);  /* the path table, on the stack, keeps it */
  }
  r->nsegments = n;
}

/* Leaves the query table (or nil) and, for a table, the pair array. */
static void read_query(lua_State *L, int spec, fs_request *r) {
  size_t i, n;
  int query;
  fs_param *q;
  r->query = NULL;
  r->nquery = 0;
  if (shape_field(L, spec, "query") == LUA_TNIL)
    return;
  if (!lua_istable(L, -1))
    shape_error(L, spec, "query must be a list of {name, value} pairs");
  query = lua_gettop(L);
  check_plain(L, spec, query, "query");
  n = (size_t)fs_rawlen(L, query);
  q = (fs_param *)lua_newuserdata(L, (n + 1) * sizeof *q);
  for (i = 0; i < n; i++) {
    size_t nlen, vlen;
    lua_rawgeti(L, query, (int)i + 1);
    if (!lua_istable(L, -1))
      shape_error(L, spec, "query must be a list of {name, value} pairs");
    check_plain(L, spec, lua_gettop(L), "query pair");
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    q[i].name = shape_string(L, spec, -2, "query name", &nlen);
    q[i].value = shape_string(L, spec, -1, "query value", &vlen);
    if (nlen == 0 || memchr(q[i].name, '\0', nlen) || memchr(q[i].value, '\0', vlen))
      shape_error(L, spec, "query names must be non-empty, without NUL");
    lua_pop(L, 3);  /* the query table, on the stack, keeps its pairs */
  }
  r->query = q;
  r->nquery = n;
}

static void check_shape_keys(lua_State *L, int spec) {
  static const char *const keys[] = {
    "method", "path", "query", "body", "content_type", "identity", NULL
  };
  lua_pushnil(L);
  while (lua_next(L, spec) != 0) {
    int i = 0;
    size_t len = 0;
    const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &len) : NULL;
    if (key != NULL)
      for (; keys[i] != NULL; i++)
        if (strlen(keys[i]) == len && memcmp(keys[i], key, len) == 0)  /* a NUL too */
          break;
    if (lua_type(L, -2) != LUA_TSTRING || keys[i] == NULL)
      shape_error(L, spec, lua_pushfstring(L, "field '%s' is unknown",
                  lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?"));
    lua_pop(L, 1);
  }
}

/* Every field read raw; every borrowed value (path and query tables, body,
** content_type) stays on the stack above spec until the caller returns. */
void fs_request_shape(lua_State *L, int spec, fs_request *r) {
  const char *method;
  luaL_checktype(L, spec, LUA_TTABLE);
  if (spec < 0)
    spec = lua_gettop(L) + spec + 1;  /* we push above it */
  /* six kept values, three at a time in read_query, and the usual room
  ** for fs_request_options after us */
  luaL_checkstack(L, 9 + LUA_MINSTACK, "request shape");
  check_plain(L, spec, spec, "shape");
  check_shape_keys(L, spec);
  shape_field(L, spec, "method");
  method = lua_tostring(L, -1);
  if (lua_type(L, -1) != LUA_TSTRING
      || (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0))
    shape_error(L, spec, "method must be \"GET\" or \"POST\"");
  r->get = method[0] == 'G';
  lua_pop(L, 1);  /* only compared */
  read_path(L, spec, r);
  read_query(L, spec, r);
  r->body = "";
  r->body_len = 0;
  if (shape_field(L, spec, "body") != LUA_TNIL)  /* stays */
    r->body = shape_string(L, spec, -1, "body", &r->body_len);
  if (r->get && r->body_len > 0)
    shape_error(L, spec, "body needs method POST");
  if (shape_field(L, spec, "content_type") != LUA_TNIL) {  /* stays */
    size_t len;
    r->header[H_CONTENT_TYPE] = shape_string(L, spec, -1, "content_type", &len);
    if (has_control(r->header[H_CONTENT_TYPE], len))
      shape_error(L, spec, "content_type contains a control character");
  }
  shape_field(L, spec, "identity");
  r->identity = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
}

void fs_request_push_defaults(lua_State *L) {
  lua_createtable(L, 0, 7);
  lua_pushstring(L, FS_DEFAULT_BASE_URL);
  lua_setfield(L, -2, "base_url");
  lua_pushstring(L, FS_DEFAULT_SANDBOX);
  lua_setfield(L, -2, "sandbox");
  lua_pushstring(L, FS_DEFAULT_OP);
  lua_setfield(L, -2, "op");
  lua_pushinteger(L, (lua_Integer)FS_DEFAULT_TIMEOUT);
  lua_setfield(L, -2, "timeout");
  lua_pushinteger(L, (lua_Integer)FS_DEFAULT_CONNECT_TIMEOUT);
  lua_setfield(L, -2, "connect_timeout");
  lua_pushinteger(L, (lua_Integer)FS_DEFAULT_MAX_BODY);
  lua_setfield(L, -2, "max_body");
  push_user_agent(L);
  lua_setfield(L, -2, "user_agent");
}


/* ---------------------------------------------------------------------
** Building the transfer
*/

/* base path without trailing slashes, then "/" + escaped segment, each */
static CURLUcode url_set_path(CURL *easy, CURLU *u, const fs_request *r) {
  char *base = NULL, *path = NULL;
  size_t len, i;
  CURLUcode rc = curl_url_get(u, CURLUPART_PATH, &base, 0);
  if (rc != CURLUE_OK)
    return rc;
  len = strlen(base);
  while (len > 0 && base[len - 1] == '/')
    len--;
  path = (char *)malloc(len + 1);
  if (path != NULL) {
    memcpy(path, base, len);
    path[len] = '\0';
  }
  for (i = 0; path != NULL && i < r->nsegments; i++) {
    char *segment = curl_easy_escape(easy, r->segments[i], 0);
    char *longer = segment ? (char *)realloc(path, len + strlen(segment) + 2) : NULL;
    if (longer == NULL) {
      free(path);
      path = NULL;
    } else {
      path = longer;
      path[len++] = '/';
      strcpy(path + len, segment);
      len += strlen(segment);
    }
    curl_free(segment);
  }
  rc = path != NULL ? curl_url_set(u, CURLUPART_PATH, path, 0) : CURLUE_OUT_OF_MEMORY;
  free(path);
  curl_free(base);
  return rc;
}

/* libcurl escapes everything after the first '=' of each pair. */
static CURLUcode url_add_query(CURLU *u, const fs_request *r) {
  CURLUcode rc = CURLUE_OK;
  size_t i;
  for (i = 0; rc == CURLUE_OK && i < r->nquery; i++) {
    size_t n = strlen(r->query[i].name);
    char *pair = (char *)malloc(n + strlen(r->query[i].value) + 2);
    if (pair == NULL)
      return CURLUE_OUT_OF_MEMORY;
    memcpy(pair, r->query[i].name, n);
    pair[n] = '=';
    strcpy(pair + n + 1, r->query[i].value);
    rc = curl_url_set(u, CURLUPART_QUERY, pair, CURLU_APPENDQUERY | CURLU_URLENCODE);
    free(pair);
  }
  return rc;
}

/* The hot path: {prefix}/runs/{id}/action?op={op}, escaped by libcurl. */
static char *url_run_action(CURL *easy, const char *prefix, const fs_request *r) {
  char *id = curl_easy_escape(easy, r->action_path[1], 0);
  char *op = curl_easy_escape(easy, r->op, 0);
  char *url = NULL;
  if (id != NULL && op != NULL) {
    size_t len = strlen(prefix) + strlen(id) + strlen(op) + sizeof "/runs//action?op=";
    url = (char *)malloc(len);
    if (url != NULL)
      snprintf(url, len, "%s/runs/%s/action?op=%s", prefix, id, op);
  }
  curl_free(id);
  curl_free(op);
  return url;
}

/* base_url (checked by fs_request_options) + path + query; NULL on failure.
** The result is for free(). */
static char *url_build(CURL *easy, const fs_request *r) {
  char *url = NULL, *copy;
  CURLU *u;
  if (r->run_action && r->cache != NULL && r->cache->prefix != NULL
      && strcmp(r->cache->base_url, r->base_url) == 0)
    return url_run_action(easy, r->cache->prefix, r);
  u = curl_url();
  if (u != NULL && curl_url_set(u, CURLUPART_URL, r->base_url, 0) == CURLUE_OK
      && url_set_path(easy, u, r) == CURLUE_OK && url_add_query(u, r) == CURLUE_OK
      && curl_url_get(u, CURLUPART_URL, &url, 0) != CURLUE_OK)
    url = NULL;
  curl_url_cleanup(u);
  copy = url != NULL ? (char *)malloc(strlen(url) + 1) : NULL;  /* one way to free */
  if (copy != NULL)
    strcpy(copy, url);
  curl_free(url);
  return copy;
}

static void apply_check(lua_State *L, CURLcode rc) {
  if (rc != CURLE_OK)
    luaL_error(L, "flowservice: libcurl setup failed: %s", curl_easy_strerror(rc));
}

/* "Name: value", or "Name;", libcurl's way to send an empty value (a value
** of only spaces and tabs is one: "Name:  " would send no header at all).
** Lines are built on the C stack; *failed is set when out of memory. */
static struct curl_slist *append_line(struct curl_slist *list, const char *name,
                                      const char *value, int *failed) {
  char buffer[2048];
  size_t n = strlen(name), v = strlen(value);
  char *line = buffer;
  struct curl_slist *longer;
  if (is_blank(value, v))
    v = 0;
  if (n + v + 3 > sizeof buffer) {
    line = (char *)malloc(n + v + 3);  /* a long token, say */
    if (line == NULL) {
      *failed = 1;
      return list;
    }
  }
  memcpy(line, name, n);
  if (v > 0) {
    memcpy(line + n, ": ", 2);
    memcpy(line + n + 2, value, v + 1);
  } else {
    memcpy(line + n, ";", 2);
  }
  longer = curl_slist_append(list, line);
  if (line != buffer)
    free(line);
  if (longer == NULL) {
    *failed = 1;
    return list;
  }
  return longer;
}

static void add_header(lua_State *L, fs_transfer *t, const char *name,
                       const char *value) {
  int failed = 0;
  t->headers = append_line(t->headers, name, value, &failed);
  if (failed)
    luaL_error(L, "flowservice: out of memory");
}

/* opts.headers' names that are not ours, in the table's order. */
static void add_extra_headers(lua_State *L, fs_transfer *t, const fs_request *r) {
  if (r->headers_table == 0)
    return;
  lua_pushnil(L);  /* second pass: the names that are not ours */
  while (lua_next(L, r->headers_table) != 0) {
    const char *name = lua_tostring(L, -2);
    if (header_index(name) < 0)
      add_header(L, t, name, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

/* Every line owned by t. */
static void add_headers(lua_State *L, fs_transfer *t, const fs_request *r) {
  int i;
  for (i = r->identity ? 0 : H_PROTECTED + 1; i < H_COUNT; i++)
    if (r->header[i] != NULL)
      add_header(L, t, header_names[i], r->header[i]);
  add_extra_headers(L, t, r);
  t->head = t->headers;
}

/* A template's request: If-Match and extra headers (owned), x-request-id
** (in t when it fits), then the template's shared lines. */
static void add_call_headers(lua_State *L, fs_transfer *t, const fs_request *r) {
  const char *id = r->header[H_REQUEST_ID];
  size_t n = strlen(id);
  struct curl_slist *own;
  if (r->header[H_IF_MATCH] != NULL)
    add_header(L, t, header_names[H_IF_MATCH], r->header[H_IF_MATCH]);
  add_extra_headers(L, t, r);
  if (n + sizeof FS_ID_LINE <= sizeof t->id_line && !is_blank(id, n)) {
    memcpy(t->id_line, FS_ID_LINE, sizeof FS_ID_LINE - 1);
    memcpy(t->id_line + sizeof FS_ID_LINE - 1, id, n + 1);
    t->id_node.data = t->id_line;
    t->id_node.next = NULL;
    own = &t->id_node;
  } else {
    add_header(L, t, header_names[H_REQUEST_ID], id);
    own = NULL;
  }
  for (t->headers_last = t->headers; t->headers_last != NULL && t->headers_last->next != NULL;
       t->headers_last = t->headers_last->next)
    ;
  t->tail = r->tmpl->tail;  /* from here on freed with t */
  t->tail->refs++;
  if (own != NULL)
    own->next = t->tail->list;
  else
    own = t->tail->list;
  if (t->headers_last != NULL)
    t->headers_last->next = own;  /* cut again before our lines are freed */
  t->head = t->headers != NULL ? t->headers : own;
}

/* The call's headers replace one of the template's lines. */
static int overrides_template(const fs_request *r) {
  const fs_template *t = r->tmpl;
  return r->header[H_CONTENT_TYPE] != t->header[H_CONTENT_TYPE]
         || r->header[H_ACCEPT] != t->header[H_ACCEPT]
         || r->header[H_USER_AGENT] != t->header[H_USER_AGENT];
}

#ifdef FS_FUZZING
void (*fs_fuzz_on_url)(const char *url);
void (*fs_fuzz_on_headers)(const struct curl_slist *headers);
#endif

/* t's header lines for r: a template's shared lines after the call's own,
** or all of them built for this call. */
static void build_headers(lua_State *L, fs_transfer *t, const fs_request *r) {
  if (r->tmpl != NULL && r->identity && !overrides_template(r))
    add_call_headers(L, t, r);
  else
    add_headers(L, t, r);
#ifdef FS_FUZZING
  if (fs_fuzz_on_headers != NULL)
    fs_fuzz_on_headers(t->head);
#endif
}

/* {prefix}/runs/{id}/action?op={op} from the template's two halves. libcurl
** gets it twice: as the string (CURLOPT_URL, what it reports and would
** resend to) and as a URL handle that goes with the easy handle
** (CURLOPT_CURLU), which it reads instead of parsing the string and then
** printing it back, as it does with a string alone on every transfer. Once
** the handle holds this template's URL, a call sets only its path. When
** the handle cannot be had or will not take the URL, the string alone
** (libcurl then parses it, and says what is wrong with it). */
static void set_template_url(lua_State *L, fs_transfer *t, const fs_request *r) {
  const fs_template *tm = r->tmpl;
  const char *id = r->action_path[1];  /* unreserved bytes only */
  char buffer[1024], path[1024], *url = buffer;
  size_t n = strlen(id), len = tm->url_head_len + n + tm->url_tail_len;
  CURLUcode uc;
  CURLcode rc;
  if (len + 1 > sizeof buffer) {
    url = (char *)malloc(len + 1);
    if (url == NULL)
      luaL_error(L, "flowservice: could not build the request URL (out of memory?)");
  }
  memcpy(url, tm->url_head, tm->url_head_len);
  memcpy(url + tm->url_head_len, id, n);
  memcpy(url + tm->url_head_len + n, tm->url_tail, tm->url_tail_len + 1);
#ifdef FS_FUZZING
  if (fs_fuzz_on_url != NULL)
    fs_fuzz_on_url(url);
#endif
  if (t->url == NULL)
    t->url = curl_url();
  if (t->url != NULL) {
    if (tm->path_head != NULL && t->url_config == tm->config
        && tm->path_head_len + n + sizeof "/action" <= sizeof path) {
      memcpy(path, tm->path_head, tm->path_head_len);
      memcpy(path + tm->path_head_len, id, n);
      memcpy(path + tm->path_head_len + n, "/action", sizeof "/action");
      uc = curl_url_set(t->url, CURLUPART_PATH, path, 0);
    } else {
      t->url_config = 0;
      uc = curl_url_set(t->url, CURLUPART_URL, url, 0);
    }
    if (uc == CURLUE_OK) {
      t->url_config = tm->config;
    } else {  /* out of memory, or refused: the string alone */
      curl_url_cleanup(t->url);
      t->url = NULL;
      t->url_config = 0;
    }
  }
#ifdef FS_FUZZING
  if (t->url != NULL) {  /* the handle holds what libcurl makes of the string */
    /* read through copies: libcurl 7.88's curl_url_get of a URL re-escapes
    ** a '%' in the host of the handle it reads, in place */
    CURLU *parsed = curl_url(), *copy = curl_url_dup(t->url);
    char *held = NULL, *want = NULL;
    if (parsed == NULL || copy == NULL || curl_url_set(parsed, CURLUPART_URL, url, 0) != CURLUE_OK
        || curl_url_get(parsed, CURLUPART_URL, &want, 0) != CURLUE_OK
        || curl_url_get(copy, CURLUPART_URL, &held, 0) != CURLUE_OK || strcmp(held, want) != 0) {
      fprintf(stderr, "request.c: the URL handle holds %s, the string %s reads as %s\n",
              held ? held : "(nothing)", url, want ? want : "(nothing)");
      abort();
    }
    curl_free(held);
    curl_free(want);
    curl_url_cleanup(parsed);
    curl_url_cleanup(copy);
  }
#endif
  rc = curl_easy_setopt(t->easy, CURLOPT_CURLU, t->url);  /* NULL: none */
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(t->easy, CURLOPT_URL, url);  /* libcurl copies it */
  if (url != buffer)
    free(url);
  apply_check(L, rc);
}

void fs_request_apply(lua_State *L, fs_transfer *t, const fs_request *r) {
  CURLcode rc;
  if (r->tmpl != NULL && r->run_action && r->tmpl->url_head != NULL) {
    set_template_url(L, t, r);
  } else {
    char *url = url_build(t->easy, r);
    if (url == NULL)
      luaL_error(L, "flowservice: could not build the request URL (out of memory?)");
    rc = curl_easy_setopt(t->easy, CURLOPT_CURLU, (CURLU *)NULL);  /* a run action's */
    if (rc == CURLE_OK)
      rc = curl_easy_setopt(t->easy, CURLOPT_URL, url);  /* libcurl copies it */
#ifdef FS_FUZZING
    if (fs_fuzz_on_url != NULL)
      fs_fuzz_on_url(url);
#endif
    free(url);
    apply_check(L, rc);
  }
  build_headers(L, t, r);
#define FS_SET(opt, val) \
  if (rc == CURLE_OK) rc = curl_easy_setopt(t->easy, opt, val)
  rc = CURLE_OK;
  FS_SET(CURLOPT_HTTPHEADER, t->head);
  FS_SET(CURLOPT_TIMEOUT_MS, r->timeout_ms);
  if (t->configured) {  /* the handle carries the template's options */
    apply_check(L, rc);
    return;
  }
  FS_SET(CURLOPT_CONNECTTIMEOUT_MS, r->connect_timeout_ms);
  if (r->ca_file != NULL)
    FS_SET(CURLOPT_CAINFO, r->ca_file);
  if (r->ca_path != NULL)
    FS_SET(CURLOPT_CAPATH, r->ca_path);
  if (r->proxy != NULL)
    FS_SET(CURLOPT_PROXY, r->proxy);
  FS_SET(CURLOPT_SSL_VERIFYPEER, r->insecure ? 0L : 1L);
  FS_SET(CURLOPT_SSL_VERIFYHOST, r->insecure ? 0L : 2L);
  if (r->get) {
    FS_SET(CURLOPT_HTTPGET, 1L);
  } else {
    /* size first; the copy outlives the Lua string (submitted transfers) and
    ** an empty body keeps libcurl from reading stdin */
    FS_SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    FS_SET(CURLOPT_COPYPOSTFIELDS, r->body);
  }
#undef FS_SET
  apply_check(L, rc);
}


/* ---------------------------------------------------------------------
** The same run action as bytes, for the nginx transport
*/

void fs_wire_target_free(fs_wire_target *w) {
  free(w->line_head);
  free(w->host_line);
  free(w->host);
  free(w->pool);
  w->line_head = w->host_line = w->host = w->pool = NULL;
}

static char *joined(const char *a, const char *b, const char *c) {
  size_t na = strlen(a), nb = strlen(b), nc = strlen(c);
  char *s = (char *)malloc(na + nb + nc + 1);
  if (s != NULL) {
    memcpy(s, a, na);
    memcpy(s + na, b, nb);
    memcpy(s + na + nb, c, nc + 1);
  }
  return s;
}

/*
** Where url's requests go and what their request line and Host header say,
** from libcurl's reading of it: line_head is "POST " and the path (and
** query); of a template's url_head, "POST {base path}/runs/", where a run
** id goes. 0 when out of memory, or for a URL whose user
** name libcurl would send and cosockets cannot.
*/
static int target_read(fs_wire_target *w, const char *url, const char *method, int insecure) {
  CURLU *u = curl_url();
  char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *query = NULL, *user = NULL;
  int explicit_port, ok;
  ok = u != NULL && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK
       && curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_NO_USER
       && curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK
       && curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK
       && curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK
       && curl_url_get(u, CURLUPART_PATH, &path, 0) == CURLUE_OK;
  if (ok) {
    CURLUcode rc = curl_url_get(u, CURLUPART_QUERY, &query, 0);
    ok = rc == CURLUE_OK || rc == CURLUE_NO_QUERY;
  }
  if (ok) {
    char *given = NULL;
    /* libcurl names the port in Host unless it is the scheme's own */
    explicit_port = curl_url_get(u, CURLUPART_PORT, &given, 0) == CURLUE_OK
                    && !(strcmp(scheme, "https") == 0 && strcmp(given, "443") == 0)
                    && !(strcmp(scheme, "http") == 0 && strcmp(given, "80") == 0);
    curl_free(given);
    w->tls = strcmp(scheme, "https") == 0;
    w->port = strtol(port, NULL, 10);
    /* the host as libcurl reads it: an IPv6 address without brackets */
    w->host = joined("", host[0] == '[' ? host + 1 : host, "");
    if (w->host != NULL && host[0] == '[')
      w->host[strlen(w->host) - 1] = '\0';
    if (query == NULL) {
      w->line_head = joined(method, path, "");
    } else {
      char *p = joined(path, "?", query);
      w->line_head = p != NULL ? joined(method, p, "") : NULL;
      free(p);
    }
    {
      char *authority = explicit_port ? joined(host, ":", port) : joined(host, "", "");
      w->host_line = authority != NULL ? joined(" HTTP/1.1\r\nHost: ", authority, "\r\n") : NULL;
      free(authority);
    }
    {
      char *where = joined(scheme, "://", host), *at = where ? joined(where, ":", port) : NULL;
      w->pool = at != NULL ? joined("flowservice ", at, insecure ? " insecure" : "") : NULL;
      free(where);
      free(at);
    }
    ok = w->host != NULL && w->line_head != NULL && w->host_line != NULL && w->pool != NULL;
    if (ok) {
      w->line_head_len = strlen(w->line_head);
      w->host_line_len = strlen(w->host_line);
    }
  }
  curl_free(scheme);
  curl_free(host);
  curl_free(port);
  curl_free(path);
  curl_free(query);
  curl_free(user);
  curl_url_cleanup(u);
  if (!ok)
    fs_wire_target_free(w);
  return ok;
}

void fs_bytes_free(fs_bytes *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* n more bytes at the end of b; raises when out of memory (b keeps what
** it had, and its owner frees it). */
static void bytes_add(lua_State *L, fs_bytes *b, const char *s, size_t n) {
  if (n > b->cap - b->len) {
    size_t cap = b->cap ? b->cap : 512;
    char *grown;
    while (cap - b->len < n)
      cap *= 2;  /* a request's pieces are far below SIZE_MAX / 2 */
    grown = (char *)realloc(b->data, cap);
    if (grown == NULL)
      luaL_error(L, "flowservice: out of memory");
    b->data = grown;
    b->cap = cap;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
}

/* b's bytes as a string, pushed; b empty again. */
static void bytes_push(lua_State *L, fs_bytes *b) {
  lua_pushlstring(L, b->len > 0 ? b->data : "", b->len);
  b->len = 0;
}

/* A header list line ("Name: value", or libcurl's "Name;" for an empty
** value) as it goes on the wire, with its CRLF. */
static void add_wire_line(lua_State *L, fs_bytes *b, const char *line) {
  size_t n = strlen(line);
  if (n > 0 && line[n - 1] == ';') {
    bytes_add(L, b, line, n - 1);
    bytes_add(L, b, ":\r\n", 3);
  } else {
    bytes_add(L, b, line, n);
    bytes_add(L, b, "\r\n", 2);
  }
}

/* The string s (n bytes) that tm keeps as wire_refs[which], pushed: from
** the registry once made. */
static void push_kept(lua_State *L, fs_template *tm, int which, const char *s, size_t n) {
  if (tm->wire_refs[which] != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, tm->wire_refs[which]);
    return;
  }
  lua_pushlstring(L, s, n);
  lua_pushvalue(L, -1);
  tm->wire_refs[which] = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* What ends a run action's head: it sends no body. */
#define RUN_ACTION_END "Content-Length: 0\r\n\r\n"

/* The template's shared lines (its tail) as wire bytes, made on first use,
** RUN_ACTION_END after them (past wire_tail_len); 0 when out of memory
** (then the lines are added one by one). */
static int wire_tail(fs_template *tm) {
  const struct curl_slist *h;
  size_t n = 0;
  char *at;
  if (tm->wire_tail != NULL)
    return 1;
  for (h = tm->tail->list; h != NULL; h = h->next)
    n += strlen(h->data) + 2;
  tm->wire_tail = at = (char *)malloc(n + sizeof RUN_ACTION_END);
  if (at == NULL)
    return 0;
  for (h = tm->tail->list; h != NULL; h = h->next) {
    size_t k = strlen(h->data);
    memcpy(at, h->data, k);
    if (k > 0 && at[k - 1] == ';')
      at[k - 1] = ':';  /* libcurl's way to send an empty value */
    memcpy(at + k, "\r\n", 2);
    at += k + 2;
  }
  memcpy(at, RUN_ACTION_END, sizeof RUN_ACTION_END);  /* after the lines, for a run action */
  tm->wire_tail_len = n;
  return 1;
}

/* The third piece but a run action's from its template: its shared lines
** (tm, or NULL), the length, the body. */
static void wire_end(lua_State *L, fs_bytes *b, const fs_template *tm, const fs_request *r) {
  if (tm != NULL)  /* the template's, serialised once */
    bytes_add(L, b, tm->wire_tail, tm->wire_tail_len);
  if (!r->get && r->body_len == 0) {  /* a run action */
    bytes_add(L, b, RUN_ACTION_END, sizeof RUN_ACTION_END - 1);
  } else if (!r->get) {
    char length[48];
    snprintf(length, sizeof length, "Content-Length: %lu\r\n\r\n", (unsigned long)r->body_len);
    bytes_add(L, b, length, strlen(length));
    bytes_add(L, b, r->body, r->body_len);
  } else {
    bytes_add(L, b, "\r\n", 2);
  }
  bytes_push(L, b);
}

void fs_request_wire(lua_State *L, fs_transfer *t, const fs_request *r, fs_wire_target *own) {
  const fs_wire_target *w;
  const struct curl_slist *h;
  const char *method = r->get ? "GET " : "POST ";
  int run_prefix = r->run_action && r->tmpl != NULL && r->tmpl->url_head != NULL;
  int shared;
  fs_bytes *b = r->wire_bytes;
  if (r->proxy != NULL)
    luaL_error(L, "flowservice: the nginx transport cannot go through a proxy");
  build_headers(L, t, r);  /* the lines libcurl would get, the same way */
  if (run_prefix) {  /* the template's "{base}/runs/", read once */
    fs_template *tm = r->tmpl;
    if (tm->wire.line_head == NULL && !target_read(&tm->wire, tm->url_head, "POST ", r->insecure))
      luaL_error(L, "flowservice: the nginx transport cannot send to this base_url"
                 " (user info in it, or out of memory)");
    w = &tm->wire;
  } else {
    char *url = url_build(NULL, r);
    int ok = url != NULL && target_read(own, url, method, r->insecure);
    free(url);
    if (!ok)
      luaL_error(L, "flowservice: the nginx transport cannot send to this base_url"
                 " (user info in it, or out of memory)");
    w = own;
  }
  b->len = 0;  /* the request line and Host */
  bytes_add(L, b, w->line_head, w->line_head_len);
  if (run_prefix) {
    const char *id = r->action_path[1];  /* unreserved bytes only */
    bytes_add(L, b, id, strlen(id));
    bytes_add(L, b, r->tmpl->url_tail, r->tmpl->url_tail_len);
  }
  bytes_add(L, b, w->host_line, w->host_line_len);
  bytes_push(L, b);
  shared = t->tail != NULL && t->tail->list != NULL && wire_tail(r->tmpl);
  /* the call's own lines (all of them without a tail) */
  for (h = t->head; h != NULL && !(shared && h == t->tail->list); h = h->next)
    add_wire_line(L, b, h->data);
  bytes_push(L, b);
  if (shared && !r->get && r->body_len == 0) {  /* a run action: all made once */
    push_kept(L, r->tmpl, WIRE_REF_TAIL, r->tmpl->wire_tail,
              r->tmpl->wire_tail_len + sizeof RUN_ACTION_END - 1);
  } else {
    wire_end(L, b, shared ? r->tmpl : NULL, r);
  }
  if (run_prefix) {  /* the template's target */
    push_kept(L, r->tmpl, WIRE_REF_HOST, w->host, strlen(w->host));
    lua_pushinteger(L, (lua_Integer)w->port);
    push_kept(L, r->tmpl, WIRE_REF_POOL, w->pool, strlen(w->pool));
  } else {
    lua_pushstring(L, w->host);
    lua_pushinteger(L, (lua_Integer)w->port);
    lua_pushstring(L, w->pool);
  }
  lua_pushboolean(L, w->tls);
}

int fs_request_wire_plain(fs_template *tm, fs_request *r) {
  int i;
  if (tm == NULL || !tm->own || tm->flags != 0 || tm->own_request_id != NULL
      || tm->own_if_match != NULL || tm->own_headers || tm->proxy != NULL
      || tm->url_head == NULL || tm->wire.line_head == NULL || tm->wire_tail == NULL)
    return 0;
  for (i = 0; i < WIRE_REFS; i++)
    if (tm->wire_refs[i] == LUA_NOREF)
      return 0;
  r->tmpl = tm;  /* what the call reads of use_template's (no header of it: the pieces are made) */
  r->max_body = tm->max_body;
  r->connect_timeout_ms = tm->connect_timeout_ms;
  r->insecure = tm->insecure;
  r->timeout_ms = tm->own_timeout_ms;
  r->header[H_REQUEST_ID] = make_request_id(r);
  return 1;
}

void fs_request_wire_plain_push(lua_State *L, const fs_request *r, const char *run_id,
                                size_t len, int full) {
  fs_template *tm = r->tmpl;
  const fs_wire_target *w = &tm->wire;
  fs_bytes *b = r->wire_bytes;
  const char *id = r->header[H_REQUEST_ID];
  b->len = 0;  /* the request line and Host, as fs_request_wire has them */
  bytes_add(L, b, w->line_head, w->line_head_len);
  bytes_add(L, b, run_id, len);
  bytes_add(L, b, tm->url_tail, tm->url_tail_len);
  bytes_add(L, b, w->host_line, w->host_line_len);
  bytes_push(L, b);
  bytes_add(L, b, FS_ID_LINE, sizeof FS_ID_LINE - 1);  /* the call's one line */
  bytes_add(L, b, id, strlen(id));
  bytes_add(L, b, "\r\n", 2);
  bytes_push(L, b);
  lua_rawgeti(L, LUA_REGISTRYINDEX, tm->wire_refs[WIRE_REF_TAIL]);
  if (!full)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, tm->wire_refs[WIRE_REF_HOST]);
  lua_pushinteger(L, (lua_Integer)w->port);
  lua_rawgeti(L, LUA_REGISTRYINDEX, tm->wire_refs[WIRE_REF_POOL]);
  lua_pushboolean(L, w->tls);
}
