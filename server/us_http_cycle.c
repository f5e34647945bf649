/*
 * HttpCycle: one request and its response, as the ASGI app sees them. The
 * scope is built in C from the parser's arena; receive() and send() return
 * an already-completed awaitable (Done) unless they really have to wait, in
 * which case they return a loop Future. The app runs in an asyncio Task
 * around an AppRunner, which settles the cycle the moment the app's
 * awaitable ends: failures are reported (500 before the response head
 * left, a closed connection after) without a done callback.
 */
#include "us_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* ---- Done: an awaitable that is already complete ---- */

typedef struct {
    PyObject_HEAD PyObject *value; /* NULL means None */
} us_done;

static PyObject *done_new(us_state *st, PyObject *value)
{
    if (!value)
        return Py_NewRef(st->done_none);
    us_done *d = PyObject_New(us_done, st->DoneType);
    if (!d) {
        Py_DECREF(value);
        return NULL;
    }
    d->value = value; /* steals */
    return (PyObject *)d;
}

PyObject *us_done_none_new(us_state *st)
{
    us_done *d = PyObject_New(us_done, st->DoneType);
    if (d)
        d->value = NULL;
    return (PyObject *)d;
}

static PyObject *done_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PySendResult done_send(PyObject *self, PyObject *arg, PyObject **result)
{
    (void)arg;
    us_done *d = (us_done *)self;
    *result = Py_NewRef(d->value ? d->value : Py_None);
    return PYGEN_RETURN;
}

static PyObject *done_next(PyObject *self)
{
    us_done *d = (us_done *)self;
    if (d->value) {
        PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, d->value);
        if (e) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    return NULL; /* StopIteration(None) when no exception is set */
}

static void done_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(((us_done *)self)->value);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *done_send_method(PyObject *self, PyObject *arg)
{
    (void)arg;
    return done_next(self);
}

static PyObject *done_throw(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *typ, *val = NULL, *tb = NULL;
    if (!PyArg_ParseTuple(args, "O|OO:throw", &typ, &val, &tb))
        return NULL;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else
        PyErr_SetObject(typ, val);
    return NULL;
}

static PyObject *done_close(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

static PyMethodDef done_methods[] = {
    {"send", done_send_method, METH_O, NULL},
    {"throw", done_throw, METH_VARARGS, NULL},
    {"close", done_close, METH_NOARGS, NULL},
    {NULL},
};

static PyType_Slot done_slots[] = {
    {Py_tp_dealloc, done_dealloc},
    {Py_am_await, done_await},
    {Py_am_send, done_send},
    {Py_tp_iter, done_await},
    {Py_tp_iternext, done_next},
    {Py_tp_methods, done_methods},
    {Py_tp_doc, "An awaitable that is already complete (what receive() and send() return when nothing waits)."},
    {0, NULL},
};

PyType_Spec us_done_spec = {
    .name = "uringloop._core.Done",
    .basicsize = sizeof(us_done),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = done_slots,
};

/* ---- the scope ---- */

static PyObject *addr_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
    } else {
        Py_RETURN_NONE; /* Unix sockets: no (host, port), as uvicorn */
    }
    return Py_BuildValue("(si)", host, port);
}

static PyObject *conn_addr(us_httpconn *c, int peer)
{
    PyObject **slot = peer ? &c->client : &c->sockname;
    if (!*slot) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        memset(&ss, 0, sizeof ss);
        int rc = peer ? us_peer_address(c->fd, &ss, &len) : getsockname(c->fd, (struct sockaddr *)&ss, &len);
        *slot = rc == 0 ? addr_tuple(&ss) : Py_NewRef(Py_None);
        if (!*slot)
            return NULL;
    }
    return Py_NewRef(*slot);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* root_path + the percent-decoded path, decoded as UTF-8 (invalid bytes
 * replaced, as urllib.parse.unquote does). */
static PyObject *decode_path(us_httpserver *srv, const char *p, size_t n)
{
    if (!memchr(p, '%', n) && PyUnicode_GET_LENGTH(srv->root_path) == 0)
        return PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "replace");
    char *buf = PyMem_Malloc(n ? n : 1);
    if (!buf)
        return PyErr_NoMemory();
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int hi, lo;
        if (p[i] == '%' && i + 2 < n && (hi = hexval(p[i + 1])) >= 0 && (lo = hexval(p[i + 2])) >= 0) {
            buf[k++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            buf[k++] = p[i];
        }
    }
    PyObject *path = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)k, "replace");
    PyMem_Free(buf);
    if (!path || PyUnicode_GET_LENGTH(srv->root_path) == 0)
        return path;
    PyObject *full = PyUnicode_Concat(srv->root_path, path);
    Py_DECREF(path);
    return full;
}

static PyObject *header_name(us_state *st, const char *p, uint32_t n)
{
    for (int i = 0; i < st->h_nnames; i++) {
        PyObject *b = st->h_names[i];
        if (PyBytes_GET_SIZE(b) == (Py_ssize_t)n && memcmp(PyBytes_AS_STRING(b), p, n) == 0)
            return Py_NewRef(b);
    }
    return PyBytes_FromStringAndSize(p, n);
}

static PyObject *method_str(us_state *st, uint8_t m)
{
    if (m >= US_HTTP_NMETHODS)
        return PyUnicode_FromString("UNKNOWN");
    if (!st->h_methods[m]) {
        st->h_methods[m] = PyUnicode_InternFromString(llhttp_method_name((llhttp_method_t)m));
        if (!st->h_methods[m])
            return NULL;
    }
    return Py_NewRef(st->h_methods[m]);
}

/* Puts `v` (a new reference, NULL on error) into the scope. */
static int scope_put(PyObject *scope, PyObject *key, PyObject *v)
{
    if (!v)
        return -1;
    int rc = PyDict_SetItem(scope, key, v);
    Py_DECREF(v);
    return rc;
}

