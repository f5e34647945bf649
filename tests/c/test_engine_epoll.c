/* The epoll set behind add_reader/add_writer: readiness through the ring,
 * level triggering, a closed fd leaving the set (and its peer seeing EOF),
 * regular files refused, a closed fd given first, a reused fd number, and a
 * forked child's own set. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ue.h"
#include "ue_test.h"

typedef struct {
    ue_epoll ep;
    int completions;
    int32_t last_res;
} probe_set;

/* 1: IORING_OP_EPOLL_WAIT where the kernel has it; 0: POLL_ADD + epoll_wait */
static int use_wait_op;

static void set_cb(ue_loop *l, ue_op *op, int32_t res, uint32_t flags)
{
    (void)l;
    (void)flags;
    probe_set *p = (probe_set *)((char *)op - offsetof(probe_set, ep.op));
    p->completions++;
    p->last_res = res;
}

static void setup(ue_loop *l, probe_set *p)
{
    REQUIRE(ue_loop_init(l, 64, 256) == 0);
    REQUIRE(ue_loop_start(l) == 0);
    memset(p, 0, sizeof *p);
    ue_epoll_init(&p->ep);
    if (!use_wait_op) {
        p->ep.probed = 1;
        p->ep.wait_op = 0;
    }
}

static void teardown(ue_loop *l, probe_set *p)
{
    ue_epoll_close(&p->ep);
    ue_loop_close(l);
}

/* The ready fds of the last completion. */
static int ready(probe_set *p)
{
    return ue_epoll_ready(&p->ep, p->last_res);
}

static void pair(int sv[2])
{
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
}

/* Arms the set's poll and runs the ring until it completes or `timeout`. */
static int wait_ready(ue_loop *l, probe_set *p, double timeout)
{
    int before = p->completions;
    REQUIRE(ue_epoll_arm(l, &p->ep, set_cb) == 0);
    double deadline = ue_now() + timeout;
    while (p->completions == before && ue_now() < deadline) {
        ue_wait(l, 0.02);
        ue_dispatch(l);
    }
    return p->completions > before;
}

/* Takes the set's poll back when it did not complete. */
static void disarm(ue_loop *l, probe_set *p)
{
    if (ue_op_busy(&p->ep.op)) {
        REQUIRE(ue_op_cancel(l, &p->ep.op) == 0);
        while (ue_op_busy(&p->ep.op)) {
            ue_wait(l, 0.02);
            ue_dispatch(l);
        }
    }
}

static void test_readiness_is_level_triggered(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    int sv[2];
    pair(sv);
    CHECK(ue_epoll_set(&p.ep, sv[0], 0, EPOLLIN) == 0);
    CHECK(!wait_ready(&l, &p, 0.1)); /* nothing to read yet */
    REQUIRE(write(sv[1], "ab", 2) == 2);
    CHECK(wait_ready(&l, &p, 2.0));
    struct epoll_event *ev = p.ep.events;
    CHECK(ready(&p) == 1 && ev[0].data.fd == sv[0] && (ev[0].events & EPOLLIN));
    /* unread data keeps the fd ready */
    CHECK(wait_ready(&l, &p, 2.0));
    char buf[4];
    CHECK(read(sv[0], buf, sizeof buf) == 2);
    /* drained: the poll on the set asks the fd again and does not fire */
    CHECK(!wait_ready(&l, &p, 0.1));
    disarm(&l, &p);
    /* writer too, then none */
    CHECK(ue_epoll_set(&p.ep, sv[0], EPOLLIN, EPOLLIN | EPOLLOUT) == 0);
    CHECK(wait_ready(&l, &p, 2.0));
    CHECK(ready(&p) == 1 && (ev[0].events & EPOLLOUT));
    CHECK(ue_epoll_set(&p.ep, sv[0], EPOLLIN | EPOLLOUT, 0) == 0);
    CHECK(!wait_ready(&l, &p, 0.1));
    disarm(&l, &p);
    close(sv[0]);
    close(sv[1]);
    teardown(&l, &p);
}

