/*
 * The ASGI HTTP/1.1 server: shared declarations of us_http.c (server,
 * listeners, connections: the I/O side) and us_http_cycle.c (one request
 * and its response: scope, receive, send).
 *
 * Ownership: the server holds its connections in a list; a connection holds
 * its request cycles in order (at most US_HTTP_MAX_PIPELINE); a cycle holds
 * its connection until its response is complete or the connection ends.
 * In-flight io_uring ops hold a reference to their owner.
 */
#ifndef US_HTTP_H
#define US_HTTP_H

#include "us.h"

#include "../http/uh.h"

#define US_HTTP_MAX_PIPELINE 32
#define US_HTTP_INLINE_CYCLES 2        /* cycle slots a connection carries itself */
#define US_HTTP_READ_HIGH (64 * 1024)  /* unread request body that pauses reading */
#define US_HTTP_WRITE_HIGH (64 * 1024) /* queued response bytes that make send() wait */
#define US_HTTP_WRITE_LOW (16 * 1024)
#define US_HTTP_LINGER_SECONDS 2.0
#define US_HTTP_DRAIN_GRACE 1.0 /* for a first request on a connection made before the drain */

/* A piece of response: bytes (obj) or a range of an open file (fd). */
typedef struct us_seg {
    PyObject *obj;
    int fd;
    int64_t off, len;
} us_seg;

typedef struct us_segq {
    us_seg *v;
    int head, len, cap;
    Py_ssize_t bytes;
} us_segq;

typedef struct us_httpserver us_httpserver;
typedef struct us_httpconn us_httpconn;
typedef struct us_httpcycle us_httpcycle;

/* A connection waits for at most one deadline at a time. Each kind has one
 * fixed duration, so the connections waiting for it are in deadline order
 * when appended: a list per kind, whose heads the server's one timer
 * covers (see us_http.c, "deadlines"). */
enum us_deadline_kind {
    US_DL_NONE = -1,
    US_DL_HEADER = 0, /* a request head is due: header_timeout */
    US_DL_KEEPALIVE,  /* idle between requests: keepalive_timeout */
    US_DL_LINGER,     /* closing: the client's FIN is due, US_HTTP_LINGER_SECONDS */
    US_DL_GRACE,      /* draining: a first request is due, US_HTTP_DRAIN_GRACE */
    US_DL_KINDS
};

typedef struct us_deadline_list {
    us_httpconn *head, *tail;
} us_deadline_list;

typedef struct us_listener {
    ue_op op;
    us_httpserver *srv;
    PyObject *sock;
    int fd; /* our duplicate of the socket, -1 once closed */
    char active;
    char shared;  /* other processes accept on this socket: poll + accept4 */
    char starved; /* out of descriptors: accepting again at the next tick */
    char starve_logged;
} us_listener;

struct us_httpserver {
    PyObject_HEAD us_state *st;
    us_loop *loop;
    PyObject *app;
    PyObject *log_error;      /* callable(message, exc or None) */
    PyObject *log_warning;    /* callable(message) or NULL */
    PyObject *access_log;     /* callable(scope, status) or None */
    PyObject *proxy;          /* callable(scope) or None: applies X-Forwarded-* */
    PyObject *websocket;      /* callable(fd, scope, leftover) taking upgraded connections, or NULL */
    PyObject *state;          /* lifespan state: copied into every scope */
    PyObject *root_path;      /* str */
    PyObject *root_path_b;    /* bytes */
    PyObject *task_type;      /* asyncio.Task */
    PyObject *context;        /* copied at the first listen(): each app Task starts from a copy */
    PyObject *scope_template; /* every scope starts as a copy: the fixed keys, the scheme */
    PyObject *s_task_factory;
    uh_buf server_line;   /* "server: ...\r\n", left out when the app sends its own */
    uh_buf extra_headers; /* --header lines, serialized */
    int date_header;
    uh_limits limits;
    double keepalive_timeout, header_timeout;
    Py_ssize_t limit_concurrency;
    us_listener **listeners;
    int nlisteners;
    us_httpconn *conns; /* doubly linked */
    Py_ssize_t nconns, ntasks;
    unsigned long long requests;
    char draining;
    char cancelled; /* cancel_all() ran: late accepts are closed */
    uh_date_cache date;
    uh_buf scratch; /* response heads are built here */
    us_deadline_list deadlines[US_DL_KINDS];
    PyObject *expiry; /* the loop's TimerHandle for the earliest deadline, or NULL */
    double expiry_at; /* its deadline (ue_now() clock) */
};

