/*
 * Acceptor: one multishot ACCEPT per listening socket, or for a socket
 * other processes may share a multishot POLL_ADD + accept4() (asyncio's
 * _start_serving). Accepted descriptors are collected during the CQE batch
 * and handed to a Python callback from the ready queue, so the protocol
 * factory and connection_made run where asyncio runs them. Resource errors
 * (EMFILE, ENFILE, ENOBUFS, ENOMEM) are passed on as -errno and stop the
 * acceptor until resume(), as asyncio pauses accepting for a while.
 */
#include "us.h"

#include <errno.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD ue_op op;
    us_loop *loop;
    PyObject *sock;
    PyObject *callback;
    int fd;
    int *pending;
    int npending, cap;
    char active, queued, stalled;
    char shared; /* other processes accept on this socket: poll + accept4 */
} us_acceptor;

static void acceptor_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

static int acceptor_arm(us_acceptor *a)
{
    struct io_uring_sqe *sqe = ue_sqe(&a->loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    ue_prep_listen(sqe, a->fd, a->shared);
    ue_op_arm(&a->loop->ue, &a->op, sqe, acceptor_cb);
    Py_INCREF(a);
    return 0;
}

static int acceptor_push(us_acceptor *a, int value)
{
    if (a->npending == a->cap) {
        int cap = a->cap ? a->cap * 2 : 16;
        int *p = PyMem_Realloc(a->pending, (size_t)cap * sizeof *p);
        if (!p)
            return -1;
        a->pending = p;
        a->cap = cap;
    }
    a->pending[a->npending++] = value;
    if (!a->queued) {
        a->queued = 1;
        if (us_ready_push(a->loop, Py_NewRef(a)) < 0)
            return -1;
    }
    return 0;
}

static int is_resource_error(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

#define US_ACCEPT_MAX 4096 /* per wake-up: a bound, the backlog is smaller */

/* A shared listening socket is readable. Every process polling it was
 * woken (a poll is not an exclusive waiter, an accept is: the kernel would
 * hand each connection to the first accept in the queue, busy or not); the
 * least busy gets there first and the others find the backlog empty, as
 * with epoll. Accepts until EAGAIN, as asyncio accepts a batch. */
static void acceptor_accept_ready(us_acceptor *a)
{
    for (int i = 0; i < US_ACCEPT_MAX; i++) {
        int fd = ue_accept(a->fd);
        if (fd >= 0) {
            if (acceptor_push(a, fd) < 0) {
                close(fd);
                PyErr_WriteUnraisable((PyObject *)a);
                return;
            }
            continue;
        }
        int err = -fd;
        if (is_resource_error(err)) {
            a->stalled = 1; /* resume() re-arms, once the poll has ended */
            ue_op_cancel(&a->loop->ue, &a->op);
            if (acceptor_push(a, -err) < 0)
                PyErr_WriteUnraisable((PyObject *)a);
        }
        return; /* EAGAIN: empty, or a sibling was faster */
    }
    ue_op_cancel(&a->loop->ue, &a->op); /* re-armed at its end: a new poll sees what is left */
}

static void acceptor_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    us_acceptor *a = US_CONTAINER(op, us_acceptor, op);
    int resource = res < 0 && is_resource_error(-res);
    if (a->shared) {
        if (res > 0 && a->active && !a->stalled && !a->loop->closing)
            acceptor_accept_ready(a);
    } else if (res >= 0) {
        if (!a->active || a->loop->closing || acceptor_push(a, res) < 0)
            close(res);
    } else if (resource && a->active) {
        a->stalled = 1;
        if (acceptor_push(a, res) < 0)
            PyErr_WriteUnraisable((PyObject *)a);
    }
    if (flags & IORING_CQE_F_MORE)
        return;
    if (a->active && !a->stalled && !a->loop->closing && acceptor_arm(a) < 0)
        PyErr_WriteUnraisable((PyObject *)a);
    Py_DECREF(a); /* the in-flight reference */
}

int us_acceptor_run(PyObject *o)
{
    us_acceptor *a = (us_acceptor *)o;
    a->queued = 0;
    int rc = 0;
    for (int i = 0; i < a->npending; i++) {
        int v = a->pending[i];
        if (rc < 0 || !a->active) {
            if (v >= 0)
                close(v);
            continue;
        }
        PyObject *arg = PyLong_FromLong(v);
        if (!arg && v >= 0)
            close(v); /* out of memory before the callback could take it */
        PyObject *r = arg ? PyObject_CallOneArg(a->callback, arg) : NULL;
        Py_XDECREF(arg);
        if (r) {
            Py_DECREF(r);
        } else if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            rc = -1;
        } else {
            PyObject *msg = PyUnicode_FromString("Error while accepting a connection");
            rc = us_report_exception(a->loop, msg, NULL);
            Py_XDECREF(msg);
        }
    }
    a->npending = 0;
    return rc;
}

