#define _POSIX_C_SOURCE 200809L  /* getpid */
#define _DEFAULT_SOURCE          /* MAP_ANONYMOUS, madvise, getrandom */

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

#if FS_HAVE_EPOLL
#include <sys/epoll.h>
#include <sys/socket.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <sys/random.h>
#endif
#if defined(__linux__) && defined(MADV_WIPEONFORK) && !defined(FS_NO_WIPEONFORK)
#define FS_HAVE_WIPEONFORK 1
#else
#define FS_HAVE_WIPEONFORK 0
#endif

/* Random bytes fetched per getrandom(): 128 request ids. */
#define FS_RANDOM_POOL 2048

struct fs_process {
  int alive;                        /* 1 in the process that armed it; 0 (wiped) in a child */
  size_t left;                      /* unused bytes at the end of pool */
  unsigned char pool[FS_RANDOM_POOL];
};

/* Ready sockets handled per epoll_wait, and at most this many rounds a step. */
#define FS_EVENTS 64
#define FS_EVENT_ROUNDS 16

/* libcurl waits at most this long between checks of its own timers. */
#define FS_POLL_MS 1000
/* Servers commonly drop idle keep-alive connections after 30 s or more;
** reusing one they are about to drop is what makes libcurl resend. */
#define FS_MAX_IDLE_SECONDS 25L

