/*
 * echo_client: a closed-loop load generator for echo servers.
 * Each of CONNS connections sends MSGSIZE bytes, waits for all of them to come
 * back, and repeats, for SECONDS. Prints one JSON line: round trips, elapsed
 * time and latency percentiles.
 *
 *     echo_client HOST PORT CONNS MSGSIZE SECONDS [WS_PATH [deflate] | udp]
 *
 * With WS_PATH each connection first upgrades to a WebSocket at that path,
 * then each message is one binary frame of MSGSIZE bytes, masked as a
 * client must, and the round trip ends when the server's whole frame has
 * been read. With "deflate" the client offers permessage-deflate and sends
 * JSON-like text uncompressed (a client may), so the server inflates
 * nothing and compresses every reply; the reply's length comes from its
 * frame header.
 *
 * With "udp" each connection is a connected UDP socket that sends one
 * datagram of MSGSIZE bytes and waits for it to come back. A datagram the
 * server's receive buffer dropped is sent again after 200 ms; the JSON line
 * then counts it under "resent".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    char *frame; /* WebSocket mode: the reply read so far */
    size_t sent, received;
    double started;
    int done;
} conn_t;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Writes what the socket takes; asks for EPOLLOUT while some is left. */
static void pump_write(int ep, conn_t *c, const char *out, size_t msgsize)
{
    while (c->sent < msgsize) {
        ssize_t w = write(c->fd, out + c->sent, msgsize - c->sent);
        if (w < 0) {
            if (errno == EAGAIN)
                break;
            if (errno == EINTR)
                continue;
            perror("write");
            exit(1);
        }
        c->sent += (size_t)w;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->sent < msgsize ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Upgrades fd (still blocking) to a WebSocket; exits unless the answer is 101. */
static void ws_handshake(int fd, const char *path, int deflate)
{
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     path, deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "");
    if (write(fd, req, (size_t)n) != n) {
        perror("write");
        exit(1);
    }
    /* a byte at a time: nothing past the head may be consumed */
    char head[4096];
    size_t len = 0;
    while (len < sizeof head - 1 && (len < 4 || memcmp(head + len - 4, "\r\n\r\n", 4) != 0)) {
        if (read(fd, head + len, 1) != 1) {
            fprintf(stderr, "WebSocket handshake: connection closed\n");
            exit(1);
        }
        len++;
    }
    head[len] = 0;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "WebSocket handshake refused: %.60s\n", head);
        exit(1);
    }
}

/* Frame header length for a payload of n bytes; masked adds the 4-byte key. */
static size_t ws_header_len(size_t n, int masked)
{
    return (n < 126 ? 2 : n < 65536 ? 4 : 10) + (masked ? 4 : 0);
}

/* Whether buf holds a whole frame. */
static int ws_frame_complete(const unsigned char *buf, size_t len)
{
    if (len < 2)
        return 0;
    size_t n = buf[1] & 0x7F, h = 2;
    if (n == 126) {
        if (len < 4)
            return 0;
        n = (size_t)buf[2] << 8 | buf[3];
        h = 4;
    } else if (n == 127) {
        if (len < 10)
            return 0;
        n = 0;
        for (int i = 0; i < 8; i++)
            n = n << 8 | buf[2 + i];
        h = 10;
    }
    return len >= h + n;
}

/* Records like an API's JSON, for a payload that compresses as such does. */
static void fill_json(char *p, size_t n)
{
    char rec[128];
    for (size_t i = 0, k = 0; i < n; k++) {
        int len =
            snprintf(rec, sizeof rec, "{\"id\":%zu,\"name\":\"item-%zu\",\"price\":%zu.%02zu,\"tags\":[\"t%zu\"]},",
                     k * 7919 % 100000, k * 104729 % 10007, k * 31 % 997, k % 100, k % 13);
        size_t take = (size_t)len < n - i ? (size_t)len : n - i;
        memcpy(p + i, rec, take);
        i += take;
    }
}

/* A final frame of msgsize bytes (binary 'x', or text JSON) masked with the
 * all-zero key (valid, and the payload goes as it is). */
