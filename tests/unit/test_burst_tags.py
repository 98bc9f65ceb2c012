"""Tag grammar: PDF-eXPLODE compatibility, the native syntax's strictness, and extractor damage."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.burst.tags import Tag, TagError, find_tags, has_tag_marker, parse_native, parse_pdfexplode


def one(text: str) -> Tag:
    tags = find_tags(text)
    assert len(tags) == 1, tags
    return tags[0]


# --- PDF-eXPLODE ---------------------------------------------------------------------------------------


def test_pdfexplode_address_only() -> None:
    t = one("Invoice <pdfexplode>client@example.com</pdfexplode> end")
    assert t.to == ("client@example.com",) and t.template is None and t.variables == ()


def test_pdfexplode_full_form_with_back_quoted_comma() -> None:
    t = one("<pdfexplode>`Acme, Inc`,12.50,,x%INV#bob@example.com</pdfexplode>")
    assert t.variables == (("v1", "Acme, Inc"), ("v2", "12.50"), ("v3", ""), ("v4", "x"))
    assert t.template == "INV" and t.to == ("bob@example.com",)


def test_pdfexplode_message_id_without_values() -> None:
    t = one("<pdfexplode>REMINDER#a@b.example</pdfexplode>")
    assert t.template == "REMINDER" and t.variables == ()


def test_pdfexplode_empty_tag_means_no_recipient() -> None:
    assert one("<pdfexplode></pdfexplode>").is_empty
    assert one("<pdfexplode>  </pdfexplode>").is_empty


def test_pdfexplode_nine_values_max() -> None:
    nine = ",".join(str(i) for i in range(9))
    assert len(one(f"<pdfexplode>{nine}%a@b.example</pdfexplode>").variables) == 9
    with pytest.raises(TagError, match="at most 9"):
        find_tags(f"<pdfexplode>{nine},9%a@b.example</pdfexplode>")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("v1%", "no address"),
        ("a%b%c@x.example", "more than one '%'"),
        ("A#B#c@x.example", "more than one '#'"),
        ("`unterminated%c@x.example", "unterminated back quote"),
        ("ab`c`%c@x.example", "back quote in the middle"),
        ("v%bad/id#c@x.example", "invalid message id"),
        ("v%not-an-address", "invalid address"),
        ("v%a@@x.example", "invalid address"),
        ("v%a@-x.example", "invalid address"),
    ],
)
def test_pdfexplode_errors(body: str, message: str | None) -> None:
    with pytest.raises(TagError, match=message or "invalid"):
        find_tags(f"<pdfexplode>{body}</pdfexplode>")


def test_unterminated_tag_is_an_error() -> None:
    with pytest.raises(TagError, match="without </pdfexplode>"):
        find_tags("<pdfexplode>a@b.example and the rest of the page")
    with pytest.raises(TagError, match="without ]]"):
        find_tags("[[postroom to=a@b.example")


def test_smtputf8_address_allowed() -> None:
    assert one("<pdfexplode>jörg@bücher.example</pdfexplode>").to == ("jörg@bücher.example",)


# --- extractor damage ----------------------------------------------------------------------------------


def test_tag_broken_across_lines_and_hyphen_marker() -> None:
    # What pdfium returns for a tag printed over three lines, the second ending in '-'.
    text = "Text <pdfexp\r\nlode>Acme Corp,3%alice.smith\ufffeb@exa\r\nmple.com</pdfexplode> after"
    t = one(text)
    assert t.to == ("alice.smith-b@example.com",)
    assert t.variables == (("v1", "Acme Corp"), ("v2", "3"))


def test_generated_spaces_inside_markers_and_address() -> None:
    t = one("< pdfexplode >Acme  Corp , 3 % INV # a @ b.example </ pdfexplode>")
    assert t.to == ("a@b.example",) and t.template == "INV"
    assert t.variables == (("v1", "Acme Corp"), ("v2", "3"))


def test_trailing_space_at_line_break_is_kept_as_one_space() -> None:
    assert one("<pdfexplode>Acme \r\nCorp%a@b.example</pdfexplode>").variables == (("v1", "Acme Corp"),)


# --- native ---------------------------------------------------------------------------------------------


def test_native_all_keys() -> None:
    t = one(
        "[[postroom to=a@x.example, b@y.example; cc=c@x.example; bcc=d@x.example; reply-to=r@x.example;"
        " subject=Your statement; template=statement; file=Statement-{v1}.pdf; password=`s;e]cret`;"
        " var.Amount=12.50; var.name=`Doe; John`]]"
    )
    assert t.to == ("a@x.example", "b@y.example") and t.cc == ("c@x.example",) and t.bcc == ("d@x.example",)
    assert t.reply_to == ("r@x.example",) and t.subject == "Your statement" and t.template == "statement"
    assert t.filename == "Statement-{v1}.pdf" and t.password == "s;e]cret"
    assert t.variables == (("Amount", "12.50"), ("name", "Doe; John"))
    assert t.recipients == ("a@x.example", "b@y.example", "c@x.example", "d@x.example")


def test_native_empty_and_trailing_semicolon() -> None:
    assert one("[[postroom]]").is_empty
    assert one("[[postroom to=a@x.example;]]").to == ("a@x.example",)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("to=a@x.example; colour=red", "unknown key 'colour'"),
        ("to=a@x.example; to=b@x.example", "given twice"),
        ("to=a@x.example; subject", "expected key=value"),
        ("to=a@x.example; subject=", "empty value"),
        ("cc=a@x.example", "no 'to='"),
        ("to=a@x.example, ", "empty address"),
        ("to=a@x.example; var.1x=3", "invalid variable name"),
        ("to=a@x.example; template=a b", "invalid template name"),
        ("to=nobody", "invalid address"),
        ("to=a@x.example; =3", "without a key"),
    ],
)
def test_native_errors(body: str, message: str) -> None:
    with pytest.raises(TagError, match=message):
        find_tags(f"[[postroom {body}]]")


def test_two_tags_on_one_page_are_both_returned() -> None:
    tags = find_tags("<pdfexplode>a@x.example</pdfexplode> [[postroom to=b@x.example]]")
    assert [t.to for t in tags] == [("a@x.example",), ("b@x.example",)]
    assert not tags[0].same_message(tags[1])
    assert tags[0].same_message(one("[[postroom to=A@x.example]]"))


def test_text_without_tags() -> None:
    assert find_tags("An ordinary page with <b> and [[other]] brackets, 50% off #1") == []


# --- properties -----------------------------------------------------------------------------------------

_values = st.text(
    alphabet=st.characters(exclude_characters="`\r\n\ufffe\x02", exclude_categories=["Cs"]), max_size=12
).map(lambda s: " ".join(s.split()))
_locals = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,10}[a-z0-9]", fullmatch=True).filter(lambda s: ".." not in s)
_domains = st.from_regex(r"[a-z][a-z0-9]{0,8}\.(example|test|com)", fullmatch=True)


@settings(max_examples=200)
@given(
    values=st.lists(_values, max_size=9),
    msgid=st.none() | st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True),
    local=_locals,
    domain=_domains,
)
def test_pdfexplode_round_trip(values: list[str], msgid: str | None, local: str, domain: str) -> None:
    body = ",".join(f"`{v}`" for v in values) + ("%" if values else "")
    body += f"{msgid}#" if msgid else ""
    body += f"{local}@{domain}"
    t = parse_pdfexplode(body)
    assert t.to == (f"{local}@{domain}",)
    assert t.template == msgid
    assert [v for _, v in t.variables] == [v.strip() for v in values]


@settings(max_examples=200)
@given(
    local=_locals,
    domain=_domains,
    value=_values,
    cut=st.integers(min_value=0, max_value=200),
    damage=st.sampled_from(["\r\n", "\n", " \r\n"]),
)
def test_line_break_anywhere_gives_the_same_tag(local: str, domain: str, value: str, cut: int, damage: str) -> None:
    """A line break inserted anywhere in a tag (the extractor's doing) does not change what it says."""
    text = f"<pdfexplode>`{value}`%INV#{local}@{domain}</pdfexplode>"
    cut %= len(text) + 1
    damaged = text[:cut] + damage + text[cut:]
    expect = one(text)
    got = one(damaged)
    if damage == " \r\n":  # a real space: only harmless where spaces are ignored or collapsed
        return
    assert got.same_message(expect)


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_only_tag_error_escapes(text: str) -> None:
    """Whatever the page says, the scanner returns tags or raises TagError: nothing else."""
    for wrapped in (text, f"<pdfexplode>{text}</pdfexplode>", f"[[postroom {text}]]", f"[[postroom to={text}]]"):
        with contextlib.suppress(TagError):
            found = find_tags(wrapped)
            if not has_tag_marker(wrapped):  # the scanner's pre-check never hides a tag
                assert found == []


def test_parse_native_direct() -> None:
    assert parse_native(" to=a@x.example ").to == ("a@x.example",)
