#include <stdlib.h>
#include <string.h>

#include "request.h"

/* RFC 9110 token characters: anything else could end or split a header. */
int fs_header_name_ok(const char *name, size_t len) {
  static const char extra[] = "!#$%&'*+-.^_`|~";
  size_t i;
  if (len == 0)
    return 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)name[i];
    int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z')
                || (c >= 'A' && c <= 'Z');
    if (!alnum && (c == '\0' || strchr(extra, c) == NULL))
      return 0;
  }
  return 1;
}

int fs_header_value_ok(const char *value, size_t len) {
  size_t i;
  for (i = 0; i < len; i++)
    if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0')
      return 0;
  return 1;
}

static int url_scheme_is_http(CURLU *u) {
  char *scheme = NULL;
  int ok = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK
           && (strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0);
  curl_free(scheme);
  return ok;
}

/* base path without trailing slashes + "/runs/" + escaped id + "/action" */
static CURLUcode url_set_action_path(CURL *easy, CURLU *u, const char *run_id) {
  char *base = NULL, *id = NULL, *path = NULL;
  CURLUcode rc = curl_url_get(u, CURLUPART_PATH, &base, 0);
  if (rc == CURLUE_OK) {
    size_t n = strlen(base);
    id = curl_easy_escape(easy, run_id, 0);
    while (n > 0 && base[n - 1] == '/')
      n--;
    path = id ? (char *)malloc(n + strlen(id) + sizeof "/runs//action") : NULL;
    if (path == NULL)
      rc = CURLUE_OUT_OF_MEMORY;
    else {
      memcpy(path, base, n);
      strcpy(path + n, "/runs/");
      strcat(path + n, id);
      strcat(path + n, "/action");
      rc = curl_url_set(u, CURLUPART_PATH, path, 0);
    }
  }
  free(path);
  curl_free(id);
  curl_free(base);
  return rc;
}

static CURLUcode url_set_op(CURL *easy, CURLU *u, const char *op) {
  char *value = curl_easy_escape(easy, op, 0);
  char *query = value ? (char *)malloc(strlen(value) + sizeof "op=") : NULL;
  CURLUcode rc = CURLUE_OUT_OF_MEMORY;
  if (query != NULL) {
    strcpy(query, "op=");
    strcat(query, value);
    rc = curl_url_set(u, CURLUPART_QUERY, query, CURLU_APPENDQUERY);
  }
  free(query);
  curl_free(value);
  return rc;
}

const char *fs_url_run_action(CURL *easy, const char *base_url,
                              const char *run_id, const char *op,
                              char **url) {
  const char *why = NULL;
  CURLU *u = curl_url();
  *url = NULL;
  if (u == NULL)
    return "out of memory";
  if (curl_url_set(u, CURLUPART_URL, base_url, 0) != CURLUE_OK)
    why = "is not a valid URL";
  else if (!url_scheme_is_http(u))
    why = "must be an http:// or https:// URL";
  else if (url_set_action_path(easy, u, run_id) != CURLUE_OK
           || url_set_op(easy, u, op) != CURLUE_OK
           || curl_url_get(u, CURLUPART_URL, url, 0) != CURLUE_OK)
    why = "could not be extended with the run path";
  curl_url_cleanup(u);
  return why;
}

CURLcode fs_request_transport(fs_transfer *t, const fs_transport *tr) {
  CURLcode rc = CURLE_OK;
#define FS_SET(opt, val) \
  if (rc == CURLE_OK) rc = curl_easy_setopt(t->easy, opt, val)
  FS_SET(CURLOPT_TIMEOUT_MS, tr->timeout_ms);
  FS_SET(CURLOPT_CONNECTTIMEOUT_MS, tr->connect_timeout_ms);
  if (tr->ca_file != NULL)
    FS_SET(CURLOPT_CAINFO, tr->ca_file);
  if (tr->ca_path != NULL)
    FS_SET(CURLOPT_CAPATH, tr->ca_path);
  if (tr->proxy != NULL)
    FS_SET(CURLOPT_PROXY, tr->proxy);
  FS_SET(CURLOPT_SSL_VERIFYPEER, tr->insecure ? 0L : 1L);
  FS_SET(CURLOPT_SSL_VERIFYHOST, tr->insecure ? 0L : 2L);
#undef FS_SET
  return rc;
}

CURLcode fs_request_post_empty(fs_transfer *t, const char *url) {
  CURLcode rc = curl_easy_setopt(t->easy, CURLOPT_URL, url);
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(t->easy, CURLOPT_POST, 1L);
  if (rc == CURLE_OK)  /* without a body libcurl would read stdin */
    rc = curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, "");
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, 0L);
  if (rc == CURLE_OK)
    rc = curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
  return rc;
}
