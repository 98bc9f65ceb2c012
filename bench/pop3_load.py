#!/usr/bin/env python3
"""POP3 load: Postroom beside Dovecot (stock and high-performance process modes), same mail, one run.

Each session: connect, USER, PASS, STAT, UIDL, 20 x RETR of random messages, QUIT (25 commands), a new
connection per session, a random user of ``--users``. ``--clients`` concurrent sessions are spread over a
few load-generator processes (lean asyncio clients, one command at a time like poplib). Reported:
sessions/s, commands/s, RETR/s and Postroom's ratio to each Dovecot variant, median of ``--runs``.

Both servers hold the same mail: ``--users`` users x ``--messages`` messages of 4.5-5.7 KB (Postroom: its
SQLite store through the store API; Dovecot: Maildir, indexed with ``doveadm index``). Dovecot is configured
from the reference peers' files (``../shared/anchors/dovecot/`` beside the repository, or ``--anchors``),
rewritten to run self-contained under ``bench/out/pop3`` on free loopback ports; it is skipped (with a
note) when not installed. Only 127.0.0.1 is used.

    python bench/pop3_load.py            # full: 50 users x 1,000 messages, 8 and 32 clients, 3 runs
    python bench/pop3_load.py --quick    # a few seconds; CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _mailcorpus import (  # the shared corpus and process helpers: bench/_mailcorpus.py
    DOMAIN,
    PASSWORD,
    ROOT,
    SEED,
    dovecot_port,
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

OUT = ROOT / "bench" / "out" / "pop3"
RETR_PER_SESSION = 20
COMMANDS_PER_SESSION = 5 + RETR_PER_SESSION  # USER PASS STAT UIDL 20xRETR QUIT
GREETING = b"+OK"


# -- Dovecot -------------------------------------------------------------------------------------
def prepare_dovecot(anchors: Path, users: int, messages: int, variants: list[str]) -> dict[str, Path] | str:
    """Write the Maildirs and one config per variant (own port, base_dir and log, so the variants can run
    side by side with Postroom and the runs can be interleaved). Returns variant → config, or why skipped."""
    why = dovecot_unavailable(anchors)
    if why is not None:
        return why
    base = OUT / f"dovecot-{users}x{messages}"
    users_file, mail = write_dovecot_users(base, users), base / "vmail"
    confs: dict[str, Path] = {}
    for variant in dict.fromkeys(["stock", *variants]):
        conf = write_dovecot_conf(
            anchors, base, protocol="pop3", variant=variant, port=free_port(), users_file=users_file, mail=mail
        )
        if isinstance(conf, str):
            return conf
        confs[variant] = conf
    marker = base / "complete"
    if not marker.exists():
        t0 = time.monotonic()
        write_maildirs(mail, users, messages)
        pid = start_dovecot(confs["stock"], GREETING)  # doveadm asks the running instance's auth for the users
        try:
            res = subprocess.run(
                ["doveadm", "-c", str(confs["stock"]), "index", "-A", "INBOX"],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            stop_dovecot(pid)
        if res.returncode != 0:
            return f"doveadm index failed: {res.stderr.strip()[:200]}"
        marker.write_text("ok\n")
        print(f"  dovecot maildirs: {users} x {messages} messages in {time.monotonic() - t0:.1f} s", flush=True)
    return {v: confs[v] for v in variants}


# -- the load generator --------------------------------------------------------------------------
@dataclass
class Tally:
    sessions: int = 0
    commands: int = 0
    retrs: int = 0
    octets: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: list[float] = field(default_factory=list)


class Pop3Error(Exception):
    pass


async def _session(port: int, user: str, rng: random.Random, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        readline, readuntil, write = reader.readline, reader.readuntil, writer.write

        async def single(line: bytes) -> bytes:
            write(line)
            resp = await readline()
            if not resp.startswith(b"+OK"):
                raise Pop3Error(resp[:80])
            tally.commands += 1
            return resp

        async def multi(line: bytes) -> bytes:
            write(line)
            resp = await readuntil(b"\n.\r\n")  # the status line and the dot-stuffed body
            if not resp.startswith(b"+OK"):
                raise Pop3Error(resp[:80])
            tally.commands += 1
            return resp

        if not (await readline()).startswith(b"+OK"):
            raise Pop3Error("greeting")
        await single(b"USER " + user.encode() + b"\r\n")
        await single(b"PASS " + PASSWORD.encode() + b"\r\n")
        count = int((await single(b"STAT\r\n")).split()[1])
        await multi(b"UIDL\r\n")
        for _ in range(RETR_PER_SESSION):
            body = await multi(b"RETR %d\r\n" % rng.randint(1, count))
            tally.retrs += 1
            tally.octets += len(body)
        await single(b"QUIT\r\n")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _clients(port: int, slots: list[list[str]], start: float, end: float, seed: int) -> Tally:
    """One concurrent client per entry of ``slots``, each cycling through its own users."""
    tally = Tally()
    rng = random.Random(seed)
    await asyncio.sleep(max(0.0, start - time.time()))

    async def loop(users: list[str]) -> None:
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                await _session(port, rng.choice(users), rng, tally)
            except (OSError, Pop3Error, asyncio.IncompleteReadError, ValueError) as exc:
                tally.errors += 1
                tally.last_error = repr(exc)[:120]
                continue
            if time.time() <= end:
                tally.sessions += 1
                tally.latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(loop(users)) for users in slots]
    await asyncio.sleep(max(0.0, end - time.time()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def _worker(args: tuple[int, list[list[str]], float, float, int]) -> dict[str, Any]:
    return asdict(asyncio.run(_clients(*args)))


def load(port: int, users: list[str], clients: int, duration: float, procs: int) -> dict[str, Any]:
    """``clients`` concurrent sessions for ``duration`` seconds from ``procs`` processes; rates per second.

    Client ``i`` logs in only as ``users[i::clients]``: a POP3 maildrop is locked per session (RFC 1939 §4),
    so two clients never ask for the same maildrop at once (and both servers see the same pattern).
    """
    if len(users) < clients:
        raise SystemExit(f"need at least as many users ({len(users)}) as clients ({clients})")
    slots = [users[i::clients] for i in range(clients)]
    procs = max(1, min(procs, clients))
    start = time.time() + 0.5
    end = start + duration
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        parts = pool.map(_worker, [(port, slots[i::procs], start, end, SEED + i) for i in range(procs)])
    lat = sorted(x for p in parts for x in p["latencies"])
    total = {k: sum(p[k] for p in parts) for k in ("sessions", "commands", "retrs", "octets", "errors")}
    return {
        "sessions_s": total["sessions"] / duration,
        "commands_s": total["commands"] / duration,
        "retr_s": total["retrs"] / duration,
        "mb_s": total["octets"] / duration / 1e6,
        "errors": total["errors"],
        "last_error": next((p["last_error"] for p in parts if p["last_error"]), ""),
        "session_p50_ms": 1000 * lat[len(lat) // 2] if lat else 0.0,
        "session_p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else 0.0,
    }


async def _login_once(port: int, user: str) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for line in (b"", b"USER " + user.encode() + b"\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"):
            writer.write(line)
            if not (await reader.readline()).startswith(b"+OK"):
                raise Pop3Error(f"warm-up login of {user} failed")
        writer.write(b"QUIT\r\n")
        await reader.readline()
    finally:
        writer.close()
    return time.perf_counter() - t0


async def _warm_up(port: int, users: list[str], fast: float = 0.03, streak: int = 8) -> None:
    """Log every user in until ``streak`` logins in a row take under ``fast`` seconds: by then each server
    process has verified the password once and answers from its cache (Postroom's argon2id verification
    costs ~0.1-0.5 s once per user and worker; Dovecot's {PLAIN} users cost nothing)."""
    sem = asyncio.Semaphore(os.cpu_count() or 2)

    async def one(user: str) -> None:
        run = 0
        for _ in range(200):
            async with sem:
                took = await _login_once(port, user)
            run = run + 1 if took < fast else 0
            if run >= streak:
                return

    await asyncio.gather(*(one(u) for u in users))


@dataclass
class Target:
    name: str
    port: int
    users: list[str]


def warm_up(target: Target, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    asyncio.run(_warm_up(target.port, target.users))
    load(target.port, target.users, max(args.clients), min(2.0, args.duration), args.procs)  # page cache, indexes
    print(f"  {target.name:<14} warmed up in {time.monotonic() - t0:.1f} s", flush=True)


def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, dict[int, dict[str, Any]]]:
    """Every run measures each target in turn (interleaved), so background noise hits all of them alike."""
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {t.name: {c: [] for c in args.clients} for t in targets}
    for clients in args.clients:
        for _ in range(args.runs):
            for t in targets:
                raw[t.name][clients].append(load(t.port, t.users, clients, args.duration, args.procs))
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for t in targets:
        out[t.name] = {}
        for clients, runs in raw[t.name].items():
            med: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "last_error"}
            med["last_error"] = next((r["last_error"] for r in runs if r["last_error"]), "")
            med["retr_s_runs"] = [round(r["retr_s"]) for r in runs]
            out[t.name][clients] = med
    return out


