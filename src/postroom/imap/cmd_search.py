"""SEARCH and UID SEARCH (RFC 9051 §6.4.4, RFC 4731 ESEARCH, RFC 5182 SEARCHRES, RFC 7162 MODSEQ).

Invariants: flag, size, date, sequence and UID keys are evaluated on the session's view (no store call);
header keys read the stored structure (one ``structures`` call per batch); TEXT and BODY use the store's
full-text index (``search_text``), never a scan of message bytes. No EXPUNGE is sent during SEARCH.
"""

from __future__ import annotations

import time
from typing import Any

from postroom.imap import encode
from postroom.imap.core import No, Outcome, Session
from postroom.imap.grammar import SeqSet
from postroom.imap.ports import MetaLike
from postroom.imap.searchargs import Key, SearchArgs, parse_search
from postroom.imap.tokens import Token

CHARSETS = frozenset({"UTF-8", "US-ASCII"})


def _walk(key: Key, kinds: set[str]) -> list[Key]:
    out: list[Key] = []
    if key[0] in kinds:
        out.append(key)
    if key[0] == "and":
        for k in key[1]:
            out.extend(_walk(k, kinds))
    elif key[0] == "not":
        out.extend(_walk(key[1], kinds))
    elif key[0] == "or":
        out.extend(_walk(key[1], kinds))
        out.extend(_walk(key[2], kinds))
    return out


def _day(ts: float) -> tuple[int, int, int]:
    t = time.gmtime(ts)
    return (t.tm_year, t.tm_mon, t.tm_mday)


def _cmp(op: str, left: Any, right: Any) -> bool:
    if op == "<":
        return bool(left < right)
    if op == ">":
        return bool(left >= right) if isinstance(left, tuple) else bool(left > right)
    return bool(left == right)


class _Evaluator:
    def __init__(self, s: Session, texts: dict[Key, set[int]], now: float) -> None:
        self.s = s
        self.texts = texts
        self.now = now
        view = s.view
        assert view is not None
        self.n = len(view)
        self.largest_uid = view.uids[-1] if view.uids else 0

    def match(self, key: Key, msn: int, meta: MetaLike, struct: dict[str, Any] | None) -> bool:
        kind = key[0]
        if kind == "flag":
            return (key[1] in meta.flags) == bool(key[2])
        if kind == "and":
            return all(self.match(k, msn, meta, struct) for k in key[1])
        if kind == "all":
            return True
        if kind == "uid":
            seq: SeqSet = key[1]
            if seq.saved:
                return meta.uid in self.s.saved
            return seq.contains(meta.uid, self.largest_uid)
        if kind == "seq":
            seq = key[1]
            if seq.saved:
                return meta.uid in self.s.saved
            return seq.contains(msn, self.n)
        if kind == "not":
            return not self.match(key[1], msn, meta, struct)
        if kind == "or":
            return self.match(key[1], msn, meta, struct) or self.match(key[2], msn, meta, struct)
        if kind == "none":
            return False
        if kind == "size":
            limit: int = key[2]
            return meta.size > limit if key[1] == ">" else meta.size < limit
        if kind == "idate":
            return _cmp(key[1], _day(meta.internaldate), key[2])
        if kind == "modseq":
            least: int = key[1]
            return meta.modseq >= least
        if kind == "age":
            age = self.now - meta.internaldate
            seconds: int = key[2]
            return age >= seconds if key[1] == ">" else age <= seconds
        if kind in ("text", "body"):
            return meta.uid in self.texts.get(key, set())
        if struct is None:
            return False
        if kind == "sent":
            sent = struct.get("date")
            return sent is not None and _cmp(key[1], _day(float(sent)), key[2])
        if kind == "hdr":
            field, needle = key[1], key[2].lower()
            return any(name == field and needle in value.lower() for name, value in struct.get("fields", ()))
        return False


async def _evaluate(s: Session, key: Key, texts: dict[Key, set[int]], needs_struct: bool) -> list[int]:
    view = s.view
    assert view is not None
    ev = _Evaluator(s, texts, time.time())
    hits: list[int] = []
    batch = max(1, s.config.fetch_batch)
    for start in range(0, len(view), batch):
        metas = view.metas[start : start + batch]
        structs: dict[int, dict[str, Any]] = {}
        if needs_struct:
            structs = await s.store.structures([m.blob_id for m in metas])
        for j, meta in enumerate(metas):
            if ev.match(key, start + j + 1, meta, structs.get(meta.blob_id)):
                hits.append(start + j)
    return hits


async def search(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    sa: SearchArgs = parse_search(args)
    if sa.charset is not None and sa.charset not in CHARSETS:
        raise No("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    view = s.view
    assert view is not None
    texts: dict[Key, set[int]] = {}
    for key in _walk(sa.key, {"text", "body"}):
        if key not in texts:
            texts[key] = await s.store.search_text(view.mailbox_id, [key[1]], key[0] == "body")
    needs_struct = bool(_walk(sa.key, {"hdr", "sent"}))
    has_modseq = _walk(sa.key, {"modseq"})
    if has_modseq:
        s.condstore = True
    hits: list[int]  # indices
    key = sa.key
    if key[0] == "flag":  # the common case (SEARCH UNSEEN …): one pass over the view
        flag, present = key[1], bool(key[2])
        hits = [i for i, m in enumerate(view.metas) if (flag in m.flags) is present]
    else:
        hits = await _evaluate(s, sa.key, texts, needs_struct)
    numbers = [view.uids[i] for i in hits] if uid else [i + 1 for i in hits]
    top_modseq = max((view.metas[i].modseq for i in hits), default=0) if has_modseq else 0
    ret = sa.ret
    if ret is None and s.rev2:
        ret = ("ALL",)
    if ret is not None:
        if not ret:
            ret = ("ALL",)
        if "SAVE" in ret:
            s.saved = [view.uids[i] for i in hits]
        parts = [f'(TAG "{tag}")'] + (["UID"] if uid else [])
        if numbers and "MIN" in ret:
            parts.append(f"MIN {numbers[0]}")
        if numbers and "MAX" in ret:
            parts.append(f"MAX {numbers[-1]}")
        if "COUNT" in ret:
            parts.append(f"COUNT {len(numbers)}")
        if numbers and "ALL" in ret:
            parts.append("ALL " + encode.seq_text(numbers))
        if has_modseq and numbers:
            parts.append(f"MODSEQ {top_modseq}")
        if ret != ("SAVE",):  # RFC 5182 §2.1: SAVE alone returns no ESEARCH
            s.untagged("ESEARCH " + " ".join(parts))
    else:
        text = "SEARCH " + " ".join(map(str, numbers)) if numbers else "SEARCH"
        if has_modseq and numbers:
            text += f" (MODSEQ {top_modseq})"
        s.untagged(text)
    await s.poll(allow_expunge=uid)
    s.tagged(tag, "OK", ("UID SEARCH" if uid else "SEARCH") + " completed")
    return None
