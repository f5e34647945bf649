/*
 * HttpServer: the I/O side of the ASGI server. Listening sockets get one
 * multishot accept each; a connection is a C object with a multishot recv on
 * the loop's provided-buffer ring, an llhttp parser fed straight from the
 * kernel's buffer, the request cycles it has parsed (pipelining: parsed
 * ahead, answered in order) and a queue of response segments sent with one
 * sendmsg per loop iteration.
 *
 * Time limits (keep-alive, slow headers, lingering close, the drain's
 * grace) are one deadline per connection, in one list per kind, under one
 * loop timer ("deadlines" below).
 */
#include "us_http.h"

#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <poll.h>
#include <unistd.h>

#include <structmember.h>

/* ---- segment queues ---- */

int us_segq_push(us_segq *q, us_seg seg)
{
    if (q->len == q->cap) {
        int cap = q->cap ? q->cap * 2 : 8;
        us_seg *v = PyMem_Malloc((size_t)cap * sizeof *v);
        if (!v) {
            PyErr_NoMemory();
            return -1;
        }
        for (int i = 0; i < q->len; i++)
            v[i] = *us_segq_at(q, i);
        PyMem_Free(q->v);
        q->v = v;
        q->head = 0;
        q->cap = cap;
    }
    q->v[(q->head + q->len) % q->cap] = seg;
    q->len++;
    q->bytes += seg.obj ? PyBytes_GET_SIZE(seg.obj) : (Py_ssize_t)seg.len;
    return 0;
}

void us_segq_pop(us_segq *q)
{
    us_seg *s = us_segq_at(q, 0);
    q->bytes -= s->obj ? PyBytes_GET_SIZE(s->obj) : (Py_ssize_t)s->len;
    Py_CLEAR(s->obj);
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    q->head = (q->head + 1) % q->cap;
    if (--q->len == 0) {
        /* An emptied queue gives its array back: an idle keep-alive
         * connection would otherwise keep 256 bytes for its next response
         * (about 70 instructions a request to take them again, callgrind) */
        PyMem_Free(q->v);
        q->v = NULL;
        q->cap = q->head = 0;
    }
}

void us_segq_clear(us_segq *q)
{
    while (q->len)
        us_segq_pop(q);
    PyMem_Free(q->v);
    q->v = NULL;
    q->cap = q->head = 0;
    q->bytes = 0;
}

void us_http_log_error(us_httpserver *srv, const char *message, PyObject *exc)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallFunction(srv->log_error, "sO", message, exc ? exc : Py_None);
    if (!r)
        PyErr_WriteUnraisable(srv->log_error);
    Py_XDECREF(r);
    PyErr_Restore(et, ev, tb);
}

void us_http_log_warning(us_httpserver *srv, const char *message)
{
    if (!srv->log_warning)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallFunction(srv->log_warning, "s", message);
    if (!r)
        PyErr_WriteUnraisable(srv->log_warning);
    Py_XDECREF(r);
    PyErr_Restore(et, ev, tb);
}

/* ---- connections ---- */

static void conn_recv_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);
static void conn_send_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);
static void conn_close(us_httpconn *c);
static void conn_maybe_free(us_httpconn *c);
static void conn_parse_pending(us_httpconn *c);
static void conn_drain(us_httpconn *c);

/* ---- deadlines ----
 *
 * Keep-alive, slow headers, lingering close and the drain's grace: each is
 * one fixed duration, so appending a connection to its kind's list keeps
 * the list in deadline order, and setting, moving or clearing a deadline
 * is a few pointer writes. One loop timer covers the earliest head; it is
 * moved only when a new deadline falls before it, and a deadline cleared
 * early leaves it in place (it then finds nothing due and re-arms). */

static double deadline_duration(const us_httpserver *srv, int kind)
{
    switch (kind) {
    case US_DL_HEADER:
        return srv->header_timeout;
    case US_DL_KEEPALIVE:
        return srv->keepalive_timeout;
    case US_DL_LINGER:
        return US_HTTP_LINGER_SECONDS;
    default:
        return US_HTTP_DRAIN_GRACE;
    }
}

static void conn_clear_deadline(us_httpconn *c)
{
    c->deadline = 0;
    if (c->dl_kind == US_DL_NONE)
        return;
    us_deadline_list *list = &c->srv->deadlines[c->dl_kind];
    if (c->dl_prev)
        c->dl_prev->dl_next = c->dl_next;
    else
        list->head = c->dl_next;
    if (c->dl_next)
        c->dl_next->dl_prev = c->dl_prev;
    else
        list->tail = c->dl_prev;
    c->dl_prev = c->dl_next = NULL;
    c->dl_kind = US_DL_NONE;
}

static void server_disarm_expiry(us_httpserver *srv)
{
    if (!srv->expiry)
        return;
    PyObject *r = PyObject_CallMethod(srv->expiry, "cancel", NULL);
    if (!r)
        PyErr_WriteUnraisable((PyObject *)srv);
    Py_XDECREF(r);
    Py_CLEAR(srv->expiry);
}

/* Makes the loop call server._expire() at `when` (or earlier). Called from
 * I/O callbacks, some with an exception being handled: it is kept. */
static void server_arm_expiry(us_httpserver *srv, double when)
{
    if (srv->expiry && srv->expiry_at <= when)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    server_disarm_expiry(srv);
    double delay = when - ue_now();
    PyObject *cb = PyObject_GetAttrString((PyObject *)srv, "_expire");
    if (cb) {
        srv->expiry = PyObject_CallMethod((PyObject *)srv->loop, "call_later", "dO", delay > 0 ? delay : 0.0, cb);
        Py_DECREF(cb);
    }
    if (srv->expiry)
        srv->expiry_at = when;
    else
        PyErr_WriteUnraisable((PyObject *)srv); /* a closed loop: nothing would run on it anyway */
    PyErr_Restore(et, ev, tb);
}

/* Starts the connection's deadline of `kind` now; a kind whose duration is
 * not a positive finite number sets none (no limit). */
static void conn_set_deadline(us_httpconn *c, int kind)
{
    conn_clear_deadline(c);
    double d = deadline_duration(c->srv, kind);
    if (c->closed || !(d > 0) || isinf(d))
        return;
    us_deadline_list *list = &c->srv->deadlines[kind];
    c->deadline = ue_now() + d;
    c->dl_kind = (signed char)kind;
    c->dl_prev = list->tail;
    if (list->tail)
        list->tail->dl_next = c;
    else
        list->head = c;
    list->tail = c;
    server_arm_expiry(c->srv, c->deadline);
}

/* Response bytes not yet taken by the kernel. */
static int conn_output_queued(const us_httpconn *c)
{
    return c->wq.len || ue_op_busy(&c->send_op);
}

/* Requests read and held until the queue drains or the pipeline has room
 * (conn_may_parse), which are still to be answered (not after no_more). */
static int conn_holds_requests(const us_httpconn *c)
{
    return c->parse_paused && !c->no_more;
}

/* Output queued, or owed to the requests held. */
static int conn_owes_output(const us_httpconn *c)
{
    return conn_output_queued(c) || conn_holds_requests(c);
}

/* A deadline passed: a connection that owes its client nothing closes
 * (one with a request in progress has had its deadline cleared). */
static void conn_expire(us_httpconn *c)
{
    int kind = c->dl_kind;
    int idle = c->lingering || !c->ncycles;
    conn_clear_deadline(c);
    if (!idle)
        return;
    if (kind == US_DL_KEEPALIVE && conn_owes_output(c)) {
        /* a client still reading its responses is slow, not idle: closing
         * now would cut them short (asyncio's close() flushes too) */
        conn_set_deadline(c, US_DL_KEEPALIVE);
        return;
    }
    Py_INCREF(c);
    c->dead = 1;
    conn_close(c);
    Py_DECREF(c);
}

static PyObject *server_expire(us_httpserver *srv, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(srv->expiry);
    /* 1 ms of slack: a timer that fires a hair early must not re-arm for
     * the same instant */
    double now = ue_now() + 1e-3, next = INFINITY;
    for (int k = 0; k < US_DL_KINDS; k++) {
        us_httpconn *c;
        while ((c = srv->deadlines[k].head) != NULL && c->deadline <= now)
            conn_expire(c);
        if (c && c->deadline < next)
            next = c->deadline;
    }
    if (next < INFINITY)
        server_arm_expiry(srv, next);
    Py_RETURN_NONE;
}

/* Room for one more cycle: the inline slots hold the common case (one
 * request at a time, and the next one read while the first answers); a
 * pipelining client gets the whole US_HTTP_MAX_PIPELINE on the heap. */
static int conn_cycle_room(us_httpconn *c)
{
    int cap = c->cycles == c->cycles_inline ? US_HTTP_INLINE_CYCLES : US_HTTP_MAX_PIPELINE;
    if (c->ncycles < cap)
        return 0;
    us_httpcycle **more = PyMem_Malloc(US_HTTP_MAX_PIPELINE * sizeof *more);
    if (!more) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(more, c->cycles, (size_t)c->ncycles * sizeof *more);
    c->cycles = more;
    return 0;
}

