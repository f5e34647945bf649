/*
 * ue: the io_uring engine. Plain C, no Python.h.
 *
 * One ring per loop, owned by the thread that runs it. Work is expressed as
 * ops (struct ue_op) embedded in their owner's struct: an op's address is the
 * SQE user_data, and the op must stay alive until its final CQE (for a
 * multishot op, the first CQE without IORING_CQE_F_MORE). A 16-bit generation
 * packed into the high bits of user_data lets the engine drop CQEs that belong
 * to an earlier arming of the same op.
 *
 * Timers live in a binary min-heap ordered by (when, seq); the wait timeout of
 * each iteration is taken from its root, so no timeout SQEs are used.
 */
#ifndef UE_H
#define UE_H

#include <liburing.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Constants newer than liburing 2.3, detected at run time before use. */
#ifndef IORING_SETUP_NO_SQARRAY
#define IORING_SETUP_NO_SQARRAY (1U << 16)
#endif

typedef struct ue_loop ue_loop;
typedef struct ue_op ue_op;
typedef struct ue_timer ue_timer;

/* Called once per CQE of `op`. When `flags` lacks IORING_CQE_F_MORE this is
 * the op's final CQE: the op is idle again and may be re-armed or freed by
 * the callback. */
typedef void (*ue_op_cb)(ue_loop *loop, ue_op *op, int32_t res, uint32_t flags);

enum ue_op_state {
    UE_OP_IDLE = 0,
    UE_OP_INFLIGHT = 1,
    UE_OP_CANCELING = 2, /* a cancel was requested; the final CQE is pending */
};

struct ue_op {
    ue_op_cb cb;
    uint16_t gen;
    uint8_t state;
    uint8_t internal; /* not counted in loop->inflight (the wakeup poll) */
    uint8_t quiet;    /* armed by ue_op_arm_quiet and not settled yet */
};

/* A quiet op (ue_op_arm_quiet) awaiting its verdict: it posts no CQE when it
 * succeeds, so success is inferred once the kernel has consumed its SQE. */
typedef struct ue_quiet {
    ue_op *op;       /* an op has one entry at most; NULL once its CQE came */
    unsigned sq_pos; /* its SQE's place in the SQ (compared with the kernel's head) */
    int32_t res;     /* what its callback gets on success */
} ue_quiet;

struct ue_timer {
    double when;    /* CLOCK_MONOTONIC seconds, as loop.time() */
    uint64_t seq;   /* insertion order breaks ties: FIFO among equal `when` */
    uint32_t index; /* slot in the heap, UE_TIMER_UNSCHEDULED when out */
};
#define UE_TIMER_UNSCHEDULED UINT32_MAX

/* Which ring setup was accepted by the kernel (for diagnostics and tests). */
enum ue_mode {
    UE_MODE_DEFER_TASKRUN = 0, /* SINGLE_ISSUER | DEFER_TASKRUN */
    UE_MODE_COOP_TASKRUN = 1,
    UE_MODE_PLAIN = 2,
};

struct ue_loop {
    struct io_uring ring;
    int ring_fd; /* -1 when there is no ring */
    int enabled; /* ring enabled (it is created R_DISABLED) */
    enum ue_mode mode;
    unsigned features; /* io_uring_params.features */
    unsigned sq_size, cq_size;
    pid_t pid;                /* process that created the ring */
    volatile char *fork_mark; /* 1, read as 0 in a forked child (or NULL) */
    pid_t owner_tid;          /* thread that enabled the ring */

    /* cross-thread wakeup: an eventfd watched by a multishot poll */
    int wake_fd;
    ue_op wake_op;
    atomic_int sleeping;

    /* timers */
    ue_timer **heap;
    uint32_t heap_len, heap_cap;
    uint64_t timer_seq;

    uint32_t inflight;    /* ops between submission and final CQE */
    uint32_t buf_taken;   /* CQEs that took a provided buffer (ue_bufring) */
    unsigned unsubmitted; /* SQEs prepared since the last submit */

