/* provhpc.capture._fast: the hot path of activities and values, in C.
 *
 * Optional: provhpc.capture.api uses these functions when the extension built, and its
 * pure-Python path otherwise.  Each function writes records exactly as the
 * Python path would (same 64-byte layout, "<QQQqIIqqd", see records.py) or,
 * when anything is out of the ordinary, changes nothing and returns False so
 * that the caller takes the Python path:
 *   - no room before ``fast_end`` (the slot is full, or a locked section closed the
 *     fast path), or another thread than the agent's owner while the owner is inside
 *     its Python fast path (``busy``);
 *   - a name, kind, key or string value not interned yet in ``agent.strings``;
 *   - a value that needs the coercion rules (anything but float, int within
 *     int64, bool, interned str).
 * The GIL is held throughout, so no other Python thread sees a half-written
 * state: that is what the Python path's ``busy`` flag guards against.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>

#define MAX_RECORDS 64
#define NO_STEP INT64_MIN
#define STATUS_OK 0

typedef struct {
    uint64_t hdr, id, ref;
    int64_t t;
    uint32_t name, sval;
    int64_t step, ival;
    double fval;
} record_t;

static PyObject *s_owner, *s_cursor, *s_mm, *s_strings, *s_h_attr, *s_h_start,
    *s_h_end, *s_next_id, *s_open_activities, *s_name, *s_kind, *s_index, *s_params, *s_id,
    *s_parent, *s_h_metric, *s_metric_py, *s_step_kw, *s_h_entity, *s_data_py, *s_entity_cls,
    *s_data_kind, *s_domain, *s_size, *s_mtime_ns, *s_fp, *s_h_relation, *s_attribute_py,
    *s_metric_act_py, *s_busy;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);  /* what time.time_ns() reads */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int get_u64(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) return -1;
    return 1;
}

/* What never changes in an agent's life, read once per agent (the cache holds a strong
 * reference, so a new agent is never mistaken for a freed one at the same address). */
typedef struct {
    PyObject *agent, *strings, *mm, *next_id, *opened, *dict;
    Py_buffer cursor_view;  /* agent.cursor, held: the array cannot be resized under it */
    long long *cursor;      /* [0] off, [1] fast_end, read and written in place */
    Py_buffer mm_view;      /* agent.mm, held until forget(): mm.close() cannot unmap it */
    char *seg;              /* the segment's bytes (mm_view.buf), NULL when not held */
    uint64_t h_start, h_end, h_metric, h_entity, h_relation, h_attr[5];
    unsigned long owner;
    int has_owner;
} state_t;

static state_t cached;

/* Recently looked-up string ids of the cached agent, by the key object's address.  An
 * entry holds a strong reference to its key, so no other object can take that address
 * while the entry lives; an agent's ids never change (``strings`` only grows), and the
 * cache is emptied with the agent's state (state_clear). */
#define SID_CACHE 64
static struct { PyObject *key; uint32_t sid; } sid_cache[SID_CACHE];

static void sid_cache_clear(void) {
    for (int i = 0; i < SID_CACHE; i++) Py_CLEAR(sid_cache[i].key);
}

static inline unsigned sid_slot(PyObject *key) {
    uintptr_t p = (uintptr_t)key;
    return (unsigned)((p >> 4) ^ (p >> 10)) & (SID_CACHE - 1);
}

/* The string id of ``key`` (1), not interned or not a str (0), error (-1). */
static int string_id(PyObject *strings, PyObject *key, uint32_t *out) {
    if (!PyUnicode_CheckExact(key)) return 0;
    unsigned slot = sid_slot(key);
    int cacheable = strings == cached.strings;
    if (cacheable && sid_cache[slot].key == key) {
        *out = sid_cache[slot].sid;
        return 1;
    }
    PyObject *v = PyDict_GetItemWithError(strings, key);  /* borrowed */
    if (v == NULL) return PyErr_Occurred() ? -1 : 0;
    unsigned long id = PyLong_AsUnsignedLong(v);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return -1;
    *out = (uint32_t)id;
    if (cacheable) {
        Py_INCREF(key);
        Py_XSETREF(sid_cache[slot].key, key);
        sid_cache[slot].sid = (uint32_t)id;
    }
    return 1;
}

static void state_clear(state_t *st) {
    if (st == &cached) sid_cache_clear();
    if (st->cursor != NULL) {
        PyBuffer_Release(&st->cursor_view);
        st->cursor = NULL;
    }
    if (st->seg != NULL) {
        PyBuffer_Release(&st->mm_view);
        st->seg = NULL;
    }
    Py_CLEAR(st->agent); Py_CLEAR(st->strings); Py_CLEAR(st->mm); Py_CLEAR(st->next_id);
    Py_CLEAR(st->opened); Py_CLEAR(st->dict);
}

