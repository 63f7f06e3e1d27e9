/*
** The reply reader of the nginx transport: an HTTP/1.1 response read from
** its bytes as a cosocket hands them over (flowservice.wire), into the
** same fs_transfer fields libcurl's callbacks fill (status, Date,
** Retry-After, the body under max_body), so core.c turns both into one
** kind of result. Pure C: no Lua, no I/O, no libcurl transfer.
**
** What it reads: a status line `HTTP/1.x NNN reason` (a response begins:
** fs_transfer_new_response); header lines (each field handed to
** fs_transfer_add_field); 1xx interim responses skipped (101 refused); a
** body delimited by Transfer-Encoding: chunked (trailers read and
** dropped), by Content-Length, by nothing for 204/304, else by the
** connection's close. Anything else is a bad reply:
** obs-folded lines, a transfer-coding other than chunked, two different
** Content-Lengths, a head (or trailers) over FS_WIRE_HEAD_MAX bytes.
*/
#ifndef FLOWSERVICE_WIRE_H
#define FLOWSERVICE_WIRE_H

#include <stddef.h>

#include "engine.h"

FS_INTERNAL_BEGIN

/* Bytes of head (every status and header line, 1xx ones included) and
** trailers together; a build may lower it (the fuzz target does, to reach
** the cap). */
#ifndef FS_WIRE_HEAD_MAX
#define FS_WIRE_HEAD_MAX (64 * 1024)
#endif
/* Bytes of one chunk-size line, extensions included. */
#ifndef FS_WIRE_CHUNK_LINE_MAX
#define FS_WIRE_CHUNK_LINE_MAX 4096
#endif

typedef enum { FS_WIRE_MORE, FS_WIRE_DONE, FS_WIRE_BAD } fs_wire_state;

typedef struct fs_wire {
  int phase;                  /* where in the reply the next byte belongs */
  char *line;                 /* the header line (or chunk line) being read */
  size_t line_len, line_cap;
  size_t head_bytes;          /* bytes of head and trailers so far */
  unsigned long long remaining;  /* body or chunk bytes still to come */
  int chunked;
  int codings;                /* transfer-codings named (of this response) */
  int unsupported;            /* one of them is not chunked */
  int has_length;
  unsigned long long length;
  int http10;
  int close;                  /* the connection must not carry another request:
                              ** Connection: close, HTTP/1.0 without keep-alive,
                              ** a body read to the close, Transfer-Encoding
                              ** with Content-Length (or on HTTP/1.0), the
                              ** close itself */
  int keep_alive;             /* Connection: keep-alive */
  int started;                /* any byte came */
  int extra;                  /* bytes came after the reply */
  long status;                /* of the head being read */
  const char *error;          /* why FS_WIRE_BAD (static text) */
} fs_wire;

void fs_wire_init(fs_wire *w);

/*
** The next n bytes of the reply; data == NULL: the server closed the
** connection. FS_WIRE_DONE: t holds the whole reply (t->status, body,
** Date, Retry-After). FS_WIRE_BAD: fs_wire_error says why (the body went
** over max_body: t->too_large; memory ran out: t->out_of_memory). Once
** done or bad it stays so; bytes fed after a complete reply only make the
** connection not reusable. n == 0 (data not NULL): the state as it is,
** nothing else happens. Header lines end in CRLF or a bare LF.
*/
fs_wire_state fs_wire_feed(fs_wire *w, fs_transfer *t, const char *data, size_t n);

const char *fs_wire_error(const fs_wire *w);
/* Any byte of a reply came (a connection that closes before one did
** may not have delivered the request at all; the caller says so). */
int fs_wire_started(const fs_wire *w);
/* Done, delimited, no close asked for, nothing after it: the connection
** can carry the next request. */
int fs_wire_reusable(const fs_wire *w);
/* Frees what it holds; idempotent. */
void fs_wire_free(fs_wire *w);

FS_INTERNAL_END

#endif
