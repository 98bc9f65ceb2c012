"""Relay throughput: drain a full outbound queue to Postfix's ``smtp-sink`` on loopback, Postroom vs Postfix.

Both sides get the same load: N messages (default 10,000, ~2 KB each) from sender@a.test to 100 recipient
domains (user@dNNN.test), one recipient each. Each side's queue is filled first with delivery held back,
then released; the clock runs from the release until a fresh ``smtp-sink`` (started per run, counting with
``-c``) has received all N messages.

- **Postroom**: the SQLite store's durable queue (``store.append(..., outbound=...)``), the QueueRunner with
  its MX routing through an authoritative DNS server on 127.0.0.1 (dnslib; d000..d099.test MX -> the sink's
  address), ``smtp_port`` = the sink's port, connection reuse, PIPELINING. DKIM off (Postfix does not sign).
  "recorded" additionally waits until every entry is marked delivered in the store.
- **Postfix**: Debian's Postfix, own config/queue dirs, started here (``master -c DIR -d``), its durable queue,
  defaults otherwise; mail injected over SMTP with ``HOLD`` (check_client_access), released with
  ``postsuper -H ALL``; ``transport_maps`` sends every domain to ``smtp:[127.0.0.1]:SINKPORT``.

Usage: ``python bench/relay_throughput.py`` (full) or ``--quick`` (a few hundred messages, a few seconds).
A missing ``smtp-sink``/``postfix`` (or not running as root, which Postfix's master needs) skips that
side with a message and still exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _postfix import master_cf  # noqa: E402  (bench/_postfix.py)
from dnslib import QTYPE, RCODE, RR, DNSRecord  # noqa: E402
from dnslib.server import DNSLogger, DNSServer  # noqa: E402

from postroom.app import App  # noqa: E402
from postroom.auth.service import Authenticator  # noqa: E402
from postroom.config import Config, ListenersConfig  # noqa: E402
from postroom.delivery.limits import DeliveryConfig  # noqa: E402
from postroom.delivery.runner import QueueRunner  # noqa: E402
from postroom.log import LineFormatter  # noqa: E402
from postroom.net import eventloop  # noqa: E402
from postroom.store.api import OutboundEnvelope, OutboundRecipient  # noqa: E402
from postroom.store.sqlite import open_store  # noqa: E402

BODY_LINE = "The quick brown fox jumps over the lazy dog; invoices, statements and payslips. 0123456789\r\n"


def message(i: int, rcpt: str) -> bytes:
    head = (
        f"From: Sender <sender@a.test>\r\nTo: <{rcpt}>\r\nSubject: relay bench {i}\r\n"
        f"Message-ID: <bench{i}@a.test>\r\nDate: Thu, 26 Nov 2026 18:00:00 +0000\r\n\r\n"
    )
    return (head + BODY_LINE * 20).encode()


def recipients(n: int, domains: int) -> list[str]:
    return [f"user{i // domains % 100:02d}@d{i % domains:03d}.test" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """A fresh ``smtp-sink -c`` on 127.0.0.1; :attr:`count` follows its message counter."""

    def __init__(self) -> None:
        self.port = free_port()
        cmd = ["smtp-sink", "-c", "-h", "sink.test", "-m", "1024"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        self.proc = subprocess.Popen([*cmd, f"127.0.0.1:{self.port}", "1024"], stdout=subprocess.PIPE)
        self.count = 0
        self.reached = threading.Event()
        self.target = 1 << 60
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            buf += chunk
            *done, buf = buf.split(b"\r")
            for item in done:
                m = re.search(rb"mesg=(\d+)", item)
                if m:
                    self.count = int(m.group(1))
                    if self.count >= self.target:
                        self.reached.set()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args!r} did not start listening on {port}") from None
            time.sleep(0.02)


class Zone:
    """Authoritative answers for d000..d099.test (MX 10 sink.test) and sink.test (A 127.0.0.1)."""

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        if re.fullmatch(r"d\d{3}\.test", name) and qtype == "MX":
            reply.add_answer(*RR.fromZone(f"{name}. 3600 IN MX 10 sink.test."))
        elif name == "sink.test" and qtype == "A":
            reply.add_answer(*RR.fromZone("sink.test. 3600 IN A 127.0.0.1"))
        else:
            if not re.fullmatch(r"d\d{3}\.test|sink\.test", name):
                reply.header.rcode = RCODE.NXDOMAIN
            # negative answers carry the SOA, so resolvers cache them (RFC 2308 §3)
            reply.add_auth(*RR.fromZone("test. 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 3600"))
        return reply


# -- Postroom --------------------------------------------------------------------------------------
async def run_postroom(n: int, domains: int, dns_port: int, workdir: Path) -> tuple[float, float, float]:
    """Returns (fill seconds, seconds until the sink has all, seconds until all are recorded delivered)."""
    sink = Sink()
    # Postroom's default log level (INFO: a line per delivery) into a file, as Postfix logs to its
    # maillog_file: both pay for their logging.
    (workdir / "postroom").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "postroom" / "postroom.log")
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        cfg = Config(
            hostname="mx.a.test",
            data_dir=str(workdir / "postroom"),
            domains=("a.test",),
            listeners=ListenersConfig(),
            delivery=DeliveryConfig(
                nameservers=(f"127.0.0.1:{dns_port}",), smtp_port=sink.port, dkim=False, connect_timeout=10.0
            ),
            source="<bench>",
        )
        store = open_store(cfg.store_url)
        await store.open()
        import ssl

        app = App(cfg, store, Authenticator(store, cfg.auth), ssl.create_default_context())
        rcpts = recipients(n, domains)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(200)

        async def put(i: int) -> None:
            async with sem:
                env = OutboundEnvelope("sender@a.test", (OutboundRecipient(rcpts[i]),))
                await store.append(message(i, rcpts[i]), [], outbound=env)

        await asyncio.gather(*(put(i) for i in range(n)))
        fill = time.perf_counter() - t0
        sink.target = n
        runner = QueueRunner(app)
        t1 = time.perf_counter()
        await runner.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sink.reached.wait, 600.0)
        at_sink = time.perf_counter() - t1
        while runner.delivered < n and time.perf_counter() - t1 < 600:
            await asyncio.sleep(0.01)
        recorded = time.perf_counter() - t1
        await runner.stop()
        await store.close()
        if sink.count < n or runner.delivered < n:
            raise RuntimeError(f"postroom: sink got {sink.count}, runner delivered {runner.delivered} of {n}")
        return fill, at_sink, recorded
    finally:
        sink.close()
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


# -- Postfix ---------------------------------------------------------------------------------------
POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/lib
command_directory = {command_directory}
daemon_directory = {daemon_directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.a.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_client_restrictions = check_client_access inline:{{ 127.0.0.1=HOLD }}
transport_maps = inline:{{ {transports} }}
alias_maps =
alias_database =
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
"""


