"""The append commit without the interpreter lock: the C extension ``_sqlite_fast`` and when to use it.

The writer thread shares the GIL with the event loop; through Python's ``sqlite3`` every statement of a
commit gives the GIL up and waits to take it back while the busy loop runs. For the writer's commonest
batch (messages appended to mailboxes: SMTP delivery) ``_sqlite_fast`` runs the write lock, the whole
transaction and the WAL's fdatasync in one call with the GIL released (measured: ``docs/benchmarks.md``,
SMTP). Every other batch, and any batch this path cannot take, runs on the Python path as before.

Invariants:
- Optional: the extension is built by ``make native`` (``tools/native.py``, needs SQLite's headers); when
  it is missing, disabled (``POSTROOM_NATIVE_COMMIT=0``) or unsafe, :func:`open_native` returns None and
  every append runs on the Python path, with the same rows.
- Unsafe means the extension would call another copy of SQLite than Python's ``sqlite3`` module does (a
  Python with SQLite linked in statically): two copies in one process do not see each other's POSIX
  locks. :func:`unavailable` compares the address of ``sqlite3_open_v2`` both resolve to.
- The statements are the Python path's: ``RESERVE`` is the one ``sqlite_append`` runs, ``BLOB`` and
  ``MESSAGE`` insert the rows its multi-row ``INSERT``s do, in the parameter layout the C file documents.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sqlite3
from pathlib import Path
from types import ModuleType

from postroom.store import sqlite_db as db

log = logging.getLogger(__name__)

_sqlite_fast: ModuleType | None
try:
    from postroom.store import _sqlite_fast
except ImportError:  # not built: plain Python
    _sqlite_fast = None

#: The writer connection's settings (``sqlite_db.connect`` and ``GroupCommitWriter.start``; journal_mode
#: WAL is a property of the database file, set by every ``connect``).
SETUP = (
    f"PRAGMA busy_timeout={db.BUSY_TIMEOUT_MS}; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
    f" PRAGMA cache_size=-{db.CACHE_KIB}; PRAGMA journal_size_limit={db.JOURNAL_SIZE_LIMIT};"
)
#: Per mailbox, ?1 = its new messages, ?2 = its id: UIDNEXT and HIGHESTMODSEQ advanced, and back their
#: values before (the first UID and the MODSEQ to count up from) and the last blob id. Both paths run it.
RESERVE = (
    "UPDATE mailboxes SET uidnext = uidnext + ?1, highestmodseq = highestmodseq + ?1 WHERE id = ?2"
    " RETURNING uidnext - ?1, highestmodseq - ?1, (SELECT seq FROM sqlite_sequence WHERE name = 'blobs')"
)
BLOB = "INSERT INTO blobs(id, size, data, path, structure, refs) VALUES(?1, ?2, ?3, NULL, ?4, ?5)"
MESSAGE = "INSERT INTO messages VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"

#: Raised by :meth:`NativeCommit.append` when nothing was committed (the Python path then runs the batch).
FastCommitError: type[Exception] = _sqlite_fast.FastCommitError if _sqlite_fast is not None else RuntimeError


def unavailable() -> str | None:
    """Why the native commit cannot be used here, or None when it can."""
    if os.environ.get("POSTROOM_NATIVE_COMMIT") == "0":
        return "disabled by POSTROOM_NATIVE_COMMIT=0"
    if _sqlite_fast is None:
        return "not built (make native)"
    if _sqlite_fast.libversion() != sqlite3.sqlite_version:
        return f"SQLite {_sqlite_fast.libversion()} here, {sqlite3.sqlite_version} in Python's sqlite3"
    import _sqlite3

    try:
        theirs = ctypes.cast(ctypes.CDLL(_sqlite3.__file__).sqlite3_open_v2, ctypes.c_void_p).value
    except (AttributeError, OSError):
        theirs = None
    if theirs != _sqlite_fast.open_v2_address():
        return "Python's sqlite3 module has its own copy of SQLite"
    return None


class NativeCommit:
    """A second writer connection whose :meth:`append` commits without the GIL. Used only by the writer
    thread (and opened and closed while that thread is not running)."""

    def __init__(self, path: Path) -> None:
        assert _sqlite_fast is not None, "built (see open_native)"
        self._db = _sqlite_fast.Db(str(path), SETUP, RESERVE, BLOB, MESSAGE)
        self.commits = 0  # statistics: transactions committed here

    def append(
        self,
        lock_fd: int,
        wal_fd: int,
        blobs: list[tuple[bytes, str, int]],
        rows: list[tuple[int, int, str, float]],
    ) -> tuple[list[int], int]:
        """Commit ``blobs`` (raw, structure, refs) and ``rows`` (blob index, mailbox id, flags, internaldate)
        under the write lock ``lock_fd``, then fdatasync ``wal_fd``: each row's UID and the fdatasync's
        errno (0: durable). Raises :data:`FastCommitError` when nothing was committed."""
        uids, sync_errno = self._db.append(lock_fd, wal_fd, blobs, rows)
        self.commits += 1
        return uids, sync_errno

    def close(self) -> None:
        self._db.close()


def open_native(path: Path) -> NativeCommit | None:
    """The native commit for the database at ``path``, or None (see :func:`unavailable`)."""
    why = unavailable()
    if why is not None:
        log.info("store: appends commit on the Python path (native commit: %s)", why)
        return None
    return NativeCommit(path)
