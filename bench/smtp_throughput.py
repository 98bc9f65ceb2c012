"""SMTP throughput end to end: Postroom vs Postfix vs aiosmtpd, with Postfix's ``smtp-source`` as the load.

For each server and each session count (20 and 50), ``smtp-source`` sends 5 KB messages, one connection
per message (as in ``../shared/anchors/README.md``), and the clock stops when every message is durably
stored:
- **Postroom** (``python -m postroom serve``, SQLite store, default workers): 250 is sent after the
  group commit, so the run ends when ``smtp-source`` does; the stored count is checked afterwards.
- **Postfix** (a private instance with the anchors' configuration: durable queue, virtual(8) delivery into a
  Maildir; needs root and Debian's postfix): the run ends when the last file is in ``Maildir/new``.
- **aiosmtpd** (``bench/_aiosmtpd_maildir.py``: Maildir write + fsync + rename + directory fsync in a
  thread pool before 250): the run ends when ``smtp-source`` does.
- **smtp-sink** (no storage at all): the ceiling of this load generator on this machine.

While ``smtp-source`` runs, a probe connection sends messages one after another and times each final
dot to its reply: p50/p99 of that is the "final dot" latency under load. Each peer is started and stopped
by this script, in temporary directories, on 127.0.0.1 only. A missing peer program is reported and skipped.

Usage: ``python bench/smtp_throughput.py [--quick] [--messages N] [--sessions 20,50] [--runs R]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _postfix import master_cf  # bench/_postfix.py
from _proc import server_cpu  # bench/_proc.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DOMAIN = "bench.test"
RCPT = f"bench@{DOMAIN}"
SIZE = 5120  # octets per message (smtp-source -l)
ANCHORS = ROOT.parent / "shared" / "anchors" / "postfix"  # the reference configuration, when present


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


# -- the final-dot latency probe ------------------------------------------------------------------------
class Probe(threading.Thread):
    """Sends messages back to back on one connection and records final dot → reply times."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.sent = 0
        self.error = ""

    def run(self) -> None:
        body = b"Subject: probe\r\n\r\n" + (b"p" * 78 + b"\r\n") * (SIZE // 80)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on the dot
                f = sock.makefile("rb")

                def reply() -> bytes:
                    while True:
                        line = f.readline()
                        if not line or line[3:4] != b"-":
                            return line

                reply()
                sock.sendall(b"EHLO probe.test\r\n")
                reply()
                while not self.stop.is_set():
                    sock.sendall(f"MAIL FROM:<probe@{DOMAIN}>\r\n".encode())
                    reply()
                    sock.sendall(f"RCPT TO:<{RCPT}>\r\n".encode())
                    reply()
                    sock.sendall(b"DATA\r\n")
                    reply()
                    sock.sendall(body)
                    t0 = time.perf_counter()
                    sock.sendall(b".\r\n")
                    final = reply()
                    if not final.startswith(b"250"):
                        self.error = final.decode(errors="replace").strip()
                        return
                    self.latencies.append(time.perf_counter() - t0)
                    self.sent += 1
                sock.sendall(b"QUIT\r\n")
        except OSError as exc:
            self.error = str(exc)


# -- peers ----------------------------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="smtpbench-")))
    durable_on_250: bool = True  # False: wait for ``delivered()`` to reach the count

    def available(self) -> str:
        """ "" when the peer can run here, else why not."""
        return ""

    def start(self) -> None:
        raise NotImplementedError

    def delivered(self) -> int:
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class SinkPeer(Peer):
    def available(self) -> str:
        return "" if shutil.which("smtp-sink") else "smtp-sink not installed (Debian package postfix)"

    def start(self) -> None:
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, f"127.0.0.1:{self.port}", "1024"], stderr=subprocess.DEVNULL)
        wait_port(self.port)