static PyObject *build_headers(us_state *st, uh_parser *p, const uh_request *req, int *forwarded)
{
    PyObject *list = PyList_New(req->nheaders);
    if (!list)
        return NULL;
    for (uint32_t i = 0; i < req->nheaders; i++) {
        const uh_header *h = &req->headers[i];
        const char *name = uh_str(p, h->name);
        if (h->name.len >= 11 && memcmp(name, "x-forwarded", 11) == 0)
            *forwarded = 1;
        const char *v = uh_str(p, h->value);
        uint32_t vlen = h->value.len;
        while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
            vlen--; /* llhttp keeps trailing whitespace */
        PyObject *n = header_name(st, name, h->name.len);
        PyObject *val = n ? PyBytes_FromStringAndSize(v, vlen) : NULL;
        PyObject *t = val ? PyTuple_Pack(2, n, val) : NULL;
        if (t)
            PyObject_GC_UnTrack(t); /* two bytes objects: no cycle can go through it */
        Py_XDECREF(n);
        Py_XDECREF(val);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

/* Splits a request target into path and query; an absolute-form target
 * ("http://host/p?q") is reduced to its path and query, a fragment dropped. */
static void split_target(const char *url, size_t ulen, const char **path, size_t *plen, const char **qs, size_t *qlen)
{
    if ((ulen > 7 && strncasecmp(url, "http://", 7) == 0) || (ulen > 8 && strncasecmp(url, "https://", 8) == 0)) {
        const char *auth = (const char *)memchr(url, '/', ulen) + 2;
        size_t rest = ulen - (size_t)(auth - url);
        const char *start = auth;
        while (start < auth + rest && *start != '/' && *start != '?')
            start++;
        ulen -= (size_t)(start - url);
        url = start;
    }
    const char *frag = memchr(url, '#', ulen);
    if (frag)
        ulen = (size_t)(frag - url);
    const char *q = memchr(url, '?', ulen);
    *path = url;
    *plen = q ? (size_t)(q - url) : ulen;
    *qs = q ? q + 1 : "";
    *qlen = q ? ulen - (size_t)(q + 1 - url) : 0;
    if (*plen == 0) {
        *path = "/";
        *plen = 1;
    }
}

PyObject *us_http_build_scope(us_httpconn *c, uh_parser *p, const uh_request *req)
{
    us_httpserver *srv = c->srv;
    us_state *st = srv->st;
    const char *url, *qs;
    size_t plen, qlen;
    split_target(uh_str(p, req->url), req->url.len, &url, &plen, &qs, &qlen);

    PyObject *scope = PyDict_Copy(srv->scope_template);
    if (!scope)
        return NULL;
    int forwarded = 0;
    PyObject *raw = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(srv->root_path_b) + (Py_ssize_t)plen);
    if (raw) {
        memcpy(PyBytes_AS_STRING(raw), PyBytes_AS_STRING(srv->root_path_b), (size_t)PyBytes_GET_SIZE(srv->root_path_b));
        memcpy(PyBytes_AS_STRING(raw) + PyBytes_GET_SIZE(srv->root_path_b), url, plen);
    }
    if (scope_put(scope, st->h_raw_path, raw) < 0 ||
        scope_put(scope, st->h_asgi, PyDict_Copy(st->h_asgi_template)) < 0 ||
        scope_put(scope, st->h_http_version, Py_NewRef(req->http_minor ? st->h_v11 : st->h_v10)) < 0 ||
        scope_put(scope, st->h_method, method_str(st, req->method)) < 0 ||
        scope_put(scope, st->h_path, decode_path(srv, url, plen)) < 0 ||
        scope_put(scope, st->h_query_string, PyBytes_FromStringAndSize(qs, (Py_ssize_t)qlen)) < 0 ||
        scope_put(scope, st->h_root_path, Py_NewRef(srv->root_path)) < 0 ||
        scope_put(scope, st->h_headers, build_headers(st, p, req, &forwarded)) < 0 ||
        scope_put(scope, st->h_client, conn_addr(c, 1)) < 0 || scope_put(scope, st->h_server, conn_addr(c, 0)) < 0 ||
        scope_put(scope, st->h_state, PyDict_Copy(srv->state)) < 0 ||
        scope_put(scope, st->h_extensions, PyDict_Copy(st->h_extensions_template)) < 0) {
        Py_DECREF(scope);
        return NULL;
    }
    if (forwarded && srv->proxy) {
        PyObject *r = PyObject_CallOneArg(srv->proxy, scope);
        if (!r) {
            Py_DECREF(scope);
            return NULL;
        }
        Py_DECREF(r);
    }
    return scope;
}

us_httpcycle *us_httpcycle_new(us_httpconn *c, uh_parser *p, const uh_request *req)
{
    us_httpserver *srv = c->srv;
    us_httpcycle *cy = PyObject_GC_New(us_httpcycle, srv->st->HttpCycleType);
    if (!cy)
        return NULL;
    memset((char *)cy + sizeof(PyObject), 0, sizeof *cy - sizeof(PyObject));
    cy->srv = (us_httpserver *)Py_NewRef(srv);
    cy->conn = (us_httpconn *)Py_NewRef(c);
    cy->expected_len = -1;
    cy->req_flags = req->flags;
    /* a keep-alive timeout <= 0 turns keep-alive off, as gunicorn's keepalive does */
    cy->keep_alive = (req->flags & UH_REQ_KEEP_ALIVE) && !srv->draining && srv->keepalive_timeout > 0;
    cy->head_request = req->method == HTTP_HEAD;
    cy->http10 = req->http_minor == 0;
    cy->body_complete = !(req->flags & UH_REQ_HAS_BODY);
    PyObject_GC_Track(cy);
    cy->scope = us_http_build_scope(c, p, req); /* cy->body: made when a body chunk arrives */
    if (!cy->scope) {
        Py_DECREF(cy);
        return NULL;
    }
    return cy;
}

/* ---- writing the response ---- */

static int emit_bytes(us_httpcycle *cy, const char *data, size_t len)
{
    PyObject *b = PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
    if (!b)
        return -1;
    us_seg seg = {b, -1, 0, 0};
    return us_httpconn_emit(cy->conn, cy, seg);
}

static int emit_obj(us_httpcycle *cy, PyObject *b)
{
    us_seg seg = {Py_NewRef(b), -1, 0, 0};
    return us_httpconn_emit(cy->conn, cy, seg);
}

static int name_is(const char *n, Py_ssize_t len, const char *want)
{
    return (size_t)len == strlen(want) && strncasecmp(n, want, (size_t)len) == 0;
}

static int as_bytes(PyObject *o, const char **p, Py_ssize_t *n)
{
    if (PyBytes_Check(o)) {
        *p = PyBytes_AS_STRING(o);
        *n = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (PyByteArray_Check(o)) {
        *p = PyByteArray_AS_STRING(o);
        *n = PyByteArray_GET_SIZE(o);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "ASGI header names and values must be bytes, got %.100s", Py_TYPE(o)->tp_name);
    return -1;
}

/* Headers the app set that the server would otherwise add. */
typedef struct {
    char server, date, connection;
} us_head_seen;

static int set_expected_len(us_httpcycle *cy, const char *v, Py_ssize_t vl)
{
    char tmp[32];
    size_t k = (size_t)vl < sizeof tmp - 1 ? (size_t)vl : sizeof tmp - 1;
    memcpy(tmp, v, k);
    tmp[k] = 0;
    char *end;
    long long cl = strtoll(tmp, &end, 10);
    if (k == 0 || *end || cl < 0) {
        PyErr_SetString(PyExc_RuntimeError, "invalid Content-Length in the ASGI response headers");
        return -1;
    }
    cy->expected_len = cl;
    return 0;
}

/* A Content-Length header of the app's: 0 to write it, 1 when it repeats
 * the length already given (left out: the head carries it once), -1 when
 * it is invalid or conflicts with it (a client could frame the body by
 * either; h11 and browsers refuse such a response). */
static int put_content_length(us_httpcycle *cy, const char *v, Py_ssize_t vl)
{
    int64_t before = cy->expected_len;
    if (set_expected_len(cy, v, vl) < 0)
        return -1;
    if (before < 0)
        return 0;
    if (before == cy->expected_len)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "conflicting Content-Length headers in the ASGI response");
    return -1;
}

/* One (name, value) pair of the app's headers into the head, noting what
 * the server must know of it. */
static int put_app_header(us_httpcycle *cy, uh_buf *b, PyObject *pair, us_head_seen *seen)
{
    PyObject *ps = PySequence_Fast(pair, "ASGI response headers must be (name, value) pairs");
    if (!ps)
        return -1;
    int rc = -1;
    const char *n, *v;
    Py_ssize_t nl, vl;
    if (PySequence_Fast_GET_SIZE(ps) != 2) {
        PyErr_SetString(PyExc_TypeError, "ASGI response headers must be (name, value) pairs");
        goto done;
    }
    if (as_bytes(PySequence_Fast_GET_ITEM(ps, 0), &n, &nl) < 0 ||
        as_bytes(PySequence_Fast_GET_ITEM(ps, 1), &v, &vl) < 0)
        goto done;
    if (name_is(n, nl, "content-length")) {
        int cl = put_content_length(cy, v, vl);
        if (cl != 0) {
            rc = cl < 0 ? -1 : 0; /* 1: the same length again, written once */
            goto done;
        }
    } else if (name_is(n, nl, "transfer-encoding")) {
        rc = 0; /* the server frames the body itself */
        goto done;
    } else if (name_is(n, nl, "connection")) {
        seen->connection = 1;
        if (vl == 5 && strncasecmp(v, "close", 5) == 0)
            cy->keep_alive = 0;
    } else if (name_is(n, nl, "server")) {
        seen->server = 1;
    } else if (name_is(n, nl, "date")) {
        seen->date = 1;
    }
    rc = uh_put_header(b, n, (size_t)nl, v, (size_t)vl);
    if (rc < 0)
        PyErr_Format(PyExc_RuntimeError, "invalid ASGI response header %R", pair);
done:
    Py_DECREF(ps);
    return rc;
}

static int put_app_headers(us_httpcycle *cy, uh_buf *b, us_head_seen *seen)
{
    if (!cy->headers)
        return 0;
    PyObject *seq = PySequence_Fast(cy->headers, "ASGI response headers must be an iterable of pairs");
    if (!seq)
        return -1;
    cy->expected_len = -1; /* a head refused before may have set it */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (put_app_header(cy, b, PySequence_Fast_GET_ITEM(seq, i), seen) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* server, the configured extra headers, date */
static int put_server_headers(us_httpserver *srv, uh_buf *b, const us_head_seen *seen)
{
    if (!seen->server && srv->server_line.len && uh_buf_append(b, srv->server_line.data, srv->server_line.len) < 0)
        return -1;
    if (srv->extra_headers.len && uh_buf_append(b, srv->extra_headers.data, srv->extra_headers.len) < 0)
        return -1;
    if (srv->date_header && !seen->date) {
        size_t dl;
        const char *d = uh_date_line(&srv->date, time(NULL), &dl);
        if (uh_buf_append(b, d, dl) < 0)
            return -1;
    }
    return 0;
}

/* How the body is framed when the app gave no length: the whole body's
 * length if it is known, else chunked (HTTP/1.1) or the close (HTTP/1.0);
 * then whether the connection stays open. */
static int put_framing(us_httpcycle *cy, uh_buf *b, int64_t final_len, const us_head_seen *seen)
{
    int body_allowed = !cy->head_request && uh_status_allows_body(cy->status);
    if (uh_status_allows_body(cy->status) && cy->expected_len < 0) {
        if (final_len >= 0) {
            if (uh_put_content_length(b, (uint64_t)final_len) < 0)
                return -1;
            if (body_allowed)
                cy->expected_len = final_len;
        } else if (body_allowed && !cy->http10) {
            cy->chunked = 1;
            if (uh_buf_append(b, "transfer-encoding: chunked\r\n", 28) < 0)
                return -1;
        } else if (body_allowed) {
            cy->keep_alive = 0; /* HTTP/1.0 without a length: the close ends the body */
        }
    }
    if (cy->srv->draining)
        cy->keep_alive = 0;
    if (!cy->keep_alive && !seen->connection && uh_buf_append(b, "connection: close\r\n", 19) < 0)
        return -1;
    if (cy->keep_alive && cy->http10 && !seen->connection && uh_buf_append(b, "connection: keep-alive\r\n", 24) < 0)
        return -1;
    return 0;
}

/* Serializes the head into srv->scratch. `final_len` is the whole body's
 * length when the first body message is also the last, else -1. */
static int write_head(us_httpcycle *cy, int64_t final_len)
{
    us_httpserver *srv = cy->srv;
    uh_buf *b = &srv->scratch;
    b->len = 0;
    if (uh_put_status_line(b, cy->status) < 0) {
        PyErr_Format(PyExc_RuntimeError, "invalid HTTP status code %d", cy->status);
        return -1;
    }
    us_head_seen seen = {0, 0, 0};
    if (put_app_headers(cy, b, &seen) < 0 || put_server_headers(srv, b, &seen) < 0 ||
        put_framing(cy, b, final_len, &seen) < 0 || uh_buf_append(b, "\r\n", 2) < 0)
        return -1;
    cy->head_written = 1;
    Py_CLEAR(cy->headers);
    return 0;
}

static void mark_complete(us_httpcycle *cy)
{
    cy->response_complete = 1;
    if (cy->conn)
        us_httpconn_cycle_done(cy->conn, cy);
    us_httpcycle_wake(cy);
}

#define US_HTTP_COPY_MAX 16384 /* smaller bodies are copied next to the head */

static int write_body(us_httpcycle *cy, PyObject *body, int more)
{
    us_httpserver *srv = cy->srv;
    Py_buffer view;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0)
        return -1;
    int64_t len = view.len;
    int rc = -1;
    int body_allowed = !cy->head_request && uh_status_allows_body(cy->status);
    int fresh_head = !cy->head_written;
    if (!cy->head_written && write_head(cy, more ? -1 : len) < 0)
        goto out;
    else if (!cy->head_written)
        goto out;
    if (body_allowed) {
        cy->sent_len += len;
        if (cy->expected_len >= 0 && cy->sent_len > cy->expected_len) {
            PyErr_SetString(PyExc_RuntimeError, "Response content longer than Content-Length");
            goto out;
        }
        if (!more && cy->expected_len >= 0 && cy->sent_len < cy->expected_len) {
            PyErr_SetString(PyExc_RuntimeError, "Response content shorter than Content-Length");
            goto out;
        }
    }
    uh_buf *b = &srv->scratch; /* holds the head when it was just written */
    if (!body_allowed || (len == 0 && !cy->chunked)) {
        if (b->len && emit_bytes(cy, b->data, b->len) < 0)
            goto out;
    } else {
        if (cy->chunked && len && uh_put_chunk_size(b, (size_t)len) < 0)
            goto out;
        int copy = len <= US_HTTP_COPY_MAX || !PyBytes_CheckExact(body);
        if (copy && len) {
            if (uh_buf_append(b, view.buf, (size_t)len) < 0)
                goto out;
        } else if (len) {
            if (b->len && emit_bytes(cy, b->data, b->len) < 0)
                goto out;
            b->len = 0;
            if (emit_obj(cy, body) < 0)
                goto out;
        }
        if (cy->chunked && len && uh_buf_append(b, "\r\n", 2) < 0)
            goto out;
        if (cy->chunked && !more && uh_buf_append(b, "0\r\n\r\n", 5) < 0)
            goto out;
        if (b->len && emit_bytes(cy, b->data, b->len) < 0)
            goto out;
    }
    rc = 0;
out:
    if (rc < 0 && fresh_head && srv->scratch.len)
        cy->head_written = 0; /* the head never left the scratch buffer */
    srv->scratch.len = 0;
    PyBuffer_Release(&view);
    if (rc == 0 && !more)
        mark_complete(cy);
    return rc;
}

/* http.response.pathsend: the file goes out with sendfile(2). */
static int write_file(us_httpcycle *cy, PyObject *path)
{
    PyObject *fs = NULL;
    if (!PyUnicode_FSConverter(path, &fs))
        return -1;
    int fd = open(PyBytes_AS_STRING(fs), O_RDONLY | O_CLOEXEC);
    struct stat stbuf;
    if (fd < 0 || fstat(fd, &stbuf) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        if (fd >= 0)
            close(fd);
        Py_DECREF(fs);
        return -1;
    }
    Py_DECREF(fs);
    int64_t size = stbuf.st_size;
    int body_allowed = !cy->head_request && uh_status_allows_body(cy->status);
    if (!cy->head_written && write_head(cy, cy->expected_len >= 0 ? -1 : size) < 0) {
        close(fd);
        cy->srv->scratch.len = 0;
        return -1;
    }
    uh_buf *b = &cy->srv->scratch;
    int rc = b->len ? emit_bytes(cy, b->data, b->len) : 0;
    b->len = 0;
    if (rc == 0 && body_allowed && cy->chunked) {
        uh_put_chunk_size(b, (size_t)size);
        rc = emit_bytes(cy, b->data, b->len);
        b->len = 0;
    }
    if (rc == 0 && body_allowed && size) {
        us_seg seg = {NULL, fd, 0, size};
        rc = us_httpconn_emit(cy->conn, cy, seg);
        fd = -1;
    }
    if (fd >= 0)
        close(fd);
    if (rc == 0 && body_allowed && cy->chunked)
        rc = emit_bytes(cy, "\r\n0\r\n\r\n", 7);
    if (rc == 0)
        mark_complete(cy);
    return rc;
}

PyObject *us_http_simple_response(us_httpserver *srv, int status, const char *text)
{
    uh_buf b = {0};
    char tmp[160];
    size_t tl = strlen(text);
    int k = snprintf(tmp, sizeof tmp, "content-type: text/plain; charset=utf-8\r\ncontent-length: %zu\r\n", tl);
    size_t dl = 0;
    const char *d = srv->date_header ? uh_date_line(&srv->date, time(NULL), &dl) : "";
    PyObject *r = NULL;
    if (uh_put_status_line(&b, status) == 0 && uh_buf_append(&b, tmp, (size_t)k) == 0 &&
        uh_buf_append(&b, srv->server_line.data ? srv->server_line.data : "", srv->server_line.len) == 0 &&
        uh_buf_append(&b, srv->extra_headers.data ? srv->extra_headers.data : "", srv->extra_headers.len) == 0 &&
        uh_buf_append(&b, d, dl) == 0 && uh_buf_append(&b, "connection: close\r\n\r\n", 21) == 0 &&
        uh_buf_append(&b, text, tl) == 0)
        r = PyBytes_FromStringAndSize(b.data, (Py_ssize_t)b.len);
    else
        PyErr_NoMemory();
    uh_buf_free(&b);
    return r;
}

/* Answers this request with a plain-text error and ends the connection
 * after it. */
int us_httpcycle_error_response(us_httpcycle *cy, int status, const char *text)
{
    cy->response_started = 1;
    cy->keep_alive = 0;
    cy->status = status;
    if (cy->conn) {
        PyObject *r = us_http_simple_response(cy->srv, status, text);
        if (!r || emit_obj(cy, r) < 0) {
            Py_XDECREF(r);
            return -1;
        }
        Py_DECREF(r);
    }
    cy->head_written = 1;
    mark_complete(cy);
    return 0;
}

/* ---- receive ---- */

static PyObject *make_message(us_state *st, PyObject *type)
{
    PyObject *m = PyDict_New();
    if (m && PyDict_SetItem(m, st->h_type, type) < 0)
        Py_CLEAR(m);
    return m;
}

/* The next message for receive(), or NULL without an error when it has to
 * wait. */
static PyObject *next_message(us_httpcycle *cy)
{
    us_state *st = cy->srv->st;
    Py_ssize_t nchunks = cy->body ? PyList_GET_SIZE(cy->body) : 0;
    if (nchunks || (cy->body_complete && !cy->final_returned)) {
        PyObject *body;
        if (nchunks == 1)
            body = Py_NewRef(PyList_GET_ITEM(cy->body, 0));
        else if (nchunks == 0)
            body = PyBytes_FromStringAndSize(NULL, 0);
        else
            body = _PyBytes_Join(st->h_empty_bytes, cy->body);
        if (!body || (nchunks && PyList_SetSlice(cy->body, 0, nchunks, NULL) < 0)) {
            Py_XDECREF(body);
            return NULL;
        }
        int more = !cy->body_complete;
        if (!more)
            cy->final_returned = 1;
        if (cy->conn)
            us_httpconn_body_consumed(cy->conn, PyBytes_GET_SIZE(body));
        PyObject *m = make_message(st, st->h_t_request);
        if (!m || PyDict_SetItem(m, st->h_body, body) < 0 ||
            PyDict_SetItem(m, st->h_more_body, more ? Py_True : Py_False) < 0)
            Py_CLEAR(m);
        Py_DECREF(body);
        return m;
    }
    if (cy->input_ended)
        cy->disconnected = 1; /* told so: from here its send() raises, as after a reset */
    if (cy->disconnected || (cy->final_returned && cy->response_complete))
        return make_message(st, st->h_t_disconnect);
    if (!cy->final_returned && (cy->req_flags & UH_REQ_EXPECT_CONTINUE) && !cy->continue_sent &&
        !cy->response_started && cy->conn) {
        cy->continue_sent = 1;
        if (emit_bytes(cy, "HTTP/1.1 100 Continue\r\n\r\n", 25) < 0)
            return NULL;
    }
    return NULL;
}

static int future_pending(PyObject *fut)
{
    PyObject *r = PyObject_CallMethod(fut, "done", NULL);
    int done = r ? PyObject_IsTrue(r) : -1;
    Py_XDECREF(r);
    return done == 0;
}

static void resolve(PyObject **slot, PyObject *value)
{
    PyObject *fut = *slot;
    *slot = NULL;
    if (future_pending(fut)) {
        PyObject *r = PyObject_CallMethod(fut, "set_result", "O", value);
        Py_XDECREF(r);
    }
    Py_DECREF(fut);
}

static int can_write(us_httpcycle *cy)
{
    us_httpconn *c = cy->conn;
    if (!c || c->dead || c->closed || cy->disconnected)
        return 1;
    if (us_httpconn_is_head(c, cy))
        return c->wq.bytes <= US_HTTP_WRITE_HIGH;
    return cy->out.bytes <= US_HTTP_WRITE_HIGH;
}

void us_httpcycle_wake(us_httpcycle *cy)
{
    /* receive() calls waiting, oldest first (concurrent calls are rare but
     * legal): each gets its own message */
    while (cy->recv_waiter && PyList_GET_SIZE(cy->recv_waiter)) {
        PyObject *fut = PyList_GET_ITEM(cy->recv_waiter, 0);
        if (future_pending(fut)) {
            PyObject *m = next_message(cy);
            if (!m)
                break;
            PyObject *r = PyObject_CallMethod(fut, "set_result", "O", m);
            Py_XDECREF(r);
            Py_DECREF(m);
        }
        if (PySequence_DelItem(cy->recv_waiter, 0) < 0)
            break;
    }
    if (cy->drain_waiter && can_write(cy))
        resolve(&cy->drain_waiter, Py_None);
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)cy);
}

