"""A small, fast MIME writer for burst messages (RFC 5322, RFC 2045-2047, RFC 2231, RFC 6532).

The standard library's ``email.message.EmailMessage`` re-parses every header it is given and spent about
nine tenths of the time of composing a message with a PDF; burst messages all have the same simple shape,
so they are written directly.

Invariants:
- Output uses CRLF only; no line is longer than 998 octets (RFC 5322 §2.1.1); header lines are folded at 78
  where a fold is possible (one address per line, encoded-words of bounded length).
- Non-ASCII header text becomes RFC 2047 encoded-words (display names, subject), except addresses, which
  are written in UTF-8 (RFC 6532) and need SMTPUTF8 on the wire; the caller checks that.
- Text parts are 7bit when they are ASCII with short lines, otherwise quoted-printable UTF-8; binary parts
  are base64 in 76-character lines (RFC 2045 §6.8). Attachment names use RFC 2231 when not ASCII.
- Boundaries are random and cannot occur in base64 or quoted-printable content.
- Header values are checked for CR/LF: nothing user-supplied can add a header.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence
from email.header import Header
from email.utils import formataddr, parseaddr
from urllib.parse import quote

from postroom.errors import LocalProtocolError

MAX_LINE = 998  # octets, RFC 5322 §2.1.1
FOLD_AT = 78  # RFC 5322 §2.1.1 "SHOULD"


def _check(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise LocalProtocolError("CR or LF in a header value")
    return value


def encode_text(value: str) -> str:
    """Unstructured header text (Subject): as is when ASCII, else RFC 2047 encoded-words, folded."""
    _check(value)
    if value.isascii() and len(value) < MAX_LINE - 20:
        return value
    return Header(value, "utf-8", maxlinelen=FOLD_AT, header_name="Subject").encode(linesep="\r\n")


def encode_mailbox(text: str) -> str:
    """``Name <addr>`` with the name quoted or encoded as needed; the address stays as given."""
    _check(text)
    name, addr = parseaddr(text)
    if not addr:
        return text
    if not name:
        return addr
    if name.isascii():
        return formataddr((name, addr))
    return f"{Header(name, 'utf-8').encode()} <{addr}>"


def address_list(addresses: Sequence[str]) -> str:
    """Addresses separated by commas, one per folded line when there are several."""
    return ",\r\n ".join(encode_mailbox(a) for a in addresses)


def _param(name: str, value: str) -> str:
    if value.isascii():
        return '{}="{}"'.format(name, value.replace("\\", "\\\\").replace('"', '\\"'))
    return f"{name}*=utf-8''{quote(value, safe='')}"


def _text_part(text: str, subtype: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = body.split("\n")
    if body.isascii() and all(len(line) <= MAX_LINE - 2 for line in lines):
        cte, payload = "7bit", "\r\n".join(lines).encode("ascii")
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
    else:
        cte = "quoted-printable"
        payload = binascii.b2a_qp(body.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    return head.encode("ascii") + payload


def _binary_part(data: bytes, content_type: str, filename: str) -> bytes:
    _check(filename)
    _check(content_type)
    head = (
        f"Content-Type: {content_type}; {_param('name', filename)}\r\n"
        f"Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; {_param('filename', filename)}\r\n\r\n"
    )
    return head.encode("ascii") + base64.encodebytes(data).replace(b"\n", b"\r\n")


def _multipart(subtype: str, parts: Sequence[bytes]) -> tuple[str, bytes]:
    boundary = "=_postroom_" + secrets.token_hex(12)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    return f'multipart/{subtype}; boundary="{boundary}"', body


def message(
    headers: Sequence[tuple[str, str]],
    text: str,
    html: str | None,
    attachments: Sequence[tuple[bytes, str, str]],
) -> bytes:
    """The whole message: ``headers`` (values already encoded by this module's functions), a text body with
    an optional HTML alternative, and ``(data, content type, file name)`` attachments."""
    body_part = _text_part(text, "plain")
    if html is not None:
        ctype, alt = _multipart("alternative", [body_part, _text_part(html, "html")])
        body_part = f"Content-Type: {ctype}\r\n\r\n".encode("ascii") + alt
    parts = [body_part] + [_binary_part(d, t, n) for d, t, n in attachments]
    ctype, body = _multipart("mixed", parts)
    lines = [f"{name}: {value}" for name, value in headers]  # values come from the encoders above
    lines += ["MIME-Version: 1.0", f"Content-Type: {ctype}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
