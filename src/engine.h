/*
** The transfer engine: one libcurl multi handle driving any number of
** transfers. A blocking call, a batch of concurrent calls and a
** non-blocking wait inside OpenResty are the same three steps:
** submit, step/wait, harvest. No Lua runs here.
**
** The multi handle keeps the connection pool, so every transfer of one
** engine can reuse the connections of the others; finished transfers give
** their easy handles back to a small pool so a steady stream of calls
** allocates nothing new.
*/
#ifndef FLOWSERVICE_ENGINE_H
#define FLOWSERVICE_ENGINE_H

#include <stddef.h>
#include <curl/curl.h>

#include "internal.h"

FS_INTERNAL_BEGIN

/* True when the libcurl we compile against is at least x.y.z. */
#define FS_CURL_AT_LEAST(x, y, z) \
  (LIBCURL_VERSION_NUM >= (((x) << 16) | ((y) << 8) | (z)))

/* curl_multi_poll came with 7.66.0; the URL API and MAXAGE_CONN before. */
#if !FS_CURL_AT_LEAST(7, 66, 0)
#error "lua-flowservice needs libcurl 7.66.0 or later (found " LIBCURL_VERSION ")"
#endif

/*
** How a run-creating request is kept from going out twice. libcurl resends
** a request on a reused connection that dies before any reply byte, even a
** POST the server already acted on. With CURLOPT_PREREQFUNCTION (7.80.0)
** the second send is refused; without it (or built with -DFS_NO_PREREQ, to
** test the fallback) such a request gets a fresh connection that is never
** reused, and libcurl only resends on reused connections.
*/
#if FS_CURL_AT_LEAST(7, 80, 0) && !defined(FS_NO_PREREQ)
#define FS_HAVE_PREREQ 1
#define FS_RESEND_GUARD "prereq"
#else
#define FS_HAVE_PREREQ 0
#define FS_RESEND_GUARD "fresh_connection"
#endif

#define FS_IDLE_HANDLES 16

/*
** libcurl tells the engine which sockets to watch (CURLMOPT_SOCKETFUNCTION)
** and when its next timer is due (CURLMOPT_TIMERFUNCTION); a step acts only
** on the sockets that are ready (curl_multi_socket_action), so a step with
** nothing to do is one epoll_wait(..., 0) however many transfers wait. The
** set is an epoll instance on Linux (its fd is what an event loop watches),
** an array for poll(2) elsewhere (or built with -DFS_NO_EPOLL).
**
** The sockets the engine opens for libcurl (CURLOPT_OPENSOCKETFUNCTION)
** and sees closed (CURLOPT_CLOSESOCKETFUNCTION) stay in the epoll set when
** libcurl stops watching them between two transfers of a kept connection
** ("parked"): the next transfer on it costs no epoll_ctl, or one MOD. A
** parked socket that turns ready (the server closed it) leaves the set
** then; libcurl finds it dead before any reuse, as always.
*/
#if defined(__linux__) && !defined(FS_NO_EPOLL)
#define FS_HAVE_EPOLL 1
#define FS_SOCKET_SET "epoll"
#else
#define FS_HAVE_EPOLL 0
#define FS_SOCKET_SET "poll"
#endif

struct pollfd;

typedef struct fs_transfer fs_transfer;

/*
** What an engine knows of the process it runs in, on a page of its own
** that the kernel hands a forked child zeroed (MADV_WIPEONFORK, Linux
** 4.14): `alive` reads 0 in a child, so a fork check is a load, not a
** getpid() system call, and the random bytes kept for request ids are
** never the parent's. Without the page (madvise refused, or built with
** -DFS_NO_WIPEONFORK) the engine compares getpid() and asks getrandom for
** every id, as before.
*/
typedef struct fs_process fs_process;

/*
** Header lines that every request of one client configuration sends
** (identity, Content-Type, Accept, User-Agent), built once and shared by
** its transfers: each transfer links its own lines (x-request-id,
** If-Match, extra headers) in front. Freed when the last holder lets go.
*/
typedef struct fs_tail {
  int refs;
  struct curl_slist *list;
} fs_tail;

/* Drop one reference; frees the list with the last one. NULL is fine. */
void fs_tail_release(fs_tail *tail);

