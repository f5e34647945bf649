/*
 * The ring: setup with fallbacks, ops, the per-iteration wait, CQE dispatch,
 * cross-thread wakeup and fork handling.
 */
#define _GNU_SOURCE
#include "ue.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* user_data = op address in the low 48 bits, generation in the high 16.
 * 0 marks CQEs nobody waits for (cancel requests). */
#define UE_PTR_MASK ((UINT64_C(1) << 48) - 1)

/* The quiet-send probe's own SQEs: never an op, whose addresses are aligned. */
#define UE_UD_PROBE UINT64_C(1)

static inline uint64_t ue__encode(const ue_op *op)
{
    return ((uint64_t)(uintptr_t)op & UE_PTR_MASK) | ((uint64_t)op->gen << 48);
}

int ue_current_tid(void)
{
    return (int)syscall(SYS_gettid);
}

double ue_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Tries the preferred setup first and falls back on -EINVAL (older kernels
 * reject flags they do not know). Any other error is final: EPERM/ENOSYS
 * mean io_uring is refused here, whatever the flags. */
static int ue__setup_ring(ue_loop *l, unsigned sq_entries, unsigned cq_entries)
{
    static const struct {
        unsigned flags;
        enum ue_mode mode;
    } attempts[] = {
        {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL |
             IORING_SETUP_R_DISABLED,
         UE_MODE_DEFER_TASKRUN},
        /* without the flag only zero waits lose their shortcut (ue_wait) */
        {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_R_DISABLED,
         UE_MODE_DEFER_TASKRUN},
        {IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_R_DISABLED, UE_MODE_COOP_TASKRUN},
        {IORING_SETUP_R_DISABLED, UE_MODE_PLAIN},
        {0, UE_MODE_PLAIN},
    };
    int ret = -EINVAL;
    for (size_t i = 0; i < sizeof attempts / sizeof attempts[0]; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = attempts[i].flags | IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(sq_entries, &l->ring, &p);
        if (ret == 0) {
            l->mode = attempts[i].mode;
            l->features = p.features;
            l->enabled = !(attempts[i].flags & IORING_SETUP_R_DISABLED);
            l->ring_fd = l->ring.ring_fd;
            return 0;
        }
        if (ret != -EINVAL)
            break;
    }
    return ret;
}

/* A page the kernel hands a forked child zeroed (MADV_WIPEONFORK, Linux
 * 4.14): ue_loop_forked() is then a memory read, where getpid() is a
 * syscall, and add_reader()/remove_reader() ask it every time. */
static void ue__fork_mark_init(ue_loop *l)
{
    long page = sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return;
    if (madvise(p, (size_t)page, MADV_WIPEONFORK) < 0) {
        munmap(p, (size_t)page);
        return; /* ue_loop_forked() falls back to getpid() */
    }
    l->fork_mark = p;
    *l->fork_mark = 1;
}

int ue_loop_init(ue_loop *l, unsigned sq_entries, unsigned cq_entries)
{
    memset(l, 0, sizeof *l);
    l->ring_fd = -1;
    l->wake_fd = -1;
    l->pid = getpid();
    ue__fork_mark_init(l);
    l->sq_size = sq_entries;
    l->cq_size = cq_entries;
    int ret = ue__setup_ring(l, sq_entries, cq_entries);
    if (ret < 0) {
        l->failed_step = "io_uring_setup";
        return ret;
    }
    l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->wake_fd < 0) {
        ret = -errno;
        l->failed_step = "eventfd";
        io_uring_queue_exit(&l->ring);
        l->ring_fd = -1;
        return ret;
    }
    l->wake_op.internal = 1;
    return 0;
}

int ue_loop_forked(const ue_loop *l)
{
    if (l->fork_mark)
        return !*l->fork_mark;
    return l->pid != getpid();
}

static void ue__wake_cb(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    (void)op;
    (void)res;
    uint64_t v;
    /* Drain the counter so the eventfd does not stay readable forever. */
    while (read(l->wake_fd, &v, sizeof v) > 0) {
    }
    if (!(flags & IORING_CQE_F_MORE) && l->ring_fd >= 0) {
        struct io_uring_sqe *sqe = ue_sqe(l);
        if (sqe) {
            io_uring_prep_poll_multishot(sqe, l->wake_fd, POLLIN);
            ue_op_arm(l, &l->wake_op, sqe, ue__wake_cb);
        }
    }
}

/* How many of the probe's CQEs are in the CQ (left there: ue_dispatch
 * skips them); *last gets the res of the newest. */
