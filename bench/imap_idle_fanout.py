#!/usr/bin/env python3
"""IMAP IDLE notification latency and fan-out (the seed's "read on one PC shows read on every other PC").

1. Latency: session B is in IDLE on INBOX; session A does ``UID STORE 1 +FLAGS (\\Seen)`` then ``-FLAGS``,
   ``--changes`` times; for each change the time from A sending the command to B receiving
   ``* 1 FETCH (... FLAGS ...)`` is recorded (p50/p99/max). Measured twice: A and B on the same Postroom
   process, and A and B on two Postroom processes sharing one data directory (the cross-process feed).
2. Fan-out: ``--idlers`` connections log in, select INBOX and IDLE; the server's RSS is read from /proc;
   then A changes a flag and the time until every idler has received the FETCH is measured.

Only 127.0.0.1 is used; every load is bounded in count and time.

    python bench/imap_idle_fanout.py            # 1,000 changes, 10,000 idle connections
    python bench/imap_idle_fanout.py --quick    # 100 changes, 200 idle connections (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "imap-idle"
USER = "idle@bench.test"
PASSWORD = "benchpass"
MESSAGE = b"From: a@bench.test\r\nTo: idle@bench.test\r\nSubject: idle\r\n\r\nhello\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _prepare(data_dir: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from postroom.auth.passwords import hash_password
    from postroom.store.api import AppendTarget
    from postroom.store.sqlite import open_store

    store = open_store(f"sqlite:///{(data_dir / 'store').resolve()}")
    await store.open()
    try:
        await store.add_domain("bench.test")
        acct = await store.create_account(USER, hash_password(PASSWORD))
        inbox = await store.get_mailbox(acct.id, "INBOX")
        assert inbox is not None
        await store.append(MESSAGE, [AppendTarget(inbox.id)])
    finally:
        await store.close()


def start_server(data_dir: Path, port: int, name: str) -> subprocess.Popen[bytes]:
    config = data_dir / f"{name}.toml"
    config.write_text(
        f'hostname = "bench.test"\ndata_dir = "{data_dir}"\ndomains = ["bench.test"]\nworkers = 1\n'
        'log_level = "WARNING"\n'
        f'[listeners]\nimap = ["127.0.0.1:{port}"]\n'
        "smtp = []\nsubmission = []\nsubmissions = []\npop3 = []\npop3s = []\nimaps = []\nhttp = []\n"
        "[auth]\nallow_plaintext_on_loopback = true\ncache_ttl = 3600.0\n"
        "[imap]\nmax_connections_per_user_ip = 100000\n"
        "[net]\nmax_connections_per_ip = 100000\n"
    )
    log = open(data_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if s.recv(64).startswith(b"* OK"):
                return proc
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the serve process may fork workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        return cls(reader, writer)

    async def cmd(self, line: bytes) -> list[bytes]:
        self.n += 1
        tag = b"t%d" % self.n
        self.writer.write(tag + b" " + line + b"\r\n")
        out: list[bytes] = []
        while True:
            resp = await self.reader.readline()
            if not resp:
                raise ConnectionError("closed")
            if resp.startswith(tag + b" "):
                return out
            out.append(resp)

    async def idle(self) -> None:
        await self.cmd(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
        await self.cmd(b"SELECT INBOX")
        self.writer.write(b"i IDLE\r\n")
        line = await self.reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(line)

    async def wait_fetch(self) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if b"FETCH" in line and b"FLAGS" in line:
                return

    def close(self) -> None:
        self.writer.close()


async def latency(port_a: int, port_b: int, changes: int) -> list[float]:
    a, b = await Conn.open(port_a), await Conn.open(port_b)
    await a.cmd(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    await a.cmd(b"SELECT INBOX")
    await b.idle()
    out: list[float] = []
    for i in range(changes):
        op = b"+FLAGS" if i % 2 == 0 else b"-FLAGS"
        t0 = time.perf_counter()
        seen = asyncio.create_task(b.wait_fetch())
        await a.cmd(b"UID STORE 1 " + op + rb" (\Seen)")
        await asyncio.wait_for(seen, 10)
        out.append(time.perf_counter() - t0)
    a.close()
    b.close()
    return out


async def fanout(port: int, idlers: int, server_pid: int) -> dict[str, float]:
    base = rss_mb(server_pid)
    conns: list[Conn] = []
    sem = asyncio.Semaphore(64)
    t0 = time.perf_counter()

    async def one() -> None:
        async with sem:
            c = await Conn.open(port)
            await c.idle()
            conns.append(c)

    await asyncio.gather(*(one() for _ in range(idlers)))
    setup = time.perf_counter() - t0
    rss = rss_mb(server_pid)
    a = await Conn.open(port)
    await a.cmd(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    await a.cmd(b"SELECT INBOX")
    waits = [asyncio.create_task(c.wait_fetch()) for c in conns]
    c1 = cpu_s(server_pid)
    t1 = time.perf_counter()
    await a.cmd(rb"UID STORE 1 +FLAGS (\Flagged)")
    await asyncio.wait_for(asyncio.gather(*waits), 120)
    spread = time.perf_counter() - t1
    server_cpu = cpu_s(server_pid) - c1
    for c in conns:
        c.close()
    a.close()
    return {
        "idlers": idlers,
        "setup_s": setup,
        "rss_mb": rss,
        "rss_base_mb": base,
        "fanout_s": spread,
        "server_cpu_s": server_cpu,
    }


def summary(name: str, lat: list[float]) -> None:
    lat = sorted(lat)

    def p(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(len(lat) * q))]

    print(
        f"  {name:<14} {len(lat)} changes: p50 {p(0.5):.2f} ms  p99 {p(0.99):.2f} ms  max {1000 * lat[-1]:.2f} ms"
        f"  mean {1000 * statistics.mean(lat):.2f} ms",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--idlers", type=int, default=10_000)
    args = ap.parse_args()
    if args.quick:
        args.changes, args.idlers = 100, 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idlers + 200
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < want:
            print(f"  note: file limit {soft}: idlers reduced", flush=True)
            args.idlers = max(10, soft - 200)
    data_dir = OUT / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    asyncio.run(_prepare(data_dir))
    port1, port2 = free_port(), free_port()
    p1 = start_server(data_dir, port1, "one")
    p2 = start_server(data_dir, port2, "two")
    print(f"IMAP IDLE: {args.changes} changes, {args.idlers} idle connections", flush=True)
    try:
        summary("same process", asyncio.run(latency(port1, port1, args.changes)))
        summary("two processes", asyncio.run(latency(port1, port2, args.changes)))
        res = asyncio.run(fanout(port1, args.idlers, p1.pid))
        print(
            f"  fan-out: {res['idlers']:.0f} idle connections set up in {res['setup_s']:.1f} s; server RSS "
            f"{res['rss_mb']:.0f} MB (idle server {res['rss_base_mb']:.0f} MB); one flag change reached all "
            f"in {1000 * res['fanout_s']:.0f} ms (server CPU meanwhile {1000 * res['server_cpu_s']:.0f} ms)",
            flush=True,
        )
    finally:
        stop(p1)
        stop(p2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