/* Upgrade: websocket on a connection with nothing else in flight. */
static int conn_is_websocket(us_httpconn *c, uh_parser *p, const uh_request *req)
{
    if (!c->srv->websocket || !(req->flags & UH_REQ_UPGRADE) || c->ncycles || req->method != HTTP_GET)
        return 0;
    for (uint32_t i = 0; i < req->nheaders; i++) {
        const uh_header *h = &req->headers[i];
        if (h->name.len == 7 && memcmp(uh_str(p, h->name), "upgrade", 7) == 0 && h->value.len >= 9 &&
            strncasecmp(uh_str(p, h->value), "websocket", 9) == 0)
            return 1;
    }
    return 0;
}

static int conn_on_head(void *ud, uh_parser *p, const uh_request *req)
{
    us_httpconn *c = ud;
    c->used = 1;
    if (conn_is_websocket(c, p, req)) {
        if (c->srv->draining) {
            /* a connection kept through the drain for its first request
             * (server_drain): no new WebSocket session while shutting down */
            p->error_status = 503;
            p->error_reason = "Server is shutting down.";
            return -1;
        }
        Py_XSETREF(c->ws_scope, us_http_build_scope(c, p, req));
        if (c->ws_scope) {
            conn_clear_deadline(c);
            c->srv->requests++;
            return UH_CB_UPGRADE;
        }
        PyErr_Clear();
        p->error_status = 500;
        return -1;
    }
    us_httpcycle *cy = conn_cycle_room(c) < 0 ? NULL : us_httpcycle_new(c, p, req);
    if (!cy) {
        us_http_log_error(c->srv, "Exception while building the ASGI scope", NULL);
        PyErr_Clear();
        p->error_status = 500;
        p->error_reason = "Internal Server Error";
        return -1;
    }
    c->cycles[c->ncycles++] = cy; /* the connection's reference */
    c->parsing = cy;
    conn_clear_deadline(c);
    c->srv->requests++;
    if (us_httpcycle_start(cy) < 0)
        PyErr_Clear(); /* already answered with a 500 */
    return 0;
}

static int conn_on_body(void *ud, const char *at, size_t len)
{
    us_httpconn *c = ud;
    us_httpcycle *cy = c->parsing;
    if (!cy || cy->rejected || cy->disconnected)
        return 0;
    PyObject *b = PyBytes_FromStringAndSize(at, (Py_ssize_t)len);
    if (b && !cy->body && !(cy->body = PyList_New(0)))
        Py_CLEAR(b);
    if (!b || PyList_Append(cy->body, b) < 0) {
        Py_XDECREF(b);
        PyErr_Clear();
        c->parser.error_status = 500;
        return -1;
    }
    Py_DECREF(b);
    c->body_buffered += (Py_ssize_t)len;
    return 0;
}

/* Whether the next request may be parsed and started: not after the last
 * one, not beyond the pipeline's depth, and not while the responses already
 * complete fill the send queue past its high-water mark. A response is
 * complete once queued, so without that last condition a client that sends
 * requests and never reads would have the server queue their responses
 * without bound. */
static int conn_may_parse(const us_httpconn *c)
{
    return !c->no_more && c->ncycles < US_HTTP_MAX_PIPELINE && c->wq.bytes <= US_HTTP_WRITE_HIGH;
}

static int conn_on_complete(void *ud)
{
    us_httpconn *c = ud;
    us_httpcycle *cy = c->parsing;
    c->parsing = NULL;
    if (cy) {
        cy->body_complete = 1;
        if (!cy->keep_alive)
            c->no_more = 1;
        if (c->eof)
            us_httpcycle_input_ended(cy); /* held back when the FIN came (conn_input_ended) */
    }
    return conn_may_parse(c) ? 0 : UH_CB_PAUSE;
}

static const uh_callbacks conn_callbacks = {conn_on_head, conn_on_body, conn_on_complete};

static int conn_arm_recv(us_httpconn *c)
{
    us_loop *loop = c->srv->loop;
    if (ue_op_busy(&c->recv_op) || c->read_paused || c->eof || c->closed || c->upgrading || loop->closing)
        return 0; /* loop->closing: see stream_arm_recv */
    ue_bufring *pool = us_loop_recv_pool(loop);
    if (!pool)
        return -1;
    struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringserve: the io_uring submission queue is full");
        return -1;
    }
    ue_prep_recv_multishot(sqe, c->fd, pool);
    ue_op_arm(&loop->ue, &c->recv_op, sqe, conn_recv_cb);
    loop->sockops_inflight++;
    Py_INCREF(c);
    return 0;
}

static void conn_schedule_flush(us_httpconn *c)
{
    if (c->queued_flush || c->closed)
        return;
    c->queued_flush = 1;
    if (us_loop_add_flush(c->srv->loop, Py_NewRef(c)) < 0) { /* not with a reserved place */
        c->queued_flush = 0;
        PyErr_WriteUnraisable((PyObject *)c);
    }
}

int us_httpconn_is_head(const us_httpconn *c, const us_httpcycle *cy)
{
    return c->ncycles && c->cycles[0] == cy;
}

/* Queues a response segment (the reference moves into the queue). */
int us_httpconn_emit(us_httpconn *c, us_httpcycle *cy, us_seg seg)
{
    if (c->dead || c->closed) {
        Py_XDECREF(seg.obj);
        if (seg.fd >= 0)
            close(seg.fd);
        return 0;
    }
    if (!us_httpconn_is_head(c, cy))
        return us_segq_push(&cy->out, seg);
    if (us_segq_push(&c->wq, seg) < 0)
        return -1;
    conn_schedule_flush(c);
    return 0;
}

static void conn_release_cycle(us_httpcycle *cy)
{
    Py_CLEAR(cy->conn);
    Py_DECREF(cy);
}

/* A cycle whose response is complete leaves the connection, which goes on
 * with the next request. A body the app did not read to the end is dropped
 * (what is buffered no longer holds reading back) and its receive() reports
 * a disconnect, as uvicorn's does once the response is complete. Its last
 * send() may still wait for room in its own buffer, which has just joined
 * the send queue: nothing wakes a cycle that left the list, so that wait
 * ends now (the response is complete, nothing more can be added). */
static void conn_retire_cycle(us_httpconn *c, us_httpcycle *cy)
{
    if (!cy->final_returned) {
        Py_ssize_t unread = 0;
        Py_ssize_t nchunks = cy->body ? PyList_GET_SIZE(cy->body) : 0;
        for (Py_ssize_t i = 0; i < nchunks; i++)
            unread += PyBytes_GET_SIZE(PyList_GET_ITEM(cy->body, i));
        Py_CLEAR(cy->body);
        cy->final_returned = 1; /* nothing more to hand out: receive() says disconnect */
        cy->disconnected = 1;
        if (unread)
            us_httpconn_body_consumed(c, unread);
    }
    Py_CLEAR(cy->conn);
    us_httpcycle_wake(cy);
    Py_DECREF(cy);
}

/* The first cycle's response is complete: the next one becomes the head,
 * its buffered response joins the send queue, and parsing resumes. */
void us_httpconn_cycle_done(us_httpconn *c, us_httpcycle *cy)
{
    if (!us_httpconn_is_head(c, cy))
        return; /* finished early: popped when it becomes the head */
    while (c->ncycles && c->cycles[0]->response_complete) {
        us_httpcycle *done = c->cycles[0];
        int last = !done->keep_alive;
        memmove(c->cycles, c->cycles + 1, (size_t)(c->ncycles - 1) * sizeof c->cycles[0]);
        c->ncycles--;
        if (c->parsing == done)
            c->parsing = NULL; /* answered before its body was read: drop the rest */
        conn_retire_cycle(c, done);
        if (last) {
            /* "connection: close" went out: requests after it get no answer */
            c->close_after = 1;
            while (c->ncycles) {
                us_httpcycle *rest = c->cycles[--c->ncycles];
                us_httpcycle_disconnect(rest);
                conn_release_cycle(rest);
            }
            c->parsing = NULL;
            Py_CLEAR(c->tail);
            break;
        }
        if (c->ncycles) {
            us_httpcycle *next = c->cycles[0];
            while (next->out.len) {
                us_seg *s = us_segq_at(&next->out, 0);
                us_seg moved = *s;
                next->out.bytes -= s->obj ? PyBytes_GET_SIZE(s->obj) : (Py_ssize_t)s->len;
                s->obj = NULL;
                s->fd = -1;
                next->out.head = (next->out.head + 1) % next->out.cap;
                next->out.len--;
                if (us_segq_push(&c->wq, moved) < 0) {
                    PyErr_WriteUnraisable((PyObject *)c);
                    break;
                }
            }
            us_httpcycle_wake(next); /* a send() waiting for its turn */
        }
    }
    conn_schedule_flush(c);
    if (c->close_after) {
        c->no_more = 1;
        return;
    }
    if (!c->ncycles && c->eof && !conn_holds_requests(c)) {
        c->close_after = 1;
        return;
    }
    if (!c->ncycles)
        conn_set_deadline(c, US_DL_KEEPALIVE);
    if (c->parse_paused && conn_may_parse(c))
        conn_parse_pending(c);
}

