/*
 * Module `uringloop._core`: multi-phase init, module state, heap types.
 */
#include "us.h"

#include <errno.h>
#include <netinet/in.h>
#include <structmember.h>

static struct PyModuleDef us_module_def;

us_state *us_state_of_type(PyTypeObject *tp)
{
    PyObject *mod = NULL;
#if PY_VERSION_HEX >= 0x030B0000
    mod = PyType_GetModuleByDef(tp, &us_module_def);
#else
    /* 3.10: walk the MRO to the type this module created. */
    PyObject *mro = tp->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro) && !mod; i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(t->tp_flags & Py_TPFLAGS_HEAPTYPE))
            continue;
        PyObject *m = PyType_GetModule(t);
        if (m && PyModule_GetDef(m) == &us_module_def)
            mod = m;
        else
            PyErr_Clear();
    }
    if (!mod)
        PyErr_SetString(PyExc_TypeError, "type does not derive from a uringloop._core type");
#endif
    return mod ? (us_state *)PyModule_GetState(mod) : NULL;
}

/* Hands the current exception to loop.call_exception_handler(). Returns -1
 * (exception left set) when it is SystemExit/KeyboardInterrupt raised by
 * the handler, which must propagate out of the loop. */
int us_report_exception(us_loop *loop, PyObject *message, PyObject *handle)
{
    us_state *st = loop->st;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (ev && tb)
        PyException_SetTraceback(ev, tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    int rc = 0;
    PyObject *ctx = PyDict_New();
    PyObject *msg = message ? Py_NewRef(message) : PyUnicode_FromString("uringloop: error in an I/O completion");
    if (!ctx || !msg || PyDict_SetItem(ctx, st->s_message, msg) < 0 ||
        PyDict_SetItem(ctx, st->s_exception, ev ? ev : Py_None) < 0)
        goto unraisable;
    if (handle) {
        if (PyDict_SetItem(ctx, st->s_handle, handle) < 0)
            goto unraisable;
        PyObject *stb = ((us_handle *)handle)->source_traceback;
        if (stb && PyDict_SetItem(ctx, st->s_source_traceback, stb) < 0)
            goto unraisable;
    }
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)loop, st->s_call_exception_handler, ctx);
    if (r) {
        Py_DECREF(r);
        goto done;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        rc = -1;
        goto done;
    }
unraisable:
    PyErr_WriteUnraisable((PyObject *)loop);
done:
    Py_XDECREF(ctx);
    Py_XDECREF(msg);
    Py_XDECREF(ev);
    return rc;
}

/* Reports the current exception of callback cb(*args) as asyncio's Handle
 * does: "Exception in callback <cb's source>" (formatting runs Python
 * code, so the exception is parked meanwhile). */
int us_report_callback_exception(us_loop *loop, PyObject *cb, PyObject *args, PyObject *handle)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *src = PyObject_CallFunctionObjArgs(loop->st->format_callback_source, cb, args, NULL);
    PyObject *msg = src ? PyUnicode_FromFormat("Exception in callback %U", src) : NULL;
    Py_XDECREF(src);
    if (!msg)
        PyErr_Clear(); /* the handler gets the generic message */
    PyErr_Restore(et, ev, tb);
    int rc = us_report_exception(loop, msg, handle);
    Py_XDECREF(msg);
    return rc;
}

/* The same for a call the loop made without a Handle (a protocol callback
 * from C): a Handle of cb(*args) in a copy of `context` is made now, only because
 * there is an error to report, so that the handler's context has the
 * "handle" that asyncio's gives. */
int us_report_call_exception(us_loop *loop, PyObject *cb, PyObject *const *args, Py_ssize_t nargs, PyObject *context)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    /* A copy: the caller still runs in `context`, and from 3.13 the
     * handler is run in the handle's context, which cannot be entered twice
     * (asyncio reports after its Handle has left the context). */
    PyObject *copy = context ? PyContext_Copy(context) : PyContext_CopyCurrent();
    us_handle *h = copy ? us_handle_new(loop, loop->st->HandleType, cb, args, nargs, copy) : NULL;
    Py_XDECREF(copy);
    PyErr_Restore(et, ev, tb); /* a failed Handle: the generic message */
    if (!h)
        return us_report_exception(loop, NULL, NULL);
    int rc = us_report_callback_exception(loop, cb, h->args, (PyObject *)h);
    Py_DECREF(h);
    return rc;
}

/* The current exception as one object (normalized, its traceback
 * attached), a new reference, the error indicator cleared; NULL if none. */
PyObject *us_take_exception(void)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (ev && tb)
        PyException_SetTraceback(ev, tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    return ev;
}

