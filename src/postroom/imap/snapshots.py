"""Per-process cache of mailbox listings, brought up to date with ``changes_since`` instead of re-read.

SELECT needs every message's metadata. Reading 1,000 rows and building 1,000 objects costs milliseconds;
applying the few changes since the last SELECT of the same mailbox costs microseconds. This module keeps
the last listing per mailbox and merges a ``Changes`` into it. Pure data handling, no I/O.

Invariants:
- A snapshot is valid for one ``uidvalidity``; a different one (mailbox recreated) drops it.
- ``apply`` yields exactly what ``messages()`` would return at ``changes.highestmodseq``: expunged UIDs
  removed, changed ones replaced, new ones (UID above every known one) appended in UID order.
- Sessions get a *copy* of the list, so a session's view never changes under it.
- At most ``capacity`` mailboxes are kept (least recently used dropped).
- ``Snapshot.lines[i]``, when not None, is the ``FETCH (UID FLAGS RFC822.SIZE)`` response line of
  ``metas[i]`` at MSN ``i + 1``: ``apply`` clears the line of every message it replaces and drops them all
  when an expunge shifts the MSNs. A session uses a line only while its view holds the very same meta
  object at the same index. At most ``lines_capacity`` snapshots keep lines.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from postroom.imap.ports import ChangesLike, MetaLike

CAPACITY = 2000  # mailboxes kept per process (about 100 bytes per message each)
LINES_CAPACITY = 200  # of them, mailboxes that also keep rendered FETCH lines (about 100 bytes per message)
BISECT_MAX = 64  # changes applied by binary search; above this an index of the listing is built


@dataclass(slots=True)
class Snapshot:
    uidvalidity: int
    modseq: int
    metas: list[MetaLike]
    lines: list[bytes | None] | None = None  # rendered FETCH lines (see the invariants), made on demand


class Snapshots:
    def __init__(self, capacity: int = CAPACITY, lines_capacity: int = LINES_CAPACITY) -> None:
        self.capacity = capacity
        self.lines_capacity = lines_capacity
        self._items: OrderedDict[int, Snapshot] = OrderedDict()
        self._with_lines: OrderedDict[int, Snapshot] = OrderedDict()

    def lines(self, mailbox_id: int, snap: Snapshot) -> list[bytes | None]:
        """``snap``'s line cache, made empty when it has none; the least recently used beyond
        ``lines_capacity`` loses its lines."""
        if snap.lines is None or len(snap.lines) != len(snap.metas):
            snap.lines = [None] * len(snap.metas)
        self._with_lines[mailbox_id] = snap
        self._with_lines.move_to_end(mailbox_id)
        while len(self._with_lines) > self.lines_capacity:
            self._with_lines.popitem(last=False)[1].lines = None
        return snap.lines

    def get(self, mailbox_id: int, uidvalidity: int) -> Snapshot | None:
        snap = self._items.get(mailbox_id)
        if snap is None:
            return None
        if snap.uidvalidity != uidvalidity:
            self.drop(mailbox_id)
            return None
        self._items.move_to_end(mailbox_id)
        return snap

    def put(self, mailbox_id: int, uidvalidity: int, modseq: int, metas: Sequence[MetaLike]) -> None:
        self._with_lines.pop(mailbox_id, None)
        self._items[mailbox_id] = Snapshot(uidvalidity, modseq, list(metas))
        self._items.move_to_end(mailbox_id)
        while len(self._items) > self.capacity:
            self._with_lines.pop(self._items.popitem(last=False)[0], None)

    def drop(self, mailbox_id: int) -> None:
        self._items.pop(mailbox_id, None)
        self._with_lines.pop(mailbox_id, None)


def _uid(meta: MetaLike) -> int:
    return meta.uid


def apply(snap: Snapshot, changes: ChangesLike) -> None:
    """Bring ``snap`` to ``changes.highestmodseq`` (see the invariants)."""
    metas = snap.metas
    lines = snap.lines
    if changes.expunged:
        gone = set(changes.expunged)
        metas = [m for m in metas if m.uid not in gone]
        if len(metas) != len(snap.metas):
            lines = None  # the MSNs after the first expunged message moved
    if changes.changed:
        last = metas[-1].uid if metas else 0
        new: list[MetaLike] = []
        n = len(metas)
        if len(changes.changed) <= BISECT_MAX:  # metas ascend by UID: a binary search per change
            for m in changes.changed:
                i = bisect_left(metas, m.uid, key=_uid)
                if i < n and metas[i].uid == m.uid:
                    metas[i] = m
                    if lines is not None:
                        lines[i] = None
                elif m.uid > last:
                    new.append(m)
        else:  # many changes: one index of every message is cheaper
            index = {m.uid: i for i, m in enumerate(metas)}
            for m in changes.changed:
                j = index.get(m.uid)
                if j is not None:
                    metas[j] = m
                    if lines is not None:
                        lines[j] = None
                elif m.uid > last:
                    new.append(m)
        new.sort(key=lambda m: m.uid)
        metas.extend(new)
        if lines is not None:
            lines.extend([None] * len(new))
    snap.metas = metas
    snap.lines = lines
    snap.modseq = max(snap.modseq, changes.highestmodseq)
