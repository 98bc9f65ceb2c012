"""What the IMAP and POP3 load benchmarks share: the mail corpus, Postroom and Dovecot set-up, process helpers.

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
        # The default log level (INFO) into server.log, as Dovecot logs to its log_path.
        f'hostname = "{DOMAIN}"\ndata_dir = "{data_dir}"\ndomains = ["{DOMAIN}"]\nworkers = {workers}\n'
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


def dovecot_unavailable(anchors: Path) -> str | None:
    """Why the Dovecot peer cannot run here (not installed, not root, no anchor configs), or None."""
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        return "dovecot not installed"
    if os.geteuid() != 0:
        return "dovecot needs root to start its mail processes"
    if not (anchors / "dovecot.conf").exists() or not (anchors / "dovecot-perf.conf").exists():
        return f"no Dovecot anchor configs in {anchors}"
    return None


def write_dovecot_users(base: Path, users: int) -> Path:
    """The passwd-file of the corpus users (``userNN``, the benchmark password), readable by Dovecot."""
    for d in (base.parent, base):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    users_file = base / "users"
    users_file.write_text("".join(f"user{u:02d}:{{PLAIN}}{PASSWORD}::::::\n" for u in range(1, users + 1)))
    users_file.chmod(0o644)
    return users_file


def write_maildirs(mail: Path, users: int, messages: int) -> None:
    """The corpus as one Maildir++ per user, owned by the mail user: LF line ends, as Maildir stores them
    (Dovecot sends CRLF), and the S= (physical) and W= (virtual, CRLF) sizes in the file names that
    Dovecot's performance guides advise."""
    shutil.rmtree(mail, ignore_errors=True)
    host = socket.gethostname()
    for u in range(1, users + 1):
        md = mail / f"user{u:02d}" / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (md / sub).mkdir(parents=True)
        now = int(time.time())
        for n, raw in enumerate(corpus(u, messages)):
            data = raw.replace(b"\r\n", b"\n")
            (md / "cur" / f"{now}.M{n}P1.{host},S={len(data)},W={len(raw)}:2,").write_bytes(data)
    _, _, uid, gid = mail_owner()
    subprocess.run(["chown", "-R", f"{uid}:{gid}", str(mail)], check=True)
    mail.chmod(0o755)


def write_dovecot_conf(
    anchors: Path, base: Path, *, protocol: str, variant: str, port: int, users_file: Path, mail: Path
) -> Path | str:
    """The anchors' ``dovecot.conf`` rewritten for one self-contained instance: only ``protocol`` ("imap" or
    "pop3") on 127.0.0.1:``port``, its own base_dir (``base/run-VARIANT``), log and instance name, the
    corpus users and Maildirs. For ``variant`` "perf" the anchors' ``dovecot-perf.conf`` is laid over it.
    Returns the config to start, or why the anchors no longer fit."""
    user, group, uid, _ = mail_owner()
    run = base / f"run-{variant}"
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o755)
    other = {"imap": "port = 10110", "pop3": "port = 10143"}[protocol]
    mine = {"imap": "port = 10143", "pop3": "port = 10110"}[protocol]
    conf = (anchors / "dovecot.conf").read_text()
    replacements = {
        "protocols = imap pop3": f"protocols = {protocol}",
        "base_dir = /run/dovecot-bench/": f"base_dir = {run}/",
        "instance_name = dovecot-bench": f"instance_name = dovecot-bench-{protocol}-{variant}",
        "log_path = /var/log/dovecot-bench.log": f"log_path = {base}/dovecot-{variant}.log",
        "/etc/dovecot-bench/users": str(users_file),
        "uid=vmail gid=vmail home=/var/vmail-imap/%u": f"uid={user} gid={group} home={mail}/%u",
        mine: f"port = {port}",
        other: "port = 0",
    }
    for old, new in replacements.items():
        if old not in conf:
            return f"anchor dovecot.conf changed: {old!r} not found"
        conf = conf.replace(old, new)
    if uid < 5000:
        conf = conf.replace("first_valid_uid = 5000", f"first_valid_uid = {uid}")
    stock = base / f"dovecot-{variant}-base.conf"
    stock.write_text(conf)
    if variant != "perf":
        return stock
    perf = base / "dovecot-perf.conf"
    overlay = (anchors / "dovecot-perf.conf").read_text()
    perf.write_text(overlay.replace("!include /etc/dovecot-bench/dovecot.conf", f"!include {stock}"))
    return perf


def _dovecot_text(conf: Path) -> str:
    """The config text with ``!include`` lines expanded (one level: the perf config includes its base)."""
    lines = []
    for line in conf.read_text().splitlines():
        lines.append(Path(line.split(None, 1)[1]).read_text() if line.startswith("!include") else line)
    return "\n".join(lines)


def dovecot_port(conf: Path) -> int:
    ports = [line.split("=")[1].strip() for line in _dovecot_text(conf).splitlines() if "port = " in line]
    return next(int(p) for p in ports if p != "0")


def start_dovecot(conf: Path, greeting: bytes) -> int:
    """Start Dovecot with ``conf`` (it daemonizes) and wait for its greeting; returns the master's pid."""
    subprocess.run(["dovecot", "-c", str(conf)], check=True)
    base_dir = next(
        line.split("=", 1)[1].strip() for line in _dovecot_text(conf).splitlines() if line.startswith("base_dir")
    )
    pidfile = Path(base_dir) / "master.pid"
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text().strip())
    wait_port(dovecot_port(conf), None, greeting)
    return pid
