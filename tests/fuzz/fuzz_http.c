/* libFuzzer target for http/: any byte string, fed whole and then split at
 * a data-dependent point, must parse or fail cleanly; a response head built
 * from the same bytes must never contain a bare CR or LF in a field. */
#include <stdint.h>
#include <string.h>

#include "uh.h"

static int on_head(void *ud, uh_parser *p, const uh_request *req)
{
    (void)ud;
    volatile size_t sum = 0; /* touch every span: ASan checks they are inside the arena */
    for (uint32_t i = 0; i < req->nheaders; i++)
        sum += (unsigned char)uh_str(p, req->headers[i].name)[0] + req->headers[i].value.len;
    if (req->url.len)
        sum += (unsigned char)uh_str(p, req->url)[req->url.len - 1];
    return 0;
}

static int on_body(void *ud, const char *at, size_t len)
{
    (void)ud;
    volatile char c = len ? at[len - 1] : 0;
    (void)c;
    return 0;
}

static int on_complete(void *ud)
{
    int *n = ud;
    return ++*n % 3 == 0 ? UH_CB_PAUSE : 0;
}

static const uh_callbacks cbs = {on_head, on_body, on_complete};

static void parse(const uint8_t *data, size_t size, size_t split)
{
    int n = 0;
    uh_parser p;
    uh_limits limits = {512, 20, 256, 2048};
    uh_parser_init(&p, &limits, &cbs, &n);
    size_t off = 0;
    while (off < size) {
        size_t end = off < split && split < size ? split : size, used = 0;
        enum uh_feed_result r = uh_parser_feed(&p, (const char *)data + off, end - off, &used);
        off += used;
        if (r == UH_FEED_ERROR)
            break;
        if (r == UH_FEED_PAUSED)
            uh_parser_resume(&p);
    }
    uh_parser_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    parse(data, size, size);
    parse(data, size, size ? data[0] % (size + 1) : 0);
    uh_buf b = {0};
    size_t half = size / 2;
    if (uh_put_header(&b, (const char *)data, half, (const char *)data + half, size - half) == 0) {
        for (size_t i = 0; i + 2 < b.len; i++)
            if (b.data[i] == '\r' || b.data[i] == '\n')
                __builtin_trap();
    }
    uh_buf_free(&b);
    return 0;
}
