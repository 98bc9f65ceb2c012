"""FETCH attribute grammar (RFC 9051 §6.4.5, RFC 3516 BINARY, RFC 7162 CHANGEDSINCE/VANISHED)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.imap.grammar import MAX_NUMBER64, BadArgs, atom, number
from postroom.imap.tokens import Token

MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SIMPLE = frozenset(
    {
        "FLAGS",
        "UID",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
        "BODY",
        "BODYSTRUCTURE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
        "MODSEQ",
        "SAVEDATE",
        "EMAILID",
        "THREADID",
    }
)
_SECTIONED = re.compile(
    r"(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK|BINARY\.SIZE)\[([^\]]*)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z",
    re.IGNORECASE,
)
_SECTION = re.compile(
    r"((?:[1-9]\d{0,5}\.)*[1-9]\d{0,5})?\.?(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?"
    r"(?:\s*\((.*)\))?\Z",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Section:
    path: tuple[int, ...] = ()
    text: str = ""  # "", HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[str, ...] = ()
    spec: str = ""  # as echoed in the response, e.g. "1.HEADER.FIELDS (FROM TO)"


@dataclass(frozen=True, slots=True)
class FetchAtt:
    name: str  # FLAGS, UID, …, or BODY / BINARY / BINARY.SIZE for sectioned items
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None  # (origin, count)

    @property
    def needs_bytes(self) -> bool:
        return self.section is not None or self.name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT")

    @property
    def sets_seen(self) -> bool:
        """BODY[…] and RFC822/RFC822.TEXT set \\Seen; .PEEK, RFC822.HEADER and BINARY.SIZE do not."""
        if self.section is not None:
            return not self.peek and self.name != "BINARY.SIZE"
        return self.name in ("RFC822", "RFC822.TEXT")


@dataclass(frozen=True, slots=True)
class FetchArgs:
    atts: tuple[FetchAtt, ...]
    changedsince: int | None = None
    vanished: bool = False


def parse_section(text: str, binary: bool) -> Section:
    m = _SECTION.match(text.strip())
    if m is None:
        raise BadArgs("bad section")
    path = tuple(int(x) for x in m.group(1).split(".")) if m.group(1) else ()
    kind = (m.group(2) or "").upper()
    fields: tuple[str, ...] = ()
    if kind.startswith("HEADER.FIELDS"):
        if m.group(3) is None:
            raise BadArgs("HEADER.FIELDS needs a list")
        fields = tuple(f.strip('"').upper() for f in m.group(3).split())
        if not fields:
            raise BadArgs("HEADER.FIELDS needs a list")
    elif m.group(3) is not None:
        raise BadArgs("bad section")
    if kind == "MIME" and not path:
        raise BadArgs("MIME needs a part number")
    if binary and kind:
        raise BadArgs("BINARY takes a part number only")
    spec = ".".join(str(p) for p in path)
    if kind:
        spec = f"{spec}.{kind}" if spec else kind
    if fields:
        spec += " (" + " ".join(fields) + ")"
    return Section(path, kind, fields, spec)


def _one(tok: Token) -> list[FetchAtt]:
    name = atom(tok)
    upper = name.upper()
    if upper in SIMPLE:
        return [FetchAtt(upper)]
    if upper in MACROS:
        return [FetchAtt(n) for n in MACROS[upper]]
    m = _SECTIONED.match(name)
    if m is None:
        raise BadArgs(f"unknown FETCH attribute {name[:40]}")
    item = m.group(1).upper()
    binary = item.startswith("BINARY")
    section = parse_section(m.group(2), binary)
    partial = None
    if m.group(3) is not None:
        if item == "BINARY.SIZE":
            raise BadArgs("BINARY.SIZE takes no partial")
        partial = (int(m.group(3)), int(m.group(4)))
        if partial[1] == 0:
            raise BadArgs("partial count must be non-zero")
    peek = item.endswith(".PEEK")
    base = item.removesuffix(".PEEK")
    return [FetchAtt(base, section, peek, partial)]


def parse_fetch(args: list[Token]) -> FetchArgs:
    """``sequence-set`` is parsed by the caller; ``args`` are the attribute(s) and modifiers."""
    if not args:
        raise BadArgs("FETCH needs attributes")
    first = args[0]
    atts: list[FetchAtt] = []
    if isinstance(first, list):
        if not first:
            raise BadArgs("empty FETCH attribute list")
        for tok in first:
            atts.extend(_one(tok))
    else:
        atts.extend(_one(first))
    changedsince = None
    vanished = False
    if len(args) > 2:
        raise BadArgs("too many arguments")
    if len(args) == 2:
        mods = args[1]
        if not isinstance(mods, list):
            raise BadArgs("bad FETCH modifiers")
        i = 0
        while i < len(mods):
            mod = atom(mods[i]).upper()
            if mod == "CHANGEDSINCE" and i + 1 < len(mods):
                changedsince = number(mods[i + 1], MAX_NUMBER64)
                i += 2
            elif mod == "VANISHED":
                vanished = True
                i += 1
            else:
                raise BadArgs(f"unknown FETCH modifier {mod[:40]}")
    seen: set[FetchAtt] = set()
    unique = [a for a in atts if not (a in seen or seen.add(a))]  # type: ignore[func-returns-value]
    return FetchArgs(tuple(unique), changedsince, vanished)
