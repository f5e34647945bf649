/*
 * LoopCore: the C base of uringloop.Loop (which also derives from
 * asyncio.BaseEventLoop). It owns the ring, the ready queue and the timer
 * heap, and implements the hot methods: call_soon[_threadsafe], call_later,
 * call_at, time and the iteration itself (_run_once / _run_forever_inner).
 */
#include "us.h"

#include <errno.h>
#include <poll.h>
#include <string.h>

#define US_MAX_TIMEOUT 86400.0 /* as asyncio's MAXIMUM_SELECT_TIMEOUT */

/* ---- ready queue: power-of-two ring buffer ---- */

int us_ready_push(us_loop *loop, PyObject *item)
{
    if (loop->ready_len == loop->ready_cap) {
        Py_ssize_t cap = loop->ready_cap ? loop->ready_cap * 2 : 256;
        PyObject **buf = PyMem_Malloc(cap * sizeof *buf);
        if (!buf) {
            Py_DECREF(item);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < loop->ready_len; i++)
            buf[i] = loop->ready[(loop->ready_head + i) & (loop->ready_cap - 1)];
        PyMem_Free(loop->ready);
        loop->ready = buf;
        loop->ready_cap = cap;
        loop->ready_head = 0;
    }
    loop->ready[(loop->ready_head + loop->ready_len) & (loop->ready_cap - 1)] = item;
    loop->ready_len++;
    return 0;
}

static PyObject *ready_pop(us_loop *loop)
{
    PyObject *item = loop->ready[loop->ready_head];
    loop->ready_head = (loop->ready_head + 1) & (loop->ready_cap - 1);
    loop->ready_len--;
    return item;
}

static void ready_clear(us_loop *loop)
{
    while (loop->ready_len)
        Py_DECREF(ready_pop(loop));
}

/* ---- errors ---- */

int us_loop_check_open(us_loop *loop)
{
    if (loop->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
        return -1;
    }
    return 0;
}

