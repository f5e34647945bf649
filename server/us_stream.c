/*
 * StreamTransport: asyncio's Transport for TCP and Unix stream sockets, and
 * for pipes (connect_read_pipe/connect_write_pipe, subprocess stdio), on
 * io_uring.
 *
 * Pipes differ in three places: reads are buffer-select READs re-armed after
 * each completion (recv is for sockets only), writes are WRITEV, and a write
 * pipe watches its own fd with a poll that fires when the reading end goes
 * away (asyncio watches it for readability the same way).
 *
 * Reading is one multishot recv drawing from the loop's provided-buffer ring:
 * each completion is copied into a bytes object and its buffer recycled in
 * the same batch; the transport then joins the ready queue and hands what
 * arrived to the protocol there, as asyncio's reader callbacks do.
 * Large messages switch a socket to bulk mode (see US_BULK_ENTER): readiness
 * from a multishot io_uring poll, and recv() into the bytes object at
 * delivery.
 * pause_reading() cancels the recv (bytes that complete before the cancel are
 * kept and delivered after resume_reading()).
 *
 * Writing never blocks: write() queues the object (bytes are shared, other
 * buffers copied once), and at the start of the next iteration everything a
 * socket queued goes out in one send (a sendmsg with an iovec when there are
 * several chunks); one send in flight per socket, short sends resumed where
 * the kernel stopped.
 *
 * Closing cancels the socket's ops and waits for their final CQEs before the
 * socket is closed and connection_lost() runs (exactly once), so the peer
 * always sees FIN or RST.
 */
#include "us.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <structmember.h>

enum { US_STREAM_SOCKET = 0, US_STREAM_READ_PIPE = 1, US_STREAM_WRITE_PIPE = 2 };
#define US_CONNLOST_WARN 5 /* asyncio's LOG_THRESHOLD_FOR_CONNLOST_WRITES */

/* An IP socket's address as getsockname() gives it (family AF_UNSPEC:
 * none, the call failed). */
typedef union us_inaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
} us_inaddr;

typedef struct us_stream {
    PyObject_HEAD
        /* The instance layout of asyncio.transports._FlowControlMixin (its
         * __slots__, which CPython sorts by name), so that this C type can
         * derive from it: asyncio checks isinstance(t, asyncio.Transport), and
         * its sendfile fallback wants a _FlowControlMixin. Checked at import
         * (us_stream_bases); the Python-visible slots mirror the C state. */
        PyObject *extra;      /* BaseTransport._extra */
    PyObject *high_water_obj; /* _FlowControlMixin._high_water */
    us_loop *loop;            /* _FlowControlMixin._loop */
    PyObject *low_water_obj;  /* _FlowControlMixin._low_water */
    PyObject *paused_obj;     /* _FlowControlMixin._protocol_paused */

    PyObject *sock;
    PyObject *protocol;
    PyObject *server;
    /* A TCP transport's get_extra_info() without a dict (see
     * stream_take_addresses): `extra` stays NULL until something reads
     * _extra, and the answers come from these. */
    us_inaddr sockname, peername;
    /* Each made once, when first asked for, so that every answer is the
     * same object (asyncio's come from its dict). */
    PyObject *sockname_obj, *peername_obj;
    PyObject *tsock; /* the TransportSocket */
    int fd;
    int kind;      /* US_STREAM_SOCKET, US_STREAM_READ_PIPE, US_STREAM_WRITE_PIPE */
    ue_op recv_op; /* recv or read; for a write pipe, the hang-up poll */
    ue_op send_op;

    /* inbound: received, not yet handed to the protocol */
    PyObject *inbound; /* list of bytes */
    /* provided buffers received this iteration, copied out together at
     * delivery into one bytes object of the exact size (one copy, one
     * allocation, however many completions a message took) */
#define US_HELD_MAX 8
    uint16_t held_bid[US_HELD_MAX];
    int32_t held_len[US_HELD_MAX];
    int nheld;
    unsigned held_gen;
    PyObject *in_error;
    char in_eof;
    /* bulk mode (see US_BULK_ENTER): readiness, then recv at delivery */
    char bulk;
    char bulk_ready; /* the socket polled readable and was not read since */
    char bulk_hup;   /* the poll saw the peer's EOF (or an error): read to the end */

    /* outbound */
    PyObject **wq;
    int wq_head, wq_len, wq_cap;
    size_t wq_off; /* bytes of wq[head] already sent */
    Py_ssize_t wbuf;
    Py_ssize_t high, low;

    int conn_lost;
    PyObject *lost_exc;
    PyObject *empty_waiter; /* loop.sendfile(): resolved when writes drain */
    char buffered;          /* 1 a BufferedProtocol, US_PROTO_SSL uringloop's SSLProtocol (fed without get_buffer) */
    char closing, read_paused, protocol_paused;
    char eof_requested, eof_sent, queued_flush, flush_reserved;
    char deferred;    /* a large write waits for the flush's quiet send (stream_may_defer) */
    int queued_ready; /* entries of this stream in the ready queue (at most 2) */
    char lost_pending, lost_ready, lost_done;
    PyObject *context;      /* see stream_enter_context() */
    PyObject *lost_context; /* where close()/abort() was called from outside the callbacks */
    char in_context;
    PyObject *weakreflist;
    PyObject *dict; /* instance attributes: tests and tools patch transports */
} us_stream;

/* The protocol's callbacks from the loop (data_received, eof_received,
 * get_buffer/buffer_updated, resume_writing, connection_lost) run in a copy
 * of the context the transport was made in: asyncio's reader and writer
 * handles capture it that way, so a contextvar set before
 * create_connection() or create_server() is seen there. connection_lost()
 * after a close() or abort() called from elsewhere runs where that call
 * was made, as asyncio schedules it with call_soon() there (uvloop uses the
 * transport's context for it too). Returns 1 if entered (undo with
 * stream_exit_context), 0 if already in one, -1 on error. */
static int stream_enter_context(us_stream *s, PyObject *ctx)
{
    if (s->in_context)
        return 0;
    if (PyContext_Enter(ctx) < 0)
        return -1;
    s->in_context = 1;
    return 1;
}

static void stream_exit_context(us_stream *s, PyObject *ctx, int entered)
{
    if (entered != 1)
        return;
    s->in_context = 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (PyContext_Exit(ctx) < 0) /* a callback left a context of its own entered */
        PyErr_WriteUnraisable((PyObject *)s);
    PyErr_Restore(et, ev, tb);
}

/* close() and abort() from outside the protocol's callbacks note where they
 * were called from, for connection_lost(). */
static int stream_note_closer(us_stream *s)
{
    if (s->in_context || s->lost_context)
        return 0;
    s->lost_context = PyContext_CopyCurrent();
    return s->lost_context ? 0 : -1;
}

/* ---- scheduling helpers ---- */

static void stream_push_ready(us_stream *s)
{
    s->queued_ready++;
    if (us_ready_push(s->loop, Py_NewRef(s)) < 0) {
        s->queued_ready--;
        PyErr_WriteUnraisable((PyObject *)s);
    }
}

static void stream_schedule_ready(us_stream *s)
{
    if (!s->queued_ready)
        stream_push_ready(s);
}

/* connection_lost() gets an entry of its own at the end of the ready queue,
 * queued when the transport is closed, as asyncio's call_soon() queues it:
 * an entry queued earlier (a bulk read queues the next one before its
 * protocol runs) would call it before callbacks scheduled in between, such
 * as the wake-up of a task that data_received() resolved (StreamReader then
 * misses the exception); one queued later, once the cancelled ops have
 * completed, would run after callbacks scheduled after close(), which may
 * rely on the socket being closed by then (a task that aborts a transport,
 * yields once, then blocks on the peer seeing the FIN). The cancels are
 * submitted by the enter that precedes the entry's turn and complete there;
 * if an op is still in flight then, the entry gives way and is queued again
 * when the op's last completion arrives. */
static void stream_queue_lost(us_stream *s)
{
    if (!s->lost_ready) {
        s->lost_ready = 1;
        stream_push_ready(s);
    }
}

static void stream_check_lost(us_stream *s)
{
    if (s->lost_pending)
        stream_queue_lost(s);
}

static int stream_ops_busy(us_stream *s)
{
    return ue_op_busy(&s->recv_op) || ue_op_busy(&s->send_op);
}

/* Resolves the sendfile waiter once nothing is left to send, or fails it
 * when the connection is gone. */
static void stream_settle_empty_waiter(us_stream *s, int failed)
{
    PyObject *w = s->empty_waiter;
    if (!w || (!failed && (s->wq_len || ue_op_busy(&s->send_op))))
        return;
    PyObject *r = PyObject_CallMethod(w, "done", NULL);
    int done = r ? PyObject_IsTrue(r) : -1;
    Py_XDECREF(r);
    if (done == 0) {
        PyObject *exc = failed ? PyObject_CallFunction(PyExc_ConnectionError, "s", "Connection is closed by peer")
                               : Py_NewRef(Py_None);
        r = exc ? PyObject_CallMethod(w, failed ? "set_exception" : "set_result", "O", exc) : NULL;
        Py_XDECREF(exc);
        Py_XDECREF(r);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)s);
}

static void stream_release_held(us_stream *s, int keep);

/* asyncio's _force_close: drop queued writes, stop everything, and call
 * connection_lost(exc) once the ops have finished. */
