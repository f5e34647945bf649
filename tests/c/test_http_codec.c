/* Unit tests of http/: request parsing (split at every byte), limits,
 * request-smuggling rules, and response serialization. */
#include <string.h>

#include "uh.h"
#include "ue_test.h"

typedef struct {
    int heads, completes, pause_after;
    char method[16], url[256], names[512], values[512];
    char body[4096];
    size_t body_len;
    uint16_t flags;
    int64_t content_length;
    uint8_t minor;
} rec;

static int on_head(void *ud, uh_parser *p, const uh_request *req)
{
    rec *r = ud;
    r->heads++;
    snprintf(r->method, sizeof r->method, "%s", llhttp_method_name((llhttp_method_t)req->method));
    snprintf(r->url, sizeof r->url, "%.*s", (int)req->url.len, uh_str(p, req->url));
    r->names[0] = r->values[0] = 0;
    for (uint32_t i = 0; i < req->nheaders; i++) {
        strncat(r->names, uh_str(p, req->headers[i].name), req->headers[i].name.len);
        strcat(r->names, "|");
        strncat(r->values, uh_str(p, req->headers[i].value), req->headers[i].value.len);
        strcat(r->values, "|");
    }
    r->flags = req->flags;
    r->content_length = req->content_length;
    r->minor = req->http_minor;
    return 0;
}

static int on_body(void *ud, const char *at, size_t len)
{
    rec *r = ud;
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    return 0;
}

static int on_complete(void *ud)
{
    rec *r = ud;
    r->completes++;
    return r->pause_after ? UH_CB_PAUSE : 0;
}

static const uh_callbacks cbs = {on_head, on_body, on_complete};

/* Feeds `msg` in pieces of `step` bytes; returns the final result. */
static enum uh_feed_result feed_split(uh_parser *p, const char *msg, size_t step)
{
    size_t len = strlen(msg), off = 0;
    enum uh_feed_result res = UH_FEED_OK;
    while (off < len && res == UH_FEED_OK) {
        size_t n = len - off < step ? len - off : step, used = 0;
        res = uh_parser_feed(p, msg + off, n, &used);
        off += used;
    }
    return res;
}

static void test_parse_every_split(void)
{
    const char *msg = "POST /path/a?x=1 HTTP/1.1\r\nHost: example.com\r\nX-Mixed-Case: Value \r\n"
                      "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    for (size_t step = 1; step <= strlen(msg); step++) {
        rec r = {0};
        uh_parser p;
        uh_parser_init(&p, NULL, &cbs, &r);
        CHECK(feed_split(&p, msg, step) == UH_FEED_OK);
        CHECK(r.heads == 1 && r.completes == 1);
        CHECK(strcmp(r.method, "POST") == 0);
        CHECK(strcmp(r.url, "/path/a?x=1") == 0);
        CHECK(strcmp(r.names, "host|x-mixed-case|transfer-encoding|") == 0);
        CHECK(strncmp(r.values, "example.com|Value", 17) == 0);
        CHECK(r.body_len == 11 && memcmp(r.body, "hello world", 11) == 0);
        CHECK((r.flags & UH_REQ_CHUNKED) && (r.flags & UH_REQ_KEEP_ALIVE) && (r.flags & UH_REQ_HAS_BODY));
        uh_parser_free(&p);
    }
}

static void test_pipelined_pause_resume(void)
{
    const char *two = "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
    rec r = {0};
    r.pause_after = 1;
    uh_parser p;
    uh_parser_init(&p, NULL, &cbs, &r);
    size_t used = 0;
    CHECK(uh_parser_feed(&p, two, strlen(two), &used) == UH_FEED_PAUSED);
    CHECK(r.completes == 1 && strcmp(r.url, "/a") == 0);
    CHECK(used == strlen(two) / 2);
    uh_parser_resume(&p);
    size_t more = 0;
    CHECK(uh_parser_feed(&p, two + used, strlen(two) - used, &more) == UH_FEED_PAUSED);
    CHECK(r.completes == 2 && strcmp(r.url, "/b") == 0 && used + more == strlen(two));
    uh_parser_free(&p);
}

static int parse_status(const char *msg, const uh_limits *limits)
{
    rec r = {0};
    uh_parser p;
    uh_parser_init(&p, limits, &cbs, &r);
    size_t used;
    enum uh_feed_result res = uh_parser_feed(&p, msg, strlen(msg), &used);
    int status = res == UH_FEED_ERROR ? p.error_status : 0;
    uh_parser_free(&p);
    return status;
}

