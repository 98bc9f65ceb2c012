"""The job ledger: one SQLite row per planned message, so a re-run never sends a message twice.

States of a row (``status``):

``planned`` → ``sending`` → ``sent`` (accepted: 2xx after the final dot)
                         → ``failed`` (5xx: permanent, not retried)
                         → ``deferred`` (4xx or no connection after all retries: retried on the next run)
``sending`` left over from a run that died becomes ``unknown``: the server may or may not have accepted it.

Invariants:
- A row is marked ``sending`` and that is committed (fsync, ``synchronous=FULL``) *before* the message's
  DATA is transmitted; ``sent`` is committed after the server's reply. A crash therefore leaves every
  message that might have been accepted in ``sending``/``unknown``, and :meth:`Ledger.todo` never returns
  such a row unless the user explicitly asks to resend unknown messages. No duplicate without consent.
- Rows are keyed by (job id, message key); both are content-derived (report SHA-256, envelope + pages), so
  the same report gives the same rows on every run, whatever the templates say.
- If a re-run plans a message whose pages already went to the same recipients under another key (the
  grouping was changed between runs), the new row is ``skipped``, never sent.
- Writes are batched: concurrent senders' updates share one transaction (:class:`LedgerWriter`), and
  the sender marks messages ``sending`` ahead of their turn (:meth:`LedgerWriter.reserve`) so that a
  commit's fsync (milliseconds) is not waited for per message; DATA still waits until its own mark is
  durable.
- The send log (``ledger.sendlog`` beside ``ledger.sqlite``, :class:`Journal`) makes a crash cost no
  more than the messages whose DATA was really in flight. Lines are stored into a shared memory map of
  the file, never fsynced: ``R`` when a message is reserved, ``S`` just before its first DATA octet, ``D``
  with its outcome. A kill of the process loses nothing stored (the page cache survives it); an OS crash may, so
  the log is trusted only when its boot id is this boot's and its writer is no longer running. Then
  :meth:`Ledger.prepare` puts a ``sending`` row back to ``planned`` when it was reserved and never
  ``S``-started, applies a recorded outcome, and leaves only started-and-unanswered rows ``unknown``.
  Otherwise every ``sending`` row becomes ``unknown`` as before. A missing or untrusted line can only
  make the result more cautious: a row becomes resendable only through an ``R`` without ``S`` or a
  recorded ``deferred``/``failed`` outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from postroom.burst.plan import PlannedMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    recipients TEXT NOT NULL,
    pages TEXT NOT NULL,
    filename TEXT NOT NULL DEFAULT '',
    attachment_sha256 TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    reply TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (job, key)
);
"""
RESENDABLE = ("planned", "deferred")
JOURNAL_CHUNK = 1 << 20  # bytes the send log grows by (~15,000 lines)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux; elsewhere the journal is never trusted


@dataclass(frozen=True, slots=True)
class Row:
    job: str
    key: str
    seq: int
    recipients: tuple[str, ...]
    pages: tuple[int, ...]
    filename: str
    attachment_sha256: str
    message_id: str
    status: str
    reply: str
    attempts: int
    updated: float