static long long monotonic_us(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
    return 0;
  return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---------------------------------------------------------------------
** The process: fork checks and random bytes
*/

/* A page the kernel zeroes in a forked child, or NULL (then getpid). */
static fs_process *process_open(void) {
#if FS_HAVE_WIPEONFORK
  void *page = mmap(NULL, sizeof(fs_process), PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED)
    return NULL;
  if (madvise(page, sizeof(fs_process), MADV_WIPEONFORK) != 0) {  /* kernel < 4.14 */
    (void)munmap(page, sizeof(fs_process));
    return NULL;
  }
  ((fs_process *)page)->alive = 1;
  ((fs_process *)page)->left = 0;
  return (fs_process *)page;
#else
  return NULL;
#endif
}

static void process_close(fs_process *p) {
#if FS_HAVE_WIPEONFORK
  if (p != NULL)
    (void)munmap((void *)p, sizeof(fs_process));
#else
  (void)p;
#endif
}

static int engine_forked(const fs_engine *e) {
  if (e->proc != NULL)
    return !e->proc->alive;
  return (long)getpid() != e->pid;
}

void fs_engine_random(fs_engine *e, unsigned char *out, size_t n) {
  size_t got = 0;
  fs_process *p = e->proc;
#if defined(__linux__)
  if (p != NULL && p->alive && n <= FS_RANDOM_POOL) {
    if (p->left < n) {
      ssize_t r = getrandom(p->pool, sizeof p->pool, GRND_NONBLOCK);
      p->left = r == (ssize_t)sizeof p->pool ? sizeof p->pool : 0;
    }
    if (p->left >= n) {  /* each byte handed out once, then gone */
      p->left -= n;
      memcpy(out, p->pool + p->left, n);
      memset(p->pool + p->left, 0, n);
      return;
    }
  }
  {
    ssize_t r = getrandom(out, n, GRND_NONBLOCK);
    got = r > 0 ? (size_t)r : 0;
  }
#else
  (void)p;
#endif
  if (got < n) {  /* a tracing id, not a secret: a weak fallback is fine */
    unsigned long x = (unsigned long)time(NULL) ^ (unsigned long)clock()
                      ^ (unsigned long)(size_t)&got ^ (unsigned long)monotonic_us();
    for (; got < n; got++) {
      x = x * 6364136223846793005UL + 1442695040888963407UL;
      out[got] = (unsigned char)(x >> 33);
    }
  }
}

unsigned long fs_engine_new_config(fs_engine *e) {
  return ++e->configs;
}

void fs_tail_release(fs_tail *tail) {
  if (tail != NULL && --tail->refs == 0) {
    curl_slist_free_all(tail->list);
    free(tail);
  }
}

/* ---------------------------------------------------------------------
** The socket set: what libcurl asked to watch
*/

#if FS_HAVE_EPOLL
/* e->fds[s]: */
#define FS_FD_IN 1       /* in the set for reading */
#define FS_FD_OUT 2      /* ... for writing */
#define FS_FD_SET 4      /* in the set */
#define FS_FD_PARKED 8   /* in the set, though libcurl watches it no more */
#define FS_FD_OURS 16    /* opened by engine_open_socket: its close is seen */

/* s's state, growing the array; NULL when it cannot (then no parking). */
static unsigned char *fd_state(fs_engine *e, curl_socket_t s) {
  if (s < 0)
    return NULL;
  if (s >= e->nfds) {
    int n = e->nfds ? e->nfds : 64;
    unsigned char *grown;
    while (n <= s)
      n *= 2;
    grown = (unsigned char *)realloc(e->fds, (size_t)n);
    if (grown == NULL)
      return NULL;
    memset(grown + e->nfds, 0, (size_t)(n - e->nfds));
    e->fds = grown;
    e->nfds = n;
  }
  return e->fds + s;
}

/* The set for s as libcurl asks; sockp: non-NULL while libcurl has s
** assigned (curl_multi_assign). */
static int sockets_watch(fs_engine *e, curl_socket_t s, int what, void *sockp) {
  struct epoll_event ev;
  unsigned char *st = fd_state(e, s);
  unsigned want = ((what & CURL_POLL_IN) ? FS_FD_IN : 0u) | ((what & CURL_POLL_OUT) ? FS_FD_OUT : 0u);
  if (what == CURL_POLL_REMOVE) {
    if (st != NULL && (*st & FS_FD_OURS) && (*st & FS_FD_SET)) {
      *st |= FS_FD_PARKED;  /* its close would tell us: it may stay */
      return 0;
    }
    (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, s, NULL);  /* closed already: gone anyway */
    if (st != NULL)
      *st &= FS_FD_OURS;
    return 0;
  }
  memset(&ev, 0, sizeof ev);
  ev.events = ((want & FS_FD_IN) ? EPOLLIN : 0u) | ((want & FS_FD_OUT) ? EPOLLOUT : 0u);
  ev.data.fd = s;
  if (st != NULL && (*st & FS_FD_SET)) {  /* watched, or parked: change only what differs */
    if ((*st & (FS_FD_IN | FS_FD_OUT)) != want
        && epoll_ctl(e->epfd, EPOLL_CTL_MOD, s, &ev) != 0
        && !(errno == ENOENT && epoll_ctl(e->epfd, EPOLL_CTL_ADD, s, &ev) == 0))
      return -1;
  } else if (!(sockp != NULL && epoll_ctl(e->epfd, EPOLL_CTL_MOD, s, &ev) == 0)
             && epoll_ctl(e->epfd, EPOLL_CTL_ADD, s, &ev) != 0
             && !(errno == EEXIST && epoll_ctl(e->epfd, EPOLL_CTL_MOD, s, &ev) == 0)) {
    return -1;
  }
  if (st != NULL)
    *st = (unsigned char)((*st & FS_FD_OURS) | FS_FD_SET | want);
  if (sockp != NULL)
    return 0;
  return curl_multi_assign(e->multi, s, (void *)e) == CURLM_OK ? 0 : -1;
}

/* libcurl's connections: sockets whose close the engine sees. */
static curl_socket_t engine_open_socket(void *ud, curlsocktype purpose,
                                        struct curl_sockaddr *address) {
  fs_engine *e = (fs_engine *)ud;
  curl_socket_t s = socket(address->family, address->socktype, address->protocol);
  unsigned char *st;
  (void)purpose;
  if (s != CURL_SOCKET_BAD && (st = fd_state(e, s)) != NULL)
    *st = FS_FD_OURS;
  return s;
}

/* Out of the set before the close: a forked child may hold the socket
** open, and then the kernel would keep it in our set under its number. */
static int engine_close_socket(void *ud, curl_socket_t s) {
  fs_engine *e = (fs_engine *)ud;
  if (s >= 0 && s < e->nfds) {
    if (e->fds[s] & FS_FD_SET)
      (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, s, NULL);
    e->fds[s] = 0;
  }
  return close(s);
}
#else
static int sockets_watch(fs_engine *e, curl_socket_t s, int what, void *sockp) {
  int i;
  (void)sockp;
  for (i = 0; i < e->npfds && e->pfds[i].fd != s; i++)
    ;
  if (what == CURL_POLL_REMOVE) {
    if (i < e->npfds)
      e->pfds[i] = e->pfds[--e->npfds];
    return 0;
  }
  if (i == e->npfds) {
    if (e->npfds == e->cappfds) {
      int cap = e->cappfds ? e->cappfds * 2 : 16;
      struct pollfd *grown = (struct pollfd *)realloc(e->pfds, (size_t)cap * sizeof *grown);
      if (grown == NULL)
        return -1;
      e->pfds = grown;
      e->cappfds = cap;
    }
    e->pfds[e->npfds++].fd = s;
  }
  e->pfds[i].events = (short)(((what & CURL_POLL_IN) ? POLLIN : 0)
                              | ((what & CURL_POLL_OUT) ? POLLOUT : 0));
  e->pfds[i].revents = 0;
  return 0;
}
#endif

static int engine_on_socket(CURL *easy, curl_socket_t s, int what, void *ud, void *sockp) {
  (void)easy;
  return sockets_watch((fs_engine *)ud, s, what, sockp);
}

static int engine_on_timer(CURLM *multi, long timeout_ms, void *ud) {
  fs_engine *e = (fs_engine *)ud;
  (void)multi;
  if (timeout_ms < 0) {
    e->timer_set = 0;
  } else {
    e->timer_set = 1;
    e->timer_due = monotonic_us() + (long long)timeout_ms * 1000;
  }
  return 0;
}

/* A multi handle that reports its sockets and timer to e, and an empty set. */
static int engine_open(fs_engine *e) {
  e->timer_set = 0;
  e->npfds = 0;
#if FS_HAVE_EPOLL
  if (e->epfd < 0)
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (e->epfd < 0)
    return -1;
#endif
  e->multi = curl_multi_init();
  if (e->multi == NULL)
    return -1;
  /* the handles' DNS cache: the multi handle's own has 71 slots, which
  ** libcurl walks to prune it at the end of every transfer; a share's has 23 */
  if (e->dns == NULL && (e->dns = curl_share_init()) != NULL
      && curl_share_setopt(e->dns, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK) {
    (void)curl_share_cleanup(e->dns);
    e->dns = NULL;  /* the multi handle's cache then */
  }
  if (curl_multi_setopt(e->multi, CURLMOPT_SOCKETFUNCTION, engine_on_socket) != CURLM_OK
      || curl_multi_setopt(e->multi, CURLMOPT_SOCKETDATA, (void *)e) != CURLM_OK
      || curl_multi_setopt(e->multi, CURLMOPT_TIMERFUNCTION, engine_on_timer) != CURLM_OK
      || curl_multi_setopt(e->multi, CURLMOPT_TIMERDATA, (void *)e) != CURLM_OK) {
    curl_multi_cleanup(e->multi);
    e->multi = NULL;
    return -1;
  }
  return 0;
}

/* Let go of the set; in a forked child the epoll instance stays the
** parent's (closing our fd of it touches nothing of theirs). */
static void engine_close_set(fs_engine *e) {
  if (e->epfd >= 0) {
    (void)close(e->epfd);
    e->epfd = -1;
  }
  free(e->pfds);
  e->pfds = NULL;
  e->npfds = e->cappfds = 0;
  free(e->fds);
  e->fds = NULL;
  e->nfds = 0;
  e->timer_set = 0;
}

int fs_engine_init(fs_engine *e) {
  memset(e, 0, sizeof *e);
  e->epfd = -1;
  e->max_idle_seconds = FS_MAX_IDLE_SECONDS;
  e->pid = (long)getpid();
  e->proc = process_open();
  return engine_open(e);
}

int fs_engine_fd(const fs_engine *e) {
  return e->epfd;
}

long fs_engine_timer_ms(const fs_engine *e) {
  long long left;
  if (!e->timer_set)
    return -1;
  left = e->timer_due - monotonic_us();
  return left <= 0 ? 0 : (long)((left + 999) / 1000);
}

static void engine_link(fs_engine *e, fs_transfer *t) {
  t->engine = e;
  t->prev = NULL;
  t->next = e->attached;
  if (e->attached != NULL)
    e->attached->prev = t;
  e->attached = t;
}

static void engine_unlink(fs_transfer *t) {
  fs_engine *e = t->engine;
  if (t->prev != NULL)
    t->prev->next = t->next;
  else
    e->attached = t->next;
  if (t->next != NULL)
    t->next->prev = t->prev;
  t->prev = t->next = NULL;
  t->engine = NULL;
}

/* The lines t owns (plain memory), and its hold on the shared ones. */
static void transfer_free_headers(fs_transfer *t) {
  if (t->headers_last != NULL)
    t->headers_last->next = NULL;  /* ours end here; the rest is not ours */
  curl_slist_free_all(t->headers);
  t->headers = t->headers_last = t->head = NULL;
  fs_tail_release(t->tail);
  t->tail = NULL;
}

/* Give t's easy handle back: to the pool while there is room, still set
** up for t's configuration (the next transfer with the same one sets only
** its own options); nothing in it points at t any more. */
static void engine_release(fs_transfer *t) {
  fs_engine *e = t->engine;
  if (t->submitted) {
    (void)curl_multi_remove_handle(e->multi, t->easy);
    t->submitted = 0;
    e->nsubmitted--;
  }
  if (e->nidle < FS_IDLE_HANDLES) {
    /* a handle outside the multi runs no callback; these only keep it
    ** from holding addresses that are about to be freed (a kept
    ** transfer's are not: only its header list goes) */
    (void)curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, (struct curl_slist *)NULL);
    if (!t->kept) {
      (void)curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, (char *)NULL);
      (void)curl_easy_setopt(t->easy, CURLOPT_PRIVATE, (void *)NULL);
    }
    e->idle_owner[e->nidle] = t->kept ? t : NULL;
    e->idle_config[e->nidle] = t->config;
    e->idle_url[e->nidle] = t->url;  /* the handle may still point at it */
    e->idle_url_config[e->nidle] = t->url_config;
    e->idle[e->nidle++] = t->easy;
  } else {
    curl_easy_cleanup(t->easy);
    curl_url_cleanup(t->url);  /* after the handle that may point at it */
  }
  t->easy = NULL;
  t->url = NULL;
  t->url_config = 0;
  transfer_free_headers(t);
  engine_unlink(t);
}

