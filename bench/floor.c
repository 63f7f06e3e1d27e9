/*
** The floor of this design: what the client's calls cost with no Lua at
** all. One easy handle, reused for N POSTs to the same action URL with the
** same headers, so the connection (and, over h2, the stream setup) is
** libcurl's alone. Per call it does only what the protocol needs: a fresh
** x-request-id, an empty POST, the reply collected into a buffer.
**
**   floor BASE_URL CAFILE N [h1|h2]
**
** BASE_URL is the client's base_url; the run path is appended as the client
** does. Prints one line the harness parses:
**   calls=N seconds=S us_per_call=U proto=P etag=E label=C floor
*/
#define _DEFAULT_SOURCE  /* getrandom, clock_gettime under -std=c99 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

#include <curl/curl.h>

#define RUN_ID "4fb0418e-1804-45d6-8d56-dd51f05c0baf"
#define REQUEST_ID_HEADER "x-request-id: "
#define UUID_LEN 36

typedef struct {
  char data[4096];
  size_t len;
} fl_body;

static void fl_die(const char *what, const char *why) {
  fprintf(stderr, "floor: %s: %s\n", what, why);
  exit(1);
}

static void fl_check(CURLcode rc, const char *what) {
  if (rc != CURLE_OK)
    fl_die(what, curl_easy_strerror(rc));
}

/* A body bigger than the buffer is an error, as the client's max_body is. */
static size_t fl_write(char *ptr, size_t size, size_t nmemb, void *userdata) {
  fl_body *b = (fl_body *)userdata;
  size_t n = size * nmemb;
  if (n > sizeof b->data - 1 - b->len)
    return 0;
  memcpy(b->data + b->len, ptr, n);
  b->len += n;
  return n;
}

/* The same kind of id the client makes: random version-4 UUID text. */
static void fl_uuid(char *out) {
  unsigned char b[16];
  if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b)
    fl_die("getrandom", "short read");
  b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
  b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
  snprintf(out, UUID_LEN + 1,
           "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
           b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
           b[11], b[12], b[13], b[14], b[15]);
}

static struct curl_slist *fl_append(struct curl_slist *list, const char *h) {
  struct curl_slist *next = curl_slist_append(list, h);
  if (next == NULL)
    fl_die("curl_slist_append", "out of memory");
  return next;
}

static double fl_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The etag's text, for the harness to see which protocol nginx spoke. */
static void fl_etag(const fl_body *b, char *out, size_t size) {
  const char *p = strstr(b->data, "\"etag\":\"");
  size_t n = 0;
  if (p != NULL) {
    p += strlen("\"etag\":\"");
    while (p[n] != '\0' && !(p[n] == '"' && (n == 0 || p[n - 1] != '\\')))
      n++;
  }
  if (n >= size)
    n = size - 1;
  memcpy(out, p ? p : "", n);
  out[n] = '\0';
}

int main(int argc, char **argv) {
  CURL *easy;
  struct curl_slist *headers = NULL, *node;
  char *request_id = NULL, url[1024], errbuf[CURL_ERROR_SIZE], etag[128];
  fl_body body;
  long n, i, status = 0, version = 0, http = CURL_HTTP_VERSION_2TLS;
  double start, seconds;

  if (argc < 4 || argc > 5)
    fl_die("usage", "floor BASE_URL CAFILE N [h1|h2]");
  n = strtol(argv[3], NULL, 10);
  if (n <= 0)
    fl_die("N", "must be a positive number");
  if (argc == 5 && strcmp(argv[4], "h1") == 0)
    http = CURL_HTTP_VERSION_1_1;
  else if (argc == 5 && strcmp(argv[4], "h2") != 0)
    fl_die("protocol", "must be h1 or h2");
  if (snprintf(url, sizeof url, "%s/runs/%s/action?op=re-trigger", argv[1],
               RUN_ID) >= (int)sizeof url)
    fl_die("BASE_URL", "too long");

  fl_check(curl_global_init(CURL_GLOBAL_DEFAULT), "curl_global_init");
  easy = curl_easy_init();
  if (easy == NULL)
    fl_die("curl_easy_init", "failed");

  /* the client's fixed headers; x-request-id is rewritten in place per call */
  headers = fl_append(headers, "Authorization: Bearer bench-token");
  headers = fl_append(headers, "x-api-key: bench-key");
  headers = fl_append(headers, "x-gw-ims-org-id: BENCH@AdobeOrg");
  headers = fl_append(headers, "x-sandbox-name: prod");
  headers = fl_append(headers, "Content-Type: application/json");
  headers = fl_append(headers, "Accept: application/json");
  headers = fl_append(headers, REQUEST_ID_HEADER
                      "00000000-0000-4000-8000-000000000000");
  headers = fl_append(headers, "User-Agent: lua-flowservice-bench-floor");
  for (node = headers; node != NULL; node = node->next)
    if (strncmp(node->data, REQUEST_ID_HEADER, strlen(REQUEST_ID_HEADER)) == 0)
      request_id = node->data + strlen(REQUEST_ID_HEADER);

  errbuf[0] = '\0';
  fl_check(curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, errbuf), "ERRORBUFFER");
  fl_check(curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L), "NOSIGNAL");
  fl_check(curl_easy_setopt(easy, CURLOPT_URL, url), "URL");
  fl_check(curl_easy_setopt(easy, CURLOPT_HTTP_VERSION, http), "HTTP_VERSION");
  fl_check(curl_easy_setopt(easy, CURLOPT_CAINFO, argv[2]), "CAINFO");
  fl_check(curl_easy_setopt(easy, CURLOPT_POST, 1L), "POST");
  fl_check(curl_easy_setopt(easy, CURLOPT_POSTFIELDS, ""), "POSTFIELDS");
  fl_check(curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, 0L), "POSTFIELDSIZE");
  fl_check(curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers), "HTTPHEADER");
  fl_check(curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, fl_write), "WRITEFUNCTION");
  fl_check(curl_easy_setopt(easy, CURLOPT_WRITEDATA, &body), "WRITEDATA");
  fl_check(curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 60000L), "TIMEOUT_MS");
  fl_check(curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, 10000L),
           "CONNECTTIMEOUT_MS");

  start = fl_now();
  for (i = 0; i < n; i++) {
    fl_uuid(request_id);  /* same length: the header node is reused as is */
    body.len = 0;
    if (curl_easy_perform(easy) != CURLE_OK)
      fl_die("curl_easy_perform", errbuf);
    fl_check(curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status),
             "RESPONSE_CODE");
    body.data[body.len] = '\0';
    if (status != 200 || strstr(body.data, "\"id\"") == NULL)
      fl_die("reply", body.data);
  }
  seconds = fl_now() - start;

  fl_check(curl_easy_getinfo(easy, CURLINFO_HTTP_VERSION, &version),
           "HTTP_VERSION");
  fl_etag(&body, etag, sizeof etag);
  printf("calls=%ld seconds=%.6f us_per_call=%.1f proto=%s etag=%s "
         "label=C floor\n", n, seconds, seconds * 1e6 / (double)n,
         version == CURL_HTTP_VERSION_2_0 ? "h2" : "http/1.1", etag);
  curl_easy_cleanup(easy);
  curl_slist_free_all(headers);
  curl_global_cleanup();
  return 0;
}
