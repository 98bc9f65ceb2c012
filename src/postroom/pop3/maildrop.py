"""The maildrop a POP3 session works on, and a per-process cache of them keyed by HIGHESTMODSEQ. No I/O.

Invariants of :class:`Maildrop`: its entries, UIDVALIDITY, count and size never change after construction;
the full UIDL and LIST bodies are computed at most once and then shared by every session that logs in to
the same unchanged mailbox (a 1,000-message listing costs about half a millisecond to format).

Invariants of :class:`MaildropCache`:
- An entry is used only when the mailbox's current ``(uidvalidity, highestmodseq)`` equals the one it was
  stored with. The store gives every append, expunge and flag change a new, strictly larger MODSEQ
  (``store/api.py``), so a hit is exactly the listing ``Store.messages`` would return now (numbers, UIDs,
  sizes, blob ids: POP3 needs nothing else). A listing read just after the key was taken may already contain
  a newer change; it is still a real state of the mailbox, and any later login sees the newer MODSEQ and
  misses.
- The cache is bounded by the total number of entries it holds (:data:`MAX_CACHED_MESSAGES`), evicting the
  least recently used maildrops first.
"""

from __future__ import annotations

from collections import OrderedDict

from postroom.pop3.events import MaildropEntry

MAX_CACHED_MESSAGES = 200_000  # listings held per worker (~100 octets each: ~20 MB at most)


class Maildrop:
    """The listing fixed at login (RFC 1939 §5): message n is ``entries[n - 1]``."""

    __slots__ = ("_scan", "_uidl", "count", "entries", "size", "uidvalidity")

    def __init__(self, entries: tuple[MaildropEntry, ...], uidvalidity: int) -> None:
        self.entries = entries
        self.uidvalidity = uidvalidity
        self.count = len(entries)
        self.size = sum(e.size for e in entries)
        self._uidl: bytes | None = None
        self._scan: bytes | None = None

    def __len__(self) -> int:
        return self.count

    def unique_id(self, entry: MaildropEntry) -> str:
        """RFC 1939 §7 unique-id: 1-70 chars of 0x21-0x7E; stable and unique via UIDVALIDITY and UID."""
        return f"{self.uidvalidity}.{entry.uid}"

    def uidl_lines(self, deleted: frozenset[int] | set[int]) -> bytes:
        """``n unique-id`` CRLF for every message not in ``deleted`` (message numbers)."""
        if not deleted and self._uidl is not None:
            return self._uidl
        v = self.uidvalidity
        out = "".join(f"{i} {v}.{e.uid}\r\n" for i, e in enumerate(self.entries, 1) if i not in deleted).encode()
        if not deleted:
            self._uidl = out
        return out

    def scan_lines(self, deleted: frozenset[int] | set[int]) -> bytes:
        """``n size`` CRLF for every message not in ``deleted`` (RFC 1939 §5 scan listing)."""
        if not deleted and self._scan is not None:
            return self._scan
        out = "".join(f"{i} {e.size}\r\n" for i, e in enumerate(self.entries, 1) if i not in deleted).encode()
        if not deleted:
            self._scan = out
        return out


EMPTY = Maildrop((), 0)


class MaildropCache:
    __slots__ = ("_entries", "_held", "hits", "limit", "misses")

    def __init__(self, limit: int = MAX_CACHED_MESSAGES) -> None:
        self.limit = limit
        self._entries: OrderedDict[int, tuple[int, int, Maildrop]] = OrderedDict()
        self._held = 0
        self.hits = 0
        self.misses = 0

    def get(self, mailbox_id: int, uidvalidity: int, modseq: int) -> Maildrop | None:
        entry = self._entries.get(mailbox_id)
        if entry is None or entry[0] != uidvalidity or entry[1] != modseq:
            self.misses += 1
            return None
        self._entries.move_to_end(mailbox_id)
        self.hits += 1
        return entry[2]

    def put(self, mailbox_id: int, uidvalidity: int, modseq: int, listing: Maildrop) -> None:
        old = self._entries.pop(mailbox_id, None)
        if old is not None:
            self._held -= len(old[2])
        if len(listing) > self.limit:
            return
        self._entries[mailbox_id] = (uidvalidity, modseq, listing)
        self._held += len(listing)
        while self._held > self.limit:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self._held -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)