void us_httpcycle_disconnect(us_httpcycle *cy)
{
    cy->disconnected = 1;
    us_httpcycle_wake(cy);
}

/* The client half-closed after the whole request. It may be gone (a FIN
 * is all a close() sends) or still reading (a half-close), so the cycle is
 * disconnected only once its app learns of it: receive(), after the body,
 * says http.disconnect, and from then on send() raises (ASGI 2.4). An app
 * that answers without asking gets its response sent. */
void us_httpcycle_input_ended(us_httpcycle *cy)
{
    cy->input_ended = 1;
    us_httpcycle_wake(cy);
}

static PyObject *new_future(us_httpcycle *cy)
{
    return PyObject_CallMethod((PyObject *)cy->srv->loop, "create_future", NULL);
}

static PyObject *cycle_receive(PyObject *self, PyObject *unused)
{
    (void)unused;
    us_httpcycle *cy = (us_httpcycle *)self;
    PyObject *m = next_message(cy);
    if (m)
        return done_new(cy->srv->st, m);
    if (PyErr_Occurred())
        return NULL;
    if (!cy->recv_waiter && !(cy->recv_waiter = PyList_New(0)))
        return NULL;
    PyObject *fut = new_future(cy);
    if (!fut || PyList_Append(cy->recv_waiter, fut) < 0) {
        Py_XDECREF(fut);
        return NULL;
    }
    return fut;
}