static void stream_force_close(us_stream *s, PyObject *exc)
{
    if (s->conn_lost)
        return;
    while (s->wq_len) {
        Py_DECREF(s->wq[s->wq_head]);
        s->wq_head = (s->wq_head + 1) % s->wq_cap;
        s->wq_len--;
    }
    s->wq_off = 0;
    s->wbuf = 0;
    stream_release_held(s, 0);
    s->closing = 1;
    s->conn_lost++;
    s->lost_pending = 1;
    Py_XSETREF(s->lost_exc, Py_XNewRef(exc));
    stream_settle_empty_waiter(s, 1);
    if (s->loop->ue_ready) {
        ue_op_cancel(&s->loop->ue, &s->recv_op);
        ue_op_cancel(&s->loop->ue, &s->send_op);
    }
    stream_check_lost(s);
}

/* asyncio's _fatal_error: OSErrors are only logged in debug mode (a reset
 * peer is not the application's bug), anything else goes to the handler. */
/* loop.call_exception_handler() with asyncio's keys for a transport. */
static void stream_report(us_stream *s, PyObject *message, PyObject *exc)
{
    PyObject *ctx = message ? Py_BuildValue("{s:O,s:O,s:O,s:O}", "message", message, "exception", exc, "transport",
                                            (PyObject *)s, "protocol", s->protocol ? s->protocol : Py_None)
                            : NULL;
    PyObject *r = ctx ? PyObject_CallMethod((PyObject *)s->loop, "call_exception_handler", "O", ctx) : NULL;
    Py_XDECREF(ctx);
    if (!r)
        PyErr_WriteUnraisable((PyObject *)s);
    Py_XDECREF(r);
}

static void stream_fatal_error(us_stream *s, PyObject *exc, const char *message)
{
    if (!PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_OSError)) {
        PyObject *msg = PyUnicode_FromString(message);
        stream_report(s, msg, exc);
        Py_XDECREF(msg);
    }
    stream_force_close(s, exc);
}

/* Handles a failed protocol callback: SystemExit/KeyboardInterrupt propagate
 * (-1), anything else is a fatal error of this transport (0). */
static int stream_callback_failed(us_stream *s, const char *message)
{
    if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return -1;
    PyObject *ev = us_take_exception();
    stream_fatal_error(s, ev ? ev : Py_None, message);
    Py_XDECREF(ev);
    return 0;
}

/* ---- reading ---- */

static void stream_fail_reading(us_stream *s);
static int stream_arm_recv(us_stream *s);
static void stream_recv_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);
static void stream_hangup_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

/*
 * Bulk mode. The shared provided-buffer ring suits many connections with
 * small messages: no memory per idle socket, no SQE per read. Large messages
 * pay for it: the kernel copies a whole batch of them into the ring's cold
 * buffers (256 of 64 KiB, a 16 MiB cycle through the cache) before the
 * first is handed to its protocol, and each is then copied again into a
 * bytes object. So once one read brings US_BULK_ENTER bytes or more, the
 * multishot recv is cancelled and the socket is read the readiness way:
 * a multishot io_uring poll says it is readable (armed once, so a message
 * costs no SQE and an iteration with nothing else to submit no syscall),
 * and the transport reads it when its
 * turn to deliver comes, with recv() straight into the bytes object it
 * hands over (one copy, into memory the allocator has just handed back
 * warm, then processed while still in cache). A read of less than
 * US_BULK_EXIT returns the socket to the ring.
 */
#define US_BULK_ENTER (32 * 1024)
#define US_BULK_EXIT (4 * 1024)
/* under glibc's initial mmap threshold (128 KiB; the module raises it at
 * import), so that the buffer comes from the heap and shrinking it to what
 * was read is a split, not mremap */
#define US_BULK_READ (120 * 1024)

/* A bulk-mode socket keeps one multishot poll armed: each time data
 * arrives it marks the socket readable, and nothing is re-armed per
 * message (an iteration with nothing else to submit then makes no
 * syscall). The poll is edge-triggered: data and the peer's FIN that arrive
 * together give one completion, whose mask says RDHUP; the reads that
 * follow then go on until recv() finds the end (see stream_bulk_read). */
static void stream_bulk_poll_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    us_stream *s = US_CONTAINER(op, us_stream, recv_op);
    if (res >= 0 && !s->closing) {
        if (res & (POLLRDHUP | POLLHUP | POLLERR))
            s->bulk_hup = 1;
        s->bulk_ready = 1;
        stream_schedule_ready(s);
    } else if (res < 0 && res != -ECANCELED && !s->closing) {
        Py_XSETREF(s->in_error, us_oserror_from_res(res));
        stream_schedule_ready(s);
    }
    if (flags & IORING_CQE_F_MORE)
        return;
    s->loop->sockops_inflight--;
    /* Cancelled on leaving bulk mode, or ended by the kernel: read on. */
    if (stream_arm_recv(s) < 0)
        PyErr_WriteUnraisable((PyObject *)s);
    stream_check_lost(s);
    Py_DECREF(s); /* the in-flight reference */
}

/* inbound is made when the first chunk has to wait in it: what arrives in
 * one iteration is held in the ring's buffers and handed over from them
 * (stream_recv_cb, stream_deliver), so most transports never need it, and
 * an idle one saves the list. */
static Py_ssize_t stream_inbound_len(us_stream *s)
{
    return s->inbound ? PyList_GET_SIZE(s->inbound) : 0;
}

static int stream_inbound_insert(us_stream *s, Py_ssize_t where, PyObject *data)
{
    if (!s->inbound && !(s->inbound = PyList_New(0)))
        return -1;
    return where < 0 ? PyList_Append(s->inbound, data) : PyList_Insert(s->inbound, where, data);
}

/* Reads what a readable socket in bulk mode holds, at delivery. */
static void stream_bulk_read(us_stream *s)
{
    s->bulk_ready = 0;
    PyObject *data = PyBytes_FromStringAndSize(NULL, US_BULK_READ);
    if (!data) {
        stream_fail_reading(s);
        return;
    }
    ssize_t n = recv(s->fd, PyBytes_AS_STRING(data), US_BULK_READ, MSG_DONTWAIT);
    if (n > 0) {
        if (n < US_BULK_READ && _PyBytes_Resize(&data, n) < 0)
            stream_fail_reading(s); /* data is gone with the failure */
        else if (stream_inbound_insert(s, -1, data) < 0)
            stream_fail_reading(s);
        if (n == US_BULK_READ || s->bulk_hup) {
            /* maybe more, or the EOF behind this data: the poll fires on
             * arrivals only */
            s->bulk_ready = 1;
            stream_schedule_ready(s);
        } else if (n < US_BULK_EXIT)
            s->bulk = 0; /* small messages again: back to the shared ring */
    } else if (n == 0) {
        s->in_eof = 1;
    } else if (errno != EAGAIN && errno != EINTR) {
        Py_XSETREF(s->in_error, us_oserror_from_res(-errno));
    }
    Py_XDECREF(data);
    if (!s->bulk || s->in_eof || s->in_error) {
        if (ue_op_busy(&s->recv_op))
            ue_op_cancel(&s->loop->ue, &s->recv_op); /* its last CQE re-arms */
    } else if (stream_arm_recv(s) < 0) {
        PyErr_WriteUnraisable((PyObject *)s);
    }
}

static int stream_arm_recv(us_stream *s)
{
    us_loop *loop = s->loop;
    /* loop->closing: the loop's close cancels every op, and a final CQE
     * must not arm a new one behind that cancel */
    if (ue_op_busy(&s->recv_op) || s->read_paused || s->closing || s->in_eof || s->in_error || loop->closing)
        return 0;
    /* bulk-mode sockets and write pipes poll; the rest read from the ring */
    int polls = s->bulk || s->kind == US_STREAM_WRITE_PIPE;
    ue_bufring *pool = polls ? NULL : us_loop_recv_pool(loop);
    if (!polls && !pool)
        return -1;
    struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    ue_op_cb cb = stream_recv_cb;
    if (s->bulk) {
        io_uring_prep_poll_multishot(sqe, s->fd, POLLIN | POLLRDHUP);
        cb = stream_bulk_poll_cb;
    } else if (polls) {
        io_uring_prep_poll_add(sqe, s->fd, POLLIN);
        cb = stream_hangup_cb;
    } else if (s->kind == US_STREAM_SOCKET) {
        ue_prep_recv_multishot(sqe, s->fd, pool);
    } else {
        io_uring_prep_read(sqe, s->fd, NULL, pool->buf_size, (uint64_t)-1);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = pool->bgid;
    }
    ue_op_arm(&loop->ue, &s->recv_op, sqe, cb);
    loop->sockops_inflight++;
    Py_INCREF(s);
    return 0;
}

#define US_MERGE_MAX (256 * 1024)

/* Appends to the last undelivered chunk when this transport holds the only
 * reference to it, so that what arrives between two deliveries reaches the
 * protocol as one data_received() call. Returns 1 when merged. */
static int stream_merge_inbound(us_stream *s, const char *data, int32_t n)
{
    Py_ssize_t count = stream_inbound_len(s);
    if (!count)
        return 0;
    PyObject **slot = &((PyListObject *)s->inbound)->ob_item[count - 1];
    Py_ssize_t old = PyBytes_GET_SIZE(*slot);
    if (Py_REFCNT(*slot) != 1 || !PyBytes_CheckExact(*slot) || old + n > US_MERGE_MAX)
        return 0;
    if (_PyBytes_Resize(slot, old + n) < 0) {
        PyErr_Clear();
        *slot = PyBytes_FromStringAndSize(NULL, 0); /* the old chunk is gone with the failure */
        return 0;
    }
    memcpy(PyBytes_AS_STRING(*slot) + old, data, (size_t)n);
    return 1;
}

/* Out of memory while taking data in: the connection ends with that error
 * once what came before it is delivered. */
static void stream_fail_reading(us_stream *s)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    Py_XSETREF(s->in_error, ev);
    Py_XDECREF(et);
    Py_XDECREF(tb);
}

