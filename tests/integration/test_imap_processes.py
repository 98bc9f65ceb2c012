"""The seed's example across processes: two ``postroom serve`` processes on one data directory; a flag
change made through one is pushed to an IDLE session on the other."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imap_sync import Raw

from postroom.auth.passwords import hash_password
from postroom.store.api import AppendTarget
from postroom.store.sqlite import open_store

pytestmark = pytest.mark.slow

USER = "erin@example.test"
PASSWORD = "two-procs"


async def _prepare(data_dir: Path) -> None:
    store = open_store(f"sqlite:///{(data_dir / 'store').resolve()}")
    await store.open()
    try:
        acct = await store.create_account(USER, hash_password(PASSWORD))
        inbox = await store.get_mailbox(acct.id, "INBOX")
        assert inbox is not None
        await store.append(b"Subject: x\r\n\r\nbody\r\n", [AppendTarget(inbox.id)])
    finally:
        await store.close()


def _serve(data_dir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    config = data_dir / f"{name}.toml"
    config.write_text(
        f'hostname = "mx.example.test"\ndata_dir = "{data_dir}"\ndomains = ["example.test"]\nworkers = 1\n'
        '[listeners]\nimap = ["127.0.0.1:0"]\n'
        "smtp = []\nsubmission = []\nsubmissions = []\npop3 = []\npop3s = []\nimaps = []\nhttp = []\n"
        "[auth]\nallow_plaintext_on_loopback = true\n"
    )
    log = data_dir / f"{name}.log"
    with open(log, "wb") as out:  # a file, not a pipe: the server may log more than a pipe holds
        proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
        )
    port = 0
    deadline = time.monotonic() + 60
    while not port and time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace")
        m = re.search(r"listen\s+imap\s+127\.0\.0\.1:(\d+)", text)
        if m and "ready" in text:
            port = int(m.group(1))
        else:
            time.sleep(0.05)  # polling the server's log for its port, not a timing assumption
    assert port, "server did not report its IMAP port"
    return proc, port


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[int, int]]:
    asyncio.run(_prepare(tmp_path))
    procs = []
    try:
        p1, port1 = _serve(tmp_path, "one")
        procs.append(p1)
        p2, port2 = _serve(tmp_path, "two")
        procs.append(p2)
        yield port1, port2
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_idle_on_one_process_sees_store_on_the_other(two_servers: tuple[int, int]) -> None:
    port1, port2 = two_servers
    a, b = Raw("127.0.0.1", port1), Raw("127.0.0.1", port2)
    assert a.cmd("l", f"LOGIN {USER} {PASSWORD}")[-1].startswith(b"l OK")
    assert b.cmd("l", f"LOGIN {USER} {PASSWORD}")[-1].startswith(b"l OK")
    a.cmd("s", "SELECT INBOX")
    b.cmd("s", "SELECT INBOX")
    b.send(b"i IDLE\r\n")
    assert b.line().startswith(b"+ ")
    assert a.cmd("x", r"UID STORE 1 +FLAGS (\Seen)")[-1].startswith(b"x OK")
    assert b.line() == rb"* 1 FETCH (UID 1 FLAGS (\Seen))"
    b.send(b"DONE\r\n")
    assert b.until(b"i")[-1].startswith(b"i OK")
    a.close()
    b.close()
