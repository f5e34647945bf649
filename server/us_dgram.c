/*
 * DgramReader: the receiving side of uringloop's datagram transport.
 *
 * One RECVMSG is in flight, into the reader's own buffer (256 KiB, the
 * largest datagram asyncio reads). Its completion puts the reader on the
 * ready queue, where the datagram is copied into a bytes object of its size
 * and handed to deliver(data, addr); then what else is waiting is read
 * there with recvmsg() until EAGAIN, up to a bound, as libuv reads a batch
 * per wake-up (the kernel's IORING_CQE_F_SOCK_NONEMPTY would say when, but
 * UDP and Unix datagram sockets never set it), and the next RECVMSG is
 * armed. One datagram per loop iteration cost 10% more CPU per round trip
 * with 10 and 100 clients; the EAGAIN with one client is within the noise. A failed receive goes to error(exc)
 * (error_received) and reading goes on, as in asyncio's selector transport.
 *
 * stop() (pause_reading) cancels the op; a datagram that completed before
 * the cancel is kept and delivered first after the next start(). The
 * callbacks run in a copy of the context the reader was made in, as
 * asyncio's reader handle does.
 */
#include "us.h"

#include <errno.h>
#include <string.h>

#define US_DGRAM_MAX (256 * 1024) /* asyncio's max_size for datagrams */
#define US_DGRAM_BATCH 32         /* datagrams read per completion at most */

typedef struct {
    PyObject_HEAD ue_op op;
    us_loop *loop;
    PyObject *sock; /* keeps the descriptor open */
    PyObject *deliver, *error, *context;
    PyObject *kept; /* (data, addr) that completed after stop(), or NULL */
    char *buf;
    struct msghdr msg;
    struct iovec iov;
    struct sockaddr_storage addr;
    int fd;
    int32_t res; /* the completed op's result, until the reader runs */
    char reading, closed, queued, completed;
} us_dgram_reader;

static void dgram_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

static void dgram_prep_msg(us_dgram_reader *r)
{
    memset(&r->msg, 0, sizeof r->msg);
    r->iov.iov_base = r->buf;
    r->iov.iov_len = US_DGRAM_MAX;
    r->msg.msg_name = &r->addr;
    r->msg.msg_namelen = sizeof r->addr;
    r->msg.msg_iov = &r->iov;
    r->msg.msg_iovlen = 1;
}

static int dgram_arm(us_dgram_reader *r)
{
    struct io_uring_sqe *sqe = ue_sqe(&r->loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    dgram_prep_msg(r);
    io_uring_prep_recvmsg(sqe, r->fd, &r->msg, 0);
    ue_op_arm(&r->loop->ue, &r->op, sqe, dgram_cb);
    Py_INCREF(r); /* the in-flight reference */
    return 0;
}

static void dgram_queue(us_dgram_reader *r)
{
    if (r->queued)
        return;
    r->queued = 1;
    if (us_ready_push(r->loop, Py_NewRef(r)) < 0)
        PyErr_WriteUnraisable((PyObject *)r);
}

static void dgram_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_dgram_reader *r = US_CONTAINER(op, us_dgram_reader, op);
    if (!r->closed && !r->loop->closing) {
        if (res != -ECANCELED) {
            r->res = res;
            r->completed = 1;
        }
        if (r->completed || r->reading) /* a start() after a cancel re-arms from the run */
            dgram_queue(r);
    }
    Py_DECREF(r);
}

/* (data, addr) of the datagram of `n` bytes in the buffer. */
static PyObject *dgram_item(us_dgram_reader *r, size_t n)
{
    PyObject *data = PyBytes_FromStringAndSize(r->buf, (Py_ssize_t)n);
    PyObject *addr = data ? us_sockaddr_to_py(&r->addr, r->msg.msg_namelen) : NULL;
    if (!addr) {
        Py_XDECREF(data);
        return NULL;
    }
    PyObject *item = PyTuple_Pack(2, data, addr);
    Py_DECREF(data);
    Py_DECREF(addr);
    return item;
}

