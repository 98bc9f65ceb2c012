"""Typed arguments from tokens: strings, sequence sets, flags, dates, FETCH attributes (RFC 9051 §9).

Every function takes tokens produced by :mod:`postroom.imap.tokens` and raises :class:`BadArgs` (a
``RemoteProtocolError``) on anything the grammar does not allow; the session answers it with ``BAD``.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from dataclasses import dataclass

from postroom.errors import RemoteProtocolError
from postroom.imap.tokens import Token

MAX_NUMBER = 2**32 - 1  # nz-number / uniqueid upper bound (RFC 9051 §9 "number")
MAX_NUMBER64 = 2**63 - 1  # mod-sequence-value (RFC 7162 §7)


class BadArgs(RemoteProtocolError):
    """Arguments that do not follow the grammar."""


MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
_DATE = re.compile(r'"?(\d{1,2})-([A-Za-z]{3})-(\d{4})"?\Z')
_DATETIME = re.compile(r"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\Z")


def astring(tok: Token) -> str:
    if isinstance(tok, list):
        raise BadArgs("expected a string")
    if isinstance(tok, bytes):
        return tok.decode("utf-8", "replace")
    return tok


def astring_bytes(tok: Token) -> bytes:
    if isinstance(tok, list):
        raise BadArgs("expected a string")
    if isinstance(tok, bytes):
        return tok
    return tok.encode("utf-8")


def atom(tok: Token) -> str:
    if not isinstance(tok, str):
        raise BadArgs("expected an atom")
    return tok


def number(tok: Token, limit: int = MAX_NUMBER) -> int:
    if not isinstance(tok, str) or not tok.isdigit() or len(tok) > 20:
        raise BadArgs("expected a number")
    value = int(tok)
    if value > limit:
        raise BadArgs("number out of range")
    return value


def mailbox(tok: Token) -> str:
    """A mailbox name; ``INBOX`` in any case is INBOX (RFC 9051 §5.1). Separator ``/``."""
    name = astring(tok)
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX/"):
        return "INBOX" + name[5:]
    return name


def arity(args: list[Token], lo: int, hi: int | None = None) -> None:
    hi = lo if hi is None else hi
    if not lo <= len(args) <= hi:
        raise BadArgs("wrong number of arguments")


@dataclass(frozen=True, slots=True)
class SeqSet:
    """A sequence set; 0 stands for ``*``. ``saved`` is ``$`` (RFC 5182 search result)."""

    ranges: tuple[tuple[int, int], ...]
    saved: bool = False

    def bounds(self, largest: int) -> Iterator[tuple[int, int]]:
        """Each range as ``(lo, hi)`` with ``*`` replaced by ``largest`` and lo <= hi."""
        for a, b in self.ranges:
            a = largest if a == 0 else a
            b = largest if b == 0 else b
            yield (a, b) if a <= b else (b, a)

    def contains(self, value: int, largest: int) -> bool:
        return any(lo <= value <= hi for lo, hi in self.bounds(largest))


_SEQ_ITEM = re.compile(r"(\d+|\*)(?::(\d+|\*))?\Z")


def seqset(tok: Token) -> SeqSet:
    if not isinstance(tok, str) or not tok:
        raise BadArgs("expected a sequence set")
    if tok == "$":
        return SeqSet((), saved=True)
    ranges: list[tuple[int, int]] = []
    for item in tok.split(","):
        m = _SEQ_ITEM.match(item)
        if m is None:
            raise BadArgs("bad sequence set")
        a = 0 if m.group(1) == "*" else int(m.group(1))
        b = a if m.group(2) is None else (0 if m.group(2) == "*" else int(m.group(2)))
        if (m.group(1) != "*" and a == 0) or (m.group(2) not in (None, "*") and b == 0):
            raise BadArgs("sequence numbers start at 1")
        if a > MAX_NUMBER or b > MAX_NUMBER:
            raise BadArgs("number out of range")
        ranges.append((a, b))
    return SeqSet(tuple(ranges))


def flag_list(tok: Token) -> list[str]:
    """``(\\Seen $Label)`` or a single flag; returns the flags with system flags in canonical case."""
    items = tok if isinstance(tok, list) else [tok]
    out: list[str] = []
    for item in items:
        f = atom(item)
        if f.startswith("\\"):
            canon = SYSTEM_FLAGS.get(f.lower())
            if canon is None:
                raise BadArgs(f"unknown system flag {f}")
            f = canon
        elif not f or any(c in f for c in '(){%*"]'):
            raise BadArgs("bad flag")
        if f not in out:
            out.append(f)
    return out


SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
SYSTEM_FLAGS["\\recent"] = "\\Recent"


def date(tok: Token) -> tuple[int, int, int]:
    """``1-Feb-1994`` → (1994, 2, 1)."""
    m = _DATE.match(astring(tok))
    if m is None or m.group(2).title() not in MONTHS:
        raise BadArgs("bad date")
    return int(m.group(3)), MONTHS[m.group(2).title()], int(m.group(1))


def date_time(tok: Token) -> float:
    """``"17-Jul-1996 02:44:25 -0700"`` → seconds since the epoch."""
    m = _DATETIME.match(astring(tok))
    if m is None or m.group(2).title() not in MONTHS:
        raise BadArgs("bad date-time")
    day, mon, year = int(m.group(1)), MONTHS[m.group(2).title()], int(m.group(3))
    hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6))
    offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60 * (1 if m.group(7) == "+" else -1)
    try:
        return float(calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0)) - offset)
    except (ValueError, OverflowError):
        raise BadArgs("bad date-time") from None
