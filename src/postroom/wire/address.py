"""Mail addresses as RFC 5321 defines them on the wire, with RFC 6531 (SMTPUTF8) internationalisation.

One grammar for everybody: the SMTP server (MAIL FROM / RCPT TO paths), the delivery queue and the burst
tool (checking the addresses they are given) all parse through here.

Invariants:
- :func:`parse_path` accepts exactly RFC 5321 §4.1.2 ``Path`` (with the obsolete source route, which is
  parsed and *dropped*: RFC 5321 §4.1.1.3 / Appendix C say it SHOULD be ignored, so the address that mail is
  actually routed to is the final mailbox) and ``Reverse-path`` (``<>``). Anything else raises
  :class:`AddressError`: double ``@``, unbalanced quotes, bare ``!``-paths with no domain, control characters.
- A local part is a Dot-string or a Quoted-string (RFC 5321 §4.1.2). A quoted local part whose content is
  itself a valid Dot-string is unquoted (``"bob"@x`` is ``bob@x``); any other stays quoted in
  :attr:`Address.local`, so ``"a@b"@local`` can never be mistaken for ``a@b``.
- ``%`` and ``!`` inside a local part are plain characters: no percent hack, no bang paths.
- Non-ASCII (UTF-8) is allowed in local parts and domains only with ``smtputf8=True``; domains are
  lower-cased, and U-labels converted to A-labels for :attr:`Address.domain_ascii`.
- A domain is a dotted sequence of LDH labels (RFC 5321 §4.1.2 ``Domain``) or an address literal
  ``[192.0.2.1]`` / ``[IPv6:…]`` (§4.1.3), kept with its brackets; :attr:`Address.is_literal` tells.
- Lengths: local part ≤ 64, domain ≤ 255, path ≤ 256 octets (RFC 5321 §4.5.3.1.1-3).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from postroom.errors import PostroomError

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # octets including the angle brackets, RFC 5321 §4.5.3.1.3
PATH_CACHE = 4096  # parsed valid paths remembered per process (parse_path)
MAX_LABEL = 63  # octets, RFC 1035 §2.3.4


class AddressError(PostroomError, ValueError):
    """The text is not a valid address or path; the message says why (safe to show the peer)."""


# atext (RFC 5321 §4.1.2 / RFC 5322 §3.2.3); with SMTPUTF8 any non-ASCII character is atext too
# (RFC 6531 §3.3).
_U = "\u0080-\U0010ffff"
_ATEXT_ASCII = r"\-A-Za-z0-9!#$%&'*+/=?^_`{|}~"
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT_ASCII}]+(?:\.[{_ATEXT_ASCII}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT_ASCII}\u0080-\U0010ffff]+(?:\.[{_ATEXT_ASCII}\u0080-\U0010ffff]+)*\Z")
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)
# qtextSMTP: %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP: "\" %d32-126 (RFC 5321 §4.1.2)
_QCONTENT_ASCII = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\Z")
_QCONTENT_UTF8 = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox ``local@domain``: ``local`` as on the wire (quoted if it must be), ``domain`` lower-case."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        """True for an address literal domain like ``[192.0.2.1]``."""
        return self.domain.startswith("[")

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()

    @property
    def domain_ascii(self) -> str:
        """The domain with U-labels turned into A-labels (IDNA), e.g. for DNS and local-domain checks."""
        if self.domain.isascii():
            return self.domain
        try:
            return self.domain.encode("idna").decode("ascii")
        except UnicodeError:
            return self.domain

    @property
    def lookup_key(self) -> str:
        """The form account and alias tables are keyed by: lower-cased ``local@domain``."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def path(self) -> str:
        """``<local@domain>`` for MAIL FROM / RCPT TO and Return-Path."""
        return f"<{self}>"


def _check_domain(domain: str, smtputf8: bool) -> str:
    if not domain:
        raise AddressError("missing domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("unterminated address literal")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
                return "[IPv6:" + inner[5:].lower() + "]"
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError("invalid address literal") from None
        return domain
    if not smtputf8 and not domain.isascii():
        raise AddressError("non-ASCII domain needs SMTPUTF8")
    label_re = _LABEL_UTF8 if smtputf8 else _LABEL_ASCII
    labels = domain.split(".")
    for label in labels:
        if not label_re.match(label) or len(label.encode("utf-8")) > MAX_LABEL:
            raise AddressError("invalid domain")
    return domain.lower()


def _check_local(local: str, smtputf8: bool) -> str:
    if not local:
        raise AddressError("missing local part")
    if not smtputf8 and not local.isascii():
        raise AddressError("non-ASCII local part needs SMTPUTF8")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError("unbalanced quotes in local part")
        content = local[1:-1]
        qre = _QCONTENT_UTF8 if smtputf8 else _QCONTENT_ASCII
        if not qre.match(content):
            raise AddressError("invalid quoted local part")
        plain = re.sub(r"\\(.)", r"\1", content)
        dre = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING_ASCII
        local = plain if dre.match(plain) else local
    else:
        dre = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING_ASCII
        if not dre.match(local):
            raise AddressError("invalid local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    return local


def _split_mailbox(text: str) -> tuple[str, str]:
    """Split ``local@domain`` at the ``@`` that ends the local part (respecting a quoted local part)."""
    if text.startswith('"'):
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        else:
            raise AddressError("unbalanced quotes in local part")
        if i + 1 >= len(text) or text[i + 1] != "@":
            raise AddressError("expected @ after quoted local part")
        return text[: i + 1], text[i + 2 :]
    at = text.find("@")
    if at < 0:
        raise AddressError("missing @domain")
    local, domain = text[:at], text[at + 1 :]
    if "@" in domain:
        raise AddressError("more than one @")
    return local, domain


def parse_mailbox(text: str, *, smtputf8: bool = False) -> Address:
    """Parse RFC 5321 ``Mailbox`` (``local@domain`` without brackets). Raises :class:`AddressError`."""
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    local, domain = _split_mailbox(text)
    return Address(_check_local(local, smtputf8), _check_domain(domain, smtputf8))


def parse_path(text: str, *, smtputf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse an RFC 5321 ``Path`` ``<[@route:]mailbox>``; ``<>`` gives None when ``allow_null``.

    The source route is validated and dropped (RFC 5321 §3.6.1, Appendix C); the returned address is the
    one the mail is really for. Valid paths are remembered (:data:`PATH_CACHE` per process): the same
    senders and recipients come back message after message, and an :class:`Address` is immutable.
    """
    return _parse_path(text, smtputf8, allow_null)


@functools.lru_cache(maxsize=PATH_CACHE)  # an AddressError is raised, never cached
def _parse_path(text: str, smtputf8: bool, allow_null: bool) -> Address | None:
    if len(text.encode("utf-8")) > MAX_PATH:
        raise AddressError("path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        route, colon, rest = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("invalid source route")
            _check_domain(hop[1:], smtputf8)
        inner = rest
    return parse_mailbox(inner, smtputf8=smtputf8)


def is_valid_address(text: str, *, smtputf8: bool = True) -> bool:
    """True when ``text`` is a plain ``local@domain`` mailbox (what burst and delivery accept as input)."""
    try:
        parse_mailbox(text, smtputf8=smtputf8)
    except AddressError:
        return False
    return True


def format_path(address: Address | None) -> str:
    """``<local@domain>``, or ``<>`` for the null reverse-path."""
    return "<>" if address is None else address.path