void us_httpconn_body_consumed(us_httpconn *c, Py_ssize_t n)
{
    c->body_buffered -= n;
    if (c->read_paused && c->body_buffered <= US_HTTP_READ_HIGH / 2) {
        c->read_paused = 0;
        if (conn_arm_recv(c) < 0)
            PyErr_WriteUnraisable((PyObject *)c);
    }
}

/* Answers a request that could not be parsed, after the responses before
 * it, and closes. */
static void conn_parse_error(us_httpconn *c)
{
    int status = c->parser.error_status ? c->parser.error_status : 400;
    const char *reason = c->parser.error_reason ? c->parser.error_reason : "Invalid HTTP request received.";
    if (status < 500)
        us_http_log_warning(c->srv, "Invalid HTTP request received."); /* as uvicorn's */
    c->no_more = 1;
    us_httpcycle *cy = c->parsing;
    c->parsing = NULL;
    if (cy) {
        /* the head was fine, the body was not: this request gets the error,
         * its app sees a disconnect and what it sends is dropped */
        us_httpcycle_disconnect(cy);
        if (!cy->response_started) {
            cy->rejected = 1;
            if (us_httpcycle_error_response(cy, status, reason) < 0)
                PyErr_WriteUnraisable((PyObject *)c);
        }
        c->close_after = 1;
        conn_schedule_flush(c);
        return;
    }
    if (!c->tail)
        c->tail = us_http_simple_response(c->srv, status, reason);
    if (!c->tail)
        PyErr_WriteUnraisable((PyObject *)c);
    c->close_after = 1;
    conn_schedule_flush(c);
}

/* A WebSocket upgrade: once the recv is cancelled and the responses before
 * it are sent, the socket (a dup of it) goes to the Python handler with the
 * bytes already read past the request head. */
static void conn_try_handover(us_httpconn *c)
{
    if (!c->upgrading || c->closed || ue_op_busy(&c->recv_op) || ue_op_busy(&c->send_op) || c->wq.len || c->ncycles)
        return;
    c->upgrading = 0;
    us_httpserver *srv = c->srv;
    int fd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0);
    PyObject *rest = PyBytes_FromStringAndSize(c->pending.data ? c->pending.data + c->pending_off : "",
                                               (Py_ssize_t)(c->pending.len - c->pending_off));
    PyObject *r = fd >= 0 && rest ? PyObject_CallFunction(srv->websocket, "iOO", fd, c->ws_scope, rest) : NULL;
    if (!r) {
        PyErr_WriteUnraisable(srv->websocket);
        if (fd >= 0)
            close(fd);
    }
    Py_XDECREF(r);
    Py_XDECREF(rest);
    Py_CLEAR(c->ws_scope);
    c->pending.len = c->pending_off = 0;
    Py_INCREF(c);
    c->dead = 1; /* the socket lives on in the handler's dup: no shutdown, no linger */
    conn_close(c);
    Py_DECREF(c);
}

static void conn_start_upgrade(us_httpconn *c, const char *rest, size_t n)
{
    uh_buf kept = {0};
    if (n && uh_buf_append(&kept, rest, n) < 0) {
        c->dead = 1;
        return;
    }
    uh_buf_free(&c->pending); /* `rest` may point into it */
    c->pending = kept;
    c->pending_off = 0;
    c->parse_paused = 0;
    c->upgrading = 1;
    c->no_more = 1;
    if (ue_op_busy(&c->recv_op))
        ue_op_cancel(&c->srv->loop->ue, &c->recv_op);
    else
        conn_try_handover(c);
}

/* Feeds input to the parser; what a pause leaves unparsed is kept. */
static void conn_feed(us_httpconn *c, const char *data, size_t len, int from_pending)
{
    size_t used = 0;
    enum uh_feed_result r = uh_parser_feed(&c->parser, data, len, &used);
    if (r == UH_FEED_UPGRADE) {
        conn_start_upgrade(c, data + used, len - used);
        return;
    }
    if (r == UH_FEED_ERROR) {
        conn_parse_error(c);
    } else if (r == UH_FEED_PAUSED && !c->no_more) {
        c->parse_paused = 1;
        if (from_pending) {
            c->pending_off += used;
        } else if (uh_buf_append(&c->pending, data + used, len - used) < 0) {
            c->no_more = 1;
            c->close_after = 1;
        }
    } else if (from_pending) {
        c->pending_off += used;
    }
    /* a request head has begun: the keep-alive wait is over, and the head
     * has header_timeout from here (the drain's grace stands) */
    if (!c->ncycles && uh_parser_in_head(&c->parser) && (c->dl_kind == US_DL_NONE || c->dl_kind == US_DL_KEEPALIVE))
        conn_set_deadline(c, US_DL_HEADER);
    for (int i = 0; i < c->ncycles; i++)
        us_httpcycle_wake(c->cycles[i]);
    if (c->body_buffered > US_HTTP_READ_HIGH && !c->read_paused) {
        c->read_paused = 1;
        if (ue_op_busy(&c->recv_op))
            ue_op_cancel(&c->srv->loop->ue, &c->recv_op);
    }
    if (c->pending.len > (size_t)c->srv->limits.max_head_size + US_HTTP_READ_HIGH && !c->read_paused) {
        c->read_paused = 1; /* pipelined far ahead: wait for the app */
        if (ue_op_busy(&c->recv_op))
            ue_op_cancel(&c->srv->loop->ue, &c->recv_op);
    }
}

/* The input held back when the client's FIN came is all parsed: a request
 * it cut short gets no answer, and the connection closes once the responses
 * owed are out. */
static void conn_held_input_parsed(us_httpconn *c)
{
    if (c->parsing) {
        us_httpcycle_disconnect(c->parsing);
        c->parsing = NULL;
    }
    c->no_more = 1;
    if (!c->ncycles) {
        c->close_after = 1;
        conn_schedule_flush(c);
    }
}

static void conn_parse_pending(us_httpconn *c)
{
    c->parse_paused = 0;
    uh_parser_resume(&c->parser);
    size_t start = c->pending_off;
    if (start < c->pending.len)
        conn_feed(c, c->pending.data + start, c->pending.len - start, 1);
    if (!c->parse_paused) {
        c->pending.len = 0;
        c->pending_off = 0;
        if (c->pending.cap > 65536)
            uh_buf_free(&c->pending);
        if (c->read_paused && c->body_buffered <= US_HTTP_READ_HIGH / 2) {
            c->read_paused = 0;
            if (conn_arm_recv(c) < 0)
                PyErr_WriteUnraisable((PyObject *)c);
        }
        if (c->eof && !c->no_more)
            conn_held_input_parsed(c);
    }
}

static void conn_input(us_httpconn *c, const char *data, size_t len)
{
    if (c->upgrading) {
        if (uh_buf_append(&c->pending, data, len) < 0) {
            c->upgrading = 0;
            c->dead = 1;
        }
        return;
    }
    if (c->no_more || c->lingering || c->closed)
        return; /* nothing more is read from this client */
    if (c->parse_paused) {
        if (uh_buf_append(&c->pending, data, len) < 0)
            c->close_after = 1;
        return;
    }
    conn_feed(c, data, len, 0);
}

/* The client closed its side (`fin`: a FIN, from a client that is gone or
 * one that half-closed and still reads, as `printf ... | nc -N` does) or
 * the connection failed. After a FIN every request that arrived whole is
 * still answered, unless its app asks receive() and so learns of it (see
 * us_httpcycle_input_ended): the ones begun, the ones read but held back
 * (pipelined past the depth, or held while responses wait), which are
 * parsed in turn and end with conn_held_input_parsed, and the responses
 * already queued still go out. A request cut short, or any after a failure,
 * is disconnected. */
static void conn_input_ended(us_httpconn *c, int fin)
{
    c->eof = 1;
    for (int i = 0; i < c->ncycles; i++) {
        if (fin && c->cycles[i]->body_complete)
            us_httpcycle_input_ended(c->cycles[i]);
        else
            us_httpcycle_disconnect(c->cycles[i]);
    }
    int owed = fin && conn_output_queued(c);
    int held = fin && conn_holds_requests(c);
    if (c->lingering || c->dead || (!c->ncycles && !owed && !held)) {
        conn_close(c);
    } else if (!held) {
        c->no_more = 1; /* finish the responses already begun */
        if (!c->ncycles)
            c->close_after = 1; /* then close, once they are out (conn_after_send) */
    }
}