/* Whether an unfinished transfer's request may have left. With the
** prerequest callback the count is exact; without it, anything submitted
** may have been sent. In a forked child nothing is known: the parent may
** still send what it prepared. */
static int transfer_may_be_sent(const fs_transfer *t, int forked) {
  if (forked)
    return 1;
  return FS_HAVE_PREREQ ? t->sends > 0 : t->submitted;
}

static void transfer_abort(fs_transfer *t, int forked, const char *why) {
  if (t->done)
    return;
  t->done = 1;
  t->result = CURLE_ABORTED_BY_CALLBACK;
  t->sent = transfer_may_be_sent(t, forked);
  strcpy(t->errbuf, why);
}

/*
** In a forked child: the handles came from the parent, with its
** connections, and cleaning them up here would shut down TLS sessions the
** parent still uses. They are forgotten instead (a one-time leak per
** child); the transfers end aborted, counted as sent.
*/
static void engine_forget(fs_engine *e) {
  while (e->attached != NULL) {
    fs_transfer *t = e->attached;
    transfer_abort(t, 1, "the process forked while the request was in flight");
    t->easy = NULL;
    curl_url_cleanup(t->url);  /* plain memory, as the header lines */
    t->url = NULL;
    t->submitted = 0;
    transfer_free_headers(t);  /* plain memory: this process's copy */
    engine_unlink(t);
  }
  while (e->nidle > 0)
    curl_url_cleanup(e->idle_url[--e->nidle]);  /* the handles are forgotten */
  e->multi = NULL;
  e->dns = NULL;  /* the parent's, as its handles */
  e->nsubmitted = 0;
  e->pid = (long)getpid();
  if (e->proc != NULL) {  /* the child's page, wiped: arm it for this process */
    e->proc->left = 0;
    e->proc->alive = 1;
  }
  engine_close_set(e);
  free(e->finished);  /* plain memory: this process's copy */
  e->finished = NULL;
  e->nfinished = e->capfinished = 0;
}

