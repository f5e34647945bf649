/*
 * An epoll set the ring waits on, for asyncio's add_reader/add_writer.
 *
 * Why not one io_uring POLL_ADD per fd: a request in flight holds a
 * reference to its file. A socket the program closed while its reader was
 * still registered would then stay open, its peer never seeing the FIN,
 * until remove_reader() came, if ever; and a regular file would poll ready
 * forever where asyncio's epoll refuses it with EPERM. An epoll set holds
 * no reference (a file leaves the set when its last fd is closed), refuses
 * what epoll cannot watch, and is level-triggered as asyncio's readers are.
 *
 * The ring waits on the set with one one-shot request, armed by the owner
 * again after each completion: IORING_OP_EPOLL_WAIT where the kernel has it
 * (Linux 6.15), whose CQE comes with the events already in `events`; else a
 * POLL_ADD on the epoll fd and an epoll_wait() that does not block. Either
 * way the kernel asks every item on the ready list again before it reports
 * or waits, so an fd its callback has drained does not wake us.
 */
#include "ue.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

void ue_epoll_init(ue_epoll *e)
{
    memset(e, 0, sizeof *e);
    e->epfd = -1;
}

static int ue__epoll_open(ue_epoll *e)
{
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0)
        return -errno;
    e->pid = getpid();
    return 0;
}

/* A child of fork() shares the parent's epoll set: changing it would change
 * the parent's. The child makes a new, empty set instead, and its owner adds
 * its registrations to it again. */
int ue_epoll_own(ue_epoll *e)
{
    if (e->epfd < 0 || e->pid == getpid())
        return 0;
    close(e->epfd);
    e->epfd = -1;
    return ue__epoll_open(e);
}

int ue_epoll_forked(const ue_epoll *e)
{
    return e->epfd >= 0 && e->pid != getpid();
}

int ue_epoll_set(ue_epoll *e, int fd, uint32_t old_events, uint32_t new_events)
{
    if (!new_events && e->epfd < 0)
        return 0; /* nothing was ever added */
    if (e->epfd < 0) {
        /* A closed fd's number would go to the new set, and epoll_ctl()
         * would then refuse the set as its own member (EINVAL): refuse it
         * as closed first, as an existing set would (EBADF). */
        if (fcntl(fd, F_GETFD) < 0)
            return -errno;
        int ret = ue__epoll_open(e);
        if (ret < 0)
            return ret;
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = new_events;
    ev.data.fd = fd;
    if (!new_events) {
        /* A closed fd has left the set already: nothing to undo. */
        return epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 && errno != ENOENT && errno != EBADF ? -errno : 0;
    }
    if (!old_events) {
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == 0)
            return 0;
        if (errno != EEXIST)
            return -errno;
        /* added again after a fork renewed the set: fall through to MOD */
    }
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev) == 0)
        return 0;
    /* The fd was closed while registered and its number reused since: the
     * new file is not in the set yet. */
    if (errno == ENOENT && epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == 0)
        return 0;
    return -errno;
}

/* Not in liburing 2.3's headers; probed on the ring before use. */
#define UE_IORING_OP_EPOLL_WAIT 59

int ue_epoll_arm(ue_loop *l, ue_epoll *e, ue_op_cb cb)
{
    if (ue_op_busy(&e->op))
        return 0;
    if (e->epfd < 0)
        return -EBADF; /* nothing was ever added */
    if (!e->probed) {
        e->wait_op = ue_probe_op(l, UE_IORING_OP_EPOLL_WAIT);
        e->probed = 1;
    }
    struct io_uring_sqe *sqe = ue_sqe(l);
    if (!sqe)
        return -EBUSY;
    if (e->wait_op)
        io_uring_prep_rw(UE_IORING_OP_EPOLL_WAIT, sqe, e->epfd, e->events, UE_EPOLL_EVENTS, 0);
    else
        io_uring_prep_poll_add(sqe, e->epfd, POLLIN);
    ue_op_arm(l, &e->op, sqe, cb);
    return 0;
}

int ue_epoll_ready(ue_epoll *e, int32_t res)
{
    if (e->wait_op)
        return res;
    if (res < 0)
        return res;
    int n;
    do
        n = epoll_wait(e->epfd, e->events, UE_EPOLL_EVENTS, 0);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

void ue_epoll_close(ue_epoll *e)
{
    if (e->epfd >= 0)
        close(e->epfd);
    e->epfd = -1;
}
