/* The group-commit writer's append transaction, run without the interpreter lock.
 *
 * Why: the writer thread shares the GIL with the event loop. Through Python's sqlite3 module every
 * statement gives the GIL up and takes it back, and under load the busy loop keeps the writer waiting
 * for it at each hand-off (SMTP at 20 sessions: ~0.6 of the final dot's 1.7 ms of commit time). Here one
 * call takes the cross-process write lock, runs the whole transaction, unlocks and fdatasyncs the WAL
 * with the GIL released once (measured: docs/benchmarks.md, SMTP).
 *
 * Invariants (the Python side, postroom/store/sqlite_native.py, relies on each):
 * - The SQL is not here: the caller gives the statements (the same texts its Python path runs); this file
 *   knows only their parameter layout, documented at Db_append.
 * - The connection is a second connection of the writer thread, opened through the very libsqlite3 that
 *   Python's sqlite3 module uses (checked by the caller with open_v2_address(): two copies of SQLite in
 *   one process would not see each other's POSIX locks). It is used by one thread at a time.
 * - append() either commits everything or nothing. When nothing was committed it raises FastCommitError
 *   and the transaction is rolled back: the caller runs the same batch on its Python path, which gives
 *   the right per-job errors. After COMMIT nothing raises; a failed fdatasync is returned as its errno.
 * - Every pointer read without the GIL belongs to an object the caller's argument lists keep alive
 *   (bytes and str are immutable; a str's UTF-8 form is cached in the object).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static PyObject *FastCommitError;

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *begin, *commit, *rollback, *reserve, *blob, *message;
} Db;

typedef struct { const char *raw; Py_ssize_t raw_len; const char *structure; Py_ssize_t structure_len; long long refs; } BlobIn;
typedef struct { Py_ssize_t blob; long long mailbox; const char *flags; Py_ssize_t flags_len; double date; long long uid; } RowIn;
typedef struct { long long mailbox, n, uid, modseq; } Counter;

static void Db_finalize(Db *self) {
    sqlite3_stmt **all[] = {&self->begin, &self->commit, &self->rollback, &self->reserve, &self->blob, &self->message};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        sqlite3_finalize(*all[i]);
        *all[i] = NULL;
    }
    if (self->db != NULL) {
        sqlite3_close_v2(self->db);
        self->db = NULL;
    }
}

static void Db_dealloc(Db *self) {
    Db_finalize(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Db(path, setup, reserve, blob, message): open ``path``, run the ``setup`` statements (pragmas) and
 * prepare the three statements of Db_append. */
