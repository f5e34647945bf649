/*
 * Request parsing on llhttp, with the limits and the request-smuggling rules
 * llhttp leaves to its user.
 */
#include "uh.h"

#include <stdlib.h>
#include <string.h>

static int uh_fail(uh_parser *p, int status, const char *reason)
{
    p->error_status = status;
    p->error_reason = reason;
    return -1;
}

static uh_parser *uh_of(llhttp_t *ll)
{
    return (uh_parser *)ll->data;
}

/* Appends to the arena; the bytes go to the span `s`, which must be the
 * last thing written (callbacks for one element come back to back). */
static int uh_arena_append(uh_parser *p, uh_span *s, const char *at, size_t len, int lower)
{
    if (p->arena_len + len > p->arena_cap) {
        size_t cap = p->arena_cap ? p->arena_cap : 512;
        while (cap < p->arena_len + len)
            cap *= 2;
        char *a = realloc(p->arena, cap);
        if (!a)
            return uh_fail(p, 500, "out of memory");
        p->arena = a;
        p->arena_cap = (uint32_t)cap;
    }
    char *dst = p->arena + p->arena_len;
    if (lower) {
        for (size_t i = 0; i < len; i++) {
            char c = at[i];
            dst[i] = (c >= 'A' && c <= 'Z') ? (char)(c | 0x20) : c;
        }
    } else {
        memcpy(dst, at, len);
    }
    if (s->len == 0)
        s->off = p->arena_len;
    s->len += (uint32_t)len;
    p->arena_len += (uint32_t)len;
    return 0;
}

static int uh_count_head(uh_parser *p, size_t len)
{
    p->head_bytes += (uint32_t)len;
    if (p->head_bytes > p->limits.max_head_size)
        return uh_fail(p, 431, "Request header fields too large");
    return 0;
}

static int uh_on_message_begin(llhttp_t *ll)
{
    uh_parser *p = uh_of(ll);
    p->arena_len = 0;
    p->nheaders = 0;
    p->head_bytes = 0;
    p->last = 0;
    p->in_head = 1;
    p->host_count = 0;
    p->upgraded = 0;
    memset(&p->req, 0, sizeof p->req);
    p->req.content_length = -1;
    return 0;
}

static int uh_on_url(llhttp_t *ll, const char *at, size_t len)
{
    uh_parser *p = uh_of(ll);
    if (p->req.url.len + len > p->limits.max_request_line)
        return uh_fail(p, 414, "Request-URI too long");
    if (uh_count_head(p, len) < 0)
        return -1;
    p->last = 1;
    return uh_arena_append(p, &p->req.url, at, len, 0);
}

static int uh_on_header_field(llhttp_t *ll, const char *at, size_t len)
{
    uh_parser *p = uh_of(ll);
    if (uh_count_head(p, len) < 0)
        return -1;
    if (p->last != 2) {
        if (p->nheaders == p->limits.max_headers)
            return uh_fail(p, 431, "Too many request header fields");
        if (p->nheaders == p->headers_cap) {
            uint32_t cap = p->headers_cap ? p->headers_cap * 2 : 16;
            uh_header *h = realloc(p->headers, cap * sizeof *h);
            if (!h)
                return uh_fail(p, 500, "out of memory");
            p->headers = h;
            p->headers_cap = cap;
        }
        memset(&p->headers[p->nheaders++], 0, sizeof(uh_header));
        p->last = 2;
    }
    uh_header *h = &p->headers[p->nheaders - 1];
    if (h->name.len + len > p->limits.max_field_size)
        return uh_fail(p, 431, "Request header field too large");
    /* llhttp 8 passes "Name : value" on with the space in the name unless
     * the name is one it knows; RFC 9112 section 5.1 requires a 400, as a
     * proxy in front may read that field differently (smuggling). */
    if (memchr(at, ' ', len) || memchr(at, '\t', len))
        return uh_fail(p, 400, "Whitespace in a header field name");
    return uh_arena_append(p, &h->name, at, len, 1);
}

static int uh_on_header_value(llhttp_t *ll, const char *at, size_t len)
{
    uh_parser *p = uh_of(ll);
    if (uh_count_head(p, len) < 0)
        return -1;
    uh_header *h = &p->headers[p->nheaders - 1];
    if (p->last != 3) {
        h->value.len = 0;
        h->value.off = p->arena_len;
        p->last = 3;
    }
    if (h->value.len + len > p->limits.max_field_size)
        return uh_fail(p, 431, "Request header field too large");
    return uh_arena_append(p, &h->value, at, len, 0);
}