/* Whether the held buffers are still the ring's (not remade under them). */
static int stream_held_valid(us_stream *s)
{
    us_loop *loop = s->loop;
    return loop && loop->recv_pool_ready && loop->recv_pool_gen == s->held_gen;
}

/* The held buffers' bytes, copied into one object; the buffers go back to
 * the ring. NULL when there were none (or the ring was remade under
 * them), or when the copy failed: reading has then failed with it. */
static PyObject *stream_take_held(us_stream *s)
{
    us_loop *loop = s->loop;
    int n = s->nheld;
    s->nheld = 0;
    if (!n || !stream_held_valid(s))
        return NULL;
    Py_ssize_t total = 0;
    for (int i = 0; i < n; i++)
        total += s->held_len[i];
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    char *p = data ? PyBytes_AS_STRING(data) : NULL;
    for (int i = 0; i < n; i++) {
        if (p) {
            memcpy(p, ue_bufring_buf(&loop->recv_pool, s->held_bid[i]), (size_t)s->held_len[i]);
            p += s->held_len[i];
        }
        ue_bufring_recycle(&loop->recv_pool, s->held_bid[i]);
    }
    if (!data)
        stream_fail_reading(s);
    return data;
}

/* Returns the held buffers to the ring, their bytes appended to inbound
 * when `keep`. */
static void stream_release_held(us_stream *s, int keep)
{
    if (!s->nheld)
        return;
    if (!keep) {
        if (stream_held_valid(s))
            for (int i = 0; i < s->nheld; i++)
                ue_bufring_recycle(&s->loop->recv_pool, s->held_bid[i]);
        s->nheld = 0;
        return;
    }
    PyObject *data = stream_take_held(s);
    if (data && stream_inbound_insert(s, -1, data) < 0)
        stream_fail_reading(s);
    Py_XDECREF(data);
}

static void stream_recv_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    us_stream *s = US_CONTAINER(op, us_stream, recv_op);
    us_loop *loop = s->loop;
    if (res > 0 && (flags & IORING_CQE_F_BUFFER) && !s->closing && !stream_inbound_len(s) &&
        (s->nheld == 0 || s->held_gen == loop->recv_pool_gen)) {
        /* held until delivery, later this iteration */
        if (s->nheld == US_HELD_MAX)
            stream_release_held(s, 1);
        s->held_gen = loop->recv_pool_gen;
        s->held_bid[s->nheld] = ue_cqe_bid(flags);
        s->held_len[s->nheld] = res;
        s->nheld++;
        stream_schedule_ready(s);
    } else if (res > 0 && (flags & IORING_CQE_F_BUFFER)) {
        ue_bufring *pool = &loop->recv_pool;
        uint16_t bid = ue_cqe_bid(flags);
        stream_release_held(s, !s->closing);
        if (!s->closing && stream_merge_inbound(s, ue_bufring_buf(pool, bid), res)) {
            stream_schedule_ready(s);
        } else if (!s->closing) {
            PyObject *data = PyBytes_FromStringAndSize(ue_bufring_buf(pool, bid), res);
            if (!data || stream_inbound_insert(s, -1, data) < 0)
                stream_fail_reading(s);
            Py_XDECREF(data);
            stream_schedule_ready(s);
        }
        ue_bufring_recycle(pool, bid);
    } else if (res == 0) {
        /* A pipe READ that finds EOF still takes a buffer (the CQE says
         * which); a socket recv does not. */
        if (flags & IORING_CQE_F_BUFFER)
            ue_bufring_recycle(&loop->recv_pool, ue_cqe_bid(flags));
        if (!s->closing) {
            s->in_eof = 1;
            stream_schedule_ready(s);
        }
    } else if (res == -ENOBUFS) {
        ue_bufring_starved(&loop->recv_pool); /* and the recv is armed again below */
    } else if (res < 0 && res != -ECANCELED && !s->closing) {
        Py_XSETREF(s->in_error, us_oserror_from_res(res));
        stream_schedule_ready(s);
    }
    if (res >= US_BULK_ENTER && s->kind == US_STREAM_SOCKET && !s->bulk) {
        s->bulk = 1; /* the poll armed below, once this recv has ended */
        if (flags & IORING_CQE_F_MORE)
            ue_op_cancel(ue, op);
    }
    if (flags & IORING_CQE_F_MORE)
        return;
    loop->sockops_inflight--;
    /* The multishot recv ended without EOF or error (pool empty, or the
     * kernel chose to stop): keep reading. */
    if (stream_arm_recv(s) < 0)
        PyErr_WriteUnraisable((PyObject *)s);
    stream_check_lost(s);
    Py_DECREF(s); /* the in-flight reference */
}

/* A write pipe's reading end went away: close, with BrokenPipeError when
 * data was still waiting to be written (asyncio's _read_ready of a write
 * pipe). */
static void stream_hangup_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_stream *s = US_CONTAINER(op, us_stream, recv_op);
    s->loop->sockops_inflight--;
    if (res >= 0 && !s->conn_lost) {
        PyObject *exc = s->wbuf ? PyObject_CallNoArgs(PyExc_BrokenPipeError) : NULL;
        if (s->wbuf && !exc)
            PyErr_WriteUnraisable((PyObject *)s);
        stream_force_close(s, exc ? exc : Py_None);
        Py_XDECREF(exc);
    }
    stream_check_lost(s);
    Py_DECREF(s);
}

#define US_PROTO_SSL 2

/* protocol.<name>(n) */
static PyObject *stream_call_size(us_stream *s, PyObject *name, Py_ssize_t n)
{
    PyObject *arg = PyLong_FromSsize_t(n);
    PyObject *args[2] = {s->protocol, arg};
    PyObject *r = arg ? PyObject_VectorcallMethod(name, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL) : NULL;
    Py_XDECREF(arg);
    return r;
}

/* Puts the undelivered rest of a chunk back at the head of inbound, for the
 * delivery loop to hand over as the transport's state then allows. */
static int stream_requeue_rest(us_stream *s, const char *p, Py_ssize_t left)
{
    PyObject *rest = PyBytes_FromStringAndSize(p, left);
    int rc = rest ? stream_inbound_insert(s, 0, rest) : -1;
    Py_XDECREF(rest);
    return rc;
}

/* One get_buffer()/buffer_updated() round of stream_feed_buffered(): the
 * bytes delivered, 0 when `protocol` was replaced inside get_buffer()
 * (nothing copied), -1 when the protocol failed (reported), -2 to propagate. */
static Py_ssize_t stream_fill_buffer(us_stream *s, PyObject *protocol, const char *p, Py_ssize_t left)
{
    PyObject *buf = stream_call_size(s, s->loop->st->s_get_buffer, left);
    if (buf && s->protocol != protocol) {
        Py_DECREF(buf);
        return 0;
    }
    Py_buffer view;
    int rc = buf ? PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE) : -1;
    Py_XDECREF(buf);
    if (rc == 0 && view.len == 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
        rc = -1;
    }
    if (rc < 0)
        return stream_callback_failed(s, "Fatal error: protocol.get_buffer() call failed.") < 0 ? -2 : -1;
    Py_ssize_t n = view.len < left ? view.len : left;
    memcpy(view.buf, p, (size_t)n);
    PyBuffer_Release(&view);
    PyObject *r = stream_call_size(s, s->loop->st->s_buffer_updated, n);
    if (!r)
        return stream_callback_failed(s, "Fatal error: protocol.buffer_updated() call failed.") < 0 ? -2 : -1;
    Py_DECREF(r);
    return n;
}

/* Copies one chunk into a BufferedProtocol's buffers: 0 when done or when
 * the rest was put back, 1 when the protocol failed, -1 to propagate.
 * A callback may pause reading or set another protocol (say a plain one):
 * the rest then waits in inbound, and goes to whichever protocol is set
 * through its own methods. A buffer whose protocol was replaced while it
 * was being asked for gets nothing; its bytes go to the new protocol. */
static int stream_feed_buffered(us_stream *s, PyObject *data)
{
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t left = PyBytes_GET_SIZE(data);
    while (left > 0) {
        /* a reference, so that a new protocol cannot reuse its address */
        PyObject *protocol = Py_NewRef(s->protocol);
        Py_ssize_t n = stream_fill_buffer(s, protocol, p, left);
        int requeue = n == 0 || (n > 0 && left > n && !s->closing && (s->read_paused || s->protocol != protocol));
        Py_DECREF(protocol);
        if (n < 0)
            return n == -2 ? -1 : 1;
        p += n;
        left -= n;
        if (requeue)
            return stream_requeue_rest(s, p, left);
        if (s->closing)
            return 1;
    }
    return 0;
}

/* Hands one chunk to the protocol. Returns 0 to go on, 1 when the
 * protocol failed or kept the rest back, -1 to propagate. */
static int stream_deliver_chunk(us_stream *s, PyObject *data)
{
    if (s->buffered == US_PROTO_SSL)
        return us_ssl_feed(s->protocol, data) == 0
                   ? 0
                   : (stream_callback_failed(s, "Fatal error: protocol.buffer_updated() call failed.") < 0 ? -1 : 1);
    if (s->buffered)
        return stream_feed_buffered(s, data);
    PyObject *args[2] = {s->protocol, data};
    PyObject *r =
        PyObject_VectorcallMethod(s->loop->st->s_data_received, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r) {
        Py_DECREF(r);
        return 0;
    }
    return stream_callback_failed(s, "Fatal error: protocol.data_received() call failed.") < 0 ? -1 : 1;
}

/* Gives the protocol what arrived: data, then EOF or the read error.
 * Returns -1 only when SystemExit/KeyboardInterrupt must propagate. */