/* ---- send ---- */

static PyObject *msg_get(PyObject *msg, PyObject *key)
{
    if (PyDict_CheckExact(msg)) {
        PyObject *v = PyDict_GetItemWithError(msg, key);
        return Py_XNewRef(v);
    }
    PyObject *v = PyObject_GetItem(msg, key);
    if (!v && PyErr_ExceptionMatches(PyExc_KeyError))
        PyErr_Clear();
    return v;
}

static PyObject *wrong_message(const char *fmt, PyObject *type)
{
    PyErr_Format(PyExc_RuntimeError, fmt, type);
    return NULL;
}

static void access_log(us_httpcycle *cy)
{
    PyObject *hook = cy->srv->access_log;
    if (!hook)
        return;
    PyObject *r = PyObject_CallFunction(hook, "Oi", cy->scope, cy->status);
    if (!r)
        PyErr_WriteUnraisable(hook);
    Py_XDECREF(r);
}

/* The server's own answer to a request an app was given (or would have
 * been): an error response with its access line, as uvicorn's goes through
 * send(). The line is left out when the app's own start was logged. */
static int answer_with_error(us_httpcycle *cy, int status, const char *text)
{
    int logged = cy->response_started;
    Py_INCREF(cy); /* the response completes at once, and its connection may let go of it */
    int rc = us_httpcycle_error_response(cy, status, text);
    if (rc == 0 && !logged)
        access_log(cy);
    Py_DECREF(cy);
    return rc;
}