/* OSError (the errno's subclass) for a negative errno result, or NULL. */
PyObject *us_oserror_from_res(int32_t res)
{
    errno = -res;
    PyErr_SetFromErrno(PyExc_OSError);
    return us_take_exception();
}

/* A connected socket's peer address, as accept() gave it. getpeername()
 * fails (ENOTCONN) once the peer has reset the connection; SO_PEERNAME then
 * still gives the address the socket was connected to, if asked for the
 * address's exact length: IPv6's, else IPv4's. One syscall unless reset. */
int us_peer_address(int fd, struct sockaddr_storage *ss, socklen_t *len)
{
    if (getpeername(fd, (struct sockaddr *)ss, len) == 0)
        return 0;
    if (errno != ENOTCONN)
        return -1;
    *len = sizeof(struct sockaddr_in6);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERNAME, ss, len) == 0)
        return 0;
    *len = sizeof(struct sockaddr_in);
    return getsockopt(fd, SOL_SOCKET, SO_PEERNAME, ss, len);
}

static PyObject *mod_set_hooks(PyObject *mod, PyObject *args)
{
    us_state *st = PyModule_GetState(mod);
    PyObject *handle_repr, *sock_future, *ssl_socket, *transport_socket_class;
    if (!PyArg_ParseTuple(args, "OOOO:_set_hooks", &handle_repr, &sock_future, &ssl_socket, &transport_socket_class))
        return NULL;
    /* From 3.11 a TransportSocket has no recv(), send() etc., and sock_*
     * calls given one fail as asyncio's do; 3.10's still had them. */
    int has_recv = PyObject_HasAttrString(transport_socket_class, "recv");
    PyObject *transport_socket = has_recv ? Py_None : transport_socket_class;
    Py_XSETREF(st->handle_repr, Py_NewRef(handle_repr));
    Py_XSETREF(st->sock_future, Py_NewRef(sock_future));
    Py_XSETREF(st->ssl_socket, Py_NewRef(ssl_socket));
    Py_XSETREF(st->transport_socket, Py_NewRef(transport_socket));
    Py_XSETREF(st->transport_socket_class, Py_NewRef(transport_socket_class));
    Py_RETURN_NONE;
}

/* The offset of one of _socket.socket's int members ("family", "type"). */
static Py_ssize_t socket_member_offset(PyTypeObject *tp, const char *name)
{
    PyObject *d = PyDict_GetItemString(tp->tp_dict, name); /* borrowed */
    if (!d || !PyObject_TypeCheck(d, &PyMemberDescr_Type))
        return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    return m->type == T_INT ? m->offset : -1;
}

/* _socket.socket's fields, read directly by the sock_* calls. Its C struct
 * starts with the descriptor, then family and type (socketmodule.h); the
 * descriptor's offset is taken only when the members sit where that layout
 * puts them. */
static int socket_fields_init(us_state *st)
{
    PyObject *mod = PyImport_ImportModule("_socket");
    if (!mod)
        return -1;
    st->socket_type = (PyTypeObject *)PyObject_GetAttrString(mod, "socket");
    Py_DECREF(mod);
    if (!st->socket_type)
        return -1;
    if (!PyType_Check(st->socket_type)) {
        PyErr_SetString(PyExc_TypeError, "_socket.socket is not a type");
        return -1;
    }
    st->socket_family_off = socket_member_offset(st->socket_type, "family");
    st->socket_type_off = socket_member_offset(st->socket_type, "type");
    st->socket_fd_off = -1;
    if (st->socket_family_off == (Py_ssize_t)(sizeof(PyObject) + sizeof(int)) &&
        st->socket_type_off == st->socket_family_off + (Py_ssize_t)sizeof(int))
        st->socket_fd_off = (Py_ssize_t)sizeof(PyObject);
    return 0;
}

static PyObject *mod_probe(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    /* A throwaway ring: 0 when io_uring works here, else -errno. */
    ue_loop l;
    int ret = ue_loop_init(&l, 8, 16);
    if (ret == 0)
        ue_loop_close(&l);
    return PyLong_FromLong(ret);
}