static int stream_deliver(us_stream *s)
{
    if (s->nheld && !stream_inbound_len(s) && !s->read_paused && !s->closing) {
        /* the common case: what arrived this iteration goes straight to
         * the protocol, without a stay in inbound */
        PyObject *data = stream_take_held(s);
        int rc = data ? stream_deliver_chunk(s, data) : 0;
        Py_XDECREF(data);
        if (rc)
            return rc < 0 ? -1 : 0;
    } else
        stream_release_held(s, 1);
    if (s->bulk_ready && !s->read_paused && !s->closing)
        stream_bulk_read(s);
    while (stream_inbound_len(s) && !s->read_paused && !s->closing) {
        PyObject *data = Py_NewRef(PyList_GET_ITEM(s->inbound, 0));
        if (PySequence_DelItem(s->inbound, 0) < 0) {
            Py_DECREF(data);
            return -1;
        }
        int rc = stream_deliver_chunk(s, data);
        Py_DECREF(data);
        if (rc)
            return rc < 0 ? -1 : 0;
    }
    if (stream_inbound_len(s) || s->read_paused || s->closing)
        return 0;
    if (s->in_error) {
        PyObject *exc = s->in_error;
        s->in_error = NULL;
        stream_fatal_error(s, exc, "Fatal read error on socket transport");
        Py_DECREF(exc);
        return 0;
    }
    if (s->in_eof) {
        s->in_eof = 2; /* delivered */
        PyObject *r = PyObject_CallMethod(s->protocol, "eof_received", NULL);
        if (!r)
            return stream_callback_failed(s, "Fatal error: protocol.eof_received() call failed.");
        /* a read pipe ends at EOF whatever the protocol answers */
        int keep_open = s->kind == US_STREAM_READ_PIPE ? 0 : PyObject_IsTrue(r);
        Py_DECREF(r);
        if (keep_open < 0)
            return stream_callback_failed(s, "Fatal error: protocol.eof_received() call failed.");
        if (!keep_open) {
            PyObject *c = PyObject_CallMethod((PyObject *)s, "close", NULL);
            if (!c)
                return -1;
            Py_DECREF(c);
        }
    }
    return 0;
}

static int stream_report_lost_error(us_stream *s, PyObject *protocol)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *cb = PyObject_GetAttrString(protocol, "connection_lost");
    PyObject *exc = s->lost_exc ? s->lost_exc : Py_None;
    PyErr_Restore(et, ev, tb); /* no bound method: the generic message */
    int rc = cb ? us_report_call_exception(s->loop, cb, &exc, 1, s->context) : us_report_exception(s->loop, NULL, NULL);
    Py_XDECREF(cb);
    return rc;
}

/* The socket (or pipe) object's close(); errors are reported, not raised. */
static void stream_close_sock(us_stream *s)
{
    if (!s->sock)
        return;
    PyObject *r = PyObject_CallMethod(s->sock, "close", NULL);
    if (!r)
        PyErr_WriteUnraisable(s->sock);
    Py_XDECREF(r);
}

/* Server._detach(): the transport no longer counts among its server's.
 * Takes the reference to server (NULL or None: none). */
static void stream_detach(us_stream *s, PyObject *server)
{
    if (!server || server == Py_None) {
        Py_XDECREF(server);
        return;
    }
#if PY_VERSION_HEX >= 0x030D0000
    /* 3.13's Server tracks its transports (see _net.py) */
    PyObject *r = PyObject_CallMethod(server, "_detach", "O", (PyObject *)s);
#else
    (void)s;
    PyObject *r = PyObject_CallMethod(server, "_detach", NULL);
#endif
    if (!r)
        PyErr_WriteUnraisable(server);
    Py_XDECREF(r);
    Py_DECREF(server);
}

/* connection_lost(exc), then the socket is closed: every op is final. */
static int stream_call_connection_lost(us_stream *s)
{
    s->lost_done = 1;
    int rc = 0;
    /* The socket object stays, closed, for get_extra_info("socket") (a
     * TransportSocket of it, as asyncio's dict keeps one); _sock and _pipe
     * say None from now on, as asyncio's attributes do. */
    PyObject *protocol = s->protocol, *server = s->server;
    s->protocol = s->server = NULL;
    if (protocol) {
        PyObject *r = PyObject_CallMethod(protocol, "connection_lost", "O", s->lost_exc ? s->lost_exc : Py_None);
        if (!r) {
            if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
                rc = -1;
            else /* asyncio runs it from a Handle: "Exception in callback ...", with that handle */
                rc = stream_report_lost_error(s, protocol);
        }
        Py_XDECREF(r);
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    stream_close_sock(s);
    stream_detach(s, server);
    PyErr_Restore(et, ev, tb);
    Py_XDECREF(protocol);
    Py_CLEAR(s->lost_exc);
    return rc;
}

/* asyncio's transports warn when they are collected before their
 * connection_lost(), and close their socket or pipe. A socket transport
 * also calls its server's _detach(), as asyncio's __del__ does from 3.13:
 * a 3.12 Server's wait_closed() waits for a count that would otherwise
 * never fall, a 3.13 one for a WeakSet that drops the transport without
 * waking it. Not for a transport whose making failed before it had its
 * protocol. The warning is for one never closed: a closed one waits for
 * the kernel's word on its ops before its connection_lost(), where
 * asyncio's waits for one iteration, and a loop closed meanwhile lets go
 * of it. */
static void stream_finalize(us_stream *s)
{
    if (s->lost_done || !s->sock || !s->protocol)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (!s->closing && PyErr_ResourceWarning((PyObject *)s, 1, "unclosed transport %R", (PyObject *)s) < 0)
        PyErr_WriteUnraisable((PyObject *)s);
    stream_close_sock(s);
    PyObject *server = s->server;
    s->server = NULL;
    stream_detach(s, server);
    PyErr_Restore(et, ev, tb);
}

static int stream_run_in_context(us_stream *s)
{
    if (s->lost_ready) { /* from its own entry, the last one queued */
        if (s->queued_ready)
            return 0;
        if (!s->lost_pending || stream_ops_busy(s)) {
            s->lost_ready = 0; /* queued again by the op's completion */
            return 0;
        }
        return stream_call_connection_lost(s);
    }
    if (!s->protocol)
        return 0;
    return stream_deliver(s);
}

int us_stream_run(PyObject *o)
{
    us_stream *s = (us_stream *)o;
    s->queued_ready--;
    if (s->closing || !s->protocol)
        stream_release_held(s, 0); /* nothing more reaches the protocol */
    if (s->lost_done || (!s->lost_ready && !s->protocol))
        return 0;
    PyObject *ctx = s->lost_ready && !s->queued_ready && s->lost_context ? s->lost_context : s->context;
    Py_INCREF(ctx);
    int entered = stream_enter_context(s, ctx);
    int rc = entered < 0 ? us_report_exception(s->loop, NULL, NULL) : stream_run_in_context(s);
    stream_exit_context(s, ctx, entered);
    Py_DECREF(ctx);
    return rc;
}

/* ---- writing ---- */

static void stream_send_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

static void stream_schedule_flush(us_stream *s)
{
    if (s->queued_flush || ue_op_busy(&s->send_op))
        return;
    s->queued_flush = 1;
    if (us_loop_add_flush(s->loop, Py_NewRef(s)) < 0) { /* not with a reserved place */
        s->queued_flush = 0;
        PyErr_WriteUnraisable((PyObject *)s);
    }
}

/* Calls protocol.pause_writing() or resume_writing(); a failure goes to the
 * loop's exception handler, as asyncio reports it. SystemExit and
 * KeyboardInterrupt from pause_writing() propagate out of write(). */
static void stream_flow_callback(us_stream *s, const char *method, int propagate_exit)
{
    PyObject *r = PyObject_CallMethod(s->protocol, method, NULL);
    if (r) {
        Py_DECREF(r);
        return;
    }
    if (propagate_exit && (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)))
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    PyObject *msg = PyUnicode_FromFormat("protocol.%s() failed", method);
    stream_report(s, msg, ev ? ev : Py_None);
    Py_XDECREF(msg);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
}

static void stream_maybe_pause_protocol(us_stream *s)
{
    if (s->wbuf <= s->high || s->protocol_paused || !s->protocol)
        return;
    s->protocol_paused = 1;
    Py_XSETREF(s->paused_obj, Py_NewRef(Py_True));
    stream_flow_callback(s, "pause_writing", 1);
}

/* Pauses or resumes the protocol from a send completion, in the
 * transport's context (pause_writing() from write() runs in the caller's). */
static void stream_flow_from_loop(us_stream *s, int pause)
{
    s->protocol_paused = (char)pause;
    Py_XSETREF(s->paused_obj, Py_NewRef(pause ? Py_True : Py_False));
    int entered = stream_enter_context(s, s->context);
    if (entered < 0) {
        PyErr_WriteUnraisable((PyObject *)s);
        return;
    }
    stream_flow_callback(s, pause ? "pause_writing" : "resume_writing", 0);
    stream_exit_context(s, s->context, entered);
}

/* After a deferred write's send: what the kernel did not take decides
 * whether the protocol pauses, as it would have in write(). */
static void stream_settle_deferred(us_stream *s)
{
    s->deferred = 0;
    if (s->wbuf > s->high && !s->protocol_paused && s->protocol && !s->closing && !s->conn_lost)
        stream_flow_from_loop(s, 1);
}

static void stream_maybe_resume_protocol(us_stream *s)
{
    if (s->protocol_paused && s->wbuf <= s->low && s->protocol)
        stream_flow_from_loop(s, 0);
}