/* Calls fn(*args) (args: a tuple, stolen). SystemExit and KeyboardInterrupt
 * stop the loop (-1); anything else the callback let out goes to the
 * exception handler, and reading goes on, as on asyncio's loop, where the
 * protocol's callbacks run inside the reader's handle. */
static int dgram_call(us_dgram_reader *r, PyObject *fn, PyObject *args)
{
    if (!args)
        return us_report_exception(r->loop, NULL, NULL);
    Py_INCREF(fn); /* close() from inside the callback drops the reader's reference */
    PyObject *res = PyObject_Call(fn, args, NULL);
    int rc = 0;
    if (res)
        Py_DECREF(res);
    else if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        rc = -1;
    else /* "Exception in callback <fn's source>()", as asyncio reports its reader's */
        rc = us_report_call_exception(r->loop, fn, NULL, 0, r->context);
    Py_DECREF(args);
    Py_DECREF(fn);
    return rc;
}

static int dgram_live(us_dgram_reader *r)
{
    return r->reading && !r->closed && r->deliver;
}

static int dgram_deliver(us_dgram_reader *r, PyObject *item)
{
    if (!dgram_live(r)) { /* stopped meanwhile: the next start() delivers it */
        if (!r->closed)
            Py_XSETREF(r->kept, item);
        else
            Py_DECREF(item);
        return 0;
    }
    return dgram_call(r, r->deliver, item);
}

static int dgram_error(us_dgram_reader *r, int err)
{
    if (!dgram_live(r) || !r->error)
        return 0;
    PyObject *exc = us_oserror_from_res(-err);
    PyObject *args = exc ? PyTuple_Pack(1, exc) : NULL;
    Py_XDECREF(exc);
    return dgram_call(r, r->error, args);
}

/* Reads what else is waiting, up to US_DGRAM_BATCH datagrams. */
static int dgram_drain(us_dgram_reader *r)
{
    for (int i = 0; i < US_DGRAM_BATCH && dgram_live(r); i++) {
        dgram_prep_msg(r);
        ssize_t n = recvmsg(r->fd, &r->msg, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return 0;
            return dgram_error(r, errno);
        }
        PyObject *item = dgram_item(r, (size_t)n);
        if (!item) /* out of memory: the datagram is lost, reading goes on */
            return us_report_exception(r->loop, NULL, NULL);
        if (dgram_deliver(r, item) < 0)
            return -1;
    }
    return 0;
}

static int dgram_run_in_context(us_dgram_reader *r)
{
    if (r->kept && dgram_live(r)) {
        PyObject *item = r->kept;
        r->kept = NULL;
        if (dgram_deliver(r, item) < 0)
            return -1;
    }
    if (r->completed) {
        r->completed = 0;
        int rc;
        if (r->res >= 0) {
            PyObject *item = dgram_item(r, (size_t)r->res);
            rc = item ? dgram_deliver(r, item) : us_report_exception(r->loop, NULL, NULL);
            if (rc == 0)
                rc = dgram_drain(r);
        } else {
            rc = dgram_error(r, -r->res);
        }
        if (rc < 0)
            return -1;
    }
    if (dgram_live(r) && !ue_op_busy(&r->op) && !r->loop->closing && dgram_arm(r) < 0)
        return us_report_exception(r->loop, NULL, NULL);
    return 0;
}

int us_dgram_run(PyObject *o)
{
    us_dgram_reader *r = (us_dgram_reader *)o;
    r->queued = 0;
    if (r->closed)
        return 0;
    PyObject *ctx = Py_NewRef(r->context);
    if (PyContext_Enter(ctx) < 0) {
        Py_DECREF(ctx);
        return us_report_exception(r->loop, NULL, NULL);
    }
    int rc = dgram_run_in_context(r);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (PyContext_Exit(ctx) < 0) /* a callback left a context of its own entered */
        PyErr_WriteUnraisable(o);
    PyErr_Restore(et, ev, tb);
    Py_DECREF(ctx);
    return rc;
}

