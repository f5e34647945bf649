/*
 * us: the CPython face of the engine, shared declarations.
 *
 * Module `uringloop._core` holds heap types with module state (as CPython's
 * _asynciomodule.c does): LoopCore (the C base of uringloop.Loop), Handle and
 * TimerHandle, FdWatch (add_reader/add_writer) and SockOp (sock_* calls).
 */
#ifndef US_H
#define US_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "../loop/ue.h"

#define US_CONTAINER(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

typedef struct us_state {
    PyTypeObject *LoopCoreType;
    PyTypeObject *HandleType;
    PyTypeObject *TimerHandleType;
    PyTypeObject *FdWatchType;
    PyTypeObject *SockOpType;
    PyTypeObject *StreamType;
    PyTypeObject *AcceptorType;
    PyTypeObject *DgramReaderType;
    PyTypeObject *SSLProtocolCoreType, *SSLAppTransportCoreType; /* us_ssl.c */
    struct us_ssl_state *ssl;                                    /* set by _core._ssl_setup() */
    PyObject *UnavailableError;                                  /* uringloop.IOUringUnavailableError */
    PyObject *AddressFallback; /* _core.AddressFallback: an address the C ops cannot encode */

    /* asyncio helpers used on slow paths */
    PyObject *format_callback_source; /* asyncio.format_helpers._format_callback_source */
    PyObject *extract_stack;          /* asyncio.format_helpers.extract_stack */

    /* hooks installed by python/uringloop at import */
    PyObject *handle_repr;            /* callable(handle) -> str */
    PyObject *sock_future;            /* Future subclass whose cancel() cancels the op */
    PyObject *future_type;            /* asyncio.futures.Future, for create_future() */
    PyObject *ssl_socket;             /* ssl.SSLSocket, which sock_* calls refuse; None without ssl */
    PyObject *transport_socket_class; /* asyncio.trsock.TransportSocket, for get_extra_info("socket") */
    PyObject *transport_socket;       /* the same class, which sock_* calls refuse; None on 3.10 (derived) */
    PyObject *water_high_default, *water_low_default; /* 65536 and 16384: every transport's limits at first */

    /* _socket.socket, whose fields sock_* reads without a method call:
     * offsets from its member descriptors (fd_off is -1 when the layout is
     * not the one expected, and fileno() is called instead). */
    PyTypeObject *socket_type;
    Py_ssize_t socket_fd_off, socket_family_off, socket_type_off;

    /* interned strings */
    PyObject *s_call_exception_handler, *s_message, *s_exception, *s_handle;
    PyObject *s_source_traceback, *s_check_thread, *s_check_callback;
    PyObject *s_current_handle, *s_slow_callback, *s_loop, *s_uring_op;
    PyObject *s_sock_stash, *s_set_result, *s_set_exception, *s_done, *s_gettimeout;
    PyObject *s_call_soon, *s_call_at, *s_call_soon_threadsafe;
    PyObject *s_data_received, *s_get_buffer, *s_buffer_updated;
    PyObject *kw_loop; /* ("loop",) */

    /* the HTTP server (us_http.c, us_http_cycle.c) */
    PyTypeObject *HttpServerType, *HttpConnType, *HttpCycleType, *DoneType, *AppRunnerType;
    PyObject *CancelledError;     /* asyncio.CancelledError */
    PyObject *done_none;          /* the Done that yields None */
    PyObject *ClientDisconnected; /* OSError raised by send() after the client left */
    PyObject *h_scope_template, *h_asgi_template, *h_extensions_template;
    PyObject *h_type, *h_asgi, *h_http_version, *h_method, *h_scheme, *h_path, *h_raw_path;
    PyObject *h_query_string, *h_root_path, *h_headers, *h_client, *h_server, *h_state, *h_extensions;
    PyObject *h_v10, *h_v11, *h_body, *h_more_body, *h_status, *h_empty_bytes;
    PyObject *h_t_request, *h_t_disconnect, *h_t_start, *h_t_body, *h_t_pathsend;
#define US_HTTP_NMETHODS 64
    PyObject *h_methods[US_HTTP_NMETHODS]; /* interned, made on first use */
#define US_HTTP_NNAMES 24
    PyObject *h_names[US_HTTP_NNAMES]; /* common request header names */
    int h_nnames;

    /* Freed handles kept for reuse: they are GC objects, and allocating a
     * batch of them would trigger generation-0 collections. */
#define US_FREELIST_SIZE 1024
/* How many bytes of large writes one iteration may hold back for its quiet
 * sends: they wait until the iteration ends, so this many stay in a core's
 * cache (1 MiB of L2 here) while the iteration goes on. */
#define US_DEFER_BUDGET (256 * 1024)
    struct us_handle *handle_free[US_FREELIST_SIZE];
    int handle_free_n;
    struct us_timer_handle *timer_free[US_FREELIST_SIZE];
    int timer_free_n;
} us_state;

