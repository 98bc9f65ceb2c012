"""The exclusive POP3 maildrop lock (RFC 1939 §4), valid across every worker process of one data directory.

Invariants:
- One lock file per account under ``<data_dir>/run/pop3/``, held with ``flock(LOCK_EX | LOCK_NB)`` on a file
  descriptor of its own: flock locks belong to the open file description, so two sessions conflict whether
  they run in one process or in two processes sharing the data directory.
- Taking the lock never blocks (a busy maildrop is ``-ERR [IN-USE]`` at once).
- The kernel drops the lock when the descriptor is closed, so also when the process dies; :meth:`release`
  is idempotent and every adapter exit path calls it. Lock files are never unlinked (unlinking a file
  another process is about to lock would give two holders of two different inodes).
- With ``[pop3] login_delay`` set, the lock file's mtime records the last successful login, so the delay
  holds across worker processes too (an empty file has never been marked).
- Several Postroom nodes on one PostgreSQL store do not share this lock; there POP3 relies on per-node
  locking only (documented in docs/pop3.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

_made: set[Path] = set()


class MaildropLock:
    """A held maildrop lock. Obtain with :meth:`acquire`; call :meth:`release` when the session ends."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: Path, account_id: int) -> MaildropLock | None:
        """The lock of ``account_id``'s maildrop, or None when another session holds it."""
        directory = run_dir / "pop3"
        if directory not in _made:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            _made.add(directory)
        path = directory / f"{account_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def seconds_since_last_login(self, now: float | None = None) -> float:
        """Seconds since :meth:`mark_login` last ran for this maildrop (in any process); inf if never.

        An empty lock file was never marked (its mtime is only its creation time)."""
        st = os.fstat(self._fd)
        if st.st_size == 0:
            return float("inf")
        return (time.time() if now is None else now) - st.st_mtime_ns / 1e9

    def mark_login(self) -> None:
        """Record a successful login in the lock file's mtime (RFC 2449 §6.8 LOGIN-DELAY bookkeeping)."""
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, b"\n")
        os.utime(self._fd)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor of this open file description drops the flock