    /* quiet sends (ue_op_arm_quiet): whether this ring's kernel does what
     * they need (probed at start), and those not yet settled */
    int quiet_ok, quiet_probed, quiet_settling;
    ue_quiet *quiet;
    unsigned quiet_head, nquiet, quiet_cap; /* pending: quiet[quiet_head..nquiet) */

    /* the sends' msghdrs and iovecs until their SQEs are submitted
     * (ue_send_msg); allocated on first use */
    char *scratch;
    size_t scratch_used;

    const char *failed_step; /* which setup call failed, for error messages */
};

/* Setup and teardown. Return 0 or -errno. */
int ue_loop_init(ue_loop *l, unsigned sq_entries, unsigned cq_entries);
/* Enables the ring on the calling thread (once), arms the wakeup poll.
 * -EEXIST when another thread already owns it. */
int ue_loop_start(ue_loop *l);
/* Cancels every op still in flight and waits (bounded) for final CQEs. */
void ue_loop_cancel_all(ue_loop *l, int timeout_ms);
void ue_loop_close(ue_loop *l);
/* Forgets the current ring (its ops are abandoned and never complete) and
 * builds a fresh one: in a forked child, or when the loop moves to another
 * thread with nothing in flight. Timers are kept. */
int ue_loop_rebuild(ue_loop *l);
int ue_loop_forked(const ue_loop *l);
int ue_current_tid(void);

/* Ops. ue_sqe() never returns NULL while the ring is usable: when the SQ is
 * full and the ring is enabled it submits first; otherwise NULL (-EBUSY). */
struct io_uring_sqe *ue_sqe(ue_loop *l);
void ue_op_arm(ue_loop *l, ue_op *op, struct io_uring_sqe *sqe, ue_op_cb cb);
/* Quiet sends. A SEND or SENDMSG on a stream socket prepared with
 * MSG_DONTWAIT | MSG_WAITALL completes while it is submitted, inside the
 * enter that submits it: all of it sent, part of it (the kernel then fails
 * the request with the count sent), or nothing (-EAGAIN). Armed with
 * ue_op_arm_quiet() it also carries IOSQE_CQE_SKIP_SUCCESS, so only the last
 * two post a CQE; for the first, ue_dispatch() calls the op's callback with
 * `res_on_success` once the kernel has consumed the SQE. A send nobody waits
 * for then costs no CQE, and above all does not end the wait it was
 * submitted with: on one connection a round trip takes one enter, not two.
 * ue_quiet_reserve() says whether one may be armed now (the kernel was
 * probed for these semantics when the ring started; room to track it);
 * when it says no, arm a plain send. */
int ue_quiet_reserve(ue_loop *l);
void ue_op_arm_quiet(ue_loop *l, ue_op *op, struct io_uring_sqe *sqe, ue_op_cb cb, int32_t res_on_success);
#define UE_QUIET_SEND_FLAGS (MSG_DONTWAIT | MSG_WAITALL)
/* Requests cancellation of an in-flight op; the op's final CQE still comes. */
int ue_op_cancel(ue_loop *l, ue_op *op);
/* Cancels an in-flight op and returns once the kernel has let go of it,
 * the op's file reference included; its final CQE is left in the CQ for
 * ue_dispatch(). For a listening socket about to be closed: the close then
 * stops the listening at once without touching the socket itself, which
 * other processes may share. Submits what is queued first. */
int ue_op_cancel_sync(ue_loop *l, ue_op *op);
static inline int ue_op_busy(const ue_op *op)
{
    return op->state != UE_OP_IDLE;
}

/* The byte count of one read/recv/send/write SQE. sqe->len is 32 bits, and
 * the kernel moves at most MAX_RW_COUNT (INT_MAX rounded down to a page) per
 * call anyway; a larger buffer is clamped and the caller resumes after the
 * short transfer, as it does after any short send. */
#define UE_MAX_IO_LEN 0x7ffff000u
static inline unsigned ue_io_len(size_t n)
{
    return n > UE_MAX_IO_LEN ? UE_MAX_IO_LEN : (unsigned)n;
}