typedef struct fs_engine {
  CURLM *multi;
  CURLSH *dns;                  /* the DNS cache its handles share, or NULL */
  fs_transfer *attached;        /* transfers holding one of our easy handles */
  CURL *idle[FS_IDLE_HANDLES];  /* easy handles kept for reuse */
  int nidle;
  long max_idle_seconds;        /* connections idle longer are not reused */
  long pid;                     /* the process that made the multi handle */
  fs_process *proc;             /* its wipe-on-fork page, or NULL */
  unsigned long configs;        /* configuration numbers handed out */
  unsigned long idle_config[FS_IDLE_HANDLES];  /* what each idle handle is
                                ** set up for (0: must be reset first) */
  const fs_transfer *idle_owner[FS_IDLE_HANDLES];  /* the kept transfer whose
                                ** addresses each idle handle still holds, or NULL */
  CURLU *idle_url[FS_IDLE_HANDLES];  /* the URL handle each one goes with */
  unsigned long idle_url_config[FS_IDLE_HANDLES];
  int nsubmitted;               /* transfers in the multi handle */
  /* the sockets libcurl watches, and its timer */
  int epfd;                     /* the epoll set (-1 without) */
  unsigned char *fds;           /* per fd: what the set holds for it (epoll) */
  int nfds;
  struct pollfd *pfds;          /* the poll(2) set without epoll */
  int npfds, cappfds;
  int timer_set;                /* libcurl has a timer ... */
  long long timer_due;          /* ... due then (monotonic microseconds) */
  /* watched transfers finished since the last fs_engine_take_finished:
  ** their addresses only, never dereferenced here (a key may outlive its
  ** transfer; the reader checks) */
  const void **finished;
  int nfinished, capfinished;
  int finished_lost;            /* the list could not grow: some are missing */
} fs_engine;

/*
** One HTTP exchange: what it sends, and once done, what came back. The
** fields a finished transfer's reader and its release touch come first,
** together: a reply often finds its transfer out of every cache (a call
** waits tens of milliseconds while the worker serves a thousand others),
** and each further cache line it reads is another trip to memory.
*/
struct fs_transfer {
  int done;
  CURLcode result;            /* read off the easy handle when the transfer finishes */
  long status;                /* HTTP status, 0 without a reply */
  int sent;                   /* any byte of the request may have left; an
                              ** aborted transfer whose sends are unknown
                              ** counts as sent */
  int once;                   /* creates a run: never sent twice */
  /* the reply, collected by the write callback */
  int too_large;              /* reply passed max_body: aborted on purpose */
  int out_of_memory;          /* the body buffer could not grow */
  char *body;
  size_t body_len, body_cap, max_body;
  /* from the reply's header lines (the last response's) */
  long long retry_after;      /* seconds; -1 without a Retry-After header */
  fs_engine *engine;          /* while attached: from prepare until finish */
  struct curl_slist *head;    /* the header list libcurl reads */
  struct curl_slist *headers; /* the lines this transfer owns (malloc'd); its
                              ** last node may link on to id_node or tail */
  struct curl_slist *headers_last;
  fs_tail *tail;              /* shared lines after ours, or NULL */
  char date[40];              /* the Date header, as sent ("" none); parsed
                              ** only when someone asks for it */
  /* the rest: libcurl's side, and a failure's words */
  fs_transfer *prev, *next;   /* in engine->attached */
  CURL *easy;                 /* borrowed from the engine while attached */
  CURLU *url;                 /* the URL handle that goes with easy (CURLOPT_CURLU),
                              ** or NULL: libcurl reads a run action's URL from
                              ** it, so no call has libcurl parse a URL string */
  unsigned long url_config;   /* url holds this configuration's scheme, host,
                              ** port and query (0: nothing known): a call
                              ** sets only the path */
  unsigned long config;       /* the constant options its handle carries (0:
                              ** none beyond this transfer's own) */
  int configured;             /* the handle came set up for config: only the
                              ** per-transfer options are left to set */
  int kept;                   /* this transfer's memory outlives the engine's
                              ** handles (a client's reused one): a handle it
                              ** gives back may keep pointing at it, and needs
                              ** no pointers set when it comes back to it */
  int watched;                /* listed in engine->finished when it ends */
  int submitted;
  int sends;                  /* times libcurl began sending the request */
  int resend_refused;         /* a second send of a once transfer was stopped */
  struct curl_slist id_node;  /* x-request-id, kept in id_line, when it fits */
  char id_line[72];
  char errbuf[CURL_ERROR_SIZE];
};

