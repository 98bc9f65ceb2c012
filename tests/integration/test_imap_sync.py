"""Two sessions on one INBOX (the seed's example), limits and bad input, over real sockets."""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
import time
from collections.abc import Callable

import pytest
from test_imap_basic import PASSWORD, USER, deliver, message

from conftest import RunningServer


class Raw:
    """A line-level IMAP client for transcripts (no sleeps: every read waits for a complete line)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=10)
        self.sock: socket.socket = tls.wrap_socket(sock) if tls else sock
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        m = re.search(rb"\{(\d+)\}$", line)
        if m:  # literal: include it and the rest of the line
            n = int(m.group(1))
            while len(self.buf) < n:
                self.buf += self.sock.recv(65536)
            line += b"\r\n" + self.buf[:n]
            self.buf = self.buf[n:]
            line += self.line()
        return line

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def cmd(self, tag: str, text: str) -> list[bytes]:
        self.send(f"{tag} {text}\r\n".encode())
        return self.until(tag.encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def srv(server_factory: Callable[..., RunningServer]) -> RunningServer:
    s = server_factory(services=["imap", "imaps"], auth={"allow_plaintext_on_loopback": True})
    s.add_user(USER, PASSWORD)
    return s


def login(srv: RunningServer) -> Raw:
    c = Raw(srv.host, srv.ports["imap"])
    assert c.cmd("a", f'LOGIN {USER} "{PASSWORD}"')[-1].startswith(b"a OK")
    return c


def test_idle_session_sees_flag_change_new_mail_and_expunge(srv: RunningServer) -> None:
    for n in range(1, 4):
        deliver(srv, message(n))
    a = imaplib.IMAP4(srv.host, srv.ports["imap"], timeout=10)
    a.login(USER, PASSWORD)
    a.select("INBOX")
    b = login(srv)
    b.cmd("s", "SELECT INBOX")
    b.send(b"i IDLE\r\n")
    assert b.line().startswith(b"+ ")
    start = time.monotonic()
    a.uid("STORE", "2", "+FLAGS", r"(\Seen)")
    assert b.line() == rb"* 2 FETCH (UID 2 FLAGS (\Seen))"
    assert time.monotonic() - start < 5
    deliver(srv, message(4))
    assert b.line() == b"* 4 EXISTS"
    a.store("1", "+FLAGS", r"(\Deleted)")
    assert b.line() == rb"* 1 FETCH (UID 1 FLAGS (\Deleted))"
    a.expunge()
    assert b.line() == b"* 1 EXPUNGE"
    b.send(b"DONE\r\n")
    assert b.until(b"i")[-1].startswith(b"i OK")
    assert b.cmd("f", "FETCH 1:* (UID)")[:-1] == [b"* 1 FETCH (UID 2)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 4)"]
    a.logout()
    b.close()


def test_expunge_is_deferred_during_fetch_and_sent_on_noop(srv: RunningServer) -> None:
    for n in range(1, 3):
        deliver(srv, message(n))
    a, b = login(srv), login(srv)
    a.cmd("s", "SELECT INBOX")
    b.cmd("s", "SELECT INBOX")
    a.cmd("x", r"STORE 1 +FLAGS.SILENT (\Deleted)")
    a.cmd("y", "EXPUNGE")
    out = b.cmd("f", "FETCH 1:* (UID)")  # RFC 9051 §7.5.1: no EXPUNGE during FETCH
    assert not any(b"EXPUNGE" in line for line in out)
    assert b"* 2 FETCH (UID 2)" in out
    out = b.cmd("n", "NOOP")
    assert b"* 1 EXPUNGE" in out
    out = b.cmd("g", "FETCH 1:* (UID)")
    assert out[0] == b"* 1 FETCH (UID 2)"


def test_qresync_reports_vanished(srv: RunningServer) -> None:
    for n in range(1, 3):
        deliver(srv, message(n))
    a, b = login(srv), login(srv)
    b.cmd("e", "ENABLE QRESYNC")
    out = b.cmd("s", "SELECT INBOX")
    modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(out)).group(1))  # type: ignore[union-attr]
    a.cmd("s", "SELECT INBOX")
    a.cmd("x", r"UID STORE 1 +FLAGS.SILENT (\Deleted)")
    a.cmd("y", "UID EXPUNGE 1")
    assert b"* VANISHED 1" in b.cmd("n", "NOOP")
    out = b.cmd("v", f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq - 1} VANISHED)")
    assert out[0] == b"* VANISHED (EARLIER) 1"


def test_starttls_injection_is_not_executed(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory(services=["imap"])
    srv.add_user(USER, PASSWORD)
    c = Raw(srv.host, srv.ports["imap"])
    assert b"LOGINDISABLED" in c.greeting and b"STARTTLS" in c.greeting
    assert b"PRIVACYREQUIRED" in c.cmd("l", f'LOGIN {USER} "{PASSWORD}"')[-1]
    c.send(b"a STARTTLS\r\nb NOOP\r\n")
    assert c.line().startswith(b"a OK")
    tls = srv.client_tls().wrap_socket(c.sock)
    c.sock, c.buf = tls, b""
    out = c.cmd("c", "NOOP")
    assert out == [b"c OK NOOP completed"]  # no "b OK" inside TLS
    assert c.cmd("d", f'LOGIN {USER} "{PASSWORD}"')[-1].startswith(b"d OK")
    c.close()


def test_limits_and_bad_input(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory(
        services=["imap"],
        auth={"allow_plaintext_on_loopback": True},
        imap={"max_line": 8192, "max_literal": 1000, "append_limit": 1000, "max_connections_per_user_ip": 2},
    )
    srv.add_user(USER, PASSWORD)
    c = login(srv)
    # literal over the limit: NO [TOOBIG] before any "+"
    c.send(b"t1 APPEND INBOX {5000}\r\n")
    assert c.line() == b"t1 NO [TOOBIG] Literal of 5000 octets is too large"
    # line too long, then the connection still works
    c.send(b"t2 NOOP " + b"x" * 9000 + b"\r\n")
    assert c.line().startswith(b"t2 BAD [TOOBIG]")
    assert c.cmd("t3", "NOOP")[-1] == b"t3 OK NOOP completed"
    # parenthesis bomb
    assert c.cmd("t4", "NOOP " + "(" * 500)[-1].startswith(b"t4 BAD")
    # NUL in a command
    c.send(b't5 LOGIN "a\x00b" c\r\n')
    assert c.line().startswith(b"t5 BAD")
    # connections per user per IP
    d = login(srv)
    e = Raw(srv.host, srv.ports["imap"])
    assert b"[LIMIT]" in e.cmd("a", f'LOGIN {USER} "{PASSWORD}"')[-1]
    for x in (c, d, e):
        x.close()


def test_authenticate_plain_with_sasl_ir(srv: RunningServer) -> None:
    c = Raw(srv.host, srv.ports["imap"])
    import base64

    token = base64.b64encode(f"\x00{USER}\x00{PASSWORD}".encode()).decode()
    assert c.cmd("a", f"AUTHENTICATE PLAIN {token}")[-1].startswith(b"a OK")
    c.close()
    c = Raw(srv.host, srv.ports["imap"])
    c.send(b"a AUTHENTICATE LOGIN\r\n")
    assert c.line() == b"+ " + base64.b64encode(b"Username:")
    c.send(base64.b64encode(USER.encode()) + b"\r\n")
    assert c.line() == b"+ " + base64.b64encode(b"Password:")
    c.send(base64.b64encode(b"wrong") + b"\r\n")
    assert b"AUTHENTICATIONFAILED" in c.line()
    c.close()


def test_fetch_streams_many_bodies(srv: RunningServer) -> None:
    for n in range(1, 26):
        deliver(srv, message(n) + b"y" * 30000 + b"\r\n")
    c = login(srv)
    c.cmd("s", "EXAMINE INBOX")
    out = c.cmd("f", "FETCH 1:* BODY.PEEK[]")
    assert len(out) == 26 and out[-1].startswith(b"f OK")
    assert out[24].startswith(b"* 25 FETCH (BODY[] {")
    c.close()


def test_timeouts_say_bye(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory(
        services=["imap"],
        auth={"allow_plaintext_on_loopback": True},
        imap={"pre_auth_timeout": 0.3, "idle_timeout": 0.5},
    )
    srv.add_user(USER, PASSWORD)
    c = Raw(srv.host, srv.ports["imap"])
    assert c.line().startswith(b"* BYE Autologout")  # nothing sent before login
    c.close()
    c = login(srv)
    c.cmd("s", "SELECT INBOX")
    c.send(b"i IDLE\r\n")
    assert c.line().startswith(b"+ ")
    assert c.line().startswith(b"* BYE Autologout")  # idle_timeout also bounds IDLE
    c.close()


def test_idle_timeout_counts_from_the_last_command(server_factory: Callable[..., RunningServer]) -> None:
    """The timeout is the wait for the next command: a client busy past it stays; one silent for it goes."""
    srv = server_factory(
        services=["imap"],
        auth={"allow_plaintext_on_loopback": True},
        imap={"pre_auth_timeout": 0.4, "idle_timeout": 0.6},
    )
    srv.add_user(USER, PASSWORD)
    c = Raw(srv.host, srv.ports["imap"])  # reads the greeting
    time.sleep(0.25)
    c.cmd("l", f"LOGIN {USER} {PASSWORD}")  # within pre_auth_timeout
    started = time.monotonic()
    for n in range(6):  # 1.2 s in all, twice the idle timeout, never 0.6 s without a command
        time.sleep(0.2)
        assert c.cmd(f"n{n}", "NOOP")[-1].startswith(f"n{n} OK".encode())
    assert time.monotonic() - started > 1.0
    assert c.line().startswith(b"* BYE Autologout")
    c.close()
