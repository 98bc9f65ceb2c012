"""Sans-I/O pieces of the outbound SMTP client: reply parsing, EHLO keywords, command encoding, DATA payload.

Invariants:
- No asyncio, socket, ssl or store imports: everything here is bytes in, values out, testable without a loop.
- Every command line this module produces ends in exactly one CRLF and contains no other CR, LF or C0
  control character: an address or parameter carrying one is refused with :class:`LocalProtocolError` before
  a byte is written (RFC 5321 §4.1.2 has no place for them; a CR/LF would inject a command).
- :func:`data_payload` puts only CRLF line endings on the wire (bare CR and bare LF become CRLF, RFC 5321
  §2.3.8), dot-stuffs every line that starts with "." (RFC 5321 §4.5.2) and ends with CRLF "." CRLF, so the
  peer sees the end of data exactly where we meant it (the SMTP smuggling class cannot start here).
- :class:`ReplyParser` raises only :class:`RemoteProtocolError` for bad input, and bounds memory by
  :data:`MAX_REPLY_LINE` and :data:`MAX_REPLY_LINES`.
"""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import quopri
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from postroom.errors import LocalProtocolError, RemoteProtocolError

MAX_REPLY_LINE = 2048  # octets; RFC 5321 §4.5.3.1.5 says 512, we are lenient with peers but bounded
MAX_REPLY_LINES = 200  # lines of one multi-line reply (an EHLO reply has a few dozen at most)
MAX_ADDRESS = 256  # octets of a path, RFC 5321 §4.5.3.1.3
MAX_PARAM = 500  # octets of one ENVID/ORCPT parameter value, RFC 3461 §4.4/§4.2 (100 + xtext growth)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
#: A well-formed reply line (code 200-599, separator, text without CR/LF, line end); others take the
#: general path in ``ReplyParser.next_reply``, which also gives the errors.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])([^\r\n]*))?\r*\n")


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete SMTP reply (RFC 5321 §4.2): a three-digit code and its text lines."""

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code of the first line when its class matches the code, else ""."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m is None or m.group(1) != str(self.code)[0]:
            return ""
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        lines = self.lines
        if len(lines) == 1:  # the usual reply: no join
            return f"{self.code} {lines[0]}"
        return f"{self.code} " + " / ".join(line for line in lines if line)


class ReplyParser:
    """Feed received bytes, take complete replies. Bytes after the last complete reply stay buffered.

    Complete lines are consumed by moving ``_pos``; the buffer is compacted when it runs out of lines,
    not once per line."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed octet in _buf
        self._pending: list[str] = []
        self._code = 0
        self._back: list[Reply] = []  # replies given back with unread(), returned first

    @property
    def buffered(self) -> int:
        """Octets received and not yet part of a returned reply (incl. a started multi-line reply)."""
        back = sum(4 + sum(len(x) for x in r.lines) for r in self._back)
        return len(self._buf) - self._pos + sum(len(x) for x in self._pending) + back

    def discard(self) -> None:
        """Forget everything buffered (called after ``220`` to STARTTLS, RFC 3207 §4.2)."""
        self._buf.clear()
        self._pos = 0
        self._pending.clear()
        self._code = 0
        self._back.clear()

    def unread(self, replies: list[Reply]) -> None:
        """Give ``replies`` back: the next ``next_reply`` calls return them, in order, before anything else."""
        self._back[:0] = replies

    def feed(self, data: bytes) -> None:
        self._buf.extend(data)
        buf, pos = self._buf, self._pos
        if len(buf) - pos > MAX_REPLY_LINE and buf.find(b"\n", pos, pos + MAX_REPLY_LINE + 1) < 0:
            raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more bytes are needed."""
        if self._back:
            return self._back.pop(0)
        buf = self._buf
        while True:
            pos = self._pos
            end = buf.find(b"\n", pos)
            if end < 0:
                if pos:
                    del buf[:pos]
                    self._pos = 0
                return None
            if end + 1 - pos > MAX_REPLY_LINE:
                raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
            self._pos = end + 1
            m = _REPLY_LINE.fullmatch(buf, pos, end + 1)
            if m is not None:
                code, more, text = int(m[1]), m[2] == b"-", m[3] or b""
            else:
                line = bytes(buf[pos : end + 1]).rstrip(b"\r\n")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
                code = int(line[:3])
                if not 200 <= code <= 599:
                    raise RemoteProtocolError(f"reply code {code} out of range")
                more, text = line[3:4] == b"-", line[4:]
            if self._pending and code != self._code:
                raise RemoteProtocolError("reply code changed inside a multi-line reply")
            self._code = code
            self._pending.append(text.decode("utf-8", "replace"))
            if len(self._pending) > MAX_REPLY_LINES:
                raise RemoteProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
            if not more:
                reply = Reply(code, tuple(self._pending))
                self._pending = []
                return reply


@dataclass(frozen=True, slots=True)
class Extensions:
    """The service extensions a peer announced in its EHLO reply (RFC 5321 §4.1.1.1)."""

    keywords: dict[str, str] = field(default_factory=dict)  # upper-cased keyword -> parameters

    @classmethod
    def from_reply(cls, reply: Reply) -> Extensions:
        kw: dict[str, str] = {}
        for line in reply.lines[1:]:
            name, _, params = line.strip().partition(" ")
            if name:
                kw[name.upper()] = params.strip()
        return cls(kw)

    def has(self, name: str) -> bool:
        return name in self.keywords or name.upper() in self.keywords  # callers mostly pass upper case

    @property
    def size_limit(self) -> int:
        """SIZE's announced maximum (RFC 1870 §4), 0 when absent or unlimited."""
        value = self.keywords.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.keywords.get("AUTH", "").upper().split())