void fs_engine_free(fs_engine *e) {
  if (engine_forked(e)) {
    engine_forget(e);
    process_close(e->proc);  /* this process's copy of the page */
    e->proc = NULL;
    return;
  }
  while (e->attached != NULL) {
    fs_transfer *t = e->attached;
    transfer_abort(t, 0, "the client was closed");
    if (t->submitted)
      (void)curl_multi_remove_handle(e->multi, t->easy);
    t->submitted = 0;
    curl_easy_cleanup(t->easy);
    curl_url_cleanup(t->url);
    t->easy = NULL;
    t->url = NULL;
    transfer_free_headers(t);
    engine_unlink(t);
  }
  while (e->nidle > 0) {
    e->nidle--;
    curl_easy_cleanup(e->idle[e->nidle]);
    curl_url_cleanup(e->idle_url[e->nidle]);
  }
  if (e->multi != NULL) {
    curl_multi_cleanup(e->multi);  /* may still report sockets to e */
    e->multi = NULL;
  }
  if (e->dns != NULL) {  /* no handle uses it any more */
    (void)curl_share_cleanup(e->dns);
    e->dns = NULL;
  }
  e->nsubmitted = 0;
  process_close(e->proc);
  e->proc = NULL;
  engine_close_set(e);
  free(e->finished);
  e->finished = NULL;
  e->nfinished = e->capfinished = 0;
}

