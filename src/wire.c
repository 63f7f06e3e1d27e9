/*
** The nginx transport's reply reader (wire.h): a state machine over the
** bytes of one HTTP/1.1 response, fed in whatever pieces the cosocket
** hands over. A line split across two feeds is kept in w->line until its
** LF comes; a line whole in one feed is read where it lies. Every check
** of a line's content waits for the whole line, and the caps count bytes
** as they come, so any split of the same bytes ends in the same state.
** The common reply, its whole head in the feed that starts it, is read in
** one pass (wire_fast) to the same state; anything else goes line by line.
**
** Header fields go to fs_transfer_add_field (a status line to
** fs_transfer_new_response) and body bytes to fs_transfer_add_body, as
** libcurl's callbacks' lines and bytes do: Date, Retry-After and max_body
** have one owner (engine.c).
*/
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

/* w->phase */
enum {
  WIRE_STATUS,       /* the status line (0: what fs_wire_init leaves) */
  WIRE_HEADERS,      /* header lines, up to the empty one */
  WIRE_LENGTH,       /* a Content-Length body: w->remaining bytes */
  WIRE_UNTIL_CLOSE,  /* a body that ends with the connection */
  WIRE_CHUNK_SIZE,   /* a chunk-size line */
  WIRE_CHUNK_DATA,   /* w->remaining bytes of a chunk */
  WIRE_CHUNK_CR,     /* the CRLF after a chunk's data */
  WIRE_CHUNK_LF,
  WIRE_TRAILERS,     /* trailer lines, up to the empty one */
  WIRE_DONE,
  WIRE_BAD
};

#define WIRE_LINE_START 256

void fs_wire_init(fs_wire *w) {
  memset(w, 0, sizeof *w);
  w->phase = WIRE_STATUS;
}

void fs_wire_free(fs_wire *w) {
  free(w->line);
  w->line = NULL;
  w->line_len = w->line_cap = 0;
}

const char *fs_wire_error(const fs_wire *w) {
  return w->error;
}

int fs_wire_started(const fs_wire *w) {
  return w->started;
}

int fs_wire_reusable(const fs_wire *w) {
  return w->phase == WIRE_DONE && !w->close && !w->extra;
}

static fs_wire_state wire_state(const fs_wire *w) {
  return w->phase == WIRE_DONE ? FS_WIRE_DONE
         : w->phase == WIRE_BAD ? FS_WIRE_BAD : FS_WIRE_MORE;
}

FS_COLD static void wire_bad(fs_wire *w, const char *why) {
  w->phase = WIRE_BAD;
  w->error = why;
}

/* ---------------------------------------------------------------------
** Characters and lists
*/

static int is_ows(char c) {
  return c == ' ' || c == '\t';
}

static int is_digit(char c) {
  return c >= '0' && c <= '9';
}

/* RFC 9110 tchar: letters, digits and these (a table: this runs for each
** byte of every header name) */
static const unsigned char tchar[256] = {
  ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
  ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
  ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
  ['8'] = 1, ['9'] = 1,
  ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
  ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
  ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
  ['Y'] = 1, ['Z'] = 1,
  ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
  ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
  ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
  ['y'] = 1, ['z'] = 1,
};

