/* Ops: lifetime until the final CQE, cancellation races, multishot, waits,
 * cancel-all, thread ownership and fork. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ue.h"
#include "ue_test.h"

typedef struct {
    ue_op op;
    int cqes, finals;
    int32_t last_res;
    uint32_t last_flags;
    char buf[64];
} probe_op;

static void probe_cb(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    (void)l;
    probe_op *p = (probe_op *)op;
    p->cqes++;
    p->last_res = res;
    p->last_flags = flags;
    if (!(flags & IORING_CQE_F_MORE)) {
        p->finals++;
        CHECK(op->state == UE_OP_IDLE); /* idle before the final callback runs */
    }
}

static void setup(ue_loop *l)
{
    REQUIRE(ue_loop_init(l, 64, 256) == 0);
    REQUIRE(ue_loop_start(l) == 0);
}

static void open_pair(int sv[2])
{
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
}

static void close_pair_and_loop(int sv[2], ue_loop *l)
{
    close(sv[0]);
    close(sv[1]);
    ue_loop_close(l);
}

static void run_until(ue_loop *l, int *counter, int target, double timeout)
{
    double deadline = ue_now() + timeout;
    while (*counter < target && ue_now() < deadline) {
        ue_wait(l, 0.05);
        ue_dispatch(l);
    }
}

/* Arms `op` as a recv on fd (helper that keeps the SQE handling in one place). */
static void arm_recv(ue_loop *l, probe_op *p, int fd)
{
    struct io_uring_sqe *sqe = ue_sqe(l);
    REQUIRE(sqe);
    io_uring_prep_recv(sqe, fd, p->buf, sizeof p->buf, 0);
    ue_op_arm(l, &p->op, sqe, probe_cb);
}

static void test_recv_completes_once(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_recv(&l, &p, sv[0]);
    CHECK(l.inflight == 1);
    ue_wait(&l, 0);
    ue_dispatch(&l);
    CHECK(p.cqes == 0); /* nothing to read yet: the op waits in the kernel */
    REQUIRE(write(sv[1], "ping", 4) == 4);
    run_until(&l, &p.finals, 1, 2.0);
    CHECK(p.finals == 1 && p.cqes == 1);
    CHECK(p.last_res == 4 && memcmp(p.buf, "ping", 4) == 0);
    CHECK(l.inflight == 0);
    close_pair_and_loop(sv, &l);
}

/* A loop whose ready queue never empties only ever polls (zero-timeout
 * waits); with DEFER_TASKRUN completions are posted only when it enters, so
 * each poll must enter: a completion is seen by polling alone. */
static void test_polling_alone_sees_completions(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_recv(&l, &p, sv[0]);
    ue_wait(&l, 0); /* submits the recv */
    ue_dispatch(&l);
    CHECK(!l.unsubmitted && p.cqes == 0);
    REQUIRE(write(sv[1], "pong", 4) == 4);
    /* The write queues the completion before it returns (a local socket),
     * so the very next non-waiting call must find it: a zero wait may skip
     * its syscall only when the kernel has nothing for us. */
    ue_wait(&l, 0);
    ue_dispatch(&l);
    CHECK(p.finals == 1 && p.last_res == 4 && memcmp(p.buf, "pong", 4) == 0);
    close_pair_and_loop(sv, &l);
}

/* Kernels with DEFER_TASKRUN (6.1+) also take TASKRUN_FLAG: if the first
 * setup attempt failed and a fallback was used, zero waits would lose their
 * shortcut without anyone noticing. */
static void test_defer_taskrun_ring_has_the_taskrun_flag(void)
{
    ue_loop l;
    setup(&l);
    if (l.mode == UE_MODE_DEFER_TASKRUN)
        CHECK(l.ring.flags & IORING_SETUP_TASKRUN_FLAG);
    ue_loop_close(&l);
}

static void test_cancel_pending_recv(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_recv(&l, &p, sv[0]);
    ue_wait(&l, 0);
    CHECK(ue_op_cancel(&l, &p.op) == 0);
    CHECK(p.op.state == UE_OP_CANCELING);
    CHECK(ue_op_cancel(&l, &p.op) == 0); /* a second cancel is a no-op */
    run_until(&l, &p.finals, 1, 2.0);
    CHECK(p.finals == 1 && p.last_res == -ECANCELED);
    CHECK(l.inflight == 0);
    /* After cancellation, data is still in the socket for the next reader. */
    REQUIRE(write(sv[1], "data", 4) == 4);
    probe_op q = {0};
    arm_recv(&l, &q, sv[0]);
    run_until(&l, &q.finals, 1, 2.0);
    CHECK(q.last_res == 4);
    close_pair_and_loop(sv, &l);
}

