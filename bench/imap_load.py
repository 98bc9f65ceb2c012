#!/usr/bin/env python3
"""IMAP load: Postroom beside Dovecot (stock and high-performance process modes), same mail, one run.

Each session (26 commands, as in the reference peers' runs): connect, LOGIN, SELECT INBOX,
FETCH 1:* (FLAGS UID RFC822.SIZE), 20 x UID FETCH n BODY.PEEK[] of random messages, UID STORE of 20 random
UIDs +FLAGS (\\Seen), SEARCH UNSEEN, LOGOUT; a new connection per session, a random user of ``--users``.
``--clients`` concurrent sessions are spread over a few load-generator processes (lean asyncio clients, one
command at a time like imaplib). Reported: commands/s, sessions/s, p50/p99 per command, and Postroom's
ratio to each Dovecot variant (median of ``--runs``). Every run first clears ``\\Seen`` on all INBOXes.

Both servers hold the same mail: ``--users`` users x ``--messages`` messages of 4.5-5.7 KB (Postroom: its
SQLite store through the store API; Dovecot: Maildir, indexed with ``doveadm index``). Dovecot is configured
from the reference peers' files (``../shared/anchors/dovecot/`` beside the repository, or ``--anchors``),
rewritten to run self-contained under ``bench/out/imap`` on free loopback ports; it is skipped (with a note)
when not installed. Only 127.0.0.1 is used.

    python bench/imap_load.py            # full: 50 users x 1,000 messages, 8 and 32 clients, 3 runs
    python bench/imap_load.py --quick    # a few seconds; CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _mailcorpus import (  # the shared corpus and process helpers: bench/_mailcorpus.py
    DOMAIN,
    PASSWORD,
    ROOT,
    SEED,
    dovecot_unavailable,
    free_port,
    prepare_postroom,
    start_dovecot,
    start_postroom,
    stop,
    stop_dovecot,
    write_dovecot_conf,
    write_dovecot_users,
    write_maildirs,
)
from _proc import server_cpu  # bench/_proc.py

OUT = ROOT / "bench" / "out" / "imap"
FETCHES_PER_SESSION = 20
STORE_UIDS = 20
COMMANDS = ("LOGIN", "SELECT", "FETCH", "UID FETCH", "UID STORE", "SEARCH", "LOGOUT")
GREETING = b"* OK"


# -- Dovecot -------------------------------------------------------------------------------------
def prepare_dovecot(anchors: Path, users: int, messages: int) -> tuple[Path, Path, int] | str:
    """Write the Maildirs and both configs (one port: the variants run one after the other). Returns
    (stock conf, perf conf, port) or why it is skipped."""
    why = dovecot_unavailable(anchors)
    if why is not None:
        return why
    base = OUT / f"dovecot-{users}x{messages}"
    users_file, mail = write_dovecot_users(base, users), base / "vmail"
    port = free_port()
    confs = {}
    for variant in ("stock", "perf"):
        conf = write_dovecot_conf(
            anchors, base, protocol="imap", variant=variant, port=port, users_file=users_file, mail=mail
        )
        if isinstance(conf, str):
            return conf
        confs[variant] = conf
    marker = base / "complete"
    if not marker.exists():
        t0 = time.monotonic()
        write_maildirs(mail, users, messages)
        marker.write_text("ok\n")
        print(f"  dovecot maildirs: {users} x {messages} messages in {time.monotonic() - t0:.1f} s", flush=True)
    return confs["stock"], confs["perf"], port


def index_dovecot(conf: Path) -> None:
    """Build Dovecot's index files once, through ``conf``: the running instance's config (``-A`` asks its
    auth service for the users). Both variants share the Maildirs and so the indexes."""
    marker = conf.parent / "indexed"
    if marker.exists():
        return
    res = subprocess.run(["doveadm", "-c", str(conf), "index", "-A", "INBOX"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"doveadm index failed: {res.stderr.strip()[:300]}")
    marker.write_text("ok\n")


# -- the load generator --------------------------------------------------------------------------
@dataclass
class Tally:
    sessions: int = 0
    commands: int = 0
    errors: int = 0
    octets: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COMMANDS})


class ImapError(Exception):
    pass


_LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")


class Client:
    """Just enough IMAP for the workload: send a command, read through its tagged response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.n = 0

    async def command(self, line: bytes) -> list[bytes]:
        self.n += 1
        tag = b"a%d" % self.n
        self.writer.write(tag + b" " + line + b"\r\n")
        readline, readexactly = self.reader.readline, self.reader.readexactly
        out: list[bytes] = []
        while True:
            resp = await readline()
            if not resp:
                raise ImapError("connection closed")
            m = _LITERAL.search(resp)
            if m is not None:
                resp += await readexactly(int(m.group(1)))
                resp += await readline()
            if resp.startswith(tag + b" "):
                if not resp.startswith(tag + b" OK"):
                    raise ImapError(resp[:100])
                return out
            out.append(resp)