def report(results: dict[str, dict[int, dict[str, Any]]]) -> None:
    print(
        f"  {'server':<14} {'clients':>7} {'RETR/s':>8} {'sessions/s':>10} {'commands/s':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  RETR/s per run"
    )
    for name, by_clients in results.items():
        for clients, m in by_clients.items():
            print(
                f"  {name:<14} {clients:>7} {m['retr_s']:>8.0f} {m['sessions_s']:>10.1f} {m['commands_s']:>10.0f} "
                f"{m['session_p50_ms']:>7.0f} {m['session_p99_ms']:>7.0f} {m['errors']:>6.0f}  {m['retr_s_runs']}"
                + (f"  last error: {m['last_error']}" if m["last_error"] else ""),
                flush=True,
            )
    mine = results["postroom"]
    for peer in ("dovecot-perf", "dovecot-stock"):
        if peer in results:
            for clients, r in mine.items():
                ratio = r["retr_s"] / results[peer][clients]["retr_s"]
                print(f"  postroom / {peer} RETR/s at {clients} clients: {ratio:.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny and fast (CI): 4 users x 40 messages, 4 clients, 1 s, perf Dovecot only",
    )
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="load-generator processes")
    ap.add_argument("--workers", type=int, default=0, help="Postroom workers (0: one per core)")
    ap.add_argument("--peer", choices=["all", "perf", "stock", "none"], default="all")
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors" / "dovecot")
    args = ap.parse_args()
    if args.quick:
        args.users, args.messages, args.duration, args.runs, args.clients = 4, 40, 1.0, 1, [4]
        if args.peer == "all":
            args.peer = "perf"
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"POP3 load: {args.users} users x {args.messages} messages, clients {args.clients}, "
        f"{args.runs} x {args.duration:.0f} s, {args.procs} generator processes, {os.cpu_count()} CPUs",
        flush=True,
    )
    variants = {"all": ["perf", "stock"], "perf": ["perf"], "stock": ["stock"], "none": []}[args.peer]
    data_dir = prepare_postroom(OUT, args.users, args.messages)
    dovecot: dict[str, Path] = {}
    if variants:
        prepared = prepare_dovecot(args.anchors, args.users, args.messages, variants)
        if isinstance(prepared, str):
            print(f"  dovecot skipped: {prepared}", flush=True)
        else:
            dovecot = prepared
    port = free_port()
    proc, _ = start_postroom(data_dir, port, args.workers, "pop3", GREETING)
    pids: list[int] = []
    try:
        targets = [Target("postroom", port, [f"user{u:02d}@{DOMAIN}" for u in range(1, args.users + 1)])]
        for variant, conf in dovecot.items():
            try:
                pids.append(start_dovecot(conf, GREETING))
            except (OSError, RuntimeError, subprocess.CalledProcessError, ValueError) as exc:
                print(f"  dovecot-{variant} skipped: it did not start ({exc})", flush=True)
                continue
            names = [f"user{u:02d}" for u in range(1, args.users + 1)]
            targets.append(Target(f"dovecot-{variant}", dovecot_port(conf), names))
        for t in targets:
            warm_up(t, args)
        results = measure(targets, args)
    finally:
        stop(proc)
        for pid in pids:
            stop_dovecot(pid)
    report(results)
    (OUT / ("result-quick.json" if args.quick else "result.json")).write_text(json.dumps(results, indent=2))
    if any(r["errors"] for res in results.values() for r in res.values()):
        print("  note: some sessions failed (see errors above)", flush=True)
    print(f"  results: {OUT.relative_to(ROOT) / ('result-quick.json' if args.quick else 'result.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