int fs_engine_after_fork(fs_engine *e) {
  if (engine_forked(e))
    engine_forget(e);
  if (e->multi == NULL)  /* forgotten, here or by a transfer's __gc */
    return engine_open(e);
  return 0;
}

int fs_engine_attached(const fs_engine *e) {
  int n = 0;
  const fs_transfer *t;
  for (t = e->attached; t != NULL; t = t->next)
    n++;
  return n;
}

size_t fs_transfer_add_body(fs_transfer *t, const char *data, size_t len) {
  if (len > t->max_body - t->body_len) {
    t->too_large = 1;
    return 0;
  }
  if (t->body_len + len > t->body_cap) {
    size_t cap = t->body_cap ? t->body_cap
                 : t->max_body < 1024 ? t->max_body : 1024;
    char *grown;
    while (cap < t->body_len + len)
      cap = cap > t->max_body / 2 ? t->max_body : cap * 2;
    grown = (char *)realloc(t->body, cap);
    if (grown == NULL) {
      t->out_of_memory = 1;
      return 0;
    }
    t->body = grown;
    t->body_cap = cap;
  }
  memcpy(t->body + t->body_len, data, len);
  t->body_len += len;
  return len;
}

/* Keep at most max_body bytes; past that, abort the transfer (write error). */
static size_t transfer_on_body(char *data, size_t size, size_t n, void *ud) {
  return fs_transfer_add_body((fs_transfer *)ud, data, size * n);
}

void fs_transfer_new_response(fs_transfer *t) {
  t->retry_after = -1;
  t->date[0] = '\0';
}

/* name (n bytes) is lower, ASCII case aside (no locale has a say). */
static int field_is(const char *name, size_t n, const char *lower, size_t lower_len) {
  size_t i;
  if (n != lower_len)
    return 0;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)name[i];
    if ((c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c) != (unsigned char)lower[i])
      return 0;
  }
  return 1;
}

#define FIELD_IS(name, n, lower) field_is(name, n, lower, sizeof lower - 1)

/* Retry-After: seconds or an HTTP date (vlen bytes, under 128). */
FS_COLD static void read_retry_after(fs_transfer *t, const char *v, size_t vlen) {
  char value[128];
  char *end;
  long long seconds;
  memcpy(value, v, vlen);
  value[vlen] = '\0';
  seconds = strtoll(value, &end, 10);
  if (end != value && *end == '\0' && value[0] != '-') {
    t->retry_after = seconds;
  } else {
    time_t when = curl_getdate(value, NULL);
    if (when != (time_t)-1) {
      time_t now = time(NULL);
      t->retry_after = when > now ? (long long)(when - now) : 0;
    }
  }
}