static char *ws_frame(size_t msgsize, int text, size_t *len)
{
    size_t h = ws_header_len(msgsize, 1);
    unsigned char *f = malloc(h + msgsize);
    f[0] = text ? 0x81 : 0x82;
    if (msgsize < 126) {
        f[1] = (unsigned char)(0x80 | msgsize);
    } else if (msgsize < 65536) {
        f[1] = 0x80 | 126;
        f[2] = (unsigned char)(msgsize >> 8);
        f[3] = (unsigned char)msgsize;
    } else {
        f[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            f[2 + i] = (unsigned char)((uint64_t)msgsize >> (56 - 8 * i));
    }
    memset(f + h - 4, 0, 4);
    if (text)
        fill_json((char *)f + h, msgsize);
    else
        memset(f + h, 'x', msgsize);
    *len = h + msgsize;
    return (char *)f;
}

static uint32_t *lat;
static size_t lat_len, lat_cap;

static void record(double seconds)
{
    if (lat_len == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat)
            abort();
    }
    lat[lat_len++] = (uint32_t)(seconds * 1e6);
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: echo_client HOST PORT CONNS MSGSIZE SECONDS [WS_PATH [deflate] | udp]\n");
        return 2;
    }
    int udp = argc == 7 && strcmp(argv[6], "udp") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    int nconns = atoi(argv[3]);
    size_t payload = (size_t)atol(argv[4]);
    double duration = atof(argv[5]);
    const char *ws_path = argc >= 7 && !udp ? argv[6] : NULL;
    int deflate = argc == 8 && strcmp(argv[7], "deflate") == 0;
    /* msgsize is what goes out, insize what comes back */
    size_t msgsize = payload, insize = payload;
    char *out;
    if (ws_path) {
        out = ws_frame(payload, deflate, &msgsize);
        insize = ws_header_len(payload, 0) + payload + 1024; /* room for a reply deflate grew */
    } else {
        out = malloc(msgsize);
        memset(out, 'x', msgsize);
    }
    char *in = malloc(insize);
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    int ep = epoll_create1(0);
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        int one = 1;
        if (!udp)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (ws_path) {
            ws_handshake(fd, ws_path, deflate);
            conns[i].frame = malloc(insize);
        }
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    /* Non-blocking both ways: a large message is written as the socket
     * takes it while the echo is read, so neither side can wedge the other. */
    for (int i = 0; i < nconns; i++)
        fcntl(conns[i].fd, F_SETFL, fcntl(conns[i].fd, F_GETFL) | O_NONBLOCK);
    double t0 = now(), deadline = t0 + duration;
    for (int i = 0; i < nconns; i++) {
        conns[i].started = now();
        pump_write(ep, &conns[i], out, msgsize);
    }
    uint64_t round_trips = 0, resent = 0;
    struct epoll_event events[256];
    int active = nconns;
    while (active > 0) {
        int n = epoll_wait(ep, events, 256, udp ? 50 : 1000);
        for (int i = 0; udp && i < nconns; i++) { /* dropped on the way: send again */
            conn_t *c = &conns[i];
            if (!c->done && now() - c->started > 0.2 && write(c->fd, out, msgsize) == (ssize_t)msgsize) {
                c->started = now();
                resent++;
            }
        }
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c->done)
                continue;
            if (events[e].events & EPOLLOUT)
                pump_write(ep, c, out, msgsize);
            if (!(events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            for (;;) {
                char *into = c->frame ? c->frame + c->received : in;
                ssize_t r = read(c->fd, into, insize - c->received);
                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                    break;
                if (r < 0 && udp && errno == ECONNREFUSED)
                    break; /* the server is not there yet or any more: resent on time */
                if (r <= 0) {
                    fprintf(stderr, "read: %s\n", r == 0 ? "connection closed" : strerror(errno));
                    return 1;
                }
                c->received += (size_t)r;
                if (udp && (size_t)r != insize) {
                    fprintf(stderr, "udp: a datagram of %zd bytes, not %zu\n", r, insize);
                    return 1;
                }
                if (c->frame ? !ws_frame_complete((unsigned char *)c->frame, c->received) : c->received < insize)
                    continue;
                double t = now();
                record(t - c->started);
                round_trips++;
                c->received = 0;
                c->sent = 0;
                if (t >= deadline) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    c->done = 1;
                    active--;
                    break;
                }
                c->started = t;
                pump_write(ep, c, out, msgsize);
                break;
            }
        }
    }
    double elapsed = now() - t0;
    qsort(lat, lat_len, sizeof *lat, cmp_u32);
    printf("{\"round_trips\": %llu, \"seconds\": %.4f, \"p50_us\": %u, \"p99_us\": %u, \"resent\": %llu}\n",
           (unsigned long long)round_trips, elapsed, lat_len ? lat[lat_len / 2] : 0,
           lat_len ? lat[(size_t)(lat_len * 0.99)] : 0, (unsigned long long)resent);
    for (int i = 0; i < nconns; i++)
        close(conns[i].fd);
    return 0;
}
