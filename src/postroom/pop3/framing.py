"""POP3 multi-line responses: dot-stuffing and TOP extraction (RFC 1939 §3, §7). Pure bytes, no I/O.

Invariants:
- :func:`dotstuff` doubles the leading "." of every line, whether the line ended in CRLF or a bare LF, so a
  client that splits on either can never see a premature terminator; the result always ends in CRLF so the
  caller appends just ``.CRLF``.
- :func:`top` returns the header, the empty line and at most ``n`` body lines, never re-parsing MIME.
- Both work in a handful of C-level passes (``replace``/``find``): RETR is the hot path.
"""

from __future__ import annotations

TERMINATOR = b".\r\n"


def dotstuff(raw: bytes) -> bytes:
    """``raw`` with every line that starts with "." given one more, ending in CRLF (b"" stays b"")."""
    if not raw:
        return raw
    out = raw.replace(b"\n.", b"\n..")
    if out.startswith(b"."):
        out = b"." + out
    if not out.endswith(b"\n"):
        out += b"\r\n"
    elif not out.endswith(b"\r\n"):
        out = out[:-1] + b"\r\n"
    return out


def unstuff(data: bytes) -> bytes:
    """The inverse of :func:`dotstuff` on CRLF text without the terminator (for tests and clients)."""
    out = data.replace(b"\r\n..", b"\r\n.")
    if out.startswith(b".."):
        out = out[1:]
    return out


def _header_end(raw: bytes) -> int:
    """Offset just after the empty line ending the header, or len(raw) when there is none."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    candidates = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    if raw.startswith(b"\r\n"):
        candidates.append(2)
    elif raw.startswith(b"\n"):
        candidates.append(1)
    return min(candidates) if candidates else len(raw)


def top(raw: bytes, n: int) -> bytes:
    """The header, the separating empty line and the first ``n`` body lines (RFC 1939 §7 TOP)."""
    end = _header_end(raw)
    pos = end
    for _ in range(n):
        if pos >= len(raw):
            break
        nl = raw.find(b"\n", pos)
        if nl < 0:
            pos = len(raw)
            break
        pos = nl + 1
    return raw[:pos]