static unsigned ue__probe_cqes(ue_loop *l, int32_t *last)
{
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&l->ring, head, cqe)
    {
        if (cqe->user_data == UE_UD_PROBE) {
            n++;
            *last = cqe->res;
        }
    }
    return n;
}

/* Submits one probe send of `len` bytes from `buf`; returns the probe's
 * CQEs then in the CQ (ue__probe_cqes), or -1 when the submit failed. */
static int ue__probe_send(ue_loop *l, int fd, const char *buf, unsigned len, int32_t *last)
{
    struct io_uring_sqe *sqe = ue_sqe(l);
    if (!sqe)
        return -1;
    io_uring_prep_send(sqe, fd, buf, len, UE_QUIET_SEND_FLAGS | MSG_NOSIGNAL);
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, UE_UD_PROBE);
    if (io_uring_submit_and_get_events(&l->ring) < 0)
        return -1;
    l->unsubmitted = 0;
    return (int)ue__probe_cqes(l, last);
}

/* Whether this kernel gives quiet sends what they need (see ue.h): on a
 * socketpair whose buffer holds a few KiB, a byte goes without a CQE, then
 * 256 KiB go in part (a CQE with the count), then none of them (-EAGAIN),
 * each within the enter that submitted it. Kernels without
 * IOSQE_CQE_SKIP_SUCCESS (5.17) or without MSG_DONTWAIT's no-poll rule fail
 * a step. */