static PyObject *send_start(us_httpcycle *cy, PyObject *msg, PyObject *type)
{
    us_state *st = cy->srv->st;
    if (PyUnicode_Compare(type, st->h_t_start) != 0) {
        if (PyErr_Occurred())
            return NULL;
        return wrong_message("Expected ASGI message 'http.response.start', but got '%U'.", type);
    }
    PyObject *status = msg_get(msg, st->h_status);
    if (!status) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "http.response.start needs a 'status'");
        return NULL;
    }
    long code = PyLong_AsLong(status);
    Py_DECREF(status);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    if (code < 200 || code > 599) {
        /* a 1xx is not a final response (the client would wait for one, or
         * take 101 for a protocol switch) and RFC 9110 calls codes outside
         * 100-599 invalid; h11 refuses below 200 for uvicorn */
        PyErr_Format(PyExc_RuntimeError, "invalid HTTP status code %ld: a response's status is 200 to 599", code);
        return NULL;
    }
    PyObject *headers = msg_get(msg, st->h_headers);
    if (!headers && PyErr_Occurred())
        return NULL;
    cy->status = (int)code;
    Py_XSETREF(cy->headers, headers);
    cy->response_started = 1;
    access_log(cy);
    return Py_NewRef(st->done_none);
}

/* http.response.body after the start */
static int send_body_msg(us_httpcycle *cy, PyObject *msg)
{
    us_state *st = cy->srv->st;
    PyObject *body = msg_get(msg, st->h_body);
    PyObject *more_o = body || !PyErr_Occurred() ? msg_get(msg, st->h_more_body) : NULL;
    int more = more_o ? PyObject_IsTrue(more_o) : 0;
    Py_XDECREF(more_o);
    int rc;
    if (PyErr_Occurred() || more < 0) {
        rc = -1;
    } else if (!cy->conn) {
        rc = 0; /* the connection is gone: the body goes nowhere */
        if (!more)
            mark_complete(cy);
    } else {
        rc = write_body(cy, body ? body : st->h_empty_bytes, more);
    }
    Py_XDECREF(body);
    return rc;
}

