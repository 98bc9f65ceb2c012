"""Sans-I/O command reader: bytes in, framed commands (line + literals) out.

Usage (h11 style)::

    reader.receive_data(data)
    while (event := reader.next_event()) is not None:
        ...  # Command, ContinueLiteral, LiteralRejected, LineTooLong, Line

Invariants:
- Framing happens lazily in :meth:`next_event`, so the session can switch to raw-line mode
  (``read_line_mode``: AUTHENTICATE responses, IDLE's ``DONE``) before the next line is framed.
- A synchronising literal ``{n}`` gets :class:`ContinueLiteral` (the adapter sends ``+``) only when
  ``n <= max_literal``; otherwise :class:`LiteralRejected` comes *before* any ``+`` and the rest of that
  command is dropped (RFC 7888 §4, RFC 9051 §7.1 TOOBIG). A non-synchronising literal ``{n+}`` over the
  limit cannot be refused in time, so it is :class:`LiteralRejected` with ``fatal=True`` (the adapter says
  BYE). Literal octets never count against ``max_line``.
- A line longer than ``max_line`` octets gives :class:`LineTooLong`; the reader then discards input up to
  the next LF and goes on. The buffer never holds more than ``max_line`` octets of an unfinished line.
- NUL octets outside literals make the command :class:`Malformed` (RFC 9051 §4.3: strings exclude NUL);
  inside the framed command a literal is replaced by ``\\x00<index>\\x00`` for the tokenizer.
- Only :class:`~postroom.errors.RemoteProtocolError` subclasses escape for bad input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.imap.limits import MAX_LINE, MAX_LITERAL

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})(\+)?\}\r?\n\Z")


@dataclass(frozen=True, slots=True)
class Command:
    """One complete command: ``line`` with literal placeholders and the literal octets."""

    line: bytes
    literals: tuple[bytes, ...]
    binary: tuple[bool, ...]  # per literal: was it a literal8 (``~{n}``, RFC 3516)


@dataclass(frozen=True, slots=True)
class ContinueLiteral:
    """Send a ``+`` continuation: the client waits for it before sending a synchronising literal."""


@dataclass(frozen=True, slots=True)
class LiteralRejected:
    """A literal over the limit. ``fatal``: it was non-synchronising and cannot be skipped safely."""

    tag: str
    size: int
    fatal: bool


@dataclass(frozen=True, slots=True)
class LineTooLong:
    tag: str


@dataclass(frozen=True, slots=True)
class Malformed:
    tag: str
    reason: str


@dataclass(frozen=True, slots=True)
class Line:
    """A raw line in ``read_line_mode`` (without its CRLF)."""

    data: bytes


Event = Command | ContinueLiteral | LiteralRejected | LineTooLong | Malformed | Line


def _tag_of(data: bytes) -> str:
    tag = data.split(b" ", 1)[0].strip()
    if not tag or len(tag) > 64:
        return "*"
    return tag.decode("ascii", "replace")


class CommandReader:
    """Frames IMAP commands out of a byte stream. See the module docstring for the invariants."""

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.read_line_mode = False
        self._buf = bytearray()
        self._parts: list[bytes] = []  # line segments of the command so far
        self._literals: list[bytearray] = []  # grown in place: a 64 MB literal must not be copied per chunk
        self._binary: list[bool] = []
        self._line_len = 0
        self._need = 0  # literal octets still expected
        self._discard_line = False  # skipping the rest of an over-long line
        self._nul = False  # a NUL octet was seen outside literals in this command

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        """Forget everything buffered (after STARTTLS: nothing pipelined in plaintext survives)."""
        self._buf.clear()
        self._reset()
        self._discard_line = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_literal(self) -> bool:
        return self._need > 0

    def _reset(self) -> None:
        self._parts = []
        self._literals = []
        self._binary = []
        self._line_len = 0
        self._need = 0
        self._nul = False

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed."""
        while True:
            if self._need:
                if not self._buf:
                    return None
                take = min(self._need, len(self._buf))
                self._literals[-1] += self._buf[:take]
                del self._buf[:take]
                self._need -= take
                continue
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) + self._line_len > self.max_line and not self._discard_line:
                    tag = _tag_of(bytes(self._parts[0]) if self._parts else bytes(self._buf[:80]))
                    self._buf.clear()
                    self._reset()
                    self._discard_line = True
                    return LineTooLong(tag)
                if self._discard_line:
                    self._buf.clear()
                return None
            segment = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            if self._discard_line:
                self._discard_line = False
                continue
            if self.read_line_mode and not self._parts:
                return Line(segment.rstrip(b"\r\n"))
            event = self._segment(segment)
            if event is not None:
                return event

    def _segment(self, segment: bytes) -> Event | None:
        self._line_len += len(segment)
        if self._line_len > self.max_line:
            tag = _tag_of(self._parts[0] if self._parts else segment)
            self._reset()
            return LineTooLong(tag)
        if b"\x00" in segment:
            self._nul = True
        m = _LITERAL_AT_END.search(segment)
        if m is None:
            self._parts.append(segment.rstrip(b"\r\n"))
            return self._finish()
        size = int(m.group(2))
        nonsync = m.group(3) is not None
        binary = bool(m.group(1))
        head = segment[: m.start()]
        tag = _tag_of(self._parts[0] if self._parts else head)
        if size > self.max_literal:
            if nonsync:
                self._reset()
                return LiteralRejected(tag, size, fatal=True)
            self._reset()
            return LiteralRejected(tag, size, fatal=False)
        index = len(self._literals)
        self._parts.append(head + b"\x00" + str(index).encode() + b"\x00")
        self._literals.append(bytearray())
        self._binary.append(binary)
        self._need = size
        return None if nonsync else ContinueLiteral()

    def _finish(self) -> Event:
        line = b"".join(self._parts)
        literals = tuple(bytes(lit) for lit in self._literals)
        binary = tuple(self._binary)
        nul = self._nul
        self._reset()
        if nul:
            return Malformed(_tag_of(line), "NUL octet in command")
        return Command(line, literals, binary)
