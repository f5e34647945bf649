/*
 * The floor for bench/http_bench.py: a minimal HTTP/1.1 responder in C on
 * io_uring (multishot accept, one recv in flight per connection, one send
 * per batch of requests), answering every request head with a fixed
 * 13-byte response. No parsing beyond finding "\r\n\r\n", no Python. The
 * server CPU per request it needs is what the kernel's TCP stack and
 * io_uring cost on this machine; `http_bench.py --servers c-responder`
 * runs it like the other servers.
 *
 *   cc -O2 -o build/c_responder bench/c_responder.c -luring && build/c_responder 8000
 */
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 4096
#define BUF 16384

static const char RESP[] = "HTTP/1.1 200 OK\r\ncontent-length: 13\r\ncontent-type: text/plain\r\n\r\nHello, world!";

struct conn {
    int fd;
    char in[BUF];
    size_t have;
    char out[BUF];
};

static struct conn *conns[MAXC];

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };
#define UD(op, fd) (((uint64_t)(op) << 32) | (uint32_t)(fd))

static void arm_recv(struct io_uring *ring, struct conn *c)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_recv(sqe, c->fd, c->in + c->have, BUF - c->have, 0);
    io_uring_sqe_set_data64(sqe, UD(OP_RECV, c->fd));
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 8000;
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1024) < 0) {
        perror("bind/listen");
        return 1;
    }
    struct io_uring ring;
    struct io_uring_params p = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
        p.flags = 0;
        io_uring_queue_init_params(4096, &ring, &p);
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, 0);
    io_uring_sqe_set_data64(sqe, UD(OP_ACCEPT, lfd));
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe)
        {
            seen++;
            uint64_t ud = cqe->user_data;
            int op = (int)(ud >> 32), fd = (int)(uint32_t)ud;
            if (op == OP_ACCEPT && cqe->res >= 0 && cqe->res < MAXC) {
                struct conn *c = calloc(1, sizeof *c);
                c->fd = cqe->res;
                setsockopt(c->fd, IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof one);
                conns[c->fd] = c;
                arm_recv(&ring, c);
            } else if (op == OP_RECV) {
                struct conn *c = conns[fd];
                if (cqe->res <= 0) {
                    close(fd);
                    free(c);
                    conns[fd] = NULL;
                    continue;
                }
                c->have += (size_t)cqe->res;
                size_t n = 0, start = 0;
                char *e;
                while ((e = memmem(c->in + start, c->have - start, "\r\n\r\n", 4))) {
                    start = (size_t)(e - c->in) + 4;
                    n++;
                }
                memmove(c->in, c->in + start, c->have - start);
                c->have -= start;
                size_t len = 0;
                for (size_t i = 0; i < n && len + sizeof RESP < BUF; i++) {
                    memcpy(c->out + len, RESP, sizeof RESP - 1);
                    len += sizeof RESP - 1;
                }
                if (len) {
                    sqe = io_uring_get_sqe(&ring);
                    io_uring_prep_send(sqe, fd, c->out, len, MSG_NOSIGNAL);
                    io_uring_sqe_set_data64(sqe, UD(OP_SEND, fd));
                } else {
                    arm_recv(&ring, c);
                }
            } else if (op == OP_SEND && conns[fd]) {
                arm_recv(&ring, conns[fd]); /* closed loop: the next request after the answer */
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}