static void conn_recv_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    us_httpconn *c = US_CONTAINER(op, us_httpconn, recv_op);
    us_loop *loop = c->srv->loop;
    if (res > 0 && (flags & IORING_CQE_F_BUFFER)) {
        uint16_t bid = ue_cqe_bid(flags);
        conn_input(c, ue_bufring_buf(&loop->recv_pool, bid), (size_t)res);
        ue_bufring_recycle(&loop->recv_pool, bid);
    } else if (res == -ENOBUFS) {
        ue_bufring_starved(&loop->recv_pool); /* and the recv is armed again below */
    } else if (res == 0 || (res < 0 && res != -ECANCELED)) {
        if (flags & IORING_CQE_F_BUFFER) /* not for a socket at EOF today, but ours if so */
            ue_bufring_recycle(&loop->recv_pool, ue_cqe_bid(flags));
        if (!c->eof)
            conn_input_ended(c, res == 0);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)c);
    if (!(flags & IORING_CQE_F_MORE)) {
        loop->sockops_inflight--;
        if (!c->closed && conn_arm_recv(c) < 0)
            PyErr_WriteUnraisable((PyObject *)c);
        conn_try_handover(c);
        if (c->close_after)
            conn_schedule_flush(c);
        conn_maybe_free(c);
        Py_DECREF(c);
        return;
    }
    if (c->close_after)
        conn_schedule_flush(c);
}

/* ---- writing ---- */

static int conn_send_file(us_httpconn *c, us_seg *s)
{
    us_loop *loop = c->srv->loop;
    off_t off = (off_t)(s->off + c->wq_off);
    size_t want = (size_t)(s->len - c->wq_off);
    ssize_t n = sendfile(c->fd, s->fd, &off, want > (1 << 20) ? (1 << 20) : want);
    if (n < 0 && errno != EAGAIN && errno != EINTR)
        return -errno;
    if (n > 0)
        c->wq_off += n;
    if (n == 0 && want)
        return -EIO; /* the file shrank under us */
    /* wait for room (or for the next round) with a poll on the send op */
    struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_add(sqe, c->fd, POLLOUT);
    c->sent_iov = -1; /* a file round: the CQE result is not a byte count */
    ue_op_arm(&loop->ue, &c->send_op, sqe, conn_send_cb);
    loop->sockops_inflight++;
    Py_INCREF(c);
    return 0;
}

/* Whether the flush's send over `n` queued segments may be quiet
 * (ue_op_arm_quiet): one that takes the whole queue and whose completion
 * nobody waits for, since a quiet success is learnt only after the enter
 * that submits it, however long that enter sleeps (on a keep-alive
 * connection, until the next request). Waiting on a send are a send() held
 * at the high-water mark (the head cycle's drain_waiter), a connection that
 * closes once its responses are out (close_after, no_more, an error
 * response in `tail`, a client's FIN, after which the close may come from
 * input held back (eof); no_more also covers a lingering close) and a
 * WebSocket handover (upgrading). A response's end does not
 * wait: the cycle is done when its last bytes are queued. */
static int conn_send_may_be_quiet(us_httpconn *c, int n)
{
    return n == c->wq.len && c->wq.bytes <= US_HTTP_WRITE_HIGH && !(c->ncycles && c->cycles[0]->drain_waiter) &&
           !c->tail && !c->close_after && !c->no_more && !c->eof && !c->upgrading &&
           ue_quiet_reserve(&c->srv->loop->ue);
}

/* Arms one send over the queue's bytes up to its first file (or a sendfile
 * round for a file at the head); quiet when `from_flush` and nothing waits
 * on it (see conn_send_may_be_quiet). */
static int conn_submit_send(us_httpconn *c, int from_flush)
{
    us_loop *loop = c->srv->loop;
    us_seg *first = us_segq_at(&c->wq, 0);
    if (first->fd >= 0)
        return conn_send_file(c, first);
    int room = c->wq.len;
    ue_send_one one;
    struct msghdr *msg = ue_send_msg(&loop->ue, &room, &one);
    int n = 0;
    size_t total = 0;
    for (; n < room; n++) {
        us_seg *s = us_segq_at(&c->wq, n);
        if (!s->obj)
            break; /* a file: sent on its own */
        const char *p = PyBytes_AS_STRING(s->obj);
        Py_ssize_t len = PyBytes_GET_SIZE(s->obj);
        if (n == 0) {
            p += c->wq_off;
            len -= (Py_ssize_t)c->wq_off;
        }
        msg->msg_iov[n].iov_base = (void *)p;
        msg->msg_iov[n].iov_len = (size_t)len;
        total += (size_t)len;
    }
    msg->msg_iovlen = (size_t)n;
    struct io_uring_sqe *sqe = ue_sqe(&loop->ue);
    if (!sqe)
        return -EBUSY;
    int quiet = from_flush && conn_send_may_be_quiet(c, n);
    ue_prep_send_msg(sqe, c->fd, msg, MSG_NOSIGNAL | (quiet ? UE_QUIET_SEND_FLAGS : 0));
    c->sent_iov = n;
    if (quiet)
        ue_op_arm_quiet(&loop->ue, &c->send_op, sqe, conn_send_cb, (int32_t)total);
    else
        ue_op_arm(&loop->ue, &c->send_op, sqe, conn_send_cb);
    loop->sockops_inflight++;
    Py_INCREF(c);
    return 0;
}

/* Nothing left to send: close if asked to, and wake a send() waiting to
 * drain. */
static void conn_after_send(us_httpconn *c)
{
    if (c->wq.bytes <= US_HTTP_WRITE_LOW && c->ncycles)
        us_httpcycle_wake(c->cycles[0]);
    if (c->wq.len || ue_op_busy(&c->send_op))
        return;
    if (c->tail && !c->ncycles) {
        us_seg seg = {c->tail, -1, 0, 0};
        c->tail = NULL;
        if (us_segq_push(&c->wq, seg) < 0)
            PyErr_WriteUnraisable((PyObject *)c);
        else if (conn_submit_send(c, 0) < 0)
            c->dead = 1;
        return;
    }
    if (c->close_after && !c->ncycles && !c->lingering)
        conn_close(c);
}

void us_httpconn_flush(PyObject *o)
{
    us_httpconn *c = (us_httpconn *)o;
    c->queued_flush = 0;
    if (c->closed)
        return;
    if (c->dead) {
        us_segq_clear(&c->wq);
        conn_close(c);
        return;
    }
    if (ue_op_busy(&c->send_op))
        return;
    if (c->wq.len) {
        int rc = conn_submit_send(c, 1);
        if (rc < 0) {
            c->dead = 1;
            conn_close(c);
        }
        return;
    }
    conn_after_send(c);
}

static void conn_send_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    (void)flags;
    us_httpconn *c = US_CONTAINER(op, us_httpconn, send_op);
    c->srv->loop->sockops_inflight--;
    if (res == -EAGAIN)
        res = 0; /* a quiet send the kernel had no room for: armed again below, to wait */
    if (c->sent_iov < 0) {
        /* a sendfile round: POLLOUT or an error */
        us_seg *s = c->wq.len ? us_segq_at(&c->wq, 0) : NULL;
        if (res < 0 && res != -ECANCELED)
            c->dead = 1;
        else if (s && s->fd >= 0 && c->wq_off >= s->len) {
            us_segq_pop(&c->wq);
            c->wq_off = 0;
        }
    } else if (res < 0) {
        if (res != -ECANCELED)
            c->dead = 1;
    } else {
        int64_t left = res;
        while (left > 0 && c->wq.len) {
            us_seg *s = us_segq_at(&c->wq, 0);
            int64_t avail = PyBytes_GET_SIZE(s->obj) - c->wq_off;
            if (left < avail) {
                c->wq_off += left;
                break;
            }
            left -= avail;
            c->wq_off = 0;
            us_segq_pop(&c->wq);
        }
    }
    if (c->dead) {
        us_segq_clear(&c->wq);
        for (int i = 0; i < c->ncycles; i++)
            us_httpcycle_disconnect(c->cycles[i]);
        conn_close(c);
    } else if (!c->closed && c->wq.len) {
        if (conn_submit_send(c, 0) < 0) {
            c->dead = 1;
            conn_close(c);
        }
    } else if (!c->closed) {
        conn_after_send(c);
    }
    if (!c->closed && !c->dead && c->parse_paused && conn_may_parse(c))
        conn_parse_pending(c); /* the queue drained below its mark */
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)c);
    conn_try_handover(c);
    conn_maybe_free(c);
    Py_DECREF(c);
}

/* ---- closing ---- */

/* Ends the connection: stops reading, lets the cycles know, and once both
 * ops are final closes the socket and leaves the server's list. A
 * connection that ends after a response shuts down its sending side first
 * and reads until the client closes (or a short deadline), so that unread
 * input never turns the close into a reset that would destroy the response. */