static state_t *state_of(PyObject *agent) {
    if (cached.agent == agent) return &cached;
    state_t st = {0};
    PyObject *h = NULL, *owner = NULL, *cursor = NULL;
    Py_INCREF(agent);
    st.agent = agent;
    if ((cursor = PyObject_GetAttr(agent, s_cursor)) == NULL) goto fail;
    if (PyObject_GetBuffer(cursor, &st.cursor_view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        goto fail;
    st.cursor = (long long *)st.cursor_view.buf;
    if (st.cursor_view.itemsize != 8 || st.cursor_view.len < 16 ||
        st.cursor_view.format == NULL || strcmp(st.cursor_view.format, "q") != 0) {
        PyErr_SetString(PyExc_TypeError, "provhpc.capture._fast: agent.cursor");
        goto fail;
    }
    if ((st.strings = PyObject_GetAttr(agent, s_strings)) == NULL) goto fail;
    if ((st.mm = PyObject_GetAttr(agent, s_mm)) == NULL) goto fail;
    if (PyObject_GetBuffer(st.mm, &st.mm_view, PyBUF_WRITABLE) < 0) goto fail;
    st.seg = (char *)st.mm_view.buf;
    if ((st.next_id = PyObject_GetAttr(agent, s_next_id)) == NULL) goto fail;
    if ((st.opened = PyObject_GetAttr(agent, s_open_activities)) == NULL) goto fail;
    /* busy changes all the time: read in the instance dict */
    if ((st.dict = PyObject_GenericGetDict(agent, NULL)) == NULL) goto fail;
    if (!PyDict_CheckExact(st.strings) || !PyDict_CheckExact(st.opened)) {
        PyErr_SetString(PyExc_TypeError, "provhpc.capture._fast: agent.strings/open_activities");
        goto fail;
    }
    if (get_u64(agent, s_h_start, &st.h_start) < 0) goto fail;
    if (get_u64(agent, s_h_end, &st.h_end) < 0) goto fail;
    if (get_u64(agent, s_h_metric, &st.h_metric) < 0) goto fail;
    if (get_u64(agent, s_h_entity, &st.h_entity) < 0) goto fail;
    if (get_u64(agent, s_h_relation, &st.h_relation) < 0) goto fail;
    if ((h = PyObject_GetAttr(agent, s_h_attr)) == NULL) goto fail;
    if (!PyList_CheckExact(h) || PyList_GET_SIZE(h) < 5) {
        PyErr_SetString(PyExc_TypeError, "provhpc.capture._fast: agent.h_attr");
        goto fail;
    }
    for (int i = 0; i < 5; i++) {
        st.h_attr[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(h, i));
        if (st.h_attr[i] == (uint64_t)-1 && PyErr_Occurred()) goto fail;
    }
    if ((owner = PyObject_GetAttr(agent, s_owner)) == NULL) goto fail;
    st.has_owner = PyLong_Check(owner);  /* None without a GIL: never the fast path */
    if (st.has_owner) {
        st.owner = PyLong_AsUnsignedLong(owner);
        if (st.owner == (unsigned long)-1 && PyErr_Occurred()) goto fail;
    }
    Py_DECREF(h);
    Py_DECREF(owner);
    Py_DECREF(cursor);
    state_clear(&cached);
    cached = st;
    return &cached;
fail:
    Py_XDECREF(h);
    Py_XDECREF(owner);
    Py_XDECREF(cursor);
    state_clear(&st);
    return NULL;
}

/* The owner thread may write n records at the agent's current offset: 1 and *off set; 0 no. */
static int room(PyObject *agent, state_t *st, Py_ssize_t n, long long *off) {
    if (!st->has_owner) return 0;
    if (st->owner != PyThread_get_thread_ident()) {
        /* Another thread: this C write, done without releasing the GIL, is as atomic as
         * the owner's, unless the owner is inside its Python fast path (``busy``: it read
         * ``off`` and has not advanced it yet).  A locked section sets fast_end to 0. */
        PyObject *busy = PyDict_GetItemWithError(st->dict, s_busy);  /* borrowed */
        if (busy != Py_False) return busy == NULL && PyErr_Occurred() ? -1 : 0;
    }
    *off = st->cursor[0];
    return *off + n * (long long)sizeof(record_t) <= st->cursor[1];
}

/* Copy the records into the segment at ``off`` and advance the agent's ``off`` (cursor[0]). */
static int commit(PyObject *agent, state_t *st, long long off, const record_t *recs,
                  Py_ssize_t n) {
    Py_ssize_t size = n * (Py_ssize_t)sizeof(record_t);
    if (off < 0 || off + size > st->mm_view.len) {
        PyErr_SetString(PyExc_RuntimeError, "provhpc.capture._fast: write outside the segment");
        return -1;
    }
    memcpy(st->seg + off, recs, (size_t)size);
    st->cursor[0] = off + size;
    return 0;
}

/* The attribute record of one (key, value) into *r: 1 written, 0 fall back, -1 error. */
static int value_record(state_t *st, uint64_t owner, uint64_t role, int64_t t, PyObject *key,
                        PyObject *value, record_t *r) {
    uint32_t kid;
    int s = string_id(st->strings, key, &kid);
    if (s <= 0) return s;
    r->id = owner; r->ref = role; r->t = t; r->name = kid; r->sval = 0;
    r->step = NO_STEP; r->ival = 0; r->fval = 0.0;
    if (PyFloat_CheckExact(value)) {
        r->hdr = st->h_attr[2];
        r->fval = PyFloat_AS_DOUBLE(value);
    } else if (PyBool_Check(value)) {
        r->hdr = st->h_attr[3];
        r->ival = value == Py_True;
    } else if (PyLong_CheckExact(value)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) return 0;
        if (v == -1 && PyErr_Occurred()) return -1;
        r->hdr = st->h_attr[1];
        r->ival = v;
    } else if (PyUnicode_CheckExact(value)) {
        uint32_t sid;
        s = string_id(st->strings, value, &sid);
        if (s <= 0) return s;
        r->hdr = st->h_attr[4];
        r->sval = sid;
    } else {
        return 0;
    }
    return 1;
}

/* Attribute records of ``values`` (a dict) into recs[0..]: count, -2 fall back, -1 error.
 * With values NULL: of the keyword arguments ``kwnames`` = ``kwvalues`` of a call. */
static Py_ssize_t value_records(state_t *st, uint64_t owner, uint64_t role, int64_t t,
                                PyObject *values, PyObject *kwnames, PyObject *const *kwvalues,
                                record_t *recs, Py_ssize_t max) {
    Py_ssize_t pos = 0, i = 0, n = values ? PyDict_GET_SIZE(values) : PyTuple_GET_SIZE(kwnames);
    PyObject *key, *value;
    if (n > max) return -2;
    for (; i < n; i++) {
        if (values != NULL) {
            PyDict_Next(values, &pos, &key, &value);
        } else {
            key = PyTuple_GET_ITEM(kwnames, i);
            value = kwvalues[i];
        }
        int s = value_record(st, owner, role, t, key, value, &recs[i]);
        if (s <= 0) return s < 0 ? -1 : -2;
    }
    return n;
}

/* The attribute records of a dict of values (or, values NULL, of keyword arguments):
 * 1 written, 0 fall back, -1 error. */
static int values_core(PyObject *agent, PyObject *owner_obj, uint64_t role, PyObject *values,
                       PyObject *kwnames, PyObject *const *kwvalues) {
    if (values != NULL && !PyDict_CheckExact(values)) return 0;
    uint64_t owner = PyLong_AsUnsignedLongLong(owner_obj);
    if (owner == (uint64_t)-1 && PyErr_Occurred()) return -1;
    state_t *st = state_of(agent);
    if (st == NULL) return -1;
    long long off;
    int r = room(agent, st, values ? PyDict_GET_SIZE(values) : PyTuple_GET_SIZE(kwnames), &off);
    if (r <= 0) return r;
    record_t recs[MAX_RECORDS];
    Py_ssize_t n = value_records(st, owner, role, now_ns(), values, kwnames, kwvalues, recs,
                                 MAX_RECORDS);
    if (n == -1) return -1;
    if (n < 0) return 0;
    return commit(agent, st, off, recs, n) < 0 ? -1 : 1;
}

static PyObject *as_bool(int r) {
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

/* values(agent, owner, role, values) -> bool */
static PyObject *fast_values(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "values(agent, owner, role, values)");
        return NULL;
    }
    uint64_t role = PyLong_AsUnsignedLongLong(args[2]);
    if (role == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    return as_bool(values_core(args[0], args[1], role, args[3], NULL, NULL));
}

/* The start record and the parameter records of an activity.  1: written, and *aid
 * (its new id) and *parent (the current activity) are new references; 0 fall back
 * (nothing changed); -1 error. */
static int start_core(PyObject *agent, PyObject *name, PyObject *kind, PyObject *index_obj,
                      PyObject *params, PyObject *current, uint64_t role, PyObject **aid,
                      PyObject **parent) {
    record_t recs[MAX_RECORDS];
    long long index, off;
    uint64_t id, pid;
    Py_ssize_t n = 1;
    int r, overflow = 0;

    *aid = *parent = NULL;
    if (params != Py_None) {
        if (!PyDict_CheckExact(params)) return 0;
        n += PyDict_GET_SIZE(params);
    }
    if (n > MAX_RECORDS || !PyLong_CheckExact(index_obj)) return 0;
    index = PyLong_AsLongLongAndOverflow(index_obj, &overflow);
    if (overflow) return 0;
    if (index == -1 && PyErr_Occurred()) return -1;
    state_t *st = state_of(agent);
    if (st == NULL) return -1;
    if ((r = room(agent, st, n, &off)) <= 0) return r;
    if ((r = string_id(st->strings, name, &recs[0].name)) <= 0) return r;
    if ((r = string_id(st->strings, kind, &recs[0].sval)) <= 0) return r;
    int64_t t = now_ns();
    if (params != Py_None) {  /* the owner id is not known yet: filled in below */
        Py_ssize_t k = value_records(st, 0, role, t, params, NULL, NULL, recs + 1,
                                     MAX_RECORDS - 1);
        if (k == -1) return -1;
        if (k < 0) return 0;
    }
    /* from here on nothing falls back: take the id and write */
    if ((*aid = PyObject_CallNoArgs(st->next_id)) == NULL) return -1;
    id = PyLong_AsUnsignedLongLong(*aid);
    if (id == (uint64_t)-1 && PyErr_Occurred()) goto error;
    if (PyContextVar_Get(current, NULL, parent) < 0) goto error;
    if (*parent == NULL && (*parent = PyLong_FromLong(0)) == NULL) goto error;
    pid = PyLong_AsUnsignedLongLong(*parent);
    if (pid == (uint64_t)-1 && PyErr_Occurred()) goto error;
    recs[0].hdr = st->h_start; recs[0].id = id; recs[0].ref = pid; recs[0].t = t;
    recs[0].step = index; recs[0].ival = 0; recs[0].fval = 0.0;
    for (Py_ssize_t i = 1; i < n; i++) recs[i].id = id;
    if (commit(agent, st, off, recs, n) < 0) goto error;
    if (PyDict_SetItem(st->opened, *aid, Py_None) < 0) goto error;
    return 1;
error:
    Py_CLEAR(*aid);
    Py_CLEAR(*parent);
    return -1;
}

/* start(agent, activity, current, parameter_role) -> bool: the start record and the
 * parameters; sets activity.id and .parent, and agent.open_activities[id].  The
 * caller relates the inputs and then makes the activity current. */
static PyObject *fast_start(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "start(agent, activity, current, role)");
        return NULL;
    }
    uint64_t role = PyLong_AsUnsignedLongLong(args[3]);
    if (role == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    PyObject *act = args[1], *f[4] = {NULL, NULL, NULL, NULL}, *aid = NULL, *parent = NULL;
    PyObject *names[4] = {s_name, s_kind, s_index, s_params};
    int r = -1;
    for (int i = 0; i < 4; i++)
        if ((f[i] = PyObject_GetAttr(act, names[i])) == NULL) goto done;
    r = start_core(args[0], f[0], f[1], f[2], f[3], args[2], role, &aid, &parent);
    if (r == 1 && (PyObject_SetAttr(act, s_id, aid) < 0 ||
                   PyObject_SetAttr(act, s_parent, parent) < 0))
        r = -1;
done:
    for (int i = 0; i < 4; i++) Py_XDECREF(f[i]);
    Py_XDECREF(aid);
    Py_XDECREF(parent);
    return as_bool(r);
}