class Ledger:
    """The ledger file of one output directory (synchronous API; see :class:`LedgerWriter` for async)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def jobs(self) -> list[str]:
        """The job ids in this ledger, oldest first."""
        cur = self._db.execute("SELECT job FROM message GROUP BY job ORDER BY min(rowid)")
        return [str(r[0]) for r in cur.fetchall()]

    def rows(self, job: str) -> list[Row]:
        cur = self._db.execute("SELECT * FROM message WHERE job = ? ORDER BY seq", (job,))
        return [_row(r) for r in cur.fetchall()]

    def prepare(
        self, job: str, messages: Sequence[PlannedMessage], *, resend_unknown: bool = False, retry_failed: bool = False
    ) -> dict[str, Row]:
        """Insert rows for newly planned messages and settle what the last run left behind.

        Returns the current row of every planned message, by key.
        """
        now = time.time()
        settled = read_journal(journal_path(self.path), job)
        with self._tx():
            if settled is not None:
                never, outcomes = settled
                self._db.executemany(
                    "UPDATE message SET status='planned', attempts=max(attempts-1, 0), updated=?"
                    " WHERE job=? AND key=? AND status='sending'",
                    [(now, job, key) for key in never],
                )
                self._db.executemany(
                    "UPDATE message SET status=?, reply=?, updated=? WHERE job=? AND key=? AND status='sending'",
                    [(status, reply, now, job, key) for key, (status, reply) in outcomes.items()],
                )
            self._db.execute(
                "UPDATE message SET status='unknown', updated=? WHERE job=? AND status='sending'", (now, job)
            )
            existing = {r.key: r for r in self.rows(job)}
            delivered = [r for r in existing.values() if r.status in ("sent", "unknown", "sending")]
            for m in messages:
                if m.key in existing:
                    continue
                recipients = tuple(a.lower() for a in m.tag.recipients)
                status, reply = "planned", ""
                for r in delivered:
                    if set(r.pages) & set(m.pages) and set(r.recipients) & set(recipients):
                        status = "skipped"
                        reply = f"pages {r.pages} already went to {', '.join(r.recipients)} as message {r.seq}"
                        break
                self._db.execute(
                    "INSERT INTO message (job, key, seq, recipients, pages, status, reply, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job, m.key, m.seq, json.dumps(recipients), json.dumps(m.pages), status, reply, now),
                )
            if resend_unknown:
                self._db.execute("UPDATE message SET status='planned' WHERE job=? AND status='unknown'", (job,))
            if retry_failed:
                self._db.execute("UPDATE message SET status='planned' WHERE job=? AND status='failed'", (job,))
        with contextlib.suppress(FileNotFoundError):  # settled and committed: the journal has done its work
            journal_path(self.path).unlink()
        rows = {r.key: r for r in self.rows(job)}
        return {m.key: rows[m.key] for m in messages}

    def update_many(self, job: str, updates: Iterable[tuple[str, str, str, dict[str, str]]]) -> None:
        """Apply ``(key, status, reply, extra columns)`` updates in one durable transaction."""
        now = time.time()
        rows = [
            (
                status,
                reply,
                now,
                extra.get("filename"),  # the columns a caller may set; None keeps the stored value
                extra.get("attachment_sha256"),
                extra.get("message_id"),
                status == "sending",  # a "sending" mark counts an attempt
                job,
                key,
            )
            for key, status, reply, extra in updates
        ]
        with self._tx():
            # One prepared statement for the whole batch; a column not given keeps its value.
            self._db.executemany(
                "UPDATE message SET status=?, reply=?, updated=?, filename=coalesce(?, filename),"
                " attachment_sha256=coalesce(?, attachment_sha256), message_id=coalesce(?, message_id),"
                " attempts=attempts+? WHERE job=? AND key=?",
                rows,
            )

    def sent_since(self, since: float) -> tuple[int, int]:
        """(messages, recipients) accepted since ``since`` in any job: for providers' daily limits."""
        cur = self._db.execute(
            "SELECT recipients FROM message WHERE status='sent' AND updated >= ? AND job NOT LIKE 'test:%'",
            (since,),
        )
        rows = cur.fetchall()
        return len(rows), sum(len(json.loads(r[0])) for r in rows)

    def _tx(self) -> _Tx:
        return _Tx(self._db)


def journal_path(ledger: Path) -> Path:
    """``ledger.sqlite`` → ``ledger.sendlog`` (never ``-journal``: SQLite would take it for its own)."""
    return ledger.with_name(ledger.stem + ".sendlog")


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier writer of this very process has closed (prepare runs before writing)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def read_journal(path: Path, job: str) -> tuple[set[str], dict[str, tuple[str, str]]] | None:
    """What the journal proves for ``job``: (keys reserved but never started, recorded outcomes by key).

    None when it cannot be trusted (absent, another boot, a writer still running, a line it cannot read):
    then every ``sending`` row stays ``unknown``.
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    end = raw.find(b"\0")  # the unused, zero-filled rest of the map
    raw = raw[: raw.rfind(b"\n", 0, len(raw) if end < 0 else end) + 1]  # a torn last line is ignored
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    boot = _boot_id()
    reserved: set[str] = set()
    started: set[str] = set()
    outcomes: dict[str, tuple[str, str]] = {}
    trusted = False
    for line in text.split("\n")[:-1]:
        kind, _, rest = line.partition("\t")
        if kind == "B":  # B <boot id> <pid>: one per writer
            fields = rest.split("\t")
            if len(fields) != 2 or not boot or fields[0] != boot or not fields[1].isdigit() or _alive(int(fields[1])):
                return None
            trusted = True
            continue
        fields = rest.split("\t", 3)  # job, key[, status, reply]
        if not trusted or len(fields) < 2 or kind not in ("R", "S", "D"):
            return None
        if fields[0] != job:
            continue
        key = fields[1]  # lines apply in order: a later reservation or start supersedes an older outcome
        if kind == "R":
            reserved.add(key)
            started.discard(key)
            outcomes.pop(key, None)
        elif kind == "S":
            started.add(key)
            outcomes.pop(key, None)
        else:
            if len(fields) != 4 or fields[2] not in ("sent", "failed", "deferred", "unknown"):
                return None
            outcomes[key] = (fields[2], fields[3])
    if not trusted:
        return None
    never = reserved - started - set(outcomes)
    return never, outcomes


class Journal:
    """The send log of one writer, never fsynced (see the module docstring for what it proves).

    Lines are stored into a shared memory map of the file: the page cache is the file, so a line is in
    it as soon as the store returns, a process kill loses nothing stored, and a message costs no system
    call for its log lines (a ``write()`` per line cost ~15 us of the ~150 us a message takes). A kill in
    the middle of a store leaves at most the last line torn; readers ignore that line, which is safe for
    each kind: a torn ``S`` means DATA had not begun, a missing ``R`` or ``D`` only adds caution.
    """

    def __init__(self, path: Path, job: str) -> None:
        if "\t" in job or "\n" in job:
            raise ValueError("job id with a tab or newline")
        self.job = job
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        old = os.read(self._fd, os.fstat(self._fd).st_size or 1)
        end = old.find(b"\0")
        self._pos = len(old) if end < 0 else end
        self._size = 0
        self._map: mmap.mmap | None = None
        self._grow(0)
        if self._pos and self._map is not None and self._map[self._pos - 1 : self._pos] != b"\n":
            self._store(b"\n")  # an earlier writer's torn last line stays a line of its own (then unreadable)
        self._store(f"B\t{_boot_id()}\t{os.getpid()}\n".encode())

    def _grow(self, need: int) -> None:
        size = ((self._pos + need) // JOURNAL_CHUNK + 1) * JOURNAL_CHUNK
        if size <= self._size:
            return
        if self._map is not None:
            self._map.close()
        os.ftruncate(self._fd, size)
        if hasattr(os, "posix_fallocate"):  # blocks reserved now: a full disk is an OSError here, not a SIGBUS
            os.posix_fallocate(self._fd, 0, size)  # on a store into the map later
        self._map = mmap.mmap(self._fd, size)
        self._size = size

    def _store(self, line: bytes) -> None:
        if self._pos + len(line) > self._size:
            self._grow(len(line))
        assert self._map is not None
        self._map[self._pos : self._pos + len(line)] = line
        self._pos += len(line)

    def reserved(self, key: str) -> None:
        self._store(f"R\t{self.job}\t{key}\n".encode())

    def started(self, key: str) -> None:
        """In the file when this returns: the caller sends the message's first octet next."""
        self._store(f"S\t{self.job}\t{key}\n".encode())

    def outcome(self, key: str, status: str, reply: str) -> None:
        reply = reply.replace("\t", " ").replace("\n", " ").replace("\r", " ")
        self._store(f"D\t{self.job}\t{key}\t{status}\t{reply}\n".encode())

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            os.ftruncate(self._fd, self._pos)
        os.close(self._fd)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _row(r: tuple[object, ...]) -> Row:
    return Row(
        job=str(r[0]),
        key=str(r[1]),
        seq=int(r[2]),  # type: ignore[call-overload]
        recipients=tuple(json.loads(str(r[3]))),
        pages=tuple(json.loads(str(r[4]))),
        filename=str(r[5]),
        attachment_sha256=str(r[6]),
        message_id=str(r[7]),
        status=str(r[8]),
        reply=str(r[9]),
        attempts=int(r[10]),  # type: ignore[call-overload]
        updated=float(r[11]),  # type: ignore[arg-type]
    )


