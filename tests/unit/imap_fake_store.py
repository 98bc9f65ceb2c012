"""An in-memory mail store with the subset of the Store API the IMAP core uses (``imap.ports.MailPort``).

Every method completes without suspending, so tests drive the core's coroutines with ``run`` and no event
loop. Watches are set synchronously on every change, like the real change feed after a commit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from postroom.errors import AlreadyExistsError, NotFoundError
from postroom.mime import analyze, searchable_text

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (everything it awaits is this fake)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("coroutine suspended: it awaited something other than the fake store")


@dataclass(frozen=True)
class Meta:
    uid: int
    blob_id: int
    flags: frozenset[str]
    modseq: int
    size: int
    internaldate: float


@dataclass(frozen=True)
class Box:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None = None
    subscribed: bool = True


@dataclass(frozen=True)
class Status:
    messages: int
    unseen: int
    deleted: int
    size: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int


@dataclass(frozen=True)
class Changes:
    changed: list[Meta]
    expunged: list[int]
    highestmodseq: int
    uidnext: int
    exists: bool = True


@dataclass(frozen=True)
class FlagUpdate:
    changed: list[Meta]
    failed: list[int]
    modseq_before: int
    modseq_after: int


@dataclass
class Account:
    id: int
    address: str


class FakeWatch:
    def __init__(self, store: FakeStore, mailbox_id: int) -> None:
        self.store, self.mailbox_id, self.pending = store, mailbox_id, False

    def clear(self) -> None:
        self.pending = False

    def close(self) -> None:
        self.store.watches.discard(self)


@dataclass
class _Mailbox:
    box: Box
    msgs: dict[int, Meta] = field(default_factory=dict)
    tombstones: dict[int, int] = field(default_factory=dict)  # uid -> modseq of its expunge


class FakeStore:
    def __init__(self) -> None:
        self.boxes: dict[str, _Mailbox] = {}
        self.blobs: dict[int, bytes] = {}
        self.structs: dict[int, dict[str, Any]] = {}
        self.watches: set[FakeWatch] = set()
        self.account = Account(1, "alice@example.test")
        for name, use in (("INBOX", None), ("Sent", "\\Sent"), ("Trash", "\\Trash")):
            run(self.create_mailbox(1, name, use))

    # -- helpers --------------------------------------------------------------------------------
    def _by_id(self, mailbox_id: int) -> _Mailbox:
        for mb in self.boxes.values():
            if mb.box.id == mailbox_id:
                return mb
        raise NotFoundError(str(mailbox_id))

    def _bump(self, mb: _Mailbox, **changes: Any) -> int:
        modseq = mb.box.highestmodseq + 1
        mb.box = dataclasses.replace(mb.box, highestmodseq=modseq, **changes)
        for w in self.watches:
            if w.mailbox_id == mb.box.id:
                w.pending = True
        return modseq

    def deliver(self, name: str, raw: bytes, flags: Iterable[str] = ()) -> int:
        mb = self.boxes[name]
        return run(self.append_one(mb.box.id, raw, frozenset(flags), None))

    async def append_one(self, mailbox_id: int, raw: bytes, flags: frozenset[str], when: float | None) -> int:
        mb = self._by_id(mailbox_id)
        blob = len(self.blobs) + 1
        self.blobs[blob] = raw
        self.structs[blob] = analyze(raw)
        uid = mb.box.uidnext
        modseq = self._bump(mb, uidnext=uid + 1)
        mb.msgs[uid] = Meta(uid, blob, flags, modseq, len(raw), 1_700_000_000.0 if when is None else when)
        return uid

    # -- MailPort -------------------------------------------------------------------------------
    async def list_mailboxes(self, account_id: int) -> list[Box]:
        return [mb.box for mb in self.boxes.values()]

    async def get_mailbox(self, account_id: int, name: str) -> Box | None:
        mb = self.boxes.get("INBOX" if name.upper() == "INBOX" else name)
        return mb.box if mb else None

    async def create_mailbox(self, account_id: int, name: str, special_use: str | None = None) -> Box:
        if name in self.boxes:
            raise AlreadyExistsError(name)
        box = Box(len(self.boxes) + 1, name, 1000 + len(self.boxes), 1, 1, special_use)
        self.boxes[name] = _Mailbox(box)
        return box

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        if name not in self.boxes:
            raise NotFoundError(name)
        gone = self.boxes.pop(name)
        for w in self.watches:
            if w.mailbox_id == gone.box.id:
                w.pending = True

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        if old not in self.boxes:
            raise NotFoundError(old)
        if new in self.boxes:
            raise AlreadyExistsError(new)
        mb = self.boxes.pop(old)
        mb.box = dataclasses.replace(mb.box, name=new)
        self.boxes[new] = mb

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        if name not in self.boxes:
            raise NotFoundError(name)
        mb = self.boxes[name]
        mb.box = dataclasses.replace(mb.box, subscribed=subscribed)

    async def status(self, mailbox_id: int) -> Status:
        mb = self._by_id(mailbox_id)
        ms = list(mb.msgs.values())
        return Status(
            len(ms),
            sum("\\Seen" not in m.flags for m in ms),
            sum("\\Deleted" in m.flags for m in ms),
            sum(m.size for m in ms),
            mb.box.uidnext,
            mb.box.uidvalidity,
            mb.box.highestmodseq,
        )

    async def messages(self, mailbox_id: int) -> list[Meta]:
        mb = self._by_id(mailbox_id)
        return [mb.msgs[u] for u in sorted(mb.msgs)]

    async def changes_since(self, mailbox_id: int, modseq: int) -> Changes:
        try:
            mb = self._by_id(mailbox_id)
        except NotFoundError:
            return Changes([], [], modseq, 0, exists=False)
        changed = [mb.msgs[u] for u in sorted(mb.msgs) if mb.msgs[u].modseq > modseq]
        gone = sorted(u for u, ms in mb.tombstones.items() if ms > modseq)
        return Changes(changed, gone, mb.box.highestmodseq, mb.box.uidnext)

    async def read(self, blob_id: int) -> bytes:
        return self.blobs[blob_id]

    async def read_range(self, blob_id: int, offset: int, length: int) -> bytes:
        return self.blobs[blob_id][offset : offset + length]

    async def structures(self, blob_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        return {b: self.structs[b] for b in blob_ids}

    async def set_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: Literal["add", "remove", "replace"],
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[Meta], list[int]]:
        mb = self._by_id(mailbox_id)
        fs = frozenset(flags)
        changed: list[Meta] = []
        failed: list[int] = []
        for uid in uids:
            m = mb.msgs.get(uid)
            if m is None:
                continue
            if unchanged_since is not None and m.modseq > unchanged_since:
                failed.append(uid)
                continue
            new = m.flags | fs if op == "add" else m.flags - fs if op == "remove" else fs
            if new != m.flags:
                modseq = self._bump(mb)
                m = dataclasses.replace(m, flags=new, modseq=modseq)
                mb.msgs[uid] = m
                changed.append(m)
        return changed, failed

    async def update_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        op: Literal["add", "remove", "replace"],
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> FlagUpdate:
        mb = self._by_id(mailbox_id)
        before = mb.box.highestmodseq
        changed, failed = await self.set_flags(mailbox_id, uids, op, flags, unchanged_since)
        return FlagUpdate(changed, failed, before, mb.box.highestmodseq)

    async def expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        mb = self._by_id(mailbox_id)
        gone = [u for u in sorted(mb.msgs) if "\\Deleted" in mb.msgs[u].flags and (uids is None or u in uids)]
        return self._remove(mb, gone)

    def _remove(self, mb: _Mailbox, uids: list[int]) -> list[int]:
        if uids:
            modseq = self._bump(mb)
            for u in uids:
                del mb.msgs[u]
                mb.tombstones[u] = modseq
        return uids

    async def copy(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        src = self._by_id(src_mailbox_id)
        out = []
        for u in uids:
            m = src.msgs[u]
            new = await self.append_one(dst_mailbox_id, self.blobs[m.blob_id], m.flags, m.internaldate)
            out.append((u, new))
        return out

    async def move(self, src_mailbox_id: int, uids: Sequence[int], dst_mailbox_id: int) -> list[tuple[int, int]]:
        pairs = await self.copy(src_mailbox_id, uids, dst_mailbox_id)
        self._remove(self._by_id(src_mailbox_id), [a for a, _ in pairs])
        return pairs

    async def search_text(self, mailbox_id: int, terms: Sequence[str], body_only: bool = False) -> set[int]:
        mb = self._by_id(mailbox_id)
        out = set()
        for u, m in mb.msgs.items():
            heads, body = searchable_text(self.blobs[m.blob_id])
            text = body if body_only else heads + "\n" + body
            if all(t.lower() in text.lower() for t in terms):
                out.add(u)
        return out

    def watch(self, mailbox_id: int) -> FakeWatch:
        w = FakeWatch(self, mailbox_id)
        self.watches.add(w)
        return w
