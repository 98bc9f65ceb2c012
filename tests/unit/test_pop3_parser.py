"""POP3 line framing and command parsing, without an event loop (Hypothesis: split anywhere, same items)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.pop3.framing import dotstuff, top, unstuff
from postroom.pop3.parser import BadLine, Command, LineBuffer, parse_line


def lines_of(chunks: list[bytes], max_line: int = 255) -> list[bytes | BadLine]:
    buf = LineBuffer(max_line)
    out: list[bytes | BadLine] = []
    for chunk in chunks:
        buf.feed(chunk)
        while (item := buf.next_line()) is not None:
            out.append(item)
    return out


def test_parse_verbs_case_insensitive_and_args() -> None:
    assert parse_line(b"retr 1\r") == Command("RETR", ("1",), "1")
    assert parse_line(b"TOP  2   10") == Command("TOP", ("2", "10"), " 2   10")
    assert parse_line(b"PASS secret with spaces ") == Command(
        "PASS", ("secret", "with", "spaces"), "secret with spaces "
    )
    assert parse_line(b"QUIT") == Command("QUIT", (), "")


def test_parse_bad_lines() -> None:
    assert isinstance(parse_line(b""), BadLine)
    assert isinstance(parse_line(b"   \r"), BadLine)
    assert isinstance(parse_line(b"R\xc3\xa9TR 1"), BadLine)
    assert isinstance(parse_line(b"RETR1 1"), BadLine)
    assert isinstance(parse_line(b"AVERYLONGVERB"), BadLine)


def test_line_limit_is_255_including_crlf() -> None:
    ok = b"X" * 253 + b"\r\n"  # 255 octets with CRLF: allowed (RFC 2449 §4)
    long = b"X" * 254 + b"\r\n"  # 256: too long
    assert lines_of([ok]) == [b"X" * 253 + b"\r"]
    assert lines_of([long, b"NOOP\r\n"]) == [BadLine("line too long"), b"NOOP\r"]


def test_overlong_line_is_not_buffered() -> None:
    buf = LineBuffer(255)
    for _ in range(1000):
        buf.feed(b"A" * 1000)
        assert buf.next_line() is None
        assert buf.buffered <= 1000
    buf.feed(b"\r\nSTAT\r\n")
    assert buf.next_line() == BadLine("line too long")
    assert buf.next_line() == b"STAT\r"


def test_clear_drops_pipelined_input() -> None:
    buf = LineBuffer()
    buf.feed(b"STLS\r\nCAPA\r\n")
    assert buf.next_line() == b"STLS\r"
    buf.clear()
    assert buf.next_line() is None


_line = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"USER a", b"PASS b c", b"RETR 1", b"", b".", b"X" * 254]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_line, max_size=12), st.data())
def test_split_anywhere_gives_same_items(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)
    whole = lines_of([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert lines_of(chunks) == whole
    assert lines_of([bytes([b]) for b in stream]) == whole
    assert len(whole) == len(lines)
    for item, line in zip(whole, lines, strict=True):
        if len(line) + 2 > 255:
            assert item == BadLine("line too long")
        else:
            assert item == line + b"\r"
            parsed = parse_line(item)
            assert isinstance(parsed, Command | BadLine)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30))
def test_dotstuff_round_trip(lines: list[bytes]) -> None:
    raw = b"".join(line + b"\r\n" for line in lines)
    stuffed = dotstuff(raw)
    assert b"\r\n.\r\n" not in b"\r\n" + stuffed  # no premature terminator on any line
    for line in stuffed.split(b"\r\n")[:-1]:
        assert not line.startswith(b".") or line.startswith(b"..")
    assert unstuff(stuffed) == raw


def test_dotstuff_edges() -> None:
    assert dotstuff(b"") == b""
    assert dotstuff(b".\r\n") == b"..\r\n"
    assert dotstuff(b"a\r\n.b") == b"a\r\n..b\r\n"
    assert dotstuff(b"a\n.\n") == b"a\n..\r\n"  # a bare-LF line starting with "." is stuffed too


def test_top() -> None:
    raw = b"Subject: x\r\nFrom: y\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert top(raw, 0) == b"Subject: x\r\nFrom: y\r\n\r\n"
    assert top(raw, 2) == b"Subject: x\r\nFrom: y\r\n\r\nl1\r\nl2\r\n"
    assert top(raw, 99) == raw
    assert top(b"Subject: only header\r\n", 5) == b"Subject: only header\r\n"
    assert top(b"\r\nbody\r\n", 0) == b"\r\n"
    assert top(b"H: 1\r\n\r\nno newline at end", 3) == b"H: 1\r\n\r\nno newline at end"


def test_maildrop_cache_keyed_by_modseq_and_bounded() -> None:
    from postroom.pop3.events import MaildropEntry
    from postroom.pop3.maildrop import Maildrop, MaildropCache

    entries = tuple(MaildropEntry(uid, uid + 100, 10) for uid in range(1, 4))
    listing = Maildrop(entries, 7)
    cache = MaildropCache(limit=5)
    assert cache.get(1, 7, 10) is None
    cache.put(1, 7, 10, listing)
    assert cache.get(1, 7, 10) is listing
    assert cache.get(1, 7, 11) is None  # any append, expunge or flag change bumps HIGHESTMODSEQ
    assert cache.get(1, 8, 10) is None  # a new UIDVALIDITY
    cache.put(2, 7, 3, Maildrop(entries[:2], 7))  # 5 entries held: at the limit
    assert len(cache) == 2
    cache.put(3, 7, 3, Maildrop(entries[:1], 7))  # over the limit: the least recently used maildrop goes
    assert cache.get(1, 7, 10) is None and cache.get(2, 7, 3) is not None
    cache.put(4, 1, 1, Maildrop(entries * 2, 7))  # bigger than the whole cache: not kept
    assert cache.get(4, 1, 1) is None


def test_maildrop_listings_memoized_only_without_deletions() -> None:
    from postroom.pop3.events import MaildropEntry
    from postroom.pop3.maildrop import Maildrop

    drop = Maildrop(tuple(MaildropEntry(uid, uid, uid * 10) for uid in (4, 9)), 33)
    assert (drop.count, drop.size) == (2, 130)
    full = drop.uidl_lines(set())
    assert full == b"1 33.4\r\n2 33.9\r\n" and drop.uidl_lines(set()) is full
    assert drop.uidl_lines({1}) == b"2 33.9\r\n"
    assert drop.scan_lines({2}) == b"1 40\r\n"
    assert drop.scan_lines(set()) == b"1 40\r\n2 90\r\n"
    assert drop.uidl_lines(set()) is full


def test_redact_hides_secrets() -> None:
    from postroom.pop3.parser import redact

    text = redact(b"USER bob\r\nPASS hunter2 x\r\nAUTH PLAIN AGJvYgBodW50ZXIy\r\nRETR 1\r\nAGJvYgBodW50ZXIy\r\n")
    assert "hunter2" not in text and "AGJvYgBodW50ZXIy" not in text
    assert text == "USER bob | PASS <redacted> | AUTH PLAIN <redacted> | RETR 1 | <17 octets>"
    assert redact(b"QUIT\r\n", in_sasl=True) == "<SASL response, 5 octets>"  # base64 may spell a verb
