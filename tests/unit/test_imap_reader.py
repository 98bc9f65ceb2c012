"""The IMAP command reader and tokenizer: framing, literals, limits; Hypothesis for split-anywhere."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.errors import RemoteProtocolError
from postroom.imap.encode import seq_text
from postroom.imap.grammar import seqset
from postroom.imap.reader import (
    Command,
    CommandReader,
    ContinueLiteral,
    Event,
    LineTooLong,
    LiteralRejected,
    Malformed,
)
from postroom.imap.tokens import Lit8, tokenize


def events(chunks: list[bytes], **kw: int) -> list[Event]:
    r = CommandReader(**kw)
    out: list[Event] = []
    for chunk in chunks:
        r.receive_data(chunk)
        while (ev := r.next_event()) is not None:
            out.append(ev)
    return out


SAMPLE = (
    b"a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\n"
    b'a2 SELECT "INBOX"\r\n'
    b"a3 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)\r\n"
    b"a4 APPEND INBOX ~{3}\r\nx\x00y\r\n"
    b"a5 NOOP\n"
)


def test_literals_and_tokens() -> None:
    evs = events([SAMPLE])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["ContinueLiteral", "Command", "Command", "Command", "ContinueLiteral", "Command", "Command"]
    cmds = [e for e in evs if isinstance(e, Command)]
    assert tokenize(cmds[0]) == ("a1", "LOGIN", [b"alice", b"pw!"])
    assert tokenize(cmds[2]) == (
        "a3",
        "UID",
        ["FETCH", "1:*", ["FLAGS", "BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>"]],
    )
    _tag, _name, args = tokenize(cmds[3])
    assert isinstance(args[1], Lit8) and args[1] == b"x\x00y"
    assert tokenize(cmds[4]) == ("a5", "NOOP", [])


def test_limits() -> None:
    assert events([b"t APPEND INBOX {2000}\r\n"], max_literal=1000) == [LiteralRejected("t", 2000, fatal=False)]
    assert events([b"t APPEND INBOX {2000+}\r\n"], max_literal=1000) == [LiteralRejected("t", 2000, fatal=True)]
    evs = events([b"t NOOP " + b"x" * 100, b"y" * 100, b"\r\nu NOOP\r\n"], max_line=150)
    assert isinstance(evs[0], LineTooLong) and evs[0].tag == "t"
    assert isinstance(evs[1], Command) and evs[1].line == b"u NOOP"
    assert events([b"t LOGIN a\x00 b\r\n"]) == [Malformed("t", "NUL octet in command")]
    # a literal may carry NUL-looking placeholders without confusing the tokenizer
    (cmd,) = [e for e in events([b"t LOGIN {3+}\r\n\x000\x00 x\r\n"]) if isinstance(e, Command)]
    assert tokenize(cmd)[2] == [b"\x000\x00", "x"]


def test_sync_literal_waits_for_continuation_before_reading() -> None:
    r = CommandReader()
    r.receive_data(b"a LOGIN {3}\r\n")
    assert r.next_event() == ContinueLiteral()
    assert r.next_event() is None
    r.receive_data(b"bob x\r\n")
    ev = r.next_event()
    assert isinstance(ev, Command) and tokenize(ev)[2] == [b"bob", "x"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=8))
def test_split_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(SAMPLE)], strict=True)]
    assert events(chunks) == events([SAMPLE])
    assert events([bytes([b]) for b in SAMPLE]) == events([SAMPLE])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_only_remote_errors_escape(data: bytes) -> None:
    for ev in events([data, b"\r\n"], max_line=200, max_literal=50):
        if isinstance(ev, Command):
            with contextlib.suppress(RemoteProtocolError):
                tokenize(ev)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=1, max_value=500), min_size=1, max_size=50))
def test_sequence_set_round_trip(numbers: set[int]) -> None:
    ordered = sorted(numbers)
    parsed = seqset(seq_text(ordered))
    assert [n for n in range(1, 501) if parsed.contains(n, 500)] == ordered


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).filter(lambda b: b"\x00" not in b))
def test_encoded_strings_round_trip_through_reader_and_tokenizer(value: bytes) -> None:
    """What the encoder sends as a string (quoted or literal) reads back as exactly those octets."""
    from postroom.imap.encode import qstr_bytes

    wire = qstr_bytes(value)
    if not wire.startswith(b"{"):
        assert b"\r" not in wire and b"\n" not in wire  # a quoted string can never break the line
    cmds = [e for e in events([b"t X " + wire + b"\r\n"]) if isinstance(e, Command)]
    assert len(cmds) == 1
    assert tokenize(cmds[0])[2] == [value]


def test_debug_transcript_hides_credentials_and_literals() -> None:
    from postroom.imap.adapter import redact

    assert redact(b"a LOGIN bob s3cret") == "a LOGIN <redacted>"
    assert redact(b"a authenticate PLAIN AGJvYgBzM2NyZXQ=") == "a authenticate <redacted>"
    assert redact(b"a APPEND INBOX \x000\x00") == "a APPEND INBOX <literal>"
    assert redact(b"b UID FETCH 1 BODY[]") == "b UID FETCH 1 BODY[]"