/* Engine: 0 on success, -1 when libcurl cannot make a multi handle. */
int fs_engine_init(fs_engine *e);
/* Idempotent. Attached transfers end as aborted (CURLE_ABORTED_BY_CALLBACK)
** and let go of their easy handles. In a forked child the parent's handles
** are forgotten, never freed (freeing would talk on the parent's sockets). */
void fs_engine_free(fs_engine *e);

/*
** fs_transfer_prepare borrows an easy handle (pooled or new) and sets what
** every request of this module needs: body capture with a cap, send
** counting, Retry-After and Date capture, error buffer, no signals, no
** redirects, http(s) only. once: the request creates something and must
** never be sent twice (see FS_RESEND_GUARD). Returns CURLE_OK or the first
** failing CURLcode.
*/
CURLcode fs_transfer_prepare(fs_transfer *t, fs_engine *e, size_t max_body, int once,
                             unsigned long config);
/* A new configuration number: handles set up for one are reused as they
** are by the next transfer asking for it (fs_transfer_prepare's config;
** 0 asks for a handle reset to libcurl's defaults). */
unsigned long fs_engine_new_config(fs_engine *e);
/* n random bytes for a request id: from a buffer refilled by one
** getrandom() per 128 ids, dropped in a forked child (see fs_process). */
void fs_engine_random(fs_engine *e, unsigned char *out, size_t n);
CURLMcode fs_engine_submit(fs_engine *e, fs_transfer *t);
/* Drive every transfer without blocking: act on the ready sockets and a
** due timer; finished ones get done = 1. *running: transfers still in the
** multi handle. */
CURLMcode fs_engine_step(fs_engine *e, int *running);
/* The fd that is readable when a step has something to do (the epoll set),
** or -1 (poll(2) build); with fs_engine_timer_ms, what an event loop waits on. */
int fs_engine_fd(const fs_engine *e);
/* Milliseconds until libcurl's timer is due (0: now), -1 without one. */
long fs_engine_timer_ms(const fs_engine *e);
/* Block until there is socket activity or timeout_ms passes. */
CURLMcode fs_engine_wait(fs_engine *e, int timeout_ms);
/* How long libcurl wants to wait at most before the next step (ms, -1 none). */
CURLMcode fs_engine_timeout(fs_engine *e, long *ms);
/* Drive the engine, blocking, until t (submitted) is done. */
CURLMcode fs_engine_finish(fs_engine *e, fs_transfer *t);
/* nginx forks its workers after init_by_lua: in a child, forget the
** parent's handles (their transfers end aborted, counted as sent: the
** parent may still send them) and start afresh. Returns -1 when no new
** multi handle can be made. */
int fs_engine_after_fork(fs_engine *e);
/* The watched transfers finished since the last call: sets *list to an
** array of their addresses (valid until the next step) and returns the
** count; *lost is 1 when some could not be listed (out of memory). */
int fs_engine_take_finished(fs_engine *e, const void ***list, int *lost);
/* Transfers holding one of e's easy handles (submitted or being built). */
int fs_engine_attached(const fs_engine *e);

/* A reply's body bytes, kept up to t->max_body: returns len, or 0 when
** they would pass it (t->too_large) or memory ran out (t->out_of_memory). */
size_t fs_transfer_add_body(fs_transfer *t, const char *data, size_t len);
/* One header line of a reply (with or without its CRLF), as libcurl's
** header callback sees it: a status line ("HTTP/...") starts a response
** afresh; Retry-After and Date are kept. */
void fs_transfer_add_header(fs_transfer *t, const char *line, size_t len);
/* The same, for a reader that split the line itself: a response begins;
** one field, its name (n bytes, a token) and its value without the
** spaces and tabs around it. */
void fs_transfer_new_response(fs_transfer *t);
void fs_transfer_add_field(fs_transfer *t, const char *name, size_t n, const char *value,
                           size_t len);

/* Idempotent: detaches t from its engine (cancelling it if in flight)
** and frees what it holds; in a forked child, forgets the parent's handles
** instead. */
void fs_transfer_free(fs_transfer *t);

FS_INTERNAL_END

#endif