static void test_closed_fd_leaves_the_set(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    int sv[2];
    pair(sv);
    CHECK(ue_epoll_set(&p.ep, sv[0], 0, EPOLLIN) == 0);
    REQUIRE(ue_epoll_arm(&l, &p.ep, set_cb) == 0);
    ue_wait(&l, 0); /* the poll is in the kernel now */
    close(sv[0]);
    /* the peer sees the close at once: nothing holds the socket open */
    char c;
    CHECK(read(sv[1], &c, 1) == 0);
    disarm(&l, &p);
    /* removing it after the close is not an error */
    CHECK(ue_epoll_set(&p.ep, sv[0], EPOLLIN, 0) == 0);
    close(sv[1]);
    teardown(&l, &p);
}

static void test_regular_file_is_refused(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    char path[] = "/tmp/ue_epoll_XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    unlink(path);
    CHECK(ue_epoll_set(&p.ep, fd, 0, EPOLLIN) == -EPERM);
    CHECK(ue_epoll_set(&p.ep, -1, 0, EPOLLIN) == -EBADF);
    close(fd);
    teardown(&l, &p);
}

/* The set is made at the first add. A closed fd given first must be refused
 * as closed, not have its free number taken by the new set (which epoll_ctl()
 * would then refuse as watching itself, EINVAL). */
static void test_closed_fd_first_is_refused_as_closed(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    int sv[2];
    pair(sv);
    close(sv[0]);
    close(sv[1]);
    CHECK(p.ep.epfd < 0);
    CHECK(ue_epoll_set(&p.ep, sv[0], 0, EPOLLIN) == -EBADF);
    CHECK(p.ep.epfd < 0);
    pair(sv);
    CHECK(ue_epoll_set(&p.ep, sv[0], 0, EPOLLIN) == 0);
    CHECK(p.ep.epfd >= 0 && p.ep.epfd != sv[0]);
    CHECK(ue_epoll_set(&p.ep, sv[0], EPOLLIN, 0) == 0);
    close(sv[0]);
    close(sv[1]);
    teardown(&l, &p);
}

static void test_reused_fd_number_is_added_again(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    int a[2], b[2];
    pair(a);
    pair(b);
    int fd = a[0];
    CHECK(ue_epoll_set(&p.ep, fd, 0, EPOLLIN) == 0);
    close(a[0]);
    REQUIRE(dup2(b[0], fd) == fd); /* the old number, a new file */
    /* the caller still thinks fd is registered: same events again */
    CHECK(ue_epoll_set(&p.ep, fd, EPOLLIN, EPOLLIN) == 0);
    REQUIRE(write(b[1], "x", 1) == 1);
    CHECK(wait_ready(&l, &p, 2.0));
    CHECK(ready(&p) == 1 && p.ep.events[0].data.fd == fd);
    disarm(&l, &p);
    close(fd);
    close(a[1]);
    close(b[0]);
    close(b[1]);
    teardown(&l, &p);
}

static void test_forked_child_gets_its_own_set(void)
{
    ue_loop l;
    probe_set p;
    setup(&l, &p);
    int sv[2];
    pair(sv);
    CHECK(ue_epoll_set(&p.ep, sv[0], 0, EPOLLIN) == 0);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int ok = ue_epoll_forked(&p.ep) && ue_epoll_own(&p.ep) == 0 && !ue_epoll_forked(&p.ep);
        /* the child's removal must not reach the parent's set */
        ok = ok && ue_epoll_set(&p.ep, sv[0], EPOLLIN, 0) == 0;
        _exit(ok ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(!ue_epoll_forked(&p.ep));
    REQUIRE(write(sv[1], "p", 1) == 1);
    CHECK(wait_ready(&l, &p, 2.0));
    disarm(&l, &p);
    close(sv[0]);
    close(sv[1]);
    teardown(&l, &p);
}

int main(void)
{
    for (use_wait_op = 1; use_wait_op >= 0; use_wait_op--) {
        printf("-- %s\n", use_wait_op ? "IORING_OP_EPOLL_WAIT (where the kernel has it)" : "POLL_ADD and epoll_wait");
        RUN(test_readiness_is_level_triggered);
        RUN(test_closed_fd_leaves_the_set);
        RUN(test_regular_file_is_refused);
        RUN(test_closed_fd_first_is_refused_as_closed);
        RUN(test_reused_fd_number_is_added_again);
        RUN(test_forked_child_gets_its_own_set);
    }
    return TEST_EXIT();
}