static void conn_close(us_httpconn *c)
{
    if (c->closed)
        return;
    us_loop *loop = c->srv->loop;
    if (!c->lingering && !c->dead && !c->no_linger && !c->eof && !ue_op_busy(&c->send_op) && !c->wq.len) {
        c->lingering = 1;
        c->no_more = 1;
        shutdown(c->fd, SHUT_WR);
        conn_set_deadline(c, US_DL_LINGER);
        if (c->read_paused) {
            c->read_paused = 0;
            if (conn_arm_recv(c) < 0)
                PyErr_WriteUnraisable((PyObject *)c);
        }
        if (ue_op_busy(&c->recv_op))
            return;
    }
    c->closed = 1;
    conn_clear_deadline(c);
    for (int i = 0; i < c->ncycles; i++) {
        us_httpcycle_disconnect(c->cycles[i]);
        conn_release_cycle(c->cycles[i]);
    }
    c->ncycles = 0;
    c->parsing = NULL;
    us_segq_clear(&c->wq);
    Py_CLEAR(c->tail);
    if (loop->ue_ready) {
        ue_op_cancel(&loop->ue, &c->recv_op);
        ue_op_cancel(&loop->ue, &c->send_op);
    }
    conn_maybe_free(c);
}

/* Closes the socket and leaves the list once nothing is in flight. */
static void conn_maybe_free(us_httpconn *c)
{
    if (!c->closed || ue_op_busy(&c->recv_op) || ue_op_busy(&c->send_op) || !c->in_list)
        return;
    us_httpserver *srv = c->srv;
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->in_list = 0;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    srv->nconns--;
    Py_DECREF(c); /* the list's reference */
}

static int conn_traverse(us_httpconn *c, visitproc visit, void *arg)
{
    for (int i = 0; i < c->ncycles; i++)
        Py_VISIT(c->cycles[i]);
    Py_VISIT(c->tail);
    Py_VISIT(Py_TYPE(c));
    return 0;
}

static int conn_clear(us_httpconn *c)
{
    for (int i = 0; i < c->ncycles; i++)
        conn_release_cycle(c->cycles[i]);
    c->ncycles = 0;
    Py_CLEAR(c->tail);
    return 0;
}

static void conn_dealloc(us_httpconn *c)
{
    PyTypeObject *tp = Py_TYPE(c);
    PyObject_GC_UnTrack(c);
    conn_clear(c);
    if (c->cycles != c->cycles_inline)
        PyMem_Free(c->cycles);
    us_segq_clear(&c->wq);
    uh_parser_free(&c->parser);
    uh_buf_free(&c->pending);
    Py_CLEAR(c->client);
    Py_CLEAR(c->sockname);
    Py_CLEAR(c->ws_scope);
    if (c->fd >= 0)
        close(c->fd);
    if (c->srv)
        conn_clear_deadline(c); /* cleared at the close already; never left dangling */
    if (c->srv && c->flush_reserved)
        us_loop_flush_unreserve(c->srv->loop);
    Py_CLEAR(c->srv);
    tp->tp_free(c);
    Py_DECREF(tp);
}

static PyType_Slot conn_slots[] = {
    {Py_tp_dealloc, conn_dealloc},
    {Py_tp_traverse, conn_traverse},
    {Py_tp_clear, conn_clear},
    {Py_tp_doc, "One HTTP/1.1 connection of an HttpServer (internal)."},
    {0, NULL},
};

PyType_Spec us_httpconn_spec = {
    .name = "uringloop._core.HttpConnection",
    .basicsize = sizeof(us_httpconn),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = conn_slots,
};

/* A connection on fd (ours from now on). client and sockname, when not
 * NULL, are the scope's address tuples, for a connection whose socket does
 * not know them (adopt()). */
static void server_new_conn(us_httpserver *srv, int fd, PyObject *client, PyObject *sockname)
{
    int reserved = us_loop_flush_reserve(srv->loop) == 0;
    us_httpconn *c = reserved ? PyObject_GC_New(us_httpconn, srv->st->HttpConnType) : NULL;
    if (!c) {
        if (reserved)
            us_loop_flush_unreserve(srv->loop);
        close(fd);
        PyErr_WriteUnraisable((PyObject *)srv);
        return;
    }
    memset((char *)c + sizeof(PyObject), 0, sizeof *c - sizeof(PyObject));
    c->flush_reserved = 1;
    c->dl_kind = US_DL_NONE;
    c->cycles = c->cycles_inline;
    c->srv = (us_httpserver *)Py_NewRef(srv);
    c->fd = fd;
    c->client = Py_XNewRef(client);
    c->sockname = Py_XNewRef(sockname);
    uh_parser_init(&c->parser, &srv->limits, &conn_callbacks, c);
    PyObject_GC_Track(c);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on Unix sockets */
    c->in_list = 1;                                             /* the list owns the new reference */
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->nconns++;
    conn_set_deadline(c, US_DL_HEADER);
    if (conn_arm_recv(c) < 0) {
        PyErr_WriteUnraisable((PyObject *)c);
        c->dead = 1;
        conn_close(c);
    } else if (srv->draining) {
        conn_drain(c); /* accepted before the cancel took effect */
    }
}

/* ---- listeners ---- */

static void listener_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags);

static int listener_arm(us_listener *l)
{
    if (l->srv->loop->closing)
        return 0; /* see stream_arm_recv */
    struct io_uring_sqe *sqe = ue_sqe(&l->srv->loop->ue);
    if (!sqe) {
        PyErr_SetString(PyExc_RuntimeError, "uringserve: the io_uring submission queue is full");
        return -1;
    }
    ue_prep_listen(sqe, l->fd, l->shared);
    ue_op_arm(&l->srv->loop->ue, &l->op, sqe, listener_cb);
    Py_INCREF(l->srv);
    return 0;
}

/* Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
 * backlog cannot be taken, and an accept armed again at once would fail
 * again at once, spinning a core. As asyncio does, the error is logged and
 * accepting waits for the next tick (a second), by when connections may
 * have closed; logged once until an accept succeeds again. */
