"""Recipient tags in a page's extracted text: the PDF-eXPLODE syntax and Postroom's native syntax.

Pure functions, no PDF library and no I/O: :func:`find_tags` takes the text of one page as the extractor
returned it and gives back the tags on it, or raises :class:`TagError` for the first malformed one.

Two syntaxes (``docs/burst-tags.md`` is the user's reference):

- PDF-eXPLODE: ``<pdfexplode>v1,v2,…%MessageID#client@example.com</pdfexplode>``. Up to
  :data:`MAX_PDFEXPLODE_VARS` comma-separated values ended by ``%``; a value holding a comma (or ``%``,
  ``#``) is wrapped in back quotes; then an optional message id ended by ``#``; then exactly one address,
  always last. ``<pdfexplode></pdfexplode>`` marks a page with no recipient.
- Native: ``[[postroom to=a@x.com, b@y.com; cc=…; bcc=…; reply-to=…; subject=…; template=invoice;
  file=Invoice-{v1}.pdf; password=…; var.amount=12.50]]``. ``key=value`` pairs separated by ``;``; a value
  holding ``;`` or ``]`` is back-quoted. Unknown, repeated or empty keys are errors. ``[[postroom]]`` marks a
  page with no recipient.

Invariants:
- Text extractors break tags: a tag printed over two lines comes back with ``\\r\\n`` in it, a line ending in
  ``-`` comes back as U+FFFE or U+0002 with the line break removed, and separate text runs may gain a
  generated space. :func:`normalise` undoes the first two everywhere on the page (line breaks are
  deleted, hyphen markers become ``-``); whitespace is allowed between the letters of the markers; inside a
  tag, addresses lose all whitespace and other values have runs of whitespace collapsed to one space and
  are stripped. Nothing else is guessed.
- Addresses are validated with :func:`postroom.wire.address.parse_mailbox` (RFC 5321, SMTPUTF8 allowed).
- A tag that opens and never closes on the same page is an error, never silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from postroom.errors import PostroomError
from postroom.wire.address import AddressError, parse_mailbox

MAX_PDFEXPLODE_VARS = 9  # PDF-eXPLODE's documented limit: variables v1 … v9
MAX_TAG_CHARS = 4000  # a tag longer than this is surely a missing close marker, not a tag
MAX_ADDRESSES = 1000  # per header field in one native tag; far above any provider's per-message limit

_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.-]+\Z")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WS = re.compile(r"\s+")


def _marker(word: str) -> str:
    """A regex for ``word`` that tolerates whitespace (generated spaces) between its characters."""
    return r"\s*".join(re.escape(c) for c in word)


_PDFX_OPEN = _marker("<pdfexplode>")
_PDFX_CLOSE = _marker("</pdfexplode>")
_NATIVE_OPEN = _marker("[[") + r"\s*" + _marker("postroom") + r"(?=[\s\]])"
_NATIVE_CLOSE = _marker("]]")
_OPENERS = re.compile(rf"(?P<pdfx>{_PDFX_OPEN})|(?P<native>{_NATIVE_OPEN})", re.IGNORECASE)
_PDFX_CLOSE_RE = re.compile(_PDFX_CLOSE, re.IGNORECASE)


class TagError(PostroomError):
    """A malformed tag; the message says what is wrong and quotes the tag."""


@dataclass(frozen=True, slots=True)
class Tag:
    """One recipient tag. ``to`` empty means "this page has no recipient".

    ``template`` is the message id (PDF-eXPLODE) or ``template=`` (native); None selects the default.
    ``variables`` keeps the order of the tag: ``v1``… for PDF-eXPLODE, ``var.NAME`` names for native.
    """

    syntax: Literal["pdfexplode", "native"]
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str | None = None
    template: str | None = None
    filename: str | None = None
    password: str | None = None
    variables: tuple[tuple[str, str], ...] = ()
    raw: str = field(default="", compare=False)

    @property
    def is_empty(self) -> bool:
        return not self.to

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every envelope recipient: to, cc and bcc (what providers count against their limits)."""
        return self.to + self.cc + self.bcc

    def same_message(self, other: Tag) -> bool:
        """True when both tags ask for the same message (the syntax and raw text may differ)."""
        return _identity(self) == _identity(other)


def _identity(tag: Tag) -> tuple[object, ...]:
    return (
        tuple(a.lower() for a in tag.to),
        tuple(a.lower() for a in tag.cc),
        tuple(a.lower() for a in tag.bcc),
        tuple(a.lower() for a in tag.reply_to),
        tag.subject,
        tag.template,
        tag.filename,
        tag.password,
        tag.variables,
    )


