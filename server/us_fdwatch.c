/*
 * add_reader/add_writer: one FdWatch per (fd, direction), the fds in an epoll
 * set the ring waits on (ue_epoll.c says why not a POLL_ADD per fd).
 *
 * An fd's epoll events are EPOLLIN while it has a reader and EPOLLOUT while
 * it has a writer. When the set's poll completes, the ready fds' watches join
 * the ready queue and the poll is armed again. A removed watch keeps no fd
 * state, and a new registration gets a new FdWatch, so a watch still in the
 * ready queue after its removal just does nothing.
 */
#include "us.h"

#include <errno.h>
#include <poll.h>

#include <structmember.h>

typedef struct {
    PyObject_HEAD us_loop *loop;
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

/* The epoll events fd is registered for: what its entries in the two
 * dictionaries ask for. -1 with an exception set on error. */
static int64_t watched_events(us_loop *loop, PyObject *key)
{
    int in = PyDict_Contains(loop->readers, key), out = PyDict_Contains(loop->writers, key);
    if (in < 0 || out < 0)
        return -1;
    return (in ? EPOLLIN : 0) | (out ? EPOLLOUT : 0);
}

static int has_watches(us_loop *loop)
{
    return PyDict_GET_SIZE(loop->readers) || PyDict_GET_SIZE(loop->writers);
}

static void queue_watch(us_loop *loop, PyObject *dict, int fd)
{
    PyObject *key = PyLong_FromLong(fd);
    us_fdwatch *w = key ? (us_fdwatch *)PyDict_GetItemWithError(dict, key) : NULL;
    Py_XDECREF(key);
    if (w && w->handle && !w->queued) {
        w->queued = 1;
        if (us_ready_push(loop, Py_NewRef(w)) < 0)
            PyErr_WriteUnraisable((PyObject *)w);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)loop);
}

/* selectors.EpollSelector's reading of an event: anything but EPOLLOUT alone
 * makes the fd readable, anything but EPOLLIN alone writable (an error or a
 * hang-up wakes both). */
static void queue_ready_fds(us_loop *loop, const struct epoll_event *evs, int n)
{
    for (int i = 0; i < n; i++) {
        uint32_t ev = evs[i].events;
        if (ev & ~(uint32_t)EPOLLOUT)
            queue_watch(loop, loop->readers, evs[i].data.fd);
        if (ev & ~(uint32_t)EPOLLIN)
            queue_watch(loop, loop->writers, evs[i].data.fd);
    }
}

static int arm_epoll(us_loop *loop);

static void epoll_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_loop *loop = US_CONTAINER(op, us_loop, ep.op);
    if (loop->closing || !has_watches(loop))
        return;
    int n = ue_epoll_ready(&loop->ep, res);
    if (n > 0)
        queue_ready_fds(loop, loop->ep.events, n);
    /* More ready fds than one batch holds stay on the set's ready list: the
     * next arming completes at once with them. */
    if (arm_epoll(loop) < 0)
        PyErr_WriteUnraisable((PyObject *)loop);
}