/* The successful end of a started activity (its id and context token): 1 written and
 * the token used, 0 fall back (nothing changed), -1 error. */
static int end_core(PyObject *agent, PyObject *id_obj, PyObject *token, PyObject *current) {
    long long off;
    int r;
    if (!PyContextToken_CheckExact(token)) return 0;
    uint64_t id = PyLong_AsUnsignedLongLong(id_obj);
    if (id == (uint64_t)-1 && PyErr_Occurred()) return -1;
    state_t *st = state_of(agent);
    if (st == NULL) return -1;
    if ((r = room(agent, st, 1, &off)) <= 0) return r;
    if (PyContextVar_Reset(current, token) < 0) {  /* another context: the Python path */
        PyErr_Clear();
        return 0;
    }
    if (PyDict_DelItem(st->opened, id_obj) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
        PyErr_Clear();
    }
    record_t rec = {st->h_end, id, 0, now_ns(), 0, 0, NO_STEP, STATUS_OK, 0.0};
    return commit(agent, st, off, &rec, 1) < 0 ? -1 : 1;
}

/* ---------------------------------------------------------------- ActivityBase
 * The base type of provhpc.capture.api.Activity: its fields, __init__, and the with-block
 * (__enter__, __exit__) and generated() of the common case, in C.  Everything
 * else -- and every case the cores above decline -- calls the Python methods
 * ``start``, ``end`` and ``_generated`` of the subclass.  ``bind`` gives it the
 * API module's globals (for ``_agent``) and the current-activity ContextVar. */
#define ROLE_ATTRIBUTE 0
#define ROLE_PARAMETER 1
#define ROLE_GENERATED 2

static PyObject *api_globals, *current_var, *s_agent, *s_fork_info, *s_start, *s_end, *s_generated_py,
    *s_error, *zero;

typedef struct {
    PyObject_HEAD
    PyObject *kind, *name, *index, *params, *inputs, *id, *parent, *token;
} Activity;

static int act_traverse(Activity *self, visitproc visit, void *arg) {
    Py_VISIT(self->kind); Py_VISIT(self->name); Py_VISIT(self->index);
    Py_VISIT(self->params); Py_VISIT(self->inputs); Py_VISIT(self->id);
    Py_VISIT(self->parent); Py_VISIT(self->token);
    return 0;
}

static int act_clear(Activity *self) {
    Py_CLEAR(self->kind); Py_CLEAR(self->name); Py_CLEAR(self->index);
    Py_CLEAR(self->params); Py_CLEAR(self->inputs); Py_CLEAR(self->id);
    Py_CLEAR(self->parent); Py_CLEAR(self->token);
    return 0;
}

static void act_dealloc(Activity *self) {
    PyObject_GC_UnTrack(self);
    act_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int act_init(Activity *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kind", "name", "index", "used", "params", NULL};
    PyObject *kind, *name, *index = NULL, *used = Py_None, *params = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOO", kwlist, &kind, &name, &index, &used,
                                     &params))
        return -1;
    if (index == NULL) {
        index = PyLong_FromLongLong(NO_STEP);
        if (index == NULL) return -1;
    } else {
        Py_INCREF(index);
    }
    Py_INCREF(kind); Py_INCREF(name); Py_INCREF(used); Py_INCREF(params);
    Py_INCREF(zero); Py_INCREF(zero); Py_INCREF(Py_None);
    Py_XSETREF(self->kind, kind); Py_XSETREF(self->name, name); Py_XSETREF(self->index, index);
    Py_XSETREF(self->inputs, used); Py_XSETREF(self->params, params);
    Py_XSETREF(self->id, zero); Py_XSETREF(self->parent, zero); Py_XSETREF(self->token, Py_None);
    return 0;
}

/* The API's agent (borrowed), or NULL without an error when there is none. */
static PyObject *api_agent(void) {
    if (api_globals == NULL) return NULL;
    PyObject *agent = PyDict_GetItemWithError(api_globals, s_agent);
    return agent == Py_None ? NULL : agent;
}

/* No agent and none to start lazily (a forked child's): capture is off. */
static int capture_off(void) {
    PyObject *info = PyDict_GetItemWithError(api_globals, s_fork_info);
    if (info == NULL) return PyErr_Occurred() ? -1 : 1;
    return info == Py_None;
}

/* Every key of ``values`` (a dict, or None) is a non-empty str: what api._check_keys
 * asks with capture off (1); 0: the Python path raises for it. */
static int keys_ok(PyObject *values) {
    if (values == Py_None) return 1;
    if (!PyDict_CheckExact(values)) return 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(values, &pos, &key, &value))
        if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) == 0) return 0;
    return 1;
}

static PyObject *act_enter(Activity *self, PyObject *unused) {
    PyObject *agent = api_agent();
    if (agent == NULL && PyErr_Occurred()) return NULL;
    if (agent == NULL && self->token == Py_None && self->id == zero && keys_ok(self->params) &&
        (self->inputs == Py_None || (PyList_CheckExact(self->inputs) &&
                                     PyList_GET_SIZE(self->inputs) == 0))) {
        /* capture off, nothing wrong with the parameters' names and no inputs to check
         * (start() checks both for misuse, as with capture on) */
        int off = capture_off();  /* then start() is a no-op that marks the activity */
        if (off < 0) return NULL;
        if (off) {
            Py_INCREF(Py_False);
            Py_XSETREF(self->token, Py_False);
            Py_INCREF(self);
            return (PyObject *)self;
        }
    }
    if (agent != NULL && self->token == Py_None && self->id == zero &&
        (self->inputs == Py_None || (PyList_CheckExact(self->inputs) &&
                                     PyList_GET_SIZE(self->inputs) == 0))) {
        PyObject *aid, *parent;
        int r = start_core(agent, self->name, self->kind, self->index, self->params, current_var,
                           ROLE_PARAMETER, &aid, &parent);
        if (r < 0) return NULL;
        if (r == 1) {
            Py_XSETREF(self->id, aid);
            Py_XSETREF(self->parent, parent);
            PyObject *token = PyContextVar_Set(current_var, self->id);
            if (token == NULL) return NULL;
            Py_XSETREF(self->token, token);
            Py_INCREF(self);
            return (PyObject *)self;
        }
    }
    return PyObject_CallMethodNoArgs((PyObject *)self, s_start);
}