static int listener_resource_error(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

static void listener_starve(us_listener *l, int err)
{
    l->starved = 1;
    if (l->starve_logged)
        return;
    l->starve_logged = 1;
    char message[160];
    snprintf(message, sizeof message,
             "socket.accept() out of system resource: [Errno %d] %s; accepting again in a second", err, strerror(err));
    us_http_log_error(l->srv, message, NULL);
}

#define US_HTTP_ACCEPT_MAX 4096 /* a bound: the backlog is smaller */
#define US_HTTP_ACCEPT_BATCH 16 /* per wake-up of a shared listener */

/* Accepts until the backlog is empty; returns 1 if it stopped at `max`
 * with connections possibly left. */
static int listener_accept_all(us_listener *l, int max)
{
    us_httpserver *srv = l->srv;
    for (int i = 0; i < max; i++) {
        int fd = ue_accept(l->fd);
        if (fd < 0) {
            if (listener_resource_error(-fd))
                listener_starve(l, -fd);
            return 0; /* EAGAIN: empty (or a sibling was faster) */
        }
        l->starve_logged = 0;
        if (srv->cancelled)
            close(fd);
        else
            server_new_conn(srv, fd, NULL, NULL);
    }
    return 1;
}

/* The accept of a stopped listener has ended. Accepts waiting on a
 * listening socket are exclusive waiters: a new connection wakes only one,
 * and when that one was ours and our cancel won the race, the connection
 * stays in the backlog while every other process sharing the socket (the
 * --workers or gunicorn siblings) sleeps on until some later connection
 * arrives: with closed-loop clients, never. Now that our waiter is off the
 * queue, the backlog is taken here and served like a late accept; what
 * arrives after this wakes the siblings. Then our descriptor is closed.
 * (A server that knows the socket is shared polls it instead, see
 * listener_ready(); this is for one whose siblings it was not told of.) */
static void listener_take_backlog(us_listener *l)
{
    if (l->fd < 0)
        return;
    if (!l->shared) /* a shared listener polls: the siblings were woken too */
        listener_accept_all(l, US_HTTP_ACCEPT_MAX);
    close(l->fd);
    l->fd = -1;
}

/* A shared listener is readable: accept what is there. Every process on
 * the socket was woken (a poll is not an exclusive waiter); the least busy
 * one gets there first and the others find the backlog empty, which is how
 * epoll-based workers share a socket. A burst is taken a batch per loop
 * iteration, so that one worker does not take it all while the others are
 * still waking up: past the batch, the poll is ended and re-armed, and a
 * new poll sees what is left at once. */
static void listener_ready(us_listener *l)
{
    if (!l->active || l->srv->draining || l->fd < 0)
        return;
    if (listener_accept_all(l, US_HTTP_ACCEPT_BATCH) && ue_op_busy(&l->op))
        ue_op_cancel(&l->srv->loop->ue, &l->op);
}

static void listener_cb(ue_loop *ue, ue_op *op, int32_t res, uint32_t flags)
{
    (void)ue;
    us_listener *l = US_CONTAINER(op, us_listener, op);
    us_httpserver *srv = l->srv;
    if (l->shared) {
        if (res > 0)
            listener_ready(l);
    } else if (res >= 0) {
        l->starve_logged = 0;
        /* A connection the kernel accepted before the cancel took effect is
         * served like any other (during a drain: its first request, with
         * Connection: close); closing it would fail a client that did
         * nothing wrong. Only after cancel_all() is it too late. */
        if (!srv->cancelled)
            server_new_conn(srv, res, NULL, NULL);
        else
            close(res);
    } else if (res != -ECANCELED && l->active && listener_resource_error(-res)) {
        listener_starve(l, -res); /* the multishot has ended: armed again by the tick */
    }
    if (!(flags & IORING_CQE_F_MORE) && l->active && !srv->draining && !l->starved && listener_arm(l) < 0)
        PyErr_WriteUnraisable((PyObject *)srv);
    if (!(flags & IORING_CQE_F_MORE) && !l->active)
        listener_take_backlog(l);
    if (!(flags & IORING_CQE_F_MORE))
        Py_DECREF(srv);
}

/* ---- the server object ---- */

static PyObject *server_listen(us_httpserver *srv, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"sock", "shared", NULL};
    PyObject *sock;
    int shared = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:listen", kwlist, &sock, &shared))
        return NULL;
    PyObject *fdobj = PyObject_CallMethod(sock, "fileno", NULL);
    if (!fdobj)
        return NULL;
    int fd = (int)PyLong_AsLong(fdobj);
    Py_DECREF(fdobj);
    if (fd < 0 && PyErr_Occurred())
        return NULL;
    if (us_loop_check_open(srv->loop) < 0)
        return NULL;
    us_listener **ls = PyMem_Realloc(srv->listeners, (size_t)(srv->nlisteners + 1) * sizeof *ls);
    if (!ls)
        return PyErr_NoMemory();
    srv->listeners = ls;
    us_listener *l = PyMem_Calloc(1, sizeof *l);
    if (!l)
        return PyErr_NoMemory();
    l->srv = srv;
    l->sock = Py_NewRef(sock);
    /* Our own descriptor, closed once the accept has ended (see
     * listener_take_backlog), so that the caller may close the socket right
     * after stop_accepting(). Non-blocking, as asyncio makes a listener. */
    l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (l->fd < 0 || fcntl(l->fd, F_SETFL, fcntl(l->fd, F_GETFL) | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        if (l->fd >= 0)
            close(l->fd);
        Py_DECREF(l->sock);
        PyMem_Free(l);
        return NULL;
    }
    if (!srv->context && !(srv->context = PyContext_CopyCurrent())) {
        close(l->fd);
        Py_DECREF(l->sock);
        PyMem_Free(l);
        return NULL;
    }
    l->active = 1;
    l->shared = (char)shared;
    srv->listeners[srv->nlisteners++] = l;
    if (!srv->loop->ue_ready) {
        PyErr_SetString(PyExc_RuntimeError, "uringserve: listen() needs a running uringloop");
        return NULL;
    }
    if (listener_arm(l) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *server_adopt(us_httpserver *srv, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "client", "server", NULL};
    int fd;
    PyObject *client = Py_None, *sockname = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|OO:adopt", kwlist, &fd, &client, &sockname))
        return NULL;
    if (!srv->loop->ue_ready) {
        PyErr_SetString(PyExc_RuntimeError, "uringserve: adopt() needs a running uringloop");
        close(fd); /* the caller gave it up (socket.detach()): ours to close */
        return NULL;
    }
    /* Non-blocking, as accept4() makes ours: sendfile() (pathsend) is a
     * direct call that must not wait for the socket, on a loop that may be
     * the one to drain it (a TLS bridge's socketpair). */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(fd);
        return NULL;
    }
    /* a server that only adopts: its tasks start from the context the
     * first adopt() ran in, as a listening one's from its first listen() */
    if (!srv->context && !(srv->context = PyContext_CopyCurrent())) {
        close(fd);
        return NULL;
    }
    if (srv->cancelled)
        close(fd);
    else
        server_new_conn(srv, fd, client, sockname);
    Py_RETURN_NONE;
}

static PyObject *server_stop_accepting(us_httpserver *srv, PyObject *unused)
{
    (void)unused;
    for (int i = 0; i < srv->nlisteners; i++) {
        us_listener *l = srv->listeners[i];
        l->active = 0;
        if (!ue_op_busy(&l->op))
            listener_take_backlog(l); /* no accept to end: take it now */
        else if (srv->loop->ue_ready)
            ue_op_cancel(&srv->loop->ue, &l->op);
    }
    Py_RETURN_NONE;
}

/* An idle connection where nothing of a next request has come, neither
 * parsed nor waiting in the socket: closing it sends a FIN, not a reset, and
 * there is no response a reset could destroy, so a drain closes it at once
 * instead of lingering. A pooled client closes its end only when it next
 * uses the connection, so lingering for its FIN held up the exit by
 * US_HTTP_LINGER_SECONDS (uvicorn closes idle connections at once). */
static int conn_nothing_unread(us_httpconn *c)
{
    int unread = 0;
    if (uh_parser_in_head(&c->parser) || c->pending.len > c->pending_off)
        return 0;
    return ioctl(c->fd, FIONREAD, &unread) == 0 && unread == 0;
}

/* Graceful shutdown: busy connections close after their current response
 * (sent with Connection: close); idle keep-alive connections close now
 * (a client retries a request that fails on a reused connection before
 * any byte of the response). A connection that has not brought its first
 * request yet is different: its client has no reason to retry, and the
 * request is usually already on its way. It keeps reading for up to
 * US_HTTP_DRAIN_GRACE seconds and its request is served with Connection:
 * close; its deadline closes it if nothing came. */
static void conn_drain(us_httpconn *c)
{
    if (c->closed)
        return;
    if (!c->used && !c->ncycles) {
        if (!c->deadline || c->deadline > ue_now() + US_HTTP_DRAIN_GRACE)
            conn_set_deadline(c, US_DL_GRACE);
        return;
    }
    c->no_more = 1;
    if (!c->ncycles && conn_output_queued(c)) {
        /* responses still going to a slow reader: close once they are out
         * (conn_after_send), as asyncio's close() flushes first */
        c->close_after = 1;
        return;
    }
    if (!c->ncycles) {
        c->no_linger = conn_nothing_unread(c);
        Py_INCREF(c);
        conn_close(c);
        Py_DECREF(c);
    }
}

static PyObject *server_drain(us_httpserver *srv, PyObject *unused)
{
    (void)unused;
    srv->draining = 1;
    us_httpconn *c = srv->conns;
    while (c) {
        us_httpconn *next = c->next;
        conn_drain(c);
        c = next;
    }
    Py_RETURN_NONE;
}

/* A cancelled app on this connection can still be answered 500: nothing
 * of its response has been written. */
static int conn_owes_500(const us_httpconn *c)
{
    for (int i = 0; i < c->ncycles; i++) {
        const us_httpcycle *cy = c->cycles[i];
        if (cy->task && !cy->head_written && !cy->response_complete && !cy->disconnected)
            return 1;
    }
    return 0;
}

/* End of the grace period: cancel the apps still running (with `msg`, as
 * uvicorn's) and close every connection, except those where a cancelled app
 * has not started its response: they stop reading, get the 500 the
 * cancellation brings (cycle_finished) and close after it. */
static PyObject *server_cancel_all_with(us_httpserver *srv, PyObject *msg)
{
    srv->draining = 1;
    srv->cancelled = 1;
    int cancelled = 0;
    for (us_httpconn *c = srv->conns; c; c = c->next) {
        for (int i = 0; i < c->ncycles; i++) {
            PyObject *t = c->cycles[i]->task;
            if (t) {
                PyObject *r = PyObject_CallMethod(t, "cancel", "O", msg); /* cancel(None) is cancel() */
                if (!r)
                    return NULL;
                Py_DECREF(r);
                cancelled++;
            }
        }
    }
    us_httpconn *c = srv->conns;
    while (c) {
        us_httpconn *next = c->next;
        if (!c->closed && conn_owes_500(c)) {
            c->no_more = 1;
        } else {
            Py_INCREF(c);
            c->dead = 1;
            conn_close(c);
            Py_DECREF(c);
        }
        c = next;
    }
    return PyLong_FromLong(cancelled);
}

static PyObject *server_cancel_all(us_httpserver *srv, PyObject *args)
{
    PyObject *msg = Py_None;
    if (!PyArg_ParseTuple(args, "|O:cancel_all", &msg))
        return NULL;
    return server_cancel_all_with(srv, msg);
}

/* A listener that ran out of descriptors tries again. */
static void listener_retry(us_listener *l)
{
    l->starved = 0;
    if (!l->active || l->srv->draining || l->fd < 0)
        return;
    if (l->shared)
        listener_ready(l); /* its poll stays armed; the backlog waits for us */
    else if (!ue_op_busy(&l->op) && listener_arm(l) < 0)
        PyErr_WriteUnraisable((PyObject *)l->srv);
}

/* Once a second: listeners out of descriptors try again. */
static PyObject *server_tick(us_httpserver *srv, PyObject *unused)
{
    (void)unused;
    for (int i = 0; i < srv->nlisteners; i++)
        if (srv->listeners[i]->starved)
            listener_retry(srv->listeners[i]);
    Py_RETURN_NONE;
}

static PyObject *server_close(us_httpserver *srv, PyObject *unused)
{
    PyObject *r = server_stop_accepting(srv, unused);
    Py_XDECREF(r);
    return r ? server_cancel_all_with(srv, Py_None) : NULL;
}

static PyObject *server_get_stats(us_httpserver *srv, void *closure)
{
    (void)closure;
    Py_ssize_t busy = 0;
    for (us_httpconn *c = srv->conns; c; c = c->next)
        busy += c->ncycles ? 1 : 0;
    return Py_BuildValue("{s:n,s:n,s:n,s:K}", "connections", srv->nconns, "busy_connections", busy, "tasks",
                         srv->ntasks, "requests", srv->requests);
}

static int set_limit(PyObject *kw, const char *name, uint32_t *out)
{
    PyObject *v = kw ? PyDict_GetItemString(kw, name) : NULL;
    if (!v || v == Py_None)
        return 0;
    long n = PyLong_AsLong(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n <= 0 || n > (1L << 30)) {
        PyErr_Format(PyExc_ValueError, "%s must be a positive integer", name);
        return -1;
    }
    *out = (uint32_t)n;
    return 0;
}

/* The headers every response carries (`headers=`, uvicorn's --header):
 * a `server` header replaces the default one, the rest are added. */
static int server_set_headers(us_httpserver *srv, PyObject *headers)
{
    srv->extra_headers.len = 0;
    srv->server_line.len = 0;
    if (!headers)
        return 0;
    PyObject *seq = PySequence_Fast(headers, "headers must be a sequence of (name, value) pairs");
    if (!seq)
        return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        const char *name, *value;
        Py_ssize_t nlen, vlen;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#y#", &name, &nlen, &value, &vlen)) {
            Py_DECREF(seq);
            return -1;
        }
        uh_buf *dst = nlen == 6 && strncasecmp(name, "server", 6) == 0 ? &srv->server_line : &srv->extra_headers;
        if (uh_put_header(dst, name, (size_t)nlen, value, (size_t)vlen) < 0) {
            PyErr_Format(PyExc_ValueError, "invalid header %R", PySequence_Fast_GET_ITEM(seq, i));
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static int server_init(us_httpserver *srv, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {
        "loop",    "app",         "log_error",         "log_warning",    "access_log",        "proxy",  "root_path",
        "headers", "date_header", "keepalive_timeout", "header_timeout", "limit_concurrency", "limits", "websocket",
        "scheme",  NULL};
    PyObject *loop, *app, *log_error, *log_warning = Py_None, *access_log = Py_None, *proxy = Py_None,
                                      *root_path = NULL, *headers = NULL;
    PyObject *limits = NULL, *websocket = Py_None, *scheme = NULL;
    int date_header = 1;
    double keepalive = 5.0, header_timeout = 30.0;
    Py_ssize_t limit_concurrency = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$OOOUOpddnO!OU:HttpServer", kwlist, &loop, &app, &log_error,
                                     &log_warning, &access_log, &proxy, &root_path, &headers, &date_header, &keepalive,
                                     &header_timeout, &limit_concurrency, &PyDict_Type, &limits, &websocket, &scheme))
        return -1;
    if (!PyObject_TypeCheck(loop, srv->st->LoopCoreType)) {
        PyErr_SetString(PyExc_TypeError, "HttpServer needs a uringloop loop");
        return -1;
    }
    Py_XSETREF(srv->loop, (us_loop *)Py_NewRef(loop));
    Py_XSETREF(srv->app, Py_NewRef(app));
    Py_XSETREF(srv->log_error, Py_NewRef(log_error));
    Py_XSETREF(srv->log_warning, log_warning == Py_None ? NULL : Py_NewRef(log_warning));
    Py_XSETREF(srv->access_log, access_log == Py_None ? NULL : Py_NewRef(access_log));
    Py_XSETREF(srv->proxy, proxy == Py_None ? NULL : Py_NewRef(proxy));
    Py_XSETREF(srv->websocket, websocket == Py_None ? NULL : Py_NewRef(websocket));
    Py_XSETREF(srv->root_path, root_path ? Py_NewRef(root_path) : PyUnicode_FromString(""));
    Py_XSETREF(srv->root_path_b, PyUnicode_AsUTF8String(srv->root_path));
    if (!srv->root_path_b)
        return -1;
    if (!srv->state && !(srv->state = PyDict_New()))
        return -1;
    Py_XSETREF(srv->scope_template, PyDict_Copy(srv->st->h_scope_template));
    if (!srv->scope_template || (scheme && PyDict_SetItem(srv->scope_template, srv->st->h_scheme, scheme) < 0))
        return -1;
    srv->date_header = date_header;
    srv->keepalive_timeout = keepalive;
    srv->header_timeout = header_timeout;
    srv->limit_concurrency = limit_concurrency;
    const uh_limits d = UH_DEFAULT_LIMITS;
    srv->limits = d;
    if (set_limit(limits, "max_request_line", &srv->limits.max_request_line) < 0 ||
        set_limit(limits, "max_headers", &srv->limits.max_headers) < 0 ||
        set_limit(limits, "max_field_size", &srv->limits.max_field_size) < 0 ||
        set_limit(limits, "max_head_size", &srv->limits.max_head_size) < 0)
        return -1;
    if (server_set_headers(srv, headers) < 0)
        return -1;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (!asyncio)
        return -1;
    Py_XSETREF(srv->task_type, PyObject_GetAttrString(asyncio, "Task"));
    Py_DECREF(asyncio);
    if (!srv->task_type)
        return -1;
    Py_XSETREF(srv->s_task_factory, PyUnicode_InternFromString("_task_factory"));
    return srv->s_task_factory ? 0 : -1;
}

