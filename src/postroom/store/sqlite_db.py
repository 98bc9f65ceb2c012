"""SQLite plumbing for the embedded store: schema, connections, and the group-commit writer.

Invariants:
- The database runs in WAL mode. The writer's connection commits with ``synchronous=NORMAL`` and then,
  *after* releasing the write lock, fdatasyncs the WAL itself (and, the first time, the directory that
  holds it): another process's batch can run its SQL while this one waits for the disk, where a
  ``synchronous=FULL`` COMMIT held the lock through its fsync (store benchmark, two processes, A/B in
  one session: medians 17,700 → 19,600 appends/s). Callers are answered and changes announced only after
  that fsync, so "returned" still means "durable". Another connection may *read* a commit a moment before
  it is durable; WAL frames are checksummed in a chain, so after a crash no later commit survives
  without it. Other connections (schema set-up, migrations) keep ``synchronous=FULL``, and so does the
  writer where SQLite could not switch to WAL (a rollback journal: there COMMIT itself must sync).
- All writes go through one :class:`GroupCommitWriter` thread per process. It takes every job queued
  while the previous commit was running, runs them inside one ``BEGIN IMMEDIATE`` transaction and commits
  once: one fsync for the whole batch (group commit). A failing job fails only its own caller: when a job
  raises, the transaction is rolled back and the batch is run again with each job in its own SAVEPOINT
  (a savepoint per job on every batch cost ~20 µs of the ~130 µs CPU of an append).
- A job (:data:`WriteFn`) is a function of the database alone: it may run twice (see above), so it
  changes nothing outside the connection and the ``Touched`` it is given.
- A job may also name a *bulk* function (:data:`ManyFn`) and its argument. On the fast path, consecutive
  jobs of a batch naming the same bulk function run as one call with their arguments in order (a few
  multi-row statements instead of a statement per job and table: appends from many sessions). The
  bulk call must have exactly the effect of running each job's own ``fn`` in turn; ``fn`` is what the
  savepoint path runs when anything in the batch raised.
- A job's future is resolved only after its batch's COMMIT returned and the WAL was fsynced.
- Readers use their own connections (one per reader thread); WAL lets them run beside the writer.
- WAL checkpoints run on the writer's commits (SQLite's default, every 1,000 pages). A separate passive
  checkpointer thread was measured (bench/store_append.py, A/B in one session) and gave no gain, so it went.
- Between processes, writers take an exclusive ``flock`` on ``meta.db.writer-lock`` around each
  transaction: the kernel wakes the next writer the moment the lock is released, where SQLite's own busy
  handler would sleep and poll (``busy_timeout`` stays as the fallback).
- A bulk function may come with a *fast* version (:data:`FastFn`, ``fast=`` at construction): when every
  job of a batch names that bulk function, the fast version is offered the whole batch first, with the
  write lock's and the WAL's descriptors. It takes the lock, commits and syncs by itself without the GIL
  (:mod:`postroom.store.sqlite_native`), or declines (returns None, having committed nothing), and the
  batch runs on the path above. Its results and ``Touched`` are those the bulk function would give. Should
  it raise (a bug), whether it committed is unknown: the batch's callers hear StoreError and it is not
  run again.
- The writer thread may wait and run its GIL-free commits under Linux's ``SCHED_BATCH`` policy
  (``batch_scheduling=True``, ``[store] writer_scheduling = "batch"``): same CPU share as the event loop,
  but a wake-up (a new job, the end of its ``fdatasync``) does not preempt the thread that is running.
  When the CPUs are busy the loop's protocol work so runs first and the next commit gathers more jobs:
  fewer commits and syncs per message, less CPU (SMTP at 20 sessions: +11 % messages per second, seven of
  eight interleaved pairs; docs/store.md). With a CPU free the writer runs at once. A Python-path
  transaction, whose every statement hands the GIL over and back, runs under the normal policy
  (``SCHED_OTHER``), so that each hand-off does not wait for a CPU; switching between the two needs no
  privilege. Durability is unchanged: the policy only decides when the writer gets a CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postroom.errors import StoreError, StoreFullError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another process's transaction
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # octets the WAL file is truncated to after it is reset
CACHE_KIB = 32 * 1024  # page cache per connection
MAX_BATCH = 256  # jobs per group commit; bounds one transaction's duration
SCHEMA_VERSION = 3  # bump with a MIGRATIONS entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS domains(name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aliases(alias TEXT PRIMARY KEY, target TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special_use TEXT,
    subscribed INTEGER NOT NULL DEFAULT 1,
    UNIQUE(account_id, name));
CREATE TABLE IF NOT EXISTS blobs(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    size INTEGER NOT NULL,
    data BLOB,
    path TEXT,
    structure TEXT NOT NULL,
    refs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blob_text(
    id INTEGER PRIMARY KEY,
    search_headers TEXT NOT NULL,
    search_body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages(
    mailbox_id INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    blob_id INTEGER NOT NULL,
    flags TEXT NOT NULL,
    modseq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    PRIMARY KEY(mailbox_id, uid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(mailbox_id, modseq);
CREATE TABLE IF NOT EXISTS expunged(
    mailbox_id INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY(mailbox_id, uid)) WITHOUT ROWID;
{FTS}
CREATE TABLE IF NOT EXISTS queue_messages(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    blob_id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    ret TEXT NOT NULL DEFAULT '',
    envid TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    eight_bit INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queue(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL REFERENCES queue_messages(id),
    recipient TEXT NOT NULL,
    domain TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    notify TEXT NOT NULL DEFAULT '',
    orcpt TEXT NOT NULL DEFAULT '',
    claimed_until REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS queue_due ON queue(status, next_attempt);
CREATE INDEX IF NOT EXISTS queue_message ON queue(message_id);
"""