/* http.response.pathsend (the ASGI extension) after the start */
static int send_pathsend_msg(us_httpcycle *cy, PyObject *msg)
{
    PyObject *path = msg_get(msg, cy->srv->st->h_path);
    int rc;
    if (!path) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "http.response.pathsend needs a 'path'");
        rc = -1;
    } else if (!cy->conn) {
        rc = 0;
        mark_complete(cy);
    } else {
        rc = write_file(cy, path);
    }
    Py_XDECREF(path);
    return rc;
}

static PyObject *cycle_send(PyObject *self, PyObject *msg)
{
    us_httpcycle *cy = (us_httpcycle *)self;
    us_state *st = cy->srv->st;
    PyObject *type = msg_get(msg, st->h_type);
    if (!type) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "ASGI message without a 'type'");
        return NULL;
    }
    if (!PyUnicode_Check(type)) {
        Py_DECREF(type);
        PyErr_SetString(PyExc_TypeError, "ASGI message 'type' must be a str");
        return NULL;
    }
    PyObject *result = NULL;
    if (!cy->response_started) {
        result = send_start(cy, msg, type);
        Py_DECREF(type);
        return result;
    }
    if (cy->response_complete) {
        Py_DECREF(type);
        if (cy->rejected)
            return Py_NewRef(st->done_none);
        return wrong_message("Unexpected ASGI message '%U' sent, after response already completed.", type);
    }
    if (cy->disconnected && !cy->rejected) {
        /* ASGI 2.4: send() on a closed connection raises an OSError */
        Py_DECREF(type);
        PyErr_SetString(st->ClientDisconnected, "the client closed the connection");
        return NULL;
    }
    int rc;
    if (PyUnicode_Compare(type, st->h_t_body) == 0) {
        rc = send_body_msg(cy, msg);
    } else if (PyUnicode_Compare(type, st->h_t_pathsend) == 0) {
        rc = send_pathsend_msg(cy, msg);
    } else {
        rc = -1;
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_RuntimeError, "Expected ASGI message 'http.response.body', but got '%U'.", type);
    }
    Py_DECREF(type);
    if (rc < 0)
        return NULL;
    if (can_write(cy))
        return Py_NewRef(st->done_none);
    /* a send() already waiting (the app's sends may overlap, from tasks)
     * shares its future: replacing it would leave that one waiting forever */
    if (!cy->drain_waiter || !future_pending(cy->drain_waiter))
        Py_XSETREF(cy->drain_waiter, new_future(cy));
    return Py_XNewRef(cy->drain_waiter);
}

static PyMethodDef cycle_receive_def = {"receive", cycle_receive, METH_NOARGS, "ASGI receive()"};
static PyMethodDef cycle_send_def = {"send", cycle_send, METH_O, "ASGI send(message)"};

/* ---- the app's task ---- */

/* The response cannot be completed: the connection ends (a client cannot
 * tell a cut response from a complete one otherwise). */
static void abandon(us_httpcycle *cy)
{
    if (cy->response_complete)
        return;
    /* what the app sent still goes out, in its turn; then the connection
     * closes and the requests pipelined after this one are dropped */
    cy->keep_alive = 0;
    mark_complete(cy);
}

static void app_failed(us_httpcycle *cy, const char *message, PyObject *exc)
{
    us_http_log_error(cy->srv, message, exc);
    if (!cy->head_written && !cy->response_complete) {
        /* nothing reached the client yet: it can still get a clean 500 */
        Py_CLEAR(cy->headers);
        if (answer_with_error(cy, 500, "Internal Server Error") < 0)
            PyErr_WriteUnraisable((PyObject *)cy);
    } else if (!cy->response_complete) {
        abandon(cy);
    }
}

static void cycle_finished(us_httpcycle *cy, PyObject *exc, int cancelled);

/* ---- AppRunner: the app's coroutine as the Task runs it ----
 *
 * The Task runs an AppRunner that forwards every send/throw to the app's
 * coroutine and, when that finishes, settles the cycle right there: no done
 * callback, no extra ready-queue round. An exception from the app is
 * handled (logged, 500 or close) and the Task itself ends normally, so
 * asyncio never reports it a second time; cancellation, SystemExit and
 * KeyboardInterrupt propagate as they would from the coroutine. */

typedef struct {
    PyObject_HEAD us_httpcycle *cy; /* NULL once settled */
    PyObject *coro;
} us_runner;

/* What the Task must see raised: KeyboardInterrupt, SystemExit,
 * GeneratorExit, and the CancelledError of the server's own cancel at
 * shutdown. A CancelledError the app raised of itself (or through a
 * cancel() of its own) is the app's failure, as uvicorn reports it: logged,
 * then a 500 or a close. */
static int is_passthrough(us_httpserver *srv)
{
    return PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) || PyErr_ExceptionMatches(PyExc_SystemExit) ||
           PyErr_ExceptionMatches(PyExc_GeneratorExit) ||
           (srv->cancelled && PyErr_ExceptionMatches(srv->st->CancelledError));
}

/* The app's coroutine ended with `status`; settles the cycle. Returns the
 * status the Task should see. */
