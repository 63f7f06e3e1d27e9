/*
** Fuzz target 6: the nginx transport's reply reader (src/wire.c) over
** engine.c's header and body readers: the input is a reply, fed
** in one piece, byte by byte, cut after each CR and at points drawn from
** a generator seeded by the input, each with a large max_body and with a
** small one taken from the input. Plain C (no Lua): the reader is C only,
** and without a Lua state a run is cheap enough for millions of them.
**
** Properties: every way of cutting the same bytes ends in the same state,
** error, status, Retry-After, Date, body (unless max_body was passed:
** then how much was kept depends on the cuts) and reusable(), before and
** after the connection closes; the body never passes max_body; a bad
** reply says why and a done one has a final status; reusable only when
** done, never after a close or after extra bytes; a done reply with a
** Content-Length has exactly that many body bytes; done and bad stay so.
**
** The Makefile builds this with FS_WIRE_HEAD_MAX and
** FS_WIRE_CHUNK_LINE_MAX lowered, so inputs of a few KiB reach the caps.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../src/wire.h"

#define WAYS 4

typedef struct {
  fs_wire w;
  fs_transfer t;
  fs_wire_state state;
  fs_wire_state state_after_close;
  int reusable;
  int reusable_after_close;
} reading;

static void fail(const char *why, const uint8_t *data, size_t size) {
  fprintf(stderr, "\nfuzz: property failed: %s (input of %zu bytes)\n", why, size);
  (void)data;
  abort();
}

static uint64_t hash_of(const uint8_t *data, size_t size) {
  uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
  size_t i;
  for (i = 0; i < size; i++)
    h = (h ^ data[i]) * 1099511628211ULL;
  return h;
}

/* The length of the next piece at `at` for way `way` (0: whole, 1: bytes,
** 2: after each CR, 3: drawn from *seed). */
static size_t piece_len(int way, const uint8_t *data, size_t size, size_t at, uint64_t *seed) {
  size_t left = size - at;
  switch (way) {
    case 0:
      return left;
    case 1:
      return 1;
    case 2: {
      const uint8_t *cr = (const uint8_t *)memchr(data + at, '\r', left);
      return cr != NULL ? (size_t)(cr - (data + at)) + 1 : left;
    }
    default:
      *seed = *seed * 6364136223846793005ULL + 1442695040888963407ULL;
      return 1 + (size_t)((*seed >> 33) % (left < 64 ? left : 64));
  }
}

static void read_way(reading *r, int way, const uint8_t *data, size_t size, size_t max_body,
                     uint64_t seed) {
  size_t at = 0, copy_len = 0;
  char *copy = NULL;
  memset(r, 0, sizeof *r);
  fs_wire_init(&r->w);
  r->t.max_body = max_body;
  r->t.retry_after = -1;  /* as fs_transfer_prepare leaves it */
  r->state = fs_wire_feed(&r->w, &r->t, (const char *)data, 0);
  while (at < size) {
    size_t n = piece_len(way, data, size, at, &seed);
    /* a copy in a buffer of exactly n bytes: ASan sees a read past the
    ** piece (one buffer while n stays the same: byte by byte is one) */
    if (n != copy_len) {
      free(copy);
      copy = (char *)malloc(n);
      copy_len = n;
      if (copy == NULL)
        abort();
    }
    memcpy(copy, data + at, n);
    r->state = fs_wire_feed(&r->w, &r->t, copy, n);
    at += n;
    if (r->t.body_len > max_body)
      fail("the body passed max_body", data, size);
  }
  free(copy);
  r->reusable = fs_wire_reusable(&r->w);
}

static void close_way(reading *r) {
  r->state_after_close = fs_wire_feed(&r->w, &r->t, NULL, 0);
  r->reusable_after_close = fs_wire_reusable(&r->w);
}