#: The full-text index: external content over ``blob_text`` (the searchable text of the indexed blobs).
FTS = """CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
    search_headers, search_body, content='blob_text', content_rowid='id', tokenize='trigram');"""
SCHEMA = SCHEMA.replace("{FTS}", FTS)


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN/COMMIT ourselves), WAL, synchronous=FULL."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # negative: KiB, not pages
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    return conn


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: searchable text moved out of the structure JSON into ``blobs`` columns, and the full-text
    index became an external-content index over them. The text is copied out of the old JSON; the index
    is rebuilt from the watermark 0."""
    cols = {row[1] for row in conn.execute("PRAGMA table_info(blobs)")}
    if "search_headers" not in cols:
        conn.execute("ALTER TABLE blobs ADD COLUMN search_headers TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE blobs ADD COLUMN search_body TEXT NOT NULL DEFAULT ''")
        conn.execute(
            "UPDATE blobs SET search_headers = COALESCE(json_extract(structure, '$.search_headers'), ''),"
            " search_body = COALESCE(json_extract(structure, '$.search_body'), json_extract(structure, '$.text'), '')"
        )
    fts_cols = {row[1] for row in conn.execute("PRAGMA table_info(fts)")}
    if fts_cols and "search_body" not in fts_cols:
        conn.execute("DROP TABLE fts")
        conn.execute("UPDATE meta SET value=0 WHERE key='fts_indexed'")
    conn.execute("DROP TABLE IF EXISTS fts_pending")


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    """Schema 2 → 3: the searchable text left ``blobs`` (where every append wrote it) for ``blob_text``,
    which the indexer fills behind delivery. Every blob's existing text moves there; the index is
    recreated empty with the watermark at 0, and the indexer fills it again from that text on the first
    search (not here: rebuilding the index of 50,000 messages took 30 s, a start-up no one should wait
    for). Blobs above the watermark may thus have a ``blob_text`` row before they are indexed."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS blob_text(id INTEGER PRIMARY KEY, search_headers TEXT NOT NULL,"
        " search_body TEXT NOT NULL)"
    )
    conn.execute("INSERT INTO blob_text SELECT id, search_headers, search_body FROM blobs")
    conn.execute("DROP TABLE IF EXISTS fts")
    conn.execute(FTS)
    conn.execute("UPDATE meta SET value=0 WHERE key='fts_indexed'")
    conn.execute("ALTER TABLE blobs DROP COLUMN search_headers")
    conn.execute("ALTER TABLE blobs DROP COLUMN search_body")


#: Schema migrations by the version they produce; each runs inside the schema transaction.
MIGRATIONS = {2: _migrate_to_2, 3: _migrate_to_3}


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to SCHEMA_VERSION, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is not None and int(row[0]) < SCHEMA_VERSION:
        for version in range(int(row[0]) + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
        conn.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (SCHEMA_VERSION,))
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('last_uidvalidity', 0)")
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('fts_indexed', 0)")  # highest blob id indexed
    conn.execute("COMMIT")


