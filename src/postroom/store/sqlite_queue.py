"""The outbound queue inside the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants:
- A message for remote recipients is queued in the same transaction that stores its local copies, so
  "250" covers both. One ``queue`` row per recipient; the bytes are shared through ``blobs``.
- ``queue_due`` *claims* rows for ``CLAIM_SECONDS`` by moving ``claimed_until`` forward in a write
  transaction, so two processes never attempt the same row at once; a crashed claimer's rows become due
  again when the claim expires (at worst a message is delivered twice, never lost).
- When no row of a queued message is pending or deferred any more, its blob reference is released.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postroom.errors import NotFoundError
from postroom.store import sqlite_db as db
from postroom.store.api import OutboundEnvelope, QueueEntry

CLAIM_SECONDS = 600.0  # a claimed row is not handed out again for this long

_Q_COLS = (
    "q.id, q.message_id, m.sender, q.recipient, q.domain, q.status, q.attempts, q.next_attempt,"
    " q.last_reply, q.created, q.notify, q.orcpt, m.ret, m.envid, m.smtputf8, m.eight_bit"
)


def _entry(row: Sequence[Any]) -> QueueEntry:
    return QueueEntry(
        id=row[0],
        message_id=row[1],
        sender=row[2],
        recipient=row[3],
        domain=row[4],
        status=row[5],
        attempts=row[6],
        next_attempt=row[7],
        last_reply=row[8],
        created=row[9],
        notify=row[10],
        orcpt=row[11],
        ret=row[12],
        envid=row[13],
        extra={"smtputf8": bool(row[14]), "eight_bit": bool(row[15])},
    )


class QueueMixin:
    """Queue operations; relies on SqliteStore's ``_read``/``_write``/``_unref_blobs``."""

    if TYPE_CHECKING:  # provided by SqliteStore

        async def _read(self, fn: Any) -> Any: ...

        async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any: ...

        def _unref_blobs(self, c: sqlite3.Connection, blob_ids: list[int], t: db.Touched) -> None: ...

        async def read(self, blob_id: int) -> bytes: ...

    def _enqueue_tx(self, c: sqlite3.Connection, blob_id: int, env: OutboundEnvelope, now: float) -> int:
        cur = c.execute(
            "INSERT INTO queue_messages(blob_id, sender, ret, envid, smtputf8, eight_bit, created)"
            " VALUES(?,?,?,?,?,?,?)",
            (blob_id, env.sender, env.ret, env.envid, int(env.smtputf8), int(env.eight_bit), now),
        )
        msg_id = cur.lastrowid
        assert msg_id is not None
        for r in env.recipients:
            domain = r.address.rpartition("@")[2].lower()
            c.execute(
                "INSERT INTO queue(message_id, recipient, domain, status, next_attempt, created, notify, orcpt)"
                " VALUES(?,?,?,'pending',?,?,?,?)",
                (msg_id, r.address, domain, now, now, r.notify, r.orcpt),
            )
        return msg_id

    async def queue_due(self, now: float, limit: int = 100) -> list[QueueEntry]:
        def tx(c: sqlite3.Connection, t: db.Touched) -> list[QueueEntry]:
            rows = c.execute(
                f"SELECT {_Q_COLS} FROM queue q JOIN queue_messages m ON m.id = q.message_id"
                " WHERE q.status IN ('pending','deferred') AND q.next_attempt <= ? AND q.claimed_until <= ?"
                " ORDER BY q.next_attempt, q.id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            for row in rows:
                c.execute("UPDATE queue SET claimed_until=? WHERE id=?", (now + CLAIM_SECONDS, row[0]))
            return [_entry(r) for r in rows]

        result: list[QueueEntry] = await self._write(tx)
        return result

    async def queue_list(self) -> list[QueueEntry]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_Q_COLS} FROM queue q JOIN queue_messages m ON m.id = q.message_id ORDER BY q.id"
            ).fetchall()
        )
        return [_entry(r) for r in rows]

    def _release_if_done(self, c: sqlite3.Connection, message_id: int, t: db.Touched) -> None:
        open_rows = c.execute(
            "SELECT COUNT(*) FROM queue WHERE message_id=? AND status IN ('pending','deferred')",
            (message_id,),
        ).fetchone()[0]
        if open_rows == 0:
            row = c.execute("SELECT blob_id FROM queue_messages WHERE id=?", (message_id,)).fetchone()
            if row is not None and row[0] > 0:
                c.execute("UPDATE queue_messages SET blob_id=0 WHERE id=?", (message_id,))
                self._unref_blobs(c, [row[0]], t)

    async def queue_update(
        self, entry_id: int, status: str, last_reply: str, next_attempt: float | None = None
    ) -> None:
        if status not in ("pending", "deferred", "delivered", "failed"):
            raise ValueError(f"bad queue status {status!r}")

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            row = c.execute("SELECT message_id, next_attempt FROM queue WHERE id=?", (entry_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no queue entry {entry_id}")
            c.execute(
                "UPDATE queue SET status=?, last_reply=?, next_attempt=?, attempts=attempts+1, claimed_until=0"
                " WHERE id=?",
                (status, last_reply, next_attempt if next_attempt is not None else row[1], entry_id),
            )
            if status in ("delivered", "failed"):
                self._release_if_done(c, row[0], t)
            t.mailboxes.add(0)

        await self._write(tx)

    async def queue_retry(self, entry_ids: Sequence[int] | None = None) -> int:
        ids = None if entry_ids is None else list(entry_ids)

        def tx(c: sqlite3.Connection, t: db.Touched) -> int:
            now = time.time()
            if ids is None:
                cur = c.execute(
                    "UPDATE queue SET next_attempt=?, claimed_until=0 WHERE status IN ('pending','deferred')",
                    (now,),
                )
                n = cur.rowcount
            else:
                n = 0
                for i in ids:
                    n += c.execute(
                        "UPDATE queue SET next_attempt=?, claimed_until=0"
                        " WHERE id=? AND status IN ('pending','deferred')",
                        (now, i),
                    ).rowcount
            t.mailboxes.add(0)
            return n

        result: int = await self._write(tx)
        return result

    async def queue_delete(self, entry_ids: Sequence[int]) -> int:
        ids = list(entry_ids)

        def tx(c: sqlite3.Connection, t: db.Touched) -> int:
            n = 0
            for i in ids:
                row = c.execute("SELECT message_id FROM queue WHERE id=?", (i,)).fetchone()
                if row is None:
                    continue
                c.execute("DELETE FROM queue WHERE id=?", (i,))
                self._release_if_done(c, row[0], t)
                n += 1
            return n

        result: int = await self._write(tx)
        return result

    async def read_queued(self, message_id: int) -> bytes:
        row = await self._read(
            lambda c: c.execute("SELECT blob_id FROM queue_messages WHERE id=?", (message_id,)).fetchone()
        )
        if row is None or row[0] == 0:
            raise NotFoundError(f"queued message {message_id} is gone")
        return await self.read(row[0])
