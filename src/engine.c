#include <stdlib.h>
#include <string.h>

#include "engine.h"

/* libcurl waits at most this long between checks of its own timers. */
#define FS_POLL_MS 1000

int fs_engine_init(fs_engine *e) {
  e->multi = curl_multi_init();
  return e->multi != NULL ? 0 : -1;
}

void fs_engine_free(fs_engine *e) {
  if (e->multi != NULL) {
    curl_multi_cleanup(e->multi);
    e->multi = NULL;
  }
}

CURLMcode fs_engine_submit(fs_engine *e, fs_transfer *t) {
  CURLMcode rc = curl_multi_add_handle(e->multi, t->easy);
  if (rc == CURLM_OK) {
    t->engine = e;
    t->done = 0;
  }
  return rc;
}

static CURLMcode engine_harvest(fs_engine *e) {
  CURLMsg *msg;
  int queued;
  while ((msg = curl_multi_info_read(e->multi, &queued)) != NULL) {
    CURL *easy = msg->easy_handle;
    CURLcode result = msg->data.result;  /* msg dies with remove_handle */
    char *owner = NULL;
    fs_transfer *t;
    CURLMcode rc;
    if (msg->msg != CURLMSG_DONE)
      continue;
    if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, &owner) != CURLE_OK
        || owner == NULL)
      return CURLM_INTERNAL_ERROR;
    t = (fs_transfer *)owner;
    rc = curl_multi_remove_handle(e->multi, easy);
    if (rc != CURLM_OK)
      return rc;
    t->engine = NULL;
    t->result = result;
    t->done = 1;
  }
  return CURLM_OK;
}

CURLMcode fs_engine_step(fs_engine *e) {
  int running;
  CURLMcode rc = curl_multi_perform(e->multi, &running);
  return rc == CURLM_OK ? engine_harvest(e) : rc;
}

CURLMcode fs_engine_wait(fs_engine *e, int timeout_ms) {
  return curl_multi_poll(e->multi, NULL, 0, timeout_ms, NULL);
}

CURLMcode fs_engine_run(fs_engine *e, fs_transfer *t) {
  CURLMcode rc = fs_engine_submit(e, t);
  while (rc == CURLM_OK) {
    rc = fs_engine_step(e);
    if (rc != CURLM_OK || t->done)
      break;
    rc = fs_engine_wait(e, FS_POLL_MS);
  }
  return rc;
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

CURLcode fs_transfer_init(fs_transfer *t, size_t max_body) {
  CURLcode rc = CURLE_OK;
  t->max_body = max_body;
  t->easy = curl_easy_init();
  if (t->easy == NULL)
    return CURLE_OUT_OF_MEMORY;
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
#if FS_CURL_AT_LEAST(7, 80, 0)
  FS_SET(CURLOPT_PREREQFUNCTION, transfer_on_prereq);
  FS_SET(CURLOPT_PREREQDATA, (void *)t);
#endif
#undef FS_SET
  return rc;
}

void fs_transfer_free(fs_transfer *t) {
  if (t->engine != NULL) {
    /* still submitted: a Lua error unwound mid-call */
    (void)curl_multi_remove_handle(t->engine->multi, t->easy);
    t->engine = NULL;
  }
  if (t->easy != NULL) {
    curl_easy_cleanup(t->easy);
    t->easy = NULL;
  }
  curl_slist_free_all(t->headers);
  t->headers = NULL;
  free(t->body);
  t->body = NULL;
  t->body_len = t->body_cap = 0;
}

int fs_transfer_sent(const fs_transfer *t) {
#if FS_CURL_AT_LEAST(7, 80, 0)
  return t->sends > 0;
#else
  long size = 0;
  return curl_easy_getinfo(t->easy, CURLINFO_REQUEST_SIZE, &size) == CURLE_OK
         && size > 0;
#endif
}
