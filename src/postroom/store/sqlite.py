"""The embedded store: SQLite (WAL) metadata, message bytes inline or in files, group commit.

Layout of the store directory (``sqlite:///DIR``): ``meta.db`` (+ WAL), ``blobs/`` for messages larger
than ``INLINE_MAX``, ``run/`` for the change-feed sockets of the processes that have it open.

Invariants (beyond those of :mod:`postroom.store.api`):
- Messages up to ``INLINE_MAX`` octets live in the ``blobs`` table, larger ones in files: see
  :mod:`postroom.store.sqlite_append`, which also holds the append path.
- ``blobs.refs`` counts the messages and queue entries that use a blob; the blob goes when it reaches 0.
- The full-text index is filled behind delivery (blobs above the ``fts_indexed`` watermark) and caught up
  before every search, so delivery never waits for indexing and a search never misses a message.
- Small reads run on the event loop, without a thread hop: ``read``/``read_range`` of messages stored in
  the table up to ``LOOP_READ_MAX`` octets, ``get_mailbox``, ``list_mailboxes``, ``changes_since`` and
  ``structures`` of up to ``LOOP_STRUCTURES`` messages (primary-key or index look-ups, ~10-30 µs; a hop to
  a reader thread and back costs ~100-125 µs of CPU). Files, larger messages and scans (``messages``,
  ``status``, search) stay on the reader threads, so the loop never waits on file I/O or a long query.
  WAL readers never block on the writer; every read sees every commit announced before it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from postroom.errors import NotFoundError, StoreError
from postroom.mime import STRUCTURE_VERSION, minimal_structure
from postroom.store import sqlite_db as db
from postroom.store import sqlite_native
from postroom.store.api import (
    Changes,
    FlagOp,
    FlagUpdate,
    MessageMeta,
    QueueEntry,
    Store,
    Watch,
)
from postroom.store.changes import ChangeHub
from postroom.store.sqlite_accounts import AccountsMixin
from postroom.store.sqlite_append import (
    INLINE_MAX,
    PENDING_VERSION,
    AppendMixin,
    flag_text,
    structure_of,
)
from postroom.store.sqlite_mailboxes import MailboxesMixin
from postroom.store.sqlite_queue import QueueMixin
from postroom.store.sqlite_search import SearchMixin

READER_THREADS = 4
LOOP_READ_MAX = 256 * 1024  # octets of a table-stored message read on the event loop; larger: a reader thread
LOOP_STRUCTURES = 32  # structures looked up on the event loop in one call; more: a reader thread
T = TypeVar("T")

IN_CHUNK = 500  # ids per ``IN (…)`` list: far below SQLite's 32,766 host parameters


def _blob_rows(c: sqlite3.Connection, columns: str, ids: list[int]) -> Iterator[tuple[Any, ...]]:
    """``(id, *columns)`` of each blob in ``ids`` that exists, ``IN_CHUNK`` ids per query."""
    for i in range(0, len(ids), IN_CHUNK):
        chunk = ids[i : i + IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        yield from c.execute(f"SELECT id, {columns} FROM blobs WHERE id IN ({marks})", chunk)


FLAG_SETS_KEPT = 4096  # distinct flag texts interned per process (a mailbox has a handful)
_flag_sets: dict[str, frozenset[str]] = {}


def _flags(text: str) -> frozenset[str]:
    """The flag set stored as ``text``, one shared object per distinct text: listings of thousands of
    messages hold a handful of sets, and comparing or hashing the same object is immediate."""
    flags = _flag_sets.get(text)
    if flags is None:
        flags = frozenset(text.split()) if text else frozenset()
        if len(_flag_sets) >= FLAG_SETS_KEPT:
            _flag_sets.clear()
        _flag_sets[text] = flags
    return flags


def _meta(row: Sequence[Any]) -> MessageMeta:
    return MessageMeta(row[0], row[1], _flags(row[2]), row[3], row[4], row[5])


class SqliteStore(AppendMixin, AccountsMixin, MailboxesMixin, QueueMixin, SearchMixin, Store):
    """The default store. Open with :func:`open_store`."""

    def __init__(self, directory: Path, writer_scheduling: str = "normal") -> None:
        self.dir = directory
        self.writer_scheduling = writer_scheduling
        self.db_path = directory / "meta.db"
        self.blob_dir = directory / "blobs"
        self.hub = ChangeHub(directory / "run")
        self._readers: db.ReaderPool | None = None
        self._writer: db.GroupCommitWriter | None = None
        self._native: sqlite_native.NativeCommit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)
        self._readers = db.ReaderPool(self.db_path, READER_THREADS)
        self._readers.start()
        self._native = await asyncio.to_thread(sqlite_native.open_native, self.db_path)
        fast = (self._append_many, self._append_native) if self._native is not None else None
        self._writer = db.GroupCommitWriter(
            self.db_path,
            self._remove_dead_files,
            self._announce,
            fast=fast,
            batch_scheduling=self.writer_scheduling == "batch",
        )
        self._writer.start()
        self.hub.start(self._loop)

    def _open_sync(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(exist_ok=True)
        conn = db.connect(self.db_path)
        try:
            db.init_schema(conn)
        finally:
            conn.close()

    async def close(self) -> None:
        self.hub.stop()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
            self._writer = None
        if self._native is not None:
            self._native.close()
            self._native = None
        if self._readers is not None:
            await asyncio.to_thread(self._readers.stop)
            self._readers = None

    @staticmethod
    def _remove_dead_files(touched: db.Touched) -> None:
        """Writer thread, after COMMIT: the files of messages whose last reference went."""
        for path in touched.unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _announce(self, touched: db.Touched) -> None:
        """Event loop, after COMMIT: wake the watchers of what changed, here and in other processes."""
        self.hub.notify(touched.mailboxes, touched.accounts)

    # -- plumbing ---------------------------------------------------------------------------------
    async def _read(self, fn: Any, on_loop: bool = False) -> Any:
        """Run ``fn(connection)`` on a reader thread, or with ``on_loop`` at once on the event loop (small
        look-ups only: see the module invariants)."""
        assert self._readers is not None, "store is not open"
        return await self._readers.run(fn, on_loop)

    async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any:
        assert self._writer is not None, "store is not open"
        return await self._writer.submit(fn, prepare)

    # -- plumbing shared by the mixins -----------------------------------------------------------
    def _unref_blobs(self, c: sqlite3.Connection, blob_ids: list[int], t: db.Touched) -> None:
        for blob_id in blob_ids:
            c.execute("UPDATE blobs SET refs = refs - 1 WHERE id=?", (blob_id,))
        for blob_id in set(blob_ids):
            row = c.execute("SELECT refs, path FROM blobs WHERE id=?", (blob_id,)).fetchone()
            if row is not None and row[0] <= 0:
                self._unindex(c, blob_id)
                c.execute("DELETE FROM blobs WHERE id=?", (blob_id,))
                if row[1]:
                    t.unlink.append(str(self.blob_dir / row[1]))

    # -- messages ---------------------------------------------------------------------------------
    async def messages(self, mailbox_id: int) -> list[MessageMeta]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT uid, blob_id, flags, modseq, size, internaldate FROM messages WHERE mailbox_id=? ORDER BY uid",
                (mailbox_id,),
            ).fetchall()
        )
        return [_meta(r) for r in rows]

    async def changes_since(self, mailbox_id: int, modseq: int) -> Changes:
        def q(c: sqlite3.Connection) -> Changes:
            # Every change to a mailbox's messages raises its HIGHESTMODSEQ in the same transaction, so
            # when that has not moved there is nothing to read (the common case: one look-up).
            mb = c.execute("SELECT highestmodseq, uidnext FROM mailboxes WHERE id=?", (mailbox_id,)).fetchone()
            if mb is not None and mb[0] <= modseq:
                return Changes([], [], mb[0], mb[1])
            c.execute("BEGIN")
            try:
                mb = c.execute("SELECT highestmodseq, uidnext FROM mailboxes WHERE id=?", (mailbox_id,)).fetchone()
                if mb is None:
                    return Changes([], [], modseq, 0, exists=False)
                rows = c.execute(
                    "SELECT uid, blob_id, flags, modseq, size, internaldate FROM messages"
                    " WHERE mailbox_id=? AND modseq>? ORDER BY uid",
                    (mailbox_id, modseq),
                ).fetchall()
                gone = c.execute(
                    "SELECT uid FROM expunged WHERE mailbox_id=? AND modseq>? ORDER BY uid",
                    (mailbox_id, modseq),
                ).fetchall()
            finally:
                c.execute("COMMIT")
            return Changes([_meta(r) for r in rows], [g[0] for g in gone], mb[0], mb[1])

        result: Changes = await self._read(q, on_loop=True)
        return result

    def _bytes_of(self, data: bytes | None, path: str | None) -> bytes:
        """A message's bytes from its ``blobs`` row: in the row, or in its file under ``blobs/``."""
        if data is not None:
            return bytes(data)
        assert path is not None, "a blob row holds its bytes or names its file"
        return (self.blob_dir / path).read_bytes()

    async def read(self, blob_id: int) -> bytes:
        def small(c: sqlite3.Connection) -> bytes | None:
            row = c.execute(
                "SELECT CASE WHEN size<=? THEN data END FROM blobs WHERE id=?", (LOOP_READ_MAX, blob_id)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no message {blob_id}")
            return None if row[0] is None else bytes(row[0])  # None: in a file, or too large for the loop

        data: bytes | None = await self._read(small, on_loop=True)
        if data is not None:
            return data

        def q(c: sqlite3.Connection) -> bytes:
            row = c.execute("SELECT data, path FROM blobs WHERE id=?", (blob_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no message {blob_id}")
            return self._bytes_of(row[0], row[1])

        result: bytes = await self._read(q)
        return result

    async def read_range(self, blob_id: int, offset: int, length: int) -> bytes:
        def small(c: sqlite3.Connection) -> bytes | None:
            # substr() clamps like the slow path below: nothing past the end, nothing before the start.
            row = c.execute(
                "SELECT CASE WHEN path IS NULL AND size<=? THEN substr(data, ?, ?) END FROM blobs WHERE id=?",
                (LOOP_READ_MAX, max(0, offset) + 1, max(0, length), blob_id),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no message {blob_id}")
            return None if row[0] is None else bytes(row[0])

        part: bytes | None = await self._read(small, on_loop=True)
        if part is not None:
            return part

        def q(c: sqlite3.Connection) -> bytes:
            row = c.execute("SELECT path, size FROM blobs WHERE id=?", (blob_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no message {blob_id}")
            start = max(0, min(offset, row[1]))
            n = max(0, min(length, row[1] - start))
            if row[0] is None:
                data = c.execute("SELECT substr(data, ?, ?) FROM blobs WHERE id=?", (start + 1, n, blob_id)).fetchone()
                return bytes(data[0]) if data and data[0] is not None else b""
            with open(self.blob_dir / row[0], "rb") as fh:
                fh.seek(start)
                return fh.read(n)

        result: bytes = await self._read(q)
        return result

    async def structures(self, blob_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(dict.fromkeys(blob_ids))

        def q(c: sqlite3.Connection) -> dict[int, dict[str, Any]]:
            return {blob_id: orjson.loads(text) for blob_id, text in _blob_rows(c, "structure", ids)}

        result: dict[int, dict[str, Any]] = await self._read(q, on_loop=len(ids) <= LOOP_STRUCTURES)
        stale = {b: v for b, st in result.items() if (v := st.get("v", 0)) < STRUCTURE_VERSION}
        if stale:  # deferred by append, or written by an older Postroom: analyse now, once, and keep it
            result.update(await self._analyse(stale))
        return result

    async def _analyse(self, versions: dict[int, int]) -> dict[int, dict[str, Any]]:
        """Analyse the messages whose stored structure is pending or an older analyser's (blob id → stored
        version), keep the results in one commit and return them. The bytes are read and analysed in one
        reader-thread job: a client's first FETCH of new mail may ask for hundreds, which must not stall the
        event loop. An older analyser's row was indexed with that analyser's search text, so it is indexed
        again; a pending row's text is the current code's (the indexer derives it from the bytes), so only
        its structure is written. A message deleted meanwhile gets the structure of an empty message, which
        is not stored."""
        ids = list(versions)

        def load(c: sqlite3.Connection) -> dict[int, tuple[dict[str, Any], tuple[str, str] | None]]:
            out: dict[int, tuple[dict[str, Any], tuple[str, str] | None]] = {}
            for blob_id, data, path in _blob_rows(c, "data, path", ids):
                try:
                    raw = self._bytes_of(data, path)
                except FileNotFoundError:
                    continue
                text = None if versions[blob_id] == PENDING_VERSION else self._text_of(blob_id, raw)
                out[blob_id] = (structure_of(raw), text)
            return out

        found: dict[int, tuple[dict[str, Any], tuple[str, str] | None]] = await self._read(load)
        rows = [(orjson.dumps(st).decode(), blob_id) for blob_id, (st, _) in found.items()]
        reindex = [(blob_id, *text) for blob_id, (_, text) in found.items() if text is not None]

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            c.executemany("UPDATE blobs SET structure=? WHERE id=?", rows)
            for blob_id, heads, body in reindex:
                if self._unindex(c, blob_id):  # indexed with an older analyser's text: index it again
                    self._index_tx(c, blob_id, heads, body)

        if rows:
            await self._write(tx)
        return {blob_id: found[blob_id][0] if blob_id in found else minimal_structure(b"") for blob_id in ids}

    async def set_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: FlagOp,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[MessageMeta], list[int]]:
        done = await self.update_flags(mailbox_id, uids, op, flags, unchanged_since)
        return done.changed, done.failed

    async def update_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: FlagOp,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> FlagUpdate:
        wanted = set(flags)
        uid_list = list(uids)

        def tx(c: sqlite3.Connection, t: db.Touched) -> FlagUpdate:
            # One statement reads all the rows and one writes each distinct new flag set (not two per
            # message): every SQLite call lets the event loop's thread take the GIL, and getting it back can
            # cost this thread a switch interval when the loop is busy (8-10 ms per STORE under load).
            mb = c.execute("SELECT highestmodseq FROM mailboxes WHERE id=?", (mailbox_id,)).fetchone()
            if mb is None:
                raise NotFoundError(f"no mailbox {mailbox_id}")
            new_modseq = mb[0] + 1
            found = c.execute(
                "SELECT json_group_array(json_array(uid, blob_id, flags, modseq, size,"
                " printf('%!.17g', internaldate)))"  # 17 digits: the REAL comes back exactly
                " FROM messages WHERE mailbox_id=? AND uid IN (SELECT value FROM json_each(?))",
                (mailbox_id, orjson.dumps(uid_list).decode()),
            ).fetchone()[0]
            rows = {r[0]: r for r in orjson.loads(found)}
            changed: list[MessageMeta] = []
            failed: list[int] = []
            updates: dict[str, list[int]] = {}  # new flag text -> UIDs: one UPDATE per distinct result
            for uid in dict.fromkeys(uid_list):
                row = rows.get(uid)
                if row is None:
                    continue
                if unchanged_since is not None and row[3] > unchanged_since:
                    failed.append(uid)
                    continue
                old = _flags(row[2])
                new = old | wanted if op == "add" else old - wanted if op == "remove" else frozenset(wanted)
                if new == old:
                    continue
                text = flag_text(new)
                updates.setdefault(text, []).append(uid)
                changed.append(MessageMeta(uid, row[1], _flags(text), new_modseq, row[4], float(row[5])))
            for text, group in updates.items():
                c.execute(
                    "UPDATE messages SET flags=?, modseq=?"
                    " WHERE mailbox_id=? AND uid IN (SELECT value FROM json_each(?))",
                    (text, new_modseq, mailbox_id, orjson.dumps(group).decode()),
                )
            if not changed:
                return FlagUpdate(changed, failed, mb[0], mb[0])
            c.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (new_modseq, mailbox_id))
            t.mailboxes.add(mailbox_id)
            return FlagUpdate(changed, failed, mb[0], new_modseq)

        result: FlagUpdate = await self._write(tx)
        return result

    def _remove_tx(self, c: sqlite3.Connection, mailbox_id: int, uids: list[int], t: db.Touched) -> list[int]:
        mb = c.execute("SELECT highestmodseq FROM mailboxes WHERE id=?", (mailbox_id,)).fetchone()
        if mb is None:
            raise NotFoundError(f"no mailbox {mailbox_id}")
        modseq = mb[0] + 1
        removed: list[int] = []
        blobs: list[int] = []
        for uid in uids:
            row = c.execute("SELECT blob_id FROM messages WHERE mailbox_id=? AND uid=?", (mailbox_id, uid)).fetchone()
            if row is None:
                continue
            c.execute("DELETE FROM messages WHERE mailbox_id=? AND uid=?", (mailbox_id, uid))
            c.execute("INSERT OR REPLACE INTO expunged VALUES(?,?,?)", (mailbox_id, uid, modseq))
            removed.append(uid)
            blobs.append(row[0])
        if removed:
            c.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (modseq, mailbox_id))
            self._unref_blobs(c, blobs, t)
            t.mailboxes.add(mailbox_id)
        return sorted(removed)

    async def expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        only = None if uids is None else set(uids)

        def tx(c: sqlite3.Connection, t: db.Touched) -> list[int]:
            rows = c.execute(
                "SELECT uid FROM messages WHERE mailbox_id=? AND instr(' '||flags||' ', ' \\Deleted ')>0",
                (mailbox_id,),
            ).fetchall()
            victims = [r[0] for r in rows if only is None or r[0] in only]
            return self._remove_tx(c, mailbox_id, victims, t)

        result: list[int] = await self._write(tx)
        return result

    async def delete_messages(self, mailbox_id: int, uids: Sequence[int]) -> list[int]:
        uid_list = list(uids)
        result: list[int] = await self._write(lambda c, t: self._remove_tx(c, mailbox_id, uid_list, t))
        return result

    def _copy_tx(
        self, c: sqlite3.Connection, src: int, uids: list[int], dst: int, t: db.Touched
    ) -> list[tuple[int, int]]:
        mb = c.execute("SELECT uidnext, highestmodseq FROM mailboxes WHERE id=?", (dst,)).fetchone()
        if mb is None or c.execute("SELECT 1 FROM mailboxes WHERE id=?", (src,)).fetchone() is None:
            raise NotFoundError("no such mailbox")
        uidnext, modseq = mb[0], mb[1] + 1
        pairs: list[tuple[int, int]] = []
        for uid in sorted(set(uids)):
            row = c.execute(
                "SELECT blob_id, flags, size, internaldate FROM messages WHERE mailbox_id=? AND uid=?",
                (src, uid),
            ).fetchone()
            if row is None:
                continue
            c.execute(
                "INSERT INTO messages VALUES(?,?,?,?,?,?,?)",
                (dst, uidnext, row[0], row[1], modseq, row[2], row[3]),
            )
            c.execute("UPDATE blobs SET refs = refs + 1 WHERE id=?", (row[0],))
            pairs.append((uid, uidnext))
            uidnext += 1
        if pairs:
            c.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, modseq, dst))
            t.mailboxes.add(dst)
        return pairs

    async def copy(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        uid_list = list(uids)
        result: list[tuple[int, int]] = await self._write(
            lambda c, t: self._copy_tx(c, src_mailbox_id, uid_list, dst_mailbox_id, t)
        )
        return result

    async def move(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        uid_list = list(uids)

        def tx(c: sqlite3.Connection, t: db.Touched) -> list[tuple[int, int]]:
            pairs = self._copy_tx(c, src_mailbox_id, uid_list, dst_mailbox_id, t)
            self._remove_tx(c, src_mailbox_id, [p[0] for p in pairs], t)
            return pairs

        result: list[tuple[int, int]] = await self._write(tx)
        return result

    # -- change feed ------------------------------------------------------------------------------
    def watch(self, mailbox_id: int) -> Watch:
        return self.hub.watch("m", mailbox_id)

    def watch_account(self, account_id: int) -> Watch:
        return self.hub.watch("a", account_id)


def open_store(url: str, writer_scheduling: str = "normal") -> Store:
    """``sqlite:///DIR`` → an unopened SqliteStore (call ``await store.open()``); ``writer_scheduling``:
    ``"batch"`` or ``"normal"``, see :class:`~postroom.store.sqlite_db.GroupCommitWriter`."""
    if url.startswith("sqlite:///"):
        # sqlite:///relative/dir or sqlite:////absolute/dir (the SQLAlchemy convention)
        return SqliteStore(Path(url[len("sqlite:///") :]), writer_scheduling=writer_scheduling)
    if url.startswith(("postgresql://", "postgres://")):
        raise StoreError("the PostgreSQL backend is not available yet; use sqlite:///DIR")
    raise StoreError(f"unknown store url {url!r}")


__all__ = ["INLINE_MAX", "QueueEntry", "SqliteStore", "open_store"]