static void stream_shutdown_write(us_stream *s)
{
    if (s->eof_sent)
        return;
    s->eof_sent = 1;
    if (shutdown(s->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
        PyObject *exc = us_oserror_from_res(-errno);
        stream_fatal_error(s, exc, "Fatal error on socket shutdown");
        Py_XDECREF(exc);
    }
}

/* How many queued chunks the next send takes. */
static int stream_iov_count(us_stream *s)
{
    return s->wq_len < UE_SEND_IOV_MAX ? s->wq_len : UE_SEND_IOV_MAX;
}

/* Points iov[0..n) at the first n queued chunks. */
static void stream_fill_iov(us_stream *s, struct iovec *iov, int n)
{
    for (int i = 0; i < n; i++) {
        PyObject *chunk = s->wq[(s->wq_head + i) % s->wq_cap];
        size_t off = i == 0 ? s->wq_off : 0;
        iov[i].iov_base = PyBytes_AS_STRING(chunk) + off;
        iov[i].iov_len = (size_t)PyBytes_GET_SIZE(chunk) - off;
    }
}

/* One sendmsg (writev on a pipe) of the queue's first chunks, now, without
 * blocking: bytes sent, or -1 with errno. */
static ssize_t stream_send_sync(us_stream *s)
{
    struct iovec iov[UE_SEND_IOV_MAX];
    struct msghdr msg;
    int n = stream_iov_count(s);
    stream_fill_iov(s, iov, n);
    if (s->kind != US_STREAM_SOCKET)
        return writev(s->fd, iov, n); /* the fd is non-blocking */
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)n;
    return sendmsg(s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Whether the send about to be armed over `n` queued chunks may be quiet
 * (ue_op_arm_quiet): a flush's send of a socket's whole queue whose
 * completion nobody waits for, since a quiet success is only learnt after
 * the enter that submits it, however long that enter sleeps. Waiting are a
 * paused protocol (resume_writing), close() and write_eof() (they act once
 * the queue is empty), loop.sendfile(), and chunks left out of this send. */
static int stream_send_may_be_quiet(us_stream *s, int n)
{
    return s->kind == US_STREAM_SOCKET && n == s->wq_len && s->wbuf <= (Py_ssize_t)UE_MAX_IO_LEN &&
           !s->protocol_paused && !s->closing && !s->eof_requested && !s->empty_waiter &&
           ue_quiet_reserve(&s->loop->ue);
}

/* Arms one sendmsg over everything queued; quiet when `from_flush` and
 * nothing waits on it (see stream_send_may_be_quiet). */
static void stream_arm_send(us_stream *s, int from_flush)
{
    us_loop *loop = s->loop;
    if (loop->closing)
        return; /* see stream_arm_recv */
    ue_send_one one;
    int n = stream_iov_count(s);
    struct msghdr *msg = ue_send_msg(&loop->ue, &n, &one);
    stream_fill_iov(s, msg->msg_iov, n);
    int quiet = from_flush && stream_send_may_be_quiet(s, n);
    struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        PyErr_WriteUnraisable((PyObject *)s);
        return;
    }
    if (s->kind == US_STREAM_SOCKET)
        ue_prep_send_msg(sqe, s->fd, msg, MSG_NOSIGNAL | (quiet ? UE_QUIET_SEND_FLAGS : 0));
    else if (n == 1) /* as a plain write, for the same reason */
        io_uring_prep_write(sqe, s->fd, msg->msg_iov[0].iov_base, ue_io_len(msg->msg_iov[0].iov_len), (uint64_t)-1);
    else
        io_uring_prep_writev(sqe, s->fd, msg->msg_iov, (unsigned)n, (uint64_t)-1);
    if (quiet)
        ue_op_arm_quiet(&loop->ue, &s->send_op, sqe, stream_send_cb, (int32_t)s->wbuf);
    else
        ue_op_arm(&loop->ue, &s->send_op, sqe, stream_send_cb);
    loop->sockops_inflight++;
    Py_INCREF(s);
}

/* Called at the start of each iteration for every stream that wrote. */
void us_stream_flush(PyObject *o)
{
    us_stream *s = (us_stream *)o;
    s->queued_flush = 0;
    if (!s->conn_lost && s->wq_len && !ue_op_busy(&s->send_op))
        stream_arm_send(s, 1);
}

static void stream_consume(us_stream *s, size_t n)
{
    s->wbuf -= (Py_ssize_t)n;
    while (n && s->wq_len) {
        PyObject *chunk = s->wq[s->wq_head];
        size_t avail = (size_t)PyBytes_GET_SIZE(chunk) - s->wq_off;
        if (n < avail) {
            s->wq_off += n;
            return;
        }
        n -= avail;
        Py_DECREF(chunk);
        s->wq_head = (s->wq_head + 1) % s->wq_cap;
        s->wq_len--;
        s->wq_off = 0;
    }
}

/* The queue is empty and no send is in flight: what waited for that goes
 * on (loop.sendfile()'s waiter, write_eof()'s shutdown, close()'s
 * connection_lost(), which the caller queues with stream_check_lost()). */
static void stream_flushed(us_stream *s)
{
    stream_settle_empty_waiter(s, 0);
    if (s->eof_requested)
        stream_shutdown_write(s);
    if (s->closing && !s->conn_lost) {
        s->conn_lost++;
        s->lost_pending = 1;
    }
}

static void stream_send_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_stream *s = US_CONTAINER(op, us_stream, send_op);
    s->loop->sockops_inflight--;
    if (res == -EAGAIN)
        res = 0; /* a quiet send the kernel had no room for: armed again below, to wait */
    if (res < 0) {
        if (res != -ECANCELED && !s->conn_lost) {
            PyObject *exc = us_oserror_from_res(res);
            stream_fatal_error(s, exc, "Fatal write error on socket transport");
            Py_XDECREF(exc);
        }
    } else if (!s->conn_lost) {
        stream_consume(s, (size_t)res);
        if (s->deferred)
            stream_settle_deferred(s);
        stream_maybe_resume_protocol(s);
        if (PyErr_Occurred())
            PyErr_WriteUnraisable((PyObject *)s);
        if (s->wq_len)
            stream_arm_send(s, 0); /* the rest, without waiting for the next flush */
        else
            stream_flushed(s);
    }
    stream_check_lost(s);
    Py_DECREF(s);
}

static int stream_queue(us_stream *s, PyObject *chunk)
{
    if (s->wq_len == s->wq_cap) {
        int cap = s->wq_cap ? s->wq_cap * 2 : 8;
        PyObject **q = PyMem_Malloc((size_t)cap * sizeof *q);
        if (!q) {
            PyErr_NoMemory();
            return -1;
        }
        for (int i = 0; i < s->wq_len; i++)
            q[i] = s->wq[(s->wq_head + i) % s->wq_cap];
        PyMem_Free(s->wq);
        s->wq = q;
        s->wq_cap = cap;
        s->wq_head = 0;
    }
    s->wq[(s->wq_head + s->wq_len) % s->wq_cap] = chunk;
    s->wq_len++;
    s->wbuf += PyBytes_GET_SIZE(chunk);
    return 0;
}

/* Small writes wait for the iteration's batched sendmsg. A write that
 * crosses the high-water mark is offered to the kernel at once instead, as
 * asyncio does, so pause_writing() means the kernel really refused it. */
static void stream_send_now(us_stream *s)
{
    s->deferred = 0;
    ssize_t sent = stream_send_sync(s);
    if (sent > 0) {
        stream_consume(s, (size_t)sent);
        if (!s->wq_len) { /* a write after close() can take the whole queue */
            stream_flushed(s);
            stream_check_lost(s);
        }
    } else if (sent < 0 && errno != EAGAIN && errno != EINTR) {
        PyObject *exc = us_oserror_from_res(-errno);
        stream_fatal_error(s, exc, "Fatal write error on socket transport");
        Py_XDECREF(exc);
    }
}

/* A write that crosses the high-water mark may still wait for the flush,
 * once per socket and iteration, within the iteration's budget: its send is
 * then quiet, so on one connection a large echo costs an enter and a recv,
 * not also a sendmsg. The protocol is not paused for it in write(): the
 * quiet send's outcome decides, as the kernel's answer does in asyncio
 * (stream_settle_deferred), so pause_writing() still means the kernel
 * refused. A second crossing write in the iteration sends everything at
 * once (stream_send_now), as before. */
static int stream_may_defer(us_stream *s)
{
    us_loop *loop = s->loop;
    if (s->kind != US_STREAM_SOCKET || s->deferred || s->wbuf > loop->defer_budget || !loop->ue.quiet_ok ||
        s->closing || s->eof_requested)
        return 0;
    loop->defer_budget -= s->wbuf;
    s->deferred = 1;
    return 1;
}

/* asyncio's write() hands its data to the kernel at once, so its abort()
 * only drops what the kernel did not take; ours waits for the iteration's
 * batched send. Before an abort the queue is offered to the kernel once, so
 * that the same data reaches the peer (a response written just before the
 * transport is aborted). Errors are the abort's business, not reported. */
static void stream_send_before_abort(us_stream *s)
{
    if (s->conn_lost || !s->wq_len || ue_op_busy(&s->send_op) || s->kind == US_STREAM_READ_PIPE)
        return;
    (void)stream_send_sync(s);
}

/* asyncio's pipe transports are one-way: a read pipe has none of the
 * writing methods (AttributeError), a write pipe's reading methods raise
 * NotImplementedError (from asyncio.ReadTransport). */
static int stream_read_pipe_has_no(us_stream *s, const char *name)
{
    if (s->kind != US_STREAM_READ_PIPE)
        return 0;
    PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute '%s' (a read pipe transport)",
                 _PyType_Name(Py_TYPE(s)), name);
    return -1;
}

static int stream_write_pipe_cannot_read(us_stream *s)
{
    if (s->kind != US_STREAM_WRITE_PIPE)
        return 0;
    PyErr_SetString(PyExc_NotImplementedError, "a write pipe transport does not read");
    return -1;
}

