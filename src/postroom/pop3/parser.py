"""POP3 command framing and parsing: bytes in, :class:`Command` / :class:`BadLine` out. No I/O.

Invariants:
- A command is one line ending in LF (CRLF per RFC 1939 §3; a bare LF is accepted, the CR is stripped).
- A line longer than the limit (RFC 2449 §4: 255 octets including CRLF) is never buffered whole: the buffer
  switches to discarding until the next LF and yields exactly one :class:`BadLine` for it. Therefore memory
  stays bounded by the limit and feeding the same bytes split anywhere yields the same items.
- The verb is case-insensitive ASCII (RFC 1939 §3); arguments keep their bytes (decoded as UTF-8 with
  ``surrogateescape`` so nothing is lost). ``rest`` is the whole text after the verb and one space, which
  PASS needs because a password may contain spaces (RFC 1939 §7 note).
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.pop3.limits import MAX_COMMAND_LINE


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: ``verb`` upper-cased, ``args`` split on spaces, ``rest`` the raw argument text."""

    verb: str
    args: tuple[str, ...]
    rest: str


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that cannot be a command: ``reason`` says why (too long, not ASCII, empty)."""

    reason: str


Item = Command | BadLine


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_line(line: bytes) -> Item:
    """Parse one line without its line ending."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.strip():
        return BadLine("empty command")
    verb_b, _, rest_b = line.partition(b" ")
    if not verb_b.isascii() or not verb_b.isalpha() or len(verb_b) > 8:
        return BadLine("invalid command")
    rest = _text(rest_b)
    args = tuple(a for a in rest.split(" ") if a)
    return Command(verb_b.decode("ascii").upper(), args, rest)


class LineBuffer:
    """Splits received bytes into lines of at most ``max_line`` octets (including the line ending).

    :meth:`feed` adds bytes; :meth:`next_line` returns the next complete line (without its LF, CR kept)
    or a :class:`BadLine` for an over-long one, or None when more data is needed. ``max_line`` may be changed
    between lines (an AUTH exchange allows longer SASL responses).
    """

    __slots__ = ("_buf", "_discarding", "_scan", "max_line")

    def __init__(self, max_line: int = MAX_COMMAND_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False
        self._scan = 0  # bytes of _buf already known to hold no LF

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        """Drop everything buffered (after STLS: nothing sent in plaintext may run inside TLS)."""
        self._buf.clear()
        self._discarding = False
        self._scan = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_line(self) -> bytes | BadLine | None:
        while True:
            idx = self._buf.find(b"\n", self._scan)
            if idx < 0:
                if self._discarding:
                    self._buf.clear()
                    self._scan = 0
                elif len(self._buf) >= self.max_line:
                    # Without the LF the line is already too long: stop buffering it.
                    self._discarding = True
                    self._buf.clear()
                    self._scan = 0
                else:
                    self._scan = len(self._buf)
                    return None
                return None
            line = bytes(self._buf[:idx])
            del self._buf[: idx + 1]
            self._scan = 0
            if self._discarding:
                self._discarding = False
                return BadLine("line too long")
            if idx + 1 > self.max_line:
                return BadLine("line too long")
            return line


#: Verbs whose arguments may be logged at TRACE level; anything else shows only its verb or its length.
_SAFE_ARGS = frozenset({"USER", "STAT", "LIST", "RETR", "DELE", "TOP", "UIDL", "NOOP", "RSET", "QUIT", "CAPA", "STLS"})


def redact(data: bytes, in_sasl: bool = False) -> str:
    """Client bytes for a TRACE transcript with secrets removed: PASS/APOP arguments, AUTH initial responses,
    every line that is not a known command, and the first line when ``in_sasl`` (a SASL response, which
    could spell anything) are replaced by placeholders."""
    out = []
    for i, raw in enumerate(data.split(b"\n")):
        if not raw:
            continue
        if i == 0 and in_sasl:
            out.append(f"<SASL response, {len(raw)} octets>")
            continue
        parsed = parse_line(raw[:64])
        if isinstance(parsed, Command) and parsed.verb in _SAFE_ARGS:
            out.append(raw.rstrip(b"\r")[:64].decode("ascii", "replace"))
        elif isinstance(parsed, Command) and parsed.verb == "AUTH":
            out.append(" ".join(["AUTH", *parsed.args[:1], *(["<redacted>"] if len(parsed.args) > 1 else [])]))
        elif isinstance(parsed, Command) and parsed.verb in ("PASS", "APOP"):
            out.append(f"{parsed.verb} <redacted>")
        else:
            out.append(f"<{len(raw)} octets>")
    return " | ".join(out)
