/*
** The transfer engine: one libcurl multi handle driving any number of
** transfers. A blocking call, a batch of concurrent calls and a
** non-blocking wait inside OpenResty are the same three steps:
** submit, step/wait, harvest. No Lua runs here.
*/
#ifndef FLOWSERVICE_ENGINE_H
#define FLOWSERVICE_ENGINE_H

#include <stddef.h>
#include <curl/curl.h>

/* True when the libcurl we compile against is at least x.y.z. */
#define FS_CURL_AT_LEAST(x, y, z) \
  (LIBCURL_VERSION_NUM >= (((x) << 16) | ((y) << 8) | (z)))

typedef struct fs_engine {
  CURLM *multi;
} fs_engine;

/* One HTTP exchange: the easy handle, what it sends, what came back. */
typedef struct fs_transfer {
  CURL *easy;
  struct curl_slist *headers;
  fs_engine *engine;        /* set while submitted, cleared on harvest */
  char *body;               /* reply body (malloc'd), body_len bytes */
  size_t body_len;
  size_t body_cap;
  size_t max_body;
  int too_large;            /* reply passed max_body: aborted on purpose */
  int out_of_memory;        /* the body buffer could not grow */
  int sends;                /* times libcurl began sending the request */
  int done;
  CURLcode result;
  char errbuf[CURL_ERROR_SIZE];
} fs_transfer;

/* Engine: 0 on success, -1 when libcurl cannot make a multi handle. */
int fs_engine_init(fs_engine *e);
void fs_engine_free(fs_engine *e);

CURLMcode fs_engine_submit(fs_engine *e, fs_transfer *t);
/* Drive every transfer without blocking; finished ones get done = 1. */
CURLMcode fs_engine_step(fs_engine *e);
/* Block until there is socket activity or timeout_ms passes. */
CURLMcode fs_engine_wait(fs_engine *e, int timeout_ms);
/* Submit t and drive the engine until t is finished. */
CURLMcode fs_engine_run(fs_engine *e, fs_transfer *t);

/*
** Transfer: fs_transfer_init makes the easy handle and sets what every
** request of this module needs (body capture with a cap, send counting,
** error buffer, no signals, no redirects). 0 on success, otherwise the
** first failing CURLcode (or CURLE_OUT_OF_MEMORY for a missing handle).
*/
CURLcode fs_transfer_init(fs_transfer *t, size_t max_body);
/* Idempotent: removes t from its engine first when still submitted. */
void fs_transfer_free(fs_transfer *t);
/* Whether any byte of the request can have left this machine. */
int fs_transfer_sent(const fs_transfer *t);

#endif
