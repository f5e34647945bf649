/*
 * Response serialization: status line, checked header fields, chunk sizes
 * and the cached Date line.
 */
#include "uh.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int uh_buf_reserve(uh_buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

int uh_buf_append(uh_buf *b, const void *data, size_t len)
{
    if (!len)
        return 0; /* an empty buffer has no data pointer for memcpy() */
    if (uh_buf_reserve(b, len) < 0)
        return -1;
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

void uh_buf_free(uh_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

const char *uh_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 101:
        return "Switching Protocols";
    case 102:
        return "Processing";
    case 103:
        return "Early Hints";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 203:
        return "Non-Authoritative Information";
    case 204:
        return "No Content";
    case 205:
        return "Reset Content";
    case 206:
        return "Partial Content";
    case 207:
        return "Multi-Status";
    case 208:
        return "Already Reported";
    case 226:
        return "IM Used";
    case 300:
        return "Multiple Choices";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 303:
        return "See Other";
    case 304:
        return "Not Modified";
    case 305:
        return "Use Proxy";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 402:
        return "Payment Required";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 407:
        return "Proxy Authentication Required";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 411:
        return "Length Required";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Request Entity Too Large";
    case 414:
        return "Request-URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 416:
        return "Requested Range Not Satisfiable";
    case 417:
        return "Expectation Failed";
    case 418:
        return "I'm a Teapot";
    case 421:
        return "Misdirected Request";
    case 422:
        return "Unprocessable Entity";
    case 423:
        return "Locked";
    case 424:
        return "Failed Dependency";
    case 425:
        return "Too Early";
    case 426:
        return "Upgrade Required";
    case 428:
        return "Precondition Required";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 451:
        return "Unavailable For Legal Reasons";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    case 506:
        return "Variant Also Negotiates";
    case 507:
        return "Insufficient Storage";
    case 508:
        return "Loop Detected";
    case 510:
        return "Not Extended";
    case 511:
        return "Network Authentication Required";
    default:
        return "";
    }
}

/* tchar from RFC 9110 section 5.6.2 */
static int uh_is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

int uh_header_name_valid(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!uh_is_tchar((unsigned char)s[i]))
            return 0;
    return 1;
}

int uh_header_value_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\r' || c == '\n' || c == 0)
            return 0;
    }
    return 1;
}

int uh_put_status_line(uh_buf *b, int status)
{
    if (status < 100 || status > 999)
        return -1;
    const char *reason = uh_reason(status);
    size_t rlen = strlen(reason);
    if (uh_buf_reserve(b, 15 + rlen) < 0)
        return -1;
    char *d = b->data + b->len;
    memcpy(d, "HTTP/1.1 ", 9);
    d[9] = (char)('0' + status / 100);
    d[10] = (char)('0' + status / 10 % 10);
    d[11] = (char)('0' + status % 10);
    d[12] = ' ';
    memcpy(d + 13, reason, rlen);
    d[13 + rlen] = '\r';
    d[14 + rlen] = '\n';
    b->len += 15 + rlen;
    return 0;
}

int uh_put_header(uh_buf *b, const char *name, size_t nlen, const char *value, size_t vlen)
{
    if (!uh_header_name_valid(name, nlen) || !uh_header_value_valid(value, vlen))
        return -1;
    if (uh_buf_reserve(b, nlen + vlen + 4) < 0)
        return -1;
    char *d = b->data + b->len;
    memcpy(d, name, nlen);
    d[nlen] = ':';
    d[nlen + 1] = ' ';
    memcpy(d + nlen + 2, value, vlen);
    d[nlen + 2 + vlen] = '\r';
    d[nlen + 3 + vlen] = '\n';
    b->len += nlen + vlen + 4;
    return 0;
}

/* Digits of n in `base`, written backwards from `end`; returns the start. */
static char *uh_format_uint(char *end, uint64_t n, unsigned base)
{
    static const char digits[] = "0123456789abcdef";
    do {
        *--end = digits[n % base];
        n /= base;
    } while (n);
    return end;
}

int uh_put_content_length(uh_buf *b, uint64_t n)
{
    char tmp[48];
    char *end = tmp + sizeof tmp;
    *--end = '\n';
    *--end = '\r';
    char *start = uh_format_uint(end, n, 10);
    static const char name[] = "content-length: ";
    start -= sizeof name - 1;
    memcpy(start, name, sizeof name - 1);
    return uh_buf_append(b, start, (size_t)(tmp + sizeof tmp - start));
}

int uh_put_chunk_size(uh_buf *b, size_t n)
{
    char tmp[24];
    char *end = tmp + sizeof tmp;
    *--end = '\n';
    *--end = '\r';
    char *start = uh_format_uint(end, n, 16);
    return uh_buf_append(b, start, (size_t)(tmp + sizeof tmp - start));
}

const char *uh_date_line(uh_date_cache *c, time_t now, size_t *len)
{
    if (c->len == 0 || now != c->sec) {
        static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        struct tm tm;
        gmtime_r(&now, &tm);
        int k = snprintf(c->line, sizeof c->line, "date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", days[tm.tm_wday],
                         tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        c->len = (size_t)k;
        c->sec = now;
    }
    *len = c->len;
    return c->line;
}
