/* Provided-buffer rings with multishot recv, and multishot accept. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#include "ue.h"
#include "ue_test.h"

typedef struct {
    ue_op op;
    ue_bufring *pool;
    char data[4096];
    size_t len;
    int cqes, finals, enobufs;
    int32_t last_res;
    int hold; /* do not recycle buffers (to exhaust the pool) */
    uint16_t held[64];
    int nheld;
} recv_probe;

static void start_loop(ue_loop *l)
{
    REQUIRE(ue_loop_init(l, 64, 256) == 0);
    REQUIRE(ue_loop_start(l) == 0);
}

static void recv_cb(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    (void)l;
    recv_probe *p = (recv_probe *)op;
    p->cqes++;
    p->last_res = res;
    if (!(flags & IORING_CQE_F_MORE))
        p->finals++;
    if (res == -ENOBUFS)
        p->enobufs++;
    if (res > 0) {
        CHECK(flags & IORING_CQE_F_BUFFER);
        uint16_t bid = ue_cqe_bid(flags);
        CHECK(bid < p->pool->nbufs);
        CHECK((unsigned)res <= p->pool->buf_size);
        memcpy(p->data + p->len, ue_bufring_buf(p->pool, bid), (size_t)res);
        p->len += (size_t)res;
        if (p->hold)
            p->held[p->nheld++] = bid;
        else
            ue_bufring_recycle(p->pool, bid);
    }
}

static void pump(ue_loop *l, int *counter, int target)
{
    double deadline = ue_now() + 2.0;
    while (*counter < target && ue_now() < deadline) {
        ue_wait(l, 0.05);
        ue_dispatch(l);
    }
}

static void arm_recv(ue_loop *l, recv_probe *p, int fd)
{
    struct io_uring_sqe *sqe = ue_sqe(l);
    REQUIRE(sqe);
    ue_prep_recv_multishot(sqe, fd, p->pool);
    ue_op_arm(l, &p->op, sqe, recv_cb);
}

static void test_multishot_recv_streams_through_small_buffers(void)
{
    ue_loop l;
    start_loop(&l);
    if (!ue_probe_op(&l, IORING_OP_PROVIDE_BUFFERS)) {
        ue_loop_close(&l);
        return;
    }
    ue_bufring pool;
    REQUIRE(ue_bufring_init(&l, &pool, 1, 8, 16) == 0);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    recv_probe p;
    memset(&p, 0, sizeof p);
    p.pool = &pool;
    arm_recv(&l, &p, sv[0]);
    /* 1000 bytes through 16-byte buffers, recycled as they are consumed */
    char msg[1000];
    for (int i = 0; i < 1000; i++)
        msg[i] = (char)('a' + i % 26);
    REQUIRE(write(sv[1], msg, sizeof msg) == (ssize_t)sizeof msg);
    double deadline = ue_now() + 2.0;
    while (p.len < sizeof msg && ue_now() < deadline) {
        ue_wait(&l, 0.05);
        ue_dispatch(&l);
        if (!ue_op_busy(&p.op) && p.len < sizeof msg)
            arm_recv(&l, &p, sv[0]); /* ended by -ENOBUFS: re-arm */
    }
    CHECK(p.len == sizeof msg && memcmp(p.data, msg, sizeof msg) == 0);
    /* EOF ends the multishot op with res 0 and no F_MORE */
    close(sv[1]);
    int finals = p.finals;
    if (!ue_op_busy(&p.op))
        arm_recv(&l, &p, sv[0]);
    pump(&l, &p.finals, finals + 1);
    CHECK(p.last_res == 0 && !ue_op_busy(&p.op));
    close(sv[0]);
    ue_bufring_free(&l, &pool);
    ue_loop_close(&l);
}