def normalise(text: str) -> str:
    """Undo the extractor's line handling: drop CR/LF, turn end-of-line hyphen markers back into ``-``."""
    return text.replace("\r", "").replace("\n", "").replace("\ufffe", "-").replace("\x02", "-")


def has_tag_marker(text: str) -> bool:
    """Cheap pre-check: could this page hold a tag at all? (False means it certainly does not.)"""
    if "<" not in text and "[" not in text:  # every tag opens with one of them
        return False
    return _OPENERS.search(normalise(text)) is not None


def find_tags(text: str) -> list[Tag]:
    """Every tag in one page's extracted text, in order. Raises :class:`TagError` on a malformed tag."""
    text = normalise(text)
    tags: list[Tag] = []
    pos = 0
    while True:
        m = _OPENERS.search(text, pos)
        if m is None:
            return tags
        if m.group("pdfx") is not None:
            close = _PDFX_CLOSE_RE.search(text, m.end(), m.end() + MAX_TAG_CHARS + 20)
            if close is None:
                raise TagError(f"<pdfexplode> tag without </pdfexplode>: {_quote(text[m.start() :])}")
            body = text[m.end() : close.start()]
            nested = _OPENERS.search(body)
            if nested is not None:
                raise TagError(f"a tag opens inside another tag: {_quote(text[m.start() : close.end()])}")
            tags.append(parse_pdfexplode(body, raw=text[m.start() : close.end()]))
            pos = close.end()
        else:
            end = _find_native_end(text, m.end())
            if end is None:
                raise TagError(f"[[postroom tag without ]]: {_quote(text[m.start() :])}")
            body = text[m.end() : end[0]]
            tags.append(parse_native(body, raw=text[m.start() : end[1]]))
            pos = end[1]


def _quote(s: str, limit: int = 80) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "…")


def _find_native_end(text: str, start: int) -> tuple[int, int] | None:
    """Position of the ``]]`` ending a native tag, skipping back-quoted values; (body end, tag end)."""
    i, quoted = start, False
    limit = min(len(text), start + MAX_TAG_CHARS)
    close = re.compile(_NATIVE_CLOSE)
    while i < limit:
        c = text[i]
        if c == "`":
            quoted = not quoted
        elif not quoted and c == "]":
            m = close.match(text, i)
            if m is not None:
                return i, m.end()
        i += 1
    return None


def _split_unquoted(s: str, sep: str, what: str, raw: str) -> list[str]:
    """Split ``s`` at ``sep`` outside back quotes; the back quotes stay in the pieces."""
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for c in s:
        if c == "`":
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if quoted:
        raise TagError(f"unterminated back quote in {what}: {_quote(raw)}")
    parts.append("".join(cur))
    return parts


def _value(piece: str, what: str, raw: str) -> str:
    """A value: a back-quoted string (taken as is, inner whitespace collapsed) or plain text."""
    piece = piece.strip()
    if piece.startswith("`"):
        if len(piece) < 2 or not piece.endswith("`") or "`" in piece[1:-1]:
            raise TagError(f"text after a back-quoted {what}: {_quote(raw)}")
        return _WS.sub(" ", piece[1:-1]).strip()
    if "`" in piece:
        raise TagError(f"back quote in the middle of {what}: {_quote(raw)}")
    return _WS.sub(" ", piece)


def _address(text: str, what: str, raw: str) -> str:
    addr = _WS.sub("", text)
    if not addr:
        raise TagError(f"empty address in {what}: {_quote(raw)}")
    try:
        return str(parse_mailbox(addr, smtputf8=True))
    except AddressError as exc:
        raise TagError(f"invalid address {addr!r} in {what} ({exc}): {_quote(raw)}") from None


