"""Property tests of the SMTP core: split-anywhere invariance, and nothing but ReplyError from parsers."""

from __future__ import annotations

import contextlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from test_smtp_driver import Driver, limits

from postroom.errors import RemoteProtocolError, ReplyError
from postroom.smtp.commands import parse_mail, parse_rcpt

_LINES = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME\r\n",
    b"MAIL FROM:<> SMTPUTF8\r\n",
    b"RCPT TO:<alice@local.test>\r\n",
    b"RCPT TO:<nobody@local.test>\r\n",
    b"RCPT TO:<x@far.test>\r\n",
    b"DATA\r\n",
    b"line\r\n",
    b"..stuffed\r\n",
    b".\r\n",
    b"\n.\n",
    b"\r.\r",
    b"BDAT 4\r\nabcd",
    b"BDAT 2 LAST\r\nxy",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"AUTH LOGIN\r\n",
    b"YWxpY2U=\r\n",
    b"*\r\n",
    b"BOGUS\r\n",
    b"x" * 600 + b"\r\n",
    b"\x00\xff\r\n",
]


def _run(chunks: list[bytes]) -> tuple[bytes, list[str], list[bytes]]:
    # STARTTLS is left out: bytes after it are legitimately new once the handshake ran (tested on its own).
    d = Driver(submission=True, plaintext_auth=True, limits=limits(max_errors=50))
    out = b"".join(d.send(c) for c in chunks)
    return out, [type(e).__name__ for e in d.events], [m.data for m in d.messages]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_LINES), max_size=25), st.lists(st.integers(0, 2000), max_size=10))
def test_split_anywhere_gives_same_replies_and_events(lines: list[bytes], cuts: list[int]) -> None:
    script = b"".join(lines)
    whole = _run([script])
    pts = sorted({min(c, len(script)) for c in cuts})
    parts, prev = [], 0
    for p in pts:
        parts.append(script[prev:p])
        prev = p
    parts.append(script[prev:])
    assert _run(parts) == whole
    assert _run([script[i : i + 1] for i in range(len(script))]) == whole


_REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -]")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises_and_replies_are_well_formed(data: bytes) -> None:
    d = Driver(starttls=True)
    try:
        out = d.send(b"EHLO c\r\n" + data + b"\r\n")
    except RemoteProtocolError:
        return
    for line in out.split(b"\r\n")[:-1]:
        assert _REPLY_LINE.match(line), line


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_parsers_raise_only_reply_errors(arg: str) -> None:
    for text in (arg, "FROM:" + arg, "TO:" + arg, "FROM:<a@b.c> " + arg, "TO:<a@b.c> " + arg):
        with contextlib.suppress(ReplyError):
            parse_mail(text, max_size=1000)
        for utf8 in (False, True):
            with contextlib.suppress(ReplyError):
                parse_rcpt(text, smtputf8=utf8)
