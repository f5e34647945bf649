/*
 * Handle and TimerHandle: what call_soon/call_later return and what the ready
 * queue holds. Same attributes and behaviour as asyncio.events.Handle: the
 * callback runs in its contextvars context, its errors go to the loop's
 * exception handler, SystemExit and KeyboardInterrupt propagate.
 */
#include "us.h"

#include <structmember.h>

us_handle *us_handle_new(us_loop *loop, PyTypeObject *tp, PyObject *callback, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *context)
{
    us_state *st = loop->st;
    us_handle *h;
    if (tp == st->HandleType && st->handle_free_n)
        h = (us_handle *)PyObject_Init((PyObject *)st->handle_free[--st->handle_free_n], tp);
    else if (tp == st->TimerHandleType && st->timer_free_n)
        h = (us_handle *)PyObject_Init((PyObject *)st->timer_free[--st->timer_free_n], tp);
    else
        h = PyObject_GC_New(us_handle, tp);
    if (!h)
        return NULL;
    h->callback = Py_NewRef(callback);
    h->args = PyTuple_New(nargs);
    h->context = NULL;
    h->loop = (us_loop *)Py_NewRef(loop);
    h->source_traceback = NULL;
    h->repr = NULL;
    h->weakreflist = NULL;
    h->cancelled = 0;
    if (tp == loop->st->TimerHandleType)
        ue_timer_init(&((us_timer_handle *)h)->timer);
    PyObject_GC_Track(h);
    if (!h->args)
        goto fail;
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(h->args, i, Py_NewRef(args[i]));
    if (context == NULL || context == Py_None)
        h->context = PyContext_CopyCurrent();
    else
        h->context = Py_NewRef(context);
    if (!h->context)
        goto fail;
    if (loop->debug) {
        PyObject *frame = (PyObject *)PyEval_GetFrame();
        h->source_traceback = PyObject_CallOneArg(loop->st->extract_stack, frame ? frame : Py_None);
        if (!h->source_traceback)
            goto fail;
    }
    return h;
fail:
    Py_DECREF(h);
    return NULL;
}

/* Runs the callback; 0 when done (errors reported), -1 when an exception
 * must propagate out of the loop (SystemExit, KeyboardInterrupt). */
int us_handle_run(us_handle *h)
{
    if (h->cancelled || !h->callback)
        return 0;
    PyObject *cb = Py_NewRef(h->callback);
    PyObject *args = Py_NewRef(h->args);
    PyObject *res = NULL;
    if (PyContext_Enter(h->context) == 0) {
        res = PyObject_Vectorcall(cb, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), NULL);
        if (PyContext_Exit(h->context) < 0)
            Py_CLEAR(res);
    }
    int rc = 0;
    if (res) {
        Py_DECREF(res);
    } else if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        rc = -1;
    } else {
        rc = us_report_callback_exception(h->loop, cb, args, (PyObject *)h);
    }
    Py_DECREF(cb);
    Py_DECREF(args);
    return rc;
}

static int handle_traverse(us_handle *h, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(h));
    Py_VISIT(h->callback);
    Py_VISIT(h->args);
    Py_VISIT(h->context);
    Py_VISIT(h->loop);
    Py_VISIT(h->source_traceback);
    Py_VISIT(h->repr);
    return 0;
}

static int handle_clear(us_handle *h)
{
    Py_CLEAR(h->callback);
    Py_CLEAR(h->args);
    Py_CLEAR(h->context);
    Py_CLEAR(h->loop);
    Py_CLEAR(h->source_traceback);
    Py_CLEAR(h->repr);
    return 0;
}

static void handle_dealloc(us_handle *h)
{
    PyTypeObject *tp = Py_TYPE(h);
    us_state *st = PyType_GetModuleState(tp);
    PyObject_GC_UnTrack(h);
    if (h->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)h);
    handle_clear(h);
    if (st && tp == st->HandleType && st->handle_free_n < US_FREELIST_SIZE)
        st->handle_free[st->handle_free_n++] = h;
    else if (st && tp == st->TimerHandleType && st->timer_free_n < US_FREELIST_SIZE)
        st->timer_free[st->timer_free_n++] = (us_timer_handle *)h;
    else
        tp->tp_free(h);
    Py_DECREF(tp);
}

