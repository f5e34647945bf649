/*
 * add_reader/add_writer on io_uring.
 *
 * asyncio's readers are level-triggered; io_uring's multishot poll is
 * edge-triggered and IORING_POLL_ADD_LEVEL is refused, so each registration
 * (an FdWatch) arms a one-shot POLL_ADD and re-arms it only after its
 * callback has run, while it is still registered. One FdWatch per (fd,
 * direction); a removed watch cancels its poll and a new registration gets a
 * new FdWatch, so in-flight state is never looked up by fd.
 */
#include "us.h"

#include <errno.h>
#include <poll.h>

#include <structmember.h>

typedef struct {
    PyObject_HEAD ue_op op;
    us_loop *loop;
    PyObject *handle;  /* us_handle, NULL once removed */
    PyObject *fileobj; /* what add_reader/add_writer got, when not an int */
    int fd;
    short events;
    char queued; /* sitting in the ready queue */
} us_fdwatch;

static PyObject *fdwatch_dict(us_fdwatch *w)
{
    return w->events == POLLIN ? w->loop->readers : w->loop->writers;
}

static void fdwatch_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_fdwatch *w = US_CONTAINER(op, us_fdwatch, op);
    us_loop *loop = w->loop;
    /* An error such as EBADF (the fd was closed while registered) is not
     * readiness: like epoll, which silently drops closed fds, stop polling
     * and keep the registration until remove_reader/remove_writer. */
    if (res >= 0 && w->handle && !loop->closing && !w->queued) {
        w->queued = 1;
        if (us_ready_push(loop, Py_NewRef(w)) < 0)
            PyErr_WriteUnraisable((PyObject *)w);
    }
    Py_DECREF(w); /* the in-flight reference */
}

int us_fdwatch_arm(PyObject *o)
{
    us_fdwatch *w = (us_fdwatch *)o;
    struct io_uring_sqe *sqe = ue_sqe(&w->loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    io_uring_prep_poll_add(sqe, w->fd, (unsigned)w->events);
    ue_op_arm(&w->loop->ue, &w->op, sqe, fdwatch_cb);
    Py_INCREF(w);
    return 0;
}

int us_fdwatch_run(PyObject *o)
{
    us_fdwatch *w = (us_fdwatch *)o;
    us_loop *loop = w->loop;
    w->queued = 0;
    if (!w->handle)
        return 0;
    us_handle *h = (us_handle *)Py_NewRef(w->handle);
    int rc = 0;
    if (h->cancelled) {
        /* asyncio drops a registration whose handle was cancelled. */
        if (us_loop_remove_watch(loop, fdwatch_dict(w), w->fd) < 0)
            rc = -1;
    } else {
        rc = us_handle_run(h);
    }
    if (w->handle && !ue_op_busy(&w->op) && !loop->closed && us_fdwatch_arm(o) < 0) {
        if (rc < 0)
            PyErr_WriteUnraisable(o);
        rc = -1;
    }
    Py_DECREF(h);
    return rc;
}

PyObject *us_loop_add_watch(us_loop *loop, PyObject *dict, int fd, PyObject *fileobj, short events,
                            PyObject *const *args, Py_ssize_t nargs)
{
    fileobj = PyLong_Check(fileobj) ? NULL : fileobj;
    us_handle *h = us_handle_new(loop, loop->st->HandleType, args[0], args + 1, nargs - 1, NULL);
    if (!h)
        return NULL;
    PyObject *key = PyLong_FromLong(fd);
    if (!key)
        goto fail;
    us_fdwatch *w = (us_fdwatch *)PyDict_GetItemWithError(dict, key);
    if (w) {
        PyObject *old = w->handle;
        w->handle = Py_NewRef(h);
        Py_XSETREF(w->fileobj, Py_XNewRef(fileobj));
        if (old) {
            us_handle_cancel_quiet((us_handle *)old);
            Py_DECREF(old);
        }
        Py_DECREF(key);
        if (!ue_op_busy(&w->op) && !w->queued && us_fdwatch_arm((PyObject *)w) < 0)
            goto fail;
        return (PyObject *)h;
    }
    if (PyErr_Occurred())
        goto fail_key;
    w = PyObject_GC_New(us_fdwatch, loop->st->FdWatchType);
    if (!w)
        goto fail_key;
    memset(&w->op, 0, sizeof w->op);
    w->loop = (us_loop *)Py_NewRef(loop);
    w->handle = Py_NewRef(h);
    w->fileobj = Py_XNewRef(fileobj);
    w->fd = fd;
    w->events = events;
    w->queued = 0;
    PyObject_GC_Track(w);
    if (PyDict_SetItem(dict, key, (PyObject *)w) < 0) {
        Py_DECREF(w);
        goto fail_key;
    }
    if (us_fdwatch_arm((PyObject *)w) < 0) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyDict_DelItem(dict, key) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        Py_DECREF(w);
        goto fail_key;
    }
    Py_DECREF(w);
    Py_DECREF(key);
    return (PyObject *)h;
fail_key:
    Py_DECREF(key);
fail:
    Py_DECREF(h);
    return NULL;
}

