/*
 * Timer heap: a binary min-heap of ue_timer pointers ordered by (when, seq).
 * Each timer records its slot, so removal (cancel) is O(log n) instead of
 * leaving a cancelled entry behind as asyncio's heapq does.
 */
#include "ue.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

static inline int ue__timer_less(const ue_timer *a, const ue_timer *b)
{
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static inline void ue__heap_place(ue_loop *l, uint32_t i, ue_timer *t)
{
    l->heap[i] = t;
    t->index = i;
}

static void ue__sift_up(ue_loop *l, uint32_t i)
{
    ue_timer *t = l->heap[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!ue__timer_less(t, l->heap[parent]))
            break;
        ue__heap_place(l, i, l->heap[parent]);
        i = parent;
    }
    ue__heap_place(l, i, t);
}

static void ue__sift_down(ue_loop *l, uint32_t i)
{
    ue_timer *t = l->heap[i];
    for (;;) {
        uint32_t child = 2 * i + 1;
        if (child >= l->heap_len)
            break;
        if (child + 1 < l->heap_len && ue__timer_less(l->heap[child + 1], l->heap[child]))
            child++;
        if (!ue__timer_less(l->heap[child], t))
            break;
        ue__heap_place(l, i, l->heap[child]);
        i = child;
    }
    ue__heap_place(l, i, t);
}

int ue_timer_add(ue_loop *l, ue_timer *t, double when)
{
    if (ue_timer_scheduled(t))
        ue_timer_remove(l, t);
    if (l->heap_len == l->heap_cap) {
        uint32_t cap = l->heap_cap ? l->heap_cap * 2 : 64;
        ue_timer **heap = realloc(l->heap, cap * sizeof *heap);
        if (!heap)
            return -ENOMEM;
        l->heap = heap;
        l->heap_cap = cap;
    }
    /* NaN would compare false with everything: stuck at the top of the heap
     * it would never fall due and hold back every timer behind it. asyncio
     * runs a NaN timer once it reaches the top of its heap; here it is due
     * at once. */
    t->when = when != when ? -INFINITY : when;
    t->seq = ++l->timer_seq;
    l->heap[l->heap_len] = t;
    t->index = l->heap_len++;
    ue__sift_up(l, t->index);
    return 0;
}

void ue_timer_remove(ue_loop *l, ue_timer *t)
{
    uint32_t i = t->index;
    if (i == UE_TIMER_UNSCHEDULED || i >= l->heap_len || l->heap[i] != t)
        return;
    t->index = UE_TIMER_UNSCHEDULED;
    ue_timer *last = l->heap[--l->heap_len];
    if (i == l->heap_len)
        return;
    ue__heap_place(l, i, last);
    if (i > 0 && ue__timer_less(last, l->heap[(i - 1) / 2]))
        ue__sift_up(l, i);
    else
        ue__sift_down(l, i);
}
