/*
 * C versions of the per-record methods of asyncio's SSLProtocol (3.11; the
 * same methods are unchanged in 3.12 and 3.13).
 *
 * uringloop's TLS is asyncio's own sslproto state machine. Every record goes
 * through the same handful of its methods (get_buffer, buffer_updated,
 * _do_read, _do_write, _process_outgoing, _write_appdata and the app
 * transport's write), and in Python they cost more CPU than the kernel and
 * OpenSSL together. SSLProtocolCore and SSLAppTransportCore are C bases
 * that python/uringloop/_ssl.py puts in front of asyncio's classes, so these
 * methods resolve here. The instance keeps its state in its __dict__ under
 * asyncio's names, so the Python methods that stay (handshake, shutdown,
 * flow-control transitions, errors) see the same fields, and the C methods
 * call them at the points where the Python ones do.
 *
 * Each function below is a line-for-line translation of the method it
 * names; the comments only say where the C differs in how, not in what.
 */
#include "us.h"

#define SSL_NAMES(X)                                                                                                   \
    X(_incoming)                                                                                                       \
    X(_outgoing)                                                                                                       \
    X(_sslobj)                                                                                                         \
    X(_state)                                                                                                          \
    X(_ssl_buffer)                                                                                                     \
    X(_ssl_buffer_view)                                                                                                \
    X(max_size)                                                                                                        \
    X(_app_reading_paused)                                                                                             \
    X(_app_protocol_is_buffer)                                                                                         \
    X(_do_read__buffered)                                                                                              \
    X(_write_backlog)                                                                                                  \
    X(_write_buffer_size)                                                                                              \
    X(_ssl_writing_paused)                                                                                             \
    X(_transport)                                                                                                      \
    X(_app_protocol)                                                                                                   \
    X(data_received)                                                                                                   \
    X(_call_eof_received)                                                                                              \
    X(_start_shutdown)                                                                                                 \
    X(_fatal_error)                                                                                                    \
    X(_do_handshake)                                                                                                   \
    X(_do_flush)                                                                                                       \
    X(_do_shutdown)                                                                                                    \
    X(_outgoing_high_water)                                                                                            \
    X(_outgoing_low_water)                                                                                             \
    X(_app_writing_paused)                                                                                             \
    X(_control_app_writing)                                                                                            \
    X(_incoming_high_water)                                                                                            \
    X(_incoming_low_water)                                                                                             \
    X(_ssl_reading_paused)                                                                                             \
    X(_control_ssl_reading)                                                                                            \
    X(_ssl_protocol)                                                                                                   \
    X(_write_appdata)                                                                                                  \
    X(pending)                                                                                                         \
    X(read)                                                                                                            \
    X(write)                                                                                                           \
    X(append)                                                                                                          \
    X(join)

#define SSL_NAME_ENUM(n) N##n,
enum { SSL_NAMES(SSL_NAME_ENUM) SSL_NNAMES };
#define SSL_NAME_TEXT(n) #n,
static const char *const ssl_name_text[SSL_NNAMES] = {SSL_NAMES(SSL_NAME_TEXT)};

/* Set by _core._ssl_setup(), from python/uringloop/_ssl.py. */
typedef struct us_ssl_state {
    PyObject *unwrapped, *do_handshake, *wrapped, *flushing, *shutdown; /* SSLProtocolState members */
    PyObject *again_errors;                                             /* sslproto.SSLAgainErrors */
    PyObject *sslobject_type;   /* ssl.SSLObject, whose read/write only forward to ._sslobj */
    PyObject *py_write_appdata; /* sslproto.SSLProtocol._write_appdata, for closed states */
    PyObject *msg_fatal;        /* 'Fatal error on SSL protocol' */
    PyObject *empty_bytes;
    PyTypeObject *protocol_type; /* SSLProtocolCore (the module holds it) */
    PyObject *name[SSL_NNAMES];
} us_ssl_state;

static us_ssl_state *ssl_state(PyObject *self)
{
    us_state *st = us_state_of_type(Py_TYPE(self));
    if (!st)
        return NULL;
    if (!st->ssl || !st->ssl->wrapped) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop._core._ssl_setup() was not called");
        return NULL;
    }
    return st->ssl;
}

