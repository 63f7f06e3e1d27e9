#define _POSIX_C_SOURCE 200809L  /* getpid */

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

/* libcurl waits at most this long between checks of its own timers. */
#define FS_POLL_MS 1000
/* Servers commonly drop idle keep-alive connections after 30 s or more;
** reusing one they are about to drop is what makes libcurl resend. */
#define FS_MAX_IDLE_SECONDS 25L

int fs_engine_init(fs_engine *e) {
  memset(e, 0, sizeof *e);
  e->max_idle_seconds = FS_MAX_IDLE_SECONDS;
  e->pid = (long)getpid();
  e->multi = curl_multi_init();
  return e->multi != NULL ? 0 : -1;
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

/* Give t's easy handle back: to the pool while there is room. */
static void engine_release(fs_transfer *t) {
  fs_engine *e = t->engine;
  if (t->submitted) {
    (void)curl_multi_remove_handle(e->multi, t->easy);
    t->submitted = 0;
  }
  if (e->nidle < FS_IDLE_HANDLES) {
    curl_easy_reset(t->easy);  /* keeps the DNS and TLS session caches */
    e->idle[e->nidle++] = t->easy;
  } else {
    curl_easy_cleanup(t->easy);
  }
  t->easy = NULL;
  curl_slist_free_all(t->headers);
  t->headers = NULL;
  engine_unlink(t);
}

void fs_engine_free(fs_engine *e) {
  while (e->attached != NULL) {
    fs_transfer *t = e->attached;
    if (!t->done) {
      t->done = 1;
      t->result = CURLE_ABORTED_BY_CALLBACK;
      strcpy(t->errbuf, "the client was closed");
    }
    if (t->submitted)
      (void)curl_multi_remove_handle(e->multi, t->easy);
    t->submitted = 0;
    curl_easy_cleanup(t->easy);
    t->easy = NULL;
    curl_slist_free_all(t->headers);
    t->headers = NULL;
    engine_unlink(t);
  }
  while (e->nidle > 0)
    curl_easy_cleanup(e->idle[--e->nidle]);
  if (e->multi != NULL) {
    curl_multi_cleanup(e->multi);
    e->multi = NULL;
  }
}

/*
** The handles came from the parent, with its connections: cleaning them up
** here would shut down TLS sessions the parent still uses. They are
** forgotten instead (a one-time leak per worker), and this process starts
** with a multi handle of its own.
*/
int fs_engine_after_fork(fs_engine *e) {
  long pid = (long)getpid();
  if (pid == e->pid || e->multi == NULL)
    return 0;
  while (e->attached != NULL) {
    fs_transfer *t = e->attached;
    if (!t->done) {
      t->done = 1;
      t->result = CURLE_ABORTED_BY_CALLBACK;
      strcpy(t->errbuf, "the process forked while the request was in flight");
    }
    t->easy = NULL;
    t->submitted = 0;
    engine_unlink(t);
  }
  e->nidle = 0;
  e->pid = pid;
  e->multi = curl_multi_init();
  return e->multi != NULL ? 0 : -1;
}

int fs_engine_attached(const fs_engine *e) {
  int n = 0;
  const fs_transfer *t;
  for (t = e->attached; t != NULL; t = t->next)
    n++;
  return n;
}

/* Keep at most max_body bytes; past that, abort the transfer (write error). */
static size_t transfer_on_body(char *data, size_t size, size_t n, void *ud) {
  fs_transfer *t = (fs_transfer *)ud;
  size_t len = size * n;
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

#if FS_CURL_AT_LEAST(7, 80, 0)
/* Called once per request libcurl is about to send, resends included. */
static int transfer_on_prereq(void *ud, char *primary_ip, char *local_ip,
                              int primary_port, int local_port) {
  (void)primary_ip; (void)local_ip; (void)primary_port; (void)local_port;
  ((fs_transfer *)ud)->sends++;
  return CURL_PREREQFUNC_OK;
}
#endif

CURLcode fs_transfer_prepare(fs_transfer *t, fs_engine *e, size_t max_body) {
  CURLcode rc = CURLE_OK;
  t->max_body = max_body;
  t->easy = e->nidle > 0 ? e->idle[--e->nidle] : curl_easy_init();
  if (t->easy == NULL)
    return CURLE_OUT_OF_MEMORY;
  engine_link(e, t);
#define FS_SET(opt, val) \
  if (rc == CURLE_OK) rc = curl_easy_setopt(t->easy, opt, val)
  FS_SET(CURLOPT_PRIVATE, (void *)t);
  FS_SET(CURLOPT_ERRORBUFFER, t->errbuf);
  FS_SET(CURLOPT_NOSIGNAL, 1L);
  FS_SET(CURLOPT_FOLLOWLOCATION, 0L);  /* a redirect would carry the token */
  FS_SET(CURLOPT_WRITEFUNCTION, transfer_on_body);
  FS_SET(CURLOPT_WRITEDATA, (void *)t);
  FS_SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)max_body);
#if FS_CURL_AT_LEAST(7, 85, 0)
  FS_SET(CURLOPT_PROTOCOLS_STR, "http,https");
#else
  FS_SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
#if FS_CURL_AT_LEAST(7, 65, 0)
  FS_SET(CURLOPT_MAXAGE_CONN, e->max_idle_seconds);
#endif
#if FS_CURL_AT_LEAST(7, 80, 0)
  FS_SET(CURLOPT_PREREQFUNCTION, transfer_on_prereq);
  FS_SET(CURLOPT_PREREQDATA, (void *)t);
#endif
#undef FS_SET
  return rc;
}