static int ue__probe_quiet(ue_loop *l)
{
    enum { BIG = 256 * 1024 };
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return 0;
    int small = 4096;
    (void)setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    /* zero pages, read-only: the sends only read them */
    char *buf = mmap(NULL, BIG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int32_t res = 0;
    int ok = buf != MAP_FAILED && ue__probe_send(l, sv[0], buf, 1, &res) == 0 &&
             ue__probe_send(l, sv[0], buf, BIG, &res) == 1 && res > 0 && res < BIG &&
             ue__probe_send(l, sv[0], buf, BIG, &res) == 2 && res == -EAGAIN;
    close(sv[0]);
    close(sv[1]);
    /* Take the probe's CQEs out of the way when they are all there is (the
     * first start of a ring); otherwise ue_dispatch() skips them. */
    unsigned mine = ue__probe_cqes(l, &res);
    if (mine && mine == io_uring_cq_ready(&l->ring))
        io_uring_cq_advance(&l->ring, mine);
    /* When a step failed its send may still be in the kernel, to read the
     * buffer later: then the mapping stays (it holds no memory). */
    if (ok)
        munmap(buf, BIG);
    return ok;
}

int ue_quiet_reserve(ue_loop *l)
{
    if (!l->quiet_ok)
        return 0;
    if (l->nquiet == l->quiet_cap) {
        unsigned cap = l->quiet_cap ? l->quiet_cap * 2 : 64;
        ue_quiet *q = realloc(l->quiet, cap * sizeof *q);
        if (!q)
            return 0;
        l->quiet = q;
        l->quiet_cap = cap;
    }
    return 1;
}

void ue_op_arm_quiet(ue_loop *l, ue_op *op, struct io_uring_sqe *sqe, ue_op_cb cb, int32_t res_on_success)
{
    ue_op_arm(l, op, sqe, cb);
    op->quiet = 1;
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    ue_quiet *q = &l->quiet[l->nquiet++];
    q->op = op;
    q->sq_pos = l->ring.sq.sqe_tail - 1; /* the SQE ue_sqe() just handed out */
    q->res = res_on_success;
}

/* A quiet op posted a CQE (it failed): forget its entry, since its owner
 * may free it in the callback. */
static void ue__quiet_forget(ue_loop *l, const ue_op *op)
{
    for (unsigned i = l->quiet_head; i < l->nquiet; i++)
        if (l->quiet[i].op == op)
            l->quiet[i].op = NULL;
}

/* Every quiet op whose SQE the kernel has consumed and that posted no CQE
 * succeeded: it is idle, and its callback gets its res. Not while a CQE
 * waits in the overflow list (a failure's may be there). */
static void ue__settle_quiet(ue_loop *l)
{
    if (l->quiet_head == l->nquiet || l->quiet_settling || l->ring_fd < 0)
        return;
    if (IO_URING_READ_ONCE(*l->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW)
        return;
    unsigned consumed = io_uring_smp_load_acquire(l->ring.sq.khead);
    l->quiet_settling = 1;
    while (l->quiet_head < l->nquiet && (int)(consumed - l->quiet[l->quiet_head].sq_pos) > 0) {
        ue_quiet q = l->quiet[l->quiet_head++]; /* a callback may arm more */
        if (!q.op)
            continue; /* it failed: its CQE was dispatched */
        q.op->quiet = 0;
        q.op->state = UE_OP_IDLE;
        if (!q.op->internal)
            l->inflight--;
        q.op->cb(l, q.op, q.res, 0);
    }
    if (l->quiet_head == l->nquiet) {
        l->quiet_head = l->nquiet = 0;
    } else if (l->quiet_head) {
        memmove(l->quiet, l->quiet + l->quiet_head, (l->nquiet - l->quiet_head) * sizeof *l->quiet);
        l->nquiet -= l->quiet_head;
        l->quiet_head = 0;
    }
    l->quiet_settling = 0;
}

int ue_loop_start(ue_loop *l)
{
    if (l->ring_fd < 0)
        return -EBADF;
    if (!l->enabled) {
        int ret = io_uring_register(l->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        if (ret < 0)
            return ret;
        l->enabled = 1;
        l->owner_tid = ue_current_tid();
    } else if (l->mode == UE_MODE_DEFER_TASKRUN && l->owner_tid && l->owner_tid != ue_current_tid()) {
        return -EEXIST;
    } else if (!l->owner_tid) {
        l->owner_tid = ue_current_tid();
    }
    if (!l->quiet_probed) {
        l->quiet_probed = 1;
        l->quiet_ok = ue__probe_quiet(l);
    }
    if (l->wake_op.state == UE_OP_IDLE) {
        struct io_uring_sqe *sqe = ue_sqe(l);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_poll_multishot(sqe, l->wake_fd, POLLIN);
        ue_op_arm(l, &l->wake_op, sqe, ue__wake_cb);
    }
    return 0;
}

struct io_uring_sqe *ue_sqe(ue_loop *l)
{
    if (l->ring_fd < 0)
        return NULL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    if (!sqe) {
        /* SQ full: push what is queued to the kernel, then retry. Only the
         * owner thread of an enabled ring may do that. */
        if (!l->enabled || ue_submit(l) < 0)
            return NULL;
        sqe = io_uring_get_sqe(&l->ring);
        if (!sqe)
            return NULL;
    }
    l->unsubmitted++;
    return sqe;
}

void ue_op_arm(ue_loop *l, ue_op *op, struct io_uring_sqe *sqe, ue_op_cb cb)
{
    op->cb = cb;
    op->quiet = 0;
    op->gen++;
    op->state = UE_OP_INFLIGHT;
    if (!op->internal)
        l->inflight++;
    io_uring_sqe_set_data64(sqe, ue__encode(op));
}

int ue_op_cancel(ue_loop *l, ue_op *op)
{
    if (op->state != UE_OP_INFLIGHT)
        return 0;
    struct io_uring_sqe *sqe = ue_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_cancel64(sqe, ue__encode(op), 0);
    io_uring_sqe_set_data64(sqe, 0);
    op->state = UE_OP_CANCELING;
    return 0;
}

int ue_op_cancel_sync(ue_loop *l, ue_op *op)
{
    if (op->state == UE_OP_IDLE)
        return 0;
    if (l->unsubmitted) {
        int ret = ue_submit(l); /* the op must be in the kernel to be found */
        if (ret < 0)
            return ret;
    }
    struct io_uring_sync_cancel_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.addr = ue__encode(op);
    reg.fd = -1;
    reg.timeout.tv_sec = 1; /* an accept or a poll goes at once; this is a bound */
    int ret = io_uring_register_sync_cancel(&l->ring, &reg);
    if (ret == 0 || ret == -ENOENT || ret == -EALREADY) {
        op->state = UE_OP_CANCELING; /* its final CQE comes with the enter below */
    } else if (op->state == UE_OP_INFLIGHT && (ret = ue_op_cancel(l, op)) < 0) {
        return ret; /* before 6.0 (-EINVAL) or timed out: the usual cancel */
    }
    /* The cancelled request completes (and drops its file) in task work,
     * which a DEFER_TASKRUN ring runs only when we enter for events: enter
     * once now, without waiting. */
    ret = io_uring_submit_and_get_events(&l->ring);
    if (ret >= 0)
        l->unsubmitted = 0;
    return ret < 0 ? ret : 0;
}

int ue_submit(ue_loop *l)
{
    if (!l->unsubmitted)
        return 0;
    int ret = io_uring_submit(&l->ring);
    if (ret >= 0)
        l->unsubmitted = 0;
    return ret;
}

/* Whether an enter that does not wait could bring anything: SQEs to
 * submit, or completions the kernel has queued. With TASKRUN_FLAG the
 * kernel sets IORING_SQ_TASKRUN when it queues deferred completion work, so
 * the flag and the CQ tell us what such an enter would find; skipping it
 * saves the syscall of every iteration that only runs callbacks. */
static int ue__kernel_has_news(ue_loop *l)
{
    if (io_uring_sq_ready(&l->ring) || io_uring_cq_ready(&l->ring)) /* SQEs to submit, CQEs to reap */
        return 1;
    if (!(l->ring.flags & IORING_SETUP_TASKRUN_FLAG))
        return 1;
    unsigned flags = IO_URING_READ_ONCE(*l->ring.sq.kflags);
    return (flags & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) != 0;
}

void ue_wait_prepare(ue_loop *l, double timeout)
{
    if (timeout != 0)
        atomic_store(&l->sleeping, 1);
}

int ue_wait(ue_loop *l, double timeout)
{
    struct io_uring_cqe *cqe;
    int ret;
    if (timeout == 0) {
        if (!ue__kernel_has_news(l))
            return 0;
        /* With DEFER_TASKRUN completions are only posted when we enter with
         * GETEVENTS; a plain peek would see nothing. */
        ret = io_uring_submit_and_get_events(&l->ring);
    } else if (timeout < 0) {
        ret = io_uring_submit_and_wait(&l->ring, 1);
    } else {
        struct __kernel_timespec ts;
        ts.tv_sec = (long long)timeout;
        ts.tv_nsec = (long long)((timeout - (double)ts.tv_sec) * 1e9);
        ret = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts, NULL);
    }
    atomic_store(&l->sleeping, 0);
    if (ret >= 0 || ret == -ETIME) {
        l->unsubmitted = 0;
        return 0;
    }
    /* -EBUSY/-EAGAIN: the CQ is full or overflowed; dispatching frees it. */
    if (ret == -EBUSY || ret == -EAGAIN)
        return 0;
    return ret;
}

unsigned ue_dispatch(ue_loop *l)
{
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&l->ring, head, cqe)
    {
        uint64_t ud = cqe->user_data;
        int32_t res = cqe->res;
        uint32_t flags = cqe->flags;
        seen++;
        if (flags & IORING_CQE_F_BUFFER)
            l->buf_taken++;
        if (ud == 0 || ud == UE_UD_PROBE)
            continue;
        ue_op *op = (ue_op *)(uintptr_t)(ud & UE_PTR_MASK);
        if (op->gen != (uint16_t)(ud >> 48) || op->state == UE_OP_IDLE)
            continue; /* belongs to an earlier arming */
        if (!(flags & IORING_CQE_F_MORE)) {
            op->state = UE_OP_IDLE;
            if (!op->internal)
                l->inflight--;
            if (op->quiet) {
                op->quiet = 0;
                ue__quiet_forget(l, op);
            }
        }
        /* The callback may free `op`: nothing below may touch it. */
        op->cb(l, op, res, flags);
    }
    if (seen)
        io_uring_cq_advance(&l->ring, seen);
    ue__settle_quiet(l);
    return seen;
}

void ue_wakeup(ue_loop *l)
{
    if (atomic_exchange(&l->sleeping, 0)) {
        uint64_t one = 1;
        ssize_t n = write(l->wake_fd, &one, sizeof one);
        (void)n; /* EAGAIN means the counter is already non-zero: awake */
    }
}

void ue_loop_cancel_all(ue_loop *l, int timeout_ms)
{
    if (l->ring_fd < 0 || ue_loop_forked(l))
        return;
    if (!l->enabled && ue_loop_start(l) < 0)
        return;
    if (l->inflight) {
        struct io_uring_sqe *sqe = ue_sqe(l);
        if (sqe) {
            io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
            io_uring_sqe_set_data64(sqe, 0);
        }
    }
    ue__settle_quiet(l); /* they need no cancel, and will post nothing */
    double deadline = ue_now() + timeout_ms / 1000.0;
    while (l->inflight) {
        double left = deadline - ue_now();
        if (left <= 0)
            break;
        int ret = ue_wait(l, left);
        ue_dispatch(l);
        if (ret < 0 && ret != -EINTR)
            break;
    }
}

void ue_loop_close(ue_loop *l)
{
    if (l->ring_fd >= 0) {
        io_uring_queue_exit(&l->ring);
        l->ring_fd = -1;
    }
    if (l->wake_fd >= 0) {
        close(l->wake_fd);
        l->wake_fd = -1;
    }
    free(l->heap);
    l->heap = NULL;
    l->heap_len = l->heap_cap = 0;
    free(l->quiet);
    l->quiet = NULL;
    l->quiet_head = l->nquiet = l->quiet_cap = 0;
    free(l->scratch);
    l->scratch = NULL;
    l->scratch_used = 0;
    if (l->fork_mark) {
        munmap((void *)l->fork_mark, (size_t)sysconf(_SC_PAGESIZE));
        l->fork_mark = NULL;
    }
}

int ue_loop_rebuild(ue_loop *l)
{
    /* Unmapping and closing only drops this process's references; the
     * parent's ring is untouched. Ops in flight there are abandoned. */
    if (l->ring_fd >= 0)
        io_uring_queue_exit(&l->ring);
    if (l->wake_fd >= 0)
        close(l->wake_fd);
    l->ring_fd = -1;
    l->wake_fd = -1;
    l->inflight = 0;
    l->unsubmitted = 0;
    l->owner_tid = 0;
    l->wake_op.state = UE_OP_IDLE;
    l->quiet_head = l->nquiet = 0; /* abandoned with the rest */
    l->scratch_used = 0;
    l->quiet_probed = 0;
    atomic_store(&l->sleeping, 0);
    l->pid = getpid();
    if (l->fork_mark)
        *l->fork_mark = 1;
    int ret = ue__setup_ring(l, l->sq_size, l->cq_size);
    if (ret < 0) {
        l->failed_step = "io_uring_setup";
        return ret;
    }
    l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->wake_fd < 0) {
        l->failed_step = "eventfd";
        return -errno;
    }
    return 0;
}