static void test_empty_pool_ends_multishot_with_enobufs(void)
{
    ue_loop l;
    start_loop(&l);
    ue_bufring pool;
    REQUIRE(ue_bufring_init(&l, &pool, 2, 2, 8) == 0);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    recv_probe p;
    memset(&p, 0, sizeof p);
    p.pool = &pool;
    p.hold = 1;
    arm_recv(&l, &p, sv[0]);
    REQUIRE(write(sv[1], "0123456789abcdefXYZ", 19) == 19);
    pump(&l, &p.finals, 1);
    CHECK(p.len == 16);    /* both buffers filled */
    CHECK(p.enobufs == 1); /* then the pool ran dry */
    CHECK(!ue_op_busy(&p.op));
    /* recycle and re-arm: the rest of the data is still in the socket */
    for (int i = 0; i < p.nheld; i++)
        ue_bufring_recycle(&pool, p.held[i]);
    p.hold = 0;
    arm_recv(&l, &p, sv[0]);
    double deadline = ue_now() + 2.0;
    while (p.len < 19 && ue_now() < deadline) {
        ue_wait(&l, 0.05);
        ue_dispatch(&l);
    }
    CHECK(p.len == 19 && memcmp(p.data, "0123456789abcdefXYZ", 19) == 0);
    ue_op_cancel(&l, &p.op);
    pump(&l, &p.finals, 2);
    close(sv[0]);
    close(sv[1]);
    ue_bufring_free(&l, &pool);
    ue_loop_close(&l);
}

/* Only a window of the pool is posted, and recycled buffers go back newest
 * first: one connection at a time keeps writing into the same few buffers
 * rather than cycling through all of them. A burst on more connections than
 * the window takes ends some receives with -ENOBUFS; starved() and refill()
 * widen the window, and nothing is lost. */
static void test_window_reuses_buffers_and_grows(void)
{
    ue_loop l;
    start_loop(&l);
    ue_bufring pool;
    REQUIRE(ue_bufring_init(&l, &pool, 3, 64, 64) == 0);
    CHECK(pool.window == 4);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    static recv_probe p;
    memset(&p, 0, sizeof p);
    p.pool = &pool;
    arm_recv(&l, &p, sv[0]);
    for (int i = 0; i < 40; i++) {
        REQUIRE(write(sv[1], "m", 1) == 1);
        int cqes = p.cqes;
        ue_bufring_refill(&pool);
        pump(&l, &p.cqes, cqes + 1);
    }
    int distinct = 0; /* buffers written to: the pool was mapped zeroed */
    for (unsigned b = 0; b < pool.nbufs; b++)
        distinct += ue_bufring_buf(&pool, (uint16_t)b)[0] == 'm';
    CHECK(p.len == 40);
    CHECK(distinct <= 4); /* all 64 buffers would be used in turn without the window */
    ue_op_cancel(&l, &p.op);
    pump(&l, &p.finals, 1);
    close(sv[0]);
    close(sv[1]);

    enum { N = 40 };
    static recv_probe probes[N];
    int pairs[N][2];
    for (int i = 0; i < N; i++) {
        REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, pairs[i]) == 0);
        memset(&probes[i], 0, sizeof probes[i]);
        probes[i].pool = &pool;
        arm_recv(&l, &probes[i], pairs[i][0]);
    }
    CHECK(ue_wait(&l, 0) == 0); /* every recv armed before the burst */
    for (int i = 0; i < N; i++)
        REQUIRE(write(pairs[i][1], "0123456789", 10) == 10);
    int done = 0;
    double deadline = ue_now() + 2.0;
    while (done < N && ue_now() < deadline) {
        ue_bufring_refill(&pool);
        ue_wait(&l, 0.05);
        ue_dispatch(&l);
        done = 0;
        for (int i = 0; i < N; i++) {
            if (probes[i].len == 10)
                done++;
            else if (!ue_op_busy(&probes[i].op)) {
                ue_bufring_starved(&pool);
                arm_recv(&l, &probes[i], pairs[i][0]);
            }
        }
    }
    CHECK(done == N);
    for (int i = 0; i < N; i++)
        CHECK(probes[i].len == 10 && memcmp(probes[i].data, "0123456789", 10) == 0);
    ue_bufring_refill(&pool);
    CHECK(pool.window >= 32); /* wide enough for the burst now */
    for (int i = 0; i < N; i++) {
        ue_op_cancel(&l, &probes[i].op);
        close(pairs[i][0]);
        close(pairs[i][1]);
    }
    double end = ue_now() + 2.0;
    while (l.inflight && ue_now() < end) {
        ue_wait(&l, 0.05);
        ue_dispatch(&l);
    }
    ue_bufring_free(&l, &pool);
    ue_loop_close(&l);
}