void us_handle_freelist_clear(us_state *st)
{
    while (st->handle_free_n)
        PyObject_GC_Del(st->handle_free[--st->handle_free_n]);
    while (st->timer_free_n)
        PyObject_GC_Del(st->timer_free[--st->timer_free_n]);
}

static PyObject *handle_repr(us_handle *h)
{
    if (h->repr)
        return Py_NewRef(h->repr);
    if (h->loop && h->loop->st->handle_repr)
        return PyObject_CallOneArg(h->loop->st->handle_repr, (PyObject *)h);
    return PyUnicode_FromFormat("<%s object at %p>", Py_TYPE(h)->tp_name, h);
}

/* cancel() without returning a value; safe to call with an error set. */
void us_handle_cancel_quiet(us_handle *h)
{
    if (h->cancelled)
        return;
    us_loop *loop = h->loop;
    if (loop && Py_TYPE(h) == loop->st->TimerHandleType)
        us_timer_cancelled(loop, (us_timer_handle *)h);
    h->cancelled = 1;
    if (loop && loop->debug && !h->repr) {
        PyObject *exc_type, *exc, *tb;
        PyErr_Fetch(&exc_type, &exc, &tb);
        h->repr = handle_repr(h);
        if (!h->repr)
            PyErr_Clear();
        PyErr_Restore(exc_type, exc, tb);
    }
    Py_CLEAR(h->callback);
    Py_CLEAR(h->args);
}

static PyObject *handle_cancel(us_handle *h, PyObject *unused)
{
    (void)unused;
    us_handle_cancel_quiet(h);
    Py_RETURN_NONE;
}

static PyObject *handle_cancelled(us_handle *h, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(h->cancelled);
}

static PyObject *handle_get_context(us_handle *h, PyObject *unused)
{
    (void)unused;
    return Py_NewRef(h->context ? h->context : Py_None);
}