def postconf(name: str) -> str:
    return subprocess.run(["postconf", "-d", "-h", name], capture_output=True, text=True, check=True).stdout.strip()


def postfix_instance(root: Path, sink_port: int, domains: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    import grp
    import pwd

    uid = pwd.getpwnam("postfix").pw_uid
    postdrop = grp.getgrnam("postdrop").gr_gid
    etc, spool, lib = root / "etc", root / "spool", root / "lib"
    for d in (etc, spool, lib):
        d.mkdir()
    os.chown(lib, uid, -1)
    for name in ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private"):
        (spool / name).mkdir(mode=0o700)
        os.chown(spool / name, uid, -1)
    for name in ("saved", "trace"):
        (spool / name).mkdir(mode=0o700)
        os.chown(spool / name, uid, -1)
    (spool / "pid").mkdir(mode=0o755)
    for name, mode in (("maildrop", 0o730), ("public", 0o710)):
        (spool / name).mkdir()
        os.chown(spool / name, uid, postdrop)
        (spool / name).chmod(mode)
    transports = " ".join(f"d{i:03d}.test=smtp:[127.0.0.1]:{sink_port}" for i in range(domains))
    daemon_directory = postconf("daemon_directory")
    (etc / "main.cf").write_text(
        POSTFIX_MAIN.format(
            root=root,
            command_directory=postconf("command_directory"),
            daemon_directory=daemon_directory,
            transports=transports,
        )
    )
    port = free_port()
    (etc / "master.cf").write_text(master_cf(f"127.0.0.1:{port} inet n - n - - smtpd"))
    proc = subprocess.Popen([f"{daemon_directory}/master", "-c", str(etc), "-d"], start_new_session=True)
    wait_port(port, proc)
    return proc, port, spool


def inject_smtp(port: int, n: int, domains: int, connections: int = 10) -> None:
    rcpts = recipients(n, domains)

    def worker(k: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            for i in range(k, n, connections):
                s.sendmail("sender@a.test", [rcpts[i]], message(i, rcpts[i]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def count_files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def run_postfix(n: int, domains: int, workdir: Path) -> tuple[float, float]:
    """Returns (fill seconds, seconds from release until the sink has all)."""
    sink = Sink()
    root = Path(tempfile.mkdtemp(prefix="postroom-bench-pfx-"))  # under /tmp: postfix must reach it
    root.chmod(0o755)
    proc = None
    try:
        proc, port, spool = postfix_instance(root, sink.port, domains)
        t0 = time.perf_counter()
        inject_smtp(port, n, domains)
        deadline = time.monotonic() + 300
        while count_files(spool / "hold") < n:  # cleanup finishes writing each held queue file
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix: only {count_files(spool / 'hold')} of {n} messages on hold")
            time.sleep(0.01)
        fill = time.perf_counter() - t0
        sink.target = n
        t1 = time.perf_counter()
        etc = str(root / "etc")
        # -H moves held mail to the deferred queue; -f tells the queue manager to attempt it all now
        subprocess.run(["postsuper", "-c", etc, "-H", "ALL"], check=True, capture_output=True)
        subprocess.run(["postqueue", "-c", etc, "-f"], check=True, capture_output=True)
        if not sink.reached.wait(600):
            raise RuntimeError(f"postfix: the sink got only {sink.count} of {n}")
        return fill, time.perf_counter() - t1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        sink.close()
        shutil.rmtree(root, ignore_errors=True)


# -- main ------------------------------------------------------------------------------------------
def start_dns() -> tuple[DNSServer, int]:
    quiet = DNSLogger("-recv,-send,-request,-reply,-truncated,-data", False)
    server = DNSServer(Zone(), address="127.0.0.1", port=0, logger=quiet)
    server.start_thread()
    return server, int(server.server.server_address[1])


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few hundred messages (CI)")
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the peers we started
    n = 300 if args.quick else args.messages
    domains = min(args.domains, 10 if args.quick else args.domains)
    if shutil.which("smtp-sink") is None:
        print("relay_throughput: smtp-sink (Debian package postfix) not installed: benchmark skipped")
        return 0
    have_postfix = shutil.which("postfix") is not None and shutil.which("postsuper") is not None
    if have_postfix and os.geteuid() != 0:
        print("relay_throughput: Postfix's master needs root: Postfix side skipped")
        have_postfix = False
    elif not have_postfix:
        print("relay_throughput: postfix not installed: Postfix side skipped")
    dns, dns_port = start_dns()
    print(f"relay_throughput: {n} messages (~{len(message(0, 'user00@d000.test'))} B) to {domains} domains, loopback")
    ours: list[float] = []
    theirs: list[float] = []
    try:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="postroom-bench-relay-") as tmp:
                fill, at_sink, recorded = eventloop.run(run_postroom(n, domains, dns_port, Path(tmp)))  # as serve
                ours.append(rate(n, at_sink))
                print(
                    f"run {run + 1} postroom: queue filled in {fill:.2f}s ({rate(n, fill):,.0f} msg/s); "
                    f"drained to the sink in {at_sink:.2f}s = {rate(n, at_sink):,.0f} msg/s "
                    f"(all recorded delivered after {recorded:.2f}s = {rate(n, recorded):,.0f} msg/s)"
                )
                if have_postfix:
                    pf_fill, pf_sink = run_postfix(n, domains, Path(tmp))
                    theirs.append(rate(n, pf_sink))
                    print(
                        f"run {run + 1} postfix:  queue filled (SMTP, held) in {pf_fill:.2f}s; "
                        f"drained to the sink in {pf_sink:.2f}s = {rate(n, pf_sink):,.0f} msg/s"
                    )
    finally:
        dns.stop()
        dns.server.server_close()
    summary = f"postroom median {statistics.median(ours):,.0f} msg/s"
    if theirs:
        summary += f", postfix median {statistics.median(theirs):,.0f} msg/s"
        summary += f", ratio {statistics.median(ours) / statistics.median(theirs):.2f}x"
    print("relay_throughput: " + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
