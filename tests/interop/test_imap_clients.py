"""Debian's IMAP clients against Postroom: fetchmail (IMAP, STARTTLS and implicit TLS) and curl (imap://
with STARTTLS, imaps://). Skipped when a program is missing, unless POSTROOM_REQUIRE_INTEROP=1."""

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

USER = "dave@example.test"
PASSWORD = "imap-pass-1"
MESSAGES = [
    b"From: a@example.test\r\nTo: dave@example.test\r\nSubject: one\r\nMessage-ID: <1@example.test>\r\n\r\nHi.\r\n",
    b"From: b@example.test\r\nTo: dave@example.test\r\nSubject: two\r\nMessage-ID: <2@example.test>\r\n\r\n"
    + b"".join(b"%05d " % i + b"z" * 70 + b"\r\n" for i in range(1500)),
]


@pytest.fixture
def srv(server_factory: Callable[..., RunningServer]) -> RunningServer:
    s = server_factory(services=["imap", "imaps"])
    s.add_user(USER, PASSWORD)

    async def fill() -> None:
        acct = await s.store.get_account(USER)
        assert acct is not None
        mb = await s.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        for raw in MESSAGES:
            await s.store.append(raw, [AppendTarget(mb.id)])

    s.call(fill())
    return s


def flags(srv: RunningServer) -> list[frozenset[str]]:
    async def go() -> list[frozenset[str]]:
        acct = await srv.store.get_account(USER)
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        return [m.flags for m in await srv.store.messages(mb.id)]

    return srv.call(go())


def run_fetchmail(srv: RunningServer, tmp: Path, *, implicit: bool, keep: bool) -> tuple[int, list[bytes]]:
    fetchmail = require_program("fetchmail")
    home, out = tmp / "home", tmp / "delivered"
    home.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    mda = tmp / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp -p {out} msg.XXXXXXXXXX)"\n')
    mda.chmod(stat.S_IRWXU)
    before = set(out.iterdir())
    args = [
        fetchmail,
        "--nosyslog",
        "--nodetach",
        "--silent",
        "--protocol",
        "IMAP",
        "--service",
        str(srv.ports["imaps" if implicit else "imap"]),
        "--username",
        USER,
        "--pidfile",
        str(home / "fetchmail.pid"),
        "--mda",
        str(mda),
        "--invisible",
        "--norewrite",
        "--sslcertck",
        "--sslcertfile",
        str(srv.cafile),
        "--sslcommonname",
        "localhost",
        "--sslproto",
        "TLS1.2+",
    ]
    args += ["--ssl"] if implicit else []
    args += ["--keep"] if keep else ["--nokeep"]
    args.append(srv.host)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home), "LC_ALL": "C"}
    netrc = home / ".netrc"
    netrc.write_text(f"machine {srv.host} login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    proc = subprocess.run(args, env=env, capture_output=True, timeout=60, check=False)
    if proc.returncode not in (0, 1):
        pytest.fail(f"fetchmail exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    new = sorted(set(out.iterdir()) - before, key=lambda p: p.stat().st_mtime_ns)
    return proc.returncode, [p.read_bytes() for p in new]


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "imaps"])
def test_fetchmail_imap_keep_marks_seen_then_nokeep_deletes(srv: RunningServer, tmp_path: Path, implicit: bool) -> None:
    code, got = run_fetchmail(srv, tmp_path, implicit=implicit, keep=True)
    assert code == 0
    assert sorted(got) == sorted(m.replace(b"\r\n", b"\n") for m in MESSAGES)
    assert all("\\Seen" in f for f in flags(srv))  # IMAP: fetched mail is marked read on the server
    code, again = run_fetchmail(srv, tmp_path, implicit=implicit, keep=True)
    assert (code, again) == (1, [])  # only unseen mail is fetched
    srv.call(_unseen_all(srv))
    code, got = run_fetchmail(srv, tmp_path, implicit=implicit, keep=False)
    assert code == 0 and len(got) == 2
    assert flags(srv) == []  # deleted and expunged


async def _unseen_all(srv: RunningServer) -> None:
    acct = await srv.store.get_account(USER)
    assert acct is not None
    mb = await srv.store.get_mailbox(acct.id, "INBOX")
    assert mb is not None
    await srv.store.set_flags(mb.id, [m.uid for m in await srv.store.messages(mb.id)], "remove", ["\\Seen"])


@pytest.mark.parametrize("scheme", ["imap", "imaps"])
def test_curl_fetches_a_message_and_lists(srv: RunningServer, scheme: str) -> None:
    curl = require_program("curl")
    port = srv.ports[scheme]
    base = [curl, "-sS", "--cacert", str(srv.cafile), "--user", f"{USER}:{PASSWORD}", "--max-time", "30"]
    base += ["--resolve", f"localhost:{port}:127.0.0.1"]
    if scheme == "imap":
        base.append("--ssl-reqd")
    # curl checks the certificate name against the URL host; --resolve pins "localhost" to 127.0.0.1.
    host = f"localhost:{port}"
    res = subprocess.run([*base, f"{scheme}://{host}/INBOX;UID=2"], capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == MESSAGES[1]
    res = subprocess.run([*base, f"{scheme}://{host}/"], capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert b'"/" INBOX' in res.stdout and b"Archive" in res.stdout
    res = subprocess.run(
        [*base, f"{scheme}://{host}/INBOX", "-X", "SEARCH SUBJECT two"], capture_output=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == b"* SEARCH 2"
