/*
 * sock_* as io_uring operations.
 *
 * Each call is a SockOp: it owns its buffer (or a Py_buffer view of the
 * caller's) until the op's final CQE, and resolves a future. The future is a
 * uringloop._SockFuture whose cancel() cancels the op. A cancel can race with
 * completion: when data arrives for a future that was already cancelled, it
 * is handed to loop._sock_stash(), and the next sock_recv* / sock_accept on
 * that socket returns it first, so cancelling loses no data.
 *
 * Receives on one socket run one at a time, in call order, and so do
 * sock_sendall() calls: a later call waits in the socket's queue until the
 * one before it is over. Two receives in flight at once would be served in
 * the kernel's order, the later call first (asyncio's second call replaces
 * the first, which then never completes), and two sends could interleave.
 */
#include "us.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

enum us_sock_kind {
    US_SK_RECV = 0,
    US_SK_RECV_INTO = 1,
    US_SK_RECVFROM = 2,
    US_SK_RECVFROM_INTO = 3,
    US_SK_SENDALL = 4,
    US_SK_SENDTO = 5,
    US_SK_CONNECT = 6,
    US_SK_ACCEPT = 7,
};

typedef struct us_sockop {
    PyObject_HEAD ue_op op;
    us_loop *loop;
    PyObject *fut;
    PyObject *sock;
    PyObject *obj; /* the bytes being filled (recv, recvfrom) */
    Py_buffer view;
    char has_view;
    uint8_t kind;
    int fd;
    size_t len, done;
    struct msghdr msg;
    struct iovec iov;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    struct us_sockop *queued_next; /* the op waiting for this one (holds its reference) */
    char queued;                   /* waiting for the op before it: not in the kernel yet */
} us_sockop;

/* ---- socket addresses ---- */

PyObject *us_sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[INET6_ADDRSTRLEN];
    if (len == 0)
        Py_RETURN_NONE;
    switch (ss->ss_family) {
    case AF_INET: {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    case AF_INET6: {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo), a->sin6_scope_id);
    }
    case AF_UNIX: {
        const struct sockaddr_un *a = (const struct sockaddr_un *)ss;
        size_t n = len > offsetof(struct sockaddr_un, sun_path) ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (n > 0 && a->sun_path[0] == 0)
            return PyBytes_FromStringAndSize(a->sun_path, (Py_ssize_t)n); /* abstract namespace */
        return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)strnlen(a->sun_path, n));
    }
    default:
        return Py_BuildValue("(iy#)", ss->ss_family, (const char *)ss, (Py_ssize_t)len);
    }
}

/* A numeric host ("1.2.3.4", "::1", "fe80::1%eth0", or the socket
 * module's "" and "<broadcast>") and the other fields into *ss. Returns -2
 * when the host is a name. */
static int ip_sockaddr(int family, const char *host, uint16_t port, unsigned long flowinfo, unsigned long scope_id,
                       struct sockaddr_storage *ss, socklen_t *len)
{
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        /* the socket module's two names: "" is any address, "<broadcast>" the broadcast one */
        if (!host[0] || !strcmp(host, "<broadcast>"))
            a->sin_addr.s_addr = htonl(host[0] ? INADDR_BROADCAST : INADDR_ANY);
        else if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            return -2;
        *len = sizeof *a;
        return 0;
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    a->sin6_flowinfo = htonl((uint32_t)flowinfo);
    a->sin6_scope_id = (uint32_t)scope_id;
    *len = sizeof *a;
    if (!host[0]) { /* any address, as for AF_INET */
        a->sin6_addr = in6addr_any;
        return 0;
    }
    char buf[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    const char *pct = strchr(host, '%');
    if (pct) {
        size_t n = (size_t)(pct - host);
        if (n >= sizeof buf)
            return -2;
        memcpy(buf, host, n);
        buf[n] = 0;
        unsigned idx = if_nametoindex(pct + 1);
        if (!idx)
            return -2;
        a->sin6_scope_id = idx;
        host = buf;
    }
    return inet_pton(AF_INET6, host, &a->sin6_addr) == 1 ? 0 : -2;
}

/* A Unix socket path: str (file system encoding) or any bytes-like object,
 * as the socket module takes it; an empty or NUL-led one is abstract. */
static int unix_sockaddr_from_py(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    struct sockaddr_un *a = (struct sockaddr_un *)ss;
    PyObject *obj = PyUnicode_Check(addr) ? PyUnicode_EncodeFSDefault(addr) : Py_NewRef(addr);
    Py_buffer path;
    if (!obj)
        return -1;
    if (PyObject_GetBuffer(obj, &path, PyBUF_SIMPLE) < 0) {
        Py_DECREF(obj);
        return -1;
    }
    const char *p = path.buf;
    size_t n = (size_t)path.len;
    int abstract = n == 0 || p[0] == 0;
    int rc = 0;
    if (n + (abstract ? 0 : 1) > sizeof a->sun_path) {
        PyErr_SetString(PyExc_OSError, "AF_UNIX path too long");
        rc = -1;
    } else {
        a->sun_family = AF_UNIX;
        memcpy(a->sun_path, p, n);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (abstract ? 0 : 1));
    }
    PyBuffer_Release(&path);
    Py_DECREF(obj);
    return rc;
}