/* Data and cancel in the same batch: exactly one final CQE, carrying either
 * the bytes or -ECANCELED, never both and never none. */
static void test_cancel_races_completion(void)
{
    int got_data = 0, got_cancel = 0;
    for (int round = 0; round < 200; round++) {
        ue_loop l;
        setup(&l);
        int sv[2];
        open_pair(sv);
        probe_op p = {0};
        arm_recv(&l, &p, sv[0]);
        if (round % 2)
            ue_wait(&l, 0); /* sometimes let it reach the kernel first */
        REQUIRE(write(sv[1], "x", 1) == 1);
        ue_op_cancel(&l, &p.op);
        run_until(&l, &p.finals, 1, 2.0);
        CHECK(p.finals == 1 && p.cqes == 1);
        CHECK(p.last_res == 1 || p.last_res == -ECANCELED);
        if (p.last_res == 1)
            got_data++;
        else {
            got_cancel++;
            char c;
            CHECK(read(sv[0], &c, 1) == 1); /* the byte was not consumed */
        }
        close_pair_and_loop(sv, &l);
    }
    CHECK(got_data + got_cancel == 200);
}

static void test_multishot_until_cancel(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    struct io_uring_sqe *sqe = ue_sqe(&l);
    io_uring_prep_poll_multishot(sqe, sv[0], POLLIN);
    ue_op_arm(&l, &p.op, sqe, probe_cb);
    REQUIRE(write(sv[1], "a", 1) == 1);
    run_until(&l, &p.cqes, 1, 2.0);
    CHECK(p.cqes >= 1 && p.finals == 0 && (p.last_flags & IORING_CQE_F_MORE));
    CHECK(p.op.state == UE_OP_INFLIGHT);
    ue_op_cancel(&l, &p.op);
    run_until(&l, &p.finals, 1, 2.0);
    CHECK(p.finals == 1);
    CHECK(l.inflight == 0);
    close_pair_and_loop(sv, &l);
}

static void test_generation_changes_on_rearm(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_recv(&l, &p, sv[0]);
    uint16_t g1 = p.op.gen;
    REQUIRE(write(sv[1], "1", 1) == 1);
    run_until(&l, &p.finals, 1, 2.0);
    arm_recv(&l, &p, sv[0]);
    CHECK(p.op.gen != g1);
    REQUIRE(write(sv[1], "2", 1) == 1);
    run_until(&l, &p.finals, 2, 2.0);
    CHECK(p.finals == 2 && p.buf[0] == '2');
    close_pair_and_loop(sv, &l);
}

static void test_wait_timeout(void)
{
    ue_loop l;
    setup(&l);
    double t0 = ue_now();
    CHECK(ue_wait(&l, 0.05) == 0);
    double dt = ue_now() - t0;
    CHECK(dt >= 0.045 && dt < 1.0);
    CHECK(ue_dispatch(&l) == 0);
    ue_loop_close(&l);
}

static void test_cancel_all(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op ops[8];
    memset(ops, 0, sizeof ops);
    for (int i = 0; i < 8; i++)
        arm_recv(&l, &ops[i], sv[0]);
    ue_wait(&l, 0);
    CHECK(l.inflight == 8);
    ue_loop_cancel_all(&l, 1000);
    CHECK(l.inflight == 0);
    for (int i = 0; i < 8; i++)
        CHECK(ops[i].finals == 1 && ops[i].last_res == -ECANCELED);
    close_pair_and_loop(sv, &l);
}

static void *start_elsewhere(void *arg)
{
    return (void *)(intptr_t)ue_loop_start((ue_loop *)arg);
}

