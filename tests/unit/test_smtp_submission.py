"""The MSA's completion of a submitted message (RFC 6409 §8): Date and Message-ID when missing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.mime import split_header
from postroom.smtp.submission import complete, has_field


def header_end(data: bytes) -> int:
    return split_header(data)[0]


def has(header: bytes, name: bytes) -> bool:
    return has_field(header.lower(), name)


NOW = 1_795_000_000.0


def test_fields_go_before_the_blank_line() -> None:
    out = complete(b"Subject: x\r\n\r\nbody\r\n", "mx.test", NOW)
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"body\r\n"
    assert head.split(b"\r\n")[0] == b"Subject: x"
    assert b"\r\nDate: " in head and head.split(b"\r\n")[-1].endswith(b"@mx.test>")


def test_existing_fields_in_any_case_are_kept() -> None:
    data = b"DATE: whenever\r\nMessage-Id: <a@b>\r\n\r\nx\r\n"
    assert complete(data, "mx.test", NOW) is data
    obsolete = b"Date : whenever\r\nMessage-ID\t: <a@b>\r\n\r\nx\r\n"  # RFC 5322 §4.5: blanks before the colon
    assert complete(obsolete, "mx.test", NOW) is obsolete
    assert b"Date:" in complete(b"X-Date: no\r\nX-Message-ID: no\r\n\r\n", "h", NOW)
    only_id = complete(b"date: d\r\n\r\nx\r\n", "mx.test", NOW)
    assert only_id.count(b"ate:") == 1 and b"Message-ID: <" in only_id


def test_no_header_header_only_and_bare_lf() -> None:
    assert complete(b"\r\nbody\r\n", "h", NOW).startswith(b"Date: ")
    assert complete(b"\r\nbody\r\n", "h", NOW).endswith(b">\r\n\r\nbody\r\n")
    assert complete(b"Subject: x", "h", NOW).startswith(b"Subject: x\r\nDate: ")
    lf = complete(b"Subject: x\n\nbody with Date: in it\n", "h", NOW)
    assert lf.startswith(b"Subject: x\nDate: ") and lf.endswith(b">\r\n\nbody with Date: in it\n")


def test_a_field_name_in_the_body_or_inside_a_value_does_not_count() -> None:
    data = b"Subject: see Date: and message-id: here\r\n\r\nDate: in body\r\nMessage-ID: <b@b>\r\n"
    out = complete(data, "h", NOW)
    assert out.index(b"\r\nDate: ") < out.index(b"\r\n\r\n") and out.count(b"Message-ID:") == 2


LINES = [b"Date: x", b"Message-ID: <i@d>", b"Subject: s", b"X: y", b""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=6), st.binary(max_size=60))
def test_completion_adds_each_missing_field_once_and_keeps_the_rest(lines: list[bytes], body: bytes) -> None:
    """Afterwards the header has both fields; what was there before is kept, byte for byte, around the
    one block of added fields; nothing is added when both were there."""
    data = b"".join(line + b"\r\n" for line in lines) + body
    out = complete(data, "h", NOW)
    end = header_end(data)
    had_both = has(data[:end], b"date") and has(data[:end], b"message-id")
    assert has(out[: header_end(out)], b"date") and has(out[: header_end(out)], b"message-id")
    assert (out == data) if had_both else (out.startswith(data[:end]) and out.endswith(data[end:]))