static PyObject *act_exit(Activity *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *res;
    if (self->token == Py_False) {  /* started while capture was off: end() is a no-op */
        Py_INCREF(Py_None);
        Py_XSETREF(self->token, Py_None);
        Py_RETURN_FALSE;
    }
    if (nargs < 1 || args[0] == Py_None) {
        PyObject *agent = api_agent();
        if (agent == NULL && PyErr_Occurred()) return NULL;
        if (agent != NULL) {
            int r = end_core(agent, self->id, self->token, current_var);
            if (r < 0) return NULL;
            if (r == 1) {
                Py_INCREF(Py_None);
                Py_XSETREF(self->token, Py_None);
                Py_RETURN_FALSE;
            }
        }
        res = PyObject_CallMethodNoArgs((PyObject *)self, s_end);
    } else {
        res = PyObject_CallMethodObjArgs((PyObject *)self, s_end, s_error,
                                         nargs > 1 ? args[1] : Py_None, NULL);
    }
    if (res == NULL) return NULL;
    Py_DECREF(res);
    Py_RETURN_FALSE;
}

static PyObject *act_generated(Activity *self, PyObject *args, PyObject *kwargs) {
    if (self->id == zero && PyTuple_GET_SIZE(args) == 0 && (kwargs == NULL || keys_ok(kwargs))) {
        /* not started, or capture off, and no entities: nothing to relate, and the values'
         * names are fine (otherwise _generated checks for misuse, as with capture on) */
        Py_INCREF(self);
        return (PyObject *)self;
    }
    if (PyTuple_GET_SIZE(args) == 0 && kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
        PyObject *agent = api_agent();
        if (agent == NULL && PyErr_Occurred()) return NULL;
        if (agent != NULL) {
            int r = values_core(agent, self->id, ROLE_GENERATED, kwargs, NULL, NULL);
            if (r < 0) return NULL;
            if (r == 1) { Py_INCREF(self); return (PyObject *)self; }
        }
    }
    PyObject *method = PyObject_GetAttr((PyObject *)self, s_generated_py);
    if (method == NULL) return NULL;
    PyObject *res = PyObject_Call(method, args, kwargs);
    Py_DECREF(method);
    return res;
}

/* generated(**values) of a started activity, from the call's own keyword arguments (no
 * dict); every other case through act_generated. */
static PyObject *act_generated_fast(Activity *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 0 && kwnames != NULL && self->id != zero) {
        int names_ok = 1;  /* an empty name (``**{"": 1}``): the Python path says so */
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++)
            if (PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(kwnames, i)) == 0) names_ok = 0;
        PyObject *agent = names_ok ? api_agent() : NULL;
        if (agent == NULL && PyErr_Occurred()) return NULL;
        if (agent != NULL) {
            int r = values_core(agent, self->id, ROLE_GENERATED, NULL, kwnames, args);
            if (r < 0) return NULL;
            if (r == 1) { Py_INCREF(self); return (PyObject *)self; }
        }
    }
    PyObject *tuple = PyTuple_New(nargs), *kwargs = NULL, *res = NULL;
    if (tuple == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(tuple, i, args[i]);
    }
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        if ((kwargs = PyDict_New()) == NULL) goto done;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++)
            if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
                goto done;
    }
    res = act_generated(self, tuple, kwargs);
done:
    Py_DECREF(tuple);
    Py_XDECREF(kwargs);
    return res;
}

static PyObject *act_metric(Activity *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames);

static PyMethodDef act_methods[] = {
    {"__enter__", (PyCFunction)act_enter, METH_NOARGS, "start(); returns the activity"},
    {"__exit__", (PyCFunction)(void (*)(void))act_exit, METH_FASTCALL,
     "end(), or end('error', exc) when the block raised; never swallows the exception"},
    {"generated", (PyCFunction)(void (*)(void))act_generated_fast, METH_FASTCALL | METH_KEYWORDS,
     "generated(*entities, **values): what the activity produced"},
    {"metric", (PyCFunction)(void (*)(void))act_metric, METH_FASTCALL | METH_KEYWORDS,
     "metric(name, value, step=None)\n--\n\n"
     "A metric point of this activity (the rules of ``provhpc.metric``)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef act_members[] = {
    {"kind", T_OBJECT, offsetof(Activity, kind), 0, NULL},
    {"name", T_OBJECT, offsetof(Activity, name), 0, NULL},
    {"index", T_OBJECT, offsetof(Activity, index), 0, NULL},
    {"params", T_OBJECT, offsetof(Activity, params), 0, NULL},
    {"inputs", T_OBJECT, offsetof(Activity, inputs), 0, NULL},
    {"id", T_OBJECT, offsetof(Activity, id), 0, NULL},
    {"parent", T_OBJECT, offsetof(Activity, parent), 0, NULL},
    {"_token", T_OBJECT, offsetof(Activity, token), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ActivityType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "provhpc.capture._fast.ActivityBase",
    .tp_basicsize = sizeof(Activity),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of provhpc.capture.api.Activity (fields, with-block, generated).",
    .tp_traverse = (traverseproc)act_traverse,
    .tp_clear = (inquiry)act_clear,
    .tp_dealloc = (destructor)act_dealloc,
    .tp_init = (initproc)act_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = act_methods,
    .tp_members = act_members,
};

/* ---------------------------------------------------------------- Factory
 * ``provhpc.task``: ``task("name", used=[...], **params)`` builds the activity here;
 * every other call (a bare ``@task``, a name by keyword, bad arguments) goes to the
 * Python factory given at creation, which also raises the errors. */
typedef struct {
    PyObject_HEAD
    PyObject *cls, *kind, *slow, *doc;
    vectorcallfunc vectorcall;
    char by_index;  /* epoch(i): the argument is the index, the name is the kind */
} Factory;

static PyObject *no_step;  /* NO_STEP as an int object */
static PyObject *s_used, *s_name_kw, *s_i_kw;

/* Is keyword name ``key`` the interned string ``name``?  An interned key is that very
 * object or another string; only a key built at run time (``**kwargs``) is compared. */
static int same_str(PyObject *key, PyObject *name) {
    if (key == name) return 1;
    if (PyUnicode_CheckExact(key) && PyUnicode_CHECK_INTERNED(key)) return 0;
    return PyUnicode_Compare(key, name) == 0;
}

static PyObject *factory_vectorcall(Factory *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *name = args[0], *index = no_step;
    if (nargs != 1)
        return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    if (self->by_index) {  /* epoch(i): an int within int64, NO_STEP excluded */
        if (!PyLong_CheckExact(args[0]))
            return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(args[0], &overflow);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (overflow || v == NO_STEP)
            return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
        name = self->kind;
        index = args[0];
    } else if (!PyUnicode_CheckExact(args[0]) || PyUnicode_GET_LENGTH(args[0]) == 0) {
        return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    }
    PyObject *used = Py_None, *params = Py_None;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (same_str(key, s_name_kw) || same_str(key, s_kind) ||
            same_str(key, s_i_kw)) {  /* the first argument twice: Python says so */
            if (params != Py_None) Py_DECREF(params);
            return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
        }
        if (same_str(key, s_used)) {
            used = args[nargs + i];
            continue;
        }
        if (params == Py_None && (params = PyDict_New()) == NULL) return NULL;
        if (PyDict_SetItem(params, key, args[nargs + i]) < 0) {
            Py_DECREF(params);
            return NULL;
        }
    }
    PyTypeObject *tp = (PyTypeObject *)self->cls;
    Activity *act = (Activity *)tp->tp_alloc(tp, 0);
    if (act == NULL) {
        if (params != Py_None) Py_DECREF(params);
        return NULL;
    }
    Py_INCREF(self->kind); Py_INCREF(name); Py_INCREF(index); Py_INCREF(used);
    if (params == Py_None) Py_INCREF(params);
    Py_INCREF(zero); Py_INCREF(zero); Py_INCREF(Py_None);
    act->kind = self->kind; act->name = name; act->index = index; act->inputs = used;
    act->params = params; act->id = zero; act->parent = zero; act->token = Py_None;
    return (PyObject *)act;
}

static PyObject *factory_call(Factory *self, PyObject *args, PyObject *kwargs) {
    return PyObject_Call(self->slow, args, kwargs);
}

static int factory_traverse(Factory *self, visitproc visit, void *arg) {
    Py_VISIT(self->cls); Py_VISIT(self->kind); Py_VISIT(self->slow); Py_VISIT(self->doc);
    return 0;
}

static int factory_clear(Factory *self) {
    Py_CLEAR(self->cls); Py_CLEAR(self->kind); Py_CLEAR(self->slow); Py_CLEAR(self->doc);
    return 0;
}

static void factory_dealloc(Factory *self) {
    PyObject_GC_UnTrack(self);
    factory_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *factory_get_doc(Factory *self, void *closure) {
    Py_INCREF(self->doc);
    return self->doc;
}

static PyObject *factory_get_wrapped(Factory *self, void *closure) {
    Py_INCREF(self->slow);
    return self->slow;
}

static PyObject *factory_repr(Factory *self) {
    return PyUnicode_FromFormat("<provhpc %U factory>", self->kind);
}

static PyGetSetDef factory_getset[] = {
    {"__doc__", (getter)factory_get_doc, NULL, NULL, NULL},
    {"__wrapped__", (getter)factory_get_wrapped, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FactoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "provhpc.capture._fast.Factory",
    .tp_basicsize = sizeof(Factory),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Factory, vectorcall),
    .tp_call = (ternaryfunc)factory_call,
    .tp_traverse = (traverseproc)factory_traverse,
    .tp_clear = (inquiry)factory_clear,
    .tp_dealloc = (destructor)factory_dealloc,
    .tp_getset = factory_getset,
    .tp_repr = (reprfunc)factory_repr,
};

/* factory(cls, kind, slow, doc): ``cls`` must be a subclass of ActivityBase. */
static PyObject *fast_factory(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 4 && nargs != 5) || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &ActivityType) ||
        !PyUnicode_CheckExact(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "factory(cls, kind, slow, doc, by_index=False)");
        return NULL;
    }
    int by_index = nargs == 5 ? PyObject_IsTrue(args[4]) : 0;
    if (by_index < 0) return NULL;
    Factory *f = PyObject_GC_New(Factory, &FactoryType);
    if (f == NULL) return NULL;
    for (int i = 0; i < 4; i++) Py_INCREF(args[i]);
    f->cls = args[0]; f->kind = args[1]; f->slow = args[2]; f->doc = args[3];
    f->by_index = (char)by_index;
    f->vectorcall = (vectorcallfunc)factory_vectorcall;
    PyObject_GC_Track(f);
    return (PyObject *)f;
}