static void test_ring_belongs_to_one_thread(void)
{
    ue_loop l;
    setup(&l);
    if (l.mode != UE_MODE_DEFER_TASKRUN) {
        ue_loop_close(&l);
        return; /* only SINGLE_ISSUER rings are bound to a thread */
    }
    pthread_t th;
    void *ret;
    pthread_create(&th, NULL, start_elsewhere, &l);
    pthread_join(th, &ret);
    CHECK((intptr_t)ret == -EEXIST);
    /* rebuilt, the ring can be started by another thread */
    CHECK(ue_loop_rebuild(&l) == 0);
    pthread_create(&th, NULL, start_elsewhere, &l);
    pthread_join(th, &ret);
    CHECK((intptr_t)ret == 0);
    ue_loop_close(&l);
}

static void test_fork_gets_fresh_ring(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_recv(&l, &p, sv[0]);
    ue_wait(&l, 0);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int ok = ue_loop_forked(&l) && ue_loop_rebuild(&l) == 0 && ue_loop_start(&l) == 0 && l.inflight == 0;
        probe_op c = {0};
        int cs[2];
        ok = ok && socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, cs) == 0;
        arm_recv(&l, &c, cs[0]);
        ok = ok && write(cs[1], "c", 1) == 1;
        run_until(&l, &c.finals, 1, 2.0);
        _exit(ok && c.last_res == 1 ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* the parent's ring and its pending op are untouched by the child */
    CHECK(!ue_loop_forked(&l));
    REQUIRE(write(sv[1], "p", 1) == 1);
    run_until(&l, &p.finals, 1, 2.0);
    CHECK(p.finals == 1 && p.last_res == 1);
    close_pair_and_loop(sv, &l);
}

/* Quiet sends (ue_op_arm_quiet). The probe run by ue_loop_start() decides
 * whether this kernel has what they need; where it has not, none may be
 * armed. */
static int setup_quiet(ue_loop *l)
{
    setup(l);
    if (l->quiet_ok)
        return 1;
    CHECK(!ue_quiet_reserve(l));
    printf("     (this kernel failed the quiet-send probe: ue_quiet_reserve refuses)\n");
    ue_loop_close(l);
    return 0;
}

static void arm_quiet_send(ue_loop *l, probe_op *p, int fd, const char *buf, unsigned len)
{
    REQUIRE(ue_quiet_reserve(l));
    struct io_uring_sqe *sqe = ue_sqe(l);
    REQUIRE(sqe);
    io_uring_prep_send(sqe, fd, buf, len, UE_QUIET_SEND_FLAGS | MSG_NOSIGNAL);
    ue_op_arm_quiet(l, &p->op, sqe, probe_cb, (int32_t)len);
}

static void test_quiet_send_success_posts_no_cqe(void)
{
    ue_loop l;
    if (!setup_quiet(&l))
        return;
    int sv[2];
    open_pair(sv);
    probe_op p = {0};
    arm_quiet_send(&l, &p, sv[0], "hello", 5);
    CHECK(l.inflight == 1);
    REQUIRE(ue_wait(&l, 0) == 0);
    CHECK(io_uring_cq_ready(&l.ring) == 0); /* sent, and nothing posted */
    ue_dispatch(&l);                        /* settles it */
    CHECK(p.finals == 1 && p.last_res == 5 && p.last_flags == 0);
    CHECK(l.inflight == 0 && !ue_op_busy(&p.op));
    char got[8] = {0};
    CHECK(read(sv[1], got, sizeof got) == 5 && memcmp(got, "hello", 5) == 0);
    /* not settled twice */
    ue_wait(&l, 0);
    ue_dispatch(&l);
    CHECK(p.finals == 1);
    close_pair_and_loop(sv, &l);
}