@functools.lru_cache(maxsize=4096)  # a burst repeats its sender; errors are raised, never cached
def check_address(address: str, *, smtputf8: bool) -> bytes:
    """The wire form of a path's address, or LocalProtocolError when it cannot be sent safely.

    Refused: any C0 control or DEL (CR/LF above all), ``<``, ``>`` and spaces (they would end the path),
    non-ASCII unless the peer accepted SMTPUTF8 (RFC 6531 §3.2), and paths over RFC 5321's 256 octets.
    """
    raw = address.encode("utf-8")
    if _CONTROL.search(raw) or any(c in address for c in "<> "):
        raise LocalProtocolError(f"address {address!r} contains a character that cannot go on the wire")
    if len(raw) > MAX_ADDRESS:
        raise LocalProtocolError("address longer than 256 octets (RFC 5321 §4.5.3.1.3)")
    if not smtputf8 and not address.isascii():
        raise LocalProtocolError("non-ASCII address and the peer lacks SMTPUTF8")
    return raw


def ascii_domain(address: str) -> str:
    """``local@bücher.example`` → ``local@xn--bcher-kva.example`` when only the domain is non-ASCII, so the
    address needs no SMTPUTF8 (RFC 6531 §3.2, RFC 5890 A-labels). Anything else is returned unchanged."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


def _check_param(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    if _CONTROL.search(raw) or b" " in raw or len(raw) > MAX_PARAM:
        raise LocalProtocolError(f"ESMTP parameter value {value!r} cannot go on the wire")
    return raw


def xtext(value: str) -> str:
    """RFC 3461 §4: xtext-encode (``+HH`` for "+", "=", and anything outside ``!``..``~``)."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def ehlo_command(name: str) -> bytes:
    return b"EHLO " + _check_param(name) + b"\r\n"


