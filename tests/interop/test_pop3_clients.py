"""Debian's POP3 clients against Postroom: fetchmail (STLS and implicit TLS, --keep and not) and curl.

Skipped when a program is missing, unless POSTROOM_REQUIRE_INTEROP=1 (then they fail instead).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import RunningServer, require_program
from postroom.store.api import AppendTarget

pytestmark = pytest.mark.interop

USER = "carol@example.test"
PASSWORD = "s3cret-pass"  # no spaces: .netrc splits on whitespace
MESSAGES = [
    b"From: a@example.test\r\nTo: carol@example.test\r\nSubject: first\r\nMessage-ID: <1@example.test>\r\n"
    b"\r\nHello Carol.\r\n",
    b"From: b@example.test\r\nTo: carol@example.test\r\nSubject: dots\r\nMessage-ID: <2@example.test>\r\n"
    b"\r\n.a line with a leading dot\r\n.\r\n..\r\nend\r\n",
    b"From: c@example.test\r\nTo: carol@example.test\r\nSubject: bigger\r\nMessage-ID: <3@example.test>\r\n\r\n"
    + b"".join(b"%05d " % i + b"y" * 70 + b"\r\n" for i in range(2000)),
]
Factory = Callable[..., RunningServer]


@pytest.fixture
def pop(server_factory: Factory) -> RunningServer:
    srv = server_factory(services=["pop3", "pop3s"])
    srv.add_user(USER, PASSWORD)

    async def fill() -> None:
        acct = await srv.store.get_account(USER)
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        for raw in MESSAGES:
            await srv.store.append(raw, [AppendTarget(mb.id)])

    srv.call(fill())
    return srv


def run_fetchmail(srv: RunningServer, tmp: Path, *, implicit: bool, keep: bool) -> tuple[int, list[bytes]]:
    """Run fetchmail once; returns (exit code, delivered messages in order of delivery)."""
    fetchmail = require_program("fetchmail")
    home = tmp / "home"
    out = tmp / "delivered"
    home.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    mda = tmp / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp -p {out} msg.XXXXXXXXXX)"\n')
    mda.chmod(stat.S_IRWXU)
    before = set(out.iterdir())
    port = srv.ports["pop3s" if implicit else "pop3"]
    args = [
        fetchmail,
        "--nosyslog",
        "--nodetach",
        "--silent",
        "--protocol",
        "POP3",
        "--service",
        str(port),
        "--username",
        USER,
        "--idfile",
        str(home / "fetchids"),
        "--pidfile",
        str(home / "fetchmail.pid"),
        "--mda",
        str(mda),
        "--invisible",  # no Received: header of its own, so the bytes can be compared
        "--norewrite",
        "--sslcertck",
        "--sslcertfile",
        str(srv.cafile),
        "--sslcommonname",
        "localhost",
    ]
    args += ["--ssl", "--sslproto", "TLS1.2+"] if implicit else ["--sslproto", "TLS1.2+"]
    args += ["--keep"] if keep else ["--nokeep"]
    args.append(srv.host)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home), "LC_ALL": "C"}
    # fetchmail reads the password from the terminal or a .netrc; a .netrc keeps it off the command line.
    netrc = home / ".netrc"
    netrc.write_text(f"machine {srv.host} login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    proc = subprocess.run(args, env=env, capture_output=True, timeout=60, check=False)
    new = sorted(set(out.iterdir()) - before, key=lambda p: p.stat().st_mtime_ns)
    if proc.returncode not in (0, 1):
        pytest.fail(f"fetchmail exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc.returncode, [p.read_bytes() for p in new]


def as_delivered(raw: bytes) -> bytes:
    """What an MDA gets from fetchmail: LF line endings (fetchmail strips the CRs for local delivery)."""
    return raw.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_keep_then_nothing_new(pop: RunningServer, tmp_path: Path, implicit: bool) -> None:
    code, got = run_fetchmail(pop, tmp_path, implicit=implicit, keep=True)
    assert code == 0
    assert sorted(got) == sorted(as_delivered(m) for m in MESSAGES)
    assert pop.inbox(USER) == MESSAGES  # --keep: nothing removed
    code, again = run_fetchmail(pop, tmp_path, implicit=implicit, keep=True)
    assert (code, again) == (1, [])  # UIDL remembered: no new mail (exit 1)


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_downloads_and_deletes(pop: RunningServer, tmp_path: Path, implicit: bool) -> None:
    code, got = run_fetchmail(pop, tmp_path, implicit=implicit, keep=False)
    assert code == 0
    assert sorted(got) == sorted(as_delivered(m) for m in MESSAGES)
    assert pop.inbox(USER) == []


def curl(srv: RunningServer, url: str, *extra: str) -> bytes:
    exe = require_program("curl")
    netrc = srv.data_dir / "curl.netrc"
    netrc.write_text(f"machine {srv.host} login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    proc = subprocess.run(
        [exe, "--silent", "--show-error", "-k", "--max-time", "30", "--netrc-file", str(netrc), *extra, url],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@pytest.mark.parametrize("scheme", ["pop3", "pop3s"])
def test_curl_list_retr_top(pop: RunningServer, scheme: str) -> None:
    port = pop.ports[scheme]
    base = f"{scheme}://{pop.host}:{port}/"
    extra = ("--ssl-reqd",) if scheme == "pop3" else ()  # pop3: STLS required before the password
    listing = curl(pop, base, *extra)
    assert listing == b"".join(f"{i} {len(m)}\r\n".encode() for i, m in enumerate(MESSAGES, 1))
    for i, raw in enumerate(MESSAGES, 1):
        assert curl(pop, f"{base}{i}", *extra) == raw
    top = curl(pop, base, "-X", "TOP 2 1", *extra)
    assert top == MESSAGES[1].partition(b"\r\n\r\n")[0] + b"\r\n\r\n.a line with a leading dot\r\n"
    uidl = curl(pop, base, "-X", "UIDL", *extra)
    assert [line.split()[0] for line in uidl.splitlines()] == [b"1", b"2", b"3"]
    assert pop.inbox(USER) == MESSAGES


def test_curl_dele(pop: RunningServer) -> None:
    base = f"pop3s://{pop.host}:{pop.ports['pop3s']}/"
    curl(pop, base, "-X", "DELE 2", "-I")  # -I: no transfer; curl sends QUIT, so the deletion happens
    assert pop.inbox(USER) == [MESSAGES[0], MESSAGES[2]]
