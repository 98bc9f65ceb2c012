"""``python -m postroom serve`` as a real process: banner, TLS on every port, signals, workers, bad input.

Listeners are configured on ``127.0.0.1:0``; the banner reports the real ports. Nothing here sleeps for a
fixed time: the tests wait for lines the server prints, with a timeout.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from postroom.net import tls

WAIT = 30.0  # seconds for any expected line or event (a loaded CI machine is slow, never this slow)
GRACE = 2.0  # [net] shutdown_grace used by these servers
ALL = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
IMPLICIT = ("submissions", "pop3s", "imaps")
GREETING = {
    "smtp": b"220 ",
    "submission": b"220 ",
    "submissions": b"220 ",
    "pop3": b"+OK",
    "pop3s": b"+OK",
    "imap": b"* OK",
    "imaps": b"* OK",
}


def available(services: tuple[str, ...]) -> tuple[str, ...]:
    """The services whose adapters exist (the server skips the others, as it should)."""
    import importlib.util

    modules = {
        "smtp": "smtp",
        "submission": "smtp",
        "submissions": "smtp",
        "pop3": "pop3",
        "pop3s": "pop3",
        "imap": "imap",
        "imaps": "imap",
    }
    have = tuple(s for s in services if importlib.util.find_spec(f"postroom.{modules[s]}.adapter") is not None)
    if not have:
        pytest.skip("no protocol adapter is available yet")
    return have


def write_config(tmp_path: Path, services: tuple[str, ...], workers: int = 1, extra: str = "") -> Path:
    listeners = "\n".join(f'{s} = ["127.0.0.1:0"]' for s in services)
    path = tmp_path / "postroom.toml"
    path.write_text(
        f'hostname = "mx.example.test"\ndata_dir = "{tmp_path / "data"}"\ndomains = ["example.test"]\n'
        f"workers = {workers}\n{extra}\n[net]\nshutdown_grace = {GRACE}\n[listeners]\n{listeners}\n"
    )
    return path


class Server:
    """A ``postroom serve`` subprocess whose output lines are collected by a thread."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "serve", "--config", str(config)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The next line (after those already examined) matching ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.lines):
                line = self.lines[self._seen]
                self._seen += 1
                m = rx.search(line)
                if m:
                    return m
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines)) from None
            if item is None:
                raise AssertionError(f"server exited before {pattern!r}; output:\n" + "\n".join(self.lines))
            self.lines.append(item)

    def ports(self) -> dict[str, tuple[int, str]]:
        found = {}
        for line in self.lines:
            m = re.match(r"\s+listen\s+(\S+)\s+127\.0\.0\.1:(\d+)\s+(.+)$", line)
            if m:
                found[m[1]] = (int(m[2]), m[3].strip())
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=GRACE + WAIT)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=WAIT)


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_greeting(port: int) -> tuple[str, str, bytes]:
    """Implicit-TLS handshake: (TLS version, server certificate SHA-256, first line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, client_ctx().wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        fp = x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex(":").upper()
        f = s.makefile("rb")
        line = f.readline()
        f.close()
        return str(s.version()), fp, line


@pytest.mark.slow
def test_banner_tls_everywhere_and_clean_sigterm(tmp_path: Path, servers: list[Server]) -> None:
    services = available(ALL)
    srv = Server(write_config(tmp_path, services), tmp_path)
    servers.append(srv)
    srv.expect(r"^server ready \(pid \d+\)$")
    text = "\n".join(srv.lines)
    data = tmp_path / "data"
    assert f"data      {data}" in text
    assert f"store     sqlite:///{data / 'store'} (writer scheduling: batch)" in text
    cert = data / "tls" / "cert.pem"
    assert oct(os.stat(data / "tls" / "key.pem").st_mode & 0o777) == "0o600"
    fingerprint = tls.fingerprint(cert)
    assert f"sha256    {fingerprint}" in text
    code = re.search(r"^  code      (.+)$", text, re.M)
    assert code is not None
    if os.environ.get("POSTROOM_REQUIRE_NATIVE") == "1":  # CI: the compiled modules are the ones running
        assert "compiled with mypyc" in code.group(1), code.group(1)
        assert "appends commit without the GIL" in code.group(1), code.group(1)
    ports = srv.ports()
    assert set(ports) == set(services)
    for service, (_, mode) in ports.items():
        assert mode == ("implicit TLS" if service in IMPLICIT else "STARTTLS"), service

    for service in IMPLICIT:
        if service in ports:
            version, fp, greeting = tls_greeting(ports[service][0])
            assert version in ("TLSv1.2", "TLSv1.3")
            assert fp == fingerprint
            assert greeting.startswith(GREETING[service]), (service, greeting)
    if "submission" in ports:  # STARTTLS on a plain port, with the standard library's client
        with smtplib.SMTP("127.0.0.1", ports["submission"][0], timeout=WAIT) as smtp:
            smtp.starttls(context=client_ctx())
            assert smtp.sock is not None and isinstance(smtp.sock, ssl.SSLSocket)
            assert smtp.ehlo()[0] == 250

    # An idle client stays connected; SIGTERM still ends the server within the grace period.
    plain = next(s for s in services if s not in IMPLICIT)
    idle = socket.create_connection(("127.0.0.1", ports[plain][0]), timeout=WAIT)
    assert idle.recv(100).startswith(GREETING[plain])
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < GRACE + WAIT
    idle.settimeout(WAIT)
    rest = b""
    while chunk := idle.recv(4096):  # the session ended: a goodbye at most, then EOF
        rest += chunk
    idle.close()
    assert "Traceback" not in "\n".join(srv.lines)

    # A second start reuses the certificate made on the first.
    srv2 = Server(write_config(tmp_path, services), tmp_path)
    servers.append(srv2)
    srv2.expect(r"^server ready")
    assert f"sha256    {fingerprint}" in "\n".join(srv2.lines)
    assert srv2.stop() == 0


@pytest.mark.slow
def test_sighup_reloads_the_certificate(tmp_path: Path, servers: list[Server]) -> None:
    services = available(("pop3s", "imaps", "submissions"))[:1]
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    tls.generate_self_signed(cert, key, "first.example.test")
    first = tls.fingerprint(cert)
    extra = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    srv = Server(write_config(tmp_path, services, extra=extra), tmp_path)
    servers.append(srv)
    srv.expect(r"^server ready")
    port = srv.ports()[services[0]][0]
    assert tls_greeting(port)[1] == first

    tls.generate_self_signed(cert, key, "second.example.test")
    second = tls.fingerprint(cert)
    srv.proc.send_signal(signal.SIGHUP)
    srv.expect(rf"TLS certificate reloaded .*{re.escape(second)}")
    assert tls_greeting(port)[1] == second

    # A broken certificate on reload is reported and the working one stays.
    cert.write_text("garbage\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.expect(r"TLS reload failed, keeping the current certificate: .*not a PEM certificate")
    assert tls_greeting(port)[1] == second
    assert srv.stop() == 0


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc/*/stat, which every Linux has)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(after_name[1]) == pid and after_name[0] != "Z":
            found.append(int(stat_file.parent.name))
    return sorted(found)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _established_inodes(server_port: int) -> set[str]:
    """Inodes of established sockets whose local port is ``server_port`` (the server's accepted ones)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == server_port and fields[3] == "01":  # TCP_ESTABLISHED
            out.add(fields[9])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to see which worker serves")
def test_two_workers_share_the_port_and_a_dead_one_is_restarted(tmp_path: Path, servers: list[Server]) -> None:
    services = available(("pop3", "imap", "smtp"))[:1]
    service = services[0]
    srv = Server(write_config(tmp_path, services, workers=2), tmp_path)
    servers.append(srv)
    srv.expect(r"with 2 worker\(s\)")
    ready = {srv.expect(r"^worker ([12])/2 ready")[1], srv.expect(r"^worker ([12])/2 ready")[1]}
    assert ready == {"1", "2"}
    workers = _children(srv.proc.pid)
    assert len(workers) == 2
    port = srv.ports()[service][0]

    # One accept queue for both workers (serve's module invariants): while one worker is busy (here:
    # stopped), the other takes every new connection. With a queue per worker (SO_REUSEPORT) about half of
    # them would wait unanswered behind the stopped one.
    for busy, free in ((workers[0], workers[1]), (workers[1], workers[0])):
        os.kill(busy, signal.SIGSTOP)
        clients = []
        try:
            for _ in range(12):
                c = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                clients.append(c)
                assert c.recv(100).startswith(GREETING[service])
            served = _established_inodes(port)
            assert len(_socket_inodes(free) & served) == 12
            assert not _socket_inodes(busy) & served
        finally:
            os.kill(busy, signal.SIGCONT)
            for c in clients:
                c.close()

    # A worker that dies is replaced.
    os.kill(workers[0], signal.SIGKILL)
    srv.expect(r"worker \d \(pid \d+\) exited with -9; restarting")
    srv.expect(r"^worker [12]/2 ready")
    assert len(_children(srv.proc.pid)) == 2
    c = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    assert c.recv(100).startswith(GREETING[service])
    c.close()
    assert srv.stop() == 0
    assert not [pid for pid in workers[1:] if Path(f"/proc/{pid}").exists() and _is_running(pid)]


def test_new_connections_are_refused_while_two_workers_drain(tmp_path: Path, servers: list[Server]) -> None:
    """The workers share the parent's listening socket: on SIGTERM the parent closes its copy and each
    worker its own, so a client connecting while a session drains is refused at once instead of waiting
    in a queue that nobody reads any more."""
    services = available(("smtp",))
    conf = write_config(tmp_path, services, workers=2)
    assert (
        run_cli(
            "user", "add", "bob@example.test", "--password-stdin", "--config", str(conf), cwd=tmp_path, stdin="pw\n"
        )[0]
        == 0
    )
    srv = Server(conf, tmp_path)
    servers.append(srv)
    srv.expect(r"^worker [12]/2 ready")
    srv.expect(r"^worker [12]/2 ready")
    port = srv.ports()["smtp"][0]
    busy = socket.create_connection(("127.0.0.1", port), timeout=WAIT)  # mid-DATA: keeps its worker draining
    f = busy.makefile("rb")
    assert f.readline().startswith(b"220 ")
    for line, code in (
        (b"EHLO c.test", b"250 "),
        (b"MAIL FROM:<a@c.test>", b"250"),
        (b"RCPT TO:<bob@example.test>", b"250"),
        (b"DATA", b"354"),
    ):
        busy.sendall(line + b"\r\n")
        reply = f.readline()
        while reply[3:4] == b"-":
            reply = f.readline()
        assert reply.startswith(code), (line, reply)
    busy.sendall(b"Subject: slow\r\n\r\nhalf a message")
    srv.proc.send_signal(signal.SIGTERM)
    srv.expect(r"stopping 2 workers")
    refused = False
    deadline = time.monotonic() + GRACE / 2
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=GRACE / 4).close()
        except ConnectionRefusedError:
            refused = True
        else:
            time.sleep(0.02)
    assert refused and srv.proc.poll() is None  # refused while the other session still drains
    assert srv.proc.wait(timeout=GRACE + WAIT) == 0
    f.close()
    busy.close()


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, servers: list[Server]) -> None:
    """A supervisor killed with SIGKILL (it cannot forward anything) leaves no worker behind: the kernel
    sends each worker SIGTERM (``PR_SET_PDEATHSIG``), so none keeps accepting from the shared sockets or
    holds the port against the next start."""
    services = available(("smtp",))
    srv = Server(write_config(tmp_path, services, workers=2), tmp_path)
    servers.append(srv)
    srv.expect(r"^worker [12]/2 ready")
    srv.expect(r"^worker [12]/2 ready")
    port = srv.ports()["smtp"][0]
    workers = _children(srv.proc.pid)
    assert len(workers) == 2
    srv.proc.kill()
    srv.proc.wait(timeout=WAIT)
    deadline = time.monotonic() + GRACE + WAIT
    while any(_is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _is_running(pid)]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- bad input: one line, non-zero exit, never a traceback -----------------------------------------------