int ue_probe_op(ue_loop *l, int opcode)
{
    struct io_uring_probe *p = io_uring_get_probe_ring(&l->ring);
    if (!p)
        return 0;
    int ok = io_uring_opcode_supported(p, opcode);
    io_uring_free_probe(p);
    return ok;
}

void ue_prep_recv_multishot(struct io_uring_sqe *sqe, int fd, const ue_bufring *b)
{
    io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = b->bgid;
}

void ue_prep_accept_multishot(struct io_uring_sqe *sqe, int fd)
{
    io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

void ue_prep_listen(struct io_uring_sqe *sqe, int fd, int shared)
{
    if (shared)
        io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    else
        ue_prep_accept_multishot(sqe, fd);
}

int ue_accept(int fd)
{
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); /* as the multishot accept */
        if (c >= 0)
            return c;
        if (errno != EINTR && errno != ECONNABORTED)
            return -errno;
    }
}

/* Bytes of the send scratch area: room for 60 sends of UE_SEND_IOV_MAX
 * buffers, or ~700 of two; when it is full, what is queued is submitted. */
#define UE_SCRATCH_SIZE (64 * 1024)

static struct msghdr *ue__scratch_take(ue_loop *l, unsigned niov)
{
    size_t want = sizeof(struct msghdr) + niov * sizeof(struct iovec); /* both 8-aligned */
    if (l->ring_fd < 0 || !(l->features & IORING_FEAT_SUBMIT_STABLE))
        return NULL;
    if (!l->scratch && !(l->scratch = malloc(UE_SCRATCH_SIZE)))
        return NULL;
    if (l->scratch_used + want > UE_SCRATCH_SIZE && io_uring_sq_ready(&l->ring) && l->enabled)
        (void)ue_submit(l); /* the kernel takes its copies of what is queued */
    if (io_uring_sq_ready(&l->ring) == 0)
        l->scratch_used = 0; /* no SQE points into the area any more */
    if (l->scratch_used + want > UE_SCRATCH_SIZE)
        return NULL;
    struct msghdr *msg = (struct msghdr *)(void *)(l->scratch + l->scratch_used);
    l->scratch_used += want;
    memset(msg, 0, sizeof *msg);
    msg->msg_iov = (struct iovec *)(msg + 1);
    msg->msg_iovlen = niov;
    return msg;
}

struct msghdr *ue_send_msg(ue_loop *l, int *n, ue_send_one *one)
{
    if (*n > UE_SEND_IOV_MAX)
        *n = UE_SEND_IOV_MAX;
    if (*n > 1) {
        struct msghdr *msg = ue__scratch_take(l, (unsigned)*n);
        if (msg)
            return msg;
    }
    *n = 1;
    memset(&one->msg, 0, sizeof one->msg);
    one->msg.msg_iov = &one->iov;
    one->msg.msg_iovlen = 1;
    return &one->msg;
}

void ue_prep_send_msg(struct io_uring_sqe *sqe, int fd, struct msghdr *msg, int flags)
{
    if (msg->msg_iovlen == 1) {
        struct iovec *iov = msg->msg_iov;
        io_uring_prep_send(sqe, fd, iov->iov_base, ue_io_len(iov->iov_len), flags);
        return;
    }
    io_uring_prep_sendmsg(sqe, fd, msg, (unsigned)flags);
}