struct us_httpconn {
    PyObject_HEAD us_httpserver *srv;
    us_httpconn *prev, *next;
    int fd;
    int sent_iov; /* segments in the send in flight */
    ue_op recv_op, send_op;
    uh_parser parser;
    uh_buf pending; /* unparsed input kept while parsing is paused */
    size_t pending_off;
    /* in request order: cycles_inline, or once a second request is
     * pipelined behind the first, US_HTTP_MAX_PIPELINE slots of the heap
     * (an idle connection need not carry 32 pointers) */
    us_httpcycle **cycles;
    us_httpcycle *cycles_inline[US_HTTP_INLINE_CYCLES];
    int ncycles;
    us_httpcycle *parsing;    /* the cycle whose body is being parsed */
    Py_ssize_t body_buffered; /* request body bytes not yet received by apps */
    us_segq wq;
    int64_t wq_off;                 /* bytes of the first segment already sent */
    PyObject *client, *sockname;    /* scope tuples, made on first use */
    double deadline;                /* ue_now() seconds; 0: none */
    us_httpconn *dl_prev, *dl_next; /* in srv->deadlines[dl_kind] */
    signed char dl_kind;            /* enum us_deadline_kind */
    char in_list, parse_paused, no_more, read_paused, eof, dead, closing;
    char queued_flush, lingering, closed, close_after, upgrading, flush_reserved;
    char used;          /* a request head has arrived (see server_drain) */
    char no_linger;     /* closes at once: nothing came that a reset could cost (conn_drain) */
    PyObject *ws_scope; /* the upgrade request's scope, until handed over */
    PyObject *tail;     /* an error response sent after the cycles, then close */
};

struct us_httpcycle {
    PyObject_HEAD us_httpconn *conn; /* NULL once detached */
    us_httpserver *srv;
    PyObject *scope;
    PyObject *task;
    PyObject *body; /* list of request body chunks not yet received */
    PyObject *recv_waiter, *drain_waiter;
    us_segq out;       /* response bytes while an earlier response is unfinished */
    PyObject *headers; /* from http.response.start until the head is written */
    int status;
    int64_t expected_len, sent_len;
    uint16_t req_flags;
    char body_complete, final_returned, response_started, head_written;
    char response_complete, chunked, head_request, keep_alive, http10;
    char continue_sent, disconnected, rejected;
    char input_ended; /* the client half-closed after this request arrived whole */
};

/* us_http.c */
extern PyType_Spec us_httpserver_spec, us_httpconn_spec;
void us_httpconn_flush(PyObject *conn);
int us_httpconn_emit(us_httpconn *c, us_httpcycle *cy, us_seg seg);
void us_httpconn_cycle_done(us_httpconn *c, us_httpcycle *cy);
void us_httpconn_body_consumed(us_httpconn *c, Py_ssize_t n);
int us_httpconn_is_head(const us_httpconn *c, const us_httpcycle *cy);
void us_http_log_error(us_httpserver *srv, const char *message, PyObject *exc);
void us_http_log_warning(us_httpserver *srv, const char *message);

/* us_http_cycle.c */
extern PyType_Spec us_httpcycle_spec, us_done_spec, us_runner_spec;
us_httpcycle *us_httpcycle_new(us_httpconn *c, uh_parser *p, const uh_request *req);
PyObject *us_http_build_scope(us_httpconn *c, uh_parser *p, const uh_request *req);
int us_httpcycle_start(us_httpcycle *cy);
void us_httpcycle_wake(us_httpcycle *cy);
void us_httpcycle_disconnect(us_httpcycle *cy);
void us_httpcycle_input_ended(us_httpcycle *cy);
int us_httpcycle_error_response(us_httpcycle *cy, int status, const char *text);
PyObject *us_done_none_new(us_state *st);
PyObject *us_http_simple_response(us_httpserver *srv, int status, const char *text);

/* segment queues */
int us_segq_push(us_segq *q, us_seg seg);
void us_segq_clear(us_segq *q);
static inline us_seg *us_segq_at(us_segq *q, int i)
{
    return &q->v[(q->head + i) % q->cap];
}
void us_segq_pop(us_segq *q);

#endif