static PyObject *acceptor_cancel(us_acceptor *a, PyObject *unused)
{
    (void)unused;
    a->active = 0;
    if (a->loop->ue_ready && ue_op_cancel_sync(&a->loop->ue, &a->op) < 0)
        ue_op_cancel(&a->loop->ue, &a->op); /* the CQE still comes; only the file lingers */
    Py_RETURN_NONE;
}

static PyObject *acceptor_resume(us_acceptor *a, PyObject *unused)
{
    (void)unused;
    a->stalled = 0;
    if (a->active && !ue_op_busy(&a->op) && !a->loop->closed && acceptor_arm(a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* loop._acceptor_new(sock, callback[, shared]): shared when other
 * processes may accept on the socket (it came in through sock=). */
PyObject *us_acceptor_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_acceptor_new(sock, callback[, shared])");
        return NULL;
    }
    int shared = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (shared < 0)
        return NULL;
    if (us_loop_check_open(loop) < 0)
        return NULL;
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    us_acceptor *a = PyObject_GC_New(us_acceptor, loop->st->AcceptorType);
    if (!a)
        return NULL;
    memset(&a->op, 0, sizeof *a - offsetof(us_acceptor, op));
    a->loop = (us_loop *)Py_NewRef(loop);
    a->sock = Py_NewRef(args[0]);
    a->callback = Py_NewRef(args[1]);
    a->fd = fd;
    a->active = 1;
    a->shared = (char)shared;
    PyObject_GC_Track(a);
    if (acceptor_arm(a) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return (PyObject *)a;
}

static int acceptor_traverse(us_acceptor *a, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(a));
    Py_VISIT(a->loop);
    Py_VISIT(a->sock);
    Py_VISIT(a->callback);
    return 0;
}

static int acceptor_clear(us_acceptor *a)
{
    Py_CLEAR(a->sock);
    Py_CLEAR(a->callback);
    Py_CLEAR(a->loop);
    return 0;
}

static void acceptor_dealloc(us_acceptor *a)
{
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    for (int i = 0; i < a->npending; i++)
        if (a->pending[i] >= 0)
            close(a->pending[i]);
    PyMem_Free(a->pending);
    acceptor_clear(a);
    tp->tp_free(a);
    Py_DECREF(tp);
}

static PyMethodDef acceptor_methods[] = {
    {"cancel", (PyCFunction)acceptor_cancel, METH_NOARGS, NULL},
    {"resume", (PyCFunction)acceptor_resume, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot acceptor_slots[] = {
    {Py_tp_dealloc, acceptor_dealloc},
    {Py_tp_traverse, acceptor_traverse},
    {Py_tp_clear, acceptor_clear},
    {Py_tp_methods, acceptor_methods},
    {0, NULL},
};

PyType_Spec us_acceptor_spec = {
    .name = "uringloop._core.Acceptor",
    .basicsize = sizeof(us_acceptor),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = acceptor_slots,
};
