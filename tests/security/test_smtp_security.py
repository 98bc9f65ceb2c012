"""SMTP security behaviour over real sockets: smuggling, relay tricks, STARTTLS injection, limits, junk.

Each test starts its own server on 127.0.0.1:0 and talks raw SMTP so that exactly the bytes under test
reach the server.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from conftest import RunningServer

ALICE, ALICE_PW = "alice@example.test", "alice-pass-1"
Factory = Callable[..., RunningServer]


class Raw:
    """A raw SMTP client that reads whole replies."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=10)
        self.sock: socket.socket = tls.wrap_socket(sock) if tls else sock
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        """The last line of the next reply, e.g. b"250 2.0.0 OK"."""
        while True:
            line = self._line()
            if line[3:4] != b"-":
                return line

    def cmd(self, data: bytes) -> bytes:
        self.send(data)
        return self.reply()

    def closed(self) -> bool:
        try:
            self._line()
        except (EOFError, ConnectionResetError):
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def srv(server_factory: Factory) -> RunningServer:
    s = server_factory(services=["smtp", "submission"])
    s.add_user(ALICE, ALICE_PW)
    return s


def open_tx(srv: RunningServer) -> Raw:
    c = Raw(srv.host, srv.ports["smtp"])
    assert c.cmd(b"EHLO attacker.test\r\n").startswith(b"250")
    assert c.cmd(b"MAIL FROM:<a@remote.test>\r\n").startswith(b"250")
    assert c.cmd(b"RCPT TO:<alice@example.test>\r\n").startswith(b"250")
    assert c.cmd(b"DATA\r\n").startswith(b"354")
    return c


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r\n.\r\r\n"]


@pytest.mark.parametrize("seq", SMUGGLING, ids=[s.hex() for s in SMUGGLING])
def test_smuggling_sequence_does_not_end_data(srv: RunningServer, seq: bytes) -> None:
    c = open_tx(srv)
    smuggled = b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: fake\r\n\r\nx\r\n"
    c.send(b"Subject: real\r\n\r\nhello" + seq + smuggled + b"\r\n.\r\n")
    reply = c.reply()
    assert reply.startswith(b"550 5.6.11")
    assert c.cmd(b"NOOP\r\n").startswith(b"250")  # in sync: the smuggled lines were data, not commands
    c.close()
    assert srv.inbox(ALICE) == []


def test_nul_before_dot_is_not_an_end(srv: RunningServer) -> None:
    c = open_tx(srv)
    c.send(b"Subject: nul\r\n\r\nbefore\r\n\x00.\r\nafter\r\n.\r\n")
    assert c.reply().startswith(b"250")
    [raw] = srv.inbox(ALICE)
    assert raw.endswith(b"before\r\n\x00.\r\nafter\r\n")


@pytest.mark.parametrize(
    ("rcpt", "expect"),
    [
        (b"<@example.test:someone@elsewhere.test>", b"554 5.7.1"),  # source route to a remote mailbox
        (b"<someone%elsewhere.test@example.test>", b"550 5.1.1"),  # percent hack: a local unknown user
        (b"<elsewhere.test!someone@example.test>", b"550 5.1.1"),  # bang path: also just a local part
        (b"<elsewhere.test!someone>", b"501 5.1.3"),  # bang path without a domain
        (b'<"someone@elsewhere.test"@example.test>', b"550 5.1.1"),  # quoted local part stays local
        (b"<someone@elsewhere.test@example.test>", b"501 5.1.3"),  # double @
        (b"<alice@[127.0.0.1]>", b"554 5.7.1"),  # address literal: never local
        (b"<someone@elsewhere.test.>", b"501 5.1.3"),
        (b"<@elsewhere.test:alice@example.test>", b"250 2.1.5"),  # route dropped: really for alice
    ],
)
def test_relay_tricks_on_mx(srv: RunningServer, rcpt: bytes, expect: bytes) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    c.cmd(b"EHLO attacker.test\r\n")
    c.cmd(b"MAIL FROM:<a@remote.test>\r\n")
    assert c.cmd(b"RCPT TO:" + rcpt + b"\r\n").startswith(expect)
    c.close()
    assert srv.call(srv.store.queue_list()) == []