static PyObject *raise_unavailable(us_state *st, int err, const char *step)
{
    const char *why;
    switch (err) {
    case EPERM:
    case EACCES:
        why = "it is refused by a seccomp filter (Docker's default profile blocks io_uring) or by the sysctl "
              "kernel.io_uring_disabled. Allow the io_uring_setup, io_uring_enter and io_uring_register "
              "syscalls (for Docker: --security-opt seccomp=<profile allowing them>) or set "
              "kernel.io_uring_disabled=0";
        break;
    case ENOSYS:
        why = "the kernel has no io_uring (Linux 5.19 or newer is needed; 6.1+ recommended)";
        break;
    case ENOMEM:
        why = "the kernel could not allocate the ring; raise RLIMIT_MEMLOCK (ulimit -l) on kernels older than 5.12";
        break;
    case EMFILE:
    case ENFILE:
        why = "the process is out of file descriptors";
        break;
    default:
        why = "see the error code";
        break;
    }
    if (!step)
        step = "io_uring_setup";
    PyObject *msg = PyUnicode_FromFormat("io_uring is not available: %s() failed with %s (%s): %s", step,
                                         err == EPERM    ? "EPERM"
                                         : err == ENOSYS ? "ENOSYS"
                                                         : "an error",
                                         strerror(err), why);
    if (!msg)
        return NULL;
    PyObject *args = Py_BuildValue("(iN)", err, msg);
    if (args) {
        PyErr_SetObject(st->UnavailableError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int set_errno_error(int neg_err)
{
    errno = -neg_err;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* ---- construction and teardown ---- */

static void drop_recv_pool(us_loop *self)
{
    if (self->recv_pool_ready) {
        ue_bufring_free(&self->ue, &self->recv_pool);
        self->recv_pool_ready = 0;
    }
}

static PyObject *loop_time(PyObject *self, PyObject *unused);

/* Whether `time` on the type is still LoopCore's (no subclass defines it). */
static int loop_time_is_ours(PyTypeObject *tp)
{
    PyObject *attr = PyObject_GetAttrString((PyObject *)tp, "time"); /* the method descriptor */
    int ours = attr && Py_IS_TYPE(attr, &PyMethodDescr_Type) &&
               ((PyMethodDescrObject *)attr)->d_method->ml_meth == (PyCFunction)loop_time;
    Py_XDECREF(attr);
    PyErr_Clear();
    return ours;
}

static PyObject *loop_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    us_state *st = us_state_of_type(tp);
    if (!st)
        return NULL;
    /* The ring first: when io_uring is refused no object exists yet, so no
     * half-built loop reaches asyncio's __del__. (struct io_uring holds no
     * pointer to itself, so it may be copied before the ring is started.) */
    ue_loop ue;
    int ret = ue_loop_init(&ue, 1024, 16384);
    if (ret == 0 && !(ue.features & IORING_FEAT_EXT_ARG)) {
        ue_loop_close(&ue);
        ue.failed_step = "io_uring_setup (the kernel lacks IORING_FEAT_EXT_ARG)";
        ret = -ENOSYS;
    }
    if (ret < 0)
        return raise_unavailable(st, -ret, ue.failed_step);
    us_loop *self = (us_loop *)tp->tp_alloc(tp, 0);
    if (!self) {
        ue_loop_close(&ue);
        return NULL;
    }
    self->st = st;
    self->ue = ue;
    self->ue_ready = 1;
    ue_epoll_init(&self->ep);
    self->readers = PyDict_New();
    self->writers = PyDict_New();
    if (!self->readers || !self->writers) {
        Py_DECREF(self);
        return NULL;
    }
    self->time_from_subclass = !loop_time_is_ours(tp);
    return (PyObject *)self;
}

static void timers_clear(us_loop *loop)
{
    ue_timer *t;
    while ((t = ue_timer_first(&loop->ue)) != NULL) {
        ue_timer_remove(&loop->ue, t);
        Py_DECREF((PyObject *)US_CONTAINER(t, us_timer_handle, timer));
    }
}

static int loop_traverse(us_loop *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->readers);
    Py_VISIT(self->writers);
    for (Py_ssize_t i = 0; i < self->ready_len; i++)
        Py_VISIT(self->ready[(self->ready_head + i) & (self->ready_cap - 1)]);
    for (uint32_t i = 0; i < self->ue.heap_len; i++)
        Py_VISIT((PyObject *)US_CONTAINER(self->ue.heap[i], us_timer_handle, timer));
    for (Py_ssize_t i = 0; i < self->flush_len; i++)
        Py_VISIT(self->flush[i]);
    Py_VISIT(self->time_override);
    return 0;
}

static int loop_clear(us_loop *self)
{
    ready_clear(self);
    if (self->ue.heap)
        timers_clear(self);
    Py_CLEAR(self->readers);
    Py_CLEAR(self->writers);
    Py_CLEAR(self->time_override);
    return 0;
}

static void loop_dealloc(us_loop *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    loop_clear(self);
    if (self->ue_ready) {
        /* No op can still be in flight: each holds a reference to the loop. */
        ue_loop_close(&self->ue);
        self->ue_ready = 0;
    } else {
        free(self->ue.heap);
    }
    ue_epoll_close(&self->ep);
    PyMem_Free(self->ready);
    PyMem_Free(self->flush);
    PyMem_Free(self->sock_queue);
    PyMem_Free(self->transport_fds);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* Cancels every op, drops queued work and closes the ring. */
static PyObject *loop_close_core(us_loop *self, PyObject *unused)
{
    (void)unused;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot close a running event loop");
        return NULL;
    }
    self->closing = 1;
    self->closed = 1;
    PyObject *dicts[2] = {self->readers, self->writers};
    for (int d = 0; d < 2; d++) {
        if (!dicts[d])
            continue;
        PyObject *fds = PyDict_Keys(dicts[d]);
        if (!fds)
            return NULL;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++)
            us_loop_remove_watch(self, dicts[d], (int)PyLong_AsLong(PyList_GET_ITEM(fds, i)));
        Py_DECREF(fds);
    }
    for (Py_ssize_t i = 0; i < self->flush_len; i++)
        Py_DECREF(self->flush[i]);
    self->flush_len = 0;
    /* Before ue_loop_close(), which frees the heap: its timers' references
     * would leak, and with them whatever their callbacks hold (a suspended
     * task in a reference cycle could then never be collected). */
    timers_clear(self);
    if (self->ue_ready) {
        if (!ue_loop_forked(&self->ue))
            ue_loop_cancel_all(&self->ue, 1000);
        drop_recv_pool(self);
        ue_loop_close(&self->ue);
        self->ue_ready = 0;
    }
    ue_epoll_close(&self->ep);
    ready_clear(self);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* ---- scheduling ---- */

static int parse_context(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **context,
                         const char *fname)
{
    *context = NULL;
    if (!kwnames)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "context") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, name);
            return -1;
        }
        *context = args[nargs + i];
    }
    return 0;
}