static void check_alone(const reading *r, fs_wire_state state, int reusable, size_t max_body,
                        const uint8_t *data, size_t size) {
  const char *why = fs_wire_error(&r->w);
  if ((state == FS_WIRE_BAD) != (why != NULL))
    fail("a bad reply must say why, and only a bad one", data, size);
  if (r->t.body_len > max_body)
    fail("the body passed max_body", data, size);
  if (r->t.too_large && state != FS_WIRE_BAD)
    fail("a reply past max_body is not bad", data, size);
  if (reusable && state != FS_WIRE_DONE)
    fail("reusable, yet not done", data, size);
  if (reusable && r->w.extra)
    fail("reusable after extra bytes", data, size);
  if (fs_wire_started(&r->w) != (size > 0))
    fail("started is not 'any byte came'", data, size);
  if (state == FS_WIRE_DONE) {
    if (r->t.status < 200 || r->t.status > 599)
      fail("a done reply without a final status", data, size);
    if (r->w.has_length && !r->w.chunked && r->t.status != 204 && r->t.status != 304
        && (unsigned long long)r->t.body_len != r->w.length)
      fail("a done reply's body is not its Content-Length", data, size);
    if ((r->t.status == 204 || r->t.status == 304) && r->t.body_len != 0)
      fail("a 204 or 304 with a body", data, size);
  }
}

/* b read the same bytes as a (whole): the same outcome. ticked: the
** clock moved between the readings (an HTTP-date Retry-After is read
** against it). */
static void check_same(const reading *a, const reading *b, int ticked, const uint8_t *data,
                       size_t size) {
  const char *ea = fs_wire_error(&a->w), *eb = fs_wire_error(&b->w);
  long long dr = a->t.retry_after - b->t.retry_after;
  if (a->state != b->state || a->state_after_close != b->state_after_close)
    fail("the state depends on the cuts", data, size);
  if ((ea == NULL) != (eb == NULL) || (ea != NULL && strcmp(ea, eb) != 0))
    fail("the error depends on the cuts", data, size);
  if (a->reusable != b->reusable || a->reusable_after_close != b->reusable_after_close)
    fail("reusable() depends on the cuts", data, size);
  if (a->t.status != b->t.status || strcmp(a->t.date, b->t.date) != 0)
    fail("the status or Date depends on the cuts", data, size);
  if (dr != 0 && !(ticked && (dr == 1 || dr == -1) && a->t.retry_after >= 0 && b->t.retry_after >= 0))
    fail("Retry-After depends on the cuts", data, size);
  if (a->t.too_large != b->t.too_large || a->w.extra != b->w.extra)
    fail("too_large or extra depends on the cuts", data, size);
  if (!a->t.too_large
      && (a->t.body_len != b->t.body_len
          || (a->t.body_len > 0 && memcmp(a->t.body, b->t.body, a->t.body_len) != 0)))
    fail("the body depends on the cuts", data, size);
}

static void free_way(reading *r) {
  fs_wire_free(&r->w);
  fs_wire_free(&r->w);  /* idempotent */
  free(r->t.body);
}

static void run_with(const uint8_t *data, size_t size, size_t max_body, uint64_t seed) {
  reading r[WAYS];
  time_t before = time(NULL), after;
  int i;
  for (i = 0; i < WAYS; i++) {
    read_way(&r[i], i, data, size, max_body, seed);
    check_alone(&r[i], r[i].state, r[i].reusable, max_body, data, size);
    close_way(&r[i]);
    check_alone(&r[i], r[i].state_after_close, r[i].reusable_after_close, max_body, data, size);
    if (r[i].state_after_close == FS_WIRE_MORE)
      fail("still reading after the close", data, size);
    if (r[i].state != FS_WIRE_MORE && r[i].state_after_close != r[i].state)
      fail("a done or bad reply changed with the close", data, size);
    if (r[i].reusable_after_close)
      fail("reusable after the close", data, size);
    /* more bytes change nothing now */
    if (fs_wire_feed(&r[i].w, &r[i].t, (const char *)data, size) != r[i].state_after_close)
      fail("a done or bad reply changed with more bytes", data, size);
  }
  after = time(NULL);
  for (i = 1; i < WAYS; i++)
    check_same(&r[0], &r[i], after != before, data, size);
  for (i = 0; i < WAYS; i++)
    free_way(&r[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint64_t h = hash_of(data, size);
  run_with(data, size, 1 << 20, h);
  run_with(data, size, (size_t)(h % 257), h ^ 0x9e3779b97f4a7c15ULL);
  return 0;
}
