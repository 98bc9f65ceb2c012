"""``postroom queue list|retry|delete|flush`` and ``postroom dkim keygen|show DOMAIN``.

Invariants: every command works on the store the config names, also while ``postroom serve`` runs (the
store announces ``queue retry`` to the running server's runner, which then tries at once). The verbs are an
explicit table; errors are :class:`PostroomError` so the main CLI prints one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from postroom.config import Config
from postroom.delivery.dkimsign import dns_records, keygen, zone_line
from postroom.errors import ConfigError, PostroomError
from postroom.store.api import QueueEntry, Store


def _config(args: argparse.Namespace) -> Config:
    from postroom.cli import load_config

    return load_config(args)


def _with_store(args: argparse.Namespace, work: Callable[[Store], Any]) -> Any:
    from postroom.serve import open_configured_store

    cfg = _config(args)

    async def run() -> Any:
        store = await open_configured_store(cfg)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _ids(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise PostroomError("queue ids are numbers (see `postroom queue list`)") from None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def queue_list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> list[QueueEntry]:
        return await store.queue_list()

    entries: list[QueueEntry] = _with_store(args, work)
    if not args.all:
        entries = [e for e in entries if e.status in ("pending", "deferred")]
    if args.json:
        rows = [
            {
                "id": e.id,
                "message_id": e.message_id,
                "sender": e.sender,
                "recipient": e.recipient,
                "status": e.status,
                "attempts": e.attempts,
                "next_attempt": e.next_attempt,
                "last_reply": e.last_reply,
                "created": e.created,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=1))
        return 0
    if not entries:
        print("queue is empty" if not args.all else "no queue entries")
        return 0
    print(f"{'ID':>6}  {'STATUS':<9} {'TRIES':>5}  {'NEXT ATTEMPT (UTC)':<19}  FROM -> TO")
    for e in entries:
        nxt = _when(e.next_attempt) if e.status in ("pending", "deferred") else ""
        print(f"{e.id:>6}  {e.status:<9} {e.attempts:>5}  {nxt:<19}  <{e.sender}> -> <{e.recipient}>")
        if e.last_reply:
            print(f"{'':>8}{' '.join(e.last_reply.split())[:200]}")
    return 0


def queue_retry(args: argparse.Namespace) -> int:
    ids = _ids(args.ids) if args.ids else None

    async def work(store: Store) -> int:
        return await store.queue_retry(ids)

    n = _with_store(args, work)
    print(f"{n} queue entr{'y' if n == 1 else 'ies'} due now")
    return 0


def queue_delete(args: argparse.Namespace) -> int:
    ids = _ids(args.ids)

    async def work(store: Store) -> int:
        return await store.queue_delete(ids)

    n = _with_store(args, work)
    print(f"{n} queue entr{'y' if n == 1 else 'ies'} deleted")
    return 0 if n == len(ids) else 1


def queue_flush(args: argparse.Namespace) -> int:
    """Deliver everything due now from this process (for when no server runs), then exit."""
    from postroom.app import App
    from postroom.auth.service import Authenticator
    from postroom.delivery.runner import QueueRunner
    from postroom.serve import open_configured_store

    cfg = _config(args)

    async def run() -> int:
        import ssl

        store = await open_configured_store(cfg)
        try:
            if args.all:
                await store.queue_retry(None)
            app = App(cfg, store, Authenticator(store, cfg.auth), ssl.create_default_context())
            runner = QueueRunner(app)
            try:
                n = await runner.run_once()
            finally:
                await runner.stop()
            print(f"tried {n}: delivered {runner.delivered}, deferred {runner.deferred}, failed {runner.failed}")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def dkim_keygen(args: argparse.Namespace) -> int:
    cfg = _config(args)
    domain = args.domain.strip().lower().rstrip(".")
    if not domain or "@" in domain or " " in domain:
        raise ConfigError(f"invalid domain {args.domain!r}")
    records = keygen(cfg.data_path, domain, args.selector or cfg.delivery.dkim_selector)
    _print_records(domain, records, cfg)
    return 0


def dkim_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    domain = args.domain.strip().lower().rstrip(".")
    records = dns_records(cfg.data_path, domain, args.selector or cfg.delivery.dkim_selector)
    if not records:
        raise PostroomError(f"no DKIM keys for {domain} (postroom dkim keygen {domain})")
    _print_records(domain, records, cfg)
    return 0


def _print_records(domain: str, records: list[tuple[str, str]], cfg: Config) -> None:
    print(f"; DKIM keys for {domain}: publish these TXT records in the {domain} zone")
    for name, value in records:
        print(zone_line(name, value))
    if domain not in cfg.domains:
        print(f"; note: {domain} is not in `domains` of {cfg.source}; only local domains are signed")


#: verb -> (help, function, configure the verb's parser)
QUEUE_VERBS: dict[str, tuple[str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], object]]] = {
    "list": (
        "show queued recipients (pending and deferred; --all adds delivered and failed)",
        queue_list,
        lambda p: (p.add_argument("--all", action="store_true"), p.add_argument("--json", action="store_true")),
    ),
    "retry": (
        "make deferred entries due now (all, or the given ids)",
        queue_retry,
        lambda p: p.add_argument("ids", nargs="*", metavar="ID"),
    ),
    "delete": ("remove entries from the queue", queue_delete, lambda p: p.add_argument("ids", nargs="+", metavar="ID")),
    "flush": (
        "deliver what is due now from this process and exit (--all: everything)",
        queue_flush,
        lambda p: p.add_argument("--all", action="store_true"),
    ),
}

DKIM_VERBS: dict[str, tuple[str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], object]]] = {
    "keygen": (
        "create rsa-sha256 and ed25519-sha256 keys for DOMAIN and print the DNS TXT records",
        dkim_keygen,
        lambda p: (p.add_argument("domain"), p.add_argument("--selector", default="")),
    ),
    "show": (
        "print the DNS TXT records of DOMAIN's keys",
        dkim_show,
        lambda p: (p.add_argument("domain"), p.add_argument("--selector", default="")),
    ),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", help="override one setting (repeatable)")


def add_parser(subparsers: Any) -> None:
    """Register ``queue`` and ``dkim`` with their verbs."""
    for name, help_text, verbs in (
        ("queue", "show and manage the outbound queue", QUEUE_VERBS),
        ("dkim", "DKIM signing keys for local domains", DKIM_VERBS),
    ):
        group = subparsers.add_parser(name, help=help_text)
        sub = group.add_subparsers(dest="delivery_verb", metavar="COMMAND", required=True)
        for verb, (verb_help, func, configure) in verbs.items():
            p = sub.add_parser(verb, help=verb_help)
            _common(p)
            configure(p)
            p.set_defaults(delivery_func=func)


def run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.delivery_func
    return func(args)
