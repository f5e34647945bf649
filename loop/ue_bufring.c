/*
 * Provided-buffer rings: one pool of equal buffers the kernel picks from
 * when a multishot recv has data, so an idle connection holds no buffer.
 * liburing 2.3 has no io_uring_setup_buf_ring(): the ring and the buffers
 * are mapped here (page-aligned, as the kernel requires) and registered with
 * io_uring_register_buf_ring().
 */
#include "ue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define UE_BUFRING_MIN_WINDOW 4u
#define UE_BUFRING_SHRINK_EVERY 1024u /* refills between looks at the window */

/* Buffers posted and not yet taken. Counting CQEs of the whole loop, a
 * second buffer group on it makes this low, never high: then more than the
 * window is posted, and no receive goes short. */
static unsigned ue__bufring_in_kernel(const ue_bufring *b)
{
    int32_t n = (int32_t)(b->posted - (b->loop->buf_taken - b->taken_base));
    return n < 0 ? 0 : (unsigned)n;
}

static void ue__bufring_post_from_stack(ue_bufring *b)
{
    unsigned want = b->window, have = ue__bufring_in_kernel(b);
    int n = 0;
    while (have + (unsigned)n < want && b->nstack) {
        uint16_t bid = b->stack[--b->nstack];
        io_uring_buf_ring_add(b->br, ue_bufring_buf(b, bid), b->buf_size, bid, b->mask, n++);
    }
    if (n) {
        io_uring_buf_ring_advance(b->br, n);
        b->posted += (uint32_t)n;
    }
}

int ue_bufring_init(ue_loop *l, ue_bufring *b, uint16_t bgid, unsigned nbufs, unsigned buf_size)
{
    memset(b, 0, sizeof *b);
    if (!nbufs || (nbufs & (nbufs - 1)) || nbufs > 32768)
        return -EINVAL;
    size_t ring_bytes = nbufs * sizeof(struct io_uring_buf);
    size_t total = ring_bytes + (size_t)nbufs * buf_size;
    void *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return -errno;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (unsigned long)(uintptr_t)mem;
    reg.ring_entries = nbufs;
    reg.bgid = bgid;
    int ret = io_uring_register_buf_ring(&l->ring, &reg, 0);
    if (ret < 0) {
        munmap(mem, total);
        return ret;
    }
    b->stack = malloc(nbufs * sizeof *b->stack);
    if (!b->stack) {
        io_uring_unregister_buf_ring(&l->ring, bgid);
        munmap(mem, total);
        return -ENOMEM;
    }
    b->br = mem;
    b->bufs = (char *)mem + ring_bytes;
    b->map_bytes = total;
    b->nbufs = nbufs;
    b->buf_size = buf_size;
    b->bgid = bgid;
    b->mask = io_uring_buf_ring_mask(nbufs);
    b->loop = l;
    b->taken_base = b->taken_at_refill = l->buf_taken;
    b->window = nbufs < UE_BUFRING_MIN_WINDOW ? nbufs : UE_BUFRING_MIN_WINDOW;
    io_uring_buf_ring_init(b->br);
    /* buffer 0 is posted first, and the low ones are on top of the stack */
    for (unsigned i = 0; i < nbufs; i++)
        b->stack[b->nstack++] = (uint16_t)(nbufs - 1 - i);
    ue__bufring_post_from_stack(b);
    return 0;
}

void ue_bufring_recycle(ue_bufring *b, uint16_t bid)
{
    if (ue__bufring_in_kernel(b) < b->window) {
        io_uring_buf_ring_add(b->br, ue_bufring_buf(b, bid), b->buf_size, bid, b->mask, 0);
        io_uring_buf_ring_advance(b->br, 1);
        b->posted++;
    } else {
        b->stack[b->nstack++] = bid;
    }
}

void ue_bufring_refill(ue_bufring *b)
{
    if (!b->br)
        return;
    unsigned took = b->loop->buf_taken - b->taken_at_refill;
    b->taken_at_refill = b->loop->buf_taken;
    if (took > b->busiest)
        b->busiest = took;
    while (b->window < 2 * took && b->window < b->nbufs)
        b->window *= 2;
    if (++b->refills == UE_BUFRING_SHRINK_EVERY) {
        if (4 * b->busiest < b->window && b->window > UE_BUFRING_MIN_WINDOW)
            b->window /= 2;
        b->busiest = b->refills = 0;
    }
    ue__bufring_post_from_stack(b);
}

void ue_bufring_starved(ue_bufring *b)
{
    if (!b->br)
        return; /* a late CQE of a pool since freed */
    b->window = 2 * b->window < b->nbufs ? 2 * b->window : b->nbufs;
    ue__bufring_post_from_stack(b);
}

void ue_bufring_free(ue_loop *l, ue_bufring *b)
{
    if (!b->br)
        return;
    if (l->ring_fd >= 0 && !ue_loop_forked(l))
        io_uring_unregister_buf_ring(&l->ring, b->bgid);
    munmap(b->br, b->map_bytes);
    free(b->stack);
    memset(b, 0, sizeof *b);
}