async def _session(port: int, user: str, rng: random.Random, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        if not (await reader.readline()).startswith(b"* OK"):
            raise ImapError("greeting")
        c = Client(reader, writer)
        lat = tally.latencies

        async def timed(name: str, line: bytes) -> list[bytes]:
            t0 = time.perf_counter()
            out = await c.command(line)
            lat[name].append(time.perf_counter() - t0)
            tally.commands += 1
            return out

        await timed("LOGIN", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())
        await timed("SELECT", b"SELECT INBOX")
        listing = await timed("FETCH", b"FETCH 1:* (FLAGS UID RFC822.SIZE)")
        uids = [int(m.group(1)) for m in (re.search(rb"UID (\d+)", x) for x in listing) if m]
        if not uids:
            raise ImapError("empty INBOX")
        for _ in range(FETCHES_PER_SESSION):
            body = await timed("UID FETCH", b"UID FETCH %d BODY.PEEK[]" % rng.choice(uids))
            tally.octets += sum(len(x) for x in body)
        chosen = sorted(rng.sample(uids, min(STORE_UIDS, len(uids))))
        await timed("UID STORE", b"UID STORE " + ",".join(map(str, chosen)).encode() + rb" +FLAGS (\Seen)")
        await timed("SEARCH", b"SEARCH UNSEEN")
        await timed("LOGOUT", b"LOGOUT")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _clients(port: int, users: list[str], n: int, start: float, end: float, seed: int) -> Tally:
    tally = Tally()
    rng = random.Random(seed)
    await asyncio.sleep(max(0.0, start - time.time()))

    async def loop() -> None:
        while time.time() < end:
            try:
                await _session(port, rng.choice(users), rng, tally)
            except (OSError, ImapError, asyncio.IncompleteReadError, ValueError):
                tally.errors += 1
                continue
            if time.time() <= end:
                tally.sessions += 1

    tasks = [asyncio.create_task(loop()) for _ in range(n)]
    await asyncio.sleep(max(0.0, end - time.time()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def _worker(args: tuple[int, list[str], int, float, float, int]) -> dict[str, Any]:
    return asdict(asyncio.run(_clients(*args)))


async def _clear_seen(port: int, users: list[str]) -> None:
    for user in users:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        await reader.readline()
        c = Client(reader, writer)
        await c.command(b"LOGIN " + user.encode() + b" " + PASSWORD.encode())
        await c.command(b"SELECT INBOX")
        await c.command(rb"STORE 1:* -FLAGS.SILENT (\Seen)")
        await c.command(b"LOGOUT")
        writer.close()


@contextlib.asynccontextmanager
async def inbox_session(port: int, user: str) -> AsyncIterator[Client]:
    """A connection logged in as ``user`` with INBOX selected; LOGOUT when the block ends normally."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        await reader.readline()
        c = Client(reader, writer)
        await c.command(b"LOGIN " + user.encode() + b" " + PASSWORD.encode())
        await c.command(b"SELECT INBOX")
        yield c
        await c.command(b"LOGOUT")
    finally:
        writer.close()


WARM_LOGINS = 12  # logins per user in the warm-up: with W workers a user misses one with odds (1-1/W)^12


async def _warm_logins(port: int, users: list[str]) -> None:
    """Log every user in ``WARM_LOGINS`` times, so each server worker has verified each password once
    (argon2id, then the verified-credential cache) and opened each INBOX before anything is measured."""
    sem = asyncio.Semaphore(8)

    async def one(user: str) -> None:
        async with sem, inbox_session(port, user):
            pass

    await asyncio.gather(*(one(u) for u in users for _ in range(WARM_LOGINS)))


def _pct(xs: list[float], q: float) -> float:
    return 1000 * xs[min(len(xs) - 1, int(len(xs) * q))] if xs else 0.0


def load(port: int, users: list[str], clients: int, duration: float, procs: int, pid: int = 0) -> dict[str, Any]:
    """``clients`` concurrent sessions for ``duration`` seconds from ``procs`` processes; with ``pid``,
    also the server's CPU per session and per command over the run."""
    asyncio.run(_clear_seen(port, users))
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start = time.time() + 0.5
    end = start + duration
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        cpu0 = server_cpu(pid) if pid else 0.0
        parts = pool.map(_worker, [(port, users, k, start, end, SEED + i) for i, k in enumerate(shares)])
        cpu = server_cpu(pid) - cpu0 if pid else 0.0
    total = {k: sum(p[k] for p in parts) for k in ("sessions", "commands", "errors", "octets")}
    out: dict[str, Any] = {
        "commands_s": total["commands"] / duration,
        "sessions_s": total["sessions"] / duration,
        "errors": total["errors"],
        # the window also holds the 0.5 s start delay and the sessions cut off at the end: an upper bound
        "cpu_ms_session": 1000 * cpu / max(1, total["sessions"]),
        "cpu_us_command": 1e6 * cpu / max(1, total["commands"]),
    }
    for name in COMMANDS:
        lat = sorted(x for p in parts for x in p["latencies"][name])
        out[f"{name} p50"] = _pct(lat, 0.50)
        out[f"{name} p99"] = _pct(lat, 0.99)
    return out


Target = tuple[str, int, list[str], int]  # (name, port, user names, server pid for its CPU)


def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, dict[int, dict[str, float]]]:
    """Interleave the servers run by run (A, B, A, B …) so a change in the machine's load hits both alike."""
    for _, port, users, _ in targets:
        asyncio.run(_warm_logins(port, users))  # every user on every worker: auth cache, mailbox snapshot
        load(port, users, max(args.clients), min(2.0, args.duration), args.procs)  # warm-up: page cache
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name, _, _, _ in targets}
    for clients in args.clients:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in targets}
        for _ in range(args.runs):
            for name, port, users, pid in targets:
                runs[name].append(load(port, users, clients, args.duration, args.procs, pid))
        for name, _, _, _ in targets:
            rs = runs[name]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            med["commands_s_min"] = min(r["commands_s"] for r in rs)
            med["commands_s_max"] = max(r["commands_s"] for r in rs)
            out[name][clients] = med
            print(
                f"  {name:<16} {clients:>3} clients: {med['commands_s']:7.0f} commands/s "
                f"({med['commands_s_min']:.0f}-{med['commands_s_max']:.0f})  {med['sessions_s']:6.1f} sessions/s  "
                f"errors {med['errors']:.0f}  server CPU {med['cpu_ms_session']:.2f} ms/session "
                f"{med['cpu_us_command']:.0f} us/command",
                flush=True,
            )
            print(
                "      p50/p99 ms: " + "  ".join(f"{c} {med[c + ' p50']:.1f}/{med[c + ' p99']:.1f}" for c in COMMANDS),
                flush=True,
            )
    return out


