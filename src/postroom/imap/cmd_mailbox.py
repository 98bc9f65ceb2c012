"""Mailbox commands: SELECT, EXAMINE, CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS,
APPEND, CHECK, CLOSE, UNSELECT, IDLE (RFC 9051 §6.3-6.4, RFC 5258/5819 LIST-EXTENDED/STATUS, RFC 6154,
RFC 7162 CONDSTORE/QRESYNC on SELECT, RFC 4315 APPENDUID, RFC 2177 IDLE).

Invariants: the hierarchy separator is ``/``; INBOX cannot be deleted; APPEND into a missing mailbox answers
``[TRYCREATE]``; selecting a mailbox replaces the previous selection (and its watch) atomically.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

from postroom.errors import AlreadyExistsError, NotFoundError, StoreFullError
from postroom.imap import encode
from postroom.imap.core import No, Outcome, Session, State
from postroom.imap.grammar import (
    MAX_NUMBER64,
    BadArgs,
    arity,
    astring,
    atom,
    date_time,
    flag_list,
    mailbox,
    number,
    seqset,
)
from postroom.imap.ports import MailboxLike, MetaLike
from postroom.imap.snapshots import apply as apply_changes
from postroom.imap.tokens import Lit8, Token
from postroom.imap.view import View

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
SPECIAL_USES = frozenset({"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"})
STATUS_ITEMS = frozenset(
    {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ", "RECENT", "APPENDLIMIT"}
)
_BARE_LF = re.compile(rb"(?<!\r)\n")


async def _get(s: Session, name: str) -> MailboxLike:
    assert s.account is not None
    mbox = await s.store.get_mailbox(s.account.id, name)
    if mbox is None:
        raise No(f"No such mailbox {name[:100]}", "NONEXISTENT")
    return mbox


async def select(s: Session, tag: str, args: list[Token], uid: bool, readonly: bool = False) -> Outcome | None:
    arity(args, 1, 2)
    name = mailbox(args[0])
    qresync: list[Token] | None = None
    if len(args) == 2:
        params = args[1]
        if not isinstance(params, list):
            raise BadArgs("bad SELECT parameters")
        i = 0
        while i < len(params):
            p = atom(params[i]).upper()
            if p == "CONDSTORE":
                s.condstore = True
                i += 1
            elif p == "QRESYNC" and i + 1 < len(params) and isinstance(params[i + 1], list):
                if not s.qresync:
                    raise BadArgs("QRESYNC must be enabled first")
                qresync = params[i + 1]  # type: ignore[assignment]
                i += 2
            else:
                raise BadArgs(f"unknown SELECT parameter {p[:40]}")
    was_selected = s.state is State.SELECTED
    s.deselect()
    if was_selected and (s.qresync or s.rev2):
        s.untagged("OK [CLOSED] Previous mailbox closed")
    mbox = await _get(s, name)
    s.watch = s.store.watch(mbox.id)
    metas, modseq = await _listing(s, mbox)
    uidnext = max(mbox.uidnext, metas[-1].uid + 1 if metas else 1)
    view = View(mbox.id, mbox.name, mbox.uidvalidity, uidnext, modseq, metas, readonly)
    s.view = view
    s.state = State.SELECTED
    # A mailbox holds few distinct flag sets: look at each once, not at every message's flags.
    keywords = {f for flags in {m.flags for m in view.metas} for f in flags if not f.startswith("\\")}
    first_unseen = next((i + 1 for i, m in enumerate(view.metas) if "\\Seen" not in m.flags), 0)
    flags = " ".join(SYSTEM_FLAGS + tuple(sorted(keywords)))
    s.untagged(f"{len(view)} EXISTS")
    if not s.rev2:
        s.untagged("0 RECENT")
        if first_unseen:
            s.untagged(f"OK [UNSEEN {first_unseen}] First unseen")
    s.untagged(f"OK [UIDVALIDITY {view.uidvalidity}] UIDs valid")
    s.untagged(f"OK [UIDNEXT {view.uidnext}] Predicted next UID")
    s.untagged(f"FLAGS ({flags})")
    perm = "" if readonly else flags + " \\*"
    s.untagged(f"OK [PERMANENTFLAGS ({perm})] Limited")
    s.untagged(f"OK [HIGHESTMODSEQ {view.modseq}] Highest")
    if s.rev2:
        s.send(b'* LIST () "/" ' + encode.astring(view.name) + b"\r\n")
    if qresync is not None:
        await _qresync(s, view, qresync)
    s.tagged(
        tag,
        "OK",
        "SELECT completed" if not readonly else "EXAMINE completed",
        "READ-ONLY" if readonly else "READ-WRITE",
    )
    return None


async def _listing(s: Session, mbox: MailboxLike) -> tuple[Sequence[MetaLike], int]:
    """Every message of ``mbox`` and the MODSEQ they are current at: from the per-process snapshot
    brought up to date with ``changes_since`` when there is one, else from ``messages()``."""
    snaps = s.snapshots
    snap = snaps.get(mbox.id, mbox.uidvalidity) if snaps is not None else None
    if snap is None:
        metas = await s.store.messages(mbox.id)
        if snaps is not None:
            snaps.put(mbox.id, mbox.uidvalidity, mbox.highestmodseq, metas)
        return metas, mbox.highestmodseq
    if snap.modseq < mbox.highestmodseq:
        changes = await s.store.changes_since(mbox.id, snap.modseq)
        if not changes.exists:
            raise No(f"No such mailbox {mbox.name[:100]}", "NONEXISTENT")
        apply_changes(snap, changes)
    return snap.metas, snap.modseq


async def _qresync(s: Session, view: View, params: list[Token]) -> None:
    """RFC 7162 §3.2.5: report what changed since the client's MODSEQ, expunges as VANISHED (EARLIER)."""
    if len(params) < 2:
        raise BadArgs("QRESYNC needs uidvalidity and modseq")
    uidvalidity = number(params[0])
    modseq = number(params[1], MAX_NUMBER64)
    known = seqset(params[2]) if len(params) > 2 and isinstance(params[2], str) else None
    if uidvalidity != view.uidvalidity:
        return
    changes = await s.store.changes_since(view.mailbox_id, modseq)
    largest = view.uids[-1] if view.uids else 0
    vanished = [u for u in changes.expunged if known is None or known.contains(u, max(largest, u))]
    if vanished:
        s.untagged("VANISHED (EARLIER) " + encode.seq_text(sorted(vanished)))
    for meta in changes.changed:
        i = view.index_of_uid(meta.uid)
        if i is None:
            continue
        items = [b"UID %d" % meta.uid, b"FLAGS " + encode.flag_list(view.metas[i].flags)]
        items.append(b"MODSEQ (%d)" % view.metas[i].modseq)
        s.send(s.fetch_line(i + 1, items))