CURLMcode fs_engine_submit(fs_engine *e, fs_transfer *t) {
  CURLMcode rc = curl_multi_add_handle(e->multi, t->easy);
  if (rc == CURLM_OK) {
    t->submitted = 1;
    t->done = 0;
  }
  return rc;
}

static void transfer_keep_date(fs_transfer *t) {
  t->date[0] = '\0';
#if FS_CURL_AT_LEAST(7, 83, 0)
  {
    struct curl_header *h;
    if (curl_easy_header(t->easy, "Date", 0, CURLH_HEADER, -1, &h) == CURLHE_OK
        && strlen(h->value) < sizeof t->date)
      strcpy(t->date, h->value);
  }
#endif
}

static long long transfer_retry_after(fs_transfer *t) {
#if FS_CURL_AT_LEAST(7, 83, 0)
  struct curl_header *h;
  curl_off_t seconds;  /* libcurl reads both forms: seconds and HTTP date */
  if (curl_easy_header(t->easy, "Retry-After", 0, CURLH_HEADER, -1, &h) == CURLHE_OK
      && curl_easy_getinfo(t->easy, CURLINFO_RETRY_AFTER, &seconds) == CURLE_OK)
    return (long long)seconds;
#else
  (void)t;
#endif
  return -1;
}

/* Read what the caller will want off the easy handle, then give it back. */
static void transfer_finish(fs_transfer *t, CURLcode result) {
  t->result = result;
  if (curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &t->status) != CURLE_OK)
    t->status = 0;
  t->retry_after = transfer_retry_after(t);
  transfer_keep_date(t);
#if FS_CURL_AT_LEAST(7, 80, 0)
  t->sent = t->sends > 0;
#else
  {
    long size = 0;
    t->sent = curl_easy_getinfo(t->easy, CURLINFO_REQUEST_SIZE, &size) == CURLE_OK
              && size > 0;
  }
#endif
  t->done = 1;
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

CURLMcode fs_engine_step(fs_engine *e, int *running) {
  CURLMcode rc = curl_multi_perform(e->multi, running);
  return rc == CURLM_OK ? engine_harvest(e) : rc;
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
  if (t->engine != NULL)
    engine_release(t);  /* cancelled in flight, or never submitted */
  free(t->body);
  t->body = NULL;
  t->body_len = t->body_cap = 0;
}