@dataclass
class Touched:
    """What a write job changed, for the change feed (collected per job, announced after COMMIT)."""

    mailboxes: set[int] = field(default_factory=set)
    accounts: set[int] = field(default_factory=set)
    unlink: list[str] = field(default_factory=list)  # blob files to remove after COMMIT


def fsync_dir(path: Path) -> None:
    """Make the directory entries in ``path`` durable (a new file, a rename)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WriteFn = Callable[[sqlite3.Connection, Touched], Any]
#: A bulk job: the arguments of consecutive jobs in order → their results in the same order.
ManyFn = Callable[[sqlite3.Connection, list[Any], Touched], list[Any]]
#: A bulk job's fast version: (arguments, lock fd, WAL fd) → (results, touched, the WAL fdatasync's
#: errno), committed and synced; or None: declined, nothing committed (see the module invariants).
FastFn = Callable[[list[Any], int, int], tuple[list[Any], Touched, int] | None]


@dataclass
class _Job:
    fn: WriteFn
    future: asyncio.Future[Any]
    prepare: Callable[[], None] | None = None
    many: ManyFn | None = None  # run with the neighbours that share it (see module invariants)
    arg: Any = None  # this job's argument to ``many``
    outcome: tuple[bool, Any] | None = None  # (ok, result or exception), set by the writer thread


def set_batch_scheduling(batch: bool) -> bool:
    """Put the calling thread under ``SCHED_BATCH`` (``batch``) or back under ``SCHED_OTHER``, keeping its
    nice value. Both are the normal (not real-time) class, so neither needs a privilege. Linux only (a
    policy per thread, named by its native id); False, with a warning logged, where it cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
    try:
        os.sched_setscheduler(threading.get_native_id(), policy, os.sched_param(0))
    except OSError as exc:  # pragma: no cover - a sandbox that forbids sched_setscheduler
        log.warning("store writer keeps its scheduling policy: %s", exc)
        return False
    return True