#: One client, one command in a loop (after LOGIN and SELECT INBOX): label and the lines it cycles through.
PER_COMMAND: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("CAPABILITY", (b"CAPABILITY",)),
    ("NOOP", (b"NOOP",)),
    ("UID FETCH n BODY.PEEK[]", tuple(b"UID FETCH %d BODY.PEEK[]" % u for u in (17, 402, 733))),
    ("UID STORE n +/-FLAGS (\\Seen)", (rb"UID STORE 5 +FLAGS (\Seen)", rb"UID STORE 5 -FLAGS (\Seen)")),
)


async def _loop_one(port: int, user: str, lines: tuple[bytes, ...], n: int) -> None:
    async with inbox_session(port, user) as c:
        for i in range(n):
            await c.command(lines[i % len(lines)])


def per_command(target: Target, n: int) -> dict[str, float]:
    """Server CPU per command, one client looping over one command (``--per-command N``)."""
    name, port, users, pid = target
    out: dict[str, float] = {}
    for label, lines in PER_COMMAND:
        cpu0, t0 = server_cpu(pid), time.perf_counter()
        asyncio.run(_loop_one(port, users[0], lines, n))
        out[label] = 1e6 * (server_cpu(pid) - cpu0) / n
        wall = 1e6 * (time.perf_counter() - t0) / n
        print(f"  {name} one client, {label:<28} {out[label]:5.0f} us CPU/command  {wall:5.0f} us wall", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny and fast (CI): 4 users x 60 messages, 1.5 s")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="load-generator processes")
    ap.add_argument("--workers", type=int, default=0, help="Postroom workers (0: one per core)")
    ap.add_argument("--peer", choices=["all", "perf", "stock", "none"], default="perf")
    ap.add_argument("--per-command", type=int, default=0, metavar="N", help="also N of each command, one client")
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors" / "dovecot")
    args = ap.parse_args()
    if args.quick:
        args.users, args.messages, args.duration, args.runs, args.clients = 4, 60, 1.5, 1, [8]
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"IMAP load: {args.users} users x {args.messages} messages, clients {args.clients}, "
        f"{args.runs} x {args.duration:.0f} s, {args.procs} generator processes, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[int, dict[str, float]]] = {}
    per_cmd: dict[str, float] = {}
    data_dir = prepare_postroom(OUT, args.users, args.messages)
    port = free_port()
    proc, _ = start_postroom(data_dir, port, args.workers, "imap", GREETING)
    postroom: Target = ("postroom", port, [f"user{u:02d}@{DOMAIN}" for u in range(1, args.users + 1)], proc.pid)
    try:
        variants = {"all": ["perf", "stock"], "perf": ["perf"], "stock": ["stock"], "none": []}[args.peer]
        prepared = prepare_dovecot(args.anchors, args.users, args.messages) if variants else "not asked for"
        if isinstance(prepared, str):
            if variants:
                print(f"  dovecot skipped: {prepared}", flush=True)
            results.update(measure([postroom], args))
        else:
            stock_conf, perf_conf, dport = prepared
            for variant in variants:
                conf = perf_conf if variant == "perf" else stock_conf
                try:
                    pid = start_dovecot(conf, GREETING)
                except (OSError, RuntimeError, subprocess.CalledProcessError, ValueError) as exc:
                    print(f"  dovecot-{variant} skipped: could not start it ({exc})", flush=True)
                    continue
                try:
                    index_dovecot(conf)  # doveadm asks the running instance's auth for the users
                    names = [f"user{u:02d}" for u in range(1, args.users + 1)]
                    dovecot: Target = (f"dovecot-{variant}", dport, names, pid)
                    # Postroom is measured beside the first variant only (interleaved with it).
                    results.update(measure([postroom, dovecot] if "postroom" not in results else [dovecot], args))
                except RuntimeError as exc:
                    print(f"  dovecot-{variant} skipped: {exc}", flush=True)
                finally:
                    stop_dovecot(pid)
            if "postroom" not in results:
                results.update(measure([postroom], args))
        if args.per_command:
            per_cmd = per_command(postroom, args.per_command)
    finally:
        stop(proc)

    mine = results["postroom"]
    for peer in ("dovecot-perf", "dovecot-stock"):
        if peer in results:
            for clients, r in mine.items():
                ratio = r["commands_s"] / results[peer][clients]["commands_s"]
                print(f"  postroom / {peer} commands/s at {clients} clients: {ratio:.2f}x", flush=True)
    dump = {**results, "postroom-per-command": per_cmd} if per_cmd else results
    (OUT / ("result-quick.json" if args.quick else "result.json")).write_text(json.dumps(dump, indent=2))
    if any(r["errors"] for res in results.values() for r in res.values()):
        print("  note: some sessions failed (see errors above)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