typedef struct us_loop {
    PyObject_HEAD us_state *st;
    ue_loop ue;
    int ue_ready; /* ring set up */

    /* ready queue: a ring buffer of strong references to Handle or FdWatch */
    PyObject **ready;
    Py_ssize_t ready_head, ready_len, ready_cap;

    PyObject *readers; /* {fd: FdWatch} */
    PyObject *writers;
    ue_epoll ep; /* the fds of readers and writers */

    /* streams with writes queued this iteration (strong references) */
    PyObject **flush;
    Py_ssize_t flush_len, flush_cap;
    Py_ssize_t flushers; /* streams and connections that hold a place in it */
    /* bytes of large writes this iteration may still hold back for its quiet
     * sends (see stream_may_defer in us_stream.c); reset at each flush */
    Py_ssize_t defer_budget;

    /* provided buffers for the streams' multishot recv, made on first use */
    ue_bufring recv_pool;
    int recv_pool_ready;
    unsigned recv_pool_gen; /* bumped whenever the pool is made anew */

    Py_ssize_t sockops_inflight; /* and waiting in sock_queue */
    /* sock_* ops run one at a time per socket and direction (receive, send),
     * in call order: [fd * 2 + direction] is the last op of that queue. */
    struct us_sockop **sock_queue;
    int sock_queue_cap;
    /* [fd] is set while a transport may own the descriptor: sock_* calls
     * then ask loop._ensure_fd_no_transport(), as asyncio's do */
    unsigned char *transport_fds;
    int transport_fds_cap;
    char stopping, closed, debug, running, closing;

    /* The scheduler's clock is the monotonic clock read in C, unless a
     * subclass defines time() or one is set on the loop object, which
     * asyncio's scheduler would then follow (see loop_now). */
    char time_from_subclass;
    PyObject *time_override; /* set on the instance */
} us_loop;

typedef struct us_handle {
    PyObject_HEAD PyObject *callback; /* NULL once cancelled */
    PyObject *args;                   /* tuple, NULL once cancelled */
    PyObject *context;
    us_loop *loop;
    PyObject *source_traceback;
    PyObject *repr; /* repr saved at cancel() in debug mode */
    PyObject *weakreflist;
    char cancelled;
} us_handle;

typedef struct us_timer_handle {
    us_handle base;
    ue_timer timer;   /* in the loop's heap while scheduled (the heap owns a ref) */
    char when_is_int; /* call_at() got an int: when() gives it back as one, as asyncio's does */
    char when_is_nan; /* scheduled for NaN (due at once in the heap): when() gives NaN back */
} us_timer_handle;

/* us_module.c */
us_state *us_state_of_type(PyTypeObject *tp);
int us_report_exception(us_loop *loop, PyObject *message, PyObject *handle);
int us_report_callback_exception(us_loop *loop, PyObject *cb, PyObject *args, PyObject *handle);
int us_report_call_exception(us_loop *loop, PyObject *cb, PyObject *const *args, Py_ssize_t nargs, PyObject *context);
PyObject *us_take_exception(void);
PyObject *us_oserror_from_res(int32_t res);
int us_peer_address(int fd, struct sockaddr_storage *ss, socklen_t *len);
/* type(o).__name__: tp_name without its module ("array.array" -> "array"). */
static inline const char *us_type_name(PyObject *o)
{
    const char *dot = strrchr(Py_TYPE(o)->tp_name, '.');
    return dot ? dot + 1 : Py_TYPE(o)->tp_name;
}

/* us_handle.c */
void us_handle_freelist_clear(us_state *st);
extern PyType_Spec us_handle_spec, us_timer_handle_spec;
us_handle *us_handle_new(us_loop *loop, PyTypeObject *tp, PyObject *callback, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *context);
int us_handle_run(us_handle *h);
void us_handle_cancel_quiet(us_handle *h);

/* us_loop.c */
extern PyType_Spec us_loop_spec;
int us_ready_push(us_loop *loop, PyObject *item); /* takes a new reference */
int us_loop_check_open(us_loop *loop);
void us_timer_cancelled(us_loop *loop, us_timer_handle *t);

/* us_fdwatch.c */
extern PyType_Spec us_fdwatch_spec;
int us_fdwatch_run(PyObject *w);
PyObject *us_loop_add_watch(us_loop *loop, PyObject *dict, int fd, PyObject *fileobj, short events,
                            PyObject *const *args, Py_ssize_t nargs);
int us_loop_remove_watch(us_loop *loop, PyObject *dict, int fd);
int us_loop_watch_fd_of(PyObject *dict, PyObject *fileobj);
void us_loop_rearm_watches(us_loop *loop);

/* us_stream.c, us_acceptor.c */
extern PyType_Spec us_stream_spec, us_acceptor_spec;
PyObject *us_stream_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs);
int us_stream_run(PyObject *s);
PyObject *us_stream_bases(void);
void us_stream_flush(PyObject *s);
PyObject *us_stream_peer_address(PyObject *mod, PyObject *arg);
PyObject *us_acceptor_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs);
int us_acceptor_run(PyObject *a);
ue_bufring *us_loop_recv_pool(us_loop *loop);
int us_loop_add_flush(us_loop *loop, PyObject *stream);
int us_loop_flush_reserve(us_loop *loop);
void us_loop_flush_unreserve(us_loop *loop);

/* us_http.c */
int us_http_module_init(PyObject *m, us_state *st);
void us_http_module_clear(us_state *st);

/* us_ssl.c: C versions of asyncio SSLProtocol's per-record methods */
extern PyType_Spec us_sslprotocol_spec, us_ssltransport_spec;
PyObject *us_ssl_setup(PyObject *mod, PyObject *args);
int us_ssl_feed(PyObject *ssl_protocol, PyObject *data); /* an SSLProtocolCore's BufferedProtocol input */
void us_ssl_module_clear(us_state *st);
int us_ssl_module_traverse(us_state *st, visitproc visit, void *arg);
void us_httpconn_flush(PyObject *conn);

/* us_sockops.c */
extern PyType_Spec us_sockop_spec;
PyObject *us_loop_sock_op(us_loop *loop, PyObject *const *args, Py_ssize_t nargs);
void us_loop_sock_queue_reset(us_loop *loop);
PyObject *us_sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len);
PyObject *us_loop_transport_fd_added(us_loop *loop, PyObject *fd);

/* us_dgram.c */
extern PyType_Spec us_dgram_reader_spec;
PyObject *us_dgram_reader_new(us_loop *loop, PyObject *const *args, Py_ssize_t nargs);
int us_dgram_run(PyObject *r);

#endif
