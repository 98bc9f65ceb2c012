"""A bounded buffer that cuts a byte stream into command lines.

Invariants:
- A line ends at LF; one CR right before it is removed too (``CRLF`` is the standard, a lone ``LF`` is
  tolerated for commands only; DATA never goes through here, see :mod:`postroom.wire.dotstuff`).
- A line (without its ending) longer than ``max_line`` octets is never kept whole: the buffer discards
  it up to its end and :meth:`next_line` then returns :data:`TOO_LONG` once in its place, so memory stays
  bounded and the caller can answer ``500 Line too long`` in order with the other replies.
- :meth:`take_rest` hands the unparsed bytes over (for DATA/BDAT or an AUTH continuation), :meth:`clear`
  drops them (after STARTTLS, RFC 3207 §4.2).
"""

from __future__ import annotations

from typing import Final

TOO_LONG: Final = b"\x00<line too long>"  # sentinel returned in place of an overlong line


class LineBuffer:
    __slots__ = ("_buf", "_discarding", "_pos", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = b""
        self._pos = 0  # start of the unread part of _buf
        self._discarding = False  # inside an overlong line, dropping until its LF

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def next_line(self) -> bytes | None:
        """The next complete line without its ending, :data:`TOO_LONG`, or None if none is complete."""
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos)
        if self._discarding:
            if nl < 0:
                self._buf, self._pos = b"", 0
                return None
            self._discarding = False
            self._pos = nl + 1
            return TOO_LONG
        if nl < 0:
            if len(buf) - pos > self.max_line + 1:  # +1: a CR that may be followed by LF
                self._buf, self._pos = b"", 0
                self._discarding = True
            return None
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        self._pos = nl + 1
        if end - pos > self.max_line:
            return TOO_LONG
        return buf[pos:end]

    def take_rest(self) -> bytes:
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        return rest

    def clear(self) -> None:
        self._buf, self._pos = b"", 0
        self._discarding = False

    def __len__(self) -> int:
        return len(self._buf) - self._pos
