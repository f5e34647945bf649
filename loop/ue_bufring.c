/*
 * Provided-buffer rings: one pool of equal buffers the kernel picks from
 * when a multishot recv has data, so an idle connection holds no buffer.
 * liburing 2.3 has no io_uring_setup_buf_ring(): the ring and the buffers
 * are mapped here (page-aligned, as the kernel requires) and registered with
 * io_uring_register_buf_ring().
 */
#include "ue.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

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
    b->br = mem;
    b->bufs = (char *)mem + ring_bytes;
    b->map_bytes = total;
    b->nbufs = nbufs;
    b->buf_size = buf_size;
    b->bgid = bgid;
    b->mask = io_uring_buf_ring_mask(nbufs);
    io_uring_buf_ring_init(b->br);
    for (unsigned i = 0; i < nbufs; i++)
        io_uring_buf_ring_add(b->br, ue_bufring_buf(b, (uint16_t)i), buf_size, (unsigned short)i, b->mask, (int)i);
    io_uring_buf_ring_advance(b->br, (int)nbufs);
    return 0;
}

void ue_bufring_recycle(ue_bufring *b, uint16_t bid)
{
    io_uring_buf_ring_add(b->br, ue_bufring_buf(b, bid), b->buf_size, bid, b->mask, 0);
    io_uring_buf_ring_advance(b->br, 1);
}

void ue_bufring_free(ue_loop *l, ue_bufring *b)
{
    if (!b->br)
        return;
    if (l->ring_fd >= 0 && !ue_loop_forked(l))
        io_uring_unregister_buf_ring(&l->ring, b->bgid);
    munmap(b->br, b->map_bytes);
    memset(b, 0, sizeof *b);
}