static PyObject *server_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    (void)args;
    (void)kw;
    us_httpserver *srv = (us_httpserver *)tp->tp_alloc(tp, 0);
    if (!srv)
        return NULL;
    srv->st = us_state_of_type(tp);
    if (!srv->st) {
        Py_DECREF(srv);
        return NULL;
    }
    return (PyObject *)srv;
}

static int server_traverse(us_httpserver *srv, visitproc visit, void *arg)
{
    Py_VISIT(srv->loop);
    Py_VISIT(srv->app);
    Py_VISIT(srv->log_error);
    Py_VISIT(srv->log_warning);
    Py_VISIT(srv->access_log);
    Py_VISIT(srv->proxy);
    Py_VISIT(srv->websocket);
    Py_VISIT(srv->state);
    Py_VISIT(srv->context);
    Py_VISIT(srv->scope_template);
    Py_VISIT(srv->expiry);
    for (int i = 0; i < srv->nlisteners; i++)
        Py_VISIT(srv->listeners[i]->sock);
    Py_VISIT(Py_TYPE(srv));
    return 0;
}

static int server_clear(us_httpserver *srv)
{
    Py_CLEAR(srv->app);
    Py_CLEAR(srv->log_error);
    Py_CLEAR(srv->log_warning);
    Py_CLEAR(srv->access_log);
    Py_CLEAR(srv->proxy);
    Py_CLEAR(srv->websocket);
    Py_CLEAR(srv->state);
    Py_CLEAR(srv->context);
    Py_CLEAR(srv->scope_template);
    server_disarm_expiry(srv);
    return 0;
}

static void server_dealloc(us_httpserver *srv)
{
    PyTypeObject *tp = Py_TYPE(srv);
    PyObject_GC_UnTrack(srv);
    server_clear(srv);
    for (int i = 0; i < srv->nlisteners; i++) {
        Py_XDECREF(srv->listeners[i]->sock);
        if (srv->listeners[i]->fd >= 0)
            close(srv->listeners[i]->fd);
        PyMem_Free(srv->listeners[i]);
    }
    PyMem_Free(srv->listeners);
    uh_buf_free(&srv->extra_headers);
    uh_buf_free(&srv->server_line);
    uh_buf_free(&srv->scratch);
    Py_CLEAR(srv->loop);
    Py_CLEAR(srv->root_path);
    Py_CLEAR(srv->root_path_b);
    Py_CLEAR(srv->task_type);
    Py_CLEAR(srv->s_task_factory);
    tp->tp_free(srv);
    Py_DECREF(tp);
}

static PyObject *server_get_state(us_httpserver *srv, void *closure)
{
    (void)closure;
    return Py_NewRef(srv->state);
}