static void test_quiet_send_reports_part_and_refusal(void)
{
    ue_loop l;
    if (!setup_quiet(&l))
        return;
    int sv[2];
    open_pair(sv);
    int small = 4096;
    REQUIRE(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    enum { BIG = 256 * 1024 };
    char *big = calloc(1, BIG);
    REQUIRE(big);
    probe_op p = {0};
    arm_quiet_send(&l, &p, sv[0], big, BIG);
    REQUIRE(ue_wait(&l, 0) == 0);
    CHECK(io_uring_cq_ready(&l.ring) == 1); /* posted within the submitting enter */
    ue_dispatch(&l);
    CHECK(p.finals == 1 && p.last_res > 0 && p.last_res < BIG);
    arm_quiet_send(&l, &p, sv[0], big, BIG);
    REQUIRE(ue_wait(&l, 0) == 0);
    ue_dispatch(&l);
    CHECK(p.finals == 2 && p.last_res == -EAGAIN);
    CHECK(l.inflight == 0 && l.nquiet == 0);
    close_pair_and_loop(sv, &l);
    free(big);
}

/* A failed quiet op may be freed by its callback: settling must not touch
 * it afterwards (ASan sees it if it does). */
static void free_on_final(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    probe_cb(l, op, res, flags);
    free(op);
}

static void test_quiet_send_freed_by_its_failure_callback(void)
{
    ue_loop l;
    if (!setup_quiet(&l))
        return;
    int sv[2];
    open_pair(sv);
    close(sv[1]); /* the send fails: EPIPE */
    sv[1] = -1;
    probe_op *p = calloc(1, sizeof *p);
    REQUIRE(p && ue_quiet_reserve(&l));
    struct io_uring_sqe *sqe = ue_sqe(&l);
    REQUIRE(sqe);
    io_uring_prep_send(sqe, sv[0], "x", 1, UE_QUIET_SEND_FLAGS | MSG_NOSIGNAL);
    ue_op_arm_quiet(&l, &p->op, sqe, free_on_final, 1);
    REQUIRE(ue_wait(&l, 0) == 0);
    CHECK(ue_dispatch(&l) == 1);
    CHECK(l.inflight == 0 && l.nquiet == 0);
    close(sv[0]);
    ue_loop_close(&l);
}

typedef struct {
    int fd;
} delayed_write_arg;

static void *write_after_50ms(void *a)
{
    usleep(50 * 1000);
    ssize_t n = write(((delayed_write_arg *)a)->fd, "w", 1);
    (void)n;
    return NULL;
}

/* The point of quiet sends: one submitted with a wait does not end it. */
static void test_quiet_send_does_not_end_the_wait(void)
{
    ue_loop l;
    if (!setup_quiet(&l))
        return;
    int a[2], b[2];
    open_pair(a);
    open_pair(b);
    probe_op recv = {0}, send = {0};
    arm_recv(&l, &recv, b[0]);
    arm_quiet_send(&l, &send, a[0], "q", 1);
    delayed_write_arg arg = {b[1]};
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, write_after_50ms, &arg) == 0);
    REQUIRE(ue_wait(&l, 5.0) == 0); /* ends with the recv, 50 ms on */
    ue_dispatch(&l);
    pthread_join(t, NULL);
    CHECK(recv.finals == 1 && recv.last_res == 1);
    CHECK(send.finals == 1 && send.last_res == 1);
    close_pair_and_loop(b, &l);
    close(a[0]);
    close(a[1]);
}

/* Several buffers get their msghdr and iovec from the loop's scratch area
 * (ue_send_msg), which the next send takes again once the SQ is empty: the
 * kernel must have its own copies by then, also of a send that has to wait
 * for room and completes long after. */
static void test_send_scratch_is_reused_once_submitted(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    char fill[4096];
    memset(fill, 'x', sizeof fill);
    size_t filled = 0;
    ssize_t w;
    while ((w = write(sv[0], fill, sizeof fill)) > 0)
        filled += (size_t)w; /* the peer's buffer is full: the send must wait */
    ue_send_one one;
    int n = 3;
    struct msghdr *msg = ue_send_msg(&l, &n, &one);
    REQUIRE(n == 3 && msg != &one.msg && msg->msg_iovlen == 3);
    const char *parts[3] = {"ab", "cd", "ef"};
    for (int i = 0; i < 3; i++) {
        msg->msg_iov[i].iov_base = (void *)parts[i];
        msg->msg_iov[i].iov_len = 2;
    }
    probe_op p = {0};
    struct io_uring_sqe *sqe = ue_sqe(&l);
    REQUIRE(sqe);
    ue_prep_send_msg(sqe, sv[0], msg, MSG_NOSIGNAL);
    ue_op_arm(&l, &p.op, sqe, probe_cb);
    int m = 2;
    struct msghdr *queued = ue_send_msg(&l, &m, &one);
    CHECK(queued != msg); /* an SQE still points at the first */
    REQUIRE(ue_submit(&l) >= 0);
    m = UE_SEND_IOV_MAX;
    struct msghdr *again = ue_send_msg(&l, &m, &one);
    CHECK(again == msg);                                            /* the SQ is empty: the area is taken again */
    memset(again->msg_iov, 0xff, (size_t)m * sizeof(struct iovec)); /* what the kernel must not read */
    char buf[8192];
    size_t drained = 0;
    while (drained < filled) {
        ssize_t r = read(sv[1], buf, sizeof buf);
        if (r > 0)
            drained += (size_t)r;
    }
    run_until(&l, &p.finals, 1, 5.0);
    CHECK(p.finals == 1 && p.last_res == 6);
    char got[6];
    CHECK(read(sv[1], got, sizeof got) == 6 && memcmp(got, "abcdef", 6) == 0);
    close_pair_and_loop(sv, &l);
}