static int Db_init(Db *self, PyObject *args, PyObject *kwds) {
    const char *path, *setup, *reserve, *blob, *message;
    static char *kwlist[] = {"path", "setup", "reserve", "blob", "message", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sssss", kwlist, &path, &setup, &reserve, &blob, &message))
        return -1;
    Db_finalize(self);
    int rc = sqlite3_open_v2(path, &self->db, SQLITE_OPEN_READWRITE, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_exec(self->db, setup, NULL, NULL, NULL);
    const char *sql[] = {"BEGIN IMMEDIATE", "COMMIT", "ROLLBACK", reserve, blob, message};
    sqlite3_stmt **out[] = {&self->begin, &self->commit, &self->rollback, &self->reserve, &self->blob, &self->message};
    for (size_t i = 0; rc == SQLITE_OK && i < sizeof sql / sizeof sql[0]; i++)
        rc = sqlite3_prepare_v3(self->db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, out[i], NULL);
    if (rc != SQLITE_OK) {
        PyErr_Format(FastCommitError, "cannot open %s: %s", path,
                     self->db != NULL ? sqlite3_errmsg(self->db) : sqlite3_errstr(rc));
        Db_finalize(self);
        return -1;
    }
    return 0;
}

/* Step ``stmt`` to its end and reset it; SQLITE_DONE on success. */
static int run(sqlite3_stmt *stmt) {
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    }
    sqlite3_reset(stmt);
    return rc;
}

/* The transaction, without the GIL: SQLITE_DONE when committed; else an SQLite code (or SQLITE_NOTFOUND
 * for a mailbox that does not exist), with the transaction rolled back. */
static int transaction(Db *self, BlobIn *blobs, Py_ssize_t nblobs, RowIn *rows, Py_ssize_t nrows,
                       Counter *counters, Py_ssize_t ncounters) {
    int rc = run(self->begin);
    long long last_blob = 0;
    for (Py_ssize_t i = 0; rc == SQLITE_DONE && i < ncounters; i++) {
        Counter *c = &counters[i];
        sqlite3_bind_int64(self->reserve, 1, c->n);
        sqlite3_bind_int64(self->reserve, 2, c->mailbox);
        rc = sqlite3_step(self->reserve);
        if (rc == SQLITE_ROW) {
            c->uid = sqlite3_column_int64(self->reserve, 0);
            c->modseq = sqlite3_column_int64(self->reserve, 1);
            if (i == 0) last_blob = sqlite3_column_int64(self->reserve, 2); /* NULL reads as 0 */
            while ((rc = sqlite3_step(self->reserve)) == SQLITE_ROW) {
            }
        } else if (rc == SQLITE_DONE) {
            rc = SQLITE_NOTFOUND;
        }
        sqlite3_reset(self->reserve);
    }
    for (Py_ssize_t i = 0; rc == SQLITE_DONE && i < nblobs; i++) {
        BlobIn *b = &blobs[i];
        sqlite3_bind_int64(self->blob, 1, last_blob + 1 + i);
        sqlite3_bind_int64(self->blob, 2, b->raw_len);
        sqlite3_bind_blob64(self->blob, 3, b->raw, (sqlite3_uint64)b->raw_len, SQLITE_STATIC);
        sqlite3_bind_text64(self->blob, 4, b->structure, (sqlite3_uint64)b->structure_len, SQLITE_STATIC, SQLITE_UTF8);
        sqlite3_bind_int64(self->blob, 5, b->refs);
        rc = run(self->blob);
    }
    for (Py_ssize_t i = 0; rc == SQLITE_DONE && i < nrows; i++) {
        RowIn *r = &rows[i];
        Counter *c = counters;
        while (c->mailbox != r->mailbox) c++; /* every row's mailbox has a counter */
        r->uid = c->uid++;
        sqlite3_bind_int64(self->message, 1, r->mailbox);
        sqlite3_bind_int64(self->message, 2, r->uid);
        sqlite3_bind_int64(self->message, 3, last_blob + 1 + r->blob);
        sqlite3_bind_text64(self->message, 4, r->flags, (sqlite3_uint64)r->flags_len, SQLITE_STATIC, SQLITE_UTF8);
        sqlite3_bind_int64(self->message, 5, ++c->modseq);
        sqlite3_bind_int64(self->message, 6, blobs[r->blob].raw_len);
        sqlite3_bind_double(self->message, 7, r->date);
        rc = run(self->message);
    }
    if (rc == SQLITE_DONE) rc = run(self->commit);
    if (rc != SQLITE_DONE && !sqlite3_get_autocommit(self->db)) run(self->rollback);
    sqlite3_clear_bindings(self->blob);
    sqlite3_clear_bindings(self->message);
    return rc;
}

/* append(lock_fd, wal_fd, blobs, rows) -> (uids, sync_errno)
 *
 * blobs: list of (raw: bytes, structure: str, refs: int), stored under the blob ids after the last one.
 * rows:  list of (blob index: int, mailbox id: int, flags: str, internaldate: float), at least one.
 * Runs flock(lock_fd, LOCK_EX); BEGIN IMMEDIATE; per mailbox, in order of first appearance, ``reserve``
 * (?1 = its number of rows, ?2 = its id; one row back: first uid, highest modseq before, last blob id);
 * ``blob`` per blob (?1 id, ?2 size, ?3 data, ?4 structure, ?5 refs); ``message`` per row (?1 mailbox,
 * ?2 uid, ?3 blob id, ?4 flags, ?5 modseq, ?6 size, ?7 internaldate); COMMIT; unlock; and, when wal_fd is
 * not -1, fdatasync(wal_fd). Returns each row's uid and the fdatasync's errno (0: durable). */
static PyObject *Db_append(Db *self, PyObject *args) {
    int lock_fd, wal_fd;
    PyObject *blob_list, *row_list;
    if (!PyArg_ParseTuple(args, "iiO!O!", &lock_fd, &wal_fd, &PyList_Type, &blob_list, &PyList_Type, &row_list))
        return NULL;
    if (self->db == NULL) return PyErr_Format(FastCommitError, "closed");
    Py_ssize_t nblobs = PyList_GET_SIZE(blob_list), nrows = PyList_GET_SIZE(row_list), ncounters = 0;
    if (nrows == 0) return PyErr_Format(PyExc_ValueError, "no rows");
    BlobIn *blobs = PyMem_Calloc((size_t)nblobs + 1, sizeof(BlobIn));
    RowIn *rows = PyMem_Calloc((size_t)nrows, sizeof(RowIn));
    Counter *counters = PyMem_Calloc((size_t)nrows, sizeof(Counter));
    PyObject *result = NULL;
    if (blobs == NULL || rows == NULL || counters == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nblobs; i++) {
        PyObject *item = PyList_GET_ITEM(blob_list, i), *raw, *structure;
        BlobIn *b = &blobs[i];
        if (!PyArg_ParseTuple(item, "O!UL", &PyBytes_Type, &raw, &structure, &b->refs)) goto done;
        b->raw = PyBytes_AS_STRING(raw);
        b->raw_len = PyBytes_GET_SIZE(raw);
        if ((b->structure = PyUnicode_AsUTF8AndSize(structure, &b->structure_len)) == NULL) goto done;
    }
    for (Py_ssize_t i = 0; i < nrows; i++) {
        PyObject *item = PyList_GET_ITEM(row_list, i), *flags;
        RowIn *r = &rows[i];
        if (!PyArg_ParseTuple(item, "nLUd", &r->blob, &r->mailbox, &flags, &r->date)) goto done;
        if (r->blob < 0 || r->blob >= nblobs) {
            PyErr_Format(PyExc_ValueError, "row %zd names blob %zd of %zd", i, r->blob, nblobs);
            goto done;
        }
        if ((r->flags = PyUnicode_AsUTF8AndSize(flags, &r->flags_len)) == NULL) goto done;
        Py_ssize_t k = 0;
        while (k < ncounters && counters[k].mailbox != r->mailbox) k++;
        if (k == ncounters) counters[ncounters++].mailbox = r->mailbox;
        counters[k].n++;
    }
    int rc, lock_errno = 0, sync_errno = 0;
    Py_BEGIN_ALLOW_THREADS
    if (flock(lock_fd, LOCK_EX) != 0) {
        lock_errno = errno;
        rc = SQLITE_IOERR;
    } else {
        rc = transaction(self, blobs, nblobs, rows, nrows, counters, ncounters);
        flock(lock_fd, LOCK_UN);
        if (rc == SQLITE_DONE && wal_fd >= 0 && fdatasync(wal_fd) != 0) sync_errno = errno;
    }
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_DONE) {
        if (lock_errno != 0)
            PyErr_Format(FastCommitError, "flock: %s", strerror(lock_errno));
        else if (rc == SQLITE_NOTFOUND)
            PyErr_Format(FastCommitError, "a target mailbox does not exist");
        else
            PyErr_Format(FastCommitError, "%s (%d)", sqlite3_errmsg(self->db), rc);
        goto done;
    }
    PyObject *uids = PyList_New(nrows);
    if (uids == NULL) goto done;
    for (Py_ssize_t i = 0; i < nrows; i++) {
        PyObject *uid = PyLong_FromLongLong(rows[i].uid);
        if (uid == NULL) {
            Py_DECREF(uids);
            goto done;
        }
        PyList_SET_ITEM(uids, i, uid);
    }
    result = Py_BuildValue("(Ni)", uids, sync_errno);
done:
    PyMem_Free(blobs);
    PyMem_Free(rows);
    PyMem_Free(counters);
    return result;
}

