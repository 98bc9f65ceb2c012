"""The POP3 server with the standard library's poplib (and raw sockets for the abuse cases).

Every server here runs inside the test on 127.0.0.1:0 (the shared ``server_factory`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
import poplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import RunningServer
from postroom.store.api import AppendTarget, Changes

USER = "alice@example.test"
PASSWORD = "correct horse battery"
MESSAGES = [
    b"From: a@example.test\r\nTo: alice@example.test\r\nSubject: one\r\n\r\nHello.\r\n",
    b"From: b@example.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
    b"Subject: big\r\n\r\n" + b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(3000)),
    b"Subject: no final newline\r\n\r\nlast line",
]
Factory = Callable[..., RunningServer]


def deliver(srv: RunningServer, address: str, messages: list[bytes]) -> list[int]:
    """Append ``messages`` to the INBOX of ``address`` through the store API; their UIDs."""

    async def run() -> list[int]:
        acct = await srv.store.get_account(address)
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        uids = []
        for raw in messages:
            [(_, uid)] = await srv.store.append(raw, [AppendTarget(mb.id)])
            uids.append(uid)
        return uids

    return srv.call(run())


def inbox_id(srv: RunningServer, address: str) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        acct = await srv.store.get_account(address)
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        return mb.id, mb.uidvalidity

    return srv.call(run())


@pytest.fixture
def pop(server_factory: Factory) -> Iterator[RunningServer]:
    srv = server_factory(services=["pop3", "pop3s"], auth={"throttle_base_delay": 0.01})
    srv.add_user(USER, PASSWORD)
    deliver(srv, USER, MESSAGES)
    yield srv


def stls_client(srv: RunningServer) -> poplib.POP3:
    client = poplib.POP3(srv.host, srv.ports["pop3"], timeout=10)
    client.stls(srv.client_tls())
    return client


def ssl_client(srv: RunningServer) -> poplib.POP3_SSL:
    return poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)


def joined(lines: list[bytes]) -> bytes:
    """poplib's unstuffed lines back into message bytes (a final CRLF is added by the protocol)."""
    return b"".join(line + b"\r\n" for line in lines)


def expected_bytes(raw: bytes) -> bytes:
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


@pytest.mark.parametrize("how", ["stls", "implicit"])
def test_retrieve_everything_byte_identical(pop: RunningServer, how: str) -> None:
    client = stls_client(pop) if how == "stls" else ssl_client(pop)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
    client.user(USER)
    client.pass_(PASSWORD)
    count, size = client.stat()
    assert (count, size) == (len(MESSAGES), sum(len(m) for m in MESSAGES))
    _, listing, _ = client.list()
    assert listing == [f"{i} {len(m)}".encode() for i, m in enumerate(MESSAGES, 1)]
    one: Any = client.list(2)  # typeshed: a tuple, but with an argument it is the +OK line
    assert one.split()[2] == str(len(MESSAGES[1])).encode()
    _, uidl, _ = client.uidl()
    _, uidvalidity = inbox_id(pop, USER)
    assert uidl == [f"{i} {uidvalidity}.{i}".encode() for i in range(1, len(MESSAGES) + 1)]
    for i, raw in enumerate(MESSAGES, 1):
        _, lines, _ = client.retr(i)
        assert joined(lines) == expected_bytes(raw)
    _, lines, _ = client.top(3, 2)
    header, _, body = MESSAGES[2].partition(b"\r\n\r\n")
    assert joined(lines) == header + b"\r\n\r\n" + b"\r\n".join(body.split(b"\r\n")[:2]) + b"\r\n"
    _, lines, _ = client.top(2, 0)
    assert joined(lines) == MESSAGES[1].partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert client.quit().startswith(b"+OK")
    assert pop.inbox(USER) == MESSAGES  # nothing removed, no flags needed