class GroupCommitWriter:
    """The one writer thread. ``submit(fn)`` → awaitable result, durable when it resolves.

    A batch's changes are announced and its callers answered with one ``call_soon_threadsafe`` after its
    COMMIT, so the event loop is woken once per commit, not once per job.
    """

    def __init__(
        self,
        path: Path,
        cleanup: Callable[[Touched], None],
        announce: Callable[[Touched], None],
        opener: Callable[[Path], sqlite3.Connection] = connect,
        fast: tuple[ManyFn, FastFn] | None = None,
        batch_scheduling: bool = False,
    ) -> None:
        """``cleanup(touched)`` runs on the writer thread after each COMMIT (file removal: I/O off the loop);
        ``announce(touched)`` runs on the event loop just before the batch's callers are answered;
        ``opener`` makes the writer's connection (:func:`connect`; tests give it another journal mode);
        ``fast`` is a bulk function and its fast version; ``batch_scheduling`` puts the writer thread under
        ``SCHED_BATCH`` but for its Python-path transactions (see the module invariants)."""
        self._fast = fast
        self._batch_scheduling = batch_scheduling
        self._path = path
        self._opener = opener
        self._cleanup = cleanup
        self._announce = announce
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="postroom-store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd = -1
        self._wal_fd = -1  # opened after the first commit, kept while the connection keeps the WAL alive
        self._own_sync = False  # True in WAL mode: commits with synchronous=NORMAL, then _sync_wal
        self.commits = 0  # statistics: transactions committed

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = self._opener(self._path)
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        self._own_sync = str(mode).lower() == "wal"  # else (a file system without WAL): COMMIT syncs, FULL
        if self._own_sync:
            self._conn.execute("PRAGMA synchronous=NORMAL")  # the WAL is fsynced by _sync_wal, outside the lock
        self._lock_fd = os.open(str(self._path) + ".writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._worker.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=30)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1

    async def submit(
        self, fn: WriteFn, prepare: Callable[[], None] | None = None, many: ManyFn | None = None, arg: Any = None
    ) -> Any:
        """Run ``fn`` (or ``many`` with ``arg``, batched with its neighbours) in the next group commit;
        ``prepare`` first, on the writer thread, outside the write lock."""
        assert self._loop is not None, "writer not started"
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put(_Job(fn, fut, prepare, many, arg))
        return await fut

    def _run(self) -> None:
        if self._batch_scheduling:
            self._batch_scheduling = set_batch_scheduling(True)
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            touched = self._run_batch(batch)
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    self._loop.call_soon_threadsafe(self._finish, batch, touched)

    def _finish(self, batch: list[_Job], touched: Touched | None) -> None:
        """On the event loop, after COMMIT: announce the changes, then answer every caller of the batch."""
        if touched is not None and (touched.mailboxes or touched.accounts):
            self._announce(touched)
        for job in batch:
            if job.future.done() or job.outcome is None:
                continue
            ok, value = job.outcome
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    def _run_batch(self, batch: list[_Job]) -> Touched | None:
        """Prepare, run and commit ``batch``; what it changed, or None when nothing committed."""
        conn = self._conn
        assert conn is not None
        for job in batch:  # CPU work (e.g. parsing) before the write lock is taken
            if job.prepare is not None:
                try:
                    job.prepare()
                except Exception as exc:
                    job.outcome = (False, exc)
        live = [j for j in batch if j.outcome is None]
        if not live:
            return None
        touched_by: list[Touched] = []
        fast = self._run_fast(live, touched_by)
        if fast is None:
            committed, sync_error = self._run_python(conn, live, touched_by)
            if not committed:
                return None
        else:
            sync_error = OSError(fast, os.strerror(fast)) if fast else None
        if sync_error is not None:
            # Committed, visible, but maybe not on disk: every caller hears a failure (SMTP: 451, so the
            # client retries; at worst the message is then stored twice, never acknowledged and lost).
            log.error("store commit not made durable: %s", sync_error)
            full = sync_error.errno in (28, 122)
            err = StoreFullError("disk full") if full else StoreError(f"fsync failed: {sync_error}")
            for job in live:
                job.outcome = (False, err)
            return None
        self.commits += 1
        touched_all = Touched()
        for touched in touched_by:
            touched_all.mailboxes |= touched.mailboxes
            touched_all.accounts |= touched.accounts
            touched_all.unlink.extend(touched.unlink)
        try:
            self._cleanup(touched_all)
        except Exception:  # pragma: no cover - cleaning up must never kill the writer
            log.exception("post-commit clean-up failed")
        return touched_all

    def _run_python(
        self, conn: sqlite3.Connection, live: list[_Job], touched_by: list[Touched]
    ) -> tuple[bool, OSError | None]:
        """The Python path: ``live`` in one transaction under the write lock, then the WAL sync, under the
        normal scheduling policy (each statement's GIL hand-off should not wait for a CPU; see the module
        invariants). Whether it committed, and the sync's error."""
        batch_scheduling = self._batch_scheduling
        if batch_scheduling:
            set_batch_scheduling(False)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                committed = self._transaction(conn, live, touched_by)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            return committed, (self._sync_wal() if self._own_sync and committed else None)
        finally:
            if batch_scheduling:
                set_batch_scheduling(True)

    def _run_fast(self, live: list[_Job], touched_by: list[Touched]) -> int | None:
        """Offer ``live`` to the fast version of its bulk function: None when declined (or not offered:
        mixed jobs, no WAL descriptor yet, a rollback journal), else the WAL fdatasync's errno (EIO when
        the fast version raised), with every job's outcome set when it is 0. Declining is never an error:
        the Python path then runs the same batch."""
        fast = self._fast
        if fast is None or self._wal_fd < 0 or not self._own_sync:
            return None
        many, fn = fast
        for job in live:
            if job.many != many:
                return None
        try:
            got = fn([job.arg for job in live], self._lock_fd, self._wal_fd)
        except Exception:
            # A bug on the fast path (it declines by returning None): whether it committed is unknown, so
            # the batch is not run again (no duplicates); every caller hears a failure, as for a failed
            # fsync (EIO), and the writer carries on.
            log.exception("fast commit failed")
            return errno.EIO
        if got is None:
            return None
        results, touched, sync_errno = got
        for job, res in zip(live, results, strict=True):
            job.outcome = (True, res)
        touched_by.append(touched)
        return sync_errno

    def _sync_wal(self) -> OSError | None:
        """Make the last COMMIT durable: fdatasync the WAL (our connection keeps the file, and so this
        descriptor's inode, alive); the first time, fsync its directory as well, since ``synchronous=NORMAL``
        never syncs the directory entry of a WAL file SQLite just created. The error, if it failed."""
        try:
            if self._wal_fd < 0:
                self._wal_fd = os.open(str(self._path) + "-wal", os.O_RDONLY)
                fsync_dir(self._path.parent)
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            return exc
        return None

    def _transaction(self, conn: sqlite3.Connection, live: list[_Job], touched_by: list[Touched]) -> bool:
        """Run ``live`` in one transaction; True when it committed (each job's outcome is set)."""
        try:
            if self._all_or_retry(conn, live, touched_by):
                return True
            conn.execute("BEGIN IMMEDIATE")
            for i, job in enumerate(live):
                touched = Touched()
                conn.execute(f"SAVEPOINT j{i}")
                try:
                    res = job.fn(conn, touched)
                except Exception as job_exc:
                    conn.execute(f"ROLLBACK TO j{i}")
                    conn.execute(f"RELEASE j{i}")
                    job.outcome = (False, job_exc)
                    continue
                conn.execute(f"RELEASE j{i}")
                job.outcome = (True, res)
                touched_by.append(touched)
            conn.execute("COMMIT")
            return True
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err: Exception = _translate(exc)
            log.error("store commit failed: %s", exc)
            for job in live:
                job.outcome = (False, err)
            return False

    @staticmethod
    def _all_or_retry(conn: sqlite3.Connection, live: list[_Job], touched_by: list[Touched]) -> bool:
        """The fast path: every job in one transaction, no savepoints. True when committed; False (rolled
        back, no outcome set) when a job raised, so the caller runs the batch again with savepoints."""
        conn.execute("BEGIN IMMEDIATE")
        results: list[Any] = []
        i, n = 0, len(live)
        while i < n:
            job = live[i]
            touched = Touched()
            try:
                if job.many is None:
                    results.append(job.fn(conn, touched))
                    i += 1
                else:
                    j = i + 1
                    while j < n and live[j].many == job.many:  # bound methods: equal, not identical
                        j += 1
                    out = job.many(conn, [k.arg for k in live[i:j]], touched)
                    if len(out) != j - i:
                        raise RuntimeError("a bulk job returned the wrong number of results")
                    results.extend(out)
                    i = j
            except Exception:
                touched_by.clear()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return False
            touched_by.append(touched)
        conn.commit()  # prepare, step and finalize under one GIL release; execute("COMMIT") takes two
        for job, res in zip(live, results, strict=True):
            job.outcome = (True, res)
        return True


class ReaderPool:
    """Reader threads, each with its own read-only connection; results come back in batches.

    Invariants: a job runs on exactly one reader thread with that thread's connection; results reach the
    event loop through one ``call_soon_threadsafe`` per batch of finished jobs (not one per job), which
    halves the cost of a hop under concurrent sessions compared with ``run_in_executor``.

    ``run(fn, inline=True)`` runs ``fn`` at once on the event-loop thread with the pool's own read-only
    loop connection: for small primary-key reads (~10-30 µs), cheaper than the hop (~100-125 µs of CPU).
    That connection never waits for a lock (``busy_timeout=0``): when SQLite reports the database busy
    (rare in WAL mode, e.g. while another connection recovers the WAL) the job goes to a reader thread.
    """

    def __init__(self, path: Path, threads: int) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"postroom-store-read-{i}", daemon=True) for i in range(threads)
        ]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        conn = connect(self._path)
        conn.execute("PRAGMA query_only=1")
        conn.execute("PRAGMA busy_timeout=0")
        self._loop_conn = conn
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=30)
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None

    async def run(self, fn: Callable[[sqlite3.Connection], Any], inline: bool = False) -> Any:
        assert self._loop is not None, "reader pool not started"
        if inline and self._loop_conn is not None:
            try:
                return fn(self._loop_conn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if self._loop_conn.in_transaction:
                    self._loop_conn.execute("ROLLBACK")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put((fn, fut))
        return await fut

    def _run(self) -> None:
        conn = connect(self._path)
        conn.execute("PRAGMA query_only=1")
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                fn, fut = job
                try:
                    outcome: tuple[asyncio.Future[Any], bool, Any] = (fut, True, fn(conn))
                except Exception as exc:
                    outcome = (fut, False, exc)
                with self._done_lock:
                    first = not self._done
                    self._done.append(outcome)
                if first and self._loop is not None and not self._loop.is_closed():
                    with contextlib.suppress(RuntimeError):
                        self._loop.call_soon_threadsafe(self._deliver)
        finally:
            conn.close()

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for fut, ok, value in done:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, with any extended code (e.g. SQLITE_BUSY_RECOVERY)."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _translate(exc: sqlite3.Error) -> StoreError:
    text = str(exc).lower()
    if "full" in text or "disk i/o" in text:
        return StoreFullError(f"store is full: {exc}")
    return StoreError(f"store write failed: {exc}")


def now() -> float:
    return time.time()
