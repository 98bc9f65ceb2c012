"""RFC 5321 path and mailbox parsing, including the relay tricks an MX must not fall for."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.wire.address import (
    Address,
    AddressError,
    format_path,
    is_valid_address,
    parse_mailbox,
    parse_path,
)


def test_plain_path() -> None:
    a = parse_path("<Alice@Example.ORG>")
    assert a == Address("Alice", "example.org")
    assert a is not None and a.lookup_key == "alice@example.org"
    assert str(a) == "Alice@example.org"
    assert a.path == "<Alice@example.org>"


def test_null_path_only_when_allowed() -> None:
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(AddressError):
        parse_path("<>")
    assert format_path(None) == "<>"


def test_source_route_is_dropped_and_final_mailbox_routed() -> None:
    # RFC 5321 §3.6.1: the route is ignored; mail goes to the mailbox at the end.
    a = parse_path("<@relay.example,@other.example:bob@final.example>")
    assert a == Address("bob", "final.example")


@pytest.mark.parametrize(
    "text",
    [
        "<a@b@c>",  # double @
        "<b!a>",  # bang path without domain
        "<bob>",  # no domain
        "<@a.example bob@c>",  # route without ':'
        "<@:bob@c>",  # empty route hop
        '<"unbalanced@x>',
        "<bob@exa mple.org>",
        "<bob@-bad.org>",
        "<bob@[999.1.1.1]>",
        "<bob@[IPv6:zz::1]>",
        "<bo\x00b@x.org>",
        "<bob@x.org",
        "bob@x.org",
        "<.bob@x.org>",
        "<bob.@x.org>",
        "<bo..b@x.org>",
        "<" + "a" * 65 + "@x.org>",
        "<a@" + "b" * 64 + ".org>",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_percent_and_bang_are_plain_local_characters() -> None:
    # No percent hack: a%b@local is the local mailbox "a%b" at local, never a relay to b.
    assert parse_path("<a%remote.example@local.test>") == Address("a%remote.example", "local.test")
    assert parse_path("<remote.example!a@local.test>") == Address("remote.example!a", "local.test")


def test_quoted_local_parts() -> None:
    assert parse_path('<"bob"@x.org>') == Address("bob", "x.org")  # unquoted when it can be
    a = parse_path('<"a@remote.example"@local.test>')
    assert a == Address('"a@remote.example"', "local.test")
    assert a is not None and a.domain == "local.test"
    assert parse_path('<"a\\"b"@x.org>') == Address('"a\\"b"', "x.org")


def test_address_literals() -> None:
    a = parse_path("<bob@[127.0.0.1]>")
    assert a is not None and a.is_literal and a.domain == "[127.0.0.1]"
    b = parse_path("<bob@[IPv6:::1]>")
    assert b is not None and b.is_literal


def test_utf8_needs_smtputf8() -> None:
    with pytest.raises(AddressError):
        parse_path("<jörg@bücher.example>")
    a = parse_path("<jörg@Bücher.example>", smtputf8=True)
    assert a == Address("jörg", "bücher.example")
    assert a is not None and a.domain_ascii == "xn--bcher-kva.example"
    assert not a.is_ascii


def test_is_valid_address() -> None:
    assert is_valid_address("user@example.com")
    assert is_valid_address("üser@example.com")
    assert not is_valid_address("user@@example.com")
    assert not is_valid_address("user")
    assert parse_mailbox("x@y.z") == Address("x", "y.z")


_atext = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=20)


@given(
    st.lists(_atext, min_size=1, max_size=3),
    st.lists(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), min_size=1, max_size=4),
)
def test_round_trip(locals_: list[str], labels: list[str]) -> None:
    local = ".".join(locals_)
    if len(local) > 64:
        return
    a = parse_path(f"<{local}@{'.'.join(labels)}>")
    assert a is not None
    assert parse_path(a.path) == a


@given(st.text(max_size=80))
def test_only_address_error_escapes(text: str) -> None:
    for utf8 in (False, True):
        with contextlib.suppress(AddressError):
            parse_path(text, smtputf8=utf8, allow_null=True)


def test_valid_paths_are_remembered_errors_are_not() -> None:
    first = parse_path("<Repeat@Example.ORG>")
    assert parse_path("<Repeat@Example.ORG>") is first  # the cached Address (immutable)
    assert parse_path("<Repeat@Example.ORG>", smtputf8=True) == first  # another key, same answer
    for _ in range(2):
        with pytest.raises(AddressError):
            parse_path("<no-at-sign>")
