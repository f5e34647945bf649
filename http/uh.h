/*
 * uh: the HTTP/1.1 codec. Plain C, no Python.h, no I/O: bytes in, events out;
 * response pieces written into a growable buffer. Fuzzed by tests/fuzz.
 *
 * Requests are parsed by llhttp. The request line and header block are copied
 * into a small per-parser arena (header names lowercased on the way), so the
 * caller may hand over bytes from a buffer it recycles right after
 * uh_parser_feed() returns; body bytes are passed through without a copy.
 * Spans are offsets into the arena: it may move as it grows.
 */
#ifndef UH_H
#define UH_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <llhttp.h>

typedef struct uh_span {
    uint32_t off, len;
} uh_span;

typedef struct uh_header {
    uh_span name, value; /* name lowercased */
} uh_header;

typedef struct uh_limits {
    uint32_t max_request_line; /* bytes of the request target: 414 above */
    uint32_t max_headers;      /* header fields: 431 above */
    uint32_t max_field_size;   /* one name or value: 431 above */
    uint32_t max_head_size;    /* the whole request line and header block: 431 */
} uh_limits;

#define UH_DEFAULT_LIMITS                                                                                              \
    {                                                                                                                  \
        8190, 100, 8190, 65536                                                                                         \
    }

enum {
    UH_REQ_KEEP_ALIVE = 1 << 0,
    UH_REQ_CHUNKED = 1 << 1,
    UH_REQ_EXPECT_CONTINUE = 1 << 2,
    UH_REQ_UPGRADE = 1 << 3,
    UH_REQ_HAS_BODY = 1 << 4, /* Content-Length > 0 or chunked */
};

typedef struct uh_request {
    uint8_t method; /* llhttp_method_t */
    uint8_t http_minor;
    uint16_t flags;         /* UH_REQ_* */
    int64_t content_length; /* -1 when absent */
    uh_span url;
    const uh_header *headers; /* in the arena's order, duplicates kept */
    uint32_t nheaders;
} uh_request;

typedef struct uh_parser uh_parser;

/* Return values of the callbacks: 0 to go on, UH_CB_PAUSE (on_complete only)
 * to stop after this message, UH_CB_ERROR to fail the connection with the
 * status the callback stored in p->error_status (500 when it stored none). */
#define UH_CB_PAUSE 1
#define UH_CB_ERROR (-1)
/* on_head only: the request upgrades the connection (a WebSocket); the
 * feed stops after its head with UH_FEED_UPGRADE. */
#define UH_CB_UPGRADE 2

typedef struct uh_callbacks {
    int (*on_head)(void *ud, uh_parser *p, const uh_request *req);
    int (*on_body)(void *ud, const char *at, size_t len);
    int (*on_complete)(void *ud);
} uh_callbacks;

struct uh_parser {
    llhttp_t ll;
    const uh_callbacks *cb;
    void *ud;
    uh_limits limits;
    char *arena;
    uint32_t arena_len, arena_cap;
    uh_header *headers;
    uint32_t nheaders, headers_cap;
    uint32_t head_bytes;
    uint8_t last; /* 0 nothing, 1 url, 2 header field, 3 header value */
    uint8_t in_head;
    uint8_t host_count;
    uint8_t upgraded; /* on_head took the upgrade */
    uh_request req;
    int error_status;         /* HTTP status to answer an error with */
    const char *error_reason; /* static text */
};

enum uh_feed_result { UH_FEED_OK = 0, UH_FEED_PAUSED = 1, UH_FEED_ERROR = 2, UH_FEED_UPGRADE = 3 };

int uh_parser_init(uh_parser *p, const uh_limits *limits, const uh_callbacks *cb, void *ud);
void uh_parser_free(uh_parser *p);
/* Parses `len` bytes. *consumed says how many were used: all of them unless
 * the result is UH_FEED_PAUSED (feed the rest after uh_parser_resume()),
 * UH_FEED_UPGRADE (the rest belongs to the upgraded protocol) or
 * UH_FEED_ERROR (p->error_status and p->error_reason say why). */
enum uh_feed_result uh_parser_feed(uh_parser *p, const char *data, size_t len, size_t *consumed);
void uh_parser_resume(uh_parser *p);
/* True between the first byte of a request and the end of its header block. */
static inline int uh_parser_in_head(const uh_parser *p)
{
    return p->in_head;
}
static inline const char *uh_str(const uh_parser *p, uh_span s)
{
    return p->arena + s.off;
}

/* ---- responses ---- */

typedef struct uh_buf {
    char *data;
    size_t len, cap;
} uh_buf;

int uh_buf_reserve(uh_buf *b, size_t extra);
int uh_buf_append(uh_buf *b, const void *data, size_t len);
void uh_buf_free(uh_buf *b);

const char *uh_reason(int status); /* "" for an unknown code */
/* No body after HEAD (the caller checks), 1xx, 204 and 304. */
static inline int uh_status_allows_body(int status)
{
    return status >= 200 && status != 204 && status != 304;
}
int uh_header_name_valid(const char *s, size_t n);  /* an RFC 9110 token */
int uh_header_value_valid(const char *s, size_t n); /* no CR, LF or NUL */

/* "HTTP/1.1 200 OK\r\n". -1 for a status outside 100..999. */
int uh_put_status_line(uh_buf *b, int status);
/* "name: value\r\n" after validating both; -1 when invalid (nothing written). */
int uh_put_header(uh_buf *b, const char *name, size_t nlen, const char *value, size_t vlen);
/* "content-length: N\r\n" */
int uh_put_content_length(uh_buf *b, uint64_t n);
/* The size line of a chunk: "1a2b\r\n". */
int uh_put_chunk_size(uh_buf *b, size_t n);

/* "date: Wed, 25 Nov 2026 14:53:59 GMT\r\n", formatted at most once a second. */
typedef struct uh_date_cache {
    time_t sec;
    size_t len;
    char line[64];
} uh_date_cache;
const char *uh_date_line(uh_date_cache *c, time_t now, size_t *len);

#endif