/* ---------------------------------------------------------------- Decorated
 * What ``@task`` / ``@stage`` / ``@epoch`` return: calls ``fn`` inside a fresh
 * activity, its arguments as parameters and its return value as generated values,
 * like the Python wrapper in provhpc.capture.api._decorate (which it replaces when built).
 * A dict result with str keys is written here; any other result goes through
 * api._record_return.  Has a __dict__ (functools.update_wrapper fills it) and binds
 * as a method like a function. */
typedef struct {
    PyObject_HEAD
    PyObject *fn, *cls, *kind, *name, *index, *inputs, *argnames, *dict;
    char record_args, count_index;
    long long counter;
    vectorcallfunc vectorcall;
} Decorated;

static PyObject *s_self, *s_cls, *s_record_return, *empty_tuple;

static PyObject *call_fn(Decorated *self, PyObject *const *args, size_t nargsf,
                         PyObject *kwnames) {
    return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
}

/* The block raised: end the activity as an error, keep the exception. */
static void end_with_error(Activity *act) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    PyObject *args[3] = {type, value ? value : Py_None, tb ? tb : Py_None};
    PyObject *res = act_exit(act, args, 3);
    if (res == NULL) {  /* ending failed: that error wins, chained like a with-block */
        Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
        return;
    }
    Py_DECREF(res);
    PyErr_Restore(type, value, tb);
}

static PyObject *decorated_vectorcall(Decorated *self, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *agent = api_agent();
    if (agent == NULL) {
        if (PyErr_Occurred()) return NULL;
        int off = capture_off();
        if (off < 0) return NULL;
        if (off) return call_fn(self, args, nargsf, kwnames);
    }
    PyObject *params = Py_None, *index;
    if (self->record_args) {
        if ((params = PyDict_New()) == NULL) return NULL;
        Py_ssize_t m = PyTuple_GET_SIZE(self->argnames);
        for (Py_ssize_t i = 0; i < nargs && i < m; i++) {
            PyObject *key = PyTuple_GET_ITEM(self->argnames, i);
            if (same_str(key, s_self) || same_str(key, s_cls))
                continue;
            if (PyDict_SetItem(params, key, args[i]) < 0) { Py_DECREF(params); return NULL; }
        }
        for (Py_ssize_t i = 0; i < nkw; i++)
            if (PyDict_SetItem(params, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                Py_DECREF(params);
                return NULL;
            }
    } else {
        Py_INCREF(params);
    }
    if (self->count_index) {
        if ((index = PyLong_FromLongLong(self->counter++)) == NULL) { Py_DECREF(params); return NULL; }
    } else {
        index = self->index;
        Py_INCREF(index);
    }
    PyTypeObject *tp = (PyTypeObject *)self->cls;
    Activity *act = (Activity *)tp->tp_alloc(tp, 0);
    if (act == NULL) { Py_DECREF(params); Py_DECREF(index); return NULL; }
    Py_INCREF(self->kind); Py_INCREF(self->name); Py_INCREF(self->inputs);
    Py_INCREF(zero); Py_INCREF(zero); Py_INCREF(Py_None);
    act->kind = self->kind; act->name = self->name; act->index = index;
    act->inputs = self->inputs; act->params = params; act->id = zero; act->parent = zero;
    act->token = Py_None;
    PyObject *entered = act_enter(act, NULL), *result = NULL;
    if (entered == NULL) goto done;
    Py_DECREF(entered);
    result = call_fn(self, args, nargsf, kwnames);
    if (result == NULL) { end_with_error(act); goto done; }
    if (result != Py_None && act->id != zero) {  /* what it returned: generated values */
        PyObject *rec;
        if (PyDict_CheckExact(result)) {
            Py_ssize_t pos = 0;
            PyObject *key, *value;
            int all_str = 1;
            while (PyDict_Next(result, &pos, &key, &value))
                if (!PyUnicode_Check(key)) { all_str = 0; break; }
            rec = all_str ? act_generated(act, empty_tuple, result) : (Py_INCREF(Py_None), Py_None);
        } else {
            PyObject *fn = PyDict_GetItemWithError(api_globals, s_record_return);
            rec = fn == NULL ? NULL : PyObject_CallFunctionObjArgs(fn, (PyObject *)act, result, NULL);
            if (fn == NULL && !PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "provhpc.capture._fast: no api._record_return");
        }
        if (rec == NULL) { Py_CLEAR(result); end_with_error(act); goto done; }
        Py_DECREF(rec);
    }
    PyObject *none3[3] = {Py_None, Py_None, Py_None};
    PyObject *res = act_exit(act, none3, 3);
    if (res == NULL) { Py_CLEAR(result); goto done; }
    Py_DECREF(res);
done:
    Py_DECREF(act);
    return result;
}

static PyObject *decorated_call(Decorated *self, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call((PyObject *)self, args, kwargs);
}

static PyObject *decorated_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) { Py_INCREF(self); return self; }
    return PyMethod_New(self, obj);  /* a method, like a plain function */
}

