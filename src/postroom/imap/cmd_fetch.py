"""FETCH and UID FETCH (RFC 9051 §6.4.5, RFC 3516 BINARY, RFC 7162 CHANGEDSINCE/VANISHED).

Invariants:
- Served from the session's view (FLAGS, UID, RFC822.SIZE, INTERNALDATE, MODSEQ: no store call), the
  stored structure (ENVELOPE, BODYSTRUCTURE, section offsets: one ``structures`` call per batch) and the
  stored bytes (one ``read``/``read_range`` per message and section). Nothing is re-parsed.
- The response streams: each message's response is flushed and the transport drained before the next
  message's bytes are read, so ``FETCH 1:* BODY[]`` holds about one message in memory.
- BODY[…] (not .PEEK) and RFC822/RFC822.TEXT set ``\\Seen`` in one store call before the responses, and
  those responses then carry the new FLAGS. No EXPUNGE is sent during FETCH (RFC 9051 §7.5.1).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass
from typing import Any, cast

from postroom.imap import encode
from postroom.imap.core import No, Outcome, Session
from postroom.imap.fetchargs import FetchArgs, FetchAtt, Section, parse_fetch
from postroom.imap.grammar import BadArgs, seqset
from postroom.imap.ports import MetaLike
from postroom.imap.tokens import Token

STRUCT_ATTS = frozenset({"ENVELOPE", "BODY", "BODYSTRUCTURE"})
DRAIN_EVERY = 64 * 1024  # octets of response buffered before the transport is drained


def locate(struct: dict[str, Any], section: Section) -> tuple[int, int] | None:
    """``(offset, length)`` of a section in the stored message, or None if it does not exist."""
    node: dict[str, Any] = struct["body"]
    top = True  # ``node`` is the top entity of a message (the root or an embedded message)
    for n in section.path:
        if not top and "m" in node:
            node = node["m"]["n"]
            top = True
        if node["t"] == "multipart":
            kids = node.get("c") or []
            if not 1 <= n <= len(kids):
                return None
            node = kids[n - 1]
            top = False
        elif top and n == 1:
            top = False
        else:
            return None
    kind = section.text
    if not section.path:
        if kind in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return (0, node["o"] + node["h"] + node["b"]) if kind == "" else (node["o"], node["h"])
        return (node["o"] + node["h"], node["b"])  # TEXT
    if kind == "":
        return (node["o"] + node["h"], node["b"])
    if kind == "MIME":
        return (node["o"], node["h"])
    if "m" not in node:
        return None
    inner = node["m"]["n"]
    if kind == "TEXT":
        return (inner["o"] + inner["h"], inner["b"])
    return (inner["o"], inner["h"])


def _part_node(struct: dict[str, Any], path: tuple[int, ...]) -> dict[str, Any] | None:
    if locate(struct, Section(path)) is None:
        return None
    node: dict[str, Any] = struct["body"]
    top = True
    for n in path:
        if not top and "m" in node:
            node, top = node["m"]["n"], True
        if node["t"] == "multipart":
            node, top = node["c"][n - 1], False
        else:
            top = False
    return node


def _top_header(struct: dict[str, Any]) -> bytes | None:
    """The stored top-level header block (structure version ≥ 4), or None for older structures."""
    text = struct.get("header")
    return text.encode("latin-1") if isinstance(text, str) else None


async def read_message(s: Session, meta: MetaLike) -> bytes:
    """The whole stored message, from the per-process cache when it is there."""
    cache = s.blob_cache
    if cache is not None:
        data = cache.get(meta.blob_id)
        if data is not None:
            return data
    data = await s.store.read(meta.blob_id)
    if cache is not None:
        cache.put(meta.blob_id, data)
    return data


async def read_part(s: Session, meta: MetaLike, offset: int, length: int) -> bytes:
    """``length`` octets at ``offset``: a slice of the cached message, else one ``read_range``."""
    cache = s.blob_cache
    data = cache.get(meta.blob_id) if cache is not None else None
    if data is not None:
        return data[offset : offset + length]
    return await s.store.read_range(meta.blob_id, offset, length)


def filter_headers(block: bytes, fields: tuple[str, ...], keep: bool) -> bytes:
    """The header lines whose names are (``keep``) or are not in ``fields``, then the blank line."""
    wanted = {f.lower().encode() for f in fields}
    out: list[bytes] = []
    include = False
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if include:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        include = (name in wanted) == keep
        if include:
            out.append(line)
    return b"".join(x + b"\r\n" for x in out) + b"\r\n"


def decode_cte(data: bytes, cte: str) -> bytes:
    if cte in ("7BIT", "8BIT", "BINARY", ""):
        return data
    try:
        if cte == "BASE64":
            return base64.b64decode(b"".join(data.split()))
        if cte == "QUOTED-PRINTABLE":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        raise No("Cannot decode the part's transfer encoding", "UNKNOWN-CTE") from None
    raise No(f"Unknown transfer encoding {cte[:40]}", "UNKNOWN-CTE")


async def _section_bytes(s: Session, meta: MetaLike, att: FetchAtt, struct: dict[str, Any] | None) -> bytes | None:
    sec = att.section
    assert sec is not None
    if att.name in ("BINARY", "BINARY.SIZE"):
        assert struct is not None
        node = _part_node(struct, sec.path) if sec.path else struct["body"]
        if node is None:
            return None
        raw = await read_part(s, meta, node["o"] + node["h"], node["b"])
        if node["t"] == "multipart" or "m" in node:
            return raw
        return decode_cte(raw, node["e"])
    if not sec.path and not sec.text:
        if att.partial is not None:
            origin, count = att.partial
            if origin >= meta.size:
                return b""
            return await read_part(s, meta, origin, min(count, meta.size - origin))
        return await read_message(s, meta)
    assert struct is not None
    where = locate(struct, sec)
    if where is None:
        return None
    offset, length = where
    top_header = _top_header(struct) if not sec.path and sec.text.startswith("HEADER") else None
    if sec.text.startswith("HEADER.FIELDS"):
        block = top_header if top_header is not None else await read_part(s, meta, offset, length)
        return filter_headers(block, sec.fields, keep=sec.text == "HEADER.FIELDS")
    if top_header is not None and att.partial is None:
        return top_header
    if att.partial is not None:
        origin, count = att.partial
        if origin >= length:
            return b""
        return await read_part(s, meta, offset + origin, min(count, length - origin))
    return await read_part(s, meta, offset, length)


async def _render(
    s: Session, msn: int, meta: MetaLike, atts: tuple[FetchAtt, ...], struct: dict[str, Any] | None
) -> list[bytes]:
    items: list[bytes] = []
    for att in atts:
        name = att.name
        if att.section is not None:
            data = await _section_bytes(s, meta, att, struct)
            if name == "BINARY.SIZE":
                items.append(b"BINARY.SIZE[%s] %d" % (att.section.spec.encode(), len(data or b"")))
                continue
            label = name.encode() + b"[" + att.section.spec.encode() + b"]"
            if att.partial is not None:
                label += b"<%d>" % att.partial[0]
                if name == "BINARY" and data is not None:
                    data = data[att.partial[0] : att.partial[0] + att.partial[1]]
            if data is None:
                items.append(label + b" NIL")
            elif name == "BINARY":
                items.append(label + b" ~{%d}\r\n" % len(data) + data)
            else:
                items.append(label + b" {%d}\r\n" % len(data) + data)
        elif name == "UID":
            items.append(b"UID %d" % meta.uid)
        elif name == "FLAGS":
            items.append(b"FLAGS " + encode.flag_list(meta.flags))
        elif name == "RFC822.SIZE":
            items.append(b"RFC822.SIZE %d" % meta.size)
        elif name == "INTERNALDATE":
            items.append(b"INTERNALDATE " + encode.internaldate(meta.internaldate))
        elif name == "MODSEQ":
            items.append(b"MODSEQ (%d)" % meta.modseq)
        elif name == "ENVELOPE":
            assert struct is not None
            items.append(b"ENVELOPE " + encode.envelope(struct["env"]))
        elif name in ("BODY", "BODYSTRUCTURE"):
            assert struct is not None
            items.append(name.encode() + b" " + encode.bodystructure(struct["body"], name == "BODYSTRUCTURE"))
        elif name == "RFC822":
            data = await read_message(s, meta)
            items.append(b"RFC822 {%d}\r\n" % len(data) + data)
        elif name in ("RFC822.HEADER", "RFC822.TEXT"):
            hs = int(struct["header_size"]) if struct is not None else 0
            if name == "RFC822.HEADER":
                cached = _top_header(struct) if struct is not None else None
                data = cached if cached is not None else await read_part(s, meta, 0, hs)
            else:
                data = await read_part(s, meta, hs, meta.size - hs)
            items.append(name.encode() + b" {%d}\r\n" % len(data) + data)
        elif name in ("SAVEDATE", "EMAILID", "THREADID"):
            items.append(name.encode() + b" NIL")
    return items


META_ATTS = ("UID", "FLAGS", "RFC822.SIZE", "MODSEQ", "INTERNALDATE")  # the order they are sent in
META_LINES_PER_WRITE = 2000  # FETCH lines joined into one write on the metadata-only fast path


def _fetch_meta(s: Session, indices: list[int], atts: tuple[FetchAtt, ...]) -> None:
    """The hot path (``FETCH 1:* (FLAGS UID RFC822.SIZE)``): metadata only, from the view.

    Items are sent in one fixed order (RFC 9051 §7.5.2 does not tie it to the request's order), which
    lets the common combinations use one format string and no per-item dispatch. The lines of the most
    common one are kept with the process's snapshot of the mailbox and reused while the view holds the
    same message at the same MSN (see :mod:`postroom.imap.snapshots`)."""
    view = s.view
    assert view is not None
    names = {a.name for a in atts}
    want = [n for n in META_ATTS if n in names]
    fmt = (
        b"* %d FETCH ("
        + b" ".join(
            {
                "UID": b"UID %d",
                "FLAGS": b"FLAGS %s",
                "RFC822.SIZE": b"RFC822.SIZE %d",
                "MODSEQ": b"MODSEQ (%d)",
                "INTERNALDATE": b"INTERNALDATE %s",
            }[n]
            for n in want
        )
        + b")\r\n"
    )
    metas = view.metas
    ft = encode.flag_text
    cached: tuple[list[MetaLike], list[bytes | None]] | None = None
    snap = s.snapshots.get(view.mailbox_id, view.uidvalidity) if s.snapshots is not None else None
    if snap is not None and s.snapshots is not None:
        cached = (snap.metas, s.snapshots.lines(view.mailbox_id, snap))
    if (
        cached is not None
        and want == ["UID", "FLAGS", "RFC822.SIZE"]
        and len(indices) == len(metas)  # ascending and distinct: every message
        and metas == cached[0]  # a C loop that compares identities first
    ):
        lines = cached[1]
        i = 0
        with contextlib.suppress(ValueError):
            while True:  # render the lines the snapshot lost (changed messages), found by a C scan
                i = lines.index(None, i)
                m = metas[i]
                lines[i] = fmt % (i + 1, m.uid, ft(m.flags), m.size)
        full = cast("list[bytes]", lines)  # no None left
        for start in range(0, len(full), META_LINES_PER_WRITE):
            s.send(b"".join(full[start : start + META_LINES_PER_WRITE]))
        return
    for start in range(0, len(indices), META_LINES_PER_WRITE):
        chunk = indices[start : start + META_LINES_PER_WRITE]
        out: list[bytes] = []
        if want == ["UID", "FLAGS", "RFC822.SIZE"] and cached is not None:
            smetas, lines = cached
            ns = len(smetas)
            for i in chunk:
                m = metas[i]
                same = i < ns and smetas[i] is m  # the snapshot's line is this very message at this MSN
                line = lines[i] if same else None
                if line is None:
                    line = fmt % (i + 1, m.uid, ft(m.flags), m.size)
                    if same:
                        lines[i] = line
                out.append(line)
        elif want == ["UID", "FLAGS", "RFC822.SIZE"]:
            for i in chunk:
                m = metas[i]
                out.append(fmt % (i + 1, m.uid, ft(m.flags), m.size))
        elif want == ["UID", "FLAGS"]:
            for i in chunk:
                m = metas[i]
                out.append(fmt % (i + 1, m.uid, ft(m.flags)))
        else:
            u, f, z, q, d = (n in names for n in META_ATTS)
            for i in chunk:
                m = metas[i]
                v: list[object] = [i + 1]
                if u:
                    v.append(m.uid)
                if f:
                    v.append(ft(m.flags))
                if z:
                    v.append(m.size)
                if q:
                    v.append(m.modseq)
                if d:
                    v.append(encode.internaldate(m.internaldate))
                out.append(fmt % tuple(v))
        s.send(b"".join(out))


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a FETCH's attribute list asks for, worked out once per distinct list (see ``_plan``)."""

    fa: FetchArgs
    atts: tuple[FetchAtt, ...]  # with UID added for UID FETCH and MODSEQ for CHANGEDSINCE/MODSEQ
    condstore: bool  # the command turns CONDSTORE on (RFC 7162 §3.1)
    sets_seen: bool
    meta_only: bool  # served by ``_fetch_meta``
    has_flags: bool
    needs_struct: bool
    streamed: bool


PLAN_CACHE = 256  # distinct attribute lists whose plans a process keeps (clients use a handful)
_plans: dict[tuple[object, bool], _Plan] = {}


def _frozen(tokens: list[Token]) -> tuple[object, ...] | None:
    """A hashable copy of atoms and lists (None when a string or literal is among them: not cached)."""
    out: list[object] = []
    for t in tokens:
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, list):
            inner = _frozen(t)
            if inner is None:
                return None
            out.append(inner)
        else:
            return None
    return tuple(out)