class LedgerWriter:
    """Group commit for concurrent senders: every update waits until it is durable, many share a commit."""

    def __init__(self, ledger: Ledger, job: str) -> None:
        self.ledger = ledger
        self.job = job
        # (update, future to complete when it is durable, or None for update_soon)
        self._pending: list[tuple[tuple[str, str, str, dict[str, str]], asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._journal: Journal | None = None

    async def __aenter__(self) -> LedgerWriter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._closing = True
        self._wake.set()
        await self._task  # drains every pending update before it returns
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(journal_path(self.ledger.path), self.job)
        return self._journal

    def reserve(self, key: str, **extra: str) -> asyncio.Future[None]:
        """Mark ``key`` ``sending`` ahead of its turn; the future completes when that is durable.

        The caller must await it before the message's DATA and call :meth:`started` right before the
        first octet. A reserved message that never starts goes back to ``planned`` after a crash (when
        the journal is trusted), so reserving ahead costs no duplicate and, normally, no ``unknown``.
        """
        if "\t" in key or "\n" in key:
            raise ValueError("message key with a tab or newline")
        self.journal.reserved(key)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self._pending.append(((key, "sending", "", extra), fut))
        self._wake.set()
        return fut

    def started(self, key: str) -> None:
        """Journal that the first octet of ``key``'s message is about to be sent (after its durable mark)."""
        self.journal.started(key)

    def update_soon(self, key: str, status: str, reply: str = "", **extra: str) -> None:
        """Record a final status without waiting for the commit (it rides with the next batch).

        For outcomes only: if the process dies first, the row stays ``sending`` and a re-run treats it as
        ``unknown`` (never resent), so a lost ``sent`` can cost a report line but never a duplicate.
        """
        if self._journal is not None:  # a kill before the commit then still knows the outcome
            self._journal.outcome(key, status, reply)
        self._pending.append(((key, status, reply, extra), None))  # failures surface via reserve()/update()
        self._wake.set()

    async def update(self, key: str, status: str, reply: str = "", **extra: str) -> None:
        """Record a new status; returns once it is committed to disk."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(((key, status, reply, extra), fut))
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                if self._closing:
                    return
                continue
            self._wake.set()  # look again after this commit: more may have arrived meanwhile
            try:
                await asyncio.to_thread(self.ledger.update_many, self.job, [u for u, _ in batch])
            except Exception as exc:  # the senders must learn that the ledger failed: they stop
                for _, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)