static void test_rejections(void)
{
    CHECK(parse_status("GET / HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 0);
    CHECK(parse_status("GET / HTTP/1.0\r\n\r\n", NULL) == 0); /* no Host needed in 1.0 */
    CHECK(parse_status("GET / HTTP/1.1\r\n\r\n", NULL) == 400);
    CHECK(parse_status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", NULL) ==
          400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1a\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", NULL) == 400);
    CHECK(parse_status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", NULL) == 400);
    CHECK(parse_status("GET / HTTP/1.1\r\nHost : x\r\n\r\n", NULL) == 400);
    /* target forms: CONNECT's authority-form and other schemes are refused */
    CHECK(parse_status("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", NULL) == 400);
    CHECK(parse_status("GET ftp://example.com/x HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 400);
    CHECK(parse_status("GET * HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 400);
    CHECK(parse_status("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 0);
    CHECK(parse_status("GET http://example.com/x?q HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 0);
    CHECK(parse_status("GET HTTPS://example.com HTTP/1.1\r\nHost: x\r\n\r\n", NULL) == 0);
    uh_limits small = {16, 3, 10, 200};
    CHECK(parse_status("GET /0123456789abcdefg HTTP/1.1\r\nHost: x\r\n\r\n", &small) == 414);
    CHECK(parse_status("GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", &small) == 431);
    CHECK(parse_status("GET / HTTP/1.1\r\nHost: 0123456789ab\r\n\r\n", &small) == 431);
}

static void test_expect_and_keepalive_flags(void)
{
    rec r = {0};
    uh_parser p;
    uh_parser_init(&p, NULL, &cbs, &r);
    const char *m = "PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n"
                    "Connection: close\r\n\r\nabc";
    size_t used;
    CHECK(uh_parser_feed(&p, m, strlen(m), &used) == UH_FEED_OK);
    CHECK((r.flags & UH_REQ_EXPECT_CONTINUE) && !(r.flags & UH_REQ_KEEP_ALIVE));
    CHECK(r.content_length == 3 && r.body_len == 3);
    uh_parser_free(&p);
}

static void test_response_pieces(void)
{
    uh_buf b = {0};
    CHECK(uh_put_status_line(&b, 200) == 0);
    CHECK(uh_put_status_line(&b, 599) == 0); /* unknown code: empty reason */
    CHECK(uh_put_status_line(&b, 42) < 0);
    CHECK(uh_put_header(&b, "content-type", 12, "text/plain", 10) == 0);
    CHECK(uh_put_header(&b, "bad name", 8, "v", 1) < 0);
    CHECK(uh_put_header(&b, "x", 1, "a\r\nb", 4) < 0);
    CHECK(uh_put_header(&b, "x", 1, "a\0b", 3) < 0);
    CHECK(uh_put_chunk_size(&b, 0x1a2b) == 0);
    CHECK(uh_put_chunk_size(&b, 0) == 0);
    CHECK(uh_put_content_length(&b, 0) == 0);
    CHECK(uh_put_content_length(&b, 18446744073709551615ULL) == 0);
    const char *want = "HTTP/1.1 200 OK\r\nHTTP/1.1 599 \r\ncontent-type: text/plain\r\n1a2b\r\n0\r\n"
                       "content-length: 0\r\ncontent-length: 18446744073709551615\r\n";
    CHECK(b.len == strlen(want) && memcmp(b.data, want, b.len) == 0);
    uh_buf_free(&b);
    CHECK(uh_status_allows_body(200) && !uh_status_allows_body(204) && !uh_status_allows_body(304) &&
          !uh_status_allows_body(101));
}

static void test_date_cache(void)
{
    uh_date_cache c = {0};
    size_t len;
    const char *line = uh_date_line(&c, 1795613039, &len); /* 2026-11-25 13:23:59 UTC */
    CHECK(len == strlen("date: Wed, 25 Nov 2026 13:23:59 GMT\r\n"));
    CHECK(memcmp(line, "date: Wed, 25 Nov 2026 13:23:59 GMT\r\n", len) == 0);
    const char *again = uh_date_line(&c, 1795613039, &len);
    CHECK(again == line);
}

static int head_upgrade(void *ud, uh_parser *p, const uh_request *req)
{
    (void)p;
    (void)req;
    ((rec *)ud)->heads++;
    return UH_CB_UPGRADE;
}

static void test_upgrade_stops_after_head(void)
{
    static const uh_callbacks up = {head_upgrade, on_body, on_complete};
    const char *m = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x85"
                    "frame";
    size_t head = strlen(m) - strlen("\x81\x85"
                                     "frame");
    rec r = {0};
    uh_parser p;
    uh_parser_init(&p, NULL, &up, &r);
    size_t used = 0;
    CHECK(uh_parser_feed(&p, m, strlen(m), &used) == UH_FEED_UPGRADE);
    CHECK(used == head && r.heads == 1);
    uh_parser_free(&p);
    /* the same request when the upgrade is not taken: answered as HTTP, the
     * next bytes parsed as the next request */
    rec r2 = {0};
    uh_parser_init(&p, NULL, &cbs, &r2);
    const char *two = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                      "GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
    CHECK(uh_parser_feed(&p, two, strlen(two), &used) == UH_FEED_OK);
    CHECK(r2.heads == 2 && strcmp(r2.url, "/b") == 0);
    uh_parser_free(&p);
}

int main(void)
{
    RUN(test_parse_every_split);
    RUN(test_pipelined_pause_resume);
    RUN(test_rejections);
    RUN(test_expect_and_keepalive_flags);
    RUN(test_response_pieces);
    RUN(test_date_cache);
    RUN(test_upgrade_stops_after_head);
    return TEST_EXIT();
}