/* One buffer, or a kernel without IORING_FEAT_SUBMIT_STABLE, is sent from
 * the caller's single-buffer msghdr. */
static void test_send_msg_falls_back_to_one_buffer(void)
{
    ue_loop l;
    setup(&l);
    ue_send_one one;
    int n = 1;
    CHECK(ue_send_msg(&l, &n, &one) == &one.msg && n == 1 && one.msg.msg_iov == &one.iov);
    n = 500;
    struct msghdr *msg = ue_send_msg(&l, &n, &one);
    CHECK(n == UE_SEND_IOV_MAX && msg != &one.msg);
    l.features &= ~(unsigned)IORING_FEAT_SUBMIT_STABLE;
    n = 3;
    CHECK(ue_send_msg(&l, &n, &one) == &one.msg && n == 1 && one.msg.msg_iovlen == 1);
    ue_loop_close(&l);
}

/* A full area first submits what is queued, then starts over. */
static void test_full_send_scratch_submits_first(void)
{
    ue_loop l;
    setup(&l);
    int sv[2];
    open_pair(sv);
    static probe_op ops[200];
    char byte = 'z';
    unsigned i, submitted_at = 0;
    for (i = 0; i < 200 && !submitted_at; i++) {
        unsigned pending = l.unsubmitted;
        ue_send_one one;
        int n = UE_SEND_IOV_MAX;
        struct msghdr *msg = ue_send_msg(&l, &n, &one);
        REQUIRE(n == UE_SEND_IOV_MAX);
        if (l.unsubmitted < pending)
            submitted_at = i;
        for (int k = 0; k < n; k++) {
            msg->msg_iov[k].iov_base = &byte;
            msg->msg_iov[k].iov_len = 1;
        }
        struct io_uring_sqe *sqe = ue_sqe(&l);
        REQUIRE(sqe);
        ue_prep_send_msg(sqe, sv[0], msg, MSG_NOSIGNAL);
        ue_op_arm(&l, &ops[i].op, sqe, probe_cb);
    }
    CHECK(submitted_at > 10 && submitted_at < 64); /* 64 KiB hold ~60 sends of 64 buffers */
    int finals = 0;
    double deadline = ue_now() + 5.0;
    while (finals < (int)i && ue_now() < deadline) {
        ue_wait(&l, 0.05);
        ue_dispatch(&l);
        finals = 0;
        for (unsigned k = 0; k < i; k++)
            finals += ops[k].finals;
    }
    CHECK(finals == (int)i);
    for (unsigned k = 0; k < i; k++)
        CHECK(ops[k].last_res == UE_SEND_IOV_MAX);
    close_pair_and_loop(sv, &l);
}

int main(void)
{
    RUN(test_recv_completes_once);
    RUN(test_polling_alone_sees_completions);
    RUN(test_defer_taskrun_ring_has_the_taskrun_flag);
    RUN(test_cancel_pending_recv);
    RUN(test_cancel_races_completion);
    RUN(test_multishot_until_cancel);
    RUN(test_generation_changes_on_rearm);
    RUN(test_wait_timeout);
    RUN(test_cancel_all);
    RUN(test_ring_belongs_to_one_thread);
    RUN(test_fork_gets_fresh_ring);
    RUN(test_quiet_send_success_posts_no_cqe);
    RUN(test_quiet_send_reports_part_and_refusal);
    RUN(test_quiet_send_freed_by_its_failure_callback);
    RUN(test_quiet_send_does_not_end_the_wait);
    RUN(test_send_scratch_is_reused_once_submitted);
    RUN(test_send_msg_falls_back_to_one_buffer);
    RUN(test_full_send_scratch_submits_first);
    return TEST_EXIT();
}
