"""The change feed: wake every watcher of a mailbox after a commit, here and in other processes.

Invariants:
- ``ChangeHub.notify`` runs on the event loop thread only (the writer thread uses
  ``loop.call_soon_threadsafe``); it only sets flags and events, never awaits.
- Announcements happen *after* the commit they announce, so a woken watcher always finds the change.
- Across processes sharing a data directory: each process binds a Unix datagram socket under
  ``run/``; after each commit the committing process sends one small datagram naming the changed
  mailbox and account ids to every other socket there. A lost datagram only delays a watcher until its
  next command (IMAP sessions also re-check on NOOP); sockets of dead processes are removed.
- The list of other processes' sockets is kept in memory, not read from ``run/`` on every commit: a
  process that starts sends a ``HELLO`` datagram to every socket it finds, and whoever receives any
  datagram adds its sender; a send that finds no listener drops that peer. ``run/`` is listed again every
  ``PEER_RESCAN`` seconds as a safety net, so a lost HELLO costs at most that long.
- Mailbox id 0 is the outbound queue's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from postroom.store.api import Watch

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4096  # octets; larger change sets are split
PEER_RESCAN = 10.0  # seconds between listings of run/ for other processes' sockets
HELLO = b"HELLO"  # a new process introducing itself; carries no change


class _HubWatch(Watch):
    def __init__(self, hub: ChangeHub, key: tuple[str, int]) -> None:
        self._hub = hub
        self._key = key
        self._event = asyncio.Event()

    @property
    def pending(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._hub._remove(self._key, self)


class ChangeHub:
    """Per-process registry of watches, plus the cross-process datagram channel."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self._watches: dict[tuple[str, int], set[_HubWatch]] = {}
        self._run_dir = run_dir
        self._sock: socket.socket | None = None
        self._sock_path: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: set[str] = set()  # other processes' socket paths
        self._scanned = -PEER_RESCAN  # monotonic time of the last listing of run/

    # -- watches ----------------------------------------------------------------------------------
    def watch(self, kind: str, ident: int) -> Watch:
        key = (kind, ident)
        w = _HubWatch(self, key)
        self._watches.setdefault(key, set()).add(w)
        return w

    def _remove(self, key: tuple[str, int], w: _HubWatch) -> None:
        group = self._watches.get(key)
        if group is not None:
            group.discard(w)
            if not group:
                del self._watches[key]

    def notify(self, mailboxes: Iterable[int], accounts: Iterable[int] = (), *, broadcast: bool = True) -> None:
        """Wake local watchers; with ``broadcast`` also tell the other processes."""
        mbs = set(mailboxes)
        accts = set(accounts)
        for m in mbs:
            for w in self._watches.get(("m", m), ()):
                w.set()
        for a in accts:
            for w in self._watches.get(("a", a), ()):
                w.set()
        if broadcast and self._sock is not None and (mbs or accts):
            self._broadcast(mbs, accts)

    # -- cross-process ----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind this process's socket and listen for other processes' announcements."""
        if self._run_dir is None:
            return
        self._loop = loop
        self._run_dir.mkdir(parents=True, exist_ok=True)
        path = self._run_dir / f"notify-{os.getpid()}-{os.urandom(3).hex()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        self._sock, self._sock_path = sock, path
        loop.add_reader(sock.fileno(), self._on_readable)
        self._send_all([HELLO])

    def stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._sock_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._sock_path.unlink()
            self._sock_path = None

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if isinstance(sender, str) and sender:
                self._peers.add(sender)
            if data == HELLO:
                continue
            mbs, accts = decode(data)
            self.notify(mbs, accts, broadcast=False)

    def _broadcast(self, mbs: set[int], accts: set[int]) -> None:
        self._send_all(encode(mbs, accts))

    def _send_all(self, payloads: list[bytes]) -> None:
        assert self._sock is not None and self._run_dir is not None
        now = time.monotonic()
        if now - self._scanned >= PEER_RESCAN:
            self._scanned = now
            with contextlib.suppress(OSError):
                own = str(self._sock_path)
                self._peers |= {str(p) for p in self._run_dir.iterdir() if p.name.endswith(".sock")} - {own}
        for peer in list(self._peers):
            for payload in payloads:
                try:
                    self._sock.sendto(payload, peer)
                except (ConnectionRefusedError, FileNotFoundError):
                    self._peers.discard(peer)
                    with contextlib.suppress(OSError):
                        os.unlink(peer)  # a dead process's socket
                    break
                except (BlockingIOError, OSError):
                    break  # the peer is slow to read; it re-checks on its next command


def encode(mbs: set[int], accts: set[int]) -> list[bytes]:
    """``m1,2,3;a4`` in datagrams of at most MAX_DATAGRAM octets."""
    items = [f"m{m}" for m in sorted(mbs)] + [f"a{a}" for a in sorted(accts)]
    out: list[bytes] = []
    cur: list[str] = []
    size = 0
    for it in items:
        if size + len(it) + 1 > MAX_DATAGRAM and cur:
            out.append(";".join(cur).encode())
            cur, size = [], 0
        cur.append(it)
        size += len(it) + 1
    if cur:
        out.append(";".join(cur).encode())
    return out


def decode(data: bytes) -> tuple[set[int], set[int]]:
    mbs: set[int] = set()
    accts: set[int] = set()
    for item in data.decode("ascii", "replace").split(";"):
        if len(item) < 2 or not item[1:].isdigit():
            continue
        (mbs if item[0] == "m" else accts if item[0] == "a" else set()).add(int(item[1:]))
    return mbs, accts