def _plan(args: list[Token], uid: bool) -> _Plan:
    key = _frozen(args)
    if key is not None:
        hit = _plans.get((key, uid))
        if hit is not None:
            return hit
    fa = parse_fetch(args)
    atts = fa.atts
    if uid and not any(a.name == "UID" for a in atts):
        atts = (FetchAtt("UID"), *atts)
    condstore = fa.changedsince is not None or any(a.name == "MODSEQ" for a in atts)
    if condstore and not any(a.name == "MODSEQ" for a in atts):
        atts = (*atts, FetchAtt("MODSEQ"))
    plan = _Plan(
        fa=fa,
        atts=atts,
        condstore=condstore,
        sets_seen=any(a.sets_seen for a in atts),
        meta_only=all(a.name in META_ATTS and a.section is None for a in atts),
        has_flags=any(a.name == "FLAGS" for a in atts),
        needs_struct=any(
            (a.section is None and a.name in STRUCT_ATTS)  # BODY[] is a section, not BODYSTRUCTURE's BODY
            or a.name in ("RFC822.HEADER", "RFC822.TEXT")
            or (a.section is not None and (a.section.path or a.section.text or a.name != "BODY"))
            for a in atts
        ),
        streamed=any(a.needs_bytes for a in atts),
    )
    if key is not None:
        if len(_plans) >= PLAN_CACHE:
            _plans.clear()
        _plans[(key, uid)] = plan
    return plan