/* o.<name>. asyncio's fields live in the instance dict, so look there
 * first: a third of the cost of the generic lookup, which walks the MRO
 * for a descriptor first (the classes define none under these names). */
static PyObject *get(us_ssl_state *ss, PyObject *o, int n)
{
    PyObject **dict = _PyObject_GetDictPtr(o);
    if (dict && *dict) {
        PyObject *v = PyDict_GetItemWithError(*dict, ss->name[n]);
        if (v)
            return Py_NewRef(v);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_GetAttr(o, ss->name[n]);
}

static int get_true(us_ssl_state *ss, PyObject *o, int n)
{
    PyObject *v = get(ss, o, n);
    if (!v)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static int get_ssize(us_ssl_state *ss, PyObject *o, int n, Py_ssize_t *out)
{
    PyObject *v = get(ss, o, n);
    if (!v)
        return -1;
    *out = PyNumber_AsSsize_t(v, PyExc_OverflowError);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int set_ssize(us_ssl_state *ss, PyObject *o, int n, Py_ssize_t value)
{
    PyObject *v = PyLong_FromSsize_t(value);
    PyObject **dict = _PyObject_GetDictPtr(o);
    int rc = !v ? -1 : dict && *dict ? PyDict_SetItem(*dict, ss->name[n], v) : PyObject_SetAttr(o, ss->name[n], v);
    Py_XDECREF(v);
    return rc;
}

/* self.<method>(*args), for the Python methods that stay in asyncio. */
static int call_method(us_ssl_state *ss, PyObject *self, int n, PyObject *arg1, PyObject *arg2)
{
    PyObject *args[3] = {self, arg1, arg2};
    size_t nargs = arg2 ? 3 : arg1 ? 2 : 1;
    PyObject *r = PyObject_VectorcallMethod(ss->name[n], args, nargs, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

static PyObject *call_on(us_ssl_state *ss, PyObject *obj, int n, PyObject *arg)
{
    PyObject *args[2] = {obj, arg};
    return PyObject_VectorcallMethod(ss->name[n], args, arg ? 2 : 1, NULL);
}

/* What self._sslobj.read/write end up calling: for a plain ssl.SSLObject,
 * its _ssl._SSLSocket (one Python frame less per call; *is_inner set),
 * else the object. */
static PyObject *ssl_target(us_ssl_state *ss, PyObject *self, int *is_inner)
{
    PyObject *obj = get(ss, self, N_sslobj);
    *is_inner = obj && (PyObject *)Py_TYPE(obj) == ss->sslobject_type;
    if (*is_inner) {
        PyObject *inner = get(ss, obj, N_sslobj);
        Py_SETREF(obj, inner);
    }
    return obj;
}

/* Whether a read would only raise SSLWantReadError: no bytes left in the
 * incoming BIO and no decrypted bytes held by the SSL object. OpenSSL reads
 * records from the BIO as they are needed (Python never turns read-ahead
 * on), so nothing else can be waiting. asyncio learns the same from the
 * exception, which _ssl builds with a formatted message: about a tenth of
 * the CPU of a small record's round trip. 1 nothing left, 0 read on, -1. */
static int read_would_block(us_ssl_state *ss, PyObject *self, PyObject *sslsocket)
{
    PyObject *in = get(ss, self, N_incoming);
    PyObject *in_pending = in ? get(ss, in, Npending) : NULL;
    Py_XDECREF(in);
    if (!in_pending)
        return -1;
    int some = PyObject_IsTrue(in_pending);
    Py_DECREF(in_pending);
    if (some)
        return some < 0 ? -1 : 0;
    PyObject *held = call_on(ss, sslsocket, Npending, NULL);
    if (!held)
        return -1;
    some = PyObject_IsTrue(held);
    Py_DECREF(held);
    return some < 0 ? -1 : !some;
}

/* except Exception as ex: self._fatal_error(ex, 'Fatal error on SSL
 * protocol'); anything else (CancelledError, SystemExit...) propagates. */
static int fatal_on_exception(us_ssl_state *ss, PyObject *self)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *ev = us_take_exception();
    int rc = call_method(ss, self, N_fatal_error, ev ? ev : Py_None, ss->msg_fatal);
    Py_XDECREF(ev);
    return rc;
}

/* a <op> b for the flow-control comparisons, on Python objects as asyncio does */
static int compare(PyObject *o, us_ssl_state *ss, PyObject *size, int n, int op)
{
    PyObject *limit = get(ss, o, n);
    if (!limit)
        return -1;
    int r = PyObject_RichCompareBool(size, limit, op);
    Py_DECREF(limit);
    return r;
}

/* _control_app_writing() and _control_ssl_reading() only act on a change of
 * state; this decides whether there is one (size >= high while running, or
 * size <= low while paused) and leaves the change itself to asyncio. */
static int flow_changes(us_ssl_state *ss, PyObject *self, PyObject *size, int high, int low, int paused_name)
{
    int paused = get_true(ss, self, paused_name);
    if (paused < 0)
        return -1;
    return paused ? compare(self, ss, size, low, Py_LE) : compare(self, ss, size, high, Py_GE);
}

/* _control_app_writing(): the size is _outgoing.pending + _write_buffer_size */
static int control_app_writing(us_ssl_state *ss, PyObject *self)
{
    PyObject *out = get(ss, self, N_outgoing);
    PyObject *pending = out ? get(ss, out, Npending) : NULL;
    PyObject *wbs = pending ? get(ss, self, N_write_buffer_size) : NULL;
    PyObject *size = wbs ? PyNumber_Add(pending, wbs) : NULL;
    int change =
        size ? flow_changes(ss, self, size, N_outgoing_high_water, N_outgoing_low_water, N_app_writing_paused) : -1;
    Py_XDECREF(out);
    Py_XDECREF(pending);
    Py_XDECREF(wbs);
    Py_XDECREF(size);
    if (change <= 0)
        return change;
    return call_method(ss, self, N_control_app_writing, NULL, NULL);
}

/* _control_ssl_reading(): the size is _incoming.pending */
static int control_ssl_reading(us_ssl_state *ss, PyObject *self)
{
    PyObject *in = get(ss, self, N_incoming);
    PyObject *size = in ? get(ss, in, Npending) : NULL;
    int change =
        size ? flow_changes(ss, self, size, N_incoming_high_water, N_incoming_low_water, N_ssl_reading_paused) : -1;
    Py_XDECREF(in);
    Py_XDECREF(size);
    if (change <= 0)
        return change;
    return call_method(ss, self, N_control_ssl_reading, NULL, NULL);
}

static int process_outgoing(us_ssl_state *ss, PyObject *self)
{
    int paused = get_true(ss, self, N_ssl_writing_paused);
    if (paused < 0)
        return -1;
    if (!paused) {
        PyObject *out = get(ss, self, N_outgoing);
        PyObject *data = out ? call_on(ss, out, Nread, NULL) : NULL;
        Py_XDECREF(out);
        if (!data)
            return -1;
        Py_ssize_t len = PyObject_Size(data);
        PyObject *tr = len > 0 ? get(ss, self, N_transport) : NULL;
        PyObject *r = tr ? call_on(ss, tr, Nwrite, data) : NULL;
        Py_XDECREF(tr);
        Py_DECREF(data);
        if (len < 0 || (len > 0 && !r))
            return -1;
        Py_XDECREF(r);
    }
    return control_app_writing(ss, self);
}

/* One write of the backlog's head: 1 written (whole or part), 0 the SSL
 * object wants more room (SSLAgainErrors), -1 error. */
static int write_head(us_ssl_state *ss, PyObject *self, PyObject *target, PyObject *backlog)
{
    PyObject *data = PySequence_GetItem(backlog, 0);
    if (!data)
        return -1;
    int rc = -1;
    Py_ssize_t count, data_len, wbs;
    PyObject *n = call_on(ss, target, Nwrite, data);
    if (!n) {
        if (PyErr_ExceptionMatches(ss->again_errors)) {
            PyErr_Clear();
            rc = 0;
        }
        goto done;
    }
    count = PyNumber_AsSsize_t(n, PyExc_OverflowError);
    Py_DECREF(n);
    if ((count == -1 && PyErr_Occurred()) || (data_len = PyObject_Size(data)) < 0 ||
        get_ssize(ss, self, N_write_buffer_size, &wbs) < 0)
        goto done;
    if (count < data_len) {
        PyObject *rest = PySequence_GetSlice(data, count, PY_SSIZE_T_MAX);
        if (!rest || PySequence_SetItem(backlog, 0, rest) < 0) {
            Py_XDECREF(rest);
            goto done;
        }
        Py_DECREF(rest);
        wbs -= count;
    } else {
        if (PySequence_DelItem(backlog, 0) < 0)
            goto done;
        wbs -= data_len;
    }
    rc = set_ssize(ss, self, N_write_buffer_size, wbs) < 0 ? -1 : 1;
done:
    Py_DECREF(data);
    return rc;
}

/* _do_write(): hand the backlog to the SSL object, then send what it made */
static int do_write(us_ssl_state *ss, PyObject *self)
{
    PyObject *backlog = get(ss, self, N_write_backlog);
    int is_inner;
    PyObject *target = backlog ? ssl_target(ss, self, &is_inner) : NULL;
    int rc = target ? 1 : -1;
    while (rc == 1) {
        Py_ssize_t left = PyObject_Size(backlog);
        rc = left < 0 ? -1 : left == 0 ? 0 : write_head(ss, self, target, backlog);
    }
    Py_XDECREF(backlog);
    Py_XDECREF(target);
    return rc < 0 ? -1 : process_outgoing(ss, self);
}

/* Whole chunks read in one _do_read__copied(), delivered as one. */
static PyObject *join_chunks(us_ssl_state *ss, PyObject *first, PyObject *more)
{
    if (!more)
        return Py_NewRef(first);
    if (PyList_Insert(more, 0, first) < 0)
        return NULL;
    return call_on(ss, ss->empty_bytes, Njoin, more);
}

/* _do_read__copied(): read until the SSL object wants more bytes (or hits
 * close_notify), then deliver what was read as one data_received() call. */
static int do_read_copied(us_ssl_state *ss, PyObject *self)
{
    int is_inner;
    PyObject *target = ssl_target(ss, self, &is_inner);
    PyObject *max_size = target ? get(ss, self, Nmax_size) : NULL;
    PyObject *first = NULL, *more = NULL, *data = NULL;
    int eof = 0, rc = -1;
    if (!max_size)
        goto done;
    for (;;) {
        if (first && is_inner) {
            int drained = read_would_block(ss, self, target);
            if (drained < 0)
                goto done;
            if (drained)
                break;
        }
        PyObject *chunk = call_on(ss, target, Nread, max_size);
        if (!chunk) {
            if (!PyErr_ExceptionMatches(ss->again_errors))
                goto done;
            PyErr_Clear();
            break;
        }
        int t = PyObject_IsTrue(chunk);
        if (t <= 0) {
            Py_DECREF(chunk);
            if (t < 0)
                goto done;
            eof = 1;
            break;
        }
        if (!first) {
            first = chunk;
            continue;
        }
        int added = (more || (more = PyList_New(0))) ? PyList_Append(more, chunk) : -1;
        Py_DECREF(chunk);
        if (added < 0)
            goto done;
    }
    if (first) {
        PyObject *app = (data = join_chunks(ss, first, more)) ? get(ss, self, N_app_protocol) : NULL;
        PyObject *r = app ? call_on(ss, app, Ndata_received, data) : NULL;
        Py_XDECREF(app);
        if (!r)
            goto done;
        Py_DECREF(r);
    }
    if (eof && (call_method(ss, self, N_call_eof_received, NULL, NULL) < 0 ||
                call_method(ss, self, N_start_shutdown, NULL, NULL) < 0))
        goto done;
    rc = 0;
done:
    Py_XDECREF(target);
    Py_XDECREF(max_size);
    Py_XDECREF(first);
    Py_XDECREF(more);
    Py_XDECREF(data);
    return rc;
}

/* The body of _do_read() inside its try. */
static int do_read_body(us_ssl_state *ss, PyObject *self)
{
    int paused = get_true(ss, self, N_app_reading_paused);
    if (paused < 0)
        return -1;
    if (!paused) {
        int buffered = get_true(ss, self, N_app_protocol_is_buffer);
        if (buffered < 0 ||
            (buffered ? call_method(ss, self, N_do_read__buffered, NULL, NULL) : do_read_copied(ss, self)) < 0)
            return -1;
        int backlog = get_true(ss, self, N_write_backlog);
        if (backlog < 0 || (backlog ? do_write(ss, self) : process_outgoing(ss, self)) < 0)
            return -1;
    }
    return control_ssl_reading(ss, self);
}

static int do_read(us_ssl_state *ss, PyObject *self)
{
    PyObject *state = get(ss, self, N_state);
    if (!state)
        return -1;
    Py_DECREF(state); /* compared by identity only: enum members live in their class */
    if (state != ss->wrapped && state != ss->flushing)
        return 0;
    if (do_read_body(ss, self) < 0)
        return fatal_on_exception(ss, self);
    return 0;
}

/* backlog.append(data); self._write_buffer_size += len(data) */
static int append_backlog(us_ssl_state *ss, PyObject *self, PyObject *backlog, PyObject *data, Py_ssize_t *wbs)
{
    PyObject *r = call_on(ss, backlog, Nappend, data);
    Py_ssize_t len = r ? PyObject_Size(data) : -1;
    Py_XDECREF(r);
    return len < 0 ? -1 : set_ssize(ss, self, N_write_buffer_size, *wbs += len);
}

/* _write_appdata(list_of_data), or _write_appdata((one,)) for the app
 * transport's write() without making the tuple */
static int write_appdata(us_ssl_state *ss, PyObject *self, PyObject *list_of_data, PyObject *one)
{
    PyObject *state = get(ss, self, N_state);
    if (!state)
        return -1;
    Py_DECREF(state);
    if (state == ss->flushing || state == ss->shutdown || state == ss->unwrapped) {
        /* asyncio counts and logs writes after close */
        PyObject *items = one ? PyTuple_Pack(1, one) : Py_NewRef(list_of_data);
        PyObject *r = items ? PyObject_CallFunctionObjArgs(ss->py_write_appdata, self, items, NULL) : NULL;
        Py_XDECREF(items);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    PyObject *backlog = get(ss, self, N_write_backlog);
    PyObject *it = backlog && !one ? PyObject_GetIter(list_of_data) : NULL;
    PyObject *data;
    Py_ssize_t wbs;
    int rc = backlog && (one || it) ? get_ssize(ss, self, N_write_buffer_size, &wbs) : -1;
    if (rc == 0 && one)
        rc = append_backlog(ss, self, backlog, one, &wbs);
    while (rc == 0 && it && (data = PyIter_Next(it))) {
        rc = append_backlog(ss, self, backlog, data, &wbs);
        Py_DECREF(data);
    }
    Py_XDECREF(backlog);
    Py_XDECREF(it);
    if (rc < 0 || PyErr_Occurred())
        return -1;
    if (!(state = get(ss, self, N_state)))
        return fatal_on_exception(ss, self);
    Py_DECREF(state);
    if (state == ss->wrapped && do_write(ss, self) < 0)
        return fatal_on_exception(ss, self);
    return 0;
}

/* ---- SSLProtocolCore methods ---- */

static PyObject *none_or_null(int rc)
{
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *sslp_get_buffer(PyObject *self, PyObject *n)
{
    us_ssl_state *ss = ssl_state(self);
    Py_ssize_t want, max_size, have;
    if (!ss || ((want = PyNumber_AsSsize_t(n, PyExc_OverflowError)) == -1 && PyErr_Occurred()))
        return NULL;
    if (get_ssize(ss, self, Nmax_size, &max_size) < 0)
        return NULL;
    if (want <= 0 || want > max_size)
        want = max_size;
    PyObject *buf = get(ss, self, N_ssl_buffer);
    if (!buf)
        return NULL;
    have = PyObject_Size(buf);
    Py_DECREF(buf);
    if (have < 0)
        return NULL;
    if (have < want) {
        PyObject *fresh = PyByteArray_FromStringAndSize(NULL, want);
        PyObject *view = fresh ? PyMemoryView_FromObject(fresh) : NULL;
        int rc = view ? PyObject_SetAttr(self, ss->name[N_ssl_buffer], fresh) : -1;
        if (rc == 0)
            rc = PyObject_SetAttr(self, ss->name[N_ssl_buffer_view], view);
        Py_XDECREF(fresh);
        Py_XDECREF(view);
        if (rc < 0)
            return NULL;
    }
    return get(ss, self, N_ssl_buffer_view);
}

/* buffer_updated() after the bytes went into the incoming BIO: move the
 * state machine on */
static int after_incoming(us_ssl_state *ss, PyObject *self)
{
    PyObject *state = get(ss, self, N_state);
    if (!state)
        return -1;
    Py_DECREF(state);
    if (state == ss->do_handshake)
        return call_method(ss, self, N_do_handshake, NULL, NULL);
    if (state == ss->wrapped)
        return do_read(ss, self);
    if (state == ss->flushing)
        return call_method(ss, self, N_do_flush, NULL, NULL);
    if (state == ss->shutdown)
        return call_method(ss, self, N_do_shutdown, NULL, NULL);
    return 0;
}

static int write_incoming(us_ssl_state *ss, PyObject *self, PyObject *bytes)
{
    PyObject *in = get(ss, self, N_incoming);
    PyObject *r = in ? call_on(ss, in, Nwrite, bytes) : NULL;
    Py_XDECREF(in);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

static PyObject *sslp_buffer_updated(PyObject *self, PyObject *nbytes)
{
    us_ssl_state *ss = ssl_state(self);
    Py_ssize_t n;
    if (!ss || ((n = PyNumber_AsSsize_t(nbytes, PyExc_OverflowError)) == -1 && PyErr_Occurred()))
        return NULL;
    PyObject *view = get(ss, self, N_ssl_buffer_view);
    PyObject *piece = view ? PySequence_GetSlice(view, 0, n) : NULL;
    int rc = piece ? write_incoming(ss, self, piece) : -1;
    Py_XDECREF(view);
    Py_XDECREF(piece);
    return none_or_null(rc < 0 ? -1 : after_incoming(ss, self));
}

/* For the stream transport (us_stream.c): what get_buffer() + copy +
 * buffer_updated() amount to, without the copy into _ssl_buffer. */
int us_ssl_feed(PyObject *self, PyObject *data)
{
    us_ssl_state *ss = ssl_state(self);
    if (!ss || write_incoming(ss, self, data) < 0)
        return -1;
    return after_incoming(ss, self);
}

static PyObject *sslp_do_read(PyObject *self, PyObject *unused)
{
    (void)unused;
    us_ssl_state *ss = ssl_state(self);
    return ss ? none_or_null(do_read(ss, self)) : NULL;
}

static PyObject *sslp_do_write(PyObject *self, PyObject *unused)
{
    (void)unused;
    us_ssl_state *ss = ssl_state(self);
    return ss ? none_or_null(do_write(ss, self)) : NULL;
}

static PyObject *sslp_process_outgoing(PyObject *self, PyObject *unused)
{
    (void)unused;
    us_ssl_state *ss = ssl_state(self);
    return ss ? none_or_null(process_outgoing(ss, self)) : NULL;
}

static PyObject *sslp_write_appdata(PyObject *self, PyObject *list_of_data)
{
    us_ssl_state *ss = ssl_state(self);
    return ss ? none_or_null(write_appdata(ss, self, list_of_data, NULL)) : NULL;
}

static PyMethodDef sslp_methods[] = {
    {"get_buffer", sslp_get_buffer, METH_O, NULL},
    {"buffer_updated", sslp_buffer_updated, METH_O, NULL},
    {"_do_read", sslp_do_read, METH_NOARGS, NULL},
    {"_do_write", sslp_do_write, METH_NOARGS, NULL},
    {"_process_outgoing", sslp_process_outgoing, METH_NOARGS, NULL},
    {"_write_appdata", sslp_write_appdata, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot sslp_slots[] = {
    {Py_tp_doc, "C versions of asyncio SSLProtocol's per-record methods; state stays in the instance dict."},
    {Py_tp_methods, sslp_methods},
    {0, NULL},
};

PyType_Spec us_sslprotocol_spec = {
    .name = "uringloop._core.SSLProtocolCore",
    .basicsize = sizeof(PyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = sslp_slots,
};

/* ---- SSLAppTransportCore: the app transport's write() ---- */

static PyObject *sslt_write(PyObject *self, PyObject *data)
{
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data))
        return PyErr_Format(PyExc_TypeError, "data: expecting a bytes-like instance, got %s", us_type_name(data));
    int nonempty = PyObject_IsTrue(data);
    if (nonempty <= 0)
        return nonempty < 0 ? NULL : Py_NewRef(Py_None);
    us_ssl_state *ss = ssl_state(self);
    PyObject *proto = ss ? get(ss, self, N_ssl_protocol) : NULL;
    if (!proto)
        return NULL;
    int rc = -1;
    if (PyObject_TypeCheck(proto, ss->protocol_type)) {
        rc = write_appdata(ss, proto, NULL, data);
    } else {
        PyObject *one = PyTuple_Pack(1, data);
        PyObject *r = one ? call_on(ss, proto, N_write_appdata, one) : NULL;
        rc = r ? 0 : -1;
        Py_XDECREF(one);
        Py_XDECREF(r);
    }
    Py_DECREF(proto);
    return none_or_null(rc);
}

static PyMethodDef sslt_methods[] = {
    {"write", sslt_write, METH_O, "Write some data bytes to the transport (does not block)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot sslt_slots[] = {
    {Py_tp_doc, "C version of asyncio _SSLProtocolTransport.write()."},
    {Py_tp_methods, sslt_methods},
    {0, NULL},
};

PyType_Spec us_ssltransport_spec = {
    .name = "uringloop._core.SSLAppTransportCore",
    .basicsize = sizeof(PyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = sslt_slots,
};

/* ---- module level ---- */

static void ssl_state_clear(us_ssl_state *ss)
{
    Py_CLEAR(ss->unwrapped);
    Py_CLEAR(ss->do_handshake);
    Py_CLEAR(ss->wrapped);
    Py_CLEAR(ss->flushing);
    Py_CLEAR(ss->shutdown);
    Py_CLEAR(ss->again_errors);
    Py_CLEAR(ss->sslobject_type);
    Py_CLEAR(ss->py_write_appdata);
    Py_CLEAR(ss->msg_fatal);
    Py_CLEAR(ss->empty_bytes);
    for (int i = 0; i < SSL_NNAMES; i++)
        Py_CLEAR(ss->name[i]);
}

void us_ssl_module_clear(us_state *st)
{
    if (st->ssl) {
        ssl_state_clear(st->ssl);
        PyMem_Free(st->ssl);
        st->ssl = NULL;
    }
}

int us_ssl_module_traverse(us_state *st, visitproc visit, void *arg)
{
    us_ssl_state *ss = st->ssl;
    if (ss) {
        Py_VISIT(ss->sslobject_type);
        Py_VISIT(ss->py_write_appdata);
        Py_VISIT(ss->again_errors);
    }
    return 0;
}

static PyObject *member(PyObject *enum_type, const char *name)
{
    return PyObject_GetAttrString(enum_type, name);
}

/* _ssl_setup(SSLProtocolState, SSLAgainErrors, ssl.SSLObject, SSLProtocol._write_appdata) */
PyObject *us_ssl_setup(PyObject *mod, PyObject *args)
{
    us_state *st = PyModule_GetState(mod);
    PyObject *states, *again, *sslobject_type, *py_write_appdata;
    if (!PyArg_ParseTuple(args, "OOOO:_ssl_setup", &states, &again, &sslobject_type, &py_write_appdata))
        return NULL;
    us_ssl_module_clear(st);
    us_ssl_state *ss = PyMem_Calloc(1, sizeof(*ss));
    if (!ss)
        return PyErr_NoMemory();
    st->ssl = ss;
    ss->protocol_type = st->SSLProtocolCoreType;
    ss->again_errors = Py_NewRef(again);
    ss->sslobject_type = Py_NewRef(sslobject_type);
    ss->py_write_appdata = Py_NewRef(py_write_appdata);
    int ok = (ss->unwrapped = member(states, "UNWRAPPED")) && (ss->do_handshake = member(states, "DO_HANDSHAKE")) &&
             (ss->wrapped = member(states, "WRAPPED")) && (ss->flushing = member(states, "FLUSHING")) &&
             (ss->shutdown = member(states, "SHUTDOWN")) &&
             (ss->msg_fatal = PyUnicode_FromString("Fatal error on SSL protocol")) &&
             (ss->empty_bytes = PyBytes_FromStringAndSize(NULL, 0));
    for (int i = 0; ok && i < SSL_NNAMES; i++)
        ok = (ss->name[i] = PyUnicode_InternFromString(ssl_name_text[i])) != NULL;
    if (!ok) {
        us_ssl_module_clear(st);
        return NULL;
    }
    Py_RETURN_NONE;
}