static PyMethodDef us_module_methods[] = {
    {"_set_hooks", mod_set_hooks, METH_VARARGS, NULL},
    {"_ssl_setup", us_ssl_setup, METH_VARARGS, NULL},
    {"peer_address", us_stream_peer_address, METH_O,
     "The peer's address of a connected IP socket, even once reset; else None."},
    {"probe", mod_probe, METH_NOARGS, "Return 0 when io_uring can be set up here, else -errno."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject *add_type(PyObject *m, PyType_Spec *spec, PyObject *base)
{
    PyTypeObject *tp = (PyTypeObject *)PyType_FromModuleAndSpec(m, spec, base);
    if (!tp || PyModule_AddType(m, tp) < 0) {
        Py_XDECREF(tp);
        return NULL;
    }
    return tp;
}

#define INTERN(field, text)                                                                                            \
    do {                                                                                                               \
        if (!(st->field = PyUnicode_InternFromString(text)))                                                           \
            return -1;                                                                                                 \
    } while (0)

/* The loop queues an iteration's writes and sends them together, so every
 * bytes object received in one batch is alive at once (an echo of 10 KiB on
 * 100 connections: ~1 MiB). glibc's default trim threshold (128 KiB) then
 * hands the top of the heap back to the kernel after each batch and the next
 * batch faults it in again: brk() and a page fault per 4 KiB, measured at up
 * to 1.5x the CPU per round trip, depending on where the heap top happened
 * to be. One block above the mmap threshold, allocated and freed, makes
 * glibc raise its thresholds the way it does by itself in any process that
 * once frees a large block (mmap threshold = the block, trim threshold =
 * twice that). Thresholds the user set (mallopt, MALLOC_*_ variables) turn
 * that adjustment off, so they are left alone; other allocators see one
 * malloc/free. */
#define US_MALLOC_PRIME (8u << 20)
static void us_raise_malloc_thresholds(void)
{
    volatile char *block = malloc(US_MALLOC_PRIME);
    if (block) {
        block[0] = 0; /* keeps the compiler from eliding the pair */
        free((void *)block);
    }
}

static int us_module_exec(PyObject *m)
{
    us_state *st = PyModule_GetState(m);
    us_raise_malloc_thresholds();
    PyObject *stream_bases = us_stream_bases(); /* NULL: no base */
    int failed = !(st->LoopCoreType = add_type(m, &us_loop_spec, NULL)) ||
                 !(st->HandleType = add_type(m, &us_handle_spec, NULL)) ||
                 !(st->TimerHandleType = add_type(m, &us_timer_handle_spec, (PyObject *)st->HandleType)) ||
                 !(st->FdWatchType = add_type(m, &us_fdwatch_spec, NULL)) ||
                 !(st->SockOpType = add_type(m, &us_sockop_spec, NULL)) ||
                 !(st->StreamType = add_type(m, &us_stream_spec, stream_bases)) ||
                 !(st->AcceptorType = add_type(m, &us_acceptor_spec, NULL)) ||
                 !(st->DgramReaderType = add_type(m, &us_dgram_reader_spec, NULL)) ||
                 !(st->SSLProtocolCoreType = add_type(m, &us_sslprotocol_spec, NULL)) ||
                 !(st->SSLAppTransportCoreType = add_type(m, &us_ssltransport_spec, NULL));
    Py_XDECREF(stream_bases);
    if (failed)
        return -1;
    /* asyncio's start_tls() accepts only transports that say they can. */
    if (PyObject_SetAttrString((PyObject *)st->StreamType, "_start_tls_compatible", Py_True) < 0)
        return -1;
    /* loop.sendfile(): try the loop's _sendfile_native first */
    PyObject *consts = PyImport_ImportModule("asyncio.constants");
    PyObject *modes = consts ? PyObject_GetAttrString(consts, "_SendfileMode") : NULL;
    PyObject *native = modes ? PyObject_GetAttrString(modes, "TRY_NATIVE") : NULL;
    int rc = native ? PyObject_SetAttrString((PyObject *)st->StreamType, "_sendfile_compatible", native) : -1;
    Py_XDECREF(consts);
    Py_XDECREF(modes);
    Py_XDECREF(native);
    if (rc < 0)
        return -1;
    st->UnavailableError = PyErr_NewExceptionWithDoc(
        "uringloop.IOUringUnavailableError",
        "io_uring cannot be used in this process (seccomp, sysctl or kernel version).", PyExc_OSError, NULL);
    if (!st->UnavailableError || PyModule_AddObjectRef(m, "IOUringUnavailableError", st->UnavailableError) < 0)
        return -1;
    /* internal: the Python side then takes asyncio's readiness path */
    st->AddressFallback = PyErr_NewExceptionWithDoc("uringloop._core.AddressFallback",
                                                    "The address cannot be handed to an io_uring operation as it is.",
                                                    PyExc_Exception, NULL);
    if (!st->AddressFallback || PyModule_AddObjectRef(m, "AddressFallback", st->AddressFallback) < 0)
        return -1;

    PyObject *futures = PyImport_ImportModule("asyncio.futures");
    if (!futures)
        return -1;
    st->future_type = PyObject_GetAttrString(futures, "Future");
    Py_DECREF(futures);
    if (!st->future_type)
        return -1;

    if (socket_fields_init(st) < 0)
        return -1;

    PyObject *fh = PyImport_ImportModule("asyncio.format_helpers");
    if (!fh)
        return -1;
    st->format_callback_source = PyObject_GetAttrString(fh, "_format_callback_source");
    st->extract_stack = PyObject_GetAttrString(fh, "extract_stack");
    Py_DECREF(fh);
    if (!st->format_callback_source || !st->extract_stack)
        return -1;

    INTERN(s_call_exception_handler, "call_exception_handler");
    INTERN(s_message, "message");
    INTERN(s_exception, "exception");
    INTERN(s_handle, "handle");
    INTERN(s_source_traceback, "source_traceback");
    INTERN(s_check_thread, "_check_thread");
    INTERN(s_check_callback, "_check_callback");
    INTERN(s_current_handle, "_current_handle");
    INTERN(s_slow_callback, "_uring_slow_callback");
    INTERN(s_loop, "loop");
    INTERN(s_uring_op, "_uring_op");
    INTERN(s_sock_stash, "_sock_stash");
    INTERN(s_set_result, "set_result");
    INTERN(s_set_exception, "set_exception");
    INTERN(s_done, "done");
    INTERN(s_gettimeout, "gettimeout");
    INTERN(s_call_soon, "call_soon");
    INTERN(s_call_at, "call_at");
    INTERN(s_call_soon_threadsafe, "call_soon_threadsafe");
    INTERN(s_data_received, "data_received");
    INTERN(s_get_buffer, "get_buffer");
    INTERN(s_buffer_updated, "buffer_updated");
    st->kw_loop = PyTuple_Pack(1, st->s_loop);
    st->water_high_default = PyLong_FromLong(64 * 1024);
    st->water_low_default = PyLong_FromLong(16 * 1024);
    if (!st->kw_loop || !st->water_high_default || !st->water_low_default)
        return -1;
    return us_http_module_init(m, st);
}

#define STATE_FIELDS(X)                                                                                                \
    X(LoopCoreType)                                                                                                    \
    X(HandleType)                                                                                                      \
    X(TimerHandleType)                                                                                                 \
    X(FdWatchType)                                                                                                     \
    X(SockOpType)                                                                                                      \
    X(StreamType)                                                                                                      \
    X(AcceptorType)                                                                                                    \
    X(DgramReaderType)                                                                                                 \
    X(SSLProtocolCoreType)                                                                                             \
    X(SSLAppTransportCoreType)                                                                                         \
    X(UnavailableError)                                                                                                \
    X(AddressFallback)                                                                                                 \
    X(format_callback_source)                                                                                          \
    X(extract_stack)                                                                                                   \
    X(handle_repr)                                                                                                     \
    X(sock_future)                                                                                                     \
    X(future_type)                                                                                                     \
    X(ssl_socket)                                                                                                      \
    X(transport_socket)                                                                                                \
    X(transport_socket_class)                                                                                          \
    X(water_high_default)                                                                                              \
    X(water_low_default)                                                                                               \
    X(socket_type)                                                                                                     \
    X(kw_loop)

static int us_module_traverse(PyObject *m, visitproc visit, void *arg)
{
    us_state *st = PyModule_GetState(m);
#define VISIT(f) Py_VISIT(st->f);
    STATE_FIELDS(VISIT)
#undef VISIT
    return us_ssl_module_traverse(st, visit, arg);
}

static int us_module_clear(PyObject *m)
{
    us_state *st = PyModule_GetState(m);
    us_handle_freelist_clear(st);
    us_http_module_clear(st);
    us_ssl_module_clear(st);
#define CLEAR(f) Py_CLEAR(st->f);
    STATE_FIELDS(CLEAR)
#undef CLEAR
    /* interned strings are immortal enough: released with the module */
    return 0;
}

static void us_module_free(void *m)
{
    us_module_clear((PyObject *)m);
}

static PyModuleDef_Slot us_module_slots[] = {
    {Py_mod_exec, us_module_exec},
    {0, NULL},
};

static struct PyModuleDef us_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uringloop._core",
    .m_doc = "io_uring engine and the C core of uringloop.",
    .m_size = sizeof(us_state),
    .m_methods = us_module_methods,
    .m_slots = us_module_slots,
    .m_traverse = us_module_traverse,
    .m_clear = us_module_clear,
    .m_free = us_module_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&us_module_def);
}
