"""Tokenizer for a framed IMAP command (RFC 9051 §9 grammar, lexical level).

A framed command (``reader.Command``) becomes ``tag``, upper-cased command ``name`` and a token list:

- ``str``: an atom (``\\Seen``, ``1:*``, ``NIL``, ``BODY.PEEK[HEADER.FIELDS (A B)]<0.10>``: a ``[...]``
  section is part of its atom, spaces and parentheses included);
- ``bytes``: a string (quoted or literal); :class:`Lit8` for a literal8 (RFC 3516);
- ``list``: a parenthesised list of tokens.

Invariants: nesting deeper than ``max_depth`` raises :class:`ParseError` before any deeper list is built
(the "NOOP ((((…" memory attack); only :class:`ParseError` escapes for bad input.
"""

from __future__ import annotations

import re
from typing import Union

from postroom.errors import RemoteProtocolError
from postroom.imap.limits import MAX_DEPTH
from postroom.imap.reader import Command

_ATOM = re.compile(rb'[^\x00-\x20()"{\[\]\x7f]+')
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_PLACEHOLDER = re.compile(rb"\x00(\d+)\x00")
_TAG = re.compile(rb"[^\x00-\x20()\"{%*+\\\]\x7f]+")


class Lit8(bytes):
    """A literal8 (``~{n}``): may contain any octet but NUL-free is not required (RFC 3516 §4.1)."""


Token = Union[str, bytes, "list[Token]"]


class ParseError(RemoteProtocolError):
    """The command does not follow the grammar; ``tag`` is ``*`` when none could be read."""

    def __init__(self, tag: str, message: str) -> None:
        super().__init__(message)
        self.tag = tag


def tokenize(cmd: Command, max_depth: int = MAX_DEPTH) -> tuple[str, str, list[Token]]:
    """``(tag, NAME, args)`` of a framed command."""
    line = cmd.line
    m = _TAG.match(line)
    if m is None:
        raise ParseError("*", "missing tag")
    tag = m.group().decode("ascii", "replace")
    pos = m.end()
    if line[pos : pos + 1] != b" ":
        raise ParseError(tag, "missing command")
    pos += 1
    m = _ATOM.match(line, pos)
    if m is None:
        raise ParseError(tag, "missing command")
    name = m.group().decode("ascii", "replace").upper()
    pos = m.end()
    root: list[Token] = []
    stack: list[list[Token]] = [root]
    n = len(line)
    literals = cmd.literals
    while pos < n:
        ch = line[pos]
        if ch == 0x20:  # SP
            pos += 1
            continue
        cur = stack[-1]
        if ch == 0x28:  # (
            if len(stack) > max_depth:
                raise ParseError(tag, "parentheses nested too deeply")
            new: list[Token] = []
            cur.append(new)
            stack.append(new)
            pos += 1
        elif ch == 0x29:  # )
            if len(stack) == 1:
                raise ParseError(tag, "unbalanced ')'")
            stack.pop()
            pos += 1
        elif ch == 0x22:  # "
            q = _QUOTED.match(line, pos)
            if q is None:
                raise ParseError(tag, "bad quoted string")
            raw = q.group(1)
            cur.append(raw.replace(b"\\\\", b"\\").replace(b'\\"', b'"') if b"\\" in raw else raw)
            pos = q.end()
        elif ch == 0x00:
            p = _PLACEHOLDER.match(line, pos)
            if p is None:
                raise ParseError(tag, "NUL octet in command")
            index = int(p.group(1))
            lit = literals[index]
            cur.append(Lit8(lit) if cmd.binary[index] else lit)
            pos = p.end()
        else:
            start = pos
            while True:
                a = _ATOM.match(line, pos)
                if a is not None:
                    pos = a.end()
                if pos < n and line[pos] == 0x5B:  # [ … ] belongs to the atom
                    close = line.find(b"]", pos)
                    if close < 0:
                        raise ParseError(tag, "unterminated '['")
                    pos = close + 1
                    continue
                break
            if pos == start:
                raise ParseError(tag, f"unexpected character {chr(ch)!r}")
            cur.append(line[start:pos].decode("utf-8", "replace"))
    if len(stack) != 1:
        raise ParseError(tag, "unbalanced '('")
    return tag, name, root
