"""Compute a message's stored structure once, at append ("parse once").

``analyze(raw)`` returns a JSON-able dict:

- ``"v"``: STRUCTURE_VERSION; a store re-analyzes rows whose version is older.
- ``"header_size"``: octets of the top-level header block including the blank line.
- ``"header"``: that block itself, as ``latin-1`` text (a lossless octet ↔ character mapping), so
  ``BODY[HEADER]``, ``BODY[HEADER.FIELDS (…)]`` and ``RFC822.HEADER`` of many messages come with one
  ``structures`` call instead of one ``read_range`` per message (what mail clients fetch on first sync).
- ``"lines"``: number of lines of the whole message.
- ``"env"``: the ENVELOPE fields (``mime.headers.envelope``).
- ``"date"``: the Date: header as seconds since the epoch, or None (SEARCH SENTBEFORE …, SORT).
- ``"fields"``: ``[[lower-cased name, decoded value], ...]`` of the top-level header (SEARCH HEADER, FROM …).
- ``"body"``: the part tree (see :func:`_node`), with byte offsets so that every ``BODY[section]`` is one
  ``store.read_range`` and BODYSTRUCTURE is rendered without touching the message.

Part node keys: ``t``/``s`` type and subtype (lower case), ``p`` parameters ``[[name, value], ...]``,
``id``, ``d`` (description), ``e`` (transfer encoding, upper case), ``md5``, ``disp`` (``[type, params]`` or
None), ``lang`` (list or None), ``loc``; ``o`` offset of the part's MIME header, ``h`` header octets
including the blank line, ``b`` body octets (the body starts at ``o + h``), ``l`` body lines (text and
message/rfc822 parts); ``c`` children of a multipart; ``m`` for message/rfc822: ``{"env": ..., "n": node
of the embedded message}``.

:func:`searchable_text` gives the text for the full-text index: the decoded header values, and the decoded
text parts plus the headers of attached messages (SEARCH TEXT uses both, BODY the second). It is not part
of the structure: the store derives it when it indexes, behind delivery, because writing ~5 KB of text
beside each message at append cost more than the rest of the append's SQL (bench/store_append.py).

Invariants: pure and total (malformed input gives a best-effort structure, never an exception); offsets are
into ``raw`` exactly as stored; nesting deeper than ``MAX_DEPTH`` is treated as an opaque leaf.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from postroom.mime.headers import (
    decode_words,
    envelope,
    first_values,
    param,
    parse_date,
    parse_fields,
    parse_params,
)

STRUCTURE_VERSION = 4

MAX_DEPTH = 32  # MIME nesting levels analysed; deeper parts are leaves (bounds recursion on hostile input)
MAX_TEXT = 512 * 1024  # characters of searchable text kept per message
MAX_PARTS = 1000  # parts analysed per message; the rest are ignored (bounds work on hostile input)

_TAGS = re.compile(r"<[^>]*>")


def _blank_line(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """Where the blank line ending the header block in ``raw[start:end]`` starts, and the offset just after
    it (where the body starts); ``(end, end)`` when there is none. A bare-LF blank line counts too, when it
    comes before the CRLF one."""
    if raw.startswith(b"\r\n", start):
        return start, start + 2
    if raw.startswith(b"\n", start):
        return start, start + 1
    crlf = raw.find(b"\r\n\r\n", start, end)
    # A bare-LF blank line counts only before the CRLF one: search no further (not through the whole body).
    lf = raw.find(b"\n\n", start, crlf + 1 if crlf >= 0 else end)
    if crlf < 0 and lf < 0:
        return end, end
    if crlf >= 0 and (lf < 0 or crlf + 1 < lf):
        return crlf + 2, crlf + 4
    return lf + 1, lf + 2


def _header_end(raw: bytes, start: int, end: int) -> int:
    """Offset just after the blank line ending the header block in ``raw[start:end]`` (or ``end``)."""
    return _blank_line(raw, start, end)[1]


def split_header(raw: bytes) -> tuple[int, int]:
    """``(blank line, body)`` offsets of a whole message: ``raw[:blank]`` is its header fields, each with its
    line ending, ``raw[body:]`` its body; ``(len, len)`` when it has no blank line."""
    return _blank_line(raw, 0, len(raw))


COUNT_BY_COPY_MAX = 1024 * 1024  # octets: up to this, newlines are counted on a copy (see _newlines)


def _newlines(raw: bytes, start: int, end: int) -> int:
    """The ``\n`` in ``raw[start:end]``. ``bytes.count`` of one byte walks a byte at a time; ``replace``
    finds them with ``memchr``, so the length it removes is quicker to get (5 KB body, timeit: 1.3-1.6
    against 2.0-2.9 µs), at the price of two copies: only for ranges up to ``COUNT_BY_COPY_MAX``."""
    if end - start > COUNT_BY_COPY_MAX:
        return raw.count(b"\n", start, end)
    part = raw[start:end]
    return len(part) - len(part.replace(b"\n", b""))


def _count_lines(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    n = _newlines(raw, start, end)
    return n if raw[end - 1] == 0x0A else n + 1


def _split_multipart(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """Byte ranges of the body parts between ``--boundary`` delimiter lines (RFC 2046 §5.1.1)."""
    delim = b"--" + boundary.encode("utf-8", "replace")
    parts: list[tuple[int, int]] = []
    if raw.startswith(delim, start):
        pos = start
    else:
        found = raw.find(b"\n" + delim, start, end)
        if found < 0:
            return parts
        pos = found + 1
    while len(parts) < MAX_PARTS:
        after = pos + len(delim)
        if raw.startswith(b"--", after):
            break
        eol = raw.find(b"\n", after, end)
        if eol < 0:
            break
        part_start = eol + 1
        nxt = raw.find(b"\n" + delim, eol, end)
        if nxt < 0:
            parts.append((part_start, end))
            break
        part_end = nxt - 1 if nxt > part_start and raw[nxt - 1] == 0x0D else nxt
        parts.append((part_start, max(part_start, part_end)))
        pos = nxt + 1
    return parts


class _Analyzer:
    """One walk over a message's parts. ``want_text``: also collect the searchable text (``texts``)."""

    def __init__(self, raw: bytes, want_text: bool = False) -> None:
        self.raw = raw
        self.want_text = want_text
        self.texts: list[str] = []
        self.text_len = 0
        self.parts = 0

    def add_text(self, text: str) -> None:
        if self.want_text and self.text_len < MAX_TEXT and text:
            text = text[: MAX_TEXT - self.text_len]
            self.texts.append(text)
            self.text_len += len(text)

    def node(
        self, start: int, end: int, default_type: str, depth: int, first: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Analyse the entity in ``raw[start:end]`` (MIME header + body). ``first``: its header fields'
        first values (``first_values``) when the caller parsed them already (the top level)."""
        raw = self.raw
        self.parts += 1
        body_start = _header_end(raw, start, end)
        if first is None:
            first = first_values(parse_fields(raw[start:body_start]))
        ctype, params = parse_params(first.get("content-type", ""))
        if "/" in ctype:
            t, _, s = ctype.partition("/")
            t, s = t.strip().lower(), s.strip().lower()
        else:
            t, s = "", ""
        if not t or not s:
            t, _, s = default_type.partition("/")
            params = []
        if t == "text" and param(params, "charset") is None:
            params = [["charset", "us-ascii"], *params]  # RFC 2045 §5.2 default
        disp_raw = first.get("content-disposition")
        disp: list[Any] | None = None
        if disp_raw:
            dtype, dparams = parse_params(disp_raw)
            disp = [dtype, dparams]
        lang = first.get("content-language")
        node: dict[str, Any] = {
            "t": t,
            "s": s,
            "p": params,
            "id": first.get("content-id"),
            "d": first.get("content-description"),
            "e": (first.get("content-transfer-encoding") or "7BIT").strip().upper(),
            "md5": first.get("content-md5"),
            "disp": disp,
            "lang": [x.strip() for x in lang.split(",") if x.strip()] if lang else None,
            "loc": first.get("content-location"),
            "o": start,
            "h": body_start - start,
            "b": end - body_start,
        }
        if t == "multipart" and depth < MAX_DEPTH and self.parts < MAX_PARTS:
            boundary = param(params, "boundary")
            children: list[dict[str, Any]] = []
            if boundary:
                child_default = "message/rfc822" if s == "digest" else "text/plain"
                for ps, pe in _split_multipart(raw, body_start, end, boundary):
                    if self.parts >= MAX_PARTS:
                        break
                    children.append(self.node(ps, pe, child_default, depth + 1))
            node["c"] = children
        elif t == "message" and s in ("rfc822", "global") and depth < MAX_DEPTH:
            inner = self.node(body_start, end, "text/plain", depth + 1)
            inner_fields = parse_fields(raw[body_start : body_start + inner["h"]])
            if self.want_text:
                self.add_text(" ".join(decode_words(v) for _, v in inner_fields))
            node["m"] = {"env": envelope(inner_fields), "n": inner}
            node["l"] = _count_lines(raw, body_start, end)
        elif t == "text":
            node["l"] = _count_lines(raw, body_start, end)
            if self.want_text:
                self.add_text(self.decoded_text(body_start, end, node["e"], param(params, "charset"), s))
        return node

    def decoded_text(self, start: int, end: int, cte: str, charset: str | None, subtype: str) -> str:
        if self.text_len >= MAX_TEXT:
            return ""
        data = self.raw[start : min(end, start + 4 * MAX_TEXT)]
        try:
            if cte == "BASE64":
                data = base64.b64decode(b"".join(data.split()), validate=False)
            elif cte == "QUOTED-PRINTABLE":
                data = binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            pass
        try:
            text = data.decode(charset or "utf-8", "replace")
        except (LookupError, ValueError):  # an unknown charset, or a name no codec can be (a NUL in it)
            text = data.decode("utf-8", "replace")
        if subtype == "html":
            text = _TAGS.sub(" ", text)
        return text


def analyze(raw: bytes) -> dict[str, Any]:
    """The stored structure of ``raw`` (see the module docstring for the keys)."""
    header_end = _header_end(raw, 0, len(raw))
    fields = parse_fields(raw[:header_end])
    first = first_values(fields)
    body = _Analyzer(raw).node(0, len(raw), "text/plain", 0, first)
    if "l" in body and len(raw) > header_end:  # the body's lines are counted: add the header's newlines
        lines = _newlines(raw, 0, header_end) + body["l"]
    else:
        lines = _count_lines(raw, 0, len(raw))
    return {
        "v": STRUCTURE_VERSION,
        "header_size": header_end,
        "header": raw[:header_end].decode("latin-1"),
        "lines": lines,
        "env": envelope(fields, first),
        "date": parse_date(first.get("date")),
        "fields": [[name, decode_words(value)] for name, value in fields],
        "body": body,
    }


def minimal_structure(raw: bytes) -> dict[str, Any]:
    """A structure found by byte searches alone, for a message :func:`analyze` failed on (it is meant to be
    total, so only a bug gets here): the header block kept as it is, the rest one ``text/plain`` body, no
    parsed fields, an empty envelope, no date. FETCH of any section still works; SEARCH on header fields
    does not find the message. It carries the current version, so a newer analyser looks at it again."""
    header_end = _header_end(raw, 0, len(raw))
    return {
        "v": STRUCTURE_VERSION,
        "header_size": header_end,
        "header": raw[:header_end].decode("latin-1"),
        "lines": _count_lines(raw, 0, len(raw)),
        "env": [None] * 10,
        "date": None,
        "fields": [],
        "body": {
            "t": "text",
            "s": "plain",
            "p": [["charset", "us-ascii"]],
            "id": None,
            "d": None,
            "e": "7BIT",
            "md5": None,
            "disp": None,
            "lang": None,
            "loc": None,
            "o": 0,
            "h": header_end,
            "b": len(raw) - header_end,
            "l": _count_lines(raw, header_end, len(raw)),
        },
    }


def searchable_text(raw: bytes) -> tuple[str, str]:
    """``(headers, body)``: the text the full-text index holds for ``raw``, at most ``MAX_TEXT`` characters
    together. Headers: the decoded values of the top-level header fields, one per line. Body: the decoded
    text parts (HTML without its tags) and the decoded headers of attached messages, in order."""
    an = _Analyzer(raw, want_text=True)
    header_end = _header_end(raw, 0, len(raw))
    fields = parse_fields(raw[:header_end])
    an.add_text("\n".join(decode_words(value) for _, value in fields))
    headers = "".join(an.texts)
    an.texts = []
    an.node(0, len(raw), "text/plain", 0, first_values(fields))
    return headers, "".join(an.texts)
