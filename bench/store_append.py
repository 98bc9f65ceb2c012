"""Durable appends: Postroom's store (group commit) vs Maildir delivery (one file + fsync per message).

Both sides get the same 5 KB messages from the same number of concurrent writers, and both are durable
when a writer's call returns:
- Postroom: ``await store.append(...)`` (SQLite WAL, group commit: one fsync per batch).
- Maildir: write ``tmp/NAME``, fsync it, rename into ``new/``, fsync ``new/`` — the way Postfix's
  virtual(8) and Dovecot's LDA deliver — run by the same number of threads.

Reports messages/second and p50/p99 latency per append, and the ratio. With ``--runs N`` both sides run N
times, interleaved (Postroom, Maildir, Postroom, ...), each in a fresh directory, and the medians are
compared: a single Maildir run on this kind of machine scatters by a factor of two. Usage:
    python bench/store_append.py [--writers 50] [--messages 20000] [--runs 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from postroom.net import eventloop
from postroom.net.limits import EVENT_LOOP
from postroom.store.api import AppendTarget
from postroom.store.sqlite import open_store


def message(i: int) -> bytes:
    head = (
        f"From: sender@bench.test\r\nTo: user@bench.test\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}@bench.test>\r\nDate: Thu, 26 Nov 2026 12:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * ((5120 - len(head)) // len(line))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


async def setup_store(directory: Path) -> int:
    store = open_store(f"sqlite:///{directory}")
    await store.open()
    acct = await store.create_account("user@bench.test", "x")
    inbox = await store.get_mailbox(acct.id, "INBOX")
    assert inbox is not None
    await store.close()
    return inbox.id


async def count_stored(directory: Path, mailbox_id: int) -> int:
    store = open_store(f"sqlite:///{directory}")
    await store.open()
    n = len(await store.messages(mailbox_id))
    await store.close()
    return n


def postroom_process(
    directory: Path, mailbox_id: int, writers: int, first: int, count: int, start_at: float, out: Any, loop: str
) -> None:
    """One worker process (as ``workers = N`` runs the server, on the same event loop): its share of the
    writers."""
    out.send(eventloop.run(run_postroom(directory, mailbox_id, writers, first, count, start_at), loop))


async def run_postroom(
    directory: Path, mailbox_id: int, writers: int, first: int, count: int, start_at: float
) -> tuple[list[float], int, float]:
    store = open_store(f"sqlite:///{directory}")
    await store.open()
    latencies: list[float] = []
    counter = iter(range(first, first + count))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = time.process_time()

    async def writer() -> None:
        for i in counter:
            raw = message(i)
            t0 = time.perf_counter()
            await store.append(raw, [AppendTarget(mailbox_id)])
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*[writer() for _ in range(writers)])
    cpu = time.process_time() - cpu0  # every thread of this process: the loop, the writer, the readers
    commits = getattr(getattr(store, "_writer", None), "commits", 0)
    await store.close()
    return latencies, commits, cpu


def run_postroom_processes(
    directory: Path, writers: int, total: int, processes: int, loop: str = EVENT_LOOP
) -> tuple[float, list[float], int, float]:
    mailbox_id = asyncio.run(setup_store(directory))
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0
    procs, pipes = [], []
    for p in range(processes):
        share = total // processes + (1 if p < total % processes else 0)
        first = sum(total // processes + (1 if q < total % processes else 0) for q in range(p))
        w = writers // processes + (1 if p < writers % processes else 0)
        rx, tx = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=postroom_process, args=(directory, mailbox_id, w, first, share, start_at, tx, loop))
        proc.start()
        procs.append(proc)
        pipes.append(rx)
    latencies: list[float] = []
    commits = 0
    cpu = 0.0
    for rx in pipes:
        lat, c, used = rx.recv()
        latencies.extend(lat)
        commits += c
        cpu += used
    elapsed = time.time() - start_at
    for proc in procs:
        proc.join()
    stored = asyncio.run(count_stored(directory, mailbox_id))
    assert stored == total, (stored, total)
    return elapsed, latencies, commits, cpu


def run_maildir(directory: Path, writers: int, total: int) -> tuple[float, list[float]]:
    for sub in ("tmp", "new", "cur"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    new_dir = os.open(directory / "new", os.O_RDONLY | os.O_DIRECTORY)
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def writer() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            raw = message(i)
            t0 = time.perf_counter()
            name = f"{time.time():.6f}.{i}.bench"
            tmp = directory / "tmp" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, directory / "new" / name)
            os.fsync(new_dir)
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    os.close(new_dir)
    assert len(os.listdir(directory / "new")) == total
    return elapsed, latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writers", type=int, default=50)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="store processes, as `workers` in the server"
    )
    ap.add_argument("--loop", choices=eventloop.EVENT_LOOPS, default=EVENT_LOOP, help="the processes' event loop")
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs of both sides; medians compared")
    ap.add_argument("--quick", action="store_true", help="a few seconds: 1,000 messages")
    args = ap.parse_args()
    total = 1000 if args.quick else args.messages
    rows: list[tuple[float, list[float], int, float, float, list[float]]] = []
    for _ in range(max(1, args.runs)):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            root = Path(tmp)
            p_elapsed, p_lat, commits, p_cpu = run_postroom_processes(
                root / "postroom", args.writers, total, args.processes, args.loop
            )
            m_elapsed, m_lat = run_maildir(root / "maildir", args.writers, total)
        rows.append((total / p_elapsed, p_lat, commits, p_cpu, total / m_elapsed, m_lat))
    print(
        f"durable appends of ~5 KB, {args.writers} concurrent writers, {total} messages,"
        f" postroom in {args.processes} process(es) on {args.loop}, {len(rows)} run(s)"
    )
    print(f"{'':10} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for p_rate, p_lat, commits, p_cpu, m_rate, m_lat in rows:
        print(
            f"{'postroom':10} {p_rate:9.0f} {pct(p_lat, 0.5):8.2f} {pct(p_lat, 0.99):8.2f}   ({commits} commits,"
            f" {p_cpu / total * 1e6:.0f} µs CPU per append in the store processes)"
        )
        m_p50, m_p99 = pct(m_lat, 0.5), pct(m_lat, 0.99)
        print(f"{'maildir':10} {m_rate:9.0f} {m_p50:8.2f} {m_p99:8.2f}   (ratio {p_rate / m_rate:.2f}x)")
    p_med = statistics.median(r[0] for r in rows)
    m_med = statistics.median(r[4] for r in rows)
    label = "ratio postroom/maildir" if len(rows) == 1 else f"ratio of the medians of {len(rows)} runs"
    print(f"{label}: {p_med / m_med:.2f}x ({p_med:.0f} vs {m_med:.0f} msg/s; target >= 3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
