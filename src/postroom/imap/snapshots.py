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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from postroom.imap.ports import ChangesLike, MetaLike

CAPACITY = 2000  # mailboxes kept per process (about 100 bytes per message each)


@dataclass(slots=True)
class Snapshot:
    uidvalidity: int
    modseq: int
    metas: list[MetaLike]


class Snapshots:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[int, Snapshot] = OrderedDict()

    def get(self, mailbox_id: int, uidvalidity: int) -> Snapshot | None:
        snap = self._items.get(mailbox_id)
        if snap is None:
            return None
        if snap.uidvalidity != uidvalidity:
            del self._items[mailbox_id]
            return None
        self._items.move_to_end(mailbox_id)
        return snap

    def put(self, mailbox_id: int, uidvalidity: int, modseq: int, metas: Sequence[MetaLike]) -> None:
        self._items[mailbox_id] = Snapshot(uidvalidity, modseq, list(metas))
        self._items.move_to_end(mailbox_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def drop(self, mailbox_id: int) -> None:
        self._items.pop(mailbox_id, None)


def apply(snap: Snapshot, changes: ChangesLike) -> None:
    """Bring ``snap`` to ``changes.highestmodseq`` (see the invariants)."""
    metas = snap.metas
    if changes.expunged:
        gone = set(changes.expunged)
        metas = [m for m in metas if m.uid not in gone]
    if changes.changed:
        index = {m.uid: i for i, m in enumerate(metas)}
        last = metas[-1].uid if metas else 0
        new: list[MetaLike] = []
        for m in changes.changed:
            i = index.get(m.uid)
            if i is not None:
                metas[i] = m
            elif m.uid > last:
                new.append(m)
        new.sort(key=lambda m: m.uid)
        metas.extend(new)
    snap.metas = metas
    snap.modseq = max(snap.modseq, changes.highestmodseq)
