"""Postroom's queue delivering to a real Postfix as the receiving MX (Debian's package, started here).

Postfix runs from its own config and queue directories under a fresh temporary directory, its smtpd on a
free port of 127.0.0.1 with STARTTLS (the test certificate) and virtual Maildir delivery for b.test. The
master runs in the foreground as our child (``master -c DIR -d``) and is ended by its PID.
"""

from __future__ import annotations

import asyncio
import email
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from conftest import require_program, server_tls_context
from postroom.app import App
from postroom.auth.passwords import hash_password
from postroom.auth.service import Authenticator
from postroom.config import Config, ListenersConfig
from postroom.delivery.dkimsign import keygen
from postroom.delivery.limits import DeliveryConfig
from postroom.delivery.routing import Lookup, NoSuchDomain
from postroom.delivery.runner import QueueRunner
from postroom.store.api import OutboundEnvelope, OutboundRecipient
from postroom.store.sqlite import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the benchmarks' Postfix service table
from _postfix import master_cf

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/lib
command_directory = {command_directory}
daemon_directory = {daemon_directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.b.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
virtual_mailbox_domains = b.test
virtual_mailbox_base = {root}/vmail
virtual_mailbox_maps = inline:{{ bob@b.test=b.test/bob/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 100
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_received_header = yes
"""

QUEUE_DIRS = (
    "active",
    "bounce",
    "corrupt",
    "defer",
    "deferred",
    "flush",
    "hold",
    "incoming",
    "private",
    "saved",
    "trace",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postconf(name: str) -> str:
    out = subprocess.run(["postconf", "-d", "-h", name], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture
def postfix_mx(tls_files: tuple[Path, Path]) -> Iterator[tuple[int, Path]]:
    require_program("postfix")
    require_program("postconf")
    if os.geteuid() != 0:
        pytest.skip("Postfix's master must start as root")
    import grp
    import pwd

    pwd.getpwnam("postfix")  # the package created its user
    nobody = pwd.getpwnam("nobody")
    postdrop = grp.getgrnam("postdrop").gr_gid
    postfix_uid = pwd.getpwnam("postfix").pw_uid
    root = Path(tempfile.mkdtemp(prefix="postroom-pfx-"))
    root.chmod(0o755)  # the postfix user and the mailbox owner must reach their directories
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = _free_port()
        etc, spool, lib, vmail, tls = (root / n for n in ("etc", "spool", "lib", "vmail", "tls"))
        for d in (etc, spool, lib, vmail, tls):
            d.mkdir()
        cert, key = tls / "cert.pem", tls / "key.pem"
        shutil.copy(tls_files[0], cert)
        shutil.copy(tls_files[1], key)
        os.chown(lib, postfix_uid, -1)
        os.chown(vmail, nobody.pw_uid, nobody.pw_gid)
        for name in QUEUE_DIRS:
            (spool / name).mkdir(mode=0o700)
            os.chown(spool / name, postfix_uid, -1)
        (spool / "pid").mkdir(mode=0o755)
        for name, mode in (("maildrop", 0o730), ("public", 0o710)):
            (spool / name).mkdir()
            os.chown(spool / name, postfix_uid, postdrop)
            (spool / name).chmod(mode)
        daemon_directory = _postconf("daemon_directory")
        (etc / "main.cf").write_text(
            MAIN_CF.format(
                root=root,
                command_directory=_postconf("command_directory"),
                daemon_directory=daemon_directory,
                uid=nobody.pw_uid,
                gid=nobody.pw_gid,
                cert=cert,
                key=key,
            )
        )
        (etc / "master.cf").write_text(master_cf(f"127.0.0.1:{port} inet n - n - - smtpd"))
        proc = subprocess.Popen([f"{daemon_directory}/master", "-c", str(etc), "-d"], start_new_session=True)
        deadline = time.monotonic() + 20
        while True:  # wait until smtpd accepts connections (bounded)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"postfix did not start (exit {proc.poll()})")
                time.sleep(0.05)
        yield port, vmail
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


class ToLoopback(Lookup):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        if domain != "b.test":
            raise NoSuchDomain(domain)
        return [(10, "mx.b.test")]

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]


@pytest.fixture
async def sender_a(tmp_path: Path, tls_files: tuple[Path, Path], postfix_mx: tuple[int, Path]) -> AsyncIterator[App]:
    cfg = Config(
        hostname="mx.a.test",
        data_dir=str(tmp_path / "a"),
        domains=("a.test",),
        listeners=ListenersConfig(),
        delivery=DeliveryConfig(smtp_port=postfix_mx[0], tls_policy="require", connect_timeout=5.0),
        source="<test>",
    )
    store = open_store(cfg.store_url)
    await store.open()
    await store.create_account("alice@a.test", hash_password("pw-alice-123"))
    app = App(cfg, store, Authenticator(store, cfg.auth), server_tls_context(*tls_files))
    yield app
    await store.close()


async def _maildir_files(directory: Path, timeout: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(directory.glob("*")) if directory.is_dir() else []
        if files:
            return files
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing delivered to {directory}")
        await asyncio.sleep(0.05)


async def test_delivery_to_postfix(sender_a: App, postfix_mx: tuple[int, Path]) -> None:
    app = sender_a
    _port, vmail = postfix_mx
    records = dict(keygen(app.config.data_path, "a.test", app.config.delivery.dkim_selector))
    runner = QueueRunner(app, lookup=ToLoopback())
    body = (
        b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: to postfix\r\n"
        b"Message-ID: <pf1@a.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n.dot\r\nbare\nlf\r\n"
    )
    env = OutboundEnvelope(
        "alice@a.test", (OutboundRecipient("bob@b.test"), OutboundRecipient("nobody@b.test")), eight_bit=True
    )
    await app.store.append(body, [], outbound=env)
    assert await runner.run_once() == 2
    await runner.stop()
    (path,) = await _maildir_files(vmail / "b.test" / "bob" / "new")
    delivered = path.read_bytes()
    parsed: Any = email.message_from_bytes(delivered)
    assert parsed["Subject"] == "to postfix"
    received = parsed.get_all("Received")[0]
    assert "mx.a.test" in received and "using TLS" in received  # Postfix's smtpd_tls_received_header
    assert "\n.dot\n" in delivered.decode() and "\nbare\nlf\n" in delivered.decode()  # unstuffed, CRLF ok

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value else None

    crlf = delivered.replace(b"\n", b"\r\n")
    assert dkim.verify(crlf, dnsfunc=dnsfunc)
    states = {e.recipient: e for e in await app.store.queue_list()}
    assert states["bob@b.test"].status == "delivered" and states["bob@b.test"].last_reply.startswith("250")
    assert states["nobody@b.test"].status == "failed" and states["nobody@b.test"].last_reply.startswith("550")
    acct = await app.store.get_account("alice@a.test")
    assert acct is not None
    inbox = await app.store.get_mailbox(acct.id, "INBOX")
    assert inbox is not None
    (meta,) = await app.store.messages(inbox.id)
    report = await app.store.read(meta.blob_id)
    assert b"Final-Recipient: rfc822; nobody@b.test" in report and b"Status: 5.1.1" in report
    assert b"bob@b.test" not in report.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]