static int uh_name_is(const uh_parser *p, const uh_header *h, const char *name, uint32_t n)
{
    return h->name.len == n && memcmp(p->arena + h->name.off, name, n) == 0;
}

/* Case-insensitive search for a token in a comma-separated value. */
static int uh_value_has(const char *v, uint32_t n, const char *tok, uint32_t tn)
{
    for (uint32_t i = 0; i + tn <= n; i++) {
        if (strncasecmp(v + i, tok, tn) != 0)
            continue;
        int left_ok = i == 0 || v[i - 1] == ',' || v[i - 1] == ' ' || v[i - 1] == '\t';
        int right_ok = i + tn == n || v[i + tn] == ',' || v[i + tn] == ' ' || v[i + tn] == '\t';
        if (left_ok && right_ok)
            return 1;
    }
    return 0;
}

/* The target forms an ASGI scope can carry: origin-form ("/p?q"),
 * absolute-form with an http(s) scheme, and "*" for OPTIONS. llhttp also
 * takes CONNECT's authority-form ("host:443"), which would reach the app as
 * a path without its leading slash; nothing in ASGI can tunnel it. */
static int uh_target_ok(const char *u, size_t n, int method)
{
    if (n && u[0] == '/')
        return 1;
    if (n == 1 && u[0] == '*')
        return method == HTTP_OPTIONS;
    return (n > 7 && strncasecmp(u, "http://", 7) == 0) || (n > 8 && strncasecmp(u, "https://", 8) == 0);
}

/* What llhttp checks (CL with TE, duplicate or invalid CL, a TE that does
 * not end in chunked) is checked here again, so that a lenient flag turned
 * on later cannot reopen request smuggling. */
static int uh_check_framing(uh_parser *p)
{
    llhttp_t *ll = &p->ll;
    int has_te = (ll->flags & F_TRANSFER_ENCODING) != 0;
    int has_cl = (ll->flags & F_CONTENT_LENGTH) != 0;
    if (has_te && has_cl)
        return uh_fail(p, 400, "Content-Length with Transfer-Encoding");
    if (has_te && !(ll->flags & F_CHUNKED))
        return uh_fail(p, 400, "Transfer-Encoding must end in chunked");
    if (has_te && ll->http_major == 1 && ll->http_minor == 0)
        return uh_fail(p, 400, "Transfer-Encoding in an HTTP/1.0 request");
    if (ll->http_major != 1)
        return uh_fail(p, 505, "HTTP version not supported");
    if (ll->http_minor >= 1 && p->host_count != 1)
        return uh_fail(p, 400, p->host_count ? "More than one Host header" : "Missing Host header");
    if (p->host_count > 1)
        return uh_fail(p, 400, "More than one Host header");
    return 0;
}

static int uh_on_headers_complete(llhttp_t *ll)
{
    uh_parser *p = uh_of(ll);
    p->in_head = 0;
    uh_request *r = &p->req;
    for (uint32_t i = 0; i < p->nheaders; i++) {
        const uh_header *h = &p->headers[i];
        if (uh_name_is(p, h, "host", 4))
            p->host_count++;
        else if (uh_name_is(p, h, "expect", 6) && ll->http_minor >= 1 &&
                 uh_value_has(p->arena + h->value.off, h->value.len, "100-continue", 12))
            r->flags |= UH_REQ_EXPECT_CONTINUE;
    }
    if (uh_check_framing(p) < 0)
        return -1;
    if (!uh_target_ok(uh_str(p, r->url), r->url.len, ll->method))
        return uh_fail(p, 400, "Invalid request target");
    r->method = ll->method;
    r->http_minor = ll->http_minor;
    r->headers = p->headers;
    r->nheaders = p->nheaders;
    if (ll->flags & F_CONTENT_LENGTH)
        r->content_length = (int64_t)ll->content_length;
    if (ll->flags & F_CHUNKED)
        r->flags |= UH_REQ_CHUNKED | UH_REQ_HAS_BODY;
    else if (r->content_length > 0)
        r->flags |= UH_REQ_HAS_BODY;
    if (llhttp_should_keep_alive(ll))
        r->flags |= UH_REQ_KEEP_ALIVE;
    if (ll->upgrade)
        r->flags |= UH_REQ_UPGRADE;
    if (!(r->flags & UH_REQ_HAS_BODY))
        r->flags &= (uint16_t)~UH_REQ_EXPECT_CONTINUE;
    int rc = p->cb->on_head(p->ud, p, r);
    if (rc < 0)
        return p->error_status ? -1 : uh_fail(p, 500, "request setup failed");
    p->upgraded = rc == UH_CB_UPGRADE && (r->flags & UH_REQ_UPGRADE);
    return 0;
}