static int hex_value(char c) {
  if (is_digit(c))
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* s (n bytes) is lower, ASCII case aside; no locale has a say. */
static int equals_ci(const char *s, size_t n, const char *lower) {
  size_t i;
  for (i = 0; i < n; i++) {
    char c = s[i] >= 'A' && s[i] <= 'Z' ? (char)(s[i] - 'A' + 'a') : s[i];
    if (lower[i] == '\0' || c != lower[i])
      return 0;
  }
  return lower[n] == '\0';
}

/* A header name (n bytes, tchar only: checked) is the literal lower, of
** letters and '-' only. Lengths first, as most names of a reply are none
** of the few read here; then OR 0x20 folds case: among tchar bytes only a
** letter's two cases give a letter, and only '-' gives '-'. */
static int name_equals(const char *s, const char *lower, size_t n) {
  size_t i;
  for (i = 0; i < n; i++)
    if (((unsigned char)s[i] | 0x20) != (unsigned char)lower[i])
      return 0;
  return 1;
}

#define NAME_IS(s, n, lower) ((n) == sizeof lower - 1 && name_equals(s, lower, n))

/* A field value (n bytes at v) without the spaces and tabs around it:
** where it starts, its length in *len. */
static const char *trim_ows(const char *v, size_t n, size_t *len) {
  while (n > 0 && is_ows(*v))
    v++, n--;
  while (n > 0 && is_ows(v[n - 1]))
    n--;
  *len = n;
  return v;
}

/* The next element of a comma list (RFC 9110 5.6.1: empty elements and
** the OWS around them are skipped); 0 at its end. */
static int list_next(const char *v, size_t n, size_t *pos, const char **item, size_t *len) {
  size_t start, end;
  while (*pos < n && (v[*pos] == ',' || is_ows(v[*pos])))
    (*pos)++;
  if (*pos == n)
    return 0;
  start = *pos;
  while (*pos < n && v[*pos] != ',')
    (*pos)++;
  for (end = *pos; end > start && is_ows(v[end - 1]); end--)
    ;
  *item = v + start;
  *len = end - start;
  return 1;
}

/* ---------------------------------------------------------------------
** Lines
*/

FS_COLD static int line_append(fs_wire *w, const char *data, size_t n) {
  if (n > w->line_cap - w->line_len) {
    size_t cap = w->line_cap ? w->line_cap : WIRE_LINE_START;
    char *grown;
    while (cap - w->line_len < n)
      cap *= 2;  /* n is under a cap far below SIZE_MAX / 2 */
    grown = (char *)realloc(w->line, cap);
    if (grown == NULL)
      return 0;
    w->line = grown;
    w->line_cap = cap;
  }
  memcpy(w->line + w->line_len, data, n);
  w->line_len += n;
  return 1;
}

/*
** Takes the bytes of the line being read from data (*taken of n). 1: the
** line is whole, in *line and *len without its LF (in data, or in w->line,
** valid until the next append); 0: all taken, the LF is still to come;
** -1: bad (the line would pass room bytes, or memory ran out).
*/
static int line_take(fs_wire *w, fs_transfer *t, const char *data, size_t n, size_t room,
                     const char *too_long, size_t *taken, const char **line, size_t *len) {
  const char *lf = (const char *)memchr(data, '\n', n);
  size_t take = lf != NULL ? (size_t)(lf - data) + 1 : n;
  *taken = take;
  if (take > room) {
    wire_bad(w, too_long);
    return -1;
  }
  if (lf != NULL && w->line_len == 0) {  /* whole where it lies: no copy */
    *line = data;
    *len = take - 1;
    return 1;
  }
  if (!line_append(w, data, take)) {
    t->out_of_memory = 1;
    wire_bad(w, "out of memory while reading the reply");
    return -1;
  }
  if (lf == NULL)
    return 0;
  *line = w->line;
  *len = w->line_len - 1;
  w->line_len = 0;
  return 1;
}

/* Drops the CR of a CRLF; a NUL or a CR anywhere else makes the line bad
** (RFC 9112 2.2: a bare CR must not be taken as a line end, and a
** reader that took it so would see other headers than we do). */
static int line_clean(fs_wire *w, const char *line, size_t *len) {
  if (*len > 0 && line[*len - 1] == '\r')
    (*len)--;
  if (memchr(line, '\0', *len) != NULL || memchr(line, '\r', *len) != NULL) {
    wire_bad(w, "a line of the reply holds a NUL or a bare CR");
    return 0;
  }
  return 1;
}

/* ---------------------------------------------------------------------
** The head
*/

/* HTTP/1.0 or HTTP/1.1, SP, three digits, then the end or SP and a
** reason; a new response begins. */
static void read_status_line(fs_wire *w, fs_transfer *t, const char *s, size_t len) {
  long status;
  if (len < 12 || memcmp(s, "HTTP/1.", 7) != 0 || (s[7] != '0' && s[7] != '1')
      || s[8] != ' ' || !is_digit(s[9]) || !is_digit(s[10]) || !is_digit(s[11])
      || (len > 12 && s[12] != ' ')) {
    wire_bad(w, "the reply's status line is not HTTP/1.x and a status code");
    return;
  }
  status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
  if (status < 100 || status > 599) {
    wire_bad(w, "the reply's status code is not between 100 and 599");
    return;
  }
  if (status == 101) {  /* nothing we sent asks for an upgrade */
    wire_bad(w, "the server switched protocols (101)");
    return;
  }
  w->status = status;
  w->http10 = s[7] == '0';
  w->chunked = w->codings = w->unsupported = 0;
  w->has_length = 0;
  w->length = 0;
  w->keep_alive = 0;
  if (status >= 200)
    t->status = status;
  fs_transfer_new_response(t);  /* forgets an interim response's Date */
  w->phase = WIRE_HEADERS;
}

/* Digits, or a comma list of equal ones (RFC 9110 8.6 lets "42, 42" be
** read as 42); the same value in every Content-Length line. */
static void read_content_length(fs_wire *w, const char *v, size_t n) {
  size_t i = 0;
  for (;;) {
    unsigned long long x = 0;
    size_t start = i;
    for (; i < n && is_digit(v[i]); i++) {
      unsigned d = (unsigned)(v[i] - '0');
      if (x > (ULLONG_MAX - d) / 10) {
        wire_bad(w, "the reply's Content-Length is too large");
        return;
      }
      x = x * 10 + d;
    }
    if (i == start) {
      wire_bad(w, "the reply's Content-Length is not a number");
      return;
    }
    if (w->has_length && w->length != x) {
      wire_bad(w, "the reply has two different Content-Lengths");
      return;
    }
    w->has_length = 1;
    w->length = x;
    while (i < n && is_ows(v[i]))
      i++;
    if (i == n)
      return;
    if (v[i] != ',') {
      wire_bad(w, "the reply's Content-Length is not a number");
      return;
    }
    for (i++; i < n && is_ows(v[i]); i++)
      ;
  }
}

/* Only chunked, once, is read: anything else (a compression, chunked
** not last, a line naming nothing) leaves the body's end unknown. */
FS_COLD static void read_transfer_encoding(fs_wire *w, const char *v, size_t n) {
  size_t pos = 0, len;
  const char *item;
  int named = 0;
  while (list_next(v, n, &pos, &item, &len)) {
    named++;
    if (!equals_ci(item, len, "chunked"))
      w->unsupported = 1;
  }
  if (named == 0)
    w->unsupported = 1;
  w->codings += named;
}

static void read_connection(fs_wire *w, const char *v, size_t n) {
  size_t pos = 0, len;
  const char *item;
  while (list_next(v, n, &pos, &item, &len)) {
    if (equals_ci(item, len, "close"))
      w->close = 1;
    else if (equals_ci(item, len, "keep-alive"))
      w->keep_alive = 1;
  }
}

/* The empty line: how the body is delimited (RFC 9112 6.3). */
static void read_head_end(fs_wire *w) {
  if (w->status < 200) {  /* an interim response: the real one follows */
    w->phase = WIRE_STATUS;
    return;
  }
  if (w->http10 && !w->keep_alive)
    w->close = 1;
  if (w->status == 204 || w->status == 304) {
    w->phase = WIRE_DONE;
    return;
  }
  if (w->codings > 0 || w->unsupported) {
    if (w->unsupported || w->codings != 1) {
      wire_bad(w, "the reply has an unsupported transfer-encoding");
      return;
    }
    /* RFC 9112 6.1: with a Content-Length too, or on HTTP/1.0, the
    ** framing is in doubt: read it chunked, then close */
    if (w->has_length || w->http10)
      w->close = 1;
    w->chunked = 1;
    w->phase = WIRE_CHUNK_SIZE;
  } else if (w->has_length) {
    w->remaining = w->length;
    w->phase = w->length == 0 ? WIRE_DONE : WIRE_LENGTH;
  } else {
    w->close = 1;
    w->phase = WIRE_UNTIL_CLOSE;
  }
}

/* `name: value` with a token name; a trailer (in_trailers) is checked
** the same way, then dropped. The name is the tchar bytes before the
** first colon (a colon is none: a name runs up to it or stops short). */
static void read_field(fs_wire *w, fs_transfer *t, const char *s, size_t len, int in_trailers) {
  const char *v;
  size_t name, n;
  if (len == 0) {
    if (in_trailers)
      w->phase = WIRE_DONE;
    else
      read_head_end(w);
    return;
  }
  if (is_ows(s[0])) {  /* RFC 9112 5.2: obs-fold, refused */
    wire_bad(w, "the reply has a folded header line");
    return;
  }
  for (name = 0; name < len && tchar[(unsigned char)s[name]]; name++)
    ;
  if (name == 0 || name == len || s[name] != ':') {
    wire_bad(w, "a header line of the reply is not 'name: value'");
    return;
  }
  if (in_trailers)
    return;
  v = trim_ows(s + name + 1, len - name - 1, &n);
  switch (name) {  /* lengths first: most names of a reply are none of these */
    case 4:   /* Date */
    case 11:  /* Retry-After */
      fs_transfer_add_field(t, s, name, v, n);
      break;
    case 10:
      if (NAME_IS(s, name, "connection"))
        read_connection(w, v, n);
      break;
    case 14:
      if (NAME_IS(s, name, "content-length"))
        read_content_length(w, v, n);
      break;
    case 17:
      if (NAME_IS(s, name, "transfer-encoding"))
        read_transfer_encoding(w, v, n);
      break;
    default:
      break;
  }
}

/* Status, header and trailer lines: all count against FS_WIRE_HEAD_MAX. */
static size_t feed_head(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  const char *line;
  size_t len, taken;
  int phase = w->phase;
  int got = line_take(w, t, data, n, FS_WIRE_HEAD_MAX - w->head_bytes,
                      "the reply's head is too large", &taken, &line, &len);
  if (got < 0)
    return taken;
  w->head_bytes += taken;
  if (got == 0 || !line_clean(w, line, &len))
    return taken;
  if (phase == WIRE_STATUS)
    read_status_line(w, t, line, len);
  else
    read_field(w, t, line, len, phase == WIRE_TRAILERS);
  return taken;
}

/* ---------------------------------------------------------------------
** The body
*/

/* Hex digits, then BWS and extensions (ignored), or nothing. */
FS_COLD static void read_chunk_size(fs_wire *w, const char *s, size_t len) {
  unsigned long long size = 0;
  size_t i;
  int d;
  for (i = 0; i < len && (d = hex_value(s[i])) >= 0; i++) {
    if (size > ULLONG_MAX >> 4) {
      wire_bad(w, "a chunk size of the reply is too large");
      return;
    }
    size = size << 4 | (unsigned)d;
  }
  if (i == 0) {
    wire_bad(w, "a chunk size of the reply is not hexadecimal");
    return;
  }
  while (i < len && is_ows(s[i]))
    i++;
  if (i < len && s[i] != ';') {
    wire_bad(w, "a chunk size of the reply is not hexadecimal");
    return;
  }
  w->remaining = size;
  w->phase = size == 0 ? WIRE_TRAILERS : WIRE_CHUNK_DATA;
}

FS_COLD static size_t feed_chunk_size(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  const char *line;
  size_t len, taken;
  int got = line_take(w, t, data, n, FS_WIRE_CHUNK_LINE_MAX - w->line_len,
                      "a chunk-size line of the reply is too long", &taken, &line, &len);
  if (got == 1 && line_clean(w, line, &len))
    read_chunk_size(w, line, len);
  return taken;
}

/* Body bytes to the transfer; a refusal (max_body, memory) is a bad reply. */
static size_t feed_body(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  size_t take = n;
  if (w->phase != WIRE_UNTIL_CLOSE && w->remaining < take)
    take = (size_t)w->remaining;
  if (fs_transfer_add_body(t, data, take) != take) {
    wire_bad(w, t->too_large ? "the reply is larger than max_body"
                             : "out of memory while reading the reply");
    return take;
  }
  if (w->phase == WIRE_UNTIL_CLOSE)
    return take;
  w->remaining -= take;
  if (w->remaining == 0)
    w->phase = w->phase == WIRE_LENGTH ? WIRE_DONE : WIRE_CHUNK_CR;
  return take;
}

/* The CRLF (or bare LF) that must follow each chunk's data. */
FS_COLD static size_t feed_chunk_end(fs_wire *w, char c) {
  if (w->phase == WIRE_CHUNK_CR && c == '\r')
    w->phase = WIRE_CHUNK_LF;
  else if (c == '\n')
    w->phase = WIRE_CHUNK_SIZE;
  else
    wire_bad(w, "a chunk of the reply does not end with CRLF");
  return 1;
}

/* ---------------------------------------------------------------------
** Feeding
*/

/* One step on data: returns the bytes it used (at least one). */
static size_t wire_step(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  switch (w->phase) {
    case WIRE_STATUS:
    case WIRE_HEADERS:
    case WIRE_TRAILERS:
      return feed_head(w, t, data, n);
    case WIRE_CHUNK_SIZE:
      return feed_chunk_size(w, t, data, n);
    case WIRE_CHUNK_CR:
    case WIRE_CHUNK_LF:
      return feed_chunk_end(w, data[0]);
    default:  /* WIRE_LENGTH, WIRE_UNTIL_CLOSE, WIRE_CHUNK_DATA */
      return feed_body(w, t, data, n);
  }
}

/* ---------------------------------------------------------------------
** The common reply in one pass
*/

/*
** A feed that starts a reply and holds its whole head, read in one pass:
** CRLF line ends, HTTP/1.1 with a 2xx status other than 204, a
** Content-Length of digits, no Transfer-Encoding, Connection naming one
** token, no folded line. The same fields, status, length and connection
** state as the general way (the lines above) would make of it; the bytes of
** the head taken. For anything else, or a head past FS_WIRE_HEAD_MAX, 0:
** nothing of w set, and of t only what the general way sets again from
** the status line on (the status, Date, Retry-After), which then reads it.
*/
static size_t wire_fast(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  const char *end = data + n, *s = data, *lf;
  unsigned long long length = 0;
  int has_length = 0, keep_alive = 0, close = 0;
  long status;
  size_t len;
  lf = (const char *)memchr(s, '\n', n);
  if (lf == NULL || lf - s < 13 || (size_t)(lf + 1 - s) > FS_WIRE_HEAD_MAX || lf[-1] != '\r'
      || memcmp(s, "HTTP/1.1 2", 10) != 0
      || !is_digit(s[10]) || !is_digit(s[11]) || (lf - s > 13 && s[12] != ' '))
    return 0;
  len = (size_t)(lf - 1 - s);
  status = 200 + (s[10] - '0') * 10 + (s[11] - '0');
  if (status == 204 || memchr(s, '\0', len) != NULL || memchr(s, '\r', len) != NULL)
    return 0;
  t->status = status;
  fs_transfer_new_response(t);
  for (;;) {
    const char *v;
    size_t name, k;
    s = lf + 1;
    lf = (const char *)memchr(s, '\n', (size_t)(end - s));
    if (lf == NULL || lf == s || lf[-1] != '\r' || (size_t)(lf + 1 - data) > FS_WIRE_HEAD_MAX)
      return 0;
    len = (size_t)(lf - 1 - s);
    if (len == 0)
      break;  /* the head's end */
    for (name = 0; tchar[(unsigned char)s[name]]; name++)
      ;  /* stops at the CR at the latest: not a tchar */
    if (name == 0 || name == len || s[name] != ':' || memchr(s, '\0', len) != NULL
        || memchr(s + name, '\r', len - name) != NULL)
      return 0;
    v = trim_ows(s + name + 1, len - name - 1, &k);
    switch (name) {
      case 4:
      case 11:
        fs_transfer_add_field(t, s, name, v, k);
        break;
      case 10:
        if (!NAME_IS(s, name, "connection"))
          break;
        if (k == 5 && equals_ci(v, k, "close"))
          close = 1;
        else if (k == 10 && equals_ci(v, k, "keep-alive"))
          keep_alive = 1;
        else
          return 0;
        break;
      case 14:
        if (NAME_IS(s, name, "content-length")) {
          unsigned long long x = 0;
          size_t i;
          for (i = 0; i < k && is_digit(v[i]) && x <= (ULLONG_MAX - 9) / 10; i++)
            x = x * 10 + (unsigned)(v[i] - '0');
          if (i == 0 || i < k || (has_length && x != length))
            return 0;
          has_length = 1;
          length = x;
        }
        break;
      case 17:
        if (NAME_IS(s, name, "transfer-encoding"))
          return 0;
        break;
      default:
        break;
    }
  }
  if (!has_length)
    return 0;
  w->status = status;
  w->head_bytes = (size_t)(lf + 1 - data);
  w->has_length = 1;
  w->length = w->remaining = length;
  w->keep_alive = keep_alive;
  w->close = close;
  w->phase = length == 0 ? WIRE_DONE : WIRE_LENGTH;
  return w->head_bytes;
}

/* The server closed the connection. */
FS_COLD static fs_wire_state wire_eof(fs_wire *w) {
  if (w->phase == WIRE_BAD)
    return FS_WIRE_BAD;
  w->close = 1;  /* whatever came, the connection is gone */
  if (w->phase == WIRE_UNTIL_CLOSE)
    w->phase = WIRE_DONE;
  if (w->phase != WIRE_DONE)
    wire_bad(w, w->started ? "the connection closed before the reply was complete"
                           : "the connection closed before any reply");
  return wire_state(w);
}

fs_wire_state fs_wire_feed(fs_wire *w, fs_transfer *t, const char *data, size_t n) {
  if (data == NULL)
    return wire_eof(w);
  if (n > 0 && w->phase != WIRE_BAD)
    w->started = 1;
  if (w->phase == WIRE_STATUS && w->head_bytes == 0 && w->line_len == 0 && n > 0) {
    size_t used = wire_fast(w, t, data, n);  /* 0: the general way reads it */
    data += used;
    n -= used;
  }
  while (n > 0 && w->phase != WIRE_DONE && w->phase != WIRE_BAD) {
    size_t used = wire_step(w, t, data, n);
    data += used;
    n -= used;
  }
  if (n > 0 && w->phase == WIRE_DONE)  /* the server said more than one reply */
    w->extra = 1;
  return wire_state(w);
}
