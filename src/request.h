/*
** Requests: validated C values -> a configured libcurl transfer.
** Knows HTTP and the one Flow Service URL shape the core builds; the
** Lua side of the module knows everything else about Adobe.
*/
#ifndef FLOWSERVICE_REQUEST_H
#define FLOWSERVICE_REQUEST_H

#include <stddef.h>

#include "engine.h"

/* How to reach the server; pointers may be NULL for libcurl's default. */
typedef struct fs_transport {
  long timeout_ms;
  long connect_timeout_ms;
  const char *ca_file;
  const char *ca_path;
  const char *proxy;
  int insecure;
} fs_transport;

/* Byte-level safety of what goes on the wire (header injection). */
int fs_header_name_ok(const char *name, size_t len);
int fs_header_value_ok(const char *value, size_t len);

/*
** {base_url}/runs/{run_id}/action?op={op} with run_id and op
** percent-escaped by libcurl. On success *url is for curl_free. On failure
** returns NULL in *url and a reason for the caller's error message.
*/
const char *fs_url_run_action(CURL *easy, const char *base_url,
                              const char *run_id, const char *op,
                              char **url);

CURLcode fs_request_transport(fs_transfer *t, const fs_transport *tr);
/* POST url with an empty body (and without libcurl reading stdin). */
CURLcode fs_request_post_empty(fs_transfer *t, const char *url);

#endif
