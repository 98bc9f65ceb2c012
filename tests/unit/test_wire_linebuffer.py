"""The bounded command line buffer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postroom.wire.linebuffer import TOO_LONG, LineBuffer
from postroom.wire.replies import Reply


def lines_of(chunks: list[bytes], max_line: int = 10) -> list[bytes]:
    buf = LineBuffer(max_line)
    out: list[bytes] = []
    for c in chunks:
        buf.feed(c)
        while (line := buf.next_line()) is not None:
            out.append(line)
    return out


def test_lines_and_endings() -> None:
    assert lines_of([b"EHLO a\r\nNOOP\nQU", b"IT\r\n"]) == [b"EHLO a", b"NOOP", b"QUIT"]


def test_too_long_line_is_reported_once_and_bounded() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 50)
    assert buf.next_line() is None
    assert len(buf) == 0
    buf.feed(b"y" * 50 + b"\r\nNOOP\r\n")
    assert buf.next_line() == TOO_LONG
    assert buf.next_line() == b"NOOP"


def test_take_rest_and_clear() -> None:
    buf = LineBuffer(10)
    buf.feed(b"A\r\nrest")
    assert buf.next_line() == b"A"
    assert buf.take_rest() == b"rest"
    buf.feed(b"B\r\n")
    buf.clear()
    assert buf.next_line() is None


@given(st.lists(st.sampled_from([b"ab", b"\r\n", b"\n", b"\r", b"x" * 7]), max_size=30), st.integers(1, 20))
def test_split_anywhere(pieces: list[bytes], step: int) -> None:
    data = b"".join(pieces)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    assert lines_of(chunks) == lines_of([data])


def test_reply_encoding() -> None:
    r = Reply.of(250, "2.0.0", "first", "second")
    assert r.encode() == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"
    assert r.encode(enhanced=False) == b"250-first\r\n250 second\r\n"
    assert Reply.of(354, "", "go").encode() == b"354 go\r\n"
