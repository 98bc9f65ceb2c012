"""Parsing SMTP command lines and MAIL/RCPT arguments (RFC 5321 §4.1, RFC 1869 parameters).

Pure functions. Invariants: every failure is a :class:`ReplyError` carrying the reply to send (so the core
turns it into a reply at exactly one place); nothing else escapes for any input.
"""

from __future__ import annotations

import re

from postroom.errors import ReplyError
from postroom.smtp.events import MailFrom, RcptTo
from postroom.wire import replies
from postroom.wire.address import Address, AddressError, parse_path

MAX_ENVID = 100  # characters, RFC 3461 §4.4
MAX_ORCPT = 500  # characters, RFC 3461 §4.2
_SIZE_RE = re.compile(r"[0-9]{1,20}\Z")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def fail(reply: replies.Reply) -> ReplyError:
    return ReplyError(reply.code, reply.enhanced, reply.text)


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """``b"MAIL FROM:<a@b>"`` → ``(b"MAIL", b"FROM:<a@b>")``; the verb upper-cased."""
    verb, _, arg = line.partition(b" ")
    return verb.upper(), arg.strip(b" ")


def decode_xtext(text: str) -> str:
    """RFC 3461 §4 xtext: ``+HH`` escapes; raises ReplyError on malformed input."""
    if not _XTEXT_RE.match(text):
        raise fail(replies.PARAM_SYNTAX)
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _split_path(arg: str, prefix: str) -> tuple[str, list[str]]:
    """``FROM:<path> K=V K2`` → ``("<path>", ["K=V", "K2"])``; quotes inside the path are respected."""
    if arg[: len(prefix)].upper() != prefix:
        raise fail(replies.PARAM_SYNTAX)
    rest = arg[len(prefix) :].lstrip(" ")  # tolerate "FROM: <a@b>" as most servers do
    if not rest.startswith("<"):
        raise fail(replies.PARAM_SYNTAX)
    i, quoted = 1, False
    if '"' not in rest:  # the common case: no quoted local part, the path ends at the first ">"
        i = rest.find(">")
        if i < 0:
            raise fail(replies.PARAM_SYNTAX)
    while i < len(rest):
        c = rest[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            break
        i += 1
    else:
        raise fail(replies.PARAM_SYNTAX)
    path, params = rest[: i + 1], rest[i + 1 :]
    if params and not params.startswith(" "):
        raise fail(replies.PARAM_SYNTAX)
    return path, params.split()


def _params(items: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.match(key) or (eq and not value):
            raise fail(replies.PARAM_SYNTAX)
        key = key.upper()
        if key in out:
            raise fail(replies.PARAM_SYNTAX)
        out[key] = value if eq else None
    return out


def parse_mail(arg: str, *, max_size: int) -> MailFrom:
    """``FROM:<path> [SIZE=n] [BODY=…] [SMTPUTF8] [RET=…] [ENVID=…] [AUTH=…]`` (RFC 5321 §4.1.1.2)."""
    path, items = _split_path(arg, "FROM:")
    params = _params(items)
    smtputf8 = False
    if "SMTPUTF8" in params:
        if params.pop("SMTPUTF8") is not None:
            raise fail(replies.PARAM_SYNTAX)
        smtputf8 = True
    try:
        sender = parse_path(path, smtputf8=smtputf8, allow_null=True)
    except AddressError as exc:
        if not smtputf8 and not path.isascii():
            raise fail(replies.UTF8_REQUIRED) from None
        raise ReplyError(501, "5.1.7", f"Bad sender address syntax: {exc}") from None
    size: int | None = None
    body = ""
    ret = envid = ""
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870 §6
            if value is None or not _SIZE_RE.match(value):
                raise fail(replies.PARAM_SYNTAX)
            size = int(value)
            if max_size and size > max_size:
                raise fail(replies.MESSAGE_TOO_BIG)
        elif key == "BODY":  # RFC 6152 §2
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise fail(replies.PARAM_NOT_IMPLEMENTED)
            body = value.upper()
        elif key == "RET":  # RFC 3461 §4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise fail(replies.PARAM_SYNTAX)
            ret = value.upper()
        elif key == "ENVID":  # RFC 3461 §4.4
            if value is None or len(value) > MAX_ENVID:
                raise fail(replies.PARAM_SYNTAX)
            envid = decode_xtext(value)
        elif key == "AUTH":  # RFC 4954 §5: accepted, and not trusted
            if value is None:
                raise fail(replies.PARAM_SYNTAX)
        else:
            raise fail(replies.PARAM_NOT_IMPLEMENTED)
    return MailFrom(sender, size, body, smtputf8, ret, envid)


def parse_rcpt(arg: str, *, smtputf8: bool) -> RcptTo:
    """``TO:<path> [NOTIFY=…] [ORCPT=…]``; ``<Postmaster>`` without a domain is returned with domain ""."""
    path, items = _split_path(arg, "TO:")
    if path[1:-1].lower() == "postmaster":  # RFC 5321 §4.5.1: must be accepted without a domain
        address = Address("postmaster", "")
    else:
        try:
            parsed = parse_path(path, smtputf8=smtputf8)
        except AddressError as exc:
            if not smtputf8 and not path.isascii():
                raise fail(replies.UTF8_REQUIRED) from None
            raise ReplyError(501, "5.1.3", f"Bad recipient address syntax: {exc}") from None
        assert parsed is not None
        address = parsed
    notify = orcpt = ""
    for key, value in _params(items).items():
        if key == "NOTIFY":  # RFC 3461 §4.1
            if value is None:
                raise fail(replies.PARAM_SYNTAX)
            words = value.upper().split(",")
            if words != ["NEVER"] and not (set(words) <= _NOTIFY_VALUES and len(set(words)) == len(words)):
                raise fail(replies.PARAM_SYNTAX)
            notify = ",".join(words)
        elif key == "ORCPT":  # RFC 3461 §4.2
            if value is None or ";" not in value or len(value) > MAX_ORCPT:
                raise fail(replies.PARAM_SYNTAX)
            addr_type, _, xtext = value.partition(";")
            if not _KEYWORD_RE.match(addr_type):
                raise fail(replies.PARAM_SYNTAX)
            orcpt = f"{addr_type};{decode_xtext(xtext)}"
        else:
            raise fail(replies.PARAM_NOT_IMPLEMENTED)
    return RcptTo(address, notify, orcpt)
