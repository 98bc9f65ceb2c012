"""Full-text search of the embedded store (mixed into :class:`~postroom.store.sqlite.SqliteStore`).

Invariants: the FTS5 index is an external-content index over ``blobs.search_headers`` / ``search_body``
(the decoded text ``mime.analyze`` produced at append, kept beside the bytes). It uses the trigram
tokenizer, so a term matches as a substring, as IMAP SEARCH requires (RFC 9051 §6.4.4). It is filled behind
delivery up to the ``fts_indexed`` watermark and caught up before every search, so a search never misses a
delivered message; a blob leaves the index in the transaction that deletes it. Terms shorter than three
characters cannot use trigrams and are matched against the stored text directly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postroom.store import sqlite_db as db


class SearchMixin:
    """``search_text`` and the indexer behind it."""

    if TYPE_CHECKING:  # provided by SqliteStore

        async def _read(self, fn: Any) -> Any: ...

        async def _write(self, fn: db.WriteFn, prepare: Any = None) -> Any: ...

    def _index_pending(self, c: sqlite3.Connection, t: db.Touched) -> int:
        """Index up to 2,000 blobs above the ``fts_indexed`` watermark; returns how many."""
        mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
        top = c.execute("SELECT MAX(id) FROM (SELECT id FROM blobs WHERE id > ? ORDER BY id LIMIT 2000)", (mark,))
        upto = top.fetchone()[0]
        if upto is None:
            return 0
        cur = c.execute(
            "INSERT INTO fts(rowid, search_headers, search_body)"
            " SELECT id, search_headers, search_body FROM blobs WHERE id > ? AND id <= ?",
            (mark, upto),
        )
        c.execute("UPDATE meta SET value=? WHERE key='fts_indexed'", (upto,))
        return max(cur.rowcount, 1)

    def _unindex(self, c: sqlite3.Connection, blob_id: int) -> bool:
        """Take a blob out of the index before its row or text changes (external-content FTS needs the old
        text). True when it was indexed."""
        mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
        if blob_id > mark:
            return False
        c.execute(
            "INSERT INTO fts(fts, rowid, search_headers, search_body)"
            " SELECT 'delete', id, search_headers, search_body FROM blobs WHERE id=?",
            (blob_id,),
        )
        return True

    def _index_behind(self, c: sqlite3.Connection) -> bool:
        mark = c.execute("SELECT value FROM meta WHERE key='fts_indexed'").fetchone()[0]
        return c.execute("SELECT 1 FROM blobs WHERE id > ? LIMIT 1", (mark,)).fetchone() is not None

    async def search_text(self, mailbox_id: int, terms: Sequence[str], body_only: bool = False) -> set[int]:
        while await self._read(self._index_behind):
            await self._write(self._index_pending)
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
                heads, body = c.execute(
                    "SELECT search_headers, search_body FROM blobs WHERE id=?", (blob_id,)
                ).fetchone()
                text = (body if body_only else heads + "\n" + body).lower()
                if all(s in text for s in short_terms):
                    out.add(uid)
            return out

        result: set[int] = await self._read(q)
        return result