static int fcntl_nonblock_check(int fd)
{
    return (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
}

typedef struct {
    ue_op op;
    int fds[16];
    int n, finals;
} accept_probe;

static void accept_cb(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    (void)l;
    accept_probe *p = (accept_probe *)op;
    if (res >= 0)
        p->fds[p->n++] = res;
    if (!(flags & IORING_CQE_F_MORE))
        p->finals++;
}

/* A loopback listener (its address in *a) with a multishot accept armed
 * on it; returns the listening socket. */
static int listen_and_accept(ue_loop *l, accept_probe *p, struct sockaddr_in *a)
{
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof *a;
    REQUIRE(bind(ls, (struct sockaddr *)a, sizeof *a) == 0 && listen(ls, 16) == 0);
    getsockname(ls, (struct sockaddr *)a, &alen);
    memset(p, 0, sizeof *p);
    struct io_uring_sqe *sqe = ue_sqe(l);
    ue_prep_accept_multishot(sqe, ls);
    ue_op_arm(l, &p->op, sqe, accept_cb);
    return ls;
}

static void test_multishot_accept(void)
{
    ue_loop l;
    start_loop(&l);
    struct sockaddr_in a;
    accept_probe p;
    int ls = listen_and_accept(&l, &p, &a);
    int clients[5];
    for (int i = 0; i < 5; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM, 0);
        REQUIRE(connect(clients[i], (struct sockaddr *)&a, sizeof a) == 0);
    }
    pump(&l, &p.n, 5);
    CHECK(p.n == 5 && p.finals == 0); /* one op, five connections, still armed */
    for (int i = 0; i < p.n; i++) {
        CHECK(fcntl_nonblock_check(p.fds[i])); /* accepted non-blocking */
        close(p.fds[i]);
    }
    ue_op_cancel(&l, &p.op);
    pump(&l, &p.finals, 1);
    CHECK(p.finals == 1 && l.inflight == 0);
    for (int i = 0; i < 5; i++)
        close(clients[i]);
    close(ls);
    ue_loop_close(&l);
}

/* After ue_op_cancel_sync() the kernel holds no reference to the listening
 * socket: closing it stops the listening at once (connects are refused),
 * and the op's final CQE still comes. */
static void test_cancel_sync_lets_go_of_the_socket(void)
{
    ue_loop l;
    start_loop(&l);
    struct sockaddr_in a;
    accept_probe p;
    int ls = listen_and_accept(&l, &p, &a);
    CHECK(ue_wait(&l, 0) == 0); /* submitted: the accept waits on the socket */
    CHECK(ue_op_cancel_sync(&l, &p.op) == 0);
    close(ls);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof a) < 0 && errno == ECONNREFUSED);
    close(c);
    pump(&l, &p.finals, 1);
    CHECK(p.finals == 1 && p.n == 0 && l.inflight == 0);
    CHECK(ue_op_cancel_sync(&l, &p.op) == 0); /* idle: nothing to do */
    ue_loop_close(&l);
}

int main(void)
{
    RUN(test_multishot_recv_streams_through_small_buffers);
    RUN(test_empty_pool_ends_multishot_with_enobufs);
    RUN(test_window_reuses_buffers_and_grows);
    RUN(test_multishot_accept);
    RUN(test_cancel_sync_lets_go_of_the_socket);
    return TEST_EXIT();
}