def run_cli(*argv: str, cwd: Path, stdin: str = "") -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", *argv],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return proc.returncode, proc.stderr


def assert_one_error_line(code: int, stderr: str) -> str:
    assert code != 0
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("postroom: warning:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("postroom: error: "), stderr
    return lines[0]


def test_malformed_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('hostname = "x"\n[listeners\nsmtp = 1\n')
    line = assert_one_error_line(*run_cli("serve", "--config", str(bad), cwd=tmp_path))
    assert f"{bad}: not valid TOML" in line


def test_unknown_log_level(tmp_path: Path) -> None:
    conf = write_config(tmp_path, ("smtp",), extra='log_level = "LOUD"')
    line = assert_one_error_line(*run_cli("serve", "--config", str(conf), cwd=tmp_path))
    assert "log_level: unknown log level 'LOUD'" in line


def test_missing_certificate_file(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "cert.pem"
    services = available(ALL)[:1]
    conf = write_config(tmp_path, services, extra=f'[tls]\ncert = "{missing}"\nkey = "{tmp_path}/no/key.pem"\n')
    line = assert_one_error_line(*run_cli("serve", "--config", str(conf), cwd=tmp_path))
    assert str(missing) in line and "not found" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use(tmp_path: Path, workers: int) -> None:
    services = available(("smtp", "pop3", "imap"))[:1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = write_config(tmp_path, services, workers=workers)
        conf.write_text(conf.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        line = assert_one_error_line(*run_cli("serve", "--config", str(conf), cwd=tmp_path))
    assert f"127.0.0.1:{port}" in line and "address already in use" in line


def test_invalid_address_in_user_add(tmp_path: Path) -> None:
    conf = write_config(tmp_path, ())
    line = assert_one_error_line(
        *run_cli("user", "add", "not an address", "--password-stdin", "--config", str(conf), cwd=tmp_path, stdin="pw\n")
    )
    assert "invalid address 'not an address'" in line
    assert not (tmp_path / "data").exists()  # nothing was created


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a directory should be: fails for root too
    conf = tmp_path / "c.toml"
    conf.write_text(f'data_dir = "{blocker}/data"\n[listeners]\nsmtp = ["127.0.0.1:0"]\n')
    line = assert_one_error_line(*run_cli("serve", "--config", str(conf), cwd=tmp_path))
    assert f"data_dir {blocker}/data" in line


async def test_store_domains_become_local_domains(tmp_path: Path) -> None:
    from typing import cast

    from postroom import config
    from postroom.app import App
    from postroom.auth.service import Authenticator
    from postroom.serve import open_configured_store, refresh_domains

    cfg = config.load(write_config(tmp_path, ()))
    store = await open_configured_store(cfg)
    try:
        app = App(cfg, store, Authenticator(store, cfg.auth), cast(ssl.SSLContext, None))
        await refresh_domains(app, cfg)
        assert app.config.is_local_domain("example.test")
        assert not app.config.is_local_domain("added.test")
        await store.add_domain("Added.Test")
        await refresh_domains(app, cfg)
        assert app.config.is_local_domain("added.test") and app.config.is_local_domain("example.test")
        assert app.config.domains == ("example.test", "added.test")
    finally:
        await store.close()


@pytest.mark.slow
def test_user_added_while_running_in_a_new_domain_gets_mail_after_sighup(tmp_path: Path, servers: list[Server]) -> None:
    services = available(("smtp",))
    conf = write_config(tmp_path, services)
    srv = Server(conf, tmp_path)
    servers.append(srv)
    srv.expect(r"^server ready")
    port = srv.ports()["smtp"][0]

    def rcpt(address: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("sender@example.net")
            code, _ = smtp.rcpt(address)
            smtp.rset()
            return code

    assert rcpt("carol@new.example.org") >= 500  # not a local domain: relaying is refused
    code, err = run_cli(
        "user", "add", "carol@new.example.org", "--password-stdin", "--config", str(conf), cwd=tmp_path, stdin="pw\n"
    )
    assert code == 0, err
    srv.proc.send_signal(signal.SIGHUP)  # picks up the store's new domain at once (else within 10 s)
    srv.expect(r"TLS certificate reloaded")
    deadline = time.monotonic() + WAIT
    while (got := rcpt("carol@new.example.org")) != 250 and time.monotonic() < deadline:
        pass  # the domain refresh runs right after the reload; a few tries cover the gap
    assert got == 250
    assert srv.stop() == 0


@pytest.mark.interop
def test_openssl_s_client_on_every_port(tmp_path: Path, servers: list[Server]) -> None:
    """A real TLS client (openssl s_client) against each port: implicit TLS, or its STARTTLS dialect."""
    from conftest import require_program

    openssl = require_program("openssl")
    services = available(ALL)
    srv = Server(write_config(tmp_path, services), tmp_path)
    servers.append(srv)
    srv.expect(r"^server ready")
    dialect = {"smtp": "smtp", "submission": "smtp", "pop3": "pop3", "imap": "imap"}
    for service, (port, _) in srv.ports().items():
        cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
        if service in dialect:
            cmd += ["-starttls", dialect[service]]
        proc = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=WAIT)
        out = proc.stdout + proc.stderr
        assert "CONNECTION ESTABLISHED" in out, (service, out)
        assert re.search(r"Protocol version: TLSv1\.[23]", out), (service, out)
    assert srv.stop() == 0
