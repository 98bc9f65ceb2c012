"""The selected mailbox as one session sees it: message sequence numbers ↔ UIDs, flags, MODSEQ.

Invariants:
- ``uids`` ascends; MSN n is ``uids[n-1]``. The mapping changes only when this session *announces* an
  expunge (EXPUNGE/VANISHED) or new messages (EXISTS), never silently (RFC 9051 §7.5.1).
- An expunge learned while EXPUNGE may not be sent (during FETCH, STORE, SEARCH) is kept in ``gone``:
  the message keeps its MSN until the next command that may announce it.
- ``modseq`` is the highest MODSEQ whose changes this view has applied.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from postroom.imap.grammar import BadArgs, SeqSet
from postroom.imap.ports import MetaLike


class View:
    def __init__(
        self,
        mailbox_id: int,
        name: str,
        uidvalidity: int,
        uidnext: int,
        modseq: int,
        metas: Sequence[MetaLike],
        readonly: bool,
    ) -> None:
        self.mailbox_id = mailbox_id
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.modseq = modseq
        self.readonly = readonly
        self.metas: list[MetaLike] = list(metas)
        self.uids: list[int] = [m.uid for m in self.metas]
        self.gone: set[int] = set()  # expunged in the store, not yet announced here

    def __len__(self) -> int:
        return len(self.uids)

    def index_of_uid(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        return None

    def indices(self, seq: SeqSet, uid: bool, saved: list[int] | None = None) -> list[int]:
        """Ascending, distinct 0-based indices addressed by ``seq`` (MSNs or UIDs)."""
        n = len(self.uids)
        if n == 0:
            return []
        if len(seq.ranges) == 1 and not seq.saved:  # one range (1:*, a single UID): no set, no sort
            lo, hi = next(seq.bounds(self.uids[-1] if uid else n))
            if uid:
                return list(range(bisect_left(self.uids, lo), bisect_right(self.uids, hi)))
            return list(range(max(lo, 1) - 1, min(hi, n)))
        out: set[int] = set()
        if seq.saved:
            for u in saved or ():
                i = self.index_of_uid(u)
                if i is not None:
                    out.add(i)
            return sorted(out)
        if uid:
            largest = self.uids[-1]
            for lo, hi in seq.bounds(largest):
                out.update(range(bisect_left(self.uids, lo), bisect_right(self.uids, hi)))
        else:
            for lo, hi in seq.bounds(n):
                out.update(range(max(lo, 1) - 1, min(hi, n)))
        return sorted(out)

    def check_msns(self, seq: SeqSet) -> None:
        """Raise BadArgs when a sequence number beyond the last message is named (RFC 9051 §9 seq-number:
        "*" on an empty mailbox is allowed and addresses nothing)."""
        n = len(self.uids)
        for a, b in seq.ranges:
            if a > n or b > n:
                raise BadArgs("Invalid message sequence number")

    def replace(self, meta: MetaLike) -> int | None:
        """Store a newer state of a message in the view; its index, or None when not in the view."""
        i = self.index_of_uid(meta.uid)
        if i is not None:
            self.metas[i] = meta
        return i

    def append(self, meta: MetaLike) -> None:
        self.metas.append(meta)
        self.uids.append(meta.uid)

    def remove_uids(self, uids: set[int]) -> list[int]:
        """Remove these UIDs; return their MSNs in *descending* order (the order to announce them)."""
        msns = [i + 1 for i, u in enumerate(self.uids) if u in uids]
        if msns:
            keep = [i for i, u in enumerate(self.uids) if u not in uids]
            self.metas = [self.metas[i] for i in keep]
            self.uids = [self.uids[i] for i in keep]
        self.gone -= uids
        msns.reverse()
        return msns