/* Debug mode: the same checks asyncio makes, by calling its own methods. */
static int debug_checks(us_loop *self, PyObject *callback, PyObject *method, int check_thread)
{
    us_state *st = self->st;
    if (check_thread) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, st->s_check_thread);
        if (!r)
            return -1;
        Py_DECREF(r);
    }
    PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self, st->s_check_callback, callback, method, NULL);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *schedule_soon(us_loop *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames,
                               const char *fname, int threadsafe)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *context;
    if (nargs < 1) {
        PyErr_Format(PyExc_TypeError, "%s() missing 1 required positional argument: 'callback'", fname);
        return NULL;
    }
    if (parse_context(args, nargs, kwnames, &context, fname) < 0 || us_loop_check_open(self) < 0)
        return NULL;
    if (self->debug &&
        debug_checks(self, args[0], threadsafe ? self->st->s_call_soon_threadsafe : self->st->s_call_soon,
                     !threadsafe) < 0)
        return NULL;
    us_handle *h = us_handle_new(self, self->st->HandleType, args[0], args + 1, nargs - 1, context);
    if (!h)
        return NULL;
    if (us_ready_push(self, Py_NewRef(h)) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    if (threadsafe && self->ue_ready)
        ue_wakeup(&self->ue);
    return (PyObject *)h;
}

static PyObject *loop_call_soon(us_loop *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    return schedule_soon(self, args, nargsf, kwnames, "call_soon", 0);
}

static PyObject *loop_call_soon_threadsafe(us_loop *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    return schedule_soon(self, args, nargsf, kwnames, "call_soon_threadsafe", 1);
}

static PyObject *schedule_at(us_loop *self, double when, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                             const char *fname)
{
    PyObject *context;
    if (parse_context(args, nargs, kwnames, &context, fname) < 0 || us_loop_check_open(self) < 0)
        return NULL;
    if (self->debug && debug_checks(self, args[0], self->st->s_call_at, 1) < 0)
        return NULL;
    us_timer_handle *t =
        (us_timer_handle *)us_handle_new(self, self->st->TimerHandleType, args[0], args + 1, nargs - 1, context);
    if (!t)
        return NULL;
    if (ue_timer_add(&self->ue, &t->timer, when) < 0) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    Py_INCREF(t); /* the heap's reference */
    t->when_is_int = 0;
    t->when_is_nan = when != when;
    return (PyObject *)t;
}

static PyObject *loop_call_at(us_loop *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "call_at() missing required positional arguments: 'when' and 'callback'");
        return NULL;
    }
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "when cannot be None");
        return NULL;
    }
    double when = PyFloat_AsDouble(args[0]);
    if (when == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *t = schedule_at(self, when, args + 1, nargs - 1, kwnames, "call_at");
    if (t)
        ((us_timer_handle *)t)->when_is_int = PyLong_Check(args[0]);
    return t;
}

/* The scheduler's "now": asyncio's scheduler calls self.time(), so a clock
 * that a subclass or a test puts in place of ours moves the timers. Ours is
 * read in C without a call. */
