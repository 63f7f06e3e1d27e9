/*
** Requests: a Lua options table (and a request shape) -> a configured
** libcurl transfer. Validates at the border, byte by byte, so nothing a
** caller passes can split a header or leave the base URL; knows the
** Flow Service only as far as its identity headers.
*/
#ifndef FLOWSERVICE_REQUEST_H
#define FLOWSERVICE_REQUEST_H

#include <stddef.h>

#include "lua.h"
#include "engine.h"

FS_INTERNAL_BEGIN

/* The headers every call sends, in wire order. The first four carry
** identity and may only come from their options. */
enum {
  H_AUTHORIZATION, H_API_KEY, H_ORG_ID, H_SANDBOX, H_PROTECTED = H_SANDBOX,
  H_CONTENT_TYPE, H_ACCEPT, H_REQUEST_ID, H_IF_MATCH, H_USER_AGENT, H_COUNT
};

/* fs_request_options flags */
#define FS_TOKEN_LATER 1   /* access_token may be missing (IMS will supply it) */
#define FS_NO_IDENTITY 2   /* no identity headers at all (the IMS request) */

/*
** A client's memory of its base URL: checked once, and for run actions
** turned once into the prefix that every run URL starts with.
*/
/* Where the nginx transport's requests go, and how their request line
** starts (see fs_request_wire); malloc'd strings. */
typedef struct fs_wire_target {
  char *host;         /* to connect to and to name in TLS: no brackets */
  char *line_head;    /* "POST /path" (and "?query"), or up to "/runs/" */
  char *host_line;    /* " HTTP/1.1\r\nHost: authority\r\n" */
  char *pool;         /* the keep-alive pool's name: scheme, host, port, trust */
  size_t line_head_len, host_line_len;
  long port;
  int tls;            /* https */
} fs_wire_target;

void fs_wire_target_free(fs_wire_target *w);

/*
** The bytes of the nginx transport's request pieces as they are put
** together: heap memory a client keeps and every call reuses (in the
** cache), not a luaL_Buffer (8 KiB of C stack under the caller's frame,
** which the worker's other work pushes out of the cache between calls).
*/
typedef struct fs_bytes {
  char *data;
  size_t len, cap;
} fs_bytes;

void fs_bytes_free(fs_bytes *b);

typedef struct fs_url_cache {
  char *base_url;   /* the base_url last checked (a copy) */
  char *prefix;     /* its scheme://host/path without trailing '/', or NULL
                    ** when the base has a query or fragment */
} fs_url_cache;

void fs_url_cache_free(fs_url_cache *cache);

/* NULL when url is an http(s) URL libcurl accepts, else why not. */
const char *fs_url_problem(const char *url);

/*
** The constant part of a client's run actions: the options a call did not
** change, checked once, their header lines built once (shared by every
** transfer made from them, see fs_tail) and a configuration number that
** lets a pooled easy handle keep them set. A call whose options match it
** byte for byte only adds its own: URL, x-request-id, If-Match, extra
** headers, timeout. Owned by the client; replaced when the options change
** (a new token, say).
*/
typedef struct fs_template fs_template;

/* L: for the strings the template keeps in the registry (the nginx
** transport's); NULL only while it has none (being made). */
void fs_template_free(lua_State *L, fs_template *tmpl);
/* Its configuration number (fs_transfer_prepare's config). */
unsigned long fs_template_config(const fs_template *tmpl);

typedef struct fs_param {
  const char *name;
  const char *value;
} fs_param;

typedef struct fs_request {
  int get;                        /* GET, else POST */
  int identity;                   /* send the identity headers (default) */
  const char *base_url;
  const char **segments;          /* path under base_url, escaped one by one */
  size_t nsegments;
  const fs_param *query;          /* name=value pairs, escaped */
  size_t nquery;
  const char *body;
  size_t body_len;
  const char *header[H_COUNT];    /* NULL: not sent */
  int headers_table;              /* stack index of opts.headers, or 0 */
  size_t max_body;
  long timeout_ms;
  long connect_timeout_ms;
  const char *ca_file;
  const char *ca_path;
  const char *proxy;
  int insecure;
  const char *op;                 /* the run action's op option */
  int run_action;                 /* built by fs_request_run_action */
  fs_url_cache *cache;            /* the client's, or NULL */
  const char *default_user_agent; /* computed once per module, or NULL */
  fs_engine *engine;              /* the client's: request ids, configurations */
  fs_template **tmpl_slot;        /* the client's template, for run actions */
  fs_bytes *wire_bytes;           /* the client's, for fs_request_wire */
  fs_template *tmpl;              /* the template this request is built from */
  int own_options;                /* the options table is the client's own copy
                                  ** (core.new made it; no one else holds it):
                                  ** read once, then only its per-call part */
  char request_id[37];            /* storage for a generated x-request-id */
  const char *action_path[3];     /* storage for a run action's shape */
  fs_param action_query[1];
} fs_request;