def test_dele_quit_removes_and_other_sessions_see_expunge(pop: RunningServer) -> None:
    mailbox_id, _ = inbox_id(pop, USER)
    before = pop.call(pop.store.status(mailbox_id)).highestmodseq

    async def watch_for_expunge() -> Changes:
        watch = pop.store.watch(mailbox_id)
        try:
            while True:
                watch.clear()
                changes = await pop.store.changes_since(mailbox_id, before)
                if changes.expunged:
                    return changes
                await asyncio.wait_for(watch.wait(), 20)  # woken by the commit of the POP3 QUIT
        finally:
            watch.close()

    watcher = asyncio.run_coroutine_threadsafe(watch_for_expunge(), pop.loop)
    client = ssl_client(pop)
    client.user(USER)
    client.pass_(PASSWORD)
    client.dele(1)
    client.dele(3)
    assert client.stat()[0] == 2
    client.rset()
    assert client.stat()[0] == 4
    client.dele(1)
    client.dele(3)
    assert pop.inbox(USER) == MESSAGES  # still there before QUIT
    assert b"2 messages left" in client.quit()
    assert pop.inbox(USER) == [MESSAGES[1], MESSAGES[3]]
    changes = watcher.result(20)
    assert changes.expunged == [1, 3]  # what an IMAP session's NOOP/IDLE reports as EXPUNGE/VANISHED


def test_dele_then_dropped_connection_removes_nothing(pop: RunningServer) -> None:
    client = stls_client(pop)
    client.user(USER)
    client.pass_(PASSWORD)
    client.dele(1)
    client.dele(2)
    client.sock.shutdown(socket.SHUT_RDWR)  # no QUIT (poplib's file object still refers to the socket)
    client.close()
    # Logging in again needs the lock, which the server frees only once it has seen the drop.
    again = poll_login(pop)
    assert again.stat()[0] == len(MESSAGES)
    again.quit()
    assert pop.inbox(USER) == MESSAGES


def poll_login(srv: RunningServer, attempts: int = 200) -> poplib.POP3_SSL:
    """Log in, retrying while the maildrop is still [IN-USE] by a session the server is tearing down."""
    for _ in range(attempts):
        client = ssl_client(srv)
        client.user(USER)
        try:
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]
            client.quit()
    raise AssertionError("maildrop lock never released")


def test_maildrop_lock_in_use_and_released(pop: RunningServer) -> None:
    first = ssl_client(pop)
    first.user(USER)
    first.pass_(PASSWORD)
    second = ssl_client(pop)
    second.user(USER)
    with pytest.raises(poplib.error_proto) as info:
        second.pass_(PASSWORD)
    assert info.value.args[0].startswith(b"-ERR [IN-USE]")
    first.quit()
    second.user(USER)
    second.pass_(PASSWORD)  # released by QUIT
    assert second.stat()[0] == len(MESSAGES)
    second.quit()