static PySendResult runner_settle(us_runner *r, PySendResult status, PyObject **result)
{
    us_httpcycle *cy = r->cy;
    r->cy = NULL;
    if (!cy)
        return status;
    Py_CLEAR(cy->task);
    if (status == PYGEN_RETURN) {
        cycle_finished(cy, NULL, 0);
    } else if (is_passthrough(cy->srv)) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (cy->srv->cancelled && PyErr_GivenExceptionMatches(et, cy->srv->st->CancelledError)) {
            /* the shutdown's cancel: reported as the app's exception */
            PyErr_NormalizeException(&et, &ev, &tb);
            if (ev && tb)
                PyException_SetTraceback(ev, tb);
            cycle_finished(cy, ev, 1);
        } else {
            cycle_finished(cy, NULL, 1);
        }
        PyErr_Restore(et, ev, tb);
    } else {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        if (ev && tb)
            PyException_SetTraceback(ev, tb);
        cycle_finished(cy, ev ? ev : Py_None, 0);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        *result = Py_NewRef(Py_None);
        status = PYGEN_RETURN;
    }
    Py_DECREF(cy);
    return status;
}

static PySendResult runner_am_send(PyObject *self, PyObject *arg, PyObject **result)
{
    us_runner *r = (us_runner *)self;
    PySendResult st = PyIter_Send(r->coro, arg, result);
    if (st == PYGEN_NEXT)
        return st;
    if (st == PYGEN_RETURN) {
        Py_DECREF(*result);
        *result = Py_NewRef(Py_None);
    }
    return runner_settle(r, st, result);
}

/* Python-level send/throw: the generator protocol (StopIteration ends it). */
static PyObject *runner_result(us_runner *r, PySendResult st, PyObject *result)
{
    if (st == PYGEN_NEXT)
        return result;
    st = runner_settle(r, st, &result);
    if (st == PYGEN_RETURN) {
        PyErr_SetNone(PyExc_StopIteration);
        Py_XDECREF(result);
    }
    return NULL;
}

static PyObject *runner_send(PyObject *self, PyObject *arg)
{
    PyObject *result = NULL;
    PySendResult st = runner_am_send(self, arg, &result);
    if (st == PYGEN_NEXT)
        return result;
    if (st == PYGEN_RETURN) {
        Py_DECREF(result);
        PyErr_SetNone(PyExc_StopIteration);
    }
    return NULL;
}

static PyObject *runner_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    us_runner *r = (us_runner *)self;
    PyObject *meth = PyObject_GetAttrString(r->coro, "throw");
    PyObject *result = meth ? PyObject_Vectorcall(meth, args, (size_t)nargs, NULL) : NULL;
    Py_XDECREF(meth);
    if (result)
        return result;
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyErr_Clear();
        return runner_result(r, PYGEN_RETURN, Py_NewRef(Py_None));
    }
    return runner_result(r, PYGEN_ERROR, NULL);
}

static PyObject *runner_close(PyObject *self, PyObject *unused)
{
    (void)unused;
    us_runner *r = (us_runner *)self;
    PyObject *res = PyObject_CallMethod(r->coro, "close", NULL);
    if (r->cy) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        us_httpcycle *cy = r->cy;
        r->cy = NULL;
        Py_CLEAR(cy->task);
        cycle_finished(cy, NULL, 1);
        Py_DECREF(cy);
        PyErr_Restore(et, ev, tb);
    }
    return res;
}

static PyObject *runner_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PyObject *runner_next(PyObject *self)
{
    return runner_send(self, Py_None);
}

static PyObject *runner_repr(us_runner *r)
{
    return PyUnicode_FromFormat("<uringserve app %R>", r->coro);
}

static int runner_traverse(us_runner *r, visitproc visit, void *arg)
{
    Py_VISIT(r->cy);
    Py_VISIT(r->coro);
    Py_VISIT(Py_TYPE(r));
    return 0;
}

static int runner_clear(us_runner *r)
{
    Py_CLEAR(r->cy);
    Py_CLEAR(r->coro);
    return 0;
}

static void runner_dealloc(us_runner *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    PyObject_GC_UnTrack(r);
    if (r->cy) {
        /* never finished (the loop went away): the cycle still counts it */
        r->cy->srv->ntasks--;
    }
    runner_clear(r);
    tp->tp_free(r);
    Py_DECREF(tp);
}

static PyMethodDef runner_methods[] = {
    {"send", runner_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))runner_throw, METH_FASTCALL, NULL},
    {"close", runner_close, METH_NOARGS, NULL},
    {NULL},
};

static PyType_Slot runner_slots[] = {
    {Py_tp_dealloc, runner_dealloc},
    {Py_tp_traverse, runner_traverse},
    {Py_tp_clear, runner_clear},
    {Py_tp_repr, runner_repr},
    {Py_am_await, runner_await},
    {Py_am_send, runner_am_send},
    {Py_tp_iter, runner_await},
    {Py_tp_iternext, runner_next},
    {Py_tp_methods, runner_methods},
    {Py_tp_doc, "The app's coroutine as uringserve's Task runs it (internal)."},
    {0, NULL},
};

PyType_Spec us_runner_spec = {
    .name = "uringloop._core.AppRunner",
    .basicsize = sizeof(us_runner),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = runner_slots,
};

static PyObject *runner_new(us_httpcycle *cy, PyObject *coro)
{
    us_runner *r = PyObject_GC_New(us_runner, cy->srv->st->AppRunnerType);
    if (!r)
        return NULL;
    r->cy = (us_httpcycle *)Py_NewRef(cy);
    r->coro = Py_NewRef(coro);
    PyObject_GC_Track(r);
    return (PyObject *)r;
}

/* app(scope, receive, send), as what the runner steps: the coroutine, or
 * the iterator that any other awaitable's __await__ returns. */
static PyObject *app_call(us_httpcycle *cy)
{
    PyObject *recv = PyCFunction_New(&cycle_receive_def, (PyObject *)cy);
    PyObject *send = recv ? PyCFunction_New(&cycle_send_def, (PyObject *)cy) : NULL;
    PyObject *coro = NULL;
    if (send) {
        PyObject *args[3] = {cy->scope, recv, send};
        coro = PyObject_Vectorcall(cy->srv->app, args, 3, NULL);
    }
    Py_XDECREF(recv);
    Py_XDECREF(send);
    if (coro && !PyCoro_CheckExact(coro)) {
        PyAsyncMethods *am = Py_TYPE(coro)->tp_as_async;
        PyObject *it = am && am->am_await ? am->am_await(coro) : NULL;
        if (!it && !PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "the ASGI application returned %R, which is not awaitable", coro);
        Py_SETREF(coro, it);
    }
    return coro;
}

/* The Task that runs `runner`, made through the loop's task factory if it
 * has one. The Task copies the current context: the server's, as an
 * asyncio server's protocol creates its tasks in the context it started
 * in. NULL with an exception. */
