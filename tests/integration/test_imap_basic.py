"""IMAP with the standard library's imaplib against a real server on 127.0.0.1:0."""

from __future__ import annotations

import contextlib
import imaplib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import RunningServer

USER = "alice@example.test"
PASSWORD = "correct horse"


def message(n: int, subject: str = "hello") -> bytes:
    return (
        f"From: Bob <bob@example.test>\r\nTo: {USER}\r\nSubject: {subject} {n}\r\n"
        f"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <{n}@example.test>\r\n\r\n"
        f"body of message {n}\r\nsecond line\r\n"
    ).encode()


@pytest.fixture
def srv(server_factory: Callable[..., RunningServer]) -> RunningServer:
    s = server_factory(services=["imap", "imaps"], auth={"allow_plaintext_on_loopback": True})
    s.add_user(USER, PASSWORD)
    return s


def deliver(srv: RunningServer, raw: bytes, analyze: bool = True) -> None:
    """Append ``raw`` to the INBOX; ``analyze=False`` as SMTP delivery does (analysed at the first read)."""

    async def go() -> None:
        from postroom.store.api import AppendTarget

        acct = await srv.store.get_account(USER)
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        await srv.store.append(raw, [AppendTarget(mb.id)], analyze=analyze)

    srv.call(go())


@pytest.fixture
def imap(srv: RunningServer) -> Iterator[imaplib.IMAP4]:
    c = imaplib.IMAP4(srv.host, srv.ports["imap"], timeout=10)
    c.login(USER, PASSWORD)
    yield c
    with contextlib.suppress(imaplib.IMAP4.error, OSError):
        c.logout()


@pytest.mark.parametrize("analyze", [True, False], ids=["analysed", "deferred"])
def test_login_select_fetch_store_search(srv: RunningServer, imap: imaplib.IMAP4, analyze: bool) -> None:
    data: Any
    for n in range(1, 4):
        deliver(srv, message(n), analyze)
    typ, data = imap.select("INBOX")
    assert typ == "OK" and data == [b"3"]
    typ, data = imap.fetch("1:*", "(FLAGS UID RFC822.SIZE)")
    assert typ == "OK" and len(data) == 3
    assert b"UID 1" in data[0] and b"RFC822.SIZE" in data[0]
    typ, data = imap.uid("FETCH", "2", "(BODY.PEEK[])")
    assert typ == "OK"
    assert isinstance(data[0], tuple) and data[0][1] == message(2)
    typ, data = imap.search(None, "UNSEEN")
    assert data == [b"1 2 3"]
    typ, data = imap.uid("STORE", "2", "+FLAGS", r"(\Seen)")
    assert typ == "OK" and b"\\Seen" in data[0]
    assert imap.search(None, "UNSEEN")[1] == [b"1 3"]
    assert imap.search(None, "SUBJECT", '"hello 3"')[1] == [b"3"]
    assert imap.search(None, "BODY", "message")[1] == [b"1 2 3"]  # the store's full-text index
    assert imap.search(None, "TEXT", '"bob@example.test"')[1] == [b"1 2 3"]
    assert imap.search(None, "BODY", "nowhere")[1] == [b""]
    typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert isinstance(data[0], tuple) and data[0][1] == b"Subject: hello 1\r\n\r\n"
    # BODY[] (not PEEK) sets \Seen
    imap.fetch("3", "(BODY[TEXT])")
    assert imap.search(None, "UNSEEN")[1] == [b"1"]


@pytest.mark.parametrize("analyze", [True, False], ids=["analysed", "deferred"])
def test_envelope_and_bodystructure(srv: RunningServer, imap: imaplib.IMAP4, analyze: bool) -> None:
    deliver(srv, message(1), analyze)
    imap.select("INBOX", readonly=True)
    data: Any
    typ, data = imap.fetch("1", "(ENVELOPE BODYSTRUCTURE)")
    assert typ == "OK"
    line = data[0] if isinstance(data[0], bytes) else data[0][0]
    assert b'"hello 1"' in line
    assert b'(("Bob" NIL "bob" "example.test"))' in line
    assert b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT"' in line


def test_logindisabled_before_starttls(srv: RunningServer) -> None:
    srv2_caps: tuple[str, ...]
    c = imaplib.IMAP4(srv.host, srv.ports["imap"], timeout=10)
    try:
        srv2_caps = c.capabilities
        # loopback plaintext is allowed in this fixture, so LOGIN is offered; STARTTLS too
        assert "STARTTLS" in srv2_caps
        c.starttls(ssl_context=srv.client_tls())
        typ, _ = c.login(USER, PASSWORD)
        assert typ == "OK"
    finally:
        c.logout()


def test_imaps_and_append_copy_move_expunge(srv: RunningServer) -> None:
    data: Any
    c = imaplib.IMAP4_SSL(srv.host, srv.ports["imaps"], ssl_context=srv.client_tls(), timeout=10)
    try:
        c.login(USER, PASSWORD)
        typ, data = c.append("INBOX", r"(\Flagged)", None, message(7))
        assert typ == "OK" and b"APPENDUID" in data[0]
        c.select("INBOX")
        typ, data = c.uid("COPY", "1", "Archive")
        assert typ == "OK"
        typ, data = c.uid("MOVE", "1", "Trash")
        assert typ == "OK"
        assert c.select("INBOX")[1] == [b"0"]
        assert c.select("Trash")[1] == [b"1"]
        c.store("1", "+FLAGS", r"(\Deleted)")
        typ, data = c.expunge()
        assert data == [b"1"]
        typ, data = c.list()
        assert typ == "OK" and any(b"\\Sent" in d and b"Sent" in d for d in data if isinstance(d, bytes))
        typ, data = c.status("Archive", "(MESSAGES UIDNEXT)")
        assert b"MESSAGES 1" in data[0]
    finally:
        c.logout()
