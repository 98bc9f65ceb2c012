"""Mailboxes of the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants:
- ``INBOX`` is matched in any case and stored as ``INBOX`` (RFC 9051 §5.1); other names are kept as given.
- Each new mailbox gets a UIDVALIDITY above every one given before in this store (``meta.last_uidvalidity``,
  at least the current time), so a mailbox re-created under an old name never repeats one (RFC 9051 §2.3.1.1).
- Renaming INBOX moves its messages to the new mailbox and leaves INBOX empty, with its UIDNEXT kept and a
  tombstone per moved message; renaming any other mailbox renames its children too. Deleting one releases
  its messages' bytes (``blobs.refs``). Each is one transaction, announced on the change feed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postroom.errors import AlreadyExistsError, NotFoundError, StoreError
from postroom.store import sqlite_db as db
from postroom.store.api import Mailbox, MailboxStatus

_MB_COLS = "id, account_id, name, uidvalidity, uidnext, highestmodseq, special_use, subscribed"


def _mailbox(row: Sequence[Any]) -> Mailbox:
    return Mailbox(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]))


def _canon_mailbox(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


class MailboxesMixin:
    """Mailbox operations; relies on SqliteStore's ``_read``/``_write``/``_unref_blobs``."""

    if TYPE_CHECKING:  # provided by SqliteStore

        async def _read(self, fn: Any, on_loop: bool = False) -> Any: ...

        async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any: ...

        def _unref_blobs(self, c: sqlite3.Connection, blob_ids: list[int], t: db.Touched) -> None: ...

    def _next_uidvalidity(self, c: sqlite3.Connection) -> int:
        last = c.execute("SELECT value FROM meta WHERE key='last_uidvalidity'").fetchone()[0]
        value = max(int(time.time()), int(last) + 1)
        c.execute("UPDATE meta SET value=? WHERE key='last_uidvalidity'", (value,))
        return value

    def _create_mailbox_tx(self, c: sqlite3.Connection, account_id: int, name: str, special: str | None) -> int:
        cur = c.execute(
            "INSERT INTO mailboxes(account_id, name, uidvalidity, uidnext, highestmodseq, special_use)"
            " VALUES(?,?,?,1,1,?)",
            (account_id, name, self._next_uidvalidity(c), special),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def list_mailboxes(self, account_id: int) -> list[Mailbox]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_MB_COLS} FROM mailboxes WHERE account_id=? ORDER BY name", (account_id,)
            ).fetchall(),
            on_loop=True,
        )
        return [_mailbox(r) for r in rows]

    async def get_mailbox(self, account_id: int, name: str) -> Mailbox | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_MB_COLS} FROM mailboxes WHERE account_id=? AND name=?",
                (account_id, _canon_mailbox(name)),
            ).fetchone(),
            on_loop=True,
        )
        return _mailbox(row) if row else None

    async def create_mailbox(self, account_id: int, name: str, special_use: str | None = None) -> Mailbox:
        name = _canon_mailbox(name)

        def tx(c: sqlite3.Connection, t: db.Touched) -> Mailbox:
            try:
                mb_id = self._create_mailbox_tx(c, account_id, name, special_use)
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"mailbox {name} exists") from None
            t.accounts.add(account_id)
            row = c.execute(f"SELECT {_MB_COLS} FROM mailboxes WHERE id=?", (mb_id,)).fetchone()
            return _mailbox(row)

        result: Mailbox = await self._write(tx)
        return result

    def _drop_mailbox_tx(self, c: sqlite3.Connection, mb_id: int, t: db.Touched) -> None:
        blobs = c.execute("SELECT blob_id FROM messages WHERE mailbox_id=?", (mb_id,)).fetchall()
        c.execute("DELETE FROM messages WHERE mailbox_id=?", (mb_id,))
        c.execute("DELETE FROM expunged WHERE mailbox_id=?", (mb_id,))
        c.execute("DELETE FROM mailboxes WHERE id=?", (mb_id,))
        self._unref_blobs(c, [b[0] for b in blobs], t)
        t.mailboxes.add(mb_id)

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        name = _canon_mailbox(name)

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            row = c.execute("SELECT id FROM mailboxes WHERE account_id=? AND name=?", (account_id, name)).fetchone()
            if row is None:
                raise NotFoundError(f"no mailbox {name}")
            self._drop_mailbox_tx(c, row[0], t)
            t.accounts.add(account_id)

        await self._write(tx)

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        old, new = _canon_mailbox(old), _canon_mailbox(new)

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            row = c.execute("SELECT id FROM mailboxes WHERE account_id=? AND name=?", (account_id, old)).fetchone()
            if row is None:
                raise NotFoundError(f"no mailbox {old}")
            if c.execute("SELECT 1 FROM mailboxes WHERE account_id=? AND name=?", (account_id, new)).fetchone():
                raise AlreadyExistsError(f"mailbox {new} exists")
            if new.startswith(old + "/"):
                raise StoreError(f"cannot rename {old} into its own child {new}")
            if old == "INBOX":
                # RFC 9051 §6.3.6: messages move to the new mailbox, INBOX stays and is empty. INBOX keeps
                # its UIDVALIDITY and UIDNEXT (UIDs are never reused) and gets a tombstone per moved message,
                # so sessions with INBOX selected see them expunged (VANISHED under QRESYNC).
                new_id = self._create_mailbox_tx(c, account_id, new, None)
                moved = [r[0] for r in c.execute("SELECT uid FROM messages WHERE mailbox_id=?", (row[0],))]
                c.execute("UPDATE messages SET mailbox_id=? WHERE mailbox_id=?", (new_id, row[0]))
                hi = c.execute("SELECT MAX(uid), MAX(modseq) FROM messages WHERE mailbox_id=?", (new_id,)).fetchone()
                c.execute(
                    "UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?",
                    ((hi[0] or 0) + 1, max(hi[1] or 1, 1), new_id),
                )
                if moved:
                    modseq = c.execute("SELECT highestmodseq FROM mailboxes WHERE id=?", (row[0],)).fetchone()[0] + 1
                    c.executemany(
                        "INSERT OR REPLACE INTO expunged VALUES(?,?,?)", [(row[0], uid, modseq) for uid in moved]
                    )
                    c.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (modseq, row[0]))
                t.mailboxes.add(new_id)
            else:
                c.execute("UPDATE mailboxes SET name=? WHERE id=?", (new, row[0]))
                prefix = old + "/"
                for child_id, child_name in c.execute(
                    "SELECT id, name FROM mailboxes WHERE account_id=? AND substr(name,1,?)=?",
                    (account_id, len(prefix), prefix),
                ).fetchall():
                    c.execute(
                        "UPDATE mailboxes SET name=? WHERE id=?",
                        (new + "/" + child_name[len(prefix) :], child_id),
                    )
                    t.mailboxes.add(child_id)
            t.mailboxes.add(row[0])
            t.accounts.add(account_id)

        await self._write(tx)

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            cur = c.execute(
                "UPDATE mailboxes SET subscribed=? WHERE account_id=? AND name=?",
                (int(subscribed), account_id, _canon_mailbox(name)),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no mailbox {name}")
            t.accounts.add(account_id)

        await self._write(tx)

    async def status(self, mailbox_id: int) -> MailboxStatus:
        def q(c: sqlite3.Connection) -> MailboxStatus:
            mb = c.execute(
                "SELECT uidnext, uidvalidity, highestmodseq FROM mailboxes WHERE id=?", (mailbox_id,)
            ).fetchone()
            if mb is None:
                raise NotFoundError(f"no mailbox {mailbox_id}")
            n, size, unseen, deleted = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(size),0),"
                " SUM(CASE WHEN instr(' '||flags||' ', ' \\Seen ')=0 THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN instr(' '||flags||' ', ' \\Deleted ')>0 THEN 1 ELSE 0 END)"
                " FROM messages WHERE mailbox_id=?",
                (mailbox_id,),
            ).fetchone()
            return MailboxStatus(n, unseen or 0, deleted or 0, size, mb[0], mb[1], mb[2])

        result: MailboxStatus = await self._read(q)
        return result