/* One iteration's kernel work: submit what is queued and wait for at least
 * one CQE or `timeout` seconds (<0: forever, 0: do not block). Returns 0,
 * -EINTR when a signal interrupted the wait, or another -errno.
 * ue_wait_prepare() must be called first, under the same lock that guards
 * the caller's ready queue, so a concurrent ue_wakeup() is never missed. */
void ue_wait_prepare(ue_loop *l, double timeout);
int ue_wait(ue_loop *l, double timeout);
int ue_submit(ue_loop *l);
/* Runs the callback of every available CQE, then settles the quiet ops the
 * kernel has consumed without a CQE; returns how many CQEs. */
unsigned ue_dispatch(ue_loop *l);
/* Thread-safe: makes a sleeping ue_wait() return. */
void ue_wakeup(ue_loop *l);

/* Timers. */
double ue_now(void);
int ue_timer_add(ue_loop *l, ue_timer *t, double when); /* a NaN when is due at once */
void ue_timer_remove(ue_loop *l, ue_timer *t);
static inline ue_timer *ue_timer_first(const ue_loop *l)
{
    return l->heap_len ? l->heap[0] : NULL;
}
static inline int ue_timer_scheduled(const ue_timer *t)
{
    return t->index != UE_TIMER_UNSCHEDULED;
}
static inline void ue_timer_init(ue_timer *t)
{
    t->index = UE_TIMER_UNSCHEDULED;
    t->when = 0;
    t->seq = 0;
}

/* Provided-buffer ring (ue_bufring.c): `nbufs` (a power of two) buffers of
 * `buf_size` bytes the kernel selects from (IOSQE_BUFFER_SELECT with
 * sqe->buf_group = bgid). A CQE with IORING_CQE_F_BUFFER names the buffer in
 * its flags; copy or parse out of it, then recycle it in the same batch.
 *
 * The kernel takes buffers in the order they were posted, so with every
 * buffer posted a recycled one is written again only after all the others:
 * always into memory that has left the cache. Only a window of them is
 * posted; the rest wait on a stack, and the most recently recycled go back
 * first. ue_bufring_refill() before each wait keeps `window` posted; the
 * window grows to twice the most buffers taken between two refills, and
 * doubles when a receive found the ring empty (ue_bufring_starved()). */
typedef struct ue_bufring {
    struct io_uring_buf_ring *br;
    char *bufs;
    size_t map_bytes;
    unsigned nbufs, buf_size;
    uint16_t bgid;
    int mask;
    ue_loop *loop;
    uint16_t *stack; /* recycled, not posted; the newest last */
    unsigned nstack;
    uint32_t posted;     /* buffers posted, in all */
    uint32_t taken_base; /* loop->buf_taken when the ring was set up */
    uint32_t taken_at_refill;
    unsigned window, busiest, refills;
} ue_bufring;

int ue_bufring_init(ue_loop *l, ue_bufring *b, uint16_t bgid, unsigned nbufs, unsigned buf_size);
void ue_bufring_recycle(ue_bufring *b, uint16_t bid);
void ue_bufring_refill(ue_bufring *b);
void ue_bufring_starved(ue_bufring *b);
void ue_bufring_free(ue_loop *l, ue_bufring *b);
static inline char *ue_bufring_buf(const ue_bufring *b, uint16_t bid)
{
    return b->bufs + (size_t)bid * b->buf_size;
}
static inline uint16_t ue_cqe_bid(uint32_t cqe_flags)
{
    return (uint16_t)(cqe_flags >> IORING_CQE_BUFFER_SHIFT);
}

/* Multishot receive into `b`'s buffers and multishot accept. Each CQE with
 * IORING_CQE_F_MORE keeps the op armed; -ENOBUFS (pool empty) or a CQE
 * without F_MORE ends it, and the owner re-arms. */
