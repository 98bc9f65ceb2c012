""" "250 means durable", proven the hard way: 20 concurrent SMTP senders, the server process killed with
SIGKILL at random moments over 10+ rounds, restarted each time on the same data directory. Afterwards
every message that got 250 to its final dot must be in the store (once or more), byte for byte intact.

The server runs as a real subprocess (``python -m postroom serve --config …``) on 127.0.0.1 with an
ephemeral port read from its start-up banner.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postroom.store.sqlite import open_store

pytestmark = pytest.mark.slow

DOMAIN = "example.test"
USER = f"alice@{DOMAIN}"
SENDERS = 20
ROUNDS = 10
_PORT_RE = re.compile(rb"listen\s+smtp\s+127\.0\.0\.1:(\d+)")


def make_message(tag: str) -> bytes:
    """~5 KB with its own tag and a digest of the body, so truncation or corruption is detectable."""
    rnd = random.Random(tag)
    body = b"".join(b"%s line %03d %s\r\n" % (tag.encode(), i, rnd.randbytes(24).hex().encode()) for i in range(60))
    digest = hashlib.sha256(body).hexdigest().encode()
    return (
        b"Subject: " + tag.encode() + b"\r\nX-Digest: " + digest + b"\r\n\r\n" + body + b"END " + tag.encode() + b"\r\n"
    )


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed when it exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=out,
    )
    assert proc.stdout is not None
    port = 0
    deadline = time.monotonic() + 30
    banner = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner += line
        m = _PORT_RE.search(line)
        if m:
            port = int(m.group(1))
        if b"ready" in line:
            break
    assert port, f"server did not start: {banner!r}"
    return proc, port


async def sender(port: int, prefix: str, acked: list[str], stop: asyncio.Event) -> None:
    """Send messages over one connection (reconnecting) until the server dies; record every 250'd tag."""
    n = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            await reader.readline()
            writer.write(b"EHLO load.test\r\n")
            while (await reader.readline())[3:4] != b" ":
                pass
            while not stop.is_set():
                tag = f"{prefix}-{n}"
                n += 1
                writer.write(b"MAIL FROM:<load@remote.test>\r\nRCPT TO:<" + USER.encode() + b">\r\nDATA\r\n")
                replies = [await reader.readline() for _ in range(3)]
                if not all(r.startswith((b"250", b"354")) for r in replies):
                    return
                writer.write(make_message(tag) + b".\r\n")
                final = await reader.readline()
                if not final:
                    return
                if final.startswith(b"250"):
                    acked.append(tag)
        except (OSError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def one_round(port: int, rnd: int, proc: subprocess.Popen[bytes], acked: list[str]) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sender(port, f"r{rnd}s{i}", acked, stop)) for i in range(SENDERS)]
    await asyncio.sleep(random.uniform(0.2, 1.0))  # the load runs for a random time: the kill moment
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    stop.set()


def test_kill9_never_loses_a_250(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "postroom.toml"
    config.write_text(
        f'hostname = "mx.{DOMAIN}"\n'
        f'data_dir = "{data}"\n'
        f'domains = ["{DOMAIN}"]\n'
        "workers = 1\n"
        'log_level = "WARNING"\n'
        "[listeners]\n"
        'smtp = ["127.0.0.1:0"]\n'
        "submission = []\nsubmissions = []\npop3 = []\npop3s = []\nimap = []\nimaps = []\nhttp = []\n"
    )
    subprocess.run(
        [sys.executable, "-m", "postroom", "user", "add", USER, "--password-stdin", "--config", str(config)],
        input=b"secret-pass\n",
        check=True,
        capture_output=True,
        timeout=60,
    )
    log = tmp_path / "server.log"
    acked: list[str] = []
    for rnd in range(ROUNDS):
        proc, port = start_server(config, log)
        try:
            asyncio.run(one_round(port, rnd, proc, acked))
        finally:
            proc.kill()
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    assert len(acked) > ROUNDS * 10, f"too little load to prove anything: {len(acked)} messages acked"

    async def stored() -> dict[str, list[bytes]]:
        store = open_store(f"sqlite:///{data / 'store'}")
        await store.open()
        try:
            acct = await store.get_account(USER)
            assert acct is not None
            mb = await store.get_mailbox(acct.id, "INBOX")
            assert mb is not None
            out: dict[str, list[bytes]] = {}
            for meta in await store.messages(mb.id):
                raw = await store.read(meta.blob_id)
                m = re.search(rb"\r\nSubject: (\S+)\r\n", raw)
                assert m is not None, raw[:300]
                out.setdefault(m.group(1).decode(), []).append(raw)
            return out
        finally:
            await store.close()

    found = asyncio.run(stored())
    print(f"acked {len(acked)}, stored {sum(map(len, found.values()))}, unique {len(found)}")
    missing = [t for t in acked if t not in found]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost, e.g. {missing[:5]}"
    for tag, copies in found.items():
        for raw in copies:  # acked or not, nothing stored may be truncated or corrupted
            assert raw.endswith(make_message(tag)), f"{tag} stored truncated or altered"