static int loop_now(us_loop *self, double *now)
{
    if (!self->time_override && !self->time_from_subclass) {
        *now = ue_now();
        return 0;
    }
    PyObject *t = self->time_override ? PyObject_CallNoArgs(self->time_override)
                                      : PyObject_CallMethod((PyObject *)self, "time", NULL);
    if (!t)
        return -1;
    *now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* asyncio's call_later() computes self.time() + delay: a delay of another
 * type gets that addition's result, or its TypeError. */
static int when_by_addition(double now, PyObject *delay, double *when)
{
    PyObject *t = PyFloat_FromDouble(now);
    PyObject *sum = t ? PyNumber_Add(t, delay) : NULL;
    Py_XDECREF(t);
    if (!sum)
        return -1;
    *when = PyFloat_AsDouble(sum);
    Py_DECREF(sum);
    return *when == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *loop_call_later(us_loop *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "call_later() missing required positional arguments: 'delay' and 'callback'");
        return NULL;
    }
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "delay must not be None");
        return NULL;
    }
    double now, when;
    if (loop_now(self, &now) < 0)
        return NULL;
    if (PyFloat_Check(args[0]) || PyLong_Check(args[0])) {
        double delay = PyFloat_AsDouble(args[0]);
        if (delay == -1.0 && PyErr_Occurred())
            return NULL;
        when = now + delay;
    } else if (when_by_addition(now, args[0], &when) < 0)
        return NULL;
    return schedule_at(self, when, args + 1, nargs - 1, kwnames, "call_later");
}

void us_timer_cancelled(us_loop *loop, us_timer_handle *t)
{
    if (ue_timer_scheduled(&t->timer)) {
        ue_timer_remove(&loop->ue, &t->timer);
        Py_DECREF(t); /* the heap's reference; the caller still holds one */
    }
}

static PyObject *loop_time(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyFloat_FromDouble(ue_now());
}

static PyObject *loop_write_to_self(us_loop *self, PyObject *unused)
{
    (void)unused;
    if (self->ue_ready)
        ue_wakeup(&self->ue);
    Py_RETURN_NONE;
}

/* ---- the iteration ---- */

/* Makes the ring usable from the calling thread: enables it the first time,
 * builds a fresh one in a forked child, or when the loop moved to another
 * thread with nothing in flight (SINGLE_ISSUER binds a ring to a thread). */
static int loop_prepare_ring(us_loop *self)
{
    if (!self->ue_ready) {
        PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
        return -1;
    }
    int rebuilt = 0;
    if (ue_loop_forked(&self->ue)) {
        self->sockops_inflight = 0; /* the parent's ops cannot complete here */
        us_loop_sock_queue_reset(self);
        rebuilt = 1;
    }
    int ret = rebuilt ? -EEXIST : ue_loop_start(&self->ue);
    if (ret == -EEXIST) {
        if (self->sockops_inflight) {
            PyErr_Format(PyExc_RuntimeError,
                         "uringloop: this loop's ring belongs to thread %d and %zd socket operations are still "
                         "in flight on it; run the loop on one thread at a time",
                         self->ue.owner_tid, self->sockops_inflight);
            return -1;
        }
        drop_recv_pool(self); /* registered with the old ring */
        ret = ue_loop_rebuild(&self->ue);
        if (ret < 0) {
            raise_unavailable(self->st, -ret, self->ue.failed_step);
            return -1;
        }
        us_loop_rearm_watches(self);
        if (PyErr_Occurred())
            return -1;
        ret = ue_loop_start(&self->ue);
    }
    if (ret < 0)
        return set_errno_error(ret);
    return 0;
}

/* Ready-queue entries that are not handles: I/O objects with work to do. */
static int run_io_item(us_state *st, PyObject *item)
{
    if (Py_TYPE(item) == st->StreamType)
        return us_stream_run(item);
    if (Py_TYPE(item) == st->AcceptorType)
        return us_acceptor_run(item);
    if (Py_TYPE(item) == st->DgramReaderType)
        return us_dgram_run(item);
    return us_fdwatch_run(item);
}