/* An IP address tuple's host as the socket module's converter takes it
 * (str, bytes, bytearray), borrowed: no copy per call; *n is its length.
 * NULL with TypeError for another type; NULL without an error for a str
 * that is not ASCII, which can only be a name for the resolver. */
static const char *ip_host_chars(PyObject *host, Py_ssize_t *n)
{
    const char *p;
    if (PyUnicode_Check(host)) {
        if (!PyUnicode_IS_ASCII(host))
            return NULL;
        p = PyUnicode_AsUTF8AndSize(host, n);
    } else if (PyBytes_Check(host)) {
        p = PyBytes_AS_STRING(host);
        *n = PyBytes_GET_SIZE(host);
    } else if (PyByteArray_Check(host)) {
        p = PyByteArray_AS_STRING(host);
        *n = PyByteArray_GET_SIZE(host);
    } else {
        PyErr_Format(PyExc_TypeError, "str, bytes or bytearray expected, not %s", Py_TYPE(host)->tp_name);
        return NULL;
    }
    return p;
}

/* The fields of an AF_INET/AF_INET6 tuple, checked as the socket module
 * checks them, with its messages: `caller` is "sendto" or "connect". */
static int ip_fields_from_py(int family, const char *caller, PyObject *addr, const char **host, Py_ssize_t *host_len,
                             long *port, unsigned long *flowinfo, unsigned long *scope_id)
{
    const char *fam = family == AF_INET ? "AF_INET" : "AF_INET6";
    Py_ssize_t n = PyTuple_Check(addr) ? PyTuple_GET_SIZE(addr) : -1;
    if (n < 0) {
        PyErr_Format(PyExc_TypeError, "%s(): %s address must be tuple, not %.500s", caller, fam,
                     Py_TYPE(addr)->tp_name);
        return -1;
    }
    if (family == AF_INET ? n != 2 : n < 2 || n > 4) {
        PyErr_SetString(PyExc_TypeError, family == AF_INET
                                             ? "AF_INET address must be a pair (host, port)"
                                             : "AF_INET6 address must be a tuple (host, port[, flowinfo[, scopeid]])");
        return -1;
    }
    if (!(*host = ip_host_chars(PyTuple_GET_ITEM(addr, 0), host_len)))
        return -1; /* with no error set: a name for the resolver */
    int overflow;
    *port = PyLong_AsLongAndOverflow(PyTuple_GET_ITEM(addr, 1), &overflow);
    if (*port == -1 && PyErr_Occurred())
        return -1;
    if (overflow || *port < 0 || *port > 65535) {
        PyErr_Format(PyExc_OverflowError, "%s(): port must be 0-65535.", caller);
        return -1;
    }
    unsigned long *rest[2] = {flowinfo, scope_id};
    for (Py_ssize_t i = 2; i < n; i++) {
        *rest[i - 2] = PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(addr, i));
        if (*rest[i - 2] == (unsigned long)-1 && PyErr_Occurred())
            return -1;
    }
    if (*flowinfo > 0xfffff) {
        PyErr_Format(PyExc_OverflowError, "%s(): flowinfo must be 0-1048575.", caller);
        return -1;
    }
    return 0;
}

/* Numeric addresses only: uringloop.Loop resolves names first, as asyncio
 * does. Returns -2 (no exception) for a name or a family handled in
 * Python. Errors are the socket module's, with its messages. */
static int sockaddr_from_py(int family, const char *caller, PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET || family == AF_INET6) {
        const char *host;
        Py_ssize_t host_len;
        long port;
        unsigned long flowinfo = 0, scope_id = 0;
        if (ip_fields_from_py(family, caller, addr, &host, &host_len, &port, &flowinfo, &scope_id) < 0)
            return PyErr_Occurred() ? -1 : -2;
        if (strlen(host) != (size_t)host_len) /* a NUL inside: the resolver's to refuse */
            return -2;
        return ip_sockaddr(family, host, (uint16_t)port, flowinfo, scope_id, ss, len);
    }
    if (family == AF_UNIX)
        return unix_sockaddr_from_py(addr, ss, len);
    return -2;
}

/* ---- lifecycle ---- */

