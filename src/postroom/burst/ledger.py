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
- Writes are batched: concurrent senders' updates share one transaction (:class:`LedgerWriter`).
"""

from __future__ import annotations

import asyncio
import json
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
        with self._tx():
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
        rows = {r.key: r for r in self.rows(job)}
        return {m.key: rows[m.key] for m in messages}

    def update_many(self, job: str, updates: Iterable[tuple[str, str, str, dict[str, str]]]) -> None:
        """Apply ``(key, status, reply, extra columns)`` updates in one durable transaction."""
        now = time.time()
        with self._tx():
            for key, status, reply, extra in updates:
                cols = "".join(f", {c}=?" for c in extra if c in ("filename", "attachment_sha256", "message_id"))
                vals = [v for c, v in extra.items() if c in ("filename", "attachment_sha256", "message_id")]
                bump = ", attempts=attempts+1" if status == "sending" else ""
                self._db.execute(
                    f"UPDATE message SET status=?, reply=?, updated=?{cols}{bump} WHERE job=? AND key=?",  # noqa: S608
                    (status, reply, now, *vals, job, key),
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
        self._pending: list[tuple[tuple[str, str, str, dict[str, str]], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> LedgerWriter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._closing = True
        self._wake.set()
        await self._task  # drains every pending update before it returns

    def update_soon(self, key: str, status: str, reply: str = "", **extra: str) -> None:
        """Record a final status without waiting for the commit (it rides with the next batch).

        For outcomes only: if the process dies first, the row stays ``sending`` and a re-run treats it as
        ``unknown`` (never resent), so a lost ``sent`` can cost a report line but never a duplicate.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception())  # nobody awaits it; failures surface via update()
        self._pending.append(((key, status, reply, extra), fut))
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
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