static int run_ready_item(us_loop *self, PyObject *item)
{
    us_state *st = self->st;
    int is_handle = Py_TYPE(item) == st->HandleType || Py_TYPE(item) == st->TimerHandleType;
    if (!self->debug)
        return is_handle ? us_handle_run((us_handle *)item) : run_io_item(st, item);

    if (is_handle && ((us_handle *)item)->cancelled)
        return 0;
    if (PyObject_SetAttr((PyObject *)self, st->s_current_handle, item) < 0)
        return -1;
    double t0 = ue_now();
    int rc = is_handle ? us_handle_run((us_handle *)item) : run_io_item(st, item);
    double dt = ue_now() - t0;
    PyObject *exc_type, *exc, *tb;
    PyErr_Fetch(&exc_type, &exc, &tb);
    if (PyObject_SetAttr((PyObject *)self, st->s_current_handle, Py_None) < 0)
        PyErr_Clear();
    if (rc == 0) {
        /* The Python side compares with slow_callback_duration and logs. */
        PyObject *r = PyObject_CallMethod((PyObject *)self, "_uring_slow_callback", "Od", item, dt);
        if (!r)
            PyErr_WriteUnraisable(item);
        Py_XDECREF(r);
    }
    PyErr_Restore(exc_type, exc, tb);
    return rc;
}

ue_bufring *us_loop_recv_pool(us_loop *loop)
{
    if (!loop->recv_pool_ready) {
        /* 256 x 64 KiB: pages are only touched as buffers get used, and a
         * connection holds a buffer only between a completion and its copy */
        int ret = ue_bufring_init(&loop->ue, &loop->recv_pool, 0, 256, 65536);
        if (ret < 0) {
            set_errno_error(ret);
            return NULL;
        }
        loop->recv_pool_ready = 1;
        loop->recv_pool_gen++;
    }
    return &loop->recv_pool;
}

/* A stream or HTTP connection reserves its place in the flush list when it
 * is made, so that scheduling its flush (inside write(), or in a completion
 * where nobody could be told) never has to grow the list: a failure there
 * would leave the data it queued unsent. Each is in the list at most once
 * an iteration, so the list never outgrows the reservations. */
int us_loop_flush_reserve(us_loop *loop)
{
    if (loop->flushers >= loop->flush_cap) {
        Py_ssize_t cap = loop->flush_cap ? loop->flush_cap * 2 : 64;
        PyObject **f = PyMem_Realloc(loop->flush, (size_t)cap * sizeof *f);
        if (!f) {
            PyErr_NoMemory();
            return -1;
        }
        loop->flush = f;
        loop->flush_cap = cap;
    }
    loop->flushers++;
    return 0;
}

void us_loop_flush_unreserve(us_loop *loop)
{
    loop->flushers--;
}

int us_loop_add_flush(us_loop *loop, PyObject *stream)
{
    if (loop->flush_len == loop->flush_cap) {
        Py_ssize_t cap = loop->flush_cap ? loop->flush_cap * 2 : 64;
        PyObject **f = PyMem_Realloc(loop->flush, (size_t)cap * sizeof *f);
        if (!f) {
            Py_DECREF(stream);
            PyErr_NoMemory();
            return -1;
        }
        loop->flush = f;
        loop->flush_cap = cap;
    }
    loop->flush[loop->flush_len++] = stream;
    return 0;
}

/* Every stream that wrote during the last iteration sends it all now, in
 * one sendmsg each, submitted with this iteration's wait. */
static void flush_writes(us_loop *self)
{
    for (Py_ssize_t i = 0; i < self->flush_len; i++) {
        PyObject *s = self->flush[i];
        if (Py_TYPE(s) == self->st->HttpConnType)
            us_httpconn_flush(s);
        else
            us_stream_flush(s);
        Py_DECREF(s);
    }
    self->flush_len = 0;
}

/* How long the iteration may wait: 0 when callbacks are ready, until the
 * first timer, or -1 (no limit). -2 with an exception. */
static double loop_timeout(us_loop *self)
{
    if (self->ready_len || self->stopping)
        return 0;
    ue_timer *first = ue_timer_first(&self->ue);
    if (!first)
        return -1;
    double now;
    if (loop_now(self, &now) < 0)
        return -2;
    double timeout = first->when - now;
    return timeout < 0 ? 0 : timeout > US_MAX_TIMEOUT ? US_MAX_TIMEOUT : timeout;
}

/* Submits what is queued, waits up to `timeout` and runs the completions'
 * callbacks. */
