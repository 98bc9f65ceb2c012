"""Dot-stuffing and the DATA reader: split-anywhere invariance and the SMTP smuggling sequences."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.wire.dotstuff import DotReader, encode_data, may_have_long_line, stuff, unstuff


def read_all(chunks: list[bytes], **kw: int) -> tuple[DotReader, bytes | None]:
    r = DotReader(**kw)
    rest: bytes | None = None
    for c in chunks:
        rest = r.feed(c) if rest is None else rest + c
    return r, rest


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    pts = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for p in pts:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def test_stuff_unstuff() -> None:
    assert stuff(b".a\r\n..b\r\nc.\r\n") == b"..a\r\n...b\r\nc.\r\n"
    assert unstuff(stuff(b".a\r\n..b\r\nc.\r\n")) == b".a\r\n..b\r\nc.\r\n"
    assert encode_data(b"x") == b"x\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"
    assert encode_data(b".\r\n") == b"..\r\n.\r\n"


def test_simple_message_and_pipelined_rest() -> None:
    r, rest = read_all([b"Subject: x\r\n\r\n..dot\r\n.x\r\nend\r\n.\r\nQUIT\r\n"])
    assert r.done and r.error is None
    assert r.content() == b"Subject: x\r\n\r\n.dot\r\nx\r\nend\r\n"
    assert rest == b"QUIT\r\n"


def test_empty_message() -> None:
    r, rest = read_all([b".\r\n"])
    assert r.done and r.content() == b"" and rest == b""


@pytest.mark.parametrize(
    "seq",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r\n.\r\r\n"],
)
def test_smuggling_sequences_never_end_data(seq: bytes) -> None:
    msg = b"Subject: a\r\n\r\nbody" + seq + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n"
    r = DotReader()
    assert r.feed(msg) is None
    assert not r.done
    rest = r.feed(b"\r\n.\r\nNOOP\r\n")
    assert r.done and rest == b"NOOP\r\n"
    assert r.error == "bare"
    assert r.content() == b""


def test_nul_before_dot_is_content_not_end() -> None:
    r = DotReader()
    assert r.feed(b"a\r\n\x00.\r\nb\r\n") is None
    assert r.feed(b".\r\n") == b""
    assert r.content() == b"a\r\n\x00.\r\nb\r\n" and r.error is None


def test_long_line_and_size() -> None:
    r, rest = read_all([b"x" * 999 + b"\r\n.\r\n"], max_line=1000)
    assert r.error == "line" and rest == b""
    r, rest = read_all([b"x" * 998 + b"\r\n.\r\n"], max_line=1000)
    assert r.error is None
    r, rest = read_all([b"y" * 5000, b"y" * 5000, b"\r\n.\r\n"], max_line=1000)
    assert r.error == "line" and r.done and rest == b""
    r, rest = read_all([b"abc\r\n" * 100, b".\r\n"], max_size=100)
    assert r.error == "size" and r.done


_pieces = st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n", b"..", b"\r\n.\r\n", b"x" * 30, b"\x00"])


@given(st.lists(_pieces, max_size=40), st.lists(st.integers(0, 400), max_size=8))
def test_split_anywhere_gives_same_result(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces) + b"\r\n.\r\nTAIL"
    whole, rest1 = read_all([data], max_line=64, max_size=300)
    parts, rest2 = read_all(split(data, cuts), max_line=64, max_size=300)
    bytewise, rest3 = read_all([data[i : i + 1] for i in range(len(data))], max_line=64, max_size=300)
    for r, rest in ((parts, rest2), (bytewise, rest3)):
        assert r.done == whole.done
        assert r.error == whole.error
        assert r.content() == whole.content()
        assert rest == rest1


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"b."]), max_size=30))
def test_encode_then_read_round_trips(pieces: list[bytes]) -> None:
    body = b"".join(pieces).replace(b"\r", b"").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    r, rest = read_all([encode_data(body)])
    assert r.done and r.error is None and rest == b""
    assert r.content() == body


@given(st.lists(st.integers(0, 300), max_size=30), st.integers(1, 200))
def test_the_long_line_screen_never_misses_one(lengths: list[int], limit: int) -> None:
    """The reader's quick screen may say "maybe" for short lines, never "no" for a long one."""
    data = b"".join(b"x" * n + b"\r\n" for n in lengths)
    if any(n > limit for n in lengths):
        assert may_have_long_line(data, limit)
    if lengths and max(lengths) + 2 <= max(1, (limit + 1) // 2):  # every window holds an LF: a clear "no"
        assert not may_have_long_line(data, limit)
