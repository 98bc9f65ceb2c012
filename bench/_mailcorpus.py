"""What the IMAP and POP3 load benchmarks share: the mail corpus, Postroom set-up, and process helpers.

Both benchmarks give Postroom and Dovecot the same ``users`` x ``messages`` corpus (4.5-5.7 KB messages,
CRLF, seeded so every run and both benchmarks see the same bytes). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "benchpass"
DOMAIN = "bench.test"
SEED = 1939
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps", "http")


# -- the mail ------------------------------------------------------------------------------------
def make_message(rng: random.Random, user: int, n: int) -> bytes:
    """One message of 4.5-5.7 KB with CRLF line endings (a few body lines start with a dot)."""
    words = ("invoice", "statement", "account", "payment", "total", "period", "balance", "reference", "due")
    head = (
        f"From: Sender {n % 17} <sender{n % 17}@example.net>\r\n"
        f"To: user{user:02d}@{DOMAIN}\r\n"
        f"Subject: Statement {n} for user{user:02d}\r\n"
        f"Date: Thu, 26 Nov 2026 12:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{user}.{n}@bench.example.net>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    target = rng.randint(4500, 5700)
    lines: list[bytes] = []
    size = len(head)
    while size < target:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 11)))
        if rng.random() < 0.03:
            line = "." + line
        data = line.encode() + b"\r\n"
        lines.append(data)
        size += len(data)
    return head + b"".join(lines)


def corpus(user: int, count: int) -> list[bytes]:
    rng = random.Random(SEED * 1000 + user)
    return [make_message(rng, user, n) for n in range(count)]


# -- Postroom ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, greeting: bytes, timeout: float = 60.0) -> None:
    """Wait until 127.0.0.1:``port`` answers with ``greeting`` (b"* OK", b"+OK" …)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if s.recv(64).startswith(greeting):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


async def _fill_postroom(data_dir: Path, users: int, messages: int) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from postroom.auth.passwords import hash_password
    from postroom.store.api import AppendTarget
    from postroom.store.sqlite import open_store

    store = open_store(f"sqlite:///{(data_dir / 'store').resolve()}")
    await store.open()
    try:
        await store.add_domain(DOMAIN)
        pw_hash = hash_password(PASSWORD)
        sem = asyncio.Semaphore(64)
        for u in range(1, users + 1):
            acct = await store.create_account(f"user{u:02d}@{DOMAIN}", pw_hash)
            inbox = await store.get_mailbox(acct.id, "INBOX")
            assert inbox is not None
            target = [AppendTarget(inbox.id)]

            async def one(raw: bytes, target: list[AppendTarget] = target) -> None:
                async with sem:
                    await store.append(raw, target)

            await asyncio.gather(*(one(raw) for raw in corpus(u, messages)))
    finally:
        await store.close()


def prepare_postroom(out: Path, users: int, messages: int) -> Path:
    """A Postroom data directory under ``out`` holding the corpus (made once, reused by later runs)."""
    data_dir = out / f"postroom-{users}x{messages}"
    marker = data_dir / "complete"
    if marker.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    t0 = time.monotonic()
    asyncio.run(_fill_postroom(data_dir, users, messages))
    marker.write_text("ok\n")
    print(f"  postroom store: {users} x {messages} messages in {time.monotonic() - t0:.1f} s", flush=True)
    return data_dir


def start_postroom(
    data_dir: Path, port: int, workers: int, service: str, greeting: bytes
) -> tuple[subprocess.Popen[bytes], Path]:
    """``postroom serve`` with only ``service`` listening, on 127.0.0.1:``port``."""
    others = [s for s in SERVICES if s != service]
    config = data_dir / "bench.toml"
    config.write_text(
        f'hostname = "{DOMAIN}"\ndata_dir = "{data_dir}"\ndomains = ["{DOMAIN}"]\nworkers = {workers}\n'
        'log_level = "WARNING"\n'
        f'[listeners]\n{service} = ["127.0.0.1:{port}"]\n'
        + "".join(f"{s} = []\n" for s in others)
        +
        # Dovecot's bench users are {PLAIN}: no hashing cost at all. Postroom verifies argon2id once per
        # user and worker, then serves logins from its verified-credential cache (like auth_cache).
        "[auth]\nallow_plaintext_on_loopback = true\ncache_ttl = 3600.0\n"
    )
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    wait_port(port, proc, greeting)
    return proc, config


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Dovecot ---------------------------------------------------------------------------------------
def mail_owner() -> tuple[str, str, int, int]:
    """The uid Dovecot's mail processes run as: the anchors' ``vmail`` when it exists, else ``nobody``."""
    import grp
    import pwd

    for user in ("vmail", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(user)
            return user, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_uid, pw.pw_gid
    raise RuntimeError("no vmail or nobody user")


def stop_dovecot(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