static int server_set_state(us_httpserver *srv, PyObject *v, void *closure)
{
    (void)closure;
    if (!v || !PyDict_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "state must be a dict");
        return -1;
    }
    Py_XSETREF(srv->state, Py_NewRef(v));
    return 0;
}

static PyObject *server_get_accepting(us_httpserver *srv, void *closure)
{
    (void)closure;
    for (int i = 0; i < srv->nlisteners; i++)
        if (srv->listeners[i]->active || ue_op_busy(&srv->listeners[i]->op))
            Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyMethodDef server_methods[] = {
    {"listen", (PyCFunction)(void (*)(void))server_listen, METH_VARARGS | METH_KEYWORDS,
     "listen(sock, shared=False): accept connections on a listening socket. Alone on it: one multishot accept. "
     "shared=True (other processes accept on it too): a multishot poll and accept4(), so that every process is "
     "woken and the least busy one takes the connection (the kernel wakes only one accept per connection)."},
    {"adopt", (PyCFunction)(void (*)(void))server_adopt, METH_VARARGS | METH_KEYWORDS,
     "adopt(fd, client=None, server=None): serve a connection accepted elsewhere (the descriptor becomes the "
     "server's), with the scope's client and server tuples given (a TLS bridge's socketpair knows neither)."},
    {"stop_accepting", (PyCFunction)server_stop_accepting, METH_NOARGS, "Cancel every accept."},
    {"drain", (PyCFunction)server_drain, METH_NOARGS,
     "Close idle connections now and the others after their current response."},
    {"cancel_all", (PyCFunction)server_cancel_all, METH_VARARGS,
     "cancel_all(msg=None): cancel the running application tasks (with msg) and close every connection, but "
     "those where a cancelled app has not started its response: they close after its 500. Returns how many tasks."},
    {"tick", (PyCFunction)server_tick, METH_NOARGS,
     "Retry accepting on listeners out of descriptors (call once a second)."},
    {"_expire", (PyCFunction)server_expire, METH_NOARGS,
     "Close the connections whose deadline has passed (the timer's)."},
    {"close", (PyCFunction)server_close, METH_NOARGS, "stop_accepting() and cancel_all()."},
    {NULL},
};

static PyGetSetDef server_getset[] = {
    {"stats", (getter)server_get_stats, NULL, "connections, busy connections, running tasks, requests served", NULL},
    {"state", (getter)server_get_state, (setter)server_set_state, "lifespan state copied into every scope", NULL},
    {"accepting", (getter)server_get_accepting, NULL, "True while an accept is armed or active", NULL},
    {NULL},
};

static PyType_Slot server_slots[] = {
    {Py_tp_new, server_new},
    {Py_tp_init, server_init},
    {Py_tp_dealloc, server_dealloc},
    {Py_tp_traverse, server_traverse},
    {Py_tp_clear, server_clear},
    {Py_tp_methods, server_methods},
    {Py_tp_getset, server_getset},
    {Py_tp_doc, "HttpServer(loop, app, log_error, *, ...): the ASGI HTTP/1.1 server core."},
    {0, NULL},
};

PyType_Spec us_httpserver_spec = {
    .name = "uringloop._core.HttpServer",
    .basicsize = sizeof(us_httpserver),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = server_slots,
};

/* ---- module state ---- */

static PyObject *http_str(const char *s)
{
    return PyUnicode_InternFromString(s);
}

int us_http_module_init(PyObject *m, us_state *st)
{
    st->HttpServerType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &us_httpserver_spec, NULL);
    if (!st->HttpServerType || PyModule_AddType(m, st->HttpServerType) < 0)
        return -1;
    st->HttpConnType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &us_httpconn_spec, NULL);
    st->HttpCycleType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &us_httpcycle_spec, NULL);
    st->DoneType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &us_done_spec, NULL);
    st->AppRunnerType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &us_runner_spec, NULL);
    if (!st->HttpConnType || !st->HttpCycleType || !st->DoneType || !st->AppRunnerType)
        return -1;
    PyObject *aexc = PyImport_ImportModule("asyncio.exceptions");
    st->CancelledError = aexc ? PyObject_GetAttrString(aexc, "CancelledError") : NULL;
    Py_XDECREF(aexc);
    if (!st->CancelledError)
        return -1;
    if (!(st->done_none = us_done_none_new(st)))
        return -1;
    st->ClientDisconnected =
        PyErr_NewExceptionWithDoc("uringloop.ClientDisconnected",
                                  "send() was called after the client closed the connection.", PyExc_OSError, NULL);
    if (!st->ClientDisconnected || PyModule_AddObjectRef(m, "ClientDisconnected", st->ClientDisconnected) < 0)
        return -1;
#define S(field, text)                                                                                                 \
    if (!(st->field = http_str(text)))                                                                                 \
        return -1;
    S(h_type, "type")
    S(h_asgi, "asgi")
    S(h_http_version, "http_version")
    S(h_method, "method")
    S(h_scheme, "scheme")
    S(h_path, "path")
    S(h_raw_path, "raw_path")
    S(h_query_string, "query_string")
    S(h_root_path, "root_path")
    S(h_headers, "headers")
    S(h_client, "client")
    S(h_server, "server")
    S(h_state, "state")
    S(h_extensions, "extensions")
    S(h_v10, "1.0")
    S(h_v11, "1.1")
    S(h_body, "body")
    S(h_more_body, "more_body")
    S(h_status, "status")
    S(h_t_request, "http.request")
    S(h_t_disconnect, "http.disconnect")
    S(h_t_start, "http.response.start")
    S(h_t_body, "http.response.body")
    S(h_t_pathsend, "http.response.pathsend")
#undef S
    if (!(st->h_empty_bytes = PyBytes_FromStringAndSize(NULL, 0)))
        return -1;
    /* The templates' keys are the interned strings above, so that a key put
     * into a copy, or looked up by an app with a literal (also interned), is
     * found by identity rather than by comparing characters. */
    PyObject *k_version = http_str("version"), *k_spec = http_str("spec_version"), *v_http = http_str("http");
    if (!k_version || !k_spec || !v_http) {
        Py_XDECREF(k_version);
        Py_XDECREF(k_spec);
        Py_XDECREF(v_http);
        return -1;
    }
    st->h_asgi_template = Py_BuildValue("{O:s,O:s}", k_version, "3.0", k_spec, "2.4");
    st->h_extensions_template = Py_BuildValue("{O:{}}", st->h_t_pathsend);
    /* every key in scope order, so that a copy never resizes */
    st->h_scope_template = Py_BuildValue(
        "{O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O,O:O}", st->h_type, v_http, st->h_asgi, Py_None,
        st->h_http_version, Py_None, st->h_method, Py_None, st->h_scheme, v_http, st->h_path, Py_None, st->h_raw_path,
        Py_None, st->h_query_string, Py_None, st->h_root_path, Py_None, st->h_headers, Py_None, st->h_client, Py_None,
        st->h_server, Py_None, st->h_state, Py_None, st->h_extensions, Py_None);
    Py_DECREF(k_version);
    Py_DECREF(k_spec);
    Py_DECREF(v_http);
    if (!st->h_asgi_template || !st->h_extensions_template || !st->h_scope_template)
        return -1;
    static const char *names[] = {"host",
                                  "user-agent",
                                  "accept",
                                  "accept-encoding",
                                  "accept-language",
                                  "connection",
                                  "content-type",
                                  "content-length",
                                  "cookie",
                                  "authorization",
                                  "cache-control",
                                  "origin",
                                  "referer",
                                  "x-forwarded-for",
                                  "x-forwarded-proto",
                                  "x-request-id",
                                  "upgrade",
                                  "transfer-encoding",
                                  "expect",
                                  "if-none-match",
                                  "if-modified-since",
                                  "pragma",
                                  "sec-fetch-mode",
                                  "x-real-ip"};
    for (int i = 0; i < US_HTTP_NNAMES; i++) {
        if (!(st->h_names[i] = PyBytes_FromString(names[i])))
            return -1;
        st->h_nnames++;
    }
    return 0;
}

void us_http_module_clear(us_state *st)
{
    Py_CLEAR(st->HttpServerType);
    Py_CLEAR(st->HttpConnType);
    Py_CLEAR(st->HttpCycleType);
    Py_CLEAR(st->done_none);
    Py_CLEAR(st->ClientDisconnected);
    Py_CLEAR(st->DoneType);
    Py_CLEAR(st->AppRunnerType);
    Py_CLEAR(st->CancelledError);
    Py_CLEAR(st->h_scope_template);
    Py_CLEAR(st->h_asgi_template);
    Py_CLEAR(st->h_extensions_template);
    Py_CLEAR(st->h_empty_bytes);
    for (int i = 0; i < st->h_nnames; i++)
        Py_CLEAR(st->h_names[i]);
    st->h_nnames = 0;
    for (int i = 0; i < US_HTTP_NMETHODS; i++)
        Py_CLEAR(st->h_methods[i]);
}