static int decorated_traverse(Decorated *self, visitproc visit, void *arg) {
    Py_VISIT(self->fn); Py_VISIT(self->cls); Py_VISIT(self->kind); Py_VISIT(self->name);
    Py_VISIT(self->index); Py_VISIT(self->inputs); Py_VISIT(self->argnames);
    Py_VISIT(self->dict);
    return 0;
}

static int decorated_clear(Decorated *self) {
    Py_CLEAR(self->fn); Py_CLEAR(self->cls); Py_CLEAR(self->kind); Py_CLEAR(self->name);
    Py_CLEAR(self->index); Py_CLEAR(self->inputs); Py_CLEAR(self->argnames);
    Py_CLEAR(self->dict);
    return 0;
}

static void decorated_dealloc(Decorated *self) {
    PyObject_GC_UnTrack(self);
    decorated_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *decorated_repr(Decorated *self) {
    return PyUnicode_FromFormat("<provhpc %U %R>", self->kind, self->fn);
}

/* pickled by reference, like the function it wraps (module + qualified name) */
static PyObject *decorated_reduce(PyObject *self, PyObject *unused) {
    return PyObject_GetAttrString(self, "__qualname__");
}

static PyMethodDef decorated_methods[] = {
    {"__reduce__", (PyCFunction)decorated_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef decorated_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoratedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "provhpc.capture._fast.Decorated",
    .tp_basicsize = sizeof(Decorated),
    .tp_dictoffset = offsetof(Decorated, dict),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(Decorated, vectorcall),
    .tp_call = (ternaryfunc)decorated_call,
    .tp_descr_get = decorated_get,
    .tp_traverse = (traverseproc)decorated_traverse,
    .tp_clear = (inquiry)decorated_clear,
    .tp_dealloc = (destructor)decorated_dealloc,
    .tp_repr = (reprfunc)decorated_repr,
    .tp_methods = decorated_methods,
    .tp_getset = decorated_getset,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
};

/* decorate(fn, cls, kind, name, index, inputs, argnames, record_args, count_index) */
static PyObject *fast_decorate(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &ActivityType) || !PyTuple_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "decorate(fn, cls, kind, name, index, inputs, "
                        "argnames, record_args, count_index)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[6]); i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(args[6], i))) {
            PyErr_SetString(PyExc_TypeError, "decorate: argnames must be str");
            return NULL;
        }
    Decorated *d = PyObject_GC_New(Decorated, &DecoratedType);
    if (d == NULL) return NULL;
    for (int i = 0; i < 7; i++) Py_INCREF(args[i]);
    d->fn = args[0]; d->cls = args[1]; d->kind = args[2]; d->name = args[3];
    d->index = args[4]; d->inputs = args[5]; d->argnames = args[6]; d->dict = NULL;
    d->record_args = (char)PyObject_IsTrue(args[7]);
    d->count_index = (char)PyObject_IsTrue(args[8]);
    d->counter = 0;
    d->vectorcall = (vectorcallfunc)decorated_vectorcall;
    PyObject_GC_Track(d);
    return (PyObject *)d;
}

/* metric(name, value, step=None): the common case in C -- capture on, the owner thread,
 * a float value, no step or an int step within int64 (not NO_STEP), an interned name, room
 * in the slot -- writes the one METRIC record the Python path writes (api.metric: header
 * h_metric, id the current activity, t time.time_ns(), the name's id, step, fval).
 * Everything else (capture off, a value or step to coerce or to count as bad, a name not
 * interned yet, keywords, another thread, a full slot) is api._metric_py's. */

/* The id of the current activity (0 outside any) into *out: 0, or -1 on error. */
static int current_id(uint64_t *out) {
    PyObject *cur = NULL;
    if (PyContextVar_Get(current_var, NULL, &cur) < 0) return -1;
    *out = cur == NULL ? 0 : PyLong_AsUnsignedLongLong(cur);
    Py_XDECREF(cur);
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

/* The step of metric(name, value[, step]) or metric(name, value, step=...): 1 and
 * *step_obj set (NULL: none given), 0 another call shape (the Python path's). */
static int metric_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       PyObject **step_obj) {
    *step_obj = NULL;
    if (kwnames == NULL) {
        if (nargs < 2 || nargs > 3) return 0;
        if (nargs == 3) *step_obj = args[2];
        return 1;
    }
    if (nargs != 2 || PyTuple_GET_SIZE(kwnames) != 1) return 0;
    PyObject *kw = PyTuple_GET_ITEM(kwnames, 0);
    if (kw != s_step_kw && PyUnicode_Compare(kw, s_step_kw) != 0) return 0;
    *step_obj = args[2];
    return 1;
}

/* The METRIC record of (name, value, step) owned by ``owner`` (NULL: the current
 * activity): 1 written, 0 fall back (nothing changed), -1 error. */