def test_starttls_injection_is_discarded(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["submission"])
    c.cmd(b"EHLO c\r\n")
    # Everything after STARTTLS in the same packet must never run inside TLS (CVE-2011-0411 class).
    c.send(b"STARTTLS\r\nMAIL FROM:<alice@example.test>\r\nRSET\r\n")
    assert c.reply().startswith(b"220")
    assert c.buf == b""
    tls = srv.client_tls().wrap_socket(c.sock)
    c.sock, c.buf = tls, b""
    # Had MAIL/RSET been kept, their replies would come first. EHLO is required again.
    assert c.cmd(b"MAIL FROM:<alice@example.test>\r\n").startswith(b"503 5.5.1")
    c.send(b"EHLO c\r\n")
    lines = []
    while True:
        line = c._line()
        lines.append(line)
        if line[3:4] == b" ":
            break
    assert b"250-AUTH PLAIN LOGIN" in lines or b"250 AUTH PLAIN LOGIN" in lines
    assert not any(b"STARTTLS" in x for x in lines)
    c.close()


def test_auth_before_starttls_refused(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["submission"])
    c.cmd(b"EHLO c\r\n")
    creds = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode())
    assert c.cmd(b"AUTH PLAIN " + creds + b"\r\n").startswith(b"530 5.7.0")
    assert c.cmd(b"AUTH LOGIN\r\n").startswith(b"530 5.7.0")
    c.close()


def test_starttls_after_auth_refused(server_factory: Factory) -> None:
    srv = server_factory(services=["submission"], auth={"allow_plaintext_on_loopback": True})
    srv.add_user(ALICE, ALICE_PW)
    c = Raw(srv.host, srv.ports["submission"])
    c.cmd(b"EHLO c\r\n")
    creds = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode())
    assert c.cmd(b"AUTH PLAIN " + creds + b"\r\n").startswith(b"235")
    assert c.cmd(b"STARTTLS\r\n").startswith(b"503 5.5.1")
    c.close()