async def fetch(s: Session, tag: str, args: list[Token], uid: bool) -> Outcome | None:
    if len(args) < 2:
        raise BadArgs("FETCH needs a sequence set and attributes")
    seq = seqset(args[0])
    plan = _plan(args[1:], uid)
    fa, atts = plan.fa, plan.atts
    view = s.view
    assert view is not None
    if plan.condstore:
        s.condstore = True
    if fa.vanished and not (uid and s.qresync and fa.changedsince is not None):
        raise BadArgs("VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE")
    indices = view.indices(seq, uid, s.saved)
    if fa.vanished and fa.changedsince is not None:
        changes = await s.store.changes_since(view.mailbox_id, fa.changedsince)
        largest = view.uids[-1] if view.uids else 0
        gone = [u for u in changes.expunged if seq.contains(u, max(largest, u))]
        if gone:
            s.untagged("VANISHED (EARLIER) " + encode.seq_text(sorted(gone)))
    if fa.changedsince is not None:
        since = fa.changedsince
        indices = [i for i in indices if view.metas[i].modseq > since]
    if not uid:
        view.check_msns(seq)
    seen_changed: set[int] = set()
    if not view.readonly and plan.sets_seen:
        need = [view.uids[i] for i in indices if "\\Seen" not in view.metas[i].flags]
        if need:
            done = await s.store.update_flags(view.mailbox_id, need, "add", ["\\Seen"])
            for m in done.changed:
                if view.replace(m) is not None:
                    seen_changed.add(m.uid)
            s.applied_own_change(done.modseq_before, done.modseq_after)
    if plan.meta_only:
        _fetch_meta(s, indices, atts)
        await s.poll(allow_expunge=uid)
        s.tagged(tag, "OK", ("UID FETCH" if uid else "FETCH") + " completed")
        return None
    with_flags = (*atts, FetchAtt("FLAGS"))
    needs_struct = plan.needs_struct
    streamed = plan.streamed
    batch = max(1, s.config.fetch_batch)
    pending = 0
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        structs: dict[int, dict[str, Any]] = {}
        if needs_struct:
            structs = await s.store.structures([view.metas[i].blob_id for i in chunk])
        for i in chunk:
            meta = view.metas[i]
            use = atts
            if meta.uid in seen_changed and not plan.has_flags:
                use = with_flags
            items = await _render(s, i + 1, meta, use, structs.get(meta.blob_id))
            line = s.fetch_line(i + 1, items)
            s.send(line)
            pending += len(line)
            if streamed and pending >= DRAIN_EVERY:
                pending = 0
                await s.flush_drain()
    await s.poll(allow_expunge=uid)
    s.tagged(tag, "OK", ("UID FETCH" if uid else "FETCH") + " completed")
    return None