static int metric_core(PyObject *agent, PyObject *owner, PyObject *name, PyObject *value,
                       PyObject *step_obj) {
    int64_t step = NO_STEP;
    if (!PyFloat_CheckExact(value)) return 0;
    if (step_obj != NULL && step_obj != Py_None) {
        if (!PyLong_CheckExact(step_obj)) return 0;
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(step_obj, &overflow);
        if (overflow || v == NO_STEP) return 0;
        if (v == -1 && PyErr_Occurred()) return -1;
        step = v;
    }
    state_t *st = state_of(agent);
    if (st == NULL) return -1;
    long long off;
    uint32_t nid;
    int r;
    if ((r = room(agent, st, 1, &off)) <= 0) return r;
    if ((r = string_id(st->strings, name, &nid)) <= 0) return r;
    uint64_t act;
    if (owner == NULL) {
        if (current_id(&act) < 0) return -1;
    } else if ((act = PyLong_AsUnsignedLongLong(owner)) == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    record_t rec = {st->h_metric, act, 0, now_ns(), nid, 0, step, 0, PyFloat_AS_DOUBLE(value)};
    return commit(agent, st, off, &rec, 1) < 0 ? -1 : 1;
}

/* The API function ``name`` of the Python path (borrowed). */
static PyObject *python_path(PyObject *name) {
    PyObject *py = api_globals ? PyDict_GetItemWithError(api_globals, name) : NULL;
    if (py == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_RuntimeError, "provhpc.capture._fast: api.%U unset", name);
    return py;
}

static PyObject *fast_metric(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    PyObject *agent, *step_obj;
    if (api_globals != NULL && metric_args(args, nargs, kwnames, &step_obj)) {
        if ((agent = api_agent()) != NULL) {
            int r = metric_core(agent, NULL, args[0], args[1], step_obj);
            if (r < 0) return NULL;
            if (r == 1) Py_RETURN_NONE;
        } else if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *py = python_path(s_metric_py);
    return py == NULL ? NULL : PyObject_Vectorcall(py, args, (size_t)nargs, kwnames);
}

/* Activity.metric(name, value, step=None): as metric(), owned by this activity; the
 * Python path is the subclass's ``_metric``. */
static PyObject *act_metric(Activity *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    PyObject *agent, *step_obj;
    if (self->id != zero && metric_args(args, nargs, kwnames, &step_obj)) {
        if ((agent = api_agent()) != NULL) {
            int r = metric_core(agent, self->id, args[0], args[1], step_obj);
            if (r < 0) return NULL;
            if (r == 1) {
                Py_INCREF(self);
                return (PyObject *)self;
            }
        } else if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *method = PyObject_GetAttr((PyObject *)self, s_metric_act_py);
    if (method == NULL) return NULL;
    PyObject *res = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
    Py_DECREF(method);
    return res;
}

/* attribute(name, value): one plain value (float, int within int64, bool, interned str)
 * of the current activity, as api._attribute_py writes it; the rest is Python's. */
/* The ATTRIBUTE record of (name, value) of the current activity: 1 written, 0 fall back
 * (nothing changed), -1 error. */
static int attribute_core(PyObject *agent, PyObject *name, PyObject *value) {
    state_t *st = state_of(agent);
    if (st == NULL) return -1;
    long long off;
    uint64_t act;
    record_t rec;
    int r;
    if ((r = room(agent, st, 1, &off)) <= 0) return r;
    if (current_id(&act) < 0) return -1;
    if ((r = value_record(st, act, ROLE_ATTRIBUTE, now_ns(), name, value, &rec)) <= 0) return r;
    return commit(agent, st, off, &rec, 1) < 0 ? -1 : 1;
}

static PyObject *fast_attribute(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    if (api_globals != NULL && kwnames == NULL && nargs == 2) {
        PyObject *agent = api_agent();
        int r;
        if (agent != NULL)
            r = attribute_core(agent, args[0], args[1]);
        else if (PyErr_Occurred())
            return NULL;
        else  /* capture off: a well-named attribute is nothing to do */
            r = PyUnicode_CheckExact(args[0]) && PyUnicode_GET_LENGTH(args[0]) > 0
                    ? capture_off() : 0;
        if (r < 0) return NULL;
        if (r == 1) Py_RETURN_NONE;
    }
    PyObject *py = python_path(s_attribute_py);
    return py == NULL ? NULL : PyObject_Vectorcall(py, args, (size_t)nargs, kwnames);
}

/* relate(agent, subject, relation, obj) -> bool: the one RELATION record of api._relate
 * (id subject, ref obj, name the relation) when the relation is interned and there is
 * room; False changes nothing. */
static PyObject *fast_relate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "relate(agent, subject, relation, obj)");
        return NULL;
    }
    uint64_t subject = PyLong_AsUnsignedLongLong(args[1]);
    if (subject == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    uint64_t obj = PyLong_AsUnsignedLongLong(args[3]);
    if (obj == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    state_t *st = state_of(args[0]);
    if (st == NULL) return NULL;
    long long off;
    uint32_t rid;
    int r;
    if ((r = room(args[0], st, 1, &off)) <= 0) return as_bool(r);
    if ((r = string_id(st->strings, args[2], &rid)) <= 0) return as_bool(r);
    record_t rec = {st->h_relation, subject, obj, now_ns(), rid, 0, NO_STEP, 0, 0.0};
    return as_bool(commit(args[0], st, off, &rec, 1) < 0 ? -1 : 1);
}

/* data(path_or_id, *, kind="data"): the common case in C -- a str identity and kind, no
 * other keyword -- writes what api._data_py writes: the ENTITY record (id a new entity id,
 * ref the current activity, name the identity, sval the kind) and, for a path (a "/" or
 * "." in it, kind not "domain") that stat() finds, the attributes size and mtime_ns; and
 * returns the api.Entity, its fp (size, mtime_ns) set.  stat() runs without the GIL, as
 * os.stat does (a slow parallel file system stalls no other thread).  With capture off
 * it returns the Entity of id 0.  Everything else (an identity or kind not interned yet
 * or not a str, derived_from, hash, attributes, another thread, a full slot, a path that
 * does not encode) is api._data_py's. */
static PyObject *new_entity(PyObject *key, PyObject *kind, PyObject *eid, PyObject *fp) {
    PyObject *cls = PyDict_GetItemWithError(api_globals, s_entity_cls);  /* borrowed */
    if (cls == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "provhpc.capture._fast: api.Entity unset");
        return NULL;
    }
    PyObject *argv[3] = {key, kind, eid};
    PyObject *ent = PyObject_Vectorcall(cls, argv, 3, NULL);
    if (ent != NULL && fp != NULL && PyObject_SetAttr(ent, s_fp, fp) < 0) Py_CLEAR(ent);
    return ent;
}

static int has_path_char(PyObject *key) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(key);
    Py_ssize_t a = PyUnicode_FindChar(key, '/', 0, n, 1);
    if (a == -2) return -1;
    if (a >= 0) return 1;
    Py_ssize_t b = PyUnicode_FindChar(key, '.', 0, n, 1);
    return b == -2 ? -1 : b >= 0;
}

static PyObject *fast_data(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    PyObject *agent, *key, *kind = s_data_kind, *eid = NULL, *fp = NULL, *ent;
    if (api_globals == NULL || nargs != 1) goto slow;
    if (kwnames != NULL) {  /* data(key, kind=...): the one keyword the fast path reads */
        if (PyTuple_GET_SIZE(kwnames) != 1) goto slow;
        PyObject *kw = PyTuple_GET_ITEM(kwnames, 0);
        if (kw != s_kind && PyUnicode_Compare(kw, s_kind) != 0) goto slow;
        kind = args[1];
    }
    key = args[0];
    if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) == 0 ||
        !PyUnicode_CheckExact(kind) || PyUnicode_GET_LENGTH(kind) == 0)
        goto slow;  /* a PathLike, or misuse: the Python path raises */
    if ((agent = api_agent()) == NULL) {
        if (PyErr_Occurred()) return NULL;
        int off = capture_off();
        if (off < 0) return NULL;
        if (!off) goto slow;  /* a forked child's agent starts lazily: Python */
        return new_entity(key, kind, zero, NULL);
    }
    int path = 0;
    if (PyUnicode_Compare(kind, s_domain) != 0 && (path = has_path_char(key)) < 0) return NULL;
    struct stat sb;
    int found = 0;
    if (path) {
        PyObject *b = PyUnicode_EncodeFSDefault(key);
        if (b == NULL) {
            PyErr_Clear();
            goto slow;
        }
        if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
            Py_DECREF(b);  /* an embedded NUL */
            goto slow;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = stat(PyBytes_AS_STRING(b), &sb);
        Py_END_ALLOW_THREADS
        Py_DECREF(b);
        found = rc == 0;
        if (api_agent() != agent) goto slow;  /* capture ended meanwhile (another thread) */
    }
    state_t *st = state_of(agent);
    if (st == NULL) return NULL;
    Py_ssize_t n = found ? 3 : 1;
    record_t recs[3];
    long long off;
    int r;
    if ((r = room(agent, st, n, &off)) < 0) return NULL;
    if (r == 0) goto slow;
    if ((r = string_id(st->strings, key, &recs[0].name)) < 0) return NULL;
    if (r == 0) goto slow;
    if ((r = string_id(st->strings, kind, &recs[0].sval)) < 0) return NULL;
    if (r == 0) goto slow;
    if (found) {
        if ((r = string_id(st->strings, s_size, &recs[1].name)) < 0) return NULL;
        if (r == 0) goto slow;
        if ((r = string_id(st->strings, s_mtime_ns, &recs[2].name)) < 0) return NULL;
        if (r == 0) goto slow;
    }
    /* from here on nothing falls back: take the id and write */
    if ((eid = PyObject_CallNoArgs(st->next_id)) == NULL) return NULL;
    uint64_t id = PyLong_AsUnsignedLongLong(eid);
    if (id == (uint64_t)-1 && PyErr_Occurred()) goto error;
    uint64_t act;
    if (current_id(&act) < 0) goto error;
    int64_t t = now_ns();
    recs[0].hdr = st->h_entity; recs[0].id = id; recs[0].ref = act; recs[0].t = t;
    recs[0].step = NO_STEP; recs[0].ival = 0; recs[0].fval = 0.0;
    if (found) {
        long long mtime = (long long)sb.st_mtim.tv_sec * 1000000000LL + sb.st_mtim.tv_nsec;
        for (int i = 1; i < 3; i++) {
            recs[i].hdr = st->h_attr[1]; recs[i].id = id; recs[i].ref = ROLE_ATTRIBUTE;
            recs[i].t = t; recs[i].sval = 0; recs[i].step = NO_STEP; recs[i].fval = 0.0;
        }
        recs[1].ival = (int64_t)sb.st_size;
        recs[2].ival = mtime;
        if ((fp = Py_BuildValue("(LL)", (long long)sb.st_size, mtime)) == NULL) goto error;
    }
    if (commit(agent, st, off, recs, n) < 0) goto error;
    ent = new_entity(key, kind, eid, fp);
    Py_DECREF(eid);
    Py_XDECREF(fp);
    return ent;