static int loop_poll(us_loop *self, double timeout)
{
    ue_loop *ue = &self->ue;
    int ret = 0;
    if (self->recv_pool_ready)
        ue_bufring_refill(&self->recv_pool);
    if (timeout == 0) {
        /* Nothing to submit and nothing that can complete: skip the syscall. */
        if (ue->unsubmitted || ue->inflight)
            ret = ue_wait(ue, 0);
    } else {
        ue_wait_prepare(ue, timeout);
        Py_BEGIN_ALLOW_THREADS ret = ue_wait(ue, timeout);
        Py_END_ALLOW_THREADS
    }
    /* A signal may end the wait without -EINTR: when the same enter also
     * submitted SQEs the kernel reports the submit count. Checking is one
     * flag read when nothing is pending. */
    if (timeout != 0 || ret == -EINTR) {
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    if (ret < 0 && ret != -EINTR)
        return set_errno_error(ret);
    ue_dispatch(ue);
    return PyErr_Occurred() ? -1 : 0;
}

/* Due timers join the ready queue; the heap's reference moves with them.
 * asyncio adds its clock resolution (1 ns for CLOCK_MONOTONIC). */
static int loop_expire_timers(us_loop *self)
{
    double now;
    if (loop_now(self, &now) < 0)
        return -1;
    double end = now + 1e-9;
    ue_timer *first;
    while ((first = ue_timer_first(&self->ue)) != NULL && first->when < end) {
        ue_timer_remove(&self->ue, first);
        if (us_ready_push(self, (PyObject *)US_CONTAINER(first, us_timer_handle, timer)) < 0)
            return -1;
    }
    return 0;
}

/* Runs only what is ready now; what these callbacks schedule waits for the
 * next iteration, as in asyncio. */
static int loop_run_ready(us_loop *self)
{
    Py_ssize_t ntodo = self->ready_len;
    for (Py_ssize_t i = 0; i < ntodo && self->ready_len; i++) {
        PyObject *item = ready_pop(self);
        int rc = run_ready_item(self, item);
        Py_DECREF(item);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* One iteration, as asyncio's _run_once: the writes queued since the last
 * one go out, then wait, completions, due timers, ready callbacks. */
static int loop_run_once(us_loop *self)
{
    if (self->flush_len)
        flush_writes(self);
    self->defer_budget = US_DEFER_BUDGET;
    double timeout = loop_timeout(self);
    if (timeout == -2 || loop_poll(self, timeout) < 0 || loop_expire_timers(self) < 0)
        return -1;
    return loop_run_ready(self);
}

static PyObject *loop_run_once_method(us_loop *self, PyObject *unused)
{
    (void)unused;
    if (loop_prepare_ring(self) < 0)
        return NULL;
    if (loop_run_once(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *loop_run_forever_inner(us_loop *self, PyObject *unused)
{
    (void)unused;
    if (loop_prepare_ring(self) < 0)
        return NULL;
    self->running = 1;
    int rc;
    while ((rc = loop_run_once(self)) == 0 && !self->stopping) {
    }
    self->running = 0;
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- readers and writers (the watch objects live in us_fdwatch.c) ---- */

/* The fd of an int or of an object's fileno(), with the errors of asyncio's
 * selectors: "Invalid file object: ..." and "Invalid file descriptor: -1". */
static int fd_from_object(PyObject *obj)
{
    int fd = PyObject_AsFileDescriptor(obj);
    if (fd >= 0)
        return fd;
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "Invalid file object: %R", obj);
    } else if (PyErr_ExceptionMatches(PyExc_ValueError)) { /* a negative number */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *n = PyLong_Check(obj) ? Py_NewRef(obj) : PyObject_CallMethod(obj, "fileno", NULL);
        if (n && PyLong_Check(n)) {
            PyErr_Format(PyExc_ValueError, "Invalid file descriptor: %S", n);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
        } else {
            PyErr_Clear();
            PyErr_Restore(et, ev, tb);
        }
        Py_XDECREF(n);
    }
    return -1;
}

static PyObject *add_watch(us_loop *self, PyObject *dict, short events, PyObject *const *args, Py_ssize_t nargsf)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "expected (fd, callback, *args)");
        return NULL;
    }
    int fd = fd_from_object(args[0]);
    if (fd < 0)
        return NULL;
    if (us_loop_check_open(self) < 0)
        return NULL;
    /* a closed fd is refused by epoll_ctl() (EBADF), as by asyncio's selector */
    return us_loop_add_watch(self, dict, fd, args[0], events, args + 1, nargs - 1);
}

static PyObject *loop_add_reader(us_loop *self, PyObject *const *args, Py_ssize_t nargsf)
{
    return add_watch(self, self->readers, POLLIN, args, nargsf);
}

static PyObject *loop_add_writer(us_loop *self, PyObject *const *args, Py_ssize_t nargsf)
{
    return add_watch(self, self->writers, POLLOUT, args, nargsf);
}

/* The fd of a registered object, even one closed since it was registered. */
static int watched_fd_from_object(PyObject *dict, PyObject *obj)
{
    int fd = fd_from_object(obj);
    return fd >= 0 ? fd : us_loop_watch_fd_of(dict, obj);
}

static PyObject *remove_watch(us_loop *self, PyObject *dict, PyObject *fdobj)
{
    int fd = watched_fd_from_object(self->closed ? NULL : dict, fdobj);
    if (fd < 0)
        return NULL;
    if (self->closed || !dict)
        Py_RETURN_FALSE;
    int r = us_loop_remove_watch(self, dict, fd);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *loop_remove_reader(us_loop *self, PyObject *fd)
{
    return remove_watch(self, self->readers, fd);
}

static PyObject *loop_remove_writer(us_loop *self, PyObject *fd)
{
    return remove_watch(self, self->writers, fd);
}

static PyObject *get_watch_handle(PyObject *dict, PyObject *fdobj)
{
    int fd = watched_fd_from_object(dict, fdobj);
    if (fd < 0)
        return NULL;
    PyObject *key = PyLong_FromLong(fd);
    if (!key)
        return NULL;
    PyObject *w = dict ? PyDict_GetItemWithError(dict, key) : NULL;
    Py_DECREF(key);
    if (!w)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    return PyObject_GetAttrString(w, "handle");
}

static PyObject *loop_get_reader(us_loop *self, PyObject *fd)
{
    return get_watch_handle(self->readers, fd);
}
static PyObject *loop_get_writer(us_loop *self, PyObject *fd)
{
    return get_watch_handle(self->writers, fd);
}

/* ---- introspection for tests and diagnostics ---- */

static PyObject *loop_uring_info(us_loop *self, PyObject *unused)
{
    (void)unused;
    static const char *modes[] = {"single_issuer+defer_taskrun", "coop_taskrun", "plain"};
    return Py_BuildValue("{s:s,s:I,s:i,s:I,s:n,s:i,s:I,s:I,s:n,s:O}", "mode", modes[self->ue.mode], "features",
                         self->ue.features, "ring_fd", self->ue.ring_fd, "inflight", self->ue.inflight,
                         "sockops_inflight", self->sockops_inflight, "owner_tid", self->ue.owner_tid, "sq_entries",
                         self->ue.sq_size, "cq_entries", self->ue.cq_size, "timers", (Py_ssize_t)self->ue.heap_len,
                         "quiet_sends", self->ue.quiet_ok ? Py_True : Py_False);
}

/* BaseEventLoop.create_future() and get_debug(), in C: every await on a
 * stream, a lock or a queue creates a future, and creating one asks the
 * loop for get_debug(); as Python methods they were two calls per round
 * trip of a streams echo. */
static PyObject *loop_create_future(us_loop *self, PyObject *unused)
{
    (void)unused;
    PyObject *args[1] = {(PyObject *)self};
    return PyObject_Vectorcall(self->st->future_type, args, 0, self->st->kw_loop);
}

static PyObject *loop_get_debug(us_loop *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(self->debug);
}

/* ---- attributes shared with asyncio.BaseEventLoop ---- */

#define US_FLAG_GETSET(name)                                                                                           \
    static PyObject *get_##name(us_loop *self, void *c)                                                                \
    {                                                                                                                  \
        (void)c;                                                                                                       \
        return PyBool_FromLong(self->name);                                                                            \
    }                                                                                                                  \
    static int set_##name(us_loop *self, PyObject *v, void *c)                                                         \
    {                                                                                                                  \
        (void)c;                                                                                                       \
        int b = v ? PyObject_IsTrue(v) : 0;                                                                            \
        if (b < 0)                                                                                                     \
            return -1;                                                                                                 \
        self->name = (char)b;                                                                                          \
        return 0;                                                                                                      \
    }

US_FLAG_GETSET(stopping)
US_FLAG_GETSET(closed)
US_FLAG_GETSET(debug)

static PyObject *get_ready_count(us_loop *self, void *c)
{
    (void)c;
    return PyLong_FromSsize_t(self->ready_len);
}

/* A clock set on the loop object (`loop.time = fake`, mock.patch.object) is
 * noticed here, so that the scheduler follows it as asyncio's would; `time`
 * itself stays a plain C method, with no cost to read or call. */
static int loop_setattro(us_loop *self, PyObject *name, PyObject *v)
{
    if (PyObject_GenericSetAttr((PyObject *)self, name, v) < 0)
        return -1;
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "time") == 0)
        Py_XSETREF(self->time_override, Py_XNewRef(v));
    return 0;
}

static PyGetSetDef loop_getset[] = {
    {"_stopping", (getter)get_stopping, (setter)set_stopping, NULL, NULL},
    {"_closed", (getter)get_closed, (setter)set_closed, NULL, NULL},
    {"_debug", (getter)get_debug, (setter)set_debug, NULL, NULL},
    {"_ready_count", (getter)get_ready_count, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef loop_methods[] = {
    {"call_soon", (PyCFunction)(void (*)(void))loop_call_soon, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"call_soon_threadsafe", (PyCFunction)(void (*)(void))loop_call_soon_threadsafe, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"call_later", (PyCFunction)(void (*)(void))loop_call_later, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"call_at", (PyCFunction)(void (*)(void))loop_call_at, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"time", (PyCFunction)loop_time, METH_NOARGS, NULL},
    {"create_future", (PyCFunction)loop_create_future, METH_NOARGS, NULL},
    {"get_debug", (PyCFunction)loop_get_debug, METH_NOARGS, NULL},
    {"_write_to_self", (PyCFunction)loop_write_to_self, METH_NOARGS, NULL},
    {"_run_once", (PyCFunction)loop_run_once_method, METH_NOARGS, NULL},
    {"_run_forever_inner", (PyCFunction)loop_run_forever_inner, METH_NOARGS, NULL},
    {"_close_core", (PyCFunction)loop_close_core, METH_NOARGS, NULL},
    {"_add_reader", (PyCFunction)(void (*)(void))loop_add_reader, METH_FASTCALL, NULL},
    {"_add_writer", (PyCFunction)(void (*)(void))loop_add_writer, METH_FASTCALL, NULL},
    {"_remove_reader", (PyCFunction)loop_remove_reader, METH_O, NULL},
    {"_remove_writer", (PyCFunction)loop_remove_writer, METH_O, NULL},
    {"_get_reader", (PyCFunction)loop_get_reader, METH_O, NULL},
    {"_get_writer", (PyCFunction)loop_get_writer, METH_O, NULL},
    {"_sock_op", (PyCFunction)(void (*)(void))us_loop_sock_op, METH_FASTCALL, NULL},
    {"_transport_fd_added", (PyCFunction)us_loop_transport_fd_added, METH_O, NULL},
    {"_stream_new", (PyCFunction)(void (*)(void))us_stream_new, METH_FASTCALL, NULL},
    {"_acceptor_new", (PyCFunction)(void (*)(void))us_acceptor_new, METH_FASTCALL, NULL},
    {"_dgram_reader", (PyCFunction)(void (*)(void))us_dgram_reader_new, METH_FASTCALL, NULL},
    {"_uring_info", (PyCFunction)loop_uring_info, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot loop_slots[] = {
    {Py_tp_new, loop_new},
    {Py_tp_dealloc, loop_dealloc},
    {Py_tp_traverse, loop_traverse},
    {Py_tp_clear, loop_clear},
    {Py_tp_methods, loop_methods},
    {Py_tp_getset, loop_getset},
    {Py_tp_setattro, loop_setattro},
    {Py_tp_doc, "The io_uring core of uringloop.Loop."},
    {0, NULL},
};

PyType_Spec us_loop_spec = {
    .name = "uringloop._core.LoopCore",
    .basicsize = sizeof(us_loop),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .slots = loop_slots,
};