def mail_command(
    sender: str,
    ext: Extensions,
    *,
    size: int,
    eight_bit: bool,
    smtputf8: bool,
    ret: str = "",
    envid: str = "",
) -> bytes:
    """``MAIL FROM:<sender>`` with the parameters the peer announced (SIZE, BODY, SMTPUTF8, RET/ENVID)."""
    parts = [b"MAIL FROM:<" + check_address(sender, smtputf8=smtputf8) + b">"]
    if ext.has("SIZE"):
        parts.append(b"SIZE=%d" % size)  # RFC 1870 §6
    if eight_bit and ext.has("8BITMIME"):
        parts.append(b"BODY=8BITMIME")  # RFC 6152 §3
    if smtputf8:
        parts.append(b"SMTPUTF8")  # RFC 6531 §3.4
    if ext.has("DSN"):
        if ret.upper() in ("FULL", "HDRS"):
            parts.append(b"RET=" + ret.upper().encode())
        if envid:
            parts.append(b"ENVID=" + _check_param(envid))
    return b" ".join(parts) + b"\r\n"


def rcpt_command(recipient: str, ext: Extensions, *, smtputf8: bool, notify: str = "", orcpt: str = "") -> bytes:
    """``RCPT TO:<recipient>`` with NOTIFY/ORCPT passed on when the peer announced DSN (RFC 3461 §4.1)."""
    parts = [b"RCPT TO:<" + check_address(recipient, smtputf8=smtputf8) + b">"]
    if ext.has("DSN"):
        if notify:
            parts.append(b"NOTIFY=" + _check_param(notify.upper()))
        if orcpt:
            parts.append(b"ORCPT=" + _check_param(orcpt))
    return b" ".join(parts) + b"\r\n"


def command_group(
    sender: str, recipients: Sequence[str], ext: Extensions, *, size: int, eight_bit: bool, smtputf8: bool
) -> bytes:
    """MAIL, one RCPT per recipient and DATA as one pipelined write (RFC 2920 §3.1)."""
    mail = mail_command(sender, ext, size=size, eight_bit=eight_bit, smtputf8=smtputf8)
    return mail + b"".join(rcpt_command(a, ext, smtputf8=smtputf8) for a in recipients) + b"DATA\r\n"


def data_payload(message: bytes) -> bytes:
    """The octets to send after ``354``: CRLF-only, dot-stuffed, terminated by CRLF.CRLF.

    Bare CR and bare LF become CRLF (never passed through: a peer could read them as the end of a line
    or, with a following ".", as the end of data). A line starting with "." gets a second one.
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf and message.count(b"\n") == crlf:
        text = message  # already CRLF-only: the common case, without the regex
    else:
        text = _LINE_ENDS.sub(b"\r\n", message)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    text = text.replace(b"\r\n.", b"\r\n..")
    return text + b".\r\n"


def is_eight_bit(message: bytes) -> bool:
    """True when any octet has the high bit set (needs 8BITMIME or conversion, RFC 6152)."""
    return not message.isascii()


def headers_eight_bit(message: bytes) -> bool:
    """True when the header block carries raw 8-bit (UTF-8 headers need SMTPUTF8, RFC 6532)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[:end]
    return not head.isascii()


def to_seven_bit(message: bytes) -> bytes | None:
    """Convert an 8-bit body to 7-bit (quoted-printable for text, base64 otherwise), RFC 6152 §3.

    Returns None when it cannot be done without changing meaning (8-bit octets in a header). Multipart
    structure, boundaries and every 7-bit part stay as they are.
    """
    if headers_eight_bit(message):
        return None
    msg = email.message_from_bytes(message, policy=email.policy.compat32)
    for part in msg.walk():
        if part.is_multipart():
            continue
        raw_payload = part.get_payload(decode=True)
        if not isinstance(raw_payload, bytes) or raw_payload.isascii():
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            body = quopri.encodestring(_LINE_ENDS.sub(b"\n", raw_payload)).decode("ascii")
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            body = base64.encodebytes(raw_payload).decode("ascii")
            part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(body)
    out = msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
    return out if out.isascii() else None