error:
    Py_XDECREF(eid);
    Py_XDECREF(fp);
    return NULL;
slow:;
    PyObject *py = python_path(s_data_py);
    return py == NULL ? NULL : PyObject_Vectorcall(py, args, (size_t)nargs, kwnames);
}

static PyObject *fast_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind(api_globals, current)");
        return NULL;
    }
    Py_INCREF(args[0]); Py_INCREF(args[1]);
    Py_XSETREF(api_globals, args[0]);
    Py_XSETREF(current_var, args[1]);
    Py_RETURN_NONE;
}

/* forget(agent): drop what is held of the agent (its segment's and cursor's buffers), so
 * that its memory map can close; the next call for it reads it again. */
static PyObject *fast_forget(PyObject *self, PyObject *agent) {
    if (cached.agent == agent) state_clear(&cached);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forget", (PyCFunction)fast_forget, METH_O,
     "forget(agent): release the agent's segment before it closes"},
    {"start", (PyCFunction)(void (*)(void))fast_start, METH_FASTCALL,
     "start(agent, activity, current, role) -> bool"},
    {"values", (PyCFunction)(void (*)(void))fast_values, METH_FASTCALL,
     "values(agent, owner, role, values) -> bool"},
    {"decorate", (PyCFunction)(void (*)(void))fast_decorate, METH_FASTCALL,
     "decorate(fn, cls, kind, name, index, inputs, argnames, record_args, count_index)"},
    {"factory", (PyCFunction)(void (*)(void))fast_factory, METH_FASTCALL,
     "factory(cls, kind, slow, doc, by_index=False): a fast callable for cls(kind, name, "
     "...), or with by_index for cls(kind, kind, i, ...)"},
    {"metric", (PyCFunction)(void (*)(void))fast_metric, METH_FASTCALL | METH_KEYWORDS,
     "metric(name, value, step=None)\n--\n\n"
     "One point of a metric series, attached to the current activity.\n\n"
     "A value that is not a number or a step that is not an integer is data, not misuse: the\n"
     "point is dropped and counted as ``bad_value`` (docs/format.md, \"Values\"), never raised.\n"
     "(The common case is written in C, provhpc/capture/_fast.c; the rest in Python.)"},
    {"attribute", (PyCFunction)(void (*)(void))fast_attribute, METH_FASTCALL | METH_KEYWORDS,
     "attribute(name, value)\n--\n\nA typed attribute of the current activity.\n"
     "(The common case is written in C, provhpc/capture/_fast.c; the rest in Python.)"},
    {"relate", (PyCFunction)(void (*)(void))fast_relate, METH_FASTCALL,
     "relate(agent, subject, relation, obj) -> bool: one RELATION record, or False"},
    {"data", (PyCFunction)(void (*)(void))fast_data, METH_FASTCALL | METH_KEYWORDS,
     "data(path_or_id, *, kind='data', derived_from=(), hash=False, **attributes)\n--\n\n"
     "A data entity (file, shard, model, checkpoint, domain object).\n\n"
     "``path_or_id`` is its identity across ranks and runs.  For an existing file its\n"
     "size and modification time are recorded (one ``stat``): the same path with the same\n"
     "size and mtime is one entity across ranks and runs; with ``hash=True`` its content\n"
     "hash is recorded too (attribute ``hash``), and entities link by content.\n"
     "(The common case is written in C, provhpc/capture/_fast.c; the rest in Python.)"},
    {"bind", (PyCFunction)(void (*)(void))fast_bind, METH_FASTCALL,
     "bind(api_globals, current): where ActivityBase finds the agent and the current activity"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fast",
                                    "The owner thread's hot path of provhpc.capture.api, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fast(void) {
#ifdef Py_GIL_DISABLED
    /* everything here relies on the GIL (one writer at a time, the per-agent cache) */
    PyErr_SetString(PyExc_ImportError, "provhpc.capture._fast needs the GIL: the Python path runs");
    return NULL;
#endif
    const uint16_t one = 1;
    if (*(const uint8_t *)&one != 1) {  /* the records are little-endian */
        PyErr_SetString(PyExc_ImportError, "provhpc.capture._fast needs a little-endian machine");
        return NULL;
    }
    if (sizeof(record_t) != 64) {
        PyErr_SetString(PyExc_ImportError, "provhpc.capture._fast: record is not 64 bytes");
        return NULL;
    }
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_owner, "owner"); INTERN(s_cursor, "cursor");
    INTERN(s_mm, "mm"); INTERN(s_strings, "strings"); INTERN(s_h_attr, "h_attr");
    INTERN(s_h_start, "h_start"); INTERN(s_h_end, "h_end"); INTERN(s_next_id, "next_id");
    INTERN(s_open_activities, "open_activities"); INTERN(s_name, "name");
    INTERN(s_kind, "kind"); INTERN(s_index, "index"); INTERN(s_params, "params");
    INTERN(s_id, "id"); INTERN(s_parent, "parent"); INTERN(s_h_metric, "h_metric");
    INTERN(s_metric_py, "_metric_py"); INTERN(s_step_kw, "step");
    INTERN(s_h_entity, "h_entity"); INTERN(s_data_py, "_data_py"); INTERN(s_entity_cls, "Entity");
    INTERN(s_data_kind, "data"); INTERN(s_domain, "domain"); INTERN(s_size, "size");
    INTERN(s_mtime_ns, "mtime_ns"); INTERN(s_fp, "fp"); INTERN(s_h_relation, "h_relation");
    INTERN(s_attribute_py, "_attribute_py"); INTERN(s_metric_act_py, "_metric");
    INTERN(s_busy, "busy");
    INTERN(s_agent, "_agent"); INTERN(s_fork_info, "_fork_info"); INTERN(s_start, "start"); INTERN(s_end, "end");
    INTERN(s_generated_py, "_generated"); INTERN(s_error, "error");
    if ((zero = PyLong_FromLong(0)) == NULL) return NULL;
    INTERN(s_used, "used"); INTERN(s_name_kw, "name"); INTERN(s_i_kw, "i");
    INTERN(s_self, "self"); INTERN(s_cls, "cls"); INTERN(s_record_return, "_record_return");
#undef INTERN
    if ((empty_tuple = PyTuple_New(0)) == NULL) return NULL;
    if ((no_step = PyLong_FromLongLong(NO_STEP)) == NULL) return NULL;
    if (PyType_Ready(&ActivityType) < 0 || PyType_Ready(&FactoryType) < 0 ||
        PyType_Ready(&DecoratedType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ActivityType);
    if (PyModule_AddObject(m, "ActivityBase", (PyObject *)&ActivityType) < 0) {
        Py_DECREF(&ActivityType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