static int arm_epoll(us_loop *loop)
{
    int ret = ue_epoll_arm(&loop->ue, &loop->ep, epoll_cb);
    if (ret == -EBUSY) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    if (ret < 0) {
        errno = -ret;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
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
    int rc;
    if (h->cancelled) {
        /* asyncio drops a registration whose handle was cancelled. */
        rc = us_loop_remove_watch(loop, fdwatch_dict(w), w->fd) < 0 ? -1 : 0;
    } else {
        rc = us_handle_run(h);
    }
    Py_DECREF(h);
    return rc;
}

/* Tells the epoll set what fd is watched for now; `again` re-registers an
 * fd whose events did not change (its number may belong to another file
 * since the last registration). */
static int update_epoll(us_loop *loop, PyObject *key, int fd, int64_t before, int again)
{
    int64_t after = watched_events(loop, key);
    if (after < 0)
        return -1;
    if (after == before && !again)
        return 0;
    int ret = ue_loop_forked(&loop->ue) ? ue_epoll_own(&loop->ep) : 0;
    if (ret == 0)
        ret = ue_epoll_set(&loop->ep, fd, (uint32_t)before, (uint32_t)after);
    /* A new callback for an fd closed since it was registered: asyncio's
     * selector keeps such a registration without asking the kernel. */
    if (ret == -EBADF && again)
        ret = 0;
    if (ret < 0) {
        errno = -ret;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static us_fdwatch *fdwatch_new(us_loop *loop, int fd, PyObject *fileobj, short events, us_handle *h)
{
    us_fdwatch *w = PyObject_GC_New(us_fdwatch, loop->st->FdWatchType);
    if (!w)
        return NULL;
    w->loop = (us_loop *)Py_NewRef(loop);
    w->handle = Py_NewRef(h);
    w->fileobj = Py_XNewRef(fileobj);
    w->fd = fd;
    w->events = events;
    w->queued = 0;
    PyObject_GC_Track(w);
    return w;
}

/* A registration that already exists gets the new handle. */
static int replace_handle(us_loop *loop, us_fdwatch *w, PyObject *key, PyObject *fileobj, us_handle *h)
{
    int64_t events = watched_events(loop, key);
    if (events < 0 || update_epoll(loop, key, w->fd, events, 1) < 0)
        return -1;
    PyObject *old = w->handle;
    w->handle = Py_NewRef(h);
    Py_XSETREF(w->fileobj, Py_XNewRef(fileobj));
    if (old) {
        us_handle_cancel_quiet((us_handle *)old);
        Py_DECREF(old);
    }
    return 0;
}

static int add_new_watch(us_loop *loop, PyObject *dict, PyObject *key, int fd, PyObject *fileobj, short events,
                         us_handle *h)
{
    int64_t before = watched_events(loop, key);
    if (before < 0)
        return -1;
    us_fdwatch *w = fdwatch_new(loop, fd, fileobj, events, h);
    if (!w || PyDict_SetItem(dict, key, (PyObject *)w) < 0) {
        Py_XDECREF(w);
        return -1;
    }
    Py_DECREF(w);
    /* A forked child's ring is still the parent's until the child runs the
     * loop, which arms the set's wait then (us_loop_rearm_watches). */
    int forked = ue_loop_forked(&loop->ue);
    if (update_epoll(loop, key, fd, before, 0) < 0 || (!forked && arm_epoll(loop) < 0)) {
        /* As asyncio's selector: a registration the kernel refused is not kept. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyDict_DelItem(dict, key) < 0)
            PyErr_Clear();
        (void)ue_epoll_set(&loop->ep, fd, (uint32_t)before, (uint32_t)before);
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return 0;
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
    int rc = w                  ? replace_handle(loop, w, key, fileobj, h)
             : PyErr_Occurred() ? -1
                                : add_new_watch(loop, dict, key, fd, fileobj, events, h);
    Py_DECREF(key);
    if (rc < 0)
        goto fail;
    return (PyObject *)h;
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
    int64_t before = watched_events(loop, key);
    Py_INCREF(w);
    int rc = before < 0 ? -1 : PyDict_DelItem(dict, key);
    /* asyncio ignores the kernel here too: a closed fd has left the set. */
    if (rc == 0 && update_epoll(loop, key, fd, before, 0) < 0)
        PyErr_Clear();
    Py_DECREF(key);
    PyObject *old = w->handle;
    w->handle = NULL;
    if (old) {
        us_handle_cancel_quiet((us_handle *)old);
        Py_DECREF(old);
    }
    Py_DECREF(w);
    /* Nothing left to watch: the set's poll need not count as work. */
    if (rc == 0 && !has_watches(loop) && loop->ue_ready && !ue_loop_forked(&loop->ue) &&
        ue_op_cancel(&loop->ue, &loop->ep.op) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        rc = -1;
    }
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

/* Adds every watched fd to a set made anew, each once with all its events
 * (an fd with a reader and a writer is in both dictionaries). A watched fd
 * closed since cannot be added: epoll would have dropped it anyway. */
static int readd_watched_fds(us_loop *loop)
{
    PyObject *dicts[2] = {loop->readers, loop->writers};
    for (int d = 0; d < 2; d++) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(dicts[d], &pos, &key, &value)) {
            int in_readers = d == 1 ? PyDict_Contains(loop->readers, key) : 0;
            int64_t events = in_readers ? 0 : watched_events(loop, key);
            if (in_readers < 0 || events < 0)
                return -1;
            if (events)
                (void)ue_epoll_set(&loop->ep, ((us_fdwatch *)value)->fd, 0, (uint32_t)events);
        }
    }
    return 0;
}

/* After the ring was rebuilt the set's poll is gone without a CQE; in a
 * forked child the set itself is the parent's, so a new one gets every fd. */
void us_loop_rearm_watches(us_loop *loop)
{
    loop->ep.op.state = UE_OP_IDLE;
    if (ue_epoll_forked(&loop->ep)) {
        int ret = ue_epoll_own(&loop->ep);
        if (ret < 0) {
            errno = -ret;
            PyErr_SetFromErrno(PyExc_OSError);
            return;
        }
        if (readd_watched_fds(loop) < 0)
            return;
    }
    if (has_watches(loop))
        (void)arm_epoll(loop);
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