static PyObject *task_new(us_httpserver *srv, PyObject *runner)
{
    int entered = 0; /* 1: entered, -1: could not enter */
    if (srv->context)
        entered = PyContext_Enter(srv->context) < 0 ? -1 : 1;
    PyObject *task = NULL;
    PyObject *factory = entered < 0 ? NULL : PyObject_GetAttr((PyObject *)srv->loop, srv->s_task_factory);
    if (factory == Py_None) {
        PyObject *args[2] = {runner, (PyObject *)srv->loop};
        task = PyObject_Vectorcall(srv->task_type, args, 1, srv->st->kw_loop);
    } else if (factory) {
        task = PyObject_CallMethod((PyObject *)srv->loop, "create_task", "O", runner);
    }
    Py_XDECREF(factory);
    if (entered == 1) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyContext_Exit(srv->context) < 0) /* a task factory left a context entered */
            PyErr_WriteUnraisable((PyObject *)srv);
        PyErr_Restore(et, ev, tb);
    }
    return task;
}

/* The app could not be called or its task not made: the exception raised
 * is the app's failure (a 500 and its traceback in the log). */
static int app_start_failed(us_httpcycle *cy)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (ev && tb)
        PyException_SetTraceback(ev, tb);
    app_failed(cy, "Exception in ASGI application\n", ev);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    return -1;
}

int us_httpcycle_start(us_httpcycle *cy)
{
    us_httpserver *srv = cy->srv;
    if (srv->limit_concurrency && (srv->nconns > srv->limit_concurrency || srv->ntasks >= srv->limit_concurrency)) {
        cy->rejected = 1;
        us_http_log_warning(srv, "Exceeded concurrency limit."); /* uvicorn's words */
        return answer_with_error(cy, 503, "Service Unavailable");
    }
    PyObject *coro = app_call(cy);
    if (coro)
        Py_SETREF(coro, runner_new(cy, coro));
    PyObject *task = NULL;
    int settled = 0; /* the app already ran to its end (an eager task) */
    if (coro) {
        /* Counted first: with an eager task factory (3.12) the app runs, and
         * may finish, inside create_task(), while its request is still being
         * parsed; the cycle then settles (cycle_finished) before we are back. */
        srv->ntasks++;
        task = task_new(srv, coro);
        us_runner *runner = (us_runner *)coro;
        if (!task) {
            /* the runner never ran: the cycle is settled below */
            Py_CLEAR(runner->cy);
            srv->ntasks--;
        }
        settled = task && !runner->cy;
        Py_DECREF(coro);
    }
    if (!task)
        return app_start_failed(cy);
    if (settled)
        Py_DECREF(task); /* done: nothing to cancel at shutdown */
    else
        cy->task = task;
    return 0;
}

/* OSError (our ClientDisconnected) or a framework's translation of it,
 * such as Starlette's ClientDisconnect. */
static int client_gone_error(PyObject *exc)
{
    if (PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_OSError))
        return 1;
    const char *name = Py_TYPE(exc)->tp_name;
    const char *dot = strrchr(name, '.');
    return strcmp(dot ? dot + 1 : name, "ClientDisconnect") == 0;
}

/* The app is done: `exc` is what it raised (NULL when it returned), or it
 * was cancelled (`exc` is then the CancelledError of the server's shutdown,
 * or NULL). Reports failures and frees what the run held. */
static void cycle_finished(us_httpcycle *cy, PyObject *exc, int cancelled)
{
    cy->srv->ntasks--;
    if (cancelled) {
        /* the graceful shutdown timed out: as uvicorn, the cancellation is
         * logged as the app's exception and answered 500 if no response
         * had started (server_cancel_all kept the connection for it) */
        if (exc && !cy->disconnected) {
            app_failed(cy, "Exception in ASGI application\n", exc);
        } else {
            if (exc)
                us_http_log_error(cy->srv, "Exception in ASGI application\n", exc);
            if (!cy->response_complete)
                abandon(cy);
        }
    } else if (exc && cy->disconnected && client_gone_error(exc)) {
        abandon(cy); /* the client left: not an application error */
    } else if (exc) {
        app_failed(cy, "Exception in ASGI application\n", exc);
    } else if (!cy->response_started) {
        if (!cy->disconnected)
            app_failed(cy, "ASGI callable returned without starting response.", NULL);
        else
            abandon(cy);
    } else if (!cy->response_complete) {
        if (!cy->disconnected)
            app_failed(cy, "ASGI callable returned without completing response.", NULL);
        else
            abandon(cy);
    }
    Py_CLEAR(cy->recv_waiter);
    Py_CLEAR(cy->drain_waiter);
}

static int cycle_traverse(us_httpcycle *cy, visitproc visit, void *arg)
{
    Py_VISIT(cy->conn);
    Py_VISIT(cy->scope);
    Py_VISIT(cy->task);
    Py_VISIT(cy->body);
    Py_VISIT(cy->recv_waiter);
    Py_VISIT(cy->drain_waiter);
    Py_VISIT(cy->headers);
    Py_VISIT(Py_TYPE(cy));
    return 0;
}

static int cycle_clear(us_httpcycle *cy)
{
    Py_CLEAR(cy->conn);
    Py_CLEAR(cy->scope);
    Py_CLEAR(cy->task);
    Py_CLEAR(cy->body);
    Py_CLEAR(cy->recv_waiter);
    Py_CLEAR(cy->drain_waiter);
    Py_CLEAR(cy->headers);
    return 0;
}

static void cycle_dealloc(us_httpcycle *cy)
{
    PyTypeObject *tp = Py_TYPE(cy);
    PyObject_GC_UnTrack(cy);
    cycle_clear(cy);
    us_segq_clear(&cy->out);
    Py_CLEAR(cy->srv);
    tp->tp_free(cy);
    Py_DECREF(tp);
}

static PyObject *cycle_repr(us_httpcycle *cy)
{
    return PyUnicode_FromFormat("<HttpCycle status=%d started=%d complete=%d body_complete=%d final_returned=%d "
                                "disconnected=%d conn=%d>",
                                cy->status, cy->response_started, cy->response_complete, cy->body_complete,
                                cy->final_returned, cy->disconnected, cy->conn != NULL);
}

static PyType_Slot cycle_slots[] = {
    {Py_tp_dealloc, cycle_dealloc},
    {Py_tp_traverse, cycle_traverse},
    {Py_tp_clear, cycle_clear},
    {Py_tp_repr, cycle_repr},
    {Py_tp_doc, "One request/response cycle of an HttpServer (internal)."},
    {0, NULL},
};

PyType_Spec us_httpcycle_spec = {
    .name = "uringloop._core.HttpCycle",
    .basicsize = sizeof(us_httpcycle),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = cycle_slots,
};