void ue_prep_recv_multishot(struct io_uring_sqe *sqe, int fd, const ue_bufring *b);
void ue_prep_accept_multishot(struct io_uring_sqe *sqe, int fd);
/* Waits for connections on a listening socket. Alone on it: a multishot
 * ACCEPT (each CQE's res is a new non-blocking fd). Shared with other
 * processes: a multishot POLL_ADD (res is the poll mask) and ue_accept()
 * in the callback. An accept is an exclusive waiter (the kernel wakes one
 * per connection, the first in the queue, busy or not); a poll is not, so
 * every process wakes and the least busy one accepts, as with epoll. */
void ue_prep_listen(struct io_uring_sqe *sqe, int fd, int shared);
/* accept4() of a non-blocking, close-on-exec socket, retried on EINTR and
 * ECONNABORTED: the new fd, or -errno (-EAGAIN: nothing is waiting). */
int ue_accept(int fd);
/* The msghdr of a send over `*n` buffers, for the caller to fill
 * msg_iov[0..*n) of. The kernel copies a SENDMSG's msghdr and iovec, and a
 * WRITEV's iovec, while it submits the SQE (IORING_FEAT_SUBMIT_STABLE), so
 * they need to last only until then: several buffers get room in the loop's
 * scratch area, shared by all its sockets and taken again once the SQ is
 * empty, and a connection keeps no iovec of its own. One buffer, or no room
 * (the kernel lacks SUBMIT_STABLE; no memory), gets the caller's `one` and
 * *n becomes 1. Call it right before ue_sqe() for the SQE that uses it. */
typedef struct ue_send_one {
    struct msghdr msg;
    struct iovec iov;
} ue_send_one;
#define UE_SEND_IOV_MAX 64 /* the most buffers one send takes */
struct msghdr *ue_send_msg(ue_loop *l, int *n, ue_send_one *one);
/* Sends msg's buffers: one as a plain SEND (the kernel then skips importing
 * a msghdr and an iovec array), several as a SENDMSG over `msg`. */
void ue_prep_send_msg(struct io_uring_sqe *sqe, int fd, struct msghdr *msg, int flags);

/* An epoll set the ring waits on (ue_epoll.c): what asyncio's add_reader and
 * add_writer need, which a POLL_ADD per fd cannot give (see there). The set
 * is made on first use; `op` waits on it once per arming, and its owner
 * arms it again after each completion. */
#define UE_EPOLL_EVENTS 128
typedef struct ue_epoll {
    int epfd;  /* -1 until first use */
    pid_t pid; /* process that made epfd */
    ue_op op;
    char probed, wait_op;                       /* IORING_OP_EPOLL_WAIT is there */
    struct epoll_event events[UE_EPOLL_EVENTS]; /* the kernel writes here */
} ue_epoll;

void ue_epoll_init(ue_epoll *e);
/* Moves fd from watching old_events to new_events (EPOLLIN/EPOLLOUT; 0 is
 * none): adds, modifies or deletes. An fd closed while registered and
 * reused since is added anew. 0 or -errno (-EPERM for a regular file). In a
 * child of fork(), call ue_epoll_own() first. */
int ue_epoll_set(ue_epoll *e, int fd, uint32_t old_events, uint32_t new_events);
/* Arms `op` (not in a forked child before its ring is rebuilt: the ring's
 * memory is still the parent's). */
int ue_epoll_arm(ue_loop *l, ue_epoll *e, ue_op_cb cb);
/* In the op's callback, with its CQE's res: how many of e->events are
 * ready fds (none when the wait was cancelled), or -errno. */
int ue_epoll_ready(ue_epoll *e, int32_t res);
/* In a child of fork() the set is still the parent's (ue_epoll_forked()):
 * ue_epoll_own() makes an empty one of the child's own, to which the owner
 * adds its fds again. 0 or -errno. */
int ue_epoll_forked(const ue_epoll *e);
int ue_epoll_own(ue_epoll *e);
void ue_epoll_close(ue_epoll *e);

/* Is an opcode supported by the running kernel? */
int ue_probe_op(ue_loop *l, int opcode);

#endif