/* The bytes write() sends: bytes are immutable and shared; anything else
 * may change after write() returns, so it is copied once. A buffer that is
 * not C-contiguous (a strided memoryview) is not bytes-like: NULL with the
 * BufferError in *refused, which asyncio's send() of it raises and makes a
 * fatal error of the transport. NULL alone on any other error. */
static PyObject *stream_copy_data(PyObject *data, PyObject **refused)
{
    if (PyBytes_CheckExact(data))
        return Py_NewRef(data);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError))
            *refused = us_take_exception();
        return NULL;
    }
    PyObject *chunk = PyBytes_FromStringAndSize(view.buf, view.len);
    PyBuffer_Release(&view);
    return chunk;
}

/* write() of any bytes-like object (writelines() takes them all, as
 * asyncio's join does). */
static PyObject *stream_write_buffer(us_stream *s, PyObject *data)
{
    if (s->eof_requested) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return NULL;
    }
    if (s->empty_waiter) {
        PyErr_SetString(PyExc_RuntimeError, "unable to write; sendfile is in progress");
        return NULL;
    }
    PyObject *refused = NULL;
    PyObject *chunk = stream_copy_data(data, &refused);
    if (!chunk && !refused)
        return NULL;
    if (chunk && PyBytes_GET_SIZE(chunk) == 0) {
        Py_DECREF(chunk);
        Py_RETURN_NONE;
    }
    if (s->conn_lost) {
        if (s->conn_lost >= US_CONNLOST_WARN) {
            PyObject *r = PyObject_CallMethod((PyObject *)s->loop, "_uring_log_lost_write", NULL);
            Py_XDECREF(r);
            PyErr_Clear();
        }
        s->conn_lost++;
        Py_XDECREF(chunk);
        Py_XDECREF(refused);
        Py_RETURN_NONE;
    }
    if (refused) { /* asyncio's send() of it fails here: a fatal error */
        stream_fatal_error(s, refused,
                           s->kind == US_STREAM_SOCKET ? "Fatal write error on socket transport"
                                                       : "Fatal write error on pipe transport");
        Py_DECREF(refused);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (stream_queue(s, chunk) < 0) {
        Py_DECREF(chunk);
        return NULL;
    }
    /* Sockets batch their writes into the next iteration's sendmsg; pipes
     * (no hot path, and callers read them synchronously) write at once.
     * Not while the protocol is paused: a send here that emptied the queue
     * would leave no send completion to call resume_writing() (asyncio too
     * only queues behind a non-empty buffer). */
    if ((s->kind != US_STREAM_SOCKET || s->wbuf > s->high) && !s->protocol_paused && !ue_op_busy(&s->send_op) &&
        !stream_may_defer(s))
        stream_send_now(s);
    if (s->wq_len)
        stream_schedule_flush(s);
    if (!s->deferred)
        stream_maybe_pause_protocol(s);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_write(us_stream *s, PyObject *data)
{
    if (stream_read_pipe_has_no(s, "write") < 0)
        return NULL;
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) { /* asyncio's types */
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%s'", us_type_name(data));
        return NULL;
    }
    return stream_write_buffer(s, data);
}

/* All or nothing, as asyncio's: an item that is not bytes-like is refused
 * before any is written (asyncio joins them, or from 3.12 takes a
 * memoryview of each, first), with that step's message. */
static PyObject *stream_writelines(us_stream *s, PyObject *seq)
{
    if (stream_read_pipe_has_no(s, "writelines") < 0)
        return NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *items = PySequence_List(seq); /* "'int' object is not iterable" */
#else
    PyObject *items = PySequence_Fast(seq, "can only join an iterable");
    /* that is the caller's own list: copied, since the protocol's
     * pause_writing() may change it while the items are written (asyncio
     * joins them first) */
    if (items == seq && PyList_Check(items))
        Py_SETREF(items, PyList_GetSlice(items, 0, PyList_GET_SIZE(items)));
#endif
    if (!items)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
#if PY_VERSION_HEX >= 0x030C0000
        if (PyObject_CheckBuffer(item))
            continue;
#else
        Py_buffer view; /* join's test, which a strided memoryview fails too */
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) == 0) {
            PyBuffer_Release(&view);
            continue;
        }
        PyErr_Clear();
#endif
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_Format(PyExc_TypeError, "memoryview: a bytes-like object is required, not '%.200s'",
                     Py_TYPE(item)->tp_name);
#else
        PyErr_Format(PyExc_TypeError, "sequence item %zd: expected a bytes-like object, %.80s found", i,
                     Py_TYPE(item)->tp_name);
#endif
        Py_DECREF(items);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = stream_write_buffer(s, PySequence_Fast_GET_ITEM(items, i));
        if (!r) {
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_DECREF(items);
    Py_RETURN_NONE;
}

static PyObject *stream_close(us_stream *s, PyObject *unused);

static PyObject *stream_write_eof(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_read_pipe_has_no(s, "write_eof") < 0)
        return NULL;
    if (s->closing || s->eof_requested)
        Py_RETURN_NONE;
    if (s->kind != US_STREAM_SOCKET)
        return stream_close(s, NULL); /* a pipe's EOF is its closing */
    s->eof_requested = 1;
    if (!s->wq_len && !ue_op_busy(&s->send_op))
        stream_shutdown_write(s);
    Py_RETURN_NONE;
}

static PyObject *stream_can_write_eof(us_stream *s, PyObject *unused)
{
    (void)s;
    (void)unused;
    if (stream_read_pipe_has_no(s, "can_write_eof") < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* ---- lifecycle ---- */

static PyObject *stream_close(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (s->closing)
        Py_RETURN_NONE;
    s->closing = 1;
    /* On a closed loop asyncio's close() fails in call_soon(); nothing may
     * be queued there (it would keep the transport and its socket alive) */
    if (us_loop_check_open(s->loop) < 0 || stream_note_closer(s) < 0)
        return NULL;
    if (s->loop->ue_ready)
        ue_op_cancel(&s->loop->ue, &s->recv_op);
    if (!s->wq_len && !ue_op_busy(&s->send_op)) {
        s->conn_lost++;
        s->lost_pending = 1;
    }
    /* Queued now even with writes to flush: asyncio's write() has sent what
     * the kernel takes before close() is called, and calls connection_lost()
     * in the next iteration; ours go out in the enter that precedes it. */
    stream_queue_lost(s);
    Py_RETURN_NONE;
}

static PyObject *stream_abort(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_read_pipe_has_no(s, "abort") < 0)
        return NULL;
    if (!s->conn_lost && us_loop_check_open(s->loop) < 0) { /* as close() */
        s->closing = 1;
        return NULL;
    }
    if (!s->conn_lost && stream_note_closer(s) < 0)
        return NULL;
    stream_send_before_abort(s);
    stream_force_close(s, Py_None);
    Py_RETURN_NONE;
}

static PyObject *stream_make_empty_waiter(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (s->empty_waiter) {
        PyErr_SetString(PyExc_RuntimeError, "Empty waiter is already set");
        return NULL;
    }
    s->empty_waiter = PyObject_CallMethod((PyObject *)s->loop, "create_future", NULL);
    if (!s->empty_waiter)
        return NULL;
    stream_settle_empty_waiter(s, 0);
    return Py_NewRef(s->empty_waiter);
}

static PyObject *stream_reset_empty_waiter(us_stream *s, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(s->empty_waiter);
    Py_RETURN_NONE;
}

/* _force_close(exc): asyncio's private API, used by sslproto. */
static PyObject *stream_force_close_method(us_stream *s, PyObject *exc)
{
    stream_send_before_abort(s);
    stream_force_close(s, exc);
    Py_RETURN_NONE;
}

static PyObject *stream_is_closing(us_stream *s, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(s->closing);
}

static PyObject *stream_pause_reading(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_write_pipe_cannot_read(s) < 0)
        return NULL;
    if (s->closing || s->read_paused)
        Py_RETURN_NONE;
    s->read_paused = 1;
    if (s->loop->ue_ready)
        ue_op_cancel(&s->loop->ue, &s->recv_op);
    Py_RETURN_NONE;
}

