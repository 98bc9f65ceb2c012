"""The change feed: wake every watcher of a mailbox after a commit, here and in other processes.

Invariants:
- ``ChangeHub.notify`` runs on the event loop thread only (the writer thread uses
  ``loop.call_soon_threadsafe``); it only sets flags and events, never awaits.
- Announcements happen *after* the commit they announce, so a woken watcher always finds the change.
- Across processes sharing a data directory: each process binds a Unix datagram socket under
  ``run/``; after each commit the committing process sends one small datagram naming the changed
  mailbox and account ids to every other process that *watches* one of them, and only those ids. A
  process whose sessions watch nothing (an MX worker) is never woken by another's commit.
- Each process tells its peers what it watches: its whole set when it starts and in reply to a
  ``HELLO``, then each key it starts or stops watching, sent *synchronously* by ``watch()`` and
  ``Watch.close()``. A committing process reads its socket before it decides whom to tell. So a watch
  registered before the commit was announced is always seen: the watcher's datagram is already in the
  committer's socket (Unix datagrams between two sockets arrive in order and are not dropped, except
  when a receive buffer is full: see below). A peer whose set is not known yet (found by listing
  ``run/``) is sent every change until it tells its set.
- A lost datagram only delays a watcher until its next command (IMAP sessions also re-check on NOOP);
  every ``PEER_RESCAN`` seconds each process lists ``run/`` (a lost HELLO costs at most that long) and
  sends every peer its whole set again (a lost interest datagram costs at most that long). Sockets of
  dead processes are removed when a send finds no listener; a process that stops says ``BYE``.
- Mailbox id 0 is the outbound queue's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
from collections.abc import Iterable
from pathlib import Path

from postroom.store.api import Watch

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4096  # octets; larger change sets are split
PEER_RESCAN = 10.0  # seconds between listings of run/ for other processes' sockets
HELLO = b"HELLO"  # a new process introducing itself: answered with the receiver's whole interest set
BYE = b"BYE"  # a process that stops: forget it
INTEREST = b"I"  # the sender's whole interest set follows (``m1;a2``), replacing what was known of it
INTEREST_MORE = b"J"  # the rest of that set, when it takes more than one datagram
WATCHING = b"W"  # changes to the sender's interest set: ``+m5;-a3``


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
        self._poll: select.poll | None = None  # the socket alone: is a datagram waiting?
        self._sock_path: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: other processes' socket paths -> the keys they watch (``m5``, ``a3``); None: not known yet
        self._peers: dict[str, set[str] | None] = {}
        self._refresher: asyncio.TimerHandle | None = None

    # -- watches ----------------------------------------------------------------------------------
    def watch(self, kind: str, ident: int) -> Watch:
        key = (kind, ident)
        w = _HubWatch(self, key)
        group = self._watches.get(key)
        if group is None:
            group = self._watches[key] = set()
            self._tell_all([WATCHING + f"+{kind}{ident}".encode()])  # before the caller reads: see invariants
        group.add(w)
        return w

    def _remove(self, key: tuple[str, int], w: _HubWatch) -> None:
        group = self._watches.get(key)
        if group is not None:
            group.discard(w)
            if not group:
                del self._watches[key]
                self._tell_all([WATCHING + f"-{key[0]}{key[1]}".encode()])

    def notify(self, mailboxes: Iterable[int], accounts: Iterable[int] = (), *, broadcast: bool = True) -> None:
        """Wake local watchers; with ``broadcast`` also tell the other processes that watch any of them."""
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
        """Bind this process's socket, introduce it to the others and listen for their announcements."""
        if self._run_dir is None:
            return
        self._loop = loop
        self._run_dir.mkdir(parents=True, exist_ok=True)
        path = self._run_dir / f"notify-{os.getpid()}-{os.urandom(3).hex()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        self._sock, self._sock_path = sock, path
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._rescan()
        self._refresher = loop.call_later(PEER_RESCAN, self._refresh)

    def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self._sock is not None:
            self._tell_all([BYE])
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._poll = None
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
            if not isinstance(sender, str) or not sender:
                continue  # our sockets are all bound: not one of ours
            self._peers.setdefault(sender, None)
            head = data[:1]
            if data == HELLO:
                self._send(sender, self._interest())
            elif data == BYE:
                self._peers.pop(sender, None)
            elif head == INTEREST:
                self._peers[sender] = set(_items(data[1:]))
            elif head in (INTEREST_MORE, WATCHING):
                known = self._peers[sender]
                if known is None:
                    continue  # unknown still: it is sent everything until its whole set comes
                items = _items(data[1:])
                if head == INTEREST_MORE:
                    known.update(items)
                else:
                    for item in items:
                        (known.add if item[0] == "+" else known.discard)(item[1:])
            else:
                mbs, accts = decode(data)
                self.notify(mbs, accts, broadcast=False)

    def _broadcast(self, mbs: set[int], accts: set[int]) -> None:
        # The watches other processes registered before this announcement. Once per commit: a poll(2) that
        # usually finds nothing costs less than the recvfrom(2) and the exception of an empty read.
        if self._poll is not None and self._poll.poll(0):
            self._on_readable()
        # Peers that watch nothing (MX and submission workers) are skipped before any item is built.
        peers = [(peer, known) for peer, known in self._peers.items() if known is None or known]
        if not peers:
            return
        items = [f"m{m}" for m in sorted(mbs)] + [f"a{a}" for a in sorted(accts)]
        for peer, known in peers:
            wanted = items if known is None else [i for i in items if i in known]
            if wanted:
                self._send(peer, _pack(b"", b"", wanted))

    def _interest(self) -> list[bytes]:
        """This process's whole interest set, as datagrams."""
        return _pack(INTEREST, INTEREST_MORE, [f"{kind}{ident}" for kind, ident in self._watches])

    def _rescan(self) -> None:
        """List run/ for sockets of processes not known yet; introduce this one to each."""
        assert self._run_dir is not None
        own = str(self._sock_path)
        try:
            found = {str(p) for p in self._run_dir.iterdir() if p.name.endswith(".sock")} - {own}
        except OSError:
            return
        for peer in found - self._peers.keys():
            self._peers[peer] = None
            self._send(peer, [HELLO, *self._interest()])

    def _refresh(self) -> None:
        """Every PEER_RESCAN seconds: find new processes, and tell every peer this one's whole set again."""
        self._refresher = None
        if self._sock is None or self._loop is None:
            return
        self._rescan()
        self._tell_all(self._interest())
        self._refresher = self._loop.call_later(PEER_RESCAN, self._refresh)

    def _tell_all(self, payloads: list[bytes]) -> None:
        if self._sock is not None:
            for peer in list(self._peers):
                self._send(peer, payloads)

    def _send(self, peer: str, payloads: list[bytes]) -> None:
        assert self._sock is not None
        for payload in payloads:
            try:
                self._sock.sendto(payload, peer)
            except (ConnectionRefusedError, FileNotFoundError):
                self._peers.pop(peer, None)
                with contextlib.suppress(OSError):
                    os.unlink(peer)  # a dead process's socket
                return
            except OSError:  # BlockingIOError included: the peer is slow to read (see invariants)
                return


def _items(body: bytes) -> list[str]:
    return [item for item in body.decode("ascii", "replace").split(";") if item]


def _pack(first: bytes, more: bytes, items: list[str]) -> list[bytes]:
    """``items`` joined by ``;`` in datagrams of at most MAX_DATAGRAM octets: the first one after the
    prefix ``first`` (always sent, even empty), the others after ``more``."""
    out: list[bytes] = []
    cur: list[str] = []
    prefix, size = first, len(first)
    for it in items:
        if size + len(it) + 1 > MAX_DATAGRAM and cur:
            out.append(prefix + ";".join(cur).encode())
            prefix, cur, size = more, [], len(more)
        cur.append(it)
        size += len(it) + 1
    if cur or not out:
        out.append(prefix + ";".join(cur).encode())
    return out


def decode(data: bytes) -> tuple[set[int], set[int]]:
    mbs: set[int] = set()
    accts: set[int] = set()
    for item in _items(data):
        if item[1:].isdigit() and item[0] in "ma":
            (mbs if item[0] == "m" else accts).add(int(item[1:]))
    return mbs, accts
