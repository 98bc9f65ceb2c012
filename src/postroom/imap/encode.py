"""Response encoding (RFC 9051 §7, §9): strings, flags, sets, dates, ENVELOPE and BODYSTRUCTURE.

Invariants: every value is encoded so that it cannot end or break the response line — strings with CR,
LF, NUL, quotes beyond the quoted-string grammar or non-ASCII octets become literals; ``None`` is ``NIL``.
ENVELOPE and BODYSTRUCTURE are rendered from the stored structure (``postroom.mime.analyze``) only.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

_SAFE = frozenset(range(0x20, 0x7F)) - {0x22, 0x5C}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_QUOTED = 1024  # longer strings are sent as literals


def qstr_bytes(data: bytes | None) -> bytes:
    if data is None:
        return b"NIL"
    if len(data) <= MAX_QUOTED and all(b in _SAFE for b in data):
        return b'"' + data + b'"'
    if len(data) <= MAX_QUOTED and not any(b in (0, 0x0D, 0x0A) or b > 0x7E or b < 0x20 for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def qstr(text: str | None) -> bytes:
    if text is None:
        return b"NIL"
    return qstr_bytes(text.encode("utf-8", "surrogateescape"))


def astring(text: str) -> bytes:
    """An atom when possible (mailbox names in LIST), else a string."""
    data = text.encode("utf-8")
    if data and all(b in _SAFE and b not in b"(){ %*]" for b in data) and data.upper() != b"NIL":
        return data
    return qstr_bytes(data)


def flag_list(flags: Iterable[str]) -> bytes:
    if isinstance(flags, frozenset):
        return flag_text(flags)
    return ("(" + " ".join(sorted(flags)) + ")").encode()


@functools.lru_cache(maxsize=4096)
def flag_text(flags: frozenset[str]) -> bytes:
    """``(\\Seen $Work)``; cached, since a mailbox has few distinct flag sets."""
    return ("(" + " ".join(sorted(flags)) + ")").encode()


def seq_text(numbers: Sequence[int]) -> str:
    """Ascending numbers as a compact sequence set (``1:3,7``)."""
    out: list[str] = []
    i, n = 0, len(numbers)
    while i < n:
        j = i
        while j + 1 < n and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(out)


def internaldate(ts: float) -> bytes:
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def _addresses(addrs: list[list[str | None]] | None) -> bytes:
    if not addrs:
        return b"NIL"
    return b"(" + b"".join(b"(" + b" ".join(qstr(p) for p in a) + b")" for a in addrs) + b")"


def envelope(env: list[Any]) -> bytes:
    date, subject, frm, sender, reply_to, to, cc, bcc, in_reply_to, message_id = env
    return (
        b"("
        + b" ".join(
            [
                qstr(date),
                qstr(subject),
                _addresses(frm),
                _addresses(sender),
                _addresses(reply_to),
                _addresses(to),
                _addresses(cc),
                _addresses(bcc),
                qstr(in_reply_to),
                qstr(message_id),
            ]
        )
        + b")"
    )


def _params(params: list[list[str]] | None) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(qstr(k) + b" " + qstr(v) for k, v in params) + b")"


def _disposition(node: dict[str, Any]) -> bytes:
    disp = node.get("disp")
    if not disp:
        return b"NIL"
    return b"(" + qstr(disp[0]) + b" " + _params(disp[1]) + b")"


def _language(node: dict[str, Any]) -> bytes:
    lang = node.get("lang")
    if not lang:
        return b"NIL"
    if len(lang) == 1:
        return qstr(lang[0])
    return b"(" + b" ".join(qstr(x) for x in lang) + b")"


def bodystructure(node: dict[str, Any], extended: bool) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY of one part node (RFC 9051 §7.5.2)."""
    t, s = node["t"], node["s"]
    if t == "multipart":
        kids = node.get("c") or []
        if kids:
            inner = b"".join(bodystructure(k, extended) for k in kids)
        else:  # a multipart without parts still needs one body (RFC 9051 "1*body")
            inner = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
        out = b"(" + inner + b" " + qstr(s)
        if extended:
            out += b" " + _params(node["p"]) + b" " + _disposition(node) + b" " + _language(node)
            out += b" " + qstr(node.get("loc"))
        return out + b")"
    fields = [
        qstr(t),
        qstr(s),
        _params(node["p"]),
        qstr(node.get("id")),
        qstr(node.get("d")),
        qstr(node["e"]),
        str(node["b"]).encode(),
    ]
    if "m" in node:
        fields.append(envelope(node["m"]["env"]))
        fields.append(bodystructure(node["m"]["n"], extended))
        fields.append(str(node.get("l", 0)).encode())
    elif t == "text":
        fields.append(str(node.get("l", 0)).encode())
    if extended:
        fields.append(qstr(node.get("md5")))
        fields.append(_disposition(node))
        fields.append(_language(node))
        fields.append(qstr(node.get("loc")))
    return b"(" + b" ".join(fields) + b")"
