"""The outbound client's sans-I/O core: replies, commands, DATA payload. No event loop."""

from __future__ import annotations

import contextlib
import email
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.delivery import wire
from postroom.delivery.wire import Extensions, Reply, ReplyParser
from postroom.errors import LocalProtocolError, RemoteProtocolError

EHLO = b"250-mx.b.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-DSN\r\n250 STARTTLS\r\n"


def parse_all(chunks: list[bytes]) -> list[Reply]:
    p = ReplyParser()
    out = []
    for c in chunks:
        p.feed(c)
        while (r := p.next_reply()) is not None:
            out.append(r)
    return out


def test_reply_multiline_and_enhanced() -> None:
    (r,) = parse_all([EHLO])
    assert r.code == 250 and r.lines[0] == "mx.b.test Hello" and len(r.lines) == 6
    ext = Extensions.from_reply(r)
    assert ext.has("pipelining") and ext.size_limit == 1000 and ext.has("DSN")
    (r2,) = parse_all([b"550 5.1.1 no such user\r\n"])
    assert r2.enhanced == "5.1.1" and r2.permanent and str(r2) == "550 5.1.1 no such user"
    (r3,) = parse_all([b"450 5.1.1 class mismatch\r\n"])
    assert r3.enhanced == "" and r3.transient


@given(st.data())
def test_reply_split_anywhere_same_replies(data: st.DataObject) -> None:
    stream = EHLO + b"250 2.1.0 Ok\r\n354 go\r\n421 4.3.2 bye\r\n"
    whole = parse_all([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert parse_all(chunks) == whole
    assert [r.code for r in whole] == [250, 250, 354, 421]


@given(st.binary(max_size=300))
def test_reply_parser_only_remote_error_escapes(junk: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_all([junk])


def _reference_replies(stream: bytes) -> list[Reply] | str:
    """The reply grammar written out line by line, the slow way (what the parser's fast path must match)."""
    out: list[Reply] = []
    pending: list[str] = []
    code = 0
    for raw in [x + b"\n" for x in stream.split(b"\n")[:-1]]:  # the last piece is incomplete: it waits
        if len(raw) > wire.MAX_REPLY_LINE:
            return "error"
        line = raw.rstrip(b"\r\n")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            return "error"
        if not 200 <= int(line[:3]) <= 599 or (pending and int(line[:3]) != code):
            return "error"
        code = int(line[:3])
        pending.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] != b"-":
            out.append(Reply(code, tuple(pending)))
            pending = []
    return out


REPLY_PARTS = [b"250", b"354", b"199", b"600", b"25", b" ", b"-", b"ok ", b" 2.0.0", b"\r", b"\n", b"\r\n", b"\xc3\xa9"]


REPLY_LINE = st.tuples(
    st.sampled_from([b"250", b"354", b"421", b"199", b"600", b"2x0", b"25"]),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.binary(max_size=8) | st.sampled_from([b"ok", b" ok ", b"2.0.0 queued", b"a\rb"]),
    st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b""]),
).map(b"".join)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(REPLY_PARTS), max_size=30) | st.lists(REPLY_LINE, max_size=6))
def test_reply_parser_agrees_with_the_grammar(parts: list[bytes]) -> None:
    stream = b"".join(parts)
    try:
        got: list[Reply] | str = parse_all([stream])
    except RemoteProtocolError:
        got = "error"
    assert got == _reference_replies(stream)


def test_reply_parser_bounds() -> None:
    with pytest.raises(RemoteProtocolError):
        parse_all([b"250 " + b"x" * (wire.MAX_REPLY_LINE + 10)])
    with pytest.raises(RemoteProtocolError):
        parse_all([b"250-x\r\n" * (wire.MAX_REPLY_LINES + 1)])
    with pytest.raises(RemoteProtocolError):
        parse_all([b"250-a\r\n251 b\r\n"])


