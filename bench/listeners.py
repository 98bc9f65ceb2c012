"""Connection set-up through the listener layer: plain accept + greeting, and implicit-TLS handshake + greeting.

Starts ``python -m postroom serve`` (POP3 on 127.0.0.1, plain and implicit TLS) with ``workers = 1`` and then
``workers = 2`` and opens connections from C concurrent clients for T seconds each: connect, (handshake),
read the ``+OK`` greeting, send ``QUIT``, close. Reports connections per second and p50/p99 set-up latency.
The client runs on the same machine, so on a small machine it competes with the server for the cores:
the numbers are the whole system's, not the server's alone.

    python bench/listeners.py            # 5 s per case, 16 clients
    python bench/listeners.py --quick    # 1 s per case, 4 clients (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_server(tmp: Path, workers: int) -> tuple[subprocess.Popen[str], dict[str, int]]:
    conf = tmp / f"w{workers}.toml"
    conf.write_text(
        f'hostname = "bench.test"\ndata_dir = "{tmp / "data"}"\nworkers = {workers}\nlog_level = "WARNING"\n'
        "[net]\nshutdown_grace = 1\nmax_connections_per_ip = 100000\n"
        '[listeners]\npop3 = ["127.0.0.1:0"]\npop3s = ["127.0.0.1:0"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "serve", "--config", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ports: dict[str, int] = {}
    ready = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.match(r"\s+listen\s+(\S+)\s+127\.0\.0\.1:(\d+)", line)
        if m:
            ports[m[1]] = int(m[2])
        if " ready (pid " in line:
            ready += 1
            if ready == workers:
                break
    else:
        raise SystemExit(f"server did not start (exit {proc.wait()})")
    return proc, ports


async def one(port: int, ctx: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    greeting = await reader.readline()
    if not greeting.startswith(b"+OK"):
        raise RuntimeError(f"unexpected greeting {greeting!r}")
    elapsed = time.perf_counter() - started
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return elapsed


async def load(port: int, ctx: ssl.SSLContext | None, clients: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await one(port, ctx))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return round(len(latencies) / (time.perf_counter() - started)), latencies


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per case, 4 clients")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    seconds, clients = (1.0, 4) if args.quick else (args.seconds, args.clients)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    print(f"listeners: {clients} concurrent clients, {seconds:.0f} s per case, POP3 greeting")
    print(f"{'case':<28} {'conn/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory() as tmpdir:
        for workers in (1, 2):
            proc, ports = start_server(Path(tmpdir), workers)
            try:
                for name, port, tls in (("plain", ports["pop3"], None), ("implicit TLS", ports["pop3s"], ctx)):
                    rate, lat = asyncio.run(load(port, tls, clients, seconds))
                    case = f"workers={workers} {name}"
                    print(f"{case:<28} {rate:>8} {pct(lat, 50):>8.2f} {pct(lat, 99):>8.2f}")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