static PyObject *stream_resume_reading(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_write_pipe_cannot_read(s) < 0)
        return NULL;
    if (s->closing || !s->read_paused)
        Py_RETURN_NONE;
    s->read_paused = 0;
    if (stream_inbound_len(s) || s->in_eof == 1 || s->in_error || s->bulk_ready)
        stream_schedule_ready(s); /* what arrived before the pause took effect */
    if (stream_arm_recv(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_is_reading(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_write_pipe_cannot_read(s) < 0)
        return NULL;
    return PyBool_FromLong(!s->read_paused && !s->closing);
}

static PyObject *stream_start(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_arm_recv(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int stream_set_limits(us_stream *s, Py_ssize_t high, Py_ssize_t low)
{
    us_state *st = s->loop->st;
    if (high == 64 * 1024 && low == 16 * 1024) { /* asyncio's defaults: the same two ints for every transport */
        Py_XSETREF(s->high_water_obj, Py_NewRef(st->water_high_default));
        Py_XSETREF(s->low_water_obj, Py_NewRef(st->water_low_default));
        s->high = high;
        s->low = low;
        return 0;
    }
    PyObject *h = PyLong_FromSsize_t(high), *l = PyLong_FromSsize_t(low);
    if (!h || !l) {
        Py_XDECREF(h);
        Py_XDECREF(l);
        return -1;
    }
    s->high = high;
    s->low = low;
    Py_XSETREF(s->high_water_obj, h);
    Py_XSETREF(s->low_water_obj, l);
    return 0;
}

static PyObject *stream_set_write_buffer_limits(us_stream *s, PyObject *args, PyObject *kwds)
{
    if (stream_read_pipe_has_no(s, "set_write_buffer_limits") < 0)
        return NULL;
    static char *kwlist[] = {"high", "low", NULL};
    PyObject *high_o = Py_None, *low_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:set_write_buffer_limits", kwlist, &high_o, &low_o))
        return NULL;
    Py_ssize_t high, low;
    if (high_o == Py_None) {
        if (low_o == Py_None)
            high = 64 * 1024;
        else {
            low = PyLong_AsSsize_t(low_o);
            if (low == -1 && PyErr_Occurred())
                return NULL;
            high = 4 * low;
        }
    } else {
        high = PyLong_AsSsize_t(high_o);
        if (high == -1 && PyErr_Occurred())
            return NULL;
    }
    if (low_o == Py_None)
        low = high >= 0 ? high / 4 : -((3 - high) / 4); /* Python's high // 4, for the message */
    else {
        low = PyLong_AsSsize_t(low_o);
        if (low == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!(high >= low && low >= 0)) {
        PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", high, low);
        return NULL;
    }
    if (stream_set_limits(s, high, low) < 0)
        return NULL;
    stream_maybe_pause_protocol(s);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_get_write_buffer_limits(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_read_pipe_has_no(s, "get_write_buffer_limits") < 0)
        return NULL;
    return Py_BuildValue("(nn)", s->low, s->high);
}

static PyObject *stream_get_write_buffer_size(us_stream *s, PyObject *unused)
{
    (void)unused;
    if (stream_read_pipe_has_no(s, "get_write_buffer_size") < 0)
        return NULL;
    return PyLong_FromSsize_t(s->wbuf);
}

/* fd's peer address into *a, or family AF_UNSPEC when it has none. */
static void stream_read_peer(int fd, us_inaddr *a)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (us_peer_address(fd, &ss, &len) < 0 || len > sizeof *a)
        a->sa.sa_family = AF_UNSPEC;
    else
        memcpy(a, &ss, len);
}

/* A TCP transport keeps its two addresses as the kernel gives them, 56
 * bytes, rather than asyncio's dict of "socket", "sockname" and "peername"
 * (about 500 bytes of objects for every connection, whether or not anyone
 * asks). Taken now, as asyncio takes them: the local address is gone once
 * the socket is closed; the peer's is asked with us_peer_address(), which
 * still answers once the peer has reset the connection (asyncio has it from
 * accept(); the multishot accept gives none). */
static void stream_take_addresses(us_stream *s)
{
    socklen_t len = sizeof s->sockname;
    if (getsockname(s->fd, &s->sockname.sa, &len) < 0 || len > sizeof s->sockname)
        s->sockname.sa.sa_family = AF_UNSPEC;
    stream_read_peer(s->fd, &s->peername);
}

/* The address as the socket module gives it: (host, port) for IPv4, (host,
 * port, flowinfo, scope_id) for IPv6; None when there was none, as asyncio
 * stores it. */
static PyObject *stream_address(const us_inaddr *a)
{
    char host[INET6_ADDRSTRLEN];
    switch (a->sa.sa_family) {
    case AF_INET:
        if (!inet_ntop(AF_INET, &a->in.sin_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(a->in.sin_port));
    case AF_INET6:
        if (!inet_ntop(AF_INET6, &a->in6.sin6_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(a->in6.sin6_port), (unsigned)ntohl(a->in6.sin6_flowinfo),
                             (unsigned)a->in6.sin6_scope_id);
    default:
        Py_RETURN_NONE;
    }
}

/* _core.peer_address(fd): the peer's address as a TCP transport gives it,
 * for code that has the socket but no transport yet (the accept's debug
 * log line). None for a socket that is not IP or not connected. */
PyObject *us_stream_peer_address(PyObject *mod, PyObject *arg)
{
    (void)mod;
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
    us_inaddr a;
    stream_read_peer(fd, &a);
    return stream_address(&a);
}

/* get_extra_info("socket"): one TransportSocket, made when first asked for. */
static PyObject *stream_transport_socket(us_stream *s)
{
    if (!s->tsock) {
        PyObject *cls = s->loop ? s->loop->st->transport_socket_class : NULL;
        if (!cls || !s->sock) {
            PyErr_SetString(PyExc_RuntimeError, "uringloop: the transport has no socket to wrap");
            return NULL;
        }
        s->tsock = PyObject_CallOneArg(cls, s->sock);
        if (!s->tsock)
            return NULL;
    }
    return Py_NewRef(s->tsock);
}

/* *slot, made from the address a the first time. */
static PyObject *stream_address_once(PyObject **slot, const us_inaddr *a)
{
    if (!*slot)
        *slot = stream_address(a);
    return Py_XNewRef(*slot);
}

/* The value for one of the three keys, or NULL with no error for any
 * other name (the transport has no other extra info). */
static PyObject *stream_lazy_extra(us_stream *s, PyObject *name)
{
    if (!PyUnicode_Check(name))
        return NULL;
    if (PyUnicode_CompareWithASCIIString(name, "peername") == 0)
        return stream_address_once(&s->peername_obj, &s->peername);
    if (PyUnicode_CompareWithASCIIString(name, "sockname") == 0)
        return stream_address_once(&s->sockname_obj, &s->sockname);
    if (PyUnicode_CompareWithASCIIString(name, "socket") == 0)
        return stream_transport_socket(s);
    return NULL;
}

/* _extra, asyncio's dict, made on first read for a TCP transport; from
 * then on get_extra_info() answers from it, as asyncio's does. */
static PyObject *stream_get_extra(us_stream *s, void *c)
{
    (void)c;
    if (s->extra)
        return Py_NewRef(s->extra);
    PyObject *d = PyDict_New();
    static const char *const keys[] = {"socket", "sockname", "peername"};
    for (size_t i = 0; d && i < sizeof keys / sizeof keys[0]; i++) {
        PyObject *k = PyUnicode_FromString(keys[i]);
        PyObject *v = k ? stream_lazy_extra(s, k) : NULL;
        if (!v || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    if (d)
        s->extra = Py_NewRef(d);
    return d;
}

static int stream_set_extra(us_stream *s, PyObject *v, void *c)
{
    (void)c;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "a transport's _extra cannot be deleted");
        return -1;
    }
    Py_XSETREF(s->extra, Py_NewRef(v));
    return 0;
}

static PyObject *stream_get_extra_info(us_stream *s, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "default", NULL};
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:get_extra_info", kwlist, &name, &dflt))
        return NULL;
    if (!s->extra) {
        PyObject *v = stream_lazy_extra(s, name);
        return v || PyErr_Occurred() ? v : Py_NewRef(dflt);
    }
    PyObject *v = PyDict_GetItemWithError(s->extra, name);
    if (!v && PyErr_Occurred())
        return NULL;
    return Py_NewRef(v ? v : dflt);
}

/* 1 if obj has the attribute, 0 if not, -1 with an error other than
 * AttributeError raised (PyObject_HasAttrString would swallow a MemoryError
 * and take a BufferedProtocol for a plain one). */
static int stream_has_attr(PyObject *obj, const char *name)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v) {
        Py_DECREF(v);
        return 1;
    }
    if (!PyErr_ExceptionMatches(PyExc_AttributeError))
        return -1;
    PyErr_Clear();
    return 0;
}

static int stream_set_protocol_obj(us_stream *s, PyObject *protocol)
{
    int has = stream_has_attr(protocol, "get_buffer");
    if (has > 0)
        has = stream_has_attr(protocol, "buffer_updated");
    if (has < 0)
        return -1;
    Py_XSETREF(s->protocol, Py_NewRef(protocol));
    s->buffered = (char)has;
    if (has && PyObject_TypeCheck(protocol, s->loop->st->SSLProtocolCoreType))
        s->buffered = US_PROTO_SSL;
    return 0;
}

static PyObject *stream_set_protocol(us_stream *s, PyObject *protocol)
{
    if (stream_set_protocol_obj(s, protocol) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_get_protocol(us_stream *s, PyObject *unused)
{
    (void)unused;
    return Py_NewRef(s->protocol ? s->protocol : Py_None);
}

/* The layouts of asyncio's reprs. A socket: "<name [closing |closed ]fd=N
 * read=polling|idle write=<polling|idle, bufsize=N>>", the read and write
 * parts only while the transport and its loop are open. A pipe: "<name
 * [closing |closed ]fd=N polling|idle|open|closed[ bufsize=N]>", "open"
 * once the loop is closed, the size for a write pipe. */
static PyObject *stream_repr(us_stream *s)
{
    const char *state = s->lost_done ? "closed " : s->closing ? "closing " : "";
    int loop_open = s->loop && !s->loop->closed;
    const char *reading = s->read_paused || s->closing ? "idle" : "polling";
    const char *writing = s->wbuf ? "polling" : "idle";
    if (s->kind == US_STREAM_SOCKET) {
        if (s->lost_done || !loop_open)
            return PyUnicode_FromFormat("<StreamTransport %sfd=%d>", state, s->fd);
        return PyUnicode_FromFormat("<StreamTransport %sfd=%d read=%s write=<%s, bufsize=%zd>>", state, s->fd, reading,
                                    writing, s->wbuf);
    }
    if (s->lost_done || !loop_open)
        return PyUnicode_FromFormat("<StreamTransport %sfd=%d %s>", state, s->fd, s->lost_done ? "closed" : "open");
    if (s->kind == US_STREAM_READ_PIPE)
        return PyUnicode_FromFormat("<StreamTransport %sfd=%d %s>", state, s->fd, reading);
    return PyUnicode_FromFormat("<StreamTransport %sfd=%d %s bufsize=%zd>", state, s->fd, writing, s->wbuf);
}

/* loop._stream_new(sock, protocol, extra, server[, kind]); extra None: a TCP
 * socket's, answered from its addresses (stream_take_addresses) */
PyObject *us_stream_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "_stream_new(sock, protocol, extra, server[, kind])");
        return NULL;
    }
    int kind = US_STREAM_SOCKET;
    if (nargs == 5 && (kind = (int)PyLong_AsLong(args[4])) == -1 && PyErr_Occurred())
        return NULL;
    if (args[2] == Py_None && kind != US_STREAM_SOCKET) {
        PyErr_SetString(PyExc_TypeError, "_stream_new(): a pipe's extra must be a dict");
        return NULL;
    }
    if (us_loop_check_open(loop) < 0)
        return NULL;
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    us_stream *s = PyObject_GC_New(us_stream, loop->st->StreamType);
    if (!s)
        return NULL;
    memset((char *)s + sizeof(PyObject), 0, sizeof *s - sizeof(PyObject));
    s->loop = (us_loop *)Py_NewRef(loop);
    s->sock = Py_NewRef(args[0]);
    s->fd = fd;
    s->kind = kind;
    if (args[2] != Py_None)
        s->extra = Py_NewRef(args[2]);
    else
        stream_take_addresses(s);
    s->server = Py_NewRef(args[3]);
    s->paused_obj = Py_NewRef(Py_False);
    s->context = PyContext_CopyCurrent();
    PyObject_GC_Track(s);
    if (!s->context || stream_set_limits(s, 64 * 1024, 16 * 1024) < 0 || us_loop_flush_reserve(loop) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    s->flush_reserved = 1;
    if (stream_set_protocol_obj(s, args[1]) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static int stream_traverse(us_stream *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->loop);
    Py_VISIT(s->sock);
    Py_VISIT(s->protocol);
    Py_VISIT(s->extra);
    Py_VISIT(s->tsock);
    Py_VISIT(s->sockname_obj);
    Py_VISIT(s->peername_obj);
    Py_VISIT(s->server);
    Py_VISIT(s->inbound);
    Py_VISIT(s->in_error);
    Py_VISIT(s->lost_exc);
    Py_VISIT(s->empty_waiter);
    Py_VISIT(s->dict);
    Py_VISIT(s->high_water_obj);
    Py_VISIT(s->low_water_obj);
    Py_VISIT(s->paused_obj);
    Py_VISIT(s->context);
    Py_VISIT(s->lost_context);
    for (int i = 0; i < s->wq_len; i++)
        Py_VISIT(s->wq[(s->wq_head + i) % s->wq_cap]);
    return 0;
}

static int stream_clear(us_stream *s)
{
    stream_release_held(s, 0);
    /* Reached only with no op in flight: each holds a reference. */
    Py_CLEAR(s->sock);
    Py_CLEAR(s->protocol);
    Py_CLEAR(s->extra);
    Py_CLEAR(s->tsock);
    Py_CLEAR(s->sockname_obj);
    Py_CLEAR(s->peername_obj);
    Py_CLEAR(s->server);
    Py_CLEAR(s->inbound);
    Py_CLEAR(s->in_error);
    Py_CLEAR(s->lost_exc);
    Py_CLEAR(s->empty_waiter);
    Py_CLEAR(s->dict);
    Py_CLEAR(s->high_water_obj);
    Py_CLEAR(s->low_water_obj);
    Py_CLEAR(s->paused_obj);
    Py_CLEAR(s->context);
    Py_CLEAR(s->lost_context);
    while (s->wq_len) {
        Py_DECREF(s->wq[s->wq_head]);
        s->wq_head = (s->wq_head + 1) % s->wq_cap;
        s->wq_len--;
    }
    if (s->flush_reserved && s->loop) {
        s->flush_reserved = 0;
        us_loop_flush_unreserve(s->loop);
    }
    Py_CLEAR(s->loop);
    return 0;
}

static void stream_dealloc(us_stream *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    if (PyObject_CallFinalizerFromDealloc((PyObject *)s) < 0)
        return; /* the finalizer's warning made it live again */
    PyObject_GC_UnTrack(s);
    if (s->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)s);
    stream_clear(s);
    PyMem_Free(s->wq);
    tp->tp_free(s);
    Py_DECREF(tp);
}

/* _pipe: asyncio's pipe transports keep the pipe object there. */
static PyObject *stream_get_pipe(us_stream *s, void *c)
{
    (void)c;
    return Py_NewRef(s->kind != US_STREAM_SOCKET && s->sock && !s->lost_done ? s->sock : Py_None);
}

static int stream_set_pipe(us_stream *s, PyObject *v, void *c)
{
    (void)c;
    if (s->kind == US_STREAM_SOCKET) {
        PyErr_SetString(PyExc_AttributeError, "a socket transport has no _pipe");
        return -1;
    }
    Py_XSETREF(s->sock, v && v != Py_None ? Py_NewRef(v) : NULL);
    return 0;
}

/* _sock: the socket object until connection_lost(), then None. */
static PyObject *stream_get_sock(us_stream *s, void *c)
{
    (void)c;
    return Py_NewRef(s->sock && !s->lost_done ? s->sock : Py_None);
}

static PyObject *stream_get_closed(us_stream *s, void *c)
{
    (void)c;
    return PyBool_FromLong(s->lost_done);
}

static PyMethodDef stream_methods[] = {
    {"write", (PyCFunction)stream_write, METH_O, NULL},
    {"writelines", (PyCFunction)stream_writelines, METH_O, NULL},
    {"write_eof", (PyCFunction)stream_write_eof, METH_NOARGS, NULL},
    {"can_write_eof", (PyCFunction)stream_can_write_eof, METH_NOARGS, NULL},
    {"close", (PyCFunction)stream_close, METH_NOARGS, NULL},
    {"abort", (PyCFunction)stream_abort, METH_NOARGS, NULL},
    {"_force_close", (PyCFunction)stream_force_close_method, METH_O, NULL},
    {"_make_empty_waiter", (PyCFunction)stream_make_empty_waiter, METH_NOARGS, NULL},
    {"_reset_empty_waiter", (PyCFunction)stream_reset_empty_waiter, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)stream_is_closing, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)stream_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)stream_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)stream_is_reading, METH_NOARGS, NULL},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))stream_set_write_buffer_limits,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_write_buffer_limits", (PyCFunction)stream_get_write_buffer_limits, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)stream_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))stream_get_extra_info, METH_VARARGS | METH_KEYWORDS, NULL},
    {"set_protocol", (PyCFunction)stream_set_protocol, METH_O, NULL},
    {"get_protocol", (PyCFunction)stream_get_protocol, METH_NOARGS, NULL},
    {"_start", (PyCFunction)stream_start, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef stream_members[] = {
    {"_sock_fd", T_INT, offsetof(us_stream, fd), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(us_stream, weakreflist), READONLY, NULL},
    {"__dictoffset__", T_PYSSIZET, offsetof(us_stream, dict), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef stream_getset[] = {
    {"_closed", (getter)stream_get_closed, NULL, NULL, NULL},
    {"_sock", (getter)stream_get_sock, NULL, NULL, NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"_pipe", (getter)stream_get_pipe, (setter)stream_set_pipe, NULL, NULL},
    {"_extra", (getter)stream_get_extra, (setter)stream_set_extra, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot stream_slots[] = {
    {Py_tp_dealloc, stream_dealloc},
    {Py_tp_finalize, stream_finalize},
    {Py_tp_traverse, stream_traverse},
    {Py_tp_clear, stream_clear},
    {Py_tp_repr, stream_repr},
    {Py_tp_methods, stream_methods},
    {Py_tp_members, stream_members},
    {Py_tp_getset, stream_getset},
    {Py_tp_doc, "A TCP or Unix stream transport on io_uring (asyncio.Transport semantics)."},
    {0, NULL},
};

PyType_Spec us_stream_spec = {
    .name = "uringloop._core.StreamTransport",
    .basicsize = sizeof(us_stream),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = stream_slots,
};

/* The bases of StreamTransport: (asyncio.transports._FlowControlMixin,) when
 * its slots sit where us_stream expects them, else NULL (no base). */
PyObject *us_stream_bases(void)
{
    static const struct {
        const char *name;
        size_t offset;
    } slots[] = {
        {"_extra", offsetof(us_stream, extra)},
        {"_high_water", offsetof(us_stream, high_water_obj)},
        {"_loop", offsetof(us_stream, loop)},
        {"_low_water", offsetof(us_stream, low_water_obj)},
        {"_protocol_paused", offsetof(us_stream, paused_obj)},
    };
    PyObject *mod = PyImport_ImportModule("asyncio.transports");
    PyObject *cls = mod ? PyObject_GetAttrString(mod, "_FlowControlMixin") : NULL;
    Py_XDECREF(mod);
    if (!cls)
        return NULL;
    int ok = PyType_Check(cls) && ((PyTypeObject *)cls)->tp_basicsize == (Py_ssize_t)offsetof(us_stream, sock) &&
             ((PyTypeObject *)cls)->tp_dictoffset == 0 && ((PyTypeObject *)cls)->tp_weaklistoffset == 0;
    for (size_t i = 0; ok && i < sizeof slots / sizeof slots[0]; i++) {
        PyObject *d = PyObject_GetAttrString(cls, slots[i].name);
        ok = d && Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             (size_t)((PyMemberDescrObject *)d)->d_member->offset == slots[i].offset;
        Py_XDECREF(d);
    }
    PyErr_Clear();
    PyObject *bases = ok ? PyTuple_Pack(1, cls) : NULL;
    Py_DECREF(cls);
    return bases;
}