def test_maildrop_lock_spans_processes(pop: RunningServer) -> None:
    """Another worker process sharing the data directory holds the lock: this worker says [IN-USE]."""
    acct = pop.call(pop.store.get_account(USER))
    assert acct is not None
    code = (
        "import sys; from pathlib import Path; from postroom.pop3.lock import MaildropLock;"
        f"lock = MaildropLock.acquire(Path(sys.argv[1]), {acct.id}); print(lock is not None, flush=True);"
        "sys.stdin.readline(); lock.release()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(pop.data_dir / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
        client = ssl_client(pop)
        client.user(USER)
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            client.pass_(PASSWORD)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
        client.user(USER)
        client.pass_(PASSWORD)
        client.quit()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_auth_sasl_plain_with_initial_response_and_identical_failures(pop: RunningServer) -> None:
    client = ssl_client(pop)
    capa = client.capa()
    assert {"TOP", "UIDL", "USER", "SASL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"} <= set(capa)
    assert capa["SASL"] == ["PLAIN", "LOGIN"] and "STLS" not in capa
    ir = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert client._shortcmd(f"AUTH PLAIN {ir}").startswith(b"+OK")  # type: ignore[attr-defined]
    assert client.stat()[0] == len(MESSAGES)
    client.quit()
    replies = []
    for user, password in ((USER, "wrong"), ("nobody@example.test", PASSWORD)):
        c = ssl_client(pop)
        c.user(user)
        with pytest.raises(poplib.error_proto) as info:
            c.pass_(password)
        replies.append(info.value.args[0])
        c.quit()
    assert replies[0] == replies[1] == b"-ERR [AUTH] Authentication failed"
    assert pop.app.auth.throttle.delay(pop.host) > 0  # the next attempt from this IP is slowed down


def raw_lines(sock: socket.socket | ssl.SSLSocket) -> Iterator[bytes]:
    buf = b""
    while True:
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            yield line
        data = sock.recv(65536)
        if not data:
            if buf:
                yield buf
            return
        buf += data


def test_plaintext_refused_before_stls(pop: RunningServer) -> None:
    client = poplib.POP3(pop.host, pop.ports["pop3"], timeout=10)
    capa = client.capa()
    assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
    with pytest.raises(poplib.error_proto, match=r"Plaintext authentication disallowed"):
        client.user(USER)
    with pytest.raises(poplib.error_proto, match=r"Plaintext"):
        client._shortcmd("AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())  # type: ignore[attr-defined]
    client.quit()


def test_plaintext_allowed_on_loopback_when_configured(server_factory: Factory) -> None:
    srv = server_factory(services=["pop3"], auth={"allow_plaintext_on_loopback": True})
    srv.add_user(USER, PASSWORD)
    deliver(srv, USER, MESSAGES[:1])
    client = poplib.POP3(srv.host, srv.ports["pop3"], timeout=10)
    client.user(USER)
    client.pass_(PASSWORD)
    assert joined(client.retr(1)[1]) == MESSAGES[0]
    client.quit()


def test_stls_injection_gets_no_reply_inside_tls(pop: RunningServer) -> None:
    sock = socket.create_connection((pop.host, pop.ports["pop3"]), timeout=10)
    lines = raw_lines(sock)
    assert next(lines).startswith(b"+OK")
    sock.sendall(b"STLS\r\nCAPA\r\nUSER evil\r\n")  # one segment: CAPA and USER must never run
    assert next(lines) == b"+OK Begin TLS negotiation"
    tls = pop.client_tls().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"QUIT\r\n")
    after = list(raw_lines(tls))
    assert len(after) == 1 and after[0].startswith(b"+OK") and b"signing off" in after[0]


def test_pipelined_commands_answered_in_order(pop: RunningServer) -> None:
    tls = pop.client_tls().wrap_socket(
        socket.create_connection((pop.host, pop.ports["pop3s"]), timeout=10), server_hostname="localhost"
    )
    tls.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nDELE 1\r\nNOOP\r\nRSET\r\nQUIT\r\n".encode())
    data = b"\r\n".join(raw_lines(tls)) + b"\r\n"
    total = sum(len(m) for m in MESSAGES)
    assert data.startswith(b"+OK")
    assert f"+OK {len(MESSAGES)} {total}\r\n+OK {len(MESSAGES[0])} octets\r\n".encode() + MESSAGES[0] in data
    assert data.endswith(
        b"+OK Message 1 deleted\r\n+OK\r\n+OK Maildrop has 4 messages (%d octets)\r\n" % total
        + b"+OK Postroom POP3 server signing off (4 messages left)\r\n"
    )
    assert pop.inbox(USER) == MESSAGES


def test_idle_timeout_closes_and_removes_nothing(server_factory: Factory) -> None:
    # Short, yet with a margin: no pause between this client's commands on a busy CI machine reaches it.
    srv = server_factory(services=["pop3s"], pop3={"idle_timeout": 1.5})
    srv.add_user(USER, PASSWORD)
    deliver(srv, USER, MESSAGES[:2])
    client = ssl_client(srv)
    client.user(USER)
    client.pass_(PASSWORD)
    client.dele(1)
    assert client.sock.recv(10) == b""  # the server closed the idle session (socket timeout: 10 s)
    assert srv.inbox(USER) == MESSAGES[:2]
    poll_login(srv).quit()  # and the lock was released


def test_mark_seen_only_when_configured(server_factory: Factory) -> None:
    for mark in (False, True):
        srv = server_factory(services=["pop3s"], pop3={"mark_seen_on_retr": mark})
        srv.add_user(USER, PASSWORD)
        deliver(srv, USER, MESSAGES[:2])
        client = ssl_client(srv)
        client.user(USER)
        client.pass_(PASSWORD)
        client.top(1, 1)
        client.retr(2)
        client.quit()
        mailbox_id, _ = inbox_id(srv, USER)
        flags = [m.flags for m in srv.call(srv.store.messages(mailbox_id))]
        assert flags == ([frozenset(), frozenset({"\\Seen"})] if mark else [frozenset(), frozenset()])


def test_long_line_and_too_many_errors(pop: RunningServer) -> None:
    tls = pop.client_tls().wrap_socket(
        socket.create_connection((pop.host, pop.ports["pop3s"]), timeout=10), server_hostname="localhost"
    )
    lines = raw_lines(tls)
    next(lines)
    tls.sendall(b"NOOP " + b"x" * 100_000 + b"\r\nCAPA\r\n")
    assert next(lines) == b"-ERR Line too long"
    assert next(lines).startswith(b"+OK Capability")
    tls.sendall(b"BOGUS\r\n" * 20)
    rest = list(lines)
    assert rest[-1] == b"-ERR Too many errors, closing connection"


def test_listing_follows_changes_between_logins(pop: RunningServer) -> None:
    """The per-worker listing cache never serves a stale maildrop: new mail and removals show up."""
    client = ssl_client(pop)
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(MESSAGES)
    client.quit()
    extra = b"Subject: late\r\n\r\narrived between sessions\r\n"
    [uid] = deliver(pop, USER, [extra])
    client = ssl_client(pop)
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(MESSAGES) + 1
    assert joined(client.retr(len(MESSAGES) + 1)[1]) == extra
    client.quit()
    mailbox_id, _ = inbox_id(pop, USER)
    pop.call(pop.store.delete_messages(mailbox_id, [1, uid]))  # e.g. an IMAP client expunged them
    client = ssl_client(pop)
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(MESSAGES) - 1
    assert joined(client.retr(1)[1]) == MESSAGES[1]
    client.quit()


def test_imap_session_sees_pop3_deletions(server_factory: Factory) -> None:
    """A real IMAP session selected on the INBOX gets EXPUNGE responses for what POP3 QUIT removed."""
    import imaplib

    srv = server_factory(services=["pop3s", "imaps"], auth={"throttle_base_delay": 0.01})
    if "imaps" not in srv.ports:
        pytest.skip("IMAP adapter not available")
    srv.add_user(USER, PASSWORD)
    deliver(srv, USER, MESSAGES)
    imap = imaplib.IMAP4_SSL(srv.host, srv.ports["imaps"], ssl_context=srv.client_tls(), timeout=10)
    imap.login(USER, PASSWORD)
    typ, data = imap.select("INBOX")
    assert typ == "OK" and data == [str(len(MESSAGES)).encode()]
    client = ssl_client(srv)
    client.user(USER)
    client.pass_(PASSWORD)
    client.dele(2)
    client.dele(4)
    client.quit()
    expunged: list[Any] = []
    for _ in range(50):  # NOOP until the change feed has delivered both (it is asynchronous)
        typ, _ = imap.noop()
        assert typ == "OK"
        expunged += imap.untagged_responses.pop("EXPUNGE", [])
        if len(expunged) >= 2:
            break
    remaining = list(range(1, len(MESSAGES) + 1))
    for n in expunged:  # each EXPUNGE renumbers the ones after it (RFC 9051 §7.5.1)
        del remaining[int(n) - 1]
    assert remaining == [1, 3]
    typ, found = imap.uid("SEARCH", "ALL")
    assert typ == "OK" and found[0] is not None and found[0].split() == [b"1", b"3"]
    imap.logout()