/* 1 when a registration was removed, 0 when there was none, -1 on error. */
int us_loop_remove_watch(us_loop *loop, PyObject *dict, int fd)
{
    PyObject *key = PyLong_FromLong(fd);
    if (!key)
        return -1;
    us_fdwatch *w = (us_fdwatch *)PyDict_GetItemWithError(dict, key);
    if (!w) {
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(w);
    int rc = PyDict_DelItem(dict, key);
    Py_DECREF(key);
    PyObject *old = w->handle;
    w->handle = NULL;
    if (old) {
        us_handle_cancel_quiet((us_handle *)old);
        Py_DECREF(old);
    }
    if (loop->ue_ready && ue_op_cancel(&loop->ue, &w->op) < 0 && rc == 0) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        rc = -1;
    }
    Py_DECREF(w);
    return rc < 0 ? -1 : 1;
}

/* The fd a file object was registered with, for an object whose fileno()
 * no longer works (a socket closed while registered): asyncio's selectors
 * find such a registration by the object itself, so remove_reader() on a
 * closed socket still removes it. -1 with the ValueError kept otherwise. */
int us_loop_watch_fd_of(PyObject *dict, PyObject *fileobj)
{
    if (!dict || !PyErr_ExceptionMatches(PyExc_ValueError) || PyLong_Check(fileobj))
        return -1;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        us_fdwatch *w = (us_fdwatch *)value;
        if (w->fileobj == fileobj) {
            PyErr_Clear();
            return w->fd;
        }
    }
    return -1;
}

/* After the ring was rebuilt: the old polls are gone without CQEs. */
void us_loop_rearm_watches(us_loop *loop)
{
    PyObject *dicts[2] = {loop->readers, loop->writers};
    for (int d = 0; d < 2; d++) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(dicts[d], &pos, &key, &value)) {
            us_fdwatch *w = (us_fdwatch *)value;
            if (ue_op_busy(&w->op)) {
                w->op.state = UE_OP_IDLE;
                Py_DECREF(w); /* the lost in-flight reference; the dict holds one */
            }
            if (w->handle && !w->queued && us_fdwatch_arm(value) < 0)
                return;
        }
    }
}

static int fdwatch_traverse(us_fdwatch *w, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(w));
    Py_VISIT(w->loop);
    Py_VISIT(w->handle);
    Py_VISIT(w->fileobj);
    return 0;
}

static int fdwatch_clear(us_fdwatch *w)
{
    Py_CLEAR(w->handle);
    Py_CLEAR(w->fileobj);
    Py_CLEAR(w->loop);
    return 0;
}

static void fdwatch_dealloc(us_fdwatch *w)
{
    PyTypeObject *tp = Py_TYPE(w);
    PyObject_GC_UnTrack(w);
    fdwatch_clear(w);
    tp->tp_free(w);
    Py_DECREF(tp);
}

static PyObject *fdwatch_get_handle(us_fdwatch *w, void *c)
{
    (void)c;
    return Py_NewRef(w->handle ? w->handle : Py_None);
}

static PyObject *fdwatch_repr(us_fdwatch *w)
{
    return PyUnicode_FromFormat("<FdWatch fd=%d %s %R>", w->fd, w->events == POLLIN ? "read" : "write",
                                w->handle ? w->handle : Py_None);
}

static PyMemberDef fdwatch_members[] = {
    {"fd", T_INT, offsetof(us_fdwatch, fd), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef fdwatch_getset[] = {
    {"handle", (getter)fdwatch_get_handle, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot fdwatch_slots[] = {
    {Py_tp_dealloc, fdwatch_dealloc},
    {Py_tp_traverse, fdwatch_traverse},
    {Py_tp_clear, fdwatch_clear},
    {Py_tp_repr, fdwatch_repr},
    {Py_tp_members, fdwatch_members},
    {Py_tp_getset, fdwatch_getset},
    {0, NULL},
};

PyType_Spec us_fdwatch_spec = {
    .name = "uringloop._core.FdWatch",
    .basicsize = sizeof(us_fdwatch),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = fdwatch_slots,
};