void fs_transfer_add_field(fs_transfer *t, const char *name, size_t n, const char *v,
                           size_t vlen) {
  if (vlen == 0 || vlen >= 128)
    return;  /* nothing, or more than either can be */
  if (FIELD_IS(name, n, "date")) {
    if (vlen < sizeof t->date) {
      memcpy(t->date, v, vlen);
      t->date[vlen] = '\0';
    }
  } else if (FIELD_IS(name, n, "retry-after")) {
    read_retry_after(t, v, vlen);
  }  /* the only two we keep */
}

void fs_transfer_add_header(fs_transfer *t, const char *data, size_t len) {
  size_t name, vlen;
  const char *v;
  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {  /* a new response begins */
    fs_transfer_new_response(t);
    return;
  }
  v = (const char *)memchr(data, ':', len);
  if (v == NULL)
    return;
  name = (size_t)(v - data);
  v++;
  vlen = len - (size_t)(v - data);
  while (vlen > 0 && (*v == ' ' || *v == '\t'))
    v++, vlen--;
  while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n'
                      || v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
    vlen--;
  fs_transfer_add_field(t, data, name, v, vlen);
}

/* Retry-After (seconds or an HTTP date) and Date, from the last response's
** header lines; one code path for every libcurl version. */
static size_t transfer_on_header(char *data, size_t size, size_t n, void *ud) {
  fs_transfer_add_header((fs_transfer *)ud, data, size * n);
  return size * n;
}

#if FS_HAVE_PREREQ
/* Called once per request libcurl is about to send, resends included. A
** resend of a once transfer is refused: the first may have been acted on. */
static int transfer_on_prereq(void *ud, char *primary_ip, char *local_ip,
                              int primary_port, int local_port) {
  fs_transfer *t = (fs_transfer *)ud;
  (void)primary_ip; (void)local_ip; (void)primary_port; (void)local_port;
  if (t->once && t->sends > 0) {
    t->resend_refused = 1;
    return CURL_PREREQFUNC_ABORT;
  }
  t->sends++;
  return CURL_PREREQFUNC_OK;
}
#endif

CURLcode fs_transfer_prepare(fs_transfer *t, fs_engine *e, size_t max_body, int once,
                             unsigned long config) {
  CURLcode rc = CURLE_OK;
  t->max_body = max_body;
  t->once = once;
  t->retry_after = -1;
  t->config = config;
  t->configured = 0;
  if (e->nidle > 0) {
    int same_owner;
    e->nidle--;
    t->easy = e->idle[e->nidle];
    t->url = e->idle_url[e->nidle];
    t->url_config = e->idle_url_config[e->nidle];
    same_owner = t->kept && e->idle_owner[e->nidle] == t;
    if (config != 0 && e->idle_config[e->nidle] == config) {
      t->configured = 1;
      if (same_owner) {  /* it points at t already, and is set up for config */
        engine_link(e, t);
        return CURLE_OK;
      }
    } else {
      curl_easy_reset(t->easy);  /* keeps the DNS and TLS session caches */
    }
  } else {
    t->easy = curl_easy_init();
    t->url = NULL;
    t->url_config = 0;
  }
  if (t->easy == NULL)
    return CURLE_OUT_OF_MEMORY;
  engine_link(e, t);
#define FS_SET(opt, val) \
  if (rc == CURLE_OK) rc = curl_easy_setopt(t->easy, opt, val)
  FS_SET(CURLOPT_PRIVATE, (void *)t);
  FS_SET(CURLOPT_ERRORBUFFER, t->errbuf);
  FS_SET(CURLOPT_WRITEDATA, (void *)t);
  FS_SET(CURLOPT_HEADERDATA, (void *)t);
#if FS_HAVE_PREREQ
  FS_SET(CURLOPT_PREREQDATA, (void *)t);
#endif
  if (t->configured)  /* the rest is the configuration's, already set */
    return rc;
  FS_SET(CURLOPT_NOSIGNAL, 1L);
  FS_SET(CURLOPT_FOLLOWLOCATION, 0L);  /* a redirect would carry the token */
  FS_SET(CURLOPT_WRITEFUNCTION, transfer_on_body);
  FS_SET(CURLOPT_HEADERFUNCTION, transfer_on_header);
  FS_SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)max_body);