/*
** Check the options table at stack index opts (raising luaL_argerror-style
** errors naming it) and fill r's options. The strings it makes (bearer
** value) stay on the stack until the caller returns; a generated request
** id lives in r.
*/
void fs_request_options(lua_State *L, int opts, int flags, fs_request *r);

/* POST runs/{id}/action?op={op} for the run id at stack index arg; NULL,
** or why that is not a run id (unreserved characters only, not "." or
** ".."), r left as it was, for the caller to raise or answer with. */
const char *fs_request_run_action(lua_State *L, int arg, fs_request *r);

/* NULL when run_id (len bytes) is one fs_request_run_action takes, else
** why not: the same rules, for the Lua face to check before any I/O. */
const char *fs_run_id_problem(const char *run_id, size_t len);

/* Check a request shape table at stack index spec:
** { method = "GET"|"POST", path = {seg, ...}, query = {{name, value}, ...},
**   body = string, content_type = string, identity = boolean }.
** Fields are read raw (a table with __index is refused); the values r
** borrows stay on the stack above spec until the caller returns.
** Call before fs_request_options, with whose flags identity must agree. */
void fs_request_shape(lua_State *L, int spec, fs_request *r);

/* The defaults above as a table (flowservice.defaults). */
void fs_request_push_defaults(lua_State *L);

/* Configure t (already prepared) for r; raises on failure. */
void fs_request_apply(lua_State *L, fs_transfer *t, const fs_request *r);

/*
** The nginx transport's request: the run action r describes as HTTP/1.1
** bytes (request line, Host, the header lines libcurl would be given, in
** its order, Content-Length, body), pushed as three strings that a
** cosocket sends as one (an array table of them): the request line and
** Host; the call's own lines (x-request-id among them); the lines every
** call of its template sends, Content-Length and the body. Then where they
** go, pushed too: host, port, pool (the keep-alive pool's name), tls.
** That is the client's base read once (kept in its run-action template,
** with those strings: made once, kept in the registry), or any other URL
** read into *own (freed by its owner with fs_wire_target_free). Raises on
** a proxy (cosockets have none), a base_url with user info, and when out
** of memory.
**
** Three, not one: LuaJIT interns each string under a hash of a few of its
** bytes (the first four, the last four, four at a quarter, four at the
** half), and two calls' whole requests differ where none of those look
** (the request id, deep in a header section its token makes long), so
** every new one would be compared with each one kept. Apart, the request
** id's line hashes on its own bytes, and the other two are the same
** strings from one call to the next (found, not made).
*/
void fs_request_wire(lua_State *L, fs_transfer *t, const fs_request *r, fs_wire_target *own);

/*
** The same bytes and values for the commonest call, made without the
** transfer's header list: a run action on the client's own options, where
** those options set nothing a call changes but the timeout (no request_id,
** if_match or headers; no proxy) and tm, the template made from them, was
** sent over the wire before (fs_request_wire made its pieces). Then
** fs_request_wire_plain fills r with what the call reads (the template,
** max_body, the timeouts, insecure, a fresh request id) and returns 1, and
** fs_request_wire_plain_push, for the run id (checked by the caller: len
** bytes, fs_run_id_problem), pushes what fs_request_wire pushes (not full:
** the three pieces only). Else 0, r untouched: the caller takes the general
** way. The middle piece is the call's x-request-id line, FS_ID_LINE and
** the id, ended by CRLF.
*/
#define FS_ID_LINE "x-request-id: "
int fs_request_wire_plain(fs_template *tm, fs_request *r);
void fs_request_wire_plain_push(lua_State *L, const fs_request *r, const char *run_id,
                                size_t len, int full);

#ifdef FS_FUZZING
/* Test-only (fuzz/request.c): each URL and header list as built, before
** libcurl sees them. Absent from every other build. */
extern void (*fs_fuzz_on_url)(const char *url);
extern void (*fs_fuzz_on_headers)(const struct curl_slist *headers);
#endif

FS_INTERNAL_END

#endif