class PostroomPeer(Peer):
    workers = 0  # 0: Postroom's default (one worker process per core)

    def start(self) -> None:
        data = self.work / "data"
        cfg = self.work / "postroom.toml"
        cfg.write_text(
            f'hostname = "mx.{DOMAIN}"\ndata_dir = "{data}"\ndomains = ["{DOMAIN}"]\n'
            f"workers = {self.workers}\n"
            '[listeners]\nsmtp = ["127.0.0.1:0"]\nsubmission = []\nsubmissions = []\npop3 = []\npop3s = []\n'
            "imap = []\nimaps = []\nhttp = []\n"
        )
        if not (data / "store").exists():
            subprocess.run(
                [sys.executable, "-m", "postroom", "user", "add", RCPT, "--password-stdin", "--config", str(cfg)],
                input=b"bench-password\n",
                check=True,
                capture_output=True,
            )
        # The default log level (INFO: a line per stored message) into a file, as Postfix logs to its
        # maillog_file: both servers pay for their logging.
        with open(self.work / "postroom.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postroom", "serve", "--config", str(cfg)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        ready = 0
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            m = re.search(r"listen\s+smtp\s+127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if "ready" in line:
                ready += 1
                if ready >= 1 and self.port:
                    break
        if not self.port:
            raise RuntimeError("postroom did not start")
        wait_port(self.port)

    def stored(self) -> int:
        from postroom.store.sqlite import open_store

        async def count() -> int:
            store = open_store(f"sqlite:///{self.work / 'data' / 'store'}")
            await store.open()
            try:
                acct = await store.get_account(RCPT)
                assert acct is not None
                mb = await store.get_mailbox(acct.id, "INBOX")
                assert mb is not None
                return (await store.status(mb.id)).messages
            finally:
                await store.close()

        return asyncio.run(count())


class AiosmtpdPeer(Peer):
    def available(self) -> str:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            return "aiosmtpd not installed"
        return ""

    def start(self) -> None:
        self.maildir = self.work / "Maildir"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_aiosmtpd_maildir.py"), str(self.maildir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        self.port = int(line.split()[1])
        wait_port(self.port)

    def delivered(self) -> int:
        return len(os.listdir(self.maildir / "new"))


POSTFIX_MAIN = """\
# The anchors' benchmark configuration (../shared/anchors/postfix/main.cf), in a private instance.
compatibility_level = 3.6
queue_directory = {work}/spool
data_directory = {work}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
virtual_mailbox_domains = bench.test
virtual_mailbox_base = {work}/vmail
virtual_mailbox_maps = hash:{work}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 100
maillog_file_prefixes = {work}
maillog_file = {work}/postfix.log
"""


class PostfixPeer(Peer):
    """A private Postfix instance (``postfix -c DIR``) with the anchors' settings; root only."""

    durable_on_250 = False

    def available(self) -> str:
        if not shutil.which("postfix") or not Path("/usr/lib/postfix/sbin/smtpd").exists():
            return "postfix not installed"
        if os.geteuid() != 0:
            return "Postfix needs root to run"
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return "no postfix user"
        return ""

    def start(self) -> None:
        w = self.work
        for sub in ("etc", "spool", "data", "vmail"):
            (w / sub).mkdir(exist_ok=True)
        vm = pwd.getpwnam("nobody")
        pf = pwd.getpwnam("postfix")
        os.chown(w / "vmail", vm.pw_uid, vm.pw_gid)
        os.chown(w / "data", pf.pw_uid, pf.pw_gid)
        os.chmod(w, 0o755)  # noqa: S103 - postfix and the mail user must reach their directories
        self.port = free_port()
        (w / "etc" / "main.cf").write_text(POSTFIX_MAIN.format(work=w, uid=vm.pw_uid, gid=vm.pw_gid))
        smtpd = f"127.0.0.1:{self.port} inet n  -       n       -       -       smtpd\n"
        (w / "etc" / "master.cf").write_text(master_cf(smtpd))
        (w / "etc" / "vmailbox").write_text(f"{RCPT} {DOMAIN}/bench/\n")
        conf = ["-c", str(w / "etc")]
        subprocess.run(["postmap", *conf, str(w / "etc" / "vmailbox")], check=True, capture_output=True)
        subprocess.run(["postfix", *conf, "check"], check=True, capture_output=True)
        subprocess.run(["postfix", *conf, "start"], check=True, capture_output=True)
        self.maildir = w / "vmail" / DOMAIN / "bench"
        wait_port(self.port)

    def delivered(self) -> int:
        try:
            return len(os.listdir(self.maildir / "new"))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        pid_file = self.work / "spool" / "pid" / "master.pid"
        try:
            master = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            master = 0
        subprocess.run(["postfix", "-c", str(self.work / "etc"), "stop"], capture_output=True, check=False)
        deadline = time.monotonic() + 15
        while master and time.monotonic() < deadline:
            try:
                os.kill(master, 0)  # our own instance's master (its PID from its own pid file)
            except ProcessLookupError:
                break
            time.sleep(0.05)


# -- one measurement ------------------------------------------------------------------------------------
@dataclass
class Result:
    peer: str
    sessions: int
    messages: int
    seconds: float
    p50_ms: float
    p99_ms: float
    note: str = ""
    server_cpu_us: float | None = None  # CPU per message of the server's processes (None: not measurable)
    source_cpu_us: float | None = None  # CPU per message of smtp-source itself

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(peer: Peer, sessions: int, messages: int, probe: bool = True) -> Result:
    peer.start()
    try:
        prober = Probe(peer.port) if probe else None
        if prober is not None:
            prober.start()
        # Postfix spawns and reaps its own processes, so only the one-tree servers' CPU is counted.
        pid = peer.proc.pid if peer.proc is not None and not isinstance(peer, PostfixPeer) else None
        cpu0, kids0 = (server_cpu(pid) if pid else 0.0), children_cpu()
        t0 = time.perf_counter()
        src = subprocess.run(
            [
                "smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(SIZE), "-S", "bench",
                "-f", f"sender@{DOMAIN}", "-t", RCPT, "-M", "client.test", f"127.0.0.1:{peer.port}",
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )  # fmt: skip
        t_source = time.perf_counter()
        source_cpu = children_cpu() - kids0  # smtp-source, reaped just now
        used = server_cpu(pid) - cpu0 if pid else None
        if prober is not None:
            prober.stop.set()
            prober.join(60)
        note = src.stderr.strip().splitlines()[-1] if src.returncode != 0 and src.stderr.strip() else ""
        elapsed = t_source - t0
        if not peer.durable_on_250:
            want = messages + (prober.sent if prober is not None else 0)
            deadline = time.monotonic() + 600
            while peer.delivered() < want and time.monotonic() < deadline:
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            if peer.delivered() < want:
                note = f"only {peer.delivered()} of {want} delivered"
        lat = prober.latencies if prober is not None else []
        if prober is not None and prober.error:
            note = note or f"probe: {prober.error}"
        sent = messages + (prober.sent if prober is not None else 0)
        return Result(
            peer.name,
            sessions,
            messages,
            elapsed,
            pct(lat, 0.5),
            pct(lat, 0.99),
            note,
            used / sent * 1e6 if used is not None else None,
            source_cpu / messages * 1e6,
        )
    finally:
        peer.stop()


def median_result(results: list[Result]) -> Result:
    results = sorted(results, key=lambda r: r.rate)
    return results[len(results) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: 300 messages, 20 sessions")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", default="20,50", help="comma list of concurrent connections")
    ap.add_argument("--runs", type=int, default=1, help="repeat each measurement, report the median")
    ap.add_argument("--peers", default="sink,postroom,postfix,aiosmtpd")
    ap.add_argument("--workers", type=int, default=0, help="Postroom worker processes (0: one per core)")
    args = ap.parse_args()
    PostroomPeer.workers = args.workers
    if args.quick:
        args.messages, args.sessions, args.runs = 300, "20", 1
    sessions = [int(s) for s in args.sessions.split(",")]
    if not shutil.which("smtp-source"):
        print("smtp-source (Debian package postfix) is not installed: every peer skipped")
        return 0
    makers: dict[str, Callable[[], Peer]] = {
        "sink": lambda: SinkPeer("smtp-sink"),
        "postroom": lambda: PostroomPeer("postroom"),
        "postfix": lambda: PostfixPeer("postfix"),
        "aiosmtpd": lambda: AiosmtpdPeer("aiosmtpd"),
    }
    wanted = [p for p in args.peers.split(",") if p]
    cpu = os.cpu_count()
    print(f"SMTP end to end: {args.messages} messages of {SIZE} B per run, smtp-source, {cpu} CPUs, runs={args.runs}")
    table: dict[tuple[str, int], Result] = {}
    names = []
    for name in wanted:
        probe_peer = makers[name]()
        why = probe_peer.available()
        probe_peer.cleanup()
        if why:
            print(f"  {name}: skipped ({why})")
        else:
            names.append(name)
    # Interleaved: every run measures each peer in turn, so background load hits them alike.
    runs: dict[tuple[str, int], list[Result]] = {}
    for run in range(args.runs):
        for s in sessions:
            for name in names:
                peer = makers[name]()
                try:
                    res = measure(peer, s, args.messages, probe=name != "sink")
                    if isinstance(peer, PostroomPeer):
                        stored = peer.stored()
                        if stored < args.messages:
                            res.note = f"{res.note} STORED ONLY {stored}".strip()
                finally:
                    peer.cleanup()
                runs.setdefault((name, s), []).append(res)
                print(
                    f"  run {run + 1}: {name:<9} {s:>3} sessions {res.rate:8.0f} msg/s"
                    f"  final dot p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms {res.note}",
                    flush=True,
                )
    for key, results in runs.items():
        table[key] = median_result(results)
    print()
    print("median of the runs:")
    for (name, s), res in table.items():
        per_run = " / ".join(f"{x.rate:.0f}" for x in runs[(name, s)])
        print(f"  {name:<9} {s:>3} sessions {res.rate:8.0f} msg/s  (runs: {per_run})")
    print()
    print(
        "| sessions | server | msg/s | final dot p50 ms | p99 ms | vs Postfix | vs aiosmtpd | of smtp-sink"
        " | server CPU µs/msg | smtp-source CPU µs/msg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in sessions:
        base_pf = table.get(("postfix", s))
        base_ai = table.get(("aiosmtpd", s))
        sink = table.get(("sink", s))
        for name in names:
            got = table.get((name, s))
            if got is None:
                continue
            vs_pf = f"{got.rate / base_pf.rate:.2f}x" if base_pf and base_pf.rate else "-"
            vs_ai = f"{got.rate / base_ai.rate:.2f}x" if base_ai and base_ai.rate else "-"
            of_sink = f"{got.rate / sink.rate:.0%}" if sink and sink.rate else "-"
            lat = "- | -" if name == "sink" else f"{got.p50_ms:.2f} | {got.p99_ms:.2f}"
            srv_cpu = f"{got.server_cpu_us:.0f}" if got.server_cpu_us is not None else "-"
            src_cpu = f"{got.source_cpu_us:.0f}" if got.source_cpu_us is not None else "-"
            print(f"| {s} | {name} | {got.rate:.0f} | {lat} | {vs_pf} | {vs_ai} | {of_sink} | {srv_cpu} | {src_cpu} |")
    bad = [r for r in table.values() if "STORED ONLY" in r.note]
    if bad:
        print("ERROR: Postroom acknowledged messages it did not store", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
