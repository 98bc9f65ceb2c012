"""Full-text search of the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants:
- The FTS5 index is an external-content index over ``blob_text``: for every indexed blob, the text
  ``mime.searchable_text`` derives from its bytes (decoded header values; decoded text parts). It uses the
  trigram tokenizer, so a term matches as a substring, as IMAP SEARCH requires (RFC 9051 §6.4.4).
- Delivery does not write the text: the index is filled behind it, up to the ``fts_indexed`` watermark,
  and caught up before every search, so a search never misses a delivered message. Writing the text at
  append doubled the bytes each append put in the WAL (bench/store_append.py: 6,900 → 10,000 appends/s
  in one process without it).
- Catching up reads a chunk of blobs above the watermark, derives their text on a thread (no write lock is
  held meanwhile), then one write job indexes those still present and moves the watermark. Sessions of
  one process catch up one at a time (an asyncio lock); two processes catching up at once do not index a
  blob twice: the write job skips what is already under the watermark.
- Blob ids only grow (AUTOINCREMENT), so a blob committed after a chunk was read has a higher id than the
  chunk's top, and moving the watermark to that top skips nothing.
- A blob under the watermark has its ``blob_text`` row and index entry, or was deleted; it leaves both in
  the transaction that deletes it (external content: the delete needs the old text, and must never be
  issued for a blob that is not in the index). A blob above the watermark has no index entry; it may have
  a ``blob_text`` row (text moved there by the schema-3 upgrade), which the indexer then uses as is.
- A message whose text cannot be derived (a bug in ``mime``: logged) is indexed with empty text, so the
  watermark moves past it and later messages stay searchable.
- Terms shorter than three characters cannot use trigrams and are matched against ``blob_text`` directly.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.mime import searchable_text
from postroom.store import sqlite_db as db

log = logging.getLogger(__name__)

INDEX_CHUNK = 500  # blobs read, analysed and indexed per catch-up step (bounds one write job)
INDEX_CHUNK_OCTETS = 32 * 1024 * 1024  # … and at most about this many octets of messages in one step

#: (id, bytes or None, file path relative to the blob directory or None, has a blob_text row) of a blob to
#: index.
_Pending = tuple[int, bytes | None, str | None, bool]


class SearchMixin:
    """``search_text`` and the indexer behind it."""

    _index_lock: asyncio.Lock | None = None  # made on first use, in the store's event loop

    if TYPE_CHECKING:  # provided by SqliteStore
        blob_dir: Path

        async def _read(self, fn: Any) -> Any: ...

        async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any: ...

    def _unindexed(self, c: sqlite3.Connection) -> list[_Pending]:
        """The next chunk of blobs above the watermark (empty: the index is caught up)."""
        mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
        out: list[_Pending] = []
        octets = 0
        for blob_id, size, data, path, has_text in c.execute(
            "SELECT b.id, b.size, CASE WHEN t.id IS NULL THEN b.data END, b.path, t.id IS NOT NULL"
            " FROM blobs b LEFT JOIN blob_text t ON t.id = b.id WHERE b.id > ? ORDER BY b.id LIMIT ?",
            (mark, INDEX_CHUNK),
        ):
            out.append((blob_id, data, None if has_text else path, bool(has_text)))
            octets += 0 if has_text else size
            if octets >= INDEX_CHUNK_OCTETS:
                break
        return out

    def _derive_texts(self, pending: list[_Pending]) -> list[tuple[int, str, str] | int]:
        """On a worker thread: each pending blob's searchable text, or just its id when its text is in
        ``blob_text`` already (a file gone meanwhile: its blob was deleted, so it is left out)."""
        out: list[tuple[int, str, str] | int] = []
        for blob_id, data, path, has_text in pending:
            if has_text:
                out.append(blob_id)
                continue
            if data is None and path is not None:
                try:
                    data = (self.blob_dir / path).read_bytes()
                except FileNotFoundError:
                    continue
            heads, body = self._text_of(blob_id, data or b"")
            out.append((blob_id, heads, body))
        return out

    @staticmethod
    def _text_of(blob_id: int, raw: bytes) -> tuple[str, str]:
        """``searchable_text(raw)``, or empty text (logged) should it raise: a parser bug must not stall the
        index on this message for ever, nor fail every FETCH that re-analyses it."""
        try:
            return searchable_text(raw)
        except Exception:
            log.exception("blob %d: no searchable text derived, indexed as empty", blob_id)
            return "", ""

    def _index_tx(self, c: sqlite3.Connection, blob_id: int, heads: str, body: str) -> None:
        c.execute("INSERT INTO blob_text VALUES(?,?,?)", (blob_id, heads, body))
        c.execute("INSERT INTO fts(rowid, search_headers, search_body) VALUES(?,?,?)", (blob_id, heads, body))

    def _unindex(self, c: sqlite3.Connection, blob_id: int) -> bool:
        """Take a blob out of the index and drop its text before its row or text goes (external-content FTS
        needs the old text). True when it was indexed."""
        mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
        if blob_id > mark:  # not in the index: only text moved by the upgrade may be there
            c.execute("DELETE FROM blob_text WHERE id=?", (blob_id,))
            return False
        old = c.execute("SELECT search_headers, search_body FROM blob_text WHERE id=?", (blob_id,)).fetchone()
        if old is None:
            return False
        c.execute(
            "INSERT INTO fts(fts, rowid, search_headers, search_body) VALUES('delete', ?, ?, ?)",
            (blob_id, old[0], old[1]),
        )
        c.execute("DELETE FROM blob_text WHERE id=?", (blob_id,))
        return True

    def _index_chunk_tx(self, texts: list[tuple[int, str, str] | int], top: int) -> db.WriteFn:
        """The write job indexing ``texts`` (a chunk read up to blob ``top``) and moving the watermark."""

        def tx(c: sqlite3.Connection, t: db.Touched) -> None:
            mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
            for item in texts:
                if isinstance(item, int):  # its text is in blob_text already (and goes with its blob)
                    if item > mark:
                        c.execute(
                            "INSERT INTO fts(rowid, search_headers, search_body)"
                            " SELECT id, search_headers, search_body FROM blob_text WHERE id=?",
                            (item,),
                        )
                    continue
                blob_id, heads, body = item
                if blob_id > mark and c.execute("SELECT 1 FROM blobs WHERE id=?", (blob_id,)).fetchone():
                    self._index_tx(c, blob_id, heads, body)
            c.execute("UPDATE meta SET value=? WHERE key='fts_indexed'", (max(mark, top),))

        return tx

    async def _catch_up_index(self) -> None:
        """Index every blob committed before this call. One catch-up at a time per process: sessions
        searching at once wait for it instead of deriving the same chunk's text each."""
        if self._index_lock is None:
            self._index_lock = asyncio.Lock()
        async with self._index_lock:
            while True:
                pending: list[_Pending] = await self._read(self._unindexed)
                if not pending:
                    return
                texts = await asyncio.to_thread(self._derive_texts, pending)
                await self._write(self._index_chunk_tx(texts, pending[-1][0]))

    async def search_text(self, mailbox_id: int, terms: Sequence[str], body_only: bool = False) -> set[int]:
        await self._catch_up_index()
        long_terms = [t for t in terms if len(t) >= 3]
        short_terms = [t.lower() for t in terms if len(t) < 3]

        def q(c: sqlite3.Connection) -> set[int]:
            if long_terms:
                cols = "search_body" if body_only else "{search_headers search_body}"
                match = " AND ".join(f'{cols}:"{t.replace(chr(34), chr(34) * 2)}"' for t in long_terms)
                rows = c.execute(
                    "SELECT m.uid, m.blob_id FROM messages m WHERE m.mailbox_id=?"
                    " AND m.blob_id IN (SELECT rowid FROM fts WHERE fts MATCH ?)",
                    (mailbox_id, match),
                ).fetchall()
            else:
                rows = c.execute("SELECT uid, blob_id FROM messages WHERE mailbox_id=?", (mailbox_id,)).fetchall()
            if not short_terms:
                return {r[0] for r in rows}
            out: set[int] = set()
            for uid, blob_id in rows:  # terms under 3 characters: the trigram index cannot help
                row = c.execute("SELECT search_headers, search_body FROM blob_text WHERE id=?", (blob_id,)).fetchone()
                if row is None:  # delivered after this search began
                    continue
                heads, body = row
                text = (body if body_only else heads + "\n" + body).lower()
                if all(s in text for s in short_terms):
                    out.add(uid)
            return out

        result: set[int] = await self._read(q)
        return result