#if FS_CURL_AT_LEAST(7, 85, 0)
  FS_SET(CURLOPT_PROTOCOLS_STR, "http,https");
#else
  FS_SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  FS_SET(CURLOPT_MAXAGE_CONN, e->max_idle_seconds);
  if (e->dns != NULL)
    FS_SET(CURLOPT_SHARE, e->dns);
#if FS_HAVE_EPOLL
  FS_SET(CURLOPT_OPENSOCKETFUNCTION, engine_open_socket);
  FS_SET(CURLOPT_OPENSOCKETDATA, (void *)e);
  FS_SET(CURLOPT_CLOSESOCKETFUNCTION, engine_close_socket);
  FS_SET(CURLOPT_CLOSESOCKETDATA, (void *)e);
#endif
#if FS_HAVE_PREREQ
  FS_SET(CURLOPT_PREREQFUNCTION, transfer_on_prereq);
#else
  if (once) {  /* libcurl resends only on reused connections */
    FS_SET(CURLOPT_FRESH_CONNECT, 1L);
    FS_SET(CURLOPT_FORBID_REUSE, 1L);
  }
#endif
#undef FS_SET
  return rc;
}

CURLMcode fs_engine_submit(fs_engine *e, fs_transfer *t) {
  CURLMcode rc = curl_multi_add_handle(e->multi, t->easy);  /* sets a timer due now */
  if (rc == CURLM_OK) {
    t->submitted = 1;
    t->done = 0;
    e->nsubmitted++;
  }
  return rc;
}

/* List a watched transfer as finished; the list grows by doubling. */
static void engine_note_finished(fs_engine *e, const fs_transfer *t) {
  if (e->nfinished == e->capfinished) {
    int cap = e->capfinished ? e->capfinished * 2 : 64;
    const void **grown = (const void **)realloc((void *)e->finished, (size_t)cap * sizeof *grown);
    if (grown == NULL) {
      e->finished_lost = 1;
      return;
    }
    e->finished = grown;
    e->capfinished = cap;
  }
  e->finished[e->nfinished++] = (const void *)t;
}

int fs_engine_take_finished(fs_engine *e, const void ***list, int *lost) {
  int n = e->nfinished;
  *list = e->finished;
  *lost = e->finished_lost;
  e->nfinished = 0;
  e->finished_lost = 0;
  return n;
}

/* Read what the caller will want off the easy handle, then give it back. */
static void transfer_finish(fs_transfer *t, CURLcode result) {
  t->result = result;
  if (curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &t->status) != CURLE_OK)
    t->status = 0;
#if FS_HAVE_PREREQ
  t->sent = t->sends > 0;
#else
  {
    long size = 0;
    t->sent = curl_easy_getinfo(t->easy, CURLINFO_REQUEST_SIZE, &size) != CURLE_OK
              || size > 0;
  }
#endif
  t->done = 1;
  if (t->watched)
    engine_note_finished(t->engine, t);
  engine_release(t);
}

static CURLMcode engine_harvest(fs_engine *e) {
  CURLMsg *msg;
  int queued;
  while ((msg = curl_multi_info_read(e->multi, &queued)) != NULL) {
    char *owner = NULL;
    if (msg->msg != CURLMSG_DONE)
      continue;
    if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &owner) != CURLE_OK
        || owner == NULL)
      return CURLM_INTERNAL_ERROR;
    transfer_finish((fs_transfer *)owner, msg->data.result);  /* msg dies here */
  }
  return CURLM_OK;
}

static int action_of(unsigned ready_in, unsigned ready_out, unsigned failed) {
  return (ready_in ? CURL_CSELECT_IN : 0) | (ready_out ? CURL_CSELECT_OUT : 0)
         | (failed ? CURL_CSELECT_ERR : 0);
}