static PyObject *Db_close(Db *self, PyObject *Py_UNUSED(ignored)) {
    Db_finalize(self);
    Py_RETURN_NONE;
}

static PyMethodDef Db_methods[] = {
    {"append", (PyCFunction)Db_append, METH_VARARGS, "Commit a batch of appends without the GIL (see the C source)."},
    {"close", (PyCFunction)Db_close, METH_NOARGS, "Close the connection."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DbType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "postroom.store._sqlite_fast.Db",
    .tp_basicsize = sizeof(Db),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A writer connection whose append transaction runs without the GIL.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Db_init,
    .tp_dealloc = (destructor)Db_dealloc,
    .tp_methods = Db_methods,
};

static PyObject *open_v2_address(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromVoidPtr((void *)sqlite3_open_v2);
}

static PyObject *libversion(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(sqlite3_libversion());
}

static PyMethodDef module_methods[] = {
    {"open_v2_address", open_v2_address, METH_NOARGS, "The address of the sqlite3_open_v2 this module calls."},
    {"libversion", libversion, METH_NOARGS, "The version of the SQLite library this module calls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "_sqlite_fast", .m_size = -1, .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__sqlite_fast(void) {
    if (PyType_Ready(&DbType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    FastCommitError = PyErr_NewException("postroom.store._sqlite_fast.FastCommitError", PyExc_RuntimeError, NULL);
    if (FastCommitError == NULL || PyModule_AddObjectRef(m, "FastCommitError", FastCommitError) < 0 ||
        PyModule_AddObjectRef(m, "Db", (PyObject *)&DbType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
