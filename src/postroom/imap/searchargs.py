"""SEARCH program grammar (RFC 9051 §6.4.4, RFC 4731 ESEARCH RETURN, RFC 7162 MODSEQ, RFC 5032).

A program becomes a tree of tuples (``Key``):
``("all",)``, ``("none",)``, ``("flag", FLAG, present)``, ``("hdr", field, value)``, ``("text", s)``,
``("body", s)``, ``("idate", op, (y, m, d))``, ``("sent", op, (y, m, d))``, ``("size", op, n)``,
``("not", key)``, ``("or", a, b)``, ``("and", [keys])``, ``("seq", SeqSet)``, ``("uid", SeqSet)``,
``("modseq", n)``, ``("age", op, seconds)`` with op one of ``"<" "=" ">"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from postroom.imap.grammar import (
    MAX_NUMBER64,
    BadArgs,
    astring,
    atom,
    date,
    flag_list,
    number,
    seqset,
)
from postroom.imap.tokens import Token

Key = tuple[Any, ...]
MAX_KEYS = 1000  # search keys per program: bounds evaluation work per command

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS = {
    "BEFORE": ("idate", "<"),
    "ON": ("idate", "="),
    "SINCE": ("idate", ">"),
    "SENTBEFORE": ("sent", "<"),
    "SENTON": ("sent", "="),
    "SENTSINCE": ("sent", ">"),
}
RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})


@dataclass(frozen=True, slots=True)
class SearchArgs:
    key: Key
    charset: str | None = None
    ret: tuple[str, ...] | None = None  # None: plain SEARCH response; () means RETURN () = ALL


class _Parser:
    def __init__(self, toks: list[Token]) -> None:
        self.toks = toks
        self.pos = 0
        self.count = 0

    def take(self) -> Token:
        if self.pos >= len(self.toks):
            raise BadArgs("search key incomplete")
        tok = self.toks[self.pos]
        self.pos += 1
        return tok

    def key(self) -> Key:
        self.count += 1
        if self.count > MAX_KEYS:
            raise BadArgs("too many search keys")
        tok = self.take()
        if isinstance(tok, list):
            sub = _Parser(tok)
            sub.count = self.count
            keys = sub.all_keys()
            self.count = sub.count
            return keys
        if isinstance(tok, bytes):
            raise BadArgs("expected a search key")
        word = tok.upper()
        if word == "ALL" or word == "OLD":
            return ("all",)
        if word in ("NEW", "RECENT"):
            return ("none",)  # \Recent is not kept (IMAP4rev2 removed it)
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return ("flag", flag, present)
        if word in ("KEYWORD", "UNKEYWORD"):
            return ("flag", flag_list(self.take())[0], word == "KEYWORD")
        if word in _HEADER_KEYS:
            return ("hdr", _HEADER_KEYS[word], astring(self.take()))
        if word == "HEADER":
            field = astring(self.take()).lower()
            return ("hdr", field, astring(self.take()))
        if word in ("TEXT", "BODY"):
            return (word.lower(), astring(self.take()))
        if word in _DATE_KEYS:
            kind, op = _DATE_KEYS[word]
            return (kind, op, date(self.take()))
        if word in ("LARGER", "SMALLER"):
            return ("size", ">" if word == "LARGER" else "<", number(self.take()))
        if word == "NOT":
            return ("not", self.key())
        if word == "OR":
            a = self.key()
            return ("or", a, self.key())
        if word == "UID":
            return ("uid", seqset(self.take()))
        if word == "MODSEQ":
            tok = self.take()
            if isinstance(tok, bytes):  # entry-name entry-type-req (RFC 7162 §3.1.5)
                atom(self.take())
                tok = self.take()
            return ("modseq", number(tok, MAX_NUMBER64))
        if word in ("OLDER", "YOUNGER"):
            return ("age", ">" if word == "OLDER" else "<", number(self.take()))
        if word[:1].isdigit() or word[:1] in "*$":
            return ("seq", seqset(tok))
        raise BadArgs(f"unknown search key {word[:40]}")

    def all_keys(self) -> Key:
        keys = [self.key()]
        while self.pos < len(self.toks):
            keys.append(self.key())
        return keys[0] if len(keys) == 1 else ("and", keys)


def parse_search(args: list[Token], allow_return: bool = True) -> SearchArgs:
    pos = 0
    ret: tuple[str, ...] | None = None
    if allow_return and len(args) > pos + 1 and isinstance(args[pos], str) and str(args[pos]).upper() == "RETURN":
        opts = args[pos + 1]
        if not isinstance(opts, list):
            raise BadArgs("RETURN needs a list")
        names = tuple(atom(o).upper() for o in opts)
        for n in names:
            if n not in RETURN_OPTIONS:
                raise BadArgs(f"unknown RETURN option {n[:40]}")
        ret = names
        pos += 2
    charset = None
    if len(args) > pos + 1 and isinstance(args[pos], str) and str(args[pos]).upper() == "CHARSET":
        charset = astring(args[pos + 1]).upper()
        pos += 2
    if pos >= len(args):
        raise BadArgs("SEARCH needs a key")
    parser = _Parser(args[pos:])
    return SearchArgs(parser.all_keys(), charset, ret)
