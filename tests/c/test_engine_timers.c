/* Timer heap: ordering by (when, seq), removal from any position. */
#include <math.h>
#include <string.h>

#include "ue.h"
#include "ue_test.h"

#define N 2000

static ue_loop loop;
static ue_timer timers[N];

static void check_heap_invariant(void)
{
    for (uint32_t i = 0; i < loop.heap_len; i++) {
        CHECK(loop.heap[i]->index == i);
        if (i) {
            ue_timer *parent = loop.heap[(i - 1) / 2], *child = loop.heap[i];
            CHECK(parent->when < child->when || (parent->when == child->when && parent->seq < child->seq));
        }
    }
}

static void test_pop_order(void)
{
    memset(&loop, 0, sizeof loop);
    srand(42);
    for (int i = 0; i < N; i++) {
        ue_timer_init(&timers[i]);
        REQUIRE(ue_timer_add(&loop, &timers[i], (double)(rand() % 100)) == 0);
    }
    check_heap_invariant();
    double last_when = -1;
    uint64_t last_seq = 0;
    int popped = 0;
    ue_timer *t;
    while ((t = ue_timer_first(&loop)) != NULL) {
        CHECK(t->when > last_when || (t->when == last_when && t->seq > last_seq));
        last_when = t->when;
        last_seq = t->seq;
        ue_timer_remove(&loop, t);
        CHECK(!ue_timer_scheduled(t));
        popped++;
    }
    CHECK(popped == N);
    free(loop.heap);
}

static void test_equal_deadlines_are_fifo(void)
{
    memset(&loop, 0, sizeof loop);
    for (int i = 0; i < 100; i++) {
        ue_timer_init(&timers[i]);
        ue_timer_add(&loop, &timers[i], 5.0);
    }
    for (int i = 0; i < 100; i++) {
        ue_timer *t = ue_timer_first(&loop);
        CHECK(t == &timers[i]);
        ue_timer_remove(&loop, t);
    }
    free(loop.heap);
}

static void test_remove_anywhere(void)
{
    memset(&loop, 0, sizeof loop);
    srand(7);
    for (int i = 0; i < N; i++) {
        ue_timer_init(&timers[i]);
        ue_timer_add(&loop, &timers[i], (double)rand() / RAND_MAX);
    }
    /* cancel every third timer, including twice (idempotent) */
    for (int i = 0; i < N; i += 3) {
        ue_timer_remove(&loop, &timers[i]);
        ue_timer_remove(&loop, &timers[i]);
        CHECK(!ue_timer_scheduled(&timers[i]));
    }
    check_heap_invariant();
    CHECK(loop.heap_len == N - (N + 2) / 3);
    /* re-adding reschedules */
    ue_timer_add(&loop, &timers[0], -1.0);
    CHECK(ue_timer_first(&loop) == &timers[0]);
    ue_timer_add(&loop, &timers[0], 1e9); /* moving a scheduled timer */
    CHECK(ue_timer_first(&loop) != &timers[0]);
    check_heap_invariant();
    free(loop.heap);
}

/* A NaN deadline compares false with everything: in the heap as it is, it
 * stuck at the top, never fell due, and held back every timer behind it
 * (call_later(float("nan")) hung the loop). It is due at once instead. */
static void test_nan_deadline_is_due_at_once(void)
{
    memset(&loop, 0, sizeof loop);
    for (int i = 0; i < 10; i++) {
        ue_timer_init(&timers[i]);
        ue_timer_add(&loop, &timers[i], i == 5 ? NAN : (double)i);
    }
    check_heap_invariant();
    CHECK(ue_timer_first(&loop) == &timers[5]);
    CHECK(ue_timer_first(&loop)->when < 0.0);
    ue_timer_remove(&loop, &timers[5]);
    for (int i = 0; i < 10; i++) {
        if (i == 5)
            continue;
        CHECK(ue_timer_first(&loop) == &timers[i]);
        ue_timer_remove(&loop, &timers[i]);
    }
    free(loop.heap);
}

int main(void)
{
    RUN(test_pop_order);
    RUN(test_equal_deadlines_are_fifo);
    RUN(test_remove_anywhere);
    RUN(test_nan_deadline_is_due_at_once);
    return TEST_EXIT();
}
