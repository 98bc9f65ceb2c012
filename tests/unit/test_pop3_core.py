"""The sans-I/O POP3 session as transcripts: bytes in, replies and events out, no event loop."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.errors import LocalProtocolError
from postroom.pop3.core import AUTH_FAILED, IN_USE, PLAINTEXT_REFUSED, Pop3Session, State
from postroom.pop3.events import (
    NEED_DATA,
    Authenticate,
    Close,
    Event,
    MaildropEntry,
    Retrieve,
    StartTls,
    Update,
)
from postroom.pop3.limits import Pop3Config
from postroom.pop3.maildrop import Maildrop

MESSAGES = {
    11: b"Subject: one\r\n\r\nhello\r\n.hidden dot\r\n",
    12: b"Subject: two\r\nX: y\r\n\r\nline1\r\nline2\r\nline3\r\n",
    13: b"Subject: three\r\n\r\n.\r\n..\r\nend",
}
DROP = [MaildropEntry(uid=5 + i, blob_id=blob, size=len(raw)) for i, (blob, raw) in enumerate(MESSAGES.items())]
UIDVALIDITY = 777


class Driver:
    """Runs a session the way the adapter does, with a fake authenticator, store and TLS."""

    def __init__(
        self,
        config: Pop3Config | None = None,
        *,
        plaintext_ok: bool = True,
        stls_available: bool = False,
        tls_active: bool = False,
    ) -> None:
        self.s = Pop3Session(
            config or Pop3Config(),
            plaintext_ok=plaintext_ok,
            stls_available=stls_available,
            tls_active=tls_active,
        )
        self.events: list[Event] = []
        self.locked = False
        self.deleted: tuple[int, ...] | None = None
        self.closed = False

    def feed(self, data: bytes) -> bytes:
        self.s.receive_data(data)
        out = b""
        while True:
            ev = self.s.next_event()
            self.events.append(ev)
            out += self.s.data_to_send()
            if ev is NEED_DATA:
                return out
            if isinstance(ev, Close):
                self.closed = True
                return out
            if isinstance(ev, StartTls):
                self.s.tls_started()
            elif isinstance(ev, Authenticate):
                if (ev.username, ev.password) != ("alice@example.test", "pw with space"):
                    self.s.login_failed()
                elif self.locked:
                    self.s.login_in_use()
                else:
                    self.s.login_ok(ev.username, Maildrop(tuple(DROP), UIDVALIDITY))
            elif isinstance(ev, Retrieve):
                self.s.message(MESSAGES[ev.blob_id])
            elif isinstance(ev, Update):
                self.deleted = ev.uids
                self.events.append(self.s.update_result(len(ev.uids)))
                self.closed = True
                out += self.s.data_to_send()
                return out

    def login(self) -> bytes:
        return self.feed(b"USER alice@example.test\r\nPASS pw with space\r\n")


def greeting(d: Driver) -> bytes:
    return d.s.data_to_send()


def test_greeting_and_capa_before_tls() -> None:
    d = Driver(plaintext_ok=False, stls_available=True)
    assert greeting(d).startswith(b"+OK ")
    capa = d.feed(b"CAPA\r\n")
    lines = capa.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert b"STLS" in lines and b"TOP" in lines and b"UIDL" in lines and b"PIPELINING" in lines
    assert b"RESP-CODES" in lines and b"AUTH-RESP-CODE" in lines
    assert b"USER" not in lines and not any(x.startswith(b"SASL") for x in lines)  # RFC 2595 §4
    assert capa.endswith(b"\r\n.\r\n")


def test_plaintext_refused_before_stls_then_allowed() -> None:
    d = Driver(plaintext_ok=False, stls_available=True)
    greeting(d)
    assert d.feed(b"USER alice@example.test\r\n") == PLAINTEXT_REFUSED
    assert d.feed(b"PASS x\r\n") == PLAINTEXT_REFUSED
    assert d.feed(b"AUTH PLAIN AGFAYg==\r\n") == PLAINTEXT_REFUSED
    assert d.feed(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert d.s.tls_active
    capa = d.feed(b"CAPA\r\n").split(b"\r\n")
    assert b"STLS" not in capa and b"USER" in capa and b"SASL PLAIN LOGIN" in capa
    assert d.login().startswith(b"+OK\r\n+OK Logged in, maildrop has 3 messages")
    assert d.feed(b"STLS\r\n").startswith(b"-ERR")  # only in AUTHORIZATION


def test_stls_injection_pipelined_commands_are_dropped() -> None:
    d = Driver(plaintext_ok=False, stls_available=True)
    greeting(d)
    out = d.feed(b"STLS\r\nCAPA\r\nUSER evil\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"  # nothing for CAPA/USER, before or after the handshake
    assert d.feed(b"") == b""
    assert d.feed(b"NOOP\r\n").startswith(b"-ERR NOOP not valid")


def test_stls_not_offered_on_implicit_tls() -> None:
    d = Driver(plaintext_ok=False, tls_active=True, stls_available=True)
    greeting(d)
    assert b"STLS" not in d.feed(b"CAPA\r\n").split(b"\r\n")
    assert d.feed(b"STLS\r\n").startswith(b"-ERR")


def test_login_transaction_and_listing() -> None:
    d = Driver()
    greeting(d)
    total = sum(e.size for e in DROP)
    assert d.login() == b"+OK\r\n" + f"+OK Logged in, maildrop has 3 messages ({total} octets)\r\n".encode()
    assert d.s.state is State.TRANSACTION
    assert d.feed(b"STAT\r\n") == f"+OK 3 {total}\r\n".encode()
    listing = d.feed(b"LIST\r\n")
    sizes = "".join(f"{i} {e.size}\r\n" for i, e in enumerate(DROP, 1))
    assert listing == f"+OK 3 messages ({total} octets)\r\n{sizes}.\r\n".encode()
    assert d.feed(b"LIST 2\r\n") == f"+OK 2 {DROP[1].size}\r\n".encode()
    assert d.feed(b"UIDL\r\n") == b"+OK\r\n1 777.5\r\n2 777.6\r\n3 777.7\r\n.\r\n"
    assert d.feed(b"UIDL 3\r\n") == b"+OK 3 777.7\r\n"
    for bad in (b"LIST 0", b"LIST 4", b"LIST x", b"UIDL -1", b"RETR 99", b"LIST 99999999999"):
        assert d.feed(bad + b"\r\n") == b"-ERR No such message\r\n"


def test_retr_dotstuffs_and_reports_size() -> None:
    d = Driver()
    greeting(d)
    d.login()
    out = d.feed(b"RETR 1\r\n")
    assert out == f"+OK {DROP[0].size} octets\r\n".encode() + (b"Subject: one\r\n\r\nhello\r\n..hidden dot\r\n.\r\n")
    out = d.feed(b"RETR 3\r\n")
    assert out.endswith(b"\r\n\r\n..\r\n...\r\nend\r\n.\r\n")


def test_top() -> None:
    d = Driver()
    greeting(d)
    d.login()
    assert d.feed(b"TOP 2 0\r\n") == b"+OK Top of message follows\r\nSubject: two\r\nX: y\r\n\r\n.\r\n"
    assert d.feed(b"TOP 2 2\r\n").endswith(b"\r\n\r\nline1\r\nline2\r\n.\r\n")
    assert d.feed(b"TOP 2\r\n").startswith(b"-ERR")
    assert d.feed(b"TOP 2 -1\r\n").startswith(b"-ERR")


def test_dele_rset_and_quit_updates_only_marked() -> None:
    d = Driver()
    greeting(d)
    d.login()
    assert d.feed(b"DELE 1\r\n") == b"+OK Message 1 deleted\r\n"
    assert d.feed(b"DELE 1\r\n") == b"-ERR Message 1 already deleted\r\n"
    assert d.feed(b"RETR 1\r\n") == b"-ERR No such message\r\n"
    assert d.feed(b"LIST 1\r\n") == b"-ERR No such message\r\n"
    assert d.feed(b"STAT\r\n") == f"+OK 2 {DROP[1].size + DROP[2].size}\r\n".encode()
    assert b"\r\n1 " not in d.feed(b"LIST\r\n")
    assert d.feed(b"RSET\r\n").startswith(b"+OK Maildrop has 3 messages")
    assert d.feed(b"DELE 3\r\nDELE 2\r\n") == b"+OK Message 3 deleted\r\n+OK Message 2 deleted\r\n"
    assert d.deleted is None  # nothing removed before QUIT
    out = d.feed(b"QUIT\r\n")
    assert d.deleted == (6, 7)
    assert out.startswith(b"+OK") and b"1 messages left" in out
    assert d.closed and d.s.state is State.CLOSED


def test_quit_without_deletions_and_in_authorization() -> None:
    d = Driver()
    greeting(d)
    d.login()
    assert d.feed(b"QUIT\r\n").startswith(b"+OK")
    assert d.deleted is None and d.closed
    d2 = Driver()
    greeting(d2)
    d2.feed(b"USER alice@example.test\r\n")
    assert d2.feed(b"QUIT\r\n").startswith(b"+OK")
    assert isinstance(d2.events[-1], Close) and d2.deleted is None


def test_dropped_connection_never_asks_for_deletion() -> None:
    d = Driver()
    greeting(d)
    d.login()
    d.feed(b"DELE 1\r\nDELE 2\r\n")
    # The connection ends here (EOF, timeout): no event asked for an Update.
    assert not any(isinstance(e, Update) for e in d.events)


def test_auth_failure_replies_are_identical() -> None:
    d = Driver()
    greeting(d)
    unknown = d.feed(b"USER nobody@example.test\r\nPASS pw with space\r\n")
    bad = d.feed(b"USER alice@example.test\r\nPASS wrong\r\n")
    assert unknown == bad == b"+OK\r\n" + AUTH_FAILED
    assert d.feed(b"PASS x\r\n").startswith(b"-ERR USER first")


def test_in_use() -> None:
    d = Driver()
    greeting(d)
    d.locked = True
    assert d.login() == b"+OK\r\n" + IN_USE
    assert d.s.state is State.AUTHORIZATION


def test_login_too_soon() -> None:
    s = Pop3Session(Pop3Config(login_delay=60), plaintext_ok=True)
    s.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(s.next_event(), Authenticate)
    s.login_too_soon()
    assert s.next_event() is NEED_DATA
    assert s.data_to_send().endswith(b"+OK\r\n-ERR [LOGIN-DELAY] Minimum time between logins has not passed yet\r\n")
    assert s.state is State.AUTHORIZATION


def test_sasl_plain_with_initial_response_and_login_exchange() -> None:
    d = Driver()
    greeting(d)
    ir = base64.b64encode(b"\x00alice@example.test\x00pw with space")
    assert d.feed(b"AUTH PLAIN " + ir + b"\r\n").startswith(b"+OK Logged in")
    auth = next(e for e in d.events if isinstance(e, Authenticate))
    assert auth.mechanism == "PLAIN"
    d2 = Driver()
    greeting(d2)
    assert d2.feed(b"AUTH LOGIN\r\n") == b"+ " + base64.b64encode(b"Username:") + b"\r\n"
    assert d2.feed(base64.b64encode(b"alice@example.test") + b"\r\n").startswith(b"+ ")
    assert d2.feed(base64.b64encode(b"pw with space") + b"\r\n").startswith(b"+OK Logged in")
    d3 = Driver()
    greeting(d3)
    assert d3.feed(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d3.feed(b"*\r\n").startswith(b"-ERR [AUTH] Authentication cancelled")
    assert d3.feed(b"AUTH PLAIN !!!\r\n").startswith(b"-ERR [AUTH]")
    assert d3.feed(b"AUTH CRAM-MD5\r\n").startswith(b"-ERR [AUTH]")
    listing = d3.feed(b"AUTH\r\n")
    assert listing == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert d3.s.state is State.AUTHORIZATION


def test_sasl_long_response_allowed_but_bounded() -> None:
    d = Driver()
    greeting(d)
    d.feed(b"AUTH PLAIN\r\n")
    long = base64.b64encode(b"\x00alice@example.test\x00" + b"p" * 600)
    assert d.feed(long + b"\r\n") == AUTH_FAILED  # a 800-octet response is parsed, then fails normally
    assert d.feed(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.feed(b"A" * 20000 + b"\r\n").startswith(b"-ERR [AUTH] SASL response too long")
    assert d.feed(b"NOOP\r\n").startswith(b"-ERR NOOP not valid")  # back to 255-octet commands


def test_state_table_and_unknown_commands() -> None:
    d = Driver()
    greeting(d)
    for line in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"UIDL", b"TOP 1 1"):
        assert d.feed(line + b"\r\n").startswith(b"-ERR " + line.split()[0] + b" not valid")
    d2 = Driver(Pop3Config(max_errors=100))
    greeting(d2)
    d2.login()
    for line in (b"USER x", b"PASS y", b"AUTH PLAIN", b"APOP a b"):
        assert d2.feed(line + b"\r\n").startswith(b"-ERR")
    assert d2.feed(b"FROB\r\n") == b"-ERR Unknown command\r\n"
    assert d2.feed(b"\r\n") == b"-ERR Empty command\r\n"
    assert d2.feed(b"X" * 300 + b"\r\n") == b"-ERR Line too long\r\n"
    assert d2.feed(b"noop\r\n") == b"+OK\r\n"
    assert d2.s.state is State.TRANSACTION


def test_too_many_errors_closes() -> None:
    d = Driver(Pop3Config(max_errors=3))
    greeting(d)
    out = d.feed(b"A\r\nB\r\nC\r\nD\r\n")
    assert out.count(b"-ERR") == 4 and out.endswith(b"-ERR Too many errors, closing connection\r\n")
    assert d.closed and d.s.state is State.CLOSED
    assert isinstance(d.s.next_event(), Close)


def test_capa_optional_lines() -> None:
    d = Driver(Pop3Config(expire="NEVER", login_delay=30))
    greeting(d)
    capa = d.feed(b"CAPA\r\n").split(b"\r\n")
    assert b"EXPIRE NEVER" in capa and b"LOGIN-DELAY 30" in capa and b"IMPLEMENTATION Postroom" in capa
    d.login()
    capa = d.feed(b"CAPA\r\n").split(b"\r\n")
    assert b"USER" not in capa and b"TOP" in capa


def test_outstanding_event_blocks_parsing() -> None:
    s = Pop3Session(Pop3Config(), plaintext_ok=True)
    s.receive_data(b"USER a\r\nPASS b\r\nSTAT\r\n")
    assert isinstance(s.next_event(), Authenticate)
    with pytest.raises(LocalProtocolError):
        s.next_event()
    with pytest.raises(LocalProtocolError):
        s.message(b"x")
    s.login_ok("a", Maildrop(tuple(DROP), 1))
    assert s.next_event() is NEED_DATA
    assert s.data_to_send().endswith(b"+OK 3 " + str(sum(e.size for e in DROP)).encode() + b"\r\n")


_SCRIPT = [
    b"CAPA",
    b"USER alice@example.test",
    b"PASS pw with space",
    b"STAT",
    b"LIST",
    b"UIDL 2",
    b"RETR 1",
    b"TOP 2 1",
    b"DELE 3",
    b"NOOP",
    b"RSET",
    b"DELE 1",
    b"QUIT",
]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_split_anywhere_same_transcript(data: st.DataObject) -> None:
    """PIPELINING: the whole script in one segment or split anywhere gives the same bytes and events."""
    stream = b"".join(line + b"\r\n" for line in _SCRIPT)
    ref = Driver()
    expected = greeting(ref) + ref.feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    d = Driver()
    got = greeting(d)
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if not d.closed:
            got += d.feed(stream[a:b])
    assert got == expected
    assert d.deleted == ref.deleted == (5,)
    assert [e for e in d.events if e is not NEED_DATA] == [e for e in ref.events if e is not NEED_DATA]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(garbage: bytes) -> None:
    """Arbitrary input only ever produces replies (and a close), never an exception."""
    for plain in (True, False):
        d = Driver(dataclasses.replace(Pop3Config(), max_errors=1000), plaintext_ok=plain, stls_available=True)
        greeting(d)
        d.feed(garbage)
        d2 = Driver(plaintext_ok=True, stls_available=not plain)
        greeting(d2)
        d2.login()
        if not d2.closed:
            d2.feed(garbage)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["DELE", "LIST", "UIDL", "RETR"]), st.integers(0, len(DROP) + 1)),
        st.tuples(st.sampled_from(["STAT", "RSET", "NOOP"]), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_OPS, st.booleans())
def test_model_dele_rset_stat_and_update(ops: list[tuple[str, int | None]], quit_at_end: bool) -> None:
    """Random DELE/RSET/LIST/UIDL/RETR/STAT sequences agree with a two-line model of RFC 1939 §5-§6."""
    d = Driver(Pop3Config(max_errors=1000))
    greeting(d)
    d.login()
    marked: set[int] = set()
    for verb, n in ops:
        out = d.feed(f"{verb} {n}\r\n".encode() if n is not None else f"{verb}\r\n".encode())
        exists = n is not None and 1 <= n <= len(DROP)
        if verb == "DELE":
            assert out.startswith(b"+OK") == (exists and n not in marked)
            if exists and n is not None:
                marked.add(n)
        elif verb == "RSET":
            marked.clear()
        elif verb in ("LIST", "UIDL", "RETR"):
            assert out.startswith(b"+OK") == (exists and n not in marked)
        live = [e for i, e in enumerate(DROP, 1) if i not in marked]
        assert d.feed(b"STAT\r\n") == f"+OK {len(live)} {sum(e.size for e in live)}\r\n".encode()
    if quit_at_end:
        d.feed(b"QUIT\r\n")
        assert d.deleted == (tuple(DROP[i - 1].uid for i in sorted(marked)) if marked else None)
    else:
        assert d.deleted is None  # the connection just ends: nothing is removed