static PyObject *handle_run_method(us_handle *h, PyObject *unused)
{
    (void)unused;
    if (us_handle_run(h) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *handle_get_cancelled(us_handle *h, void *c)
{
    (void)c;
    return PyBool_FromLong(h->cancelled);
}

static PyObject *handle_get_args(us_handle *h, void *c)
{
    (void)c;
    return Py_NewRef(h->args ? h->args : Py_None);
}

static PyObject *handle_get_callback(us_handle *h, void *c)
{
    (void)c;
    return Py_NewRef(h->callback ? h->callback : Py_None);
}

static PyObject *handle_get_source_traceback(us_handle *h, void *c)
{
    (void)c;
    return Py_NewRef(h->source_traceback ? h->source_traceback : Py_None);
}

static int handle_set_source_traceback(us_handle *h, PyObject *v, void *c)
{
    (void)c;
    Py_XSETREF(h->source_traceback, Py_XNewRef(v == Py_None ? NULL : v));
    return 0;
}

static PyMethodDef handle_methods[] = {
    {"cancel", (PyCFunction)handle_cancel, METH_NOARGS, NULL},
    {"cancelled", (PyCFunction)handle_cancelled, METH_NOARGS, NULL},
    {"get_context", (PyCFunction)handle_get_context, METH_NOARGS, NULL},
    {"_run", (PyCFunction)handle_run_method, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef handle_members[] = {
    {"_context", T_OBJECT, offsetof(us_handle, context), READONLY, NULL},
    {"_loop", T_OBJECT, offsetof(us_handle, loop), READONLY, NULL},
    {"_repr", T_OBJECT, offsetof(us_handle, repr), 0, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(us_handle, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef handle_getset[] = {
    {"_cancelled", (getter)handle_get_cancelled, NULL, NULL, NULL},
    {"_args", (getter)handle_get_args, NULL, NULL, NULL},
    {"_callback", (getter)handle_get_callback, NULL, NULL, NULL},
    {"_source_traceback", (getter)handle_get_source_traceback, (setter)handle_set_source_traceback, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot handle_slots[] = {
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_traverse, handle_traverse},
    {Py_tp_clear, handle_clear},
    {Py_tp_repr, handle_repr},
    {Py_tp_methods, handle_methods},
    {Py_tp_members, handle_members},
    {Py_tp_getset, handle_getset},
    {Py_tp_doc, "A callback scheduled on a uringloop loop (asyncio.Handle semantics)."},
    {0, NULL},
};

PyType_Spec us_handle_spec = {
    .name = "uringloop._core.Handle",
    .basicsize = sizeof(us_handle),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = handle_slots,
};

/* ---- TimerHandle ---- */

static PyObject *timer_when(us_timer_handle *t, PyObject *unused)
{
    (void)unused;
    if (t->when_is_nan)
        return PyFloat_FromDouble(NAN);
    return t->when_is_int ? PyLong_FromDouble(t->timer.when) : PyFloat_FromDouble(t->timer.when);
}

static PyObject *timer_get_when(us_timer_handle *t, void *c)
{
    (void)c;
    return timer_when(t, NULL);
}

static PyObject *timer_get_scheduled(us_timer_handle *t, void *c)
{
    (void)c;
    return PyBool_FromLong(ue_timer_scheduled(&t->timer));
}

static Py_hash_t timer_hash(us_timer_handle *t)
{
    PyObject *w = PyFloat_FromDouble(t->timer.when);
    if (!w)
        return -1;
    Py_hash_t hv = PyObject_Hash(w);
    Py_DECREF(w);
    return hv;
}

static PyObject *timer_richcompare(PyObject *a, PyObject *b, int op)
{
    if (Py_TYPE(a) != Py_TYPE(b))
        Py_RETURN_NOTIMPLEMENTED;
    us_timer_handle *x = (us_timer_handle *)a, *y = (us_timer_handle *)b;
    int eq = 0;
    if (op == Py_EQ || op == Py_NE || op == Py_LE || op == Py_GE) {
        eq = a == b;
        if (!eq && x->timer.when == y->timer.when && x->base.cancelled == y->base.cancelled) {
            PyObject *ca = x->base.callback ? x->base.callback : Py_None;
            PyObject *cb = y->base.callback ? y->base.callback : Py_None;
            PyObject *aa = x->base.args ? x->base.args : Py_None;
            PyObject *ab = y->base.args ? y->base.args : Py_None;
            int r = PyObject_RichCompareBool(ca, cb, Py_EQ);
            if (r < 0)
                return NULL;
            if (r) {
                r = PyObject_RichCompareBool(aa, ab, Py_EQ);
                if (r < 0)
                    return NULL;
            }
            eq = r;
        }
    }
    switch (op) {
    case Py_EQ:
        return PyBool_FromLong(eq);
    case Py_NE:
        return PyBool_FromLong(!eq);
    case Py_LT:
        return PyBool_FromLong(x->timer.when < y->timer.when);
    case Py_GT:
        return PyBool_FromLong(x->timer.when > y->timer.when);
    case Py_LE:
        return PyBool_FromLong(x->timer.when < y->timer.when || eq);
    case Py_GE:
        return PyBool_FromLong(x->timer.when > y->timer.when || eq);
    }
    Py_RETURN_NOTIMPLEMENTED;
}

static PyMethodDef timer_methods[] = {
    {"when", (PyCFunction)timer_when, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef timer_getset[] = {
    {"_when", (getter)timer_get_when, NULL, NULL, NULL},
    {"_scheduled", (getter)timer_get_scheduled, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot timer_slots[] = {
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_traverse, handle_traverse},
    {Py_tp_clear, handle_clear},
    {Py_tp_hash, timer_hash},
    {Py_tp_richcompare, timer_richcompare},
    {Py_tp_methods, timer_methods},
    {Py_tp_getset, timer_getset},
    {Py_tp_doc, "A callback scheduled for a point in time (asyncio.TimerHandle semantics)."},
    {0, NULL},
};

PyType_Spec us_timer_handle_spec = {
    .name = "uringloop._core.TimerHandle",
    .basicsize = sizeof(us_timer_handle),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = timer_slots,
};