def parse_pdfexplode(body: str, *, raw: str = "") -> Tag:
    """Parse the text between ``<pdfexplode>`` and ``</pdfexplode>``."""
    raw = raw or f"<pdfexplode>{body}</pdfexplode>"
    if not body.strip():
        return Tag("pdfexplode", raw=raw)
    pct = _split_unquoted(body, "%", "the tag", raw)
    if len(pct) > 2:
        raise TagError(f"more than one '%' outside back quotes (values end with a single '%'): {_quote(raw)}")
    variables: tuple[tuple[str, str], ...] = ()
    if len(pct) == 2:
        values = [_value(v, "a value", raw) for v in _split_unquoted(pct[0], ",", "the values", raw)]
        if len(values) > MAX_PDFEXPLODE_VARS:
            raise TagError(f"{len(values)} values, at most {MAX_PDFEXPLODE_VARS} are allowed: {_quote(raw)}")
        variables = tuple((f"v{i}", v) for i, v in enumerate(values, 1))
    rest = pct[-1]
    if "`" in rest:
        raise TagError(f"back quote after the values: {_quote(raw)}")
    hashes = rest.split("#")
    if len(hashes) > 2:
        raise TagError(f"more than one '#' (the message id ends with a single '#'): {_quote(raw)}")
    template: str | None = None
    if len(hashes) == 2:
        template = _WS.sub("", hashes[0])
        if not _MESSAGE_ID.match(template):
            raise TagError(f"invalid message id {template!r} (letters, digits, '_.-'): {_quote(raw)}")
    if not _WS.sub("", hashes[-1]):
        raise TagError(f"no address (the address is always last): {_quote(raw)}")
    to = _address(hashes[-1], "the tag", raw)
    return Tag("pdfexplode", to=(to,), template=template, variables=variables, raw=raw)


# Native keys → the Tag field they fill. An explicit table: a new key is one line here and one in the docs.
_ADDRESS_KEYS: dict[str, str] = {"to": "to", "cc": "cc", "bcc": "bcc", "reply-to": "reply_to"}
_TEXT_KEYS: dict[str, str] = {
    "subject": "subject",
    "template": "template",
    "file": "filename",
    "password": "password",
}
_KNOWN_KEYS = sorted([*_ADDRESS_KEYS, *_TEXT_KEYS, "var.NAME"])


def parse_native(body: str, *, raw: str = "") -> Tag:
    """Parse the text between ``[[postroom`` and ``]]``."""
    raw = raw or f"[[postroom {body}]]"
    pieces = _split_unquoted(body, ";", "the tag", raw)
    if not pieces[-1].strip():
        pieces.pop()  # one trailing ';' is allowed
    if not pieces:
        return Tag("native", raw=raw)
    addresses: dict[str, tuple[str, ...]] = {}
    texts: dict[str, str] = {}
    variables: list[tuple[str, str]] = []
    seen: set[str] = set()
    for piece in pieces:
        given, eq, value = piece.partition("=")
        given = _WS.sub("", given)
        key = given.lower()
        if not eq:
            raise TagError(f"expected key=value, got {piece.strip()!r}: {_quote(raw)}")
        if not key:
            raise TagError(f"'=' without a key: {_quote(raw)}")
        if key in seen:
            raise TagError(f"key {key!r} given twice: {_quote(raw)}")
        seen.add(key)
        if key in _ADDRESS_KEYS:
            items = _split_unquoted(value, ",", key, raw)
            if len(items) > MAX_ADDRESSES:
                raise TagError(f"more than {MAX_ADDRESSES} addresses in {key}: {_quote(raw)}")
            addresses[_ADDRESS_KEYS[key]] = tuple(_address(a, key, raw) for a in items)
        elif key in _TEXT_KEYS:
            text = _value(value, key, raw)
            if not text:
                raise TagError(f"empty value for {key!r}: {_quote(raw)}")
            if key == "template" and not _MESSAGE_ID.match(text):
                raise TagError(f"invalid template name {text!r} (letters, digits, '_.-'): {_quote(raw)}")
            texts[_TEXT_KEYS[key]] = text
        elif key.startswith("var."):
            name = given[4:]
            if not _VAR_NAME.match(name):
                raise TagError(f"invalid variable name {name!r} (letters, digits, '_'): {_quote(raw)}")
            variables.append((name, _value(value, key, raw)))
        else:
            raise TagError(f"unknown key {key!r} (known: {', '.join(_KNOWN_KEYS)}): {_quote(raw)}")
    if "to" not in addresses:
        raise TagError(f"no 'to=' (use [[postroom]] for a page without recipient): {_quote(raw)}")
    return Tag(
        "native",
        to=addresses["to"],
        cc=addresses.get("cc", ()),
        bcc=addresses.get("bcc", ()),
        reply_to=addresses.get("reply_to", ()),
        subject=texts.get("subject"),
        template=texts.get("template"),
        filename=texts.get("filename"),
        password=texts.get("password"),
        variables=tuple(variables),
        raw=raw,
    )