static int uh_on_body(llhttp_t *ll, const char *at, size_t len)
{
    uh_parser *p = uh_of(ll);
    if (p->cb->on_body(p->ud, at, len) < 0)
        return p->error_status ? -1 : uh_fail(p, 500, "request body failed");
    return 0;
}

static int uh_on_message_complete(llhttp_t *ll)
{
    uh_parser *p = uh_of(ll);
    int rc = p->cb->on_complete(p->ud);
    if (rc < 0)
        return p->error_status ? -1 : uh_fail(p, 500, "request completion failed");
    return rc == UH_CB_PAUSE ? HPE_PAUSED : 0;
}

static const llhttp_settings_t uh_settings = {
    .on_message_begin = uh_on_message_begin,
    .on_url = uh_on_url,
    .on_header_field = uh_on_header_field,
    .on_header_value = uh_on_header_value,
    .on_headers_complete = uh_on_headers_complete,
    .on_body = uh_on_body,
    .on_message_complete = uh_on_message_complete,
};

int uh_parser_init(uh_parser *p, const uh_limits *limits, const uh_callbacks *cb, void *ud)
{
    memset(p, 0, sizeof *p);
    llhttp_init(&p->ll, HTTP_REQUEST, &uh_settings);
    p->ll.data = p;
    p->cb = cb;
    p->ud = ud;
    if (limits) {
        p->limits = *limits;
    } else {
        const uh_limits d = UH_DEFAULT_LIMITS;
        p->limits = d;
    }
    return 0;
}

void uh_parser_free(uh_parser *p)
{
    free(p->arena);
    free(p->headers);
    p->arena = NULL;
    p->headers = NULL;
    p->arena_cap = p->headers_cap = 0;
}

static const char *uh_error_text(llhttp_errno_t e)
{
    switch (e) {
    case HPE_INVALID_METHOD:
        return "Invalid method";
    case HPE_INVALID_URL:
        return "Invalid request target";
    case HPE_INVALID_VERSION:
        return "Invalid HTTP version";
    case HPE_INVALID_HEADER_TOKEN:
        return "Invalid header";
    case HPE_INVALID_CONTENT_LENGTH:
    case HPE_UNEXPECTED_CONTENT_LENGTH:
        return "Invalid Content-Length";
    case HPE_INVALID_CHUNK_SIZE:
        return "Invalid chunk size";
    case HPE_INVALID_TRANSFER_ENCODING:
        return "Invalid Transfer-Encoding";
    default:
        return "Invalid HTTP request";
    }
}

enum uh_feed_result uh_parser_feed(uh_parser *p, const char *data, size_t len, size_t *consumed)
{
    llhttp_errno_t e = llhttp_execute(&p->ll, data, len);
    if (e == HPE_OK) {
        *consumed = len;
        return UH_FEED_OK;
    }
    const char *pos = llhttp_get_error_pos(&p->ll);
    *consumed = pos && pos >= data && pos <= data + len ? (size_t)(pos - data) : len;
    if (e == HPE_PAUSED)
        return UH_FEED_PAUSED;
    if (e == HPE_PAUSED_UPGRADE && p->upgraded)
        return UH_FEED_UPGRADE;
    if (e == HPE_PAUSED_UPGRADE) {
        /* Upgrade not taken: the request is answered as plain HTTP and the
         * bytes after it are parsed as the next request. */
        llhttp_resume_after_upgrade(&p->ll);
        size_t more = 0;
        enum uh_feed_result r = uh_parser_feed(p, data + *consumed, len - *consumed, &more);
        *consumed += more;
        return r;
    }
    if (!p->error_status) {
        p->error_status = 400;
        p->error_reason = uh_error_text(e);
    }
    return UH_FEED_ERROR;
}

void uh_parser_resume(uh_parser *p)
{
    llhttp_resume(&p->ll);
}