/* Act on every ready socket (a later one may have been closed by an earlier
** action: libcurl ignores sockets it does not know). */
static CURLMcode engine_act_on_sockets(fs_engine *e) {
  CURLMcode rc = CURLM_OK;
  int still, n, i;
#if FS_HAVE_EPOLL
  struct epoll_event ev[FS_EVENTS];
  int rounds = 0;
  do {
    n = epoll_wait(e->epfd, ev, FS_EVENTS, 0);
    if (n < 0)
      return errno == EINTR ? CURLM_OK : CURLM_INTERNAL_ERROR;
    for (i = 0; i < n && rc == CURLM_OK; i++) {
      int fd = ev[i].data.fd;
      if (fd < e->nfds && (e->fds[fd] & FS_FD_PARKED)) {  /* an idle connection stirred */
        (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
        e->fds[fd] &= FS_FD_OURS;
        continue;
      }
      rc = curl_multi_socket_action(e->multi, fd,
                                    action_of(ev[i].events & (EPOLLIN | EPOLLHUP),
                                              ev[i].events & EPOLLOUT, ev[i].events & EPOLLERR),
                                    &still);
    }
  } while (rc == CURLM_OK && n == FS_EVENTS && ++rounds < FS_EVENT_ROUNDS);
#else
  struct pollfd ready[FS_EVENTS];
  int base;
  /* a copy: actions change the set */
  for (base = 0; rc == CURLM_OK && base < e->npfds; base += FS_EVENTS) {
    int m = e->npfds - base < FS_EVENTS ? e->npfds - base : FS_EVENTS;
    memcpy(ready, e->pfds + base, (size_t)m * sizeof *ready);
    n = poll(ready, (nfds_t)m, 0);
    if (n < 0)
      return errno == EINTR ? CURLM_OK : CURLM_INTERNAL_ERROR;
    for (i = 0; i < m && n > 0 && rc == CURLM_OK; i++) {
      if (ready[i].revents == 0)
        continue;
      n--;
      rc = curl_multi_socket_action(e->multi, ready[i].fd,
                                    action_of(ready[i].revents & (POLLIN | POLLHUP),
                                              ready[i].revents & POLLOUT,
                                              ready[i].revents & (POLLERR | POLLNVAL)),
                                    &still);
    }
  }
#endif
  return rc;
}

CURLMcode fs_engine_step(fs_engine *e, int *running) {
  CURLMcode rc = engine_act_on_sockets(e);
  if (rc == CURLM_OK && e->timer_set && monotonic_us() >= e->timer_due) {
    int still;
    long ms = -1;
    rc = curl_multi_socket_action(e->multi, CURL_SOCKET_TIMEOUT, 0, &still);
    /* libcurl calls the timer function only when its next timer changed:
    ** after one fired (perhaps early by our clock), ask it */
    if (rc == CURLM_OK)
      rc = curl_multi_timeout(e->multi, &ms);
    if (rc == CURLM_OK)
      (void)engine_on_timer(e->multi, ms, (void *)e);
  }
  if (rc == CURLM_OK)
    rc = engine_harvest(e);
  *running = e->nsubmitted;
  return rc;
}

CURLMcode fs_engine_wait(fs_engine *e, int timeout_ms) {
  return curl_multi_poll(e->multi, NULL, 0, timeout_ms, NULL);
}

CURLMcode fs_engine_timeout(fs_engine *e, long *ms) {
  return curl_multi_timeout(e->multi, ms);
}

CURLMcode fs_engine_finish(fs_engine *e, fs_transfer *t) {
  int running;
  CURLMcode rc = CURLM_OK;
  while (rc == CURLM_OK && !t->done) {
    rc = fs_engine_step(e, &running);
    if (rc == CURLM_OK && !t->done)
      rc = fs_engine_wait(e, FS_POLL_MS);
  }
  return rc;
}

void fs_transfer_free(fs_transfer *t) {
  if (t->engine == NULL && t->headers == NULL && t->tail == NULL) {
    t->head = t->headers_last = NULL;  /* no handle, no lines: freed before, or never built */
  } else {
    if (t->engine != NULL && engine_forked(t->engine))
      engine_forget(t->engine);  /* detaches t, and every other transfer */
    if (t->engine != NULL)
      engine_release(t);  /* cancelled in flight, or never submitted */
    else
      transfer_free_headers(t);  /* never attached (the nginx transport's) */
  }
  free(t->body);
  t->body = NULL;
  t->body_len = t->body_cap = 0;
}
