"""The parse-once structure: offsets, envelope, body structure and searchable text."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.imap.encode import bodystructure, envelope
from postroom.mime import STRUCTURE_VERSION, analyze, minimal_structure, searchable_text
from postroom.mime.headers import (
    _FOLD,
    _parse_addresses_general,
    _parse_date_general,
    decode_words,
    parse_addresses,
    parse_date,
    unfold,
)

analyze_module = importlib.import_module("postroom.mime.analyze")  # the package exports the function, not it

MULTI = (
    b'From: "Joe Q." <joe@example.com>\r\n'
    b"To: a@b.c, Group: x@y.z, w@v.u;\r\n"
    b"Subject: =?utf-8?q?h=C3=A9llo?= world\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <1@x>\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"hello there\r\nline2\r\n"
    b"--XX\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: inner\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--XX\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"PGI+c2VjcmV0d29yZDwvYj4=\r\n"
    b"--XX--\r\n"
)


def body_of(raw: bytes, node: dict[str, object]) -> bytes:
    o, h, b = int(node["o"]), int(node["h"]), int(node["b"])  # type: ignore[call-overload]
    return raw[o + h : o + h + b]


def test_offsets_point_at_each_part() -> None:
    s = analyze(MULTI)
    assert s["v"] == STRUCTURE_VERSION
    assert MULTI[: s["header_size"]].endswith(b"\r\n\r\n")
    root = s["body"]
    assert (root["t"], root["s"]) == ("multipart", "mixed")
    kids = root["c"]
    assert len(kids) == 3
    assert body_of(MULTI, kids[0]) == b"hello there\r\nline2"
    assert kids[0]["l"] == 2
    mime_header = MULTI[kids[0]["o"] : kids[0]["o"] + kids[0]["h"]]
    assert mime_header == b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    inner = kids[1]["m"]["n"]
    assert body_of(MULTI, inner) == b"inner body"
    assert kids[1]["m"]["env"][1] == "inner"
    assert kids[2]["e"] == "BASE64"


def test_envelope_keeps_raw_values_and_groups() -> None:
    env = analyze(MULTI)["env"]
    assert env[1] == "=?utf-8?q?h=C3=A9llo?= world"  # ENVELOPE is raw (RFC 3501 §7.4.2)
    assert env[2] == [["Joe Q.", None, "joe", "example.com"]]
    assert env[3] == env[2] and env[4] == env[2]  # Sender and Reply-To default to From
    assert env[5] == [
        [None, None, "a", "b.c"],
        [None, None, "Group", None],
        [None, None, "x", "y.z"],
        [None, None, "w", "v.u"],
        [None, None, None, None],
    ]
    assert env[9] == "<1@x>"


def test_searchable_text_is_decoded() -> None:
    heads, body = searchable_text(MULTI)
    assert "héllo" in heads
    assert "secretword" in body
    assert "secretword" not in heads
    assert "inner body" in body
    s = analyze(MULTI)
    assert "search_body" not in s and "search_headers" not in s  # derived by the indexer, not stored
    assert dict((k, v) for k, v in s["fields"])["subject"] == "héllo world"
    assert s["date"] == 760686745.0


def test_plain_message_defaults() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    s = analyze(raw)
    b = s["body"]
    assert (b["t"], b["s"], b["p"]) == ("text", "plain", [["charset", "us-ascii"]])
    assert body_of(raw, b) == b"body\r\n"
    assert b["l"] == 1


def test_helpers() -> None:
    assert decode_words("=?iso-8859-1?b?aOk=?= =?utf-8?q?_x?=") == "hé x"
    assert parse_addresses("<@route:a@b>") == [[None, "@route", "a", "b"]]
    assert parse_addresses("undisclosed-recipients:;") == [
        [None, None, "undisclosed-recipients", None],
        [None, None, None, None],
    ]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_analyze_is_total(raw: bytes) -> None:
    s = analyze(raw)
    assert s["body"]["o"] == 0
    assert 0 <= s["header_size"] <= len(raw)


FIELD_NAMES = ["Date", "From", "To", "Cc", "Sender", "Reply-To", "Subject", "Message-ID", "Content-Type"]
FIELD_NAMES += ["Content-Transfer-Encoding", "Content-Disposition", "Content-Language", "In-Reply-To"]
#: Pieces of header values that have broken parsers: odd dates (year 0, out-of-range fields), odd
#: addresses, encoded words with unknown charsets or bad base64, charsets no codec can have (a NUL).
VALUE_PIECES = ["", "Thu, 1 Jan 0000 00:00:00 +0000", "31 Feb 2026 99:99:99 +9999", "1 Jan 99999 0:0 +0000"]
VALUE_PIECES += ["Mon, 32 Foo 2026 1:2:3 -0000 (x)", "a@b", "<a@b>", '"q\\" x" <a@b>', "g: a@b, c@d;", "(c) <@r:a@b>"]
VALUE_PIECES += ["=?utf-8?B?w6k=?=", "=?x-unknown?Q?a=ZZ?=", "=?utf-8?B?!!!?=", 'multipart/mixed; boundary="B"']
VALUE_PIECES += ['text/plain; charset="', "text/plain; charset=x-bogus", 'text/plain; charset="\x00"', "base64"]
VALUE_PIECES += ["message/rfc822", "quoted-printable", "attachment; filename*=UTF-8''%e9", "en, , fr", "\u00e9"]
VALUE_PIECES += [";;;", "\\", '"', "<", ">", ":", "@", "@@", ",", "(", ")", "((a)", "\x00", "\r", "\t"]
BODY_PIECES = [b"", b"--B\r\n", b"--B--\r\n", b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n", b"=E9=\r\n"]
BODY_PIECES += [b"\r\n", b"\n", b"\xff\xfe", b"Content-Transfer-Encoding: base64\r\n\r\n!!@@\r\n"]
BODY_PIECES += [b"Content-Type: message/rfc822\r\n\r\nDate: 1 Jan 0000 00:00 +0000\r\n\r\nx\r\n"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(FIELD_NAMES), st.lists(st.sampled_from(VALUE_PIECES), max_size=4).map(" ".join)),
        max_size=8,
    ),
    st.lists(st.sampled_from(BODY_PIECES), max_size=8),
    st.sampled_from(["\r\n", "\n"]),
)
def test_analysis_and_text_are_total_over_odd_header_values(
    fields: list[tuple[str, str]], body: list[bytes], newline: str
) -> None:
    """Whatever the header says, analysis and the searchable text give a result (a raise here would
    answer an SMTP client 451 for ever, or stall the full-text indexer on that message)."""
    raw = "".join(f"{name}: {value}{newline}" for name, value in fields).encode() + newline.encode()
    raw += b"".join(body)
    assert analyze(raw)["header_size"] <= len(raw)
    searchable_text(raw)


def test_a_charset_no_codec_can_have_falls_back_to_utf8() -> None:
    raw = b'Content-Type: text/plain; charset="a\x00b"\r\n\r\nh\xc3\xa9llo\r\n'
    assert "h\u00e9llo" in searchable_text(raw)[1]


FRAGMENTS = [b"--B\r\n", b"--B--\r\n", b"x\r\n", b"\r\n", b"Content-Type: text/plain\r\n"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS)))
def test_multipart_fragments_stay_in_bounds(chunks: list[bytes]) -> None:
    raw = b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n' + b"".join(chunks)
    s = analyze(raw)
    for kid in s["body"].get("c", []):
        assert kid["o"] >= 0 and kid["o"] + kid["h"] + kid["b"] <= len(raw)


def _header_end_reference(raw: bytes) -> int:
    """The rule, written the slow way: the header ends after the first CRLF CRLF or LF LF, whichever comes
    first (an empty first line ends it at once); no blank line: the whole input is header."""
    if raw.startswith(b"\r\n"):
        return 2
    if raw.startswith(b"\n"):
        return 1
    ends = [i + 4 for i in range(len(raw)) if raw.startswith(b"\r\n\r\n", i)]
    ends += [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
    return min(ends, default=len(raw))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b":", b" ", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n"]), max_size=30))
def test_header_ends_at_the_first_blank_line(parts: list[bytes]) -> None:
    raw = b"".join(parts)
    assert analyze(raw)["header_size"] == _header_end_reference(raw)


LINE_PARTS = [b"a", b"Subject: x", b"Content-Type: message/rfc822", b"Content-Type: multipart/x; boundary=B"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*LINE_PARTS, b"\r\n", b"\n", b"\r", b"--B", b"--B--", b""]), max_size=30))
def test_line_count_is_every_line_of_the_message(parts: list[bytes]) -> None:
    """``lines`` adds the header's newlines to the body's count when the body was counted: the same as
    counting the whole message."""
    raw = b"".join(parts)
    n = raw.count(b"\n")
    assert analyze(raw)["lines"] == (n if not raw or raw.endswith(b"\n") else n + 1)


ADDRESS_PARTS = ["a", "Bob", "b.c", "x-y", "@", "<", ">", " ", "\t", '"', ",", ":", ";", "(", ")", ".", "é", "\\"]


WORD = st.text(alphabet="ab.-_'", min_size=1, max_size=4) | st.text(alphabet='ab."@<>(),:;é', min_size=1, max_size=4)
GAP = st.sampled_from(["", " ", "  ", "\t", " \t "])
NAME_ADDR = st.builds(
    "{}{}{}{}{}@{}{}{}".format,
    GAP,
    st.lists(st.tuples(WORD, GAP).map("".join), max_size=3).map(" ".join),
    GAP,
    st.sampled_from(["<", ""]),
    WORD,
    WORD,
    st.sampled_from([">", ""]),
    GAP,
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(ADDRESS_PARTS), max_size=14).map("".join) | NAME_ADDR | st.text(max_size=30))
def test_address_fast_path_agrees_with_the_parser(value: str) -> None:
    """The fast path for ``a@b`` / ``Name <a@b>`` gives exactly what the general parser gives."""
    assert parse_addresses(value) == _parse_addresses_general(value)


MONTHS = ["Jan", "feb", "MAR", "Dec", "Foo", "Sep"]


@settings(max_examples=500, deadline=None)
@given(
    st.builds(
        "{}{} {} {:04d} {:02d}:{:02d}{} {}{:02d}{:02d}{}".format,
        st.sampled_from(["", "Thu, ", "Mon,", " "]),
        st.integers(0, 99),
        st.sampled_from(MONTHS),
        st.integers(0, 9999),
        st.integers(0, 99),
        st.integers(0, 99),
        st.sampled_from(["", ":00", ":59", ":60", ":99"]),
        st.sampled_from(["+", "-"]),
        st.integers(0, 99),
        st.integers(0, 99),
        st.sampled_from(["", " ", " (UTC)", "(CET) ", " (a(b))", " (x\\)"]),
    )
    | st.text(max_size=40)
)
def test_date_fast_path_agrees_with_the_parser(value: str) -> None:
    """The fast path for RFC 5322 dates gives exactly what ``email.utils`` gives."""
    assert parse_date(value) == _parse_date_general(value)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="\r\n\t a:", max_size=40))
def test_unfold_agrees_with_the_folding_regex(text: str) -> None:
    """The ``str.replace`` unfolding removes exactly the line breaks the RFC 5322 regex removes."""
    assert unfold(text) == _FOLD.sub("", text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300), st.integers(0, 300), st.sampled_from([0, 16, 1024 * 1024]))
def test_newlines_counts_like_bytes_count(raw: bytes, a: int, b: int, copy_max: int) -> None:
    """Both ways of counting (on a copy, and ``bytes.count`` above ``COUNT_BY_COPY_MAX``) agree."""
    start, end = min(a, b), max(a, b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(analyze_module, "COUNT_BY_COPY_MAX", copy_max)
        assert analyze_module._newlines(raw, start, end) == raw.count(b"\n", start, end)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_minimal_structure_serves_fetch(raw: bytes) -> None:
    """The structure stored when analysis fails renders as ENVELOPE and BODYSTRUCTURE, and its offsets
    cover the message: the header block as ``analyze`` finds it, the rest as the body."""
    s = minimal_structure(raw)
    assert s["v"] == STRUCTURE_VERSION and s["header_size"] == analyze(raw)["header_size"]
    body = s["body"]
    assert body["o"] == 0 and body["h"] == s["header_size"] and body["h"] + body["b"] == len(raw)
    assert envelope(s["env"]).startswith(b"(NIL NIL NIL")
    assert bodystructure(body, True).startswith(b'("text" "plain"')
