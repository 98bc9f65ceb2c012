"""Changing messages: STORE, COPY, MOVE, EXPUNGE and their UID forms (RFC 9051 §6.4.3-6.4.9, RFC 4315
UIDPLUS, RFC 6851 MOVE, RFC 7162 UNCHANGEDSINCE/MODIFIED).

Invariants: every change is one store call for the whole set (no per-message round trips); the view is
updated from what the store returns, so the session's own changes are never announced back to it twice;
STORE never sends EXPUNGE (RFC 9051 §7.5.1) while EXPUNGE/MOVE announce exactly what they removed.
"""

from __future__ import annotations

from typing import Literal

from postroom.imap import encode
from postroom.imap.core import No, Outcome, Session
from postroom.imap.grammar import MAX_NUMBER64, BadArgs, arity, atom, flag_list, mailbox, number, seqset
from postroom.imap.tokens import Token

_OPS: dict[str, Literal["add", "remove", "replace"]] = {"+": "add", "-": "remove", "": "replace"}


async def store(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    if len(args) < 3:
        raise BadArgs("STORE needs a set, an item and flags")
    view = s.view
    assert view is not None
    seq = seqset(args[0])
    rest = args[1:]
    unchanged_since = None
    if isinstance(rest[0], list):  # (UNCHANGEDSINCE n), RFC 7162 §3.1.3
        mods = rest[0]
        if len(mods) != 2 or atom(mods[0]).upper() != "UNCHANGEDSINCE":
            raise BadArgs("bad STORE modifier")
        unchanged_since = number(mods[1], MAX_NUMBER64)
        s.condstore = True
        rest = rest[1:]
    if len(rest) < 2:
        raise BadArgs("STORE needs an item and flags")
    item = atom(rest[0]).upper()
    silent = item.endswith(".SILENT")
    base = item.removesuffix(".SILENT")
    sign = base[0] if base[:1] in "+-" else ""
    if base.lstrip("+-") != "FLAGS":
        raise BadArgs(f"unknown STORE item {item[:40]}")
    flags = flag_list(rest[1] if len(rest) == 2 else list(rest[1:]))
    flags = [f for f in flags if f != "\\Recent"]
    if view.readonly:
        raise No("Mailbox is read-only", "READ-ONLY")
    if not uid:
        view.check_msns(seq)
    indices = view.indices(seq, uid, s.saved)
    uids = [view.uids[i] for i in indices if view.uids[i] not in view.gone]
    done = await s.store.update_flags(view.mailbox_id, uids, _OPS[sign], flags, unchanged_since)
    changed, failed = done.changed, done.failed
    changed_uids = set()
    for m in changed:
        if view.replace(m) is not None:
            changed_uids.add(m.uid)
    s.applied_own_change(done.modseq_before, done.modseq_after)
    failed_set = set(failed)
    for i in indices:
        meta = view.metas[i]
        if meta.uid in failed_set:
            continue
        if silent and not (s.condstore and meta.uid in changed_uids):
            continue
        items = []
        if uid or s.qresync:
            items.append(b"UID %d" % meta.uid)
        if not silent:
            items.append(b"FLAGS " + encode.flag_list(meta.flags))
        if s.condstore:
            items.append(b"MODSEQ (%d)" % meta.modseq)
        s.send(s.fetch_line(i + 1, items))
    await s.poll(allow_expunge=uid)
    code = ""
    if failed:
        nums = sorted(failed) if uid else sorted(i + 1 for i in indices if view.uids[i] in failed_set)
        code = "MODIFIED " + encode.seq_text(nums)
    s.tagged(tag, "OK", ("UID STORE" if uid else "STORE") + " completed", code)
    return None


async def _copy_or_move(s: Session, tag: str, args: list[Token], uid: bool, move: bool) -> Outcome | None:
    arity(args, 2)
    view = s.view
    assert view is not None and s.account is not None
    seq = seqset(args[0])
    if not uid:
        view.check_msns(seq)
    dest = await s.store.get_mailbox(s.account.id, mailbox(args[1]))
    if dest is None:
        raise No("No such mailbox", "TRYCREATE")
    if move and view.readonly:
        raise No("Mailbox is read-only", "READ-ONLY")
    indices = view.indices(seq, uid, s.saved)
    uids = [view.uids[i] for i in indices if view.uids[i] not in view.gone]
    verb = ("UID " if uid else "") + ("MOVE" if move else "COPY")
    if not uids:
        s.tagged(tag, "OK", f"{verb} completed (nothing to do)")
        return None
    op = s.store.move if move else s.store.copy
    pairs = sorted(await op(view.mailbox_id, uids, dest.id))
    code = ""
    if pairs:
        src = encode.seq_text([a for a, _ in pairs])
        dst = ",".join(str(b) for _, b in pairs)
        code = f"COPYUID {dest.uidvalidity} {src} {dst}"
    if move:
        if code:
            s.untagged(f"OK [{code}] Moved")  # RFC 6851 §4.3: COPYUID in an untagged OK
            code = ""
        view.gone.update(a for a, _ in pairs)
        s.announce_expunges()
    await s.poll(allow_expunge=True)
    s.tagged(tag, "OK", f"{verb} completed", code)
    return None


async def copy(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    return await _copy_or_move(s, tag, args, uid, move=False)


async def move(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    return await _copy_or_move(s, tag, args, uid, move=True)


async def expunge(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    view = s.view
    assert view is not None
    if view.readonly:
        raise No("Mailbox is read-only", "READ-ONLY")
    if uid:
        arity(args, 1)
        seq = seqset(args[0])
        uids = [view.uids[i] for i in view.indices(seq, True, s.saved)]
        removed = await s.store.expunge(view.mailbox_id, uids) if uids else []
    else:
        arity(args, 0)
        removed = await s.store.expunge(view.mailbox_id)
    view.gone.update(u for u in removed if view.index_of_uid(u) is not None)
    s.announce_expunges()
    await s.poll(allow_expunge=True)
    code = f"HIGHESTMODSEQ {view.modseq}" if s.condstore else ""
    s.tagged(tag, "OK", ("UID EXPUNGE" if uid else "EXPUNGE") + " completed", code)
    return None