@pytest.mark.parametrize(
    "addr", ["bob@b.test\r\nRCPT TO:<eve@evil.test>", "bob@b.test\n", "bob\r@b.test", "a\x00@b.test", "a>b@c", "a b@c"]
)
def test_address_with_cr_lf_or_delimiters_refused(addr: str) -> None:
    with pytest.raises(LocalProtocolError):
        wire.check_address(addr, smtputf8=True)
    with pytest.raises(LocalProtocolError):
        wire.rcpt_command(addr, Extensions(), smtputf8=True)
    with pytest.raises(LocalProtocolError):
        wire.mail_command(addr, Extensions(), size=1, eight_bit=False, smtputf8=True)


def test_non_ascii_address_needs_smtputf8() -> None:
    with pytest.raises(LocalProtocolError):
        wire.check_address("jörg@b.test", smtputf8=False)
    assert wire.check_address("jörg@b.test", smtputf8=True) == "jörg@b.test".encode()


def test_mail_and_rcpt_parameters_follow_extensions() -> None:
    (r,) = parse_all([EHLO])
    ext = Extensions.from_reply(r)
    line = wire.mail_command("a@a.test", ext, size=42, eight_bit=True, smtputf8=False, ret="hdrs", envid="X+1")
    assert line == b"MAIL FROM:<a@a.test> SIZE=42 BODY=8BITMIME RET=HDRS ENVID=X+1\r\n"
    assert wire.mail_command("", Extensions(), size=42, eight_bit=True, smtputf8=False) == b"MAIL FROM:<>\r\n"
    rc = wire.rcpt_command("b@b.test", ext, smtputf8=False, notify="success,failure", orcpt="rfc822;b@b.test")
    assert rc == b"RCPT TO:<b@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@b.test\r\n"
    assert wire.rcpt_command("b@b.test", Extensions(), smtputf8=False, notify="NEVER") == b"RCPT TO:<b@b.test>\r\n"
    assert wire.xtext("a+b=c d") == "a+2Bb+3Dc+20d"


def unstuff(payload: bytes) -> bytes:
    assert payload.endswith(b"\r\n.\r\n")
    body = payload[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_data_payload_crlf_only_and_dot_stuffed() -> None:
    body = b"Subject: x\n\n.leading dot\rbare cr\nbare lf\r\n..two\r\n.\r\nend"
    payload = wire.data_payload(body)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", payload) is None  # no bare CR, no bare LF
    assert payload.count(b"\r\n.\r\n") == 1 and payload.endswith(b"\r\n.\r\n")
    assert b"\r\n..leading dot\r\n" in payload and b"\r\n...two\r\n" in payload and b"\r\n..\r\n" in payload
    assert unstuff(payload) == re.sub(rb"\r\n|\r|\n", b"\r\n", body) + b"\r\n"
    assert wire.data_payload(b".x") == b"..x\r\n.\r\n"


@given(st.binary(max_size=400))
def test_data_payload_property(body: bytes) -> None:
    payload = wire.data_payload(body)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", payload) is None
    # the end-of-data sequence appears exactly once, at the very end
    assert (b"\r\n" + payload).count(b"\r\n.\r\n") == 1
    normalized = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    assert unstuff(payload) == normalized


def test_seven_bit_conversion_keeps_meaning() -> None:
    msg = (
        b"From: a@a.test\r\nTo: b@b.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.dot line\r\n"
        b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        b"\x80\x81\xff\r\n--XX--\r\n"
    )
    assert wire.is_eight_bit(msg)
    out = wire.to_seven_bit(msg)
    assert out is not None and out.isascii()
    parsed = email.message_from_bytes(out)
    parts: list[Any] = [p for p in parsed.walk() if not p.is_multipart()]
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[0].get_payload(decode=True).decode("utf-8").splitlines()[0] == "Grüße aus Köln"
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert parts[1].get_payload(decode=True).startswith(b"\x80\x81\xff")
    assert wire.to_seven_bit(b"Subject: K\xc3\xb6ln\r\n\r\nx\r\n") is None  # 8-bit header: cannot convert