async def examine(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    return await select(s, tag, args, uid, readonly=True)


async def create(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 1, 2)
    assert s.account is not None
    name = mailbox(args[0]).rstrip("/")
    use = None
    if len(args) == 2:  # RFC 6154 §3: CREATE name (USE (\Sent))
        opts = args[1]
        if not (isinstance(opts, list) and len(opts) == 2 and atom(opts[0]).upper() == "USE"):
            raise BadArgs("bad CREATE parameters")
        uses = opts[1] if isinstance(opts[1], list) else [opts[1]]
        for u in uses:
            canon = next((x for x in SPECIAL_USES if x.lower() == atom(u).lower()), None)
            if canon is None:
                raise No(f"Unsupported special use {atom(u)[:40]}", "USEATTR")
            use = canon
    if not name or name == "INBOX" or "//" in name or name.startswith("/"):
        raise No("Cannot create a mailbox of that name", "CANNOT")
    parts = name.split("/")
    for depth in range(1, len(parts)):  # RFC 9051 §6.3.4: create the superior names that are missing
        parent = "/".join(parts[:depth])
        if parent != "INBOX" and await s.store.get_mailbox(s.account.id, parent) is None:
            with contextlib.suppress(AlreadyExistsError):
                await s.store.create_mailbox(s.account.id, parent)
    try:
        await s.store.create_mailbox(s.account.id, name, use)
    except AlreadyExistsError:
        raise No("Mailbox exists already", "ALREADYEXISTS") from None
    s.tagged(tag, "OK", "CREATE completed")
    return None


async def delete(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 1)
    assert s.account is not None
    name = mailbox(args[0])
    if name == "INBOX":
        raise No("INBOX cannot be deleted", "CANNOT")
    try:
        await s.store.delete_mailbox(s.account.id, name)
    except NotFoundError:
        raise No("No such mailbox", "NONEXISTENT") from None
    s.tagged(tag, "OK", "DELETE completed")
    return None


async def rename(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 2)
    assert s.account is not None
    old, new = mailbox(args[0]), mailbox(args[1]).rstrip("/")
    if not new or new == "INBOX" or new.startswith(old + "/"):  # not into its own inferior
        raise No("Cannot rename to that name", "CANNOT")
    try:
        await s.store.rename_mailbox(s.account.id, old, new)
    except NotFoundError:
        raise No("No such mailbox", "NONEXISTENT") from None
    except AlreadyExistsError:
        raise No("Target mailbox exists already", "ALREADYEXISTS") from None
    s.tagged(tag, "OK", "RENAME completed")
    return None


async def subscribe(s: Session, tag: str, args: list[Token], uid: bool, on: bool = True) -> Outcome | None:
    arity(args, 1)
    assert s.account is not None
    try:
        await s.store.set_subscribed(s.account.id, mailbox(args[0]), on)
    except NotFoundError:
        if on:
            raise No("No such mailbox", "NONEXISTENT") from None
    s.tagged(tag, "OK", ("SUBSCRIBE" if on else "UNSUBSCRIBE") + " completed")
    return None


async def unsubscribe(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    return await subscribe(s, tag, args, uid, on=False)


def _pattern(ref: str, pat: str) -> re.Pattern[str]:
    full = (ref + pat) if ref and not pat.startswith("/") else pat
    parts = []
    for ch in full:
        if ch == "*":
            parts.append(".*")
        elif ch == "%":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(ch))
    body = "".join(parts)
    if full.upper().startswith("INBOX"):
        return re.compile("(?i:INBOX)" + "".join(parts[5:]) + r"\Z", re.DOTALL)
    return re.compile(body + r"\Z", re.DOTALL)


async def list_(s: Session, tag: str, args: list[Token], uid: bool, lsub: bool = False) -> Outcome | None:
    assert s.account is not None
    pos = 0
    select_opts: set[str] = set()
    if not lsub and args and isinstance(args[0], list):
        select_opts = {atom(t).upper() for t in args[0]}
        pos = 1
    if len(args) < pos + 2:
        raise BadArgs("LIST needs a reference and a pattern")
    ref = astring(args[pos])
    pats_tok = args[pos + 1]
    patterns = [astring(p) for p in pats_tok] if isinstance(pats_tok, list) else [astring(pats_tok)]
    return_opts: set[str] = set()
    status_items: list[str] = []
    rest = args[pos + 2 :]
    if rest:
        if (
            len(rest) != 2
            or not isinstance(rest[0], str)
            or rest[0].upper() != "RETURN"
            or not isinstance(rest[1], list)
        ):
            raise BadArgs("bad LIST return options")
        opts = rest[1]
        i = 0
        while i < len(opts):
            o = atom(opts[i]).upper()
            if o == "STATUS" and i + 1 < len(opts) and isinstance(opts[i + 1], list):
                wanted = opts[i + 1]
                assert isinstance(wanted, list)
                status_items = [atom(x).upper() for x in wanted]
                if not status_items or any(x not in STATUS_ITEMS for x in status_items):
                    raise BadArgs("bad LIST RETURN STATUS items")
                i += 2
                continue
            return_opts.add(o)
            i += 1
    verb = "LSUB" if lsub else "LIST"
    if patterns == [""]:  # RFC 9051 §6.3.9: the hierarchy delimiter
        s.untagged(f'{verb} (\\Noselect) "/" ""')
        s.tagged(tag, "OK", f"{verb} completed")
        return None
    boxes = await s.store.list_mailboxes(s.account.id)
    names = {b.name for b in boxes}
    regexes = [_pattern(ref, p) for p in patterns]
    subscribed_only = lsub or "SUBSCRIBED" in select_opts
    special_only = "SPECIAL-USE" in select_opts
    for b in sorted(boxes, key=lambda b: (b.name != "INBOX", b.name)):
        if not any(r.match(b.name) for r in regexes):
            continue
        if subscribed_only and not b.subscribed:
            continue
        if special_only and not b.special_use:
            continue
        attrs = []
        prefix = b.name + "/"
        attrs.append("\\HasChildren" if any(n.startswith(prefix) for n in names) else "\\HasNoChildren")
        if b.special_use and (not lsub):
            attrs.append(b.special_use)
        if b.subscribed and ("SUBSCRIBED" in return_opts or "SUBSCRIBED" in select_opts):
            attrs.append("\\Subscribed")
        s.send(f'* {verb} ({" ".join(attrs)}) "/" '.encode() + encode.astring(b.name) + b"\r\n")
        if status_items:
            await _status_response(s, b, status_items)
    s.tagged(tag, "OK", f"{verb} completed")
    return None


async def lsub(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    return await list_(s, tag, args, uid, lsub=True)


async def _status_response(s: Session, mbox: MailboxLike, items: list[str]) -> None:
    st = await s.store.status(mbox.id)
    values = {
        "MESSAGES": st.messages,
        "UIDNEXT": st.uidnext,
        "UIDVALIDITY": st.uidvalidity,
        "UNSEEN": st.unseen,
        "DELETED": st.deleted,
        "SIZE": st.size,
        "HIGHESTMODSEQ": st.highestmodseq,
        "RECENT": 0,
        "APPENDLIMIT": s.config.append_limit,
    }
    body = " ".join(f"{i} {values[i]}" for i in items)
    s.send(b"* STATUS " + encode.astring(mbox.name) + f" ({body})\r\n".encode())


async def status(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 2)
    if not isinstance(args[1], list) or not args[1]:
        raise BadArgs("STATUS needs a list of items")
    items = [atom(t).upper() for t in args[1]]
    for i in items:
        if i not in STATUS_ITEMS:
            raise BadArgs(f"unknown STATUS item {i[:40]}")
    if "HIGHESTMODSEQ" in items:
        s.condstore = True
    mbox = await _get(s, mailbox(args[0]))
    await _status_response(s, mbox, items)
    s.tagged(tag, "OK", "STATUS completed")
    return None


async def append(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 2, 4)
    assert s.account is not None
    name = mailbox(args[0])
    rest = args[1:]
    flags: list[str] = []
    when: float | None = None
    if len(rest) > 1 and isinstance(rest[0], list):
        flags = flag_list(rest[0])
        rest = rest[1:]
    if len(rest) > 1:
        when = date_time(rest[0])
        rest = rest[1:]
    if len(rest) != 1 or not isinstance(rest[0], bytes):
        raise BadArgs("APPEND needs a message literal")
    raw = rest[0]
    if len(raw) > s.config.append_limit:
        raise No("Message too large", "TOOBIG")
    if not isinstance(raw, Lit8) and b"\x00" in raw:
        raise No("NUL octets need BINARY APPEND (literal8)", "UNKNOWN-CTE")
    if b"\n" in raw and _BARE_LF.search(raw):
        raw = _BARE_LF.sub(b"\r\n", raw)
    mbox = await s.store.get_mailbox(s.account.id, name)
    if mbox is None:
        raise No("No such mailbox", "TRYCREATE")
    try:
        new_uid = await s.append_fn(mbox.id, bytes(raw), frozenset(f for f in flags if f != "\\Recent"), when)
    except StoreFullError:
        raise No("Cannot store the message: storage full", "OVERQUOTA") from None
    if s.view is not None and s.view.mailbox_id == mbox.id:
        await s.poll(allow_expunge=True, force=True)
    s.tagged(tag, "OK", "APPEND completed", f"APPENDUID {mbox.uidvalidity} {new_uid}")
    return None


async def check(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    await s.poll(allow_expunge=True, force=True)
    s.tagged(tag, "OK", "CHECK completed")
    return None


async def close(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    view = s.view
    if view is not None and not view.readonly:
        await s.store.expunge(view.mailbox_id)  # silently (RFC 9051 §6.4.1)
    s.deselect()
    s.tagged(tag, "OK", "CLOSE completed")
    return None


async def unselect(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    s.deselect()
    s.tagged(tag, "OK", "UNSELECT completed")
    return None


async def idle(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    arity(args, 0)
    await s.poll(allow_expunge=True)
    s.send(b"+ idling\r\n")
    return Outcome.IDLE
