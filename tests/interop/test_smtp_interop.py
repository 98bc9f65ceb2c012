"""Debian's mail programs against the SMTP server: swaks (STARTTLS, implicit TLS, AUTH, PIPELINING, a
pipe transport) and msmtp. Skipped when a program is missing, unless POSTROOM_REQUIRE_INTEROP=1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import RunningServer, require_program

pytestmark = pytest.mark.interop

ALICE, ALICE_PW = "alice@example.test", "alice-pass-1"
Factory = Callable[..., RunningServer]

# A byte relay between stdin/stdout and a loopback TCP port, so that swaks --pipe talks to the server.
RELAY = r"""
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
"""


@pytest.fixture
def srv(server_factory: Factory) -> RunningServer:
    s = server_factory(services=["smtp", "submission", "submissions"])
    s.add_user(ALICE, ALICE_PW)
    return s


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_program("swaks")
    return subprocess.run([exe, "--timeout", "20", *args], capture_output=True, text=True, timeout=60, check=False)


def test_swaks_submission_starttls_auth_plain(srv: RunningServer) -> None:
    port = srv.ports["submission"]
    r = swaks(
        "--to", ALICE, "--from", ALICE, "--server", f"127.0.0.1:{port}", "--tls",
        "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", ALICE_PW,
        "--header", "Subject: via swaks 587",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = srv.inbox(ALICE)
    assert b"Subject: via swaks 587" in raw
    assert b"with ESMTPSA id" in raw and b"(using TLSv1." in raw
    assert raw.startswith(b"Return-Path: <alice@example.test>\r\nReceived: from ")


def test_swaks_implicit_tls_465_auth_login(srv: RunningServer) -> None:
    port = srv.ports["submissions"]
    r = swaks(
        "--to", ALICE, "--from", ALICE, "--server", f"127.0.0.1:{port}", "--tlsc",
        "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", ALICE_PW,
        "--header", "Subject: via swaks 465",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = srv.inbox(ALICE)
    assert b"Subject: via swaks 465" in raw and b"(using TLSv1." in raw


def test_swaks_mx_delivery_and_relay_refusal(srv: RunningServer) -> None:
    port = srv.ports["smtp"]
    ok = swaks("--to", ALICE, "--from", "someone@outside.test", "--server", f"127.0.0.1:{port}", "--pipeline")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PIPELINING" in ok.stdout
    relay = swaks("--to", "someone@elsewhere.test", "--from", "x@outside.test", "--server", f"127.0.0.1:{port}")
    assert relay.returncode != 0
    assert "554 5.7.1" in relay.stdout
    assert len(srv.inbox(ALICE)) == 1
    assert srv.call(srv.store.queue_list()) == []


def test_swaks_auth_before_tls_refused(srv: RunningServer) -> None:
    port = srv.ports["submission"]
    r = swaks(
        "--to", ALICE, "--server", f"127.0.0.1:{port}", "--auth", "PLAIN",
        "--auth-user", ALICE, "--auth-password", ALICE_PW,
    )  # fmt: skip
    assert r.returncode != 0
    assert "AUTH" not in r.stdout.split("STARTTLS")[0].split("EHLO", 1)[1]  # not offered in plaintext
    assert srv.inbox(ALICE) == []


def test_swaks_pipe_transport(srv: RunningServer) -> None:
    port = srv.ports["smtp"]
    relay = f"{sys.executable} -c '{RELAY}' {port}"
    r = swaks("--to", ALICE, "--from", "p@outside.test", "--pipe", relay, "--pipeline", "--header", "Subject: piped")
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = srv.inbox(ALICE)
    assert b"Subject: piped" in raw


def test_msmtp_starttls_auth(srv: RunningServer, tmp_path: Path) -> None:
    exe = require_program("msmtp")
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "defaults\n"
        "account test\n"
        "host 127.0.0.1\n"
        f"port {srv.ports['submission']}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {srv.cafile}\n"
        "tls_host_override localhost\n"
        "auth plain\n"
        f"user {ALICE}\n"
        f"password {ALICE_PW}\n"
        f"from {ALICE}\n"
    )
    conf.chmod(0o600)
    message = "From: alice@example.test\nTo: alice@example.test\nSubject: via msmtp\n\nhello from msmtp\n.dot line\n"
    r = subprocess.run(
        [exe, "-C", str(conf), "-a", "test", ALICE],
        input=message,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    [raw] = srv.inbox(ALICE)
    assert raw.endswith(b"hello from msmtp\r\n.dot line\r\n")
    assert b"with ESMTPSA id" in raw
