/* Cross-thread wakeup: a loop blocked in the kernel returns promptly when
 * another thread calls ue_wakeup(), and an awake loop costs the writer no
 * syscall. */
#define _GNU_SOURCE
#include <pthread.h>
#include <unistd.h>

#include "ue.h"
#include "ue_test.h"

static ue_loop loop;

static void *wake_later(void *arg)
{
    (void)arg;
    usleep(50 * 1000);
    ue_wakeup(&loop);
    return NULL;
}

static void test_wakeup_interrupts_infinite_wait(void)
{
    REQUIRE(ue_loop_init(&loop, 64, 256) == 0);
    REQUIRE(ue_loop_start(&loop) == 0);
    for (int round = 0; round < 20; round++) {
        pthread_t th;
        ue_wait_prepare(&loop, -1);
        pthread_create(&th, NULL, wake_later, NULL);
        double t0 = ue_now();
        /* Infinite wait; only the wakeup can end it. The wake CQE may need a
         * second enter to be posted, so loop until it is dispatched. */
        unsigned seen = 0;
        while (!seen && ue_now() - t0 < 5.0) {
            CHECK(ue_wait(&loop, 1.0) == 0);
            seen = ue_dispatch(&loop);
            ue_wait_prepare(&loop, -1);
        }
        double dt = ue_now() - t0;
        pthread_join(th, NULL);
        CHECK(seen >= 1);
        CHECK(dt < 1.0);
        atomic_store(&loop.sleeping, 0);
    }
    ue_loop_close(&loop);
}

static void test_awake_loop_skips_the_write(void)
{
    REQUIRE(ue_loop_init(&loop, 64, 256) == 0);
    REQUIRE(ue_loop_start(&loop) == 0);
    /* not sleeping: ue_wakeup must not touch the eventfd */
    ue_wakeup(&loop);
    uint64_t v;
    CHECK(read(loop.wake_fd, &v, sizeof v) < 0);
    /* sleeping: it writes once, and clears the flag */
    ue_wait_prepare(&loop, -1);
    ue_wakeup(&loop);
    CHECK(atomic_load(&loop.sleeping) == 0);
    CHECK(read(loop.wake_fd, &v, sizeof v) == sizeof v && v == 1);
    ue_loop_close(&loop);
}

int main(void)
{
    RUN(test_wakeup_interrupts_infinite_wait);
    RUN(test_awake_loop_skips_the_write);
    return TEST_EXIT();
}