static int sockop_traverse(us_sockop *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->loop);
    Py_VISIT(s->fut);
    Py_VISIT(s->sock);
    Py_VISIT(s->obj);
    return 0;
}

static int sockop_clear(us_sockop *s)
{
    /* Only reached once the op is idle: an op in flight holds a reference
     * to itself, so the collector never sees it as garbage. */
    Py_CLEAR(s->fut);
    Py_CLEAR(s->sock);
    Py_CLEAR(s->obj);
    Py_CLEAR(s->loop);
    return 0;
}

static void sockop_dealloc(us_sockop *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    if (s->has_view) {
        PyBuffer_Release(&s->view);
        s->has_view = 0;
    }
    sockop_clear(s);
    tp->tp_free(s);
    Py_DECREF(tp);
}

static PyObject *sockop_cancel(us_sockop *s, PyObject *unused)
{
    (void)unused;
    if (!s->loop || !s->loop->ue_ready || s->queued)
        Py_RETURN_NONE; /* a queued op is dropped when its turn comes (sock_queue_advance) */
    if (ue_op_cancel(&s->loop->ue, &s->op) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef sockop_methods[] = {
    {"cancel", (PyCFunction)sockop_cancel, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot sockop_slots[] = {
    {Py_tp_dealloc, sockop_dealloc},
    {Py_tp_traverse, sockop_traverse},
    {Py_tp_clear, sockop_clear},
    {Py_tp_methods, sockop_methods},
    {0, NULL},
};

PyType_Spec us_sockop_spec = {
    .name = "uringloop._core.SockOp",
    .basicsize = sizeof(us_sockop),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = sockop_slots,
};

/* ---- completion ---- */

static int future_is_done(PyObject *fut, us_state *st)
{
    PyObject *r = PyObject_CallMethodNoArgs(fut, st->s_done);
    if (!r)
        return -1;
    int done = PyObject_IsTrue(r);
    Py_DECREF(r);
    return done;
}

static PyObject *sockop_result(us_sockop *s, int32_t res)
{
    switch (s->kind) {
    case US_SK_RECV:
        if ((size_t)res < s->len && _PyBytes_Resize(&s->obj, res) < 0)
            return NULL;
        return Py_NewRef(s->obj);
    case US_SK_RECV_INTO:
    case US_SK_SENDTO:
        return PyLong_FromLong(res);
    case US_SK_RECVFROM: {
        if ((size_t)res < s->len && _PyBytes_Resize(&s->obj, res) < 0)
            return NULL;
        PyObject *addr = us_sockaddr_to_py(&s->addr, s->msg.msg_namelen);
        return addr ? Py_BuildValue("(ON)", s->obj, addr) : NULL;
    }
    case US_SK_RECVFROM_INTO: {
        PyObject *addr = us_sockaddr_to_py(&s->addr, s->msg.msg_namelen);
        return addr ? Py_BuildValue("(iN)", res, addr) : NULL;
    }
    case US_SK_ACCEPT: {
        PyObject *addr = us_sockaddr_to_py(&s->addr, s->addrlen);
        return addr ? Py_BuildValue("(iN)", res, addr) : NULL;
    }
    default:
        Py_RETURN_NONE;
    }
}

/* What a cancelled op had already taken from the socket, or NULL. */
static PyObject *sockop_leftover(us_sockop *s, int32_t res)
{
    if (s->kind == US_SK_ACCEPT)
        return sockop_result(s, res);
    if (res <= 0)
        return NULL;
    if (s->kind == US_SK_RECV_INTO || s->kind == US_SK_RECVFROM_INTO) {
        PyObject *data = PyBytes_FromStringAndSize(s->view.buf, res);
        if (!data || s->kind == US_SK_RECV_INTO)
            return data;
        PyObject *addr = us_sockaddr_to_py(&s->addr, s->msg.msg_namelen);
        return addr ? Py_BuildValue("(NN)", data, addr) : (Py_DECREF(data), NULL);
    }
    if (s->kind == US_SK_RECV || s->kind == US_SK_RECVFROM)
        return sockop_result(s, res);
    return NULL;
}

/* The op completed after its future was done (cancelled): what it took
 * (data, or an accepted socket) goes to the loop's stash for the next call
 * of its kind. -1 with an exception. */
static int sockop_stash_late(us_sockop *s, int32_t res)
{
    us_state *st = s->loop->st;
    if (res < 0)
        return 0;
    PyObject *left = sockop_leftover(s, res);
    if (!left) {
        if (s->kind == US_SK_ACCEPT)
            close(res);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *kind = PyLong_FromLong(s->kind);
    PyObject *r =
        kind ? PyObject_CallMethodObjArgs((PyObject *)s->loop, st->s_sock_stash, s->sock, kind, left, NULL) : NULL;
    Py_XDECREF(kind);
    Py_DECREF(left);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The future gets the kernel's error as the OSError socket calls raise. */
static PyObject *sockop_fail_future(us_sockop *s, int32_t res)
{
    PyObject *ev = us_oserror_from_res(res);
    PyObject *r = ev ? PyObject_CallMethodOneArg(s->fut, s->loop->st->s_set_exception, ev) : NULL;
    Py_XDECREF(ev);
    return r;
}

/* An op's final completion: its future gets the result or the error (an
 * accepted socket nobody waits for any more is closed). */
static void sockop_finish(us_sockop *s, int32_t res)
{
    us_loop *loop = s->loop;
    us_state *st = loop->st;
    PyObject *fut = s->fut;
    if (!fut || loop->closing) {
        if (s->kind == US_SK_ACCEPT && res >= 0)
            close(res);
        return;
    }
    int done = future_is_done(fut, st);
    if (done < 0 || (done && sockop_stash_late(s, res) < 0))
        goto report;
    if (done)
        return;
    if (s->kind == US_SK_CONNECT && res >= 0) {
        /* Writable: the connect is over, and SO_ERROR says how. Read only
         * for a live future, since reading clears it (a cancelled
         * sock_connect() leaves it to the next connect(), as asyncio does). */
        int err = 0;
        socklen_t elen = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
            err = errno;
        res = -err;
    }
    if (res == -ECANCELED)
        return; /* cancelled without the future's knowledge: loop teardown */
    PyObject *r;
    if (res < 0) {
        r = sockop_fail_future(s, res);
    } else {
        PyObject *value = sockop_result(s, res);
        if (!value)
            goto report;
        r = PyObject_CallMethodOneArg(fut, st->s_set_result, value);
        Py_DECREF(value);
    }
    if (!r)
        goto report;
    Py_DECREF(r);
    return;
report:
    us_report_exception(loop, NULL, NULL);
}

static int sockop_prep(us_sockop *s, struct io_uring_sqe *sqe);
static void sockop_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

/* ---- the per-socket queues ---- */

/* 0: receives, 1: sends, -1: not queued (accept, connect, sendto). */
static int sock_queue_dir(int kind)
{
    if (kind <= US_SK_RECVFROM_INTO)
        return 0;
    return kind == US_SK_SENDALL ? 1 : -1;
}

static us_sockop **sock_queue_slot(us_loop *loop, int fd, int dir, int grow)
{
    if (fd >= loop->sock_queue_cap) {
        if (!grow)
            return NULL;
        int cap = loop->sock_queue_cap ? loop->sock_queue_cap : 64;
        while (cap <= fd)
            cap *= 2;
        us_sockop **v = PyMem_Realloc(loop->sock_queue, (size_t)cap * 2 * sizeof *v);
        if (!v) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(v + (size_t)loop->sock_queue_cap * 2, 0, (size_t)(cap - loop->sock_queue_cap) * 2 * sizeof *v);
        loop->sock_queue = v;
        loop->sock_queue_cap = cap;
    }
    return &loop->sock_queue[fd * 2 + dir];
}

/* A forked child: the parent's ops will never complete here. */
void us_loop_sock_queue_reset(us_loop *loop)
{
    if (loop->sock_queue)
        memset(loop->sock_queue, 0, (size_t)loop->sock_queue_cap * 2 * sizeof *loop->sock_queue);
}

static int sockop_submit(us_sockop *s)
{
    struct io_uring_sqe *sqe = ue_sqe(&s->loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: the io_uring submission queue is full");
        return -1;
    }
    sockop_prep(s, sqe);
    ue_op_arm(&s->loop->ue, &s->op, sqe, sockop_cb);
    return 0;
}

/* The op is over: its future no longer cancels it. */
static void sockop_forget_future(us_sockop *s)
{
    if (!s->fut)
        return;
    if (PyObject_SetAttr(s->fut, s->loop->st->s_uring_op, Py_None) < 0)
        PyErr_Clear();
    Py_CLEAR(s->fut);
}

/* Drops a queued op that will not run (cancelled meanwhile, the loop
 * closing, or no room to submit it); its future is left as it is. */
static void sockop_drop_queued(us_sockop *s)
{
    s->queued = 0;
    s->loop->sockops_inflight--;
    sockop_forget_future(s);
    Py_DECREF(s); /* the queue's reference */
}

/* `s` is over: the op waiting behind it goes to the kernel. */
static void sock_queue_advance(us_sockop *s)
{
    us_loop *loop = s->loop;
    int dir = sock_queue_dir(s->kind);
    if (dir < 0)
        return;
    us_sockop **slot = sock_queue_slot(loop, s->fd, dir, 0);
    if (slot && *slot == s)
        *slot = NULL;
    us_sockop *next = s->queued_next;
    s->queued_next = NULL;
    while (next) {
        us_sockop *after = next->queued_next;
        int live = !loop->closing && next->fut && future_is_done(next->fut, loop->st) == 0;
        if (live && sockop_submit(next) == 0) {
            next->queued = 0; /* the queue's reference is now the in-flight one */
            return;
        }
        if (live) { /* no room in the ring: the caller hears of it */
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyObject *r = ev ? PyObject_CallMethodOneArg(next->fut, loop->st->s_set_exception, ev) : NULL;
            Py_XDECREF(r);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
        }
        PyErr_Clear();
        next->queued_next = NULL;
        if (slot && *slot == next)
            *slot = NULL;
        sockop_drop_queued(next);
        next = after;
    }
}

static void sockop_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_sockop *s = US_CONTAINER(op, us_sockop, op);
    us_loop *loop = s->loop;
    if (s->kind == US_SK_SENDALL && res > 0 && !loop->closing && s->fut) {
        s->done += (size_t)res;
        int fut_done = future_is_done(s->fut, loop->st);
        if (s->done < s->len && fut_done == 0) {
            /* Short send: continue from where the kernel stopped. */
            struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
            if (sqe) {
                sockop_prep(s, sqe);
                ue_op_arm(&loop->ue, &s->op, sqe, sockop_cb);
                return; /* keeps the in-flight reference */
            }
            res = -EBUSY;
        }
        if (fut_done < 0)
            PyErr_Clear();
        if (res > 0)
            res = (int32_t)s->done;
    }
    loop->sockops_inflight--;
    sockop_finish(s, res);
    sockop_forget_future(s);
    sock_queue_advance(s);
    Py_DECREF(s); /* the in-flight reference */
}

/* ---- submission ---- */

static int sockop_prep(us_sockop *s, struct io_uring_sqe *sqe)
{
    switch (s->kind) {
    case US_SK_RECV:
        io_uring_prep_recv(sqe, s->fd, PyBytes_AS_STRING(s->obj), ue_io_len(s->len), 0);
        break;
    case US_SK_RECV_INTO:
        io_uring_prep_recv(sqe, s->fd, s->view.buf, ue_io_len(s->len), 0);
        break;
    case US_SK_RECVFROM:
    case US_SK_RECVFROM_INTO:
        s->iov.iov_base = s->kind == US_SK_RECVFROM ? PyBytes_AS_STRING(s->obj) : s->view.buf;
        s->iov.iov_len = s->len;
        memset(&s->msg, 0, sizeof s->msg);
        s->msg.msg_name = &s->addr;
        s->msg.msg_namelen = sizeof s->addr;
        s->msg.msg_iov = &s->iov;
        s->msg.msg_iovlen = 1;
        io_uring_prep_recvmsg(sqe, s->fd, &s->msg, 0);
        break;
    case US_SK_SENDALL:
        io_uring_prep_send(sqe, s->fd, (const char *)s->view.buf + s->done, ue_io_len(s->len - s->done), MSG_NOSIGNAL);
        break;
    case US_SK_SENDTO:
        s->iov.iov_base = s->view.buf;
        s->iov.iov_len = s->len;
        memset(&s->msg, 0, sizeof s->msg);
        s->msg.msg_name = &s->addr;
        s->msg.msg_namelen = s->addrlen;
        s->msg.msg_iov = &s->iov;
        s->msg.msg_iovlen = 1;
        io_uring_prep_sendmsg(sqe, s->fd, &s->msg, MSG_NOSIGNAL);
        break;
    case US_SK_CONNECT: /* connect() is under way: wait for its end, as asyncio's writer does */
        io_uring_prep_poll_add(sqe, s->fd, POLLOUT);
        break;
    case US_SK_ACCEPT:
        s->addrlen = sizeof s->addr;
        io_uring_prep_accept(sqe, s->fd, (struct sockaddr *)&s->addr, &s->addrlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        break;
    }
    return 0;
}

static int sock_fd(us_state *st, PyObject *sock)
{
    if (st->socket_fd_off >= 0 && PyObject_TypeCheck(sock, st->socket_type)) {
        int fd = *(int *)((char *)sock + st->socket_fd_off);
        if (fd >= 0)
            return fd;
        errno = EBADF; /* a closed socket.socket */
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0 && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return fd;
}

/* asyncio's checks at the start of every sock_* call (BaseEventLoop's
 * _check_ssl_socket, and the blocking socket refused in debug mode). */
static int sock_check(us_loop *loop, PyObject *sock)
{
    us_state *st = loop->st;
    if (st->ssl_socket && st->ssl_socket != Py_None) {
        int is_ssl = PyObject_IsInstance(sock, st->ssl_socket);
        if (is_ssl) {
            if (is_ssl > 0)
                PyErr_SetString(PyExc_TypeError, "Socket cannot be of type SSLSocket");
            return -1;
        }
    }
    if (!loop->debug)
        return 0;
    PyObject *timeout = PyObject_CallMethodNoArgs(sock, st->s_gettimeout);
    if (!timeout)
        return -1;
    PyObject *zero = PyLong_FromLong(0);
    int blocking = zero ? PyObject_RichCompareBool(timeout, zero, Py_NE) : -1;
    Py_XDECREF(zero);
    Py_DECREF(timeout);
    if (blocking > 0)
        PyErr_SetString(PyExc_ValueError, "the socket must be non-blocking");
    return blocking ? -1 : 0;
}

/* The socket's family and type: read from a socket.socket, else asked of
 * the kernel. */
static int sock_family_type(us_state *st, PyObject *sock, int fd, int *family, int *type)
{
    if (st->socket_family_off >= 0 && st->socket_type_off >= 0 && PyObject_TypeCheck(sock, st->socket_type)) {
        *family = *(int *)((char *)sock + st->socket_family_off);
        *type = *(int *)((char *)sock + st->socket_type_off);
        return 0;
    }
    socklen_t flen = sizeof *family, tlen = sizeof *type;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, family, &flen) < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, type, &tlen) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* A size argument as the socket module's "n" format reads it: any object
 * with __index__ ("'float' object cannot be interpreted as an integer"). */
static Py_ssize_t size_from_py(PyObject *o)
{
    PyObject *i = PyNumber_Index(o);
    if (!i)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(i);
    Py_DECREF(i);
    return n;
}

static int sockop_setup(us_sockop *s, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *a = nargs > 2 ? args[2] : Py_None;
    PyObject *b = nargs > 3 ? args[3] : Py_None;
    switch (s->kind) {
    case US_SK_RECV:
    case US_SK_RECVFROM: {
        Py_ssize_t n = size_from_py(a);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (n < 0) {
            PyErr_SetString(PyExc_ValueError,
                            s->kind == US_SK_RECV ? "negative buffersize in recv" : "negative buffersize in recvfrom");
            return -1;
        }
        s->obj = PyBytes_FromStringAndSize(NULL, n);
        s->len = (size_t)n;
        return s->obj ? 0 : -1;
    }
    case US_SK_RECV_INTO:
    case US_SK_RECVFROM_INTO: {
        if (PyObject_GetBuffer(a, &s->view, PyBUF_WRITABLE) < 0) { /* the message of the socket module's "w*" */
            PyErr_Format(PyExc_TypeError, "%s() argument 1 must be read-write bytes-like object, not %.50s",
                         s->kind == US_SK_RECV_INTO ? "recv_into" : "recvfrom_into",
                         a == Py_None ? "None" : Py_TYPE(a)->tp_name);
            return -1;
        }
        s->has_view = 1;
        s->len = (size_t)s->view.len;
        if (s->kind == US_SK_RECVFROM_INTO && b != Py_None) {
            Py_ssize_t n = size_from_py(b);
            if (n == -1 && PyErr_Occurred())
                return -1;
            if (n < 0 || n > s->view.len) {
                PyErr_SetString(PyExc_ValueError, n < 0 ? "negative buffersize in recvfrom_into"
                                                        : "nbytes is greater than the length of the buffer");
                return -1;
            }
            if (n)
                s->len = (size_t)n;
        }
        return 0;
    }
    case US_SK_SENDALL:
    case US_SK_SENDTO:
        if (PyObject_GetBuffer(a, &s->view, PyBUF_SIMPLE) < 0)
            return -1;
        s->has_view = 1;
        s->len = (size_t)s->view.len;
        if (s->kind == US_SK_SENDALL)
            return 0;
        /* fall through: the address */
        a = b;
        /* fallthrough */
    case US_SK_CONNECT: {
        int family = 0, type = 0;
        if (sock_family_type(s->loop->st, s->sock, s->fd, &family, &type) < 0)
            return -1;
        const char *caller = s->kind == US_SK_CONNECT ? "connect" : "sendto";
        int r = sockaddr_from_py(family, caller, a, &s->addr, &s->addrlen);
        if (r == -2)
            PyErr_Format(s->loop->st->AddressFallback, "uringloop: address %R is not numeric for family %d", a, family);
        return r < 0 ? -1 : 0;
    }
    default:
        return 0;
    }
}

/* loop._transport_fd_added(fd): a transport now owns fd. */
PyObject *us_loop_transport_fd_added(us_loop *loop, PyObject *arg)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v < 0 || v > INT_MAX / 2)
        Py_RETURN_NONE;
    int fd = (int)v;
    if (fd >= loop->transport_fds_cap) {
        int cap = loop->transport_fds_cap ? loop->transport_fds_cap : 64;
        while (cap <= fd)
            cap *= 2;
        unsigned char *flags = PyMem_Realloc(loop->transport_fds, (size_t)cap);
        if (!flags)
            return PyErr_NoMemory();
        memset(flags + loop->transport_fds_cap, 0, (size_t)(cap - loop->transport_fds_cap));
        loop->transport_fds = flags;
        loop->transport_fds_cap = cap;
    }
    loop->transport_fds[fd] = 1;
    Py_RETURN_NONE;
}

/* asyncio refuses a sock_* call that has to wait on a descriptor a live
 * transport owns (RuntimeError from _ensure_fd_no_transport). The flag
 * keeps that Python check off descriptors no transport was ever given;
 * once it finds none there (closed, or taken back as sendfile does), the
 * flag is cleared until the next transport. */
static int sock_check_no_transport(us_loop *loop, int fd)
{
    if (fd >= loop->transport_fds_cap || !loop->transport_fds[fd])
        return 0;
    PyObject *r = PyObject_CallMethod((PyObject *)loop, "_ensure_fd_no_transport", "i", fd);
    if (!r)
        return -1;
    Py_DECREF(r);
    loop->transport_fds[fd] = 0;
    return 0;
}

/* sock_connect() calls connect() at once, as asyncio does: 1 when it has
 * connected, 0 when it is under way (the op then waits for writability),
 * -1 with its error raised (asyncio raises what socket.connect() raised,
 * while a failure found later is "Connect call failed"). */
static int sockop_connect_now(us_sockop *s)
{
    if (connect(s->fd, (struct sockaddr *)&s->addr, s->addrlen) == 0)
        return 1;
    if (errno == EINPROGRESS || errno == EAGAIN || errno == EINTR)
        return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* A receive of 0 bytes. socket.recv(0) and recv_into() of an empty buffer
 * return b"" and 0 without a syscall, and asyncio returns that at once;
 * recvfrom(0) asks the kernel, which answers at once when data waits.
 * io_uring's receive of 0 bytes waits for data either way. 1 when done,
 * 0 for EAGAIN (the op then waits), -1 with recvfrom()'s error raised. */
static int sockop_recv_nothing_now(us_sockop *s)
{
    if (s->kind == US_SK_RECV || s->kind == US_SK_RECV_INTO)
        return 1;
    void *buf = s->kind == US_SK_RECVFROM ? PyBytes_AS_STRING(s->obj) : s->view.buf;
    socklen_t alen = sizeof s->addr;
    if (recvfrom(s->fd, buf, 0, MSG_DONTWAIT, (struct sockaddr *)&s->addr, &alen) >= 0) {
        s->msg.msg_namelen = alen;
        return 1;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static int sockop_receives(int kind)
{
    return kind == US_SK_RECV || kind == US_SK_RECV_INTO || kind == US_SK_RECVFROM || kind == US_SK_RECVFROM_INTO;
}

/* sock_sendall() to an AF_UNIX SOCK_DGRAM or SOCK_SEQPACKET socket is
 * sent by readiness (see _sock_send_by_poll in uringloop/_loop.py): raises
 * AddressFallback for the caller to take that way. */
static int sock_sendall_by_ring(us_state *st, PyObject *sock, int fd)
{
    int family = 0, type = 0;
    if (sock_family_type(st, sock, fd, &family, &type) < 0)
        return -1;
    if (family == AF_UNIX && type != SOCK_STREAM) {
        PyErr_SetString(st->AddressFallback, "uringloop: sock_sendall() to a Unix datagram socket");
        return -1;
    }
    return 0;
}

/* get_extra_info("socket") of a transport is a TransportSocket, which has
 * none of the socket methods the sock_* calls use: asyncio fails on the
 * first it calls with AttributeError, so the transport's socket is never
 * read or written behind its back. */
static int sock_not_a_transport_socket(us_state *st, PyObject *sock, long kind)
{
    static const char *const method[] = {"recv", "recv_into", "recvfrom", "recvfrom_into",
                                         "send", "sendto",    "connect",  "accept"};
    if ((PyObject *)Py_TYPE(sock) != st->transport_socket)
        return 0;
    PyErr_Format(PyExc_AttributeError, "'%.50s' object has no attribute '%s'", Py_TYPE(sock)->tp_name, method[kind]);
    return -1;
}

/* The op of _sock_op(kind, sock, ...), its arguments taken and its future
 * made; NULL with an exception. */
static us_sockop *sockop_new(us_loop *loop, long kind, int fd, PyObject *const *args, Py_ssize_t nargs)
{
    us_state *st = loop->st;
    us_sockop *s = PyObject_GC_New(us_sockop, st->SockOpType);
    if (!s)
        return NULL;
    memset(&s->op, 0, sizeof *s - offsetof(us_sockop, op));
    s->loop = (us_loop *)Py_NewRef(loop);
    s->sock = Py_NewRef(args[1]);
    s->kind = (uint8_t)kind;
    s->fd = fd;
    PyObject_GC_Track(s);
    PyObject *kwargs[1] = {(PyObject *)loop};
    if (sockop_setup(s, args, nargs) < 0 || !(s->fut = PyObject_Vectorcall(st->sock_future, kwargs, 0, st->kw_loop))) {
        sockop_forget_future(s);
        Py_DECREF(s);
        return NULL;
    }
    return s;
}

/* Whether the op is done without the ring: 1 done, 0 not, -1 with an
 * exception. sock_sendall() offers the data to the kernel at once, as
 * asyncio and uvloop do, and completes without yielding when it all fits:
 * callers order their next steps on that (uvloop's
 * test_sock_send_before_cancel cancels a pending sock_recv() right after;
 * had the send waited for the ring, the recv would already hold the
 * reply). Only the rest of a short send, or a send to a full socket, goes
 * through the ring. */
static int sockop_try_now(us_sockop *s)
{
    if (s->kind == US_SK_SENDALL) {
        if (s->len) {
            ssize_t n = send(s->fd, s->view.buf, s->len, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0)
                s->done = (size_t)n;
        }
        return s->done == s->len;
    }
    if (s->kind == US_SK_CONNECT)
        return sockop_connect_now(s);
    if (sockop_receives(s->kind) && s->len == 0)
        return sockop_recv_nothing_now(s);
    return 0;
}

/* The future of an op done at once, resolved; the op is released. */
static PyObject *sockop_resolve_now(us_sockop *s)
{
    PyObject *res = sockop_receives(s->kind) ? sockop_result(s, 0) : Py_NewRef(Py_None);
    PyObject *r = res ? PyObject_CallMethodOneArg(s->fut, s->loop->st->s_set_result, res) : NULL;
    Py_XDECREF(res);
    if (!r) {
        sockop_forget_future(s);
        Py_DECREF(s);
        return NULL;
    }
    Py_DECREF(r);
    PyObject *fut = Py_NewRef(s->fut);
    Py_DECREF(s);
    return fut;
}

/* loop._sock_op(kind, sock, [arg, [arg2]]) -> future */
PyObject *us_loop_sock_op(us_loop *loop, PyObject *const *args, Py_ssize_t nargs)
{
    us_state *st = loop->st;
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "_sock_op(kind, sock, ...)");
        return NULL;
    }
    long kind = PyLong_AsLong(args[0]);
    if (kind < US_SK_RECV || kind > US_SK_ACCEPT) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "unknown socket operation");
        return NULL;
    }
    if (sock_check(loop, args[1]) < 0 || sock_not_a_transport_socket(st, args[1], kind) < 0 ||
        us_loop_check_open(loop) < 0)
        return NULL;
    int fd = sock_fd(st, args[1]);
    if (fd < 0 || (kind == US_SK_SENDALL && sock_sendall_by_ring(st, args[1], fd) < 0))
        return NULL;
    us_sockop *s = sockop_new(loop, kind, fd, args, nargs);
    if (!s)
        return NULL;
    /* Behind an op of the same socket and direction: wait for its end. An op
     * of another socket object is a descriptor closed and reused: not ours
     * to wait for. */
    int dir = sock_queue_dir(s->kind);
    us_sockop **slot = dir >= 0 ? sock_queue_slot(loop, fd, dir, 1) : NULL;
    if (dir >= 0 && !slot)
        goto fail;
    us_sockop *ahead = slot ? *slot : NULL;
    if (ahead && ahead->sock == s->sock) {
        if (sock_check_no_transport(loop, fd) < 0 || PyObject_SetAttr(s->fut, st->s_uring_op, (PyObject *)s) < 0)
            goto fail;
        ahead->queued_next = s; /* our reference becomes the queue's */
        s->queued = 1;
        *slot = s;
        loop->sockops_inflight++;
        return Py_NewRef(s->fut);
    }
    int now_done = sockop_try_now(s);
    if (now_done < 0)
        goto fail;
    if (now_done)
        return sockop_resolve_now(s);
    if (sock_check_no_transport(loop, fd) < 0 || PyObject_SetAttr(s->fut, st->s_uring_op, (PyObject *)s) < 0 ||
        sockop_submit(s) < 0)
        goto fail;
    if (slot)
        *slot = s;
    loop->sockops_inflight++;
    /* The in-flight reference: released by the final CQE. */
    return Py_NewRef(s->fut);
fail:
    sockop_forget_future(s);
    Py_DECREF(s);
    return NULL;
}
