"""A per-process cache of maildrop listings, keyed by the mailbox's HIGHESTMODSEQ. No I/O.

Invariants:
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

Listing = tuple[MaildropEntry, ...]


class MaildropCache:
    __slots__ = ("_entries", "_held", "hits", "limit", "misses")

    def __init__(self, limit: int = MAX_CACHED_MESSAGES) -> None:
        self.limit = limit
        self._entries: OrderedDict[int, tuple[int, int, Listing]] = OrderedDict()
        self._held = 0
        self.hits = 0
        self.misses = 0

    def get(self, mailbox_id: int, uidvalidity: int, modseq: int) -> Listing | None:
        entry = self._entries.get(mailbox_id)
        if entry is None or entry[0] != uidvalidity or entry[1] != modseq:
            self.misses += 1
            return None
        self._entries.move_to_end(mailbox_id)
        self.hits += 1
        return entry[2]

    def put(self, mailbox_id: int, uidvalidity: int, modseq: int, listing: Listing) -> None:
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