def test_vrfy_and_expn_reveal_nothing(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    c.cmd(b"EHLO c\r\n")
    known = c.cmd(b"VRFY alice@example.test\r\n")
    unknown = c.cmd(b"VRFY nobody@example.test\r\n")
    assert known == unknown and known.startswith(b"252")
    assert c.cmd(b"EXPN alice\r\n").startswith(b"502")
    c.close()


def test_line_limits(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    c.cmd(b"EHLO c\r\n")
    assert c.cmd(b"NOOP " + b"a" * 600 + b"\r\n").startswith(b"500 5.5.6")
    assert c.cmd(b"NOOP\r\n").startswith(b"250")
    c.close()
    c = open_tx(srv)
    c.send(b"Subject: long\r\n\r\n" + b"x" * 1001 + b"\r\n.\r\n")
    assert c.reply().startswith(b"550 5.6.0")
    assert c.cmd(b"NOOP\r\n").startswith(b"250")
    c.close()
    assert srv.inbox(ALICE) == []


def test_max_recipients(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    c.cmd(b"EHLO c\r\n")
    c.cmd(b"MAIL FROM:<a@remote.test>\r\n")
    c.send(b"RCPT TO:<alice@example.test>\r\n" * 101)
    got = [c.reply() for _ in range(101)]
    assert all(r.startswith(b"250") for r in got[:100])
    assert got[100].startswith(b"452 4.5.3")
    c.close()


def test_oversize_message_then_session_usable(server_factory: Factory) -> None:
    srv = server_factory(services=["smtp"], smtp={"max_message_size": 2000})
    srv.add_user(ALICE, ALICE_PW)
    c = Raw(srv.host, srv.ports["smtp"])
    c.cmd(b"EHLO c\r\n")
    assert c.cmd(b"MAIL FROM:<a@remote.test> SIZE=2001\r\n").startswith(b"552")
    c.cmd(b"MAIL FROM:<a@remote.test>\r\n")
    c.cmd(b"RCPT TO:<alice@example.test>\r\n")
    c.cmd(b"DATA\r\n")
    c.send((b"y" * 78 + b"\r\n") * 100 + b".\r\n")
    assert c.reply().startswith(b"552 5.3.4")
    c.cmd(b"MAIL FROM:<a@remote.test>\r\n")
    c.cmd(b"RCPT TO:<alice@example.test>\r\n")
    c.cmd(b"DATA\r\n")
    assert c.cmd(b"small\r\n.\r\n").startswith(b"250")
    c.close()
    assert len(srv.inbox(ALICE)) == 1


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1", b"POST /submit HTTP/1.1", b"CONNECT 127.0.0.1:25 HTTP/1.1"])
def test_http_first_command_closes(srv: RunningServer, first: bytes) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    assert c.cmd(first + b"\r\nHost: x\r\n\r\n").startswith(b"554 5.7.0")
    assert c.closed()


def test_error_limit_closes(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["smtp"])
    c.send(b"JUNK\r\n" * 12)
    got = [c.reply() for _ in range(11)]
    assert all(r.startswith(b"500") for r in got[:10])  # max_errors = 10
    assert got[10].startswith(b"421 4.7.0")
    assert c.closed()


def test_idle_client_times_out(server_factory: Factory) -> None:
    srv = server_factory(services=["smtp"], smtp={"command_timeout": 0.5})
    c = Raw(srv.host, srv.ports["smtp"])
    assert c.reply().startswith(b"421 4.4.2")
    assert c.closed()


def test_trickling_client_hits_the_command_deadline(server_factory: Factory) -> None:
    """One byte every 0.1 s never completes a command within the 0.6 s deadline: 421 while still typing."""
    srv = server_factory(services=["smtp"], smtp={"command_timeout": 0.6})
    c = Raw(srv.host, srv.ports["smtp"])
    c.sock.settimeout(0.1)
    start = time.monotonic()
    got = b""
    for byte in b"NOOP and more and more and more and more\r\n":
        try:
            c.send(bytes([byte]))
            got = c.sock.recv(1000)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if got:
            break
    assert got.startswith(b"421 4.4.2"), got
    assert time.monotonic() - start < 3.0


def test_garbage_instead_of_tls_handshake_just_closes(srv: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    c = Raw(srv.host, srv.ports["submission"])
    c.cmd(b"EHLO c\r\n")
    assert c.cmd(b"STARTTLS\r\n").startswith(b"220")
    c.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert c.closed()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_stalled_data_times_out(server_factory: Factory) -> None:
    srv = server_factory(services=["smtp"], smtp={"data_timeout": 0.5})
    srv.add_user(ALICE, ALICE_PW)
    c = open_tx(srv)
    c.send(b"Subject: stalled\r\n\r\nhalf a mess")
    assert c.reply().startswith(b"421 4.4.2")
    assert c.closed()
    assert srv.inbox(ALICE) == []


def test_data_deadline_bounds_a_trickled_message(server_factory: Factory) -> None:
    """Bytes keep arriving (no idle timeout), but the whole message must arrive within data_deadline."""
    srv = server_factory(services=["smtp"], smtp={"data_timeout": 5.0, "data_deadline": 0.6})
    srv.add_user(ALICE, ALICE_PW)
    c = open_tx(srv)
    c.sock.settimeout(0.1)
    start = time.monotonic()
    got = b""
    while time.monotonic() - start < 5:
        try:
            c.send(b"x")
            got = c.sock.recv(1000)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if got:
            break
    assert got.startswith(b"421 4.4.2"), got
    assert srv.inbox(ALICE) == []