static PyObject *dgram_start(us_dgram_reader *r, PyObject *unused)
{
    (void)unused;
    if (r->closed)
        Py_RETURN_NONE;
    r->reading = 1;
    if (r->kept || ue_op_busy(&r->op)) {
        dgram_queue(r); /* the kept datagram first; a cancelled op's end re-arms */
        Py_RETURN_NONE;
    }
    if (us_loop_check_open(r->loop) < 0 || dgram_arm(r) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void dgram_cancel_op(us_dgram_reader *r)
{
    if (r->loop->ue_ready && ue_op_busy(&r->op))
        ue_op_cancel(&r->loop->ue, &r->op);
}

static PyObject *dgram_stop(us_dgram_reader *r, PyObject *unused)
{
    (void)unused;
    r->reading = 0;
    dgram_cancel_op(r);
    Py_RETURN_NONE;
}

static PyObject *dgram_close(us_dgram_reader *r, PyObject *unused)
{
    (void)unused;
    r->reading = 0;
    r->closed = 1;
    dgram_cancel_op(r);
    Py_CLEAR(r->kept);
    Py_CLEAR(r->deliver); /* the transport's bound methods: no cycle left */
    Py_CLEAR(r->error);
    Py_RETURN_NONE;
}

/* loop._dgram_reader(sock, deliver, error) */
PyObject *us_dgram_reader_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_dgram_reader(sock, deliver, error)");
        return NULL;
    }
    if (us_loop_check_open(loop) < 0)
        return NULL;
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    us_dgram_reader *r = PyObject_GC_New(us_dgram_reader, loop->st->DgramReaderType);
    if (!r)
        return NULL;
    memset(&r->op, 0, sizeof *r - offsetof(us_dgram_reader, op));
    r->loop = (us_loop *)Py_NewRef(loop);
    r->sock = Py_NewRef(args[0]);
    r->deliver = Py_NewRef(args[1]);
    r->error = Py_NewRef(args[2]);
    r->fd = fd;
    PyObject_GC_Track(r);
    r->context = PyContext_CopyCurrent();
    r->buf = PyMem_Malloc(US_DGRAM_MAX);
    if (!r->context || !r->buf) {
        if (!r->buf)
            PyErr_NoMemory();
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static int dgram_traverse(us_dgram_reader *r, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(r));
    Py_VISIT(r->loop);
    Py_VISIT(r->sock);
    Py_VISIT(r->deliver);
    Py_VISIT(r->error);
    Py_VISIT(r->context);
    Py_VISIT(r->kept);
    return 0;
}

static int dgram_clear(us_dgram_reader *r)
{
    Py_CLEAR(r->deliver);
    Py_CLEAR(r->error);
    Py_CLEAR(r->kept);
    Py_CLEAR(r->context);
    Py_CLEAR(r->sock);
    Py_CLEAR(r->loop);
    return 0;
}

static void dgram_dealloc(us_dgram_reader *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    PyObject_GC_UnTrack(r);
    dgram_clear(r);
    PyMem_Free(r->buf); /* not in flight: that holds a reference */
    tp->tp_free(r);
    Py_DECREF(tp);
}

static PyMethodDef dgram_methods[] = {
    {"start", (PyCFunction)dgram_start, METH_NOARGS, NULL},
    {"stop", (PyCFunction)dgram_stop, METH_NOARGS, NULL},
    {"close", (PyCFunction)dgram_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot dgram_slots[] = {
    {Py_tp_dealloc, dgram_dealloc},
    {Py_tp_traverse, dgram_traverse},
    {Py_tp_clear, dgram_clear},
    {Py_tp_methods, dgram_methods},
    {0, NULL},
};

PyType_Spec us_dgram_reader_spec = {
    .name = "uringloop._core.DgramReader",
    .basicsize = sizeof(us_dgram_reader),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = dgram_slots,
};
