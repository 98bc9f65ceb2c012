"""The asyncio adapter: moves bytes between a :class:`Connection` and the sans-I/O IMAP core.

Invariants:
- After STARTTLS the reader's buffer is cleared *and* ``conn.start_tls`` discards unread plaintext, so
  nothing pipelined behind STARTTLS runs inside TLS.
- On a plain ``imap`` listener LOGIN/AUTHENTICATE are refused (LOGINDISABLED) until TLS, unless
  ``auth.allow_plaintext_on_loopback`` and the peer is loopback.
- Timeouts: ``pre_auth_timeout`` before login, ``idle_timeout`` (≥ 30 min, RFC 9051 §5.4) after; expiry
  sends ``* BYE`` and closes.
- At most ``max_connections_per_user_ip`` logged-in sessions per (user, IP), counted per process.
- During IDLE the session waits on both the socket (for DONE) and the mailbox watch; a change is announced
  as soon as the watch fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from typing import cast

from postroom.app import App, ListenerSpec
from postroom.imap.blobcache import BlobCache
from postroom.imap.core import Outcome, Session, State
from postroom.imap.dispatch import execute, idle_done
from postroom.imap.reader import (
    Command,
    CommandReader,
    ContinueLiteral,
    Line,
    LineTooLong,
    LiteralRejected,
    Malformed,
)
from postroom.imap.snapshots import Snapshots
from postroom.net.connection import Connection
from postroom.store.api import AppendTarget, Changes, Store, Watch

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024


_SECRET_VERBS = (b"LOGIN", b"AUTHENTICATE")


def redact(line: bytes) -> str:
    """A command line for the debug transcript: credentials and literal contents never appear."""
    parts = line.split(b" ", 2)
    if len(parts) == 3 and parts[1].upper() in _SECRET_VERBS:
        line = parts[0] + b" " + parts[1] + b" <redacted>"
    return re.sub(rb"\x00\d+\x00", b"<literal>", line).decode("utf-8", "replace")[:200]


class _UserIpLimiter:
    """Logged-in sessions per (address, ip) in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, str], int] = {}

    def admit(self, address: str, ip: str) -> bool:
        key = (address, ip)
        n = self.counts.get(key, 0)
        if n >= self.limit:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, address: str, ip: str) -> None:
        key = (address, ip)
        n = self.counts.get(key, 0) - 1
        if n <= 0:
            self.counts.pop(key, None)
        else:
            self.counts[key] = n


class _SharedChanges:
    """``ChangesSource`` for one process: sessions woken by the same commit share one query.

    A sentinel watch per mailbox counts announcements ("generations"). A result, or a query in flight, is
    reused only by callers in the generation it started in, so it never predates a commit announced to
    them; ``fresh`` (NOOP and friends) always asks the store, so a lost cross-process datagram delays a
    session by at most one command. The store's query runs in the caller's task (no task per call: the
    SQLite store answers it on the event loop); a caller that finds it in flight waits for it, and asks
    the store itself when that caller failed or was cancelled.
    """

    MAX_MAILBOXES = 10_000  # sentinel watches kept; the least recently used is closed beyond this
    MAX_RESULTS = 8  # results kept per mailbox and generation (sessions at different MODSEQs)

    def __init__(self, store: Store) -> None:
        self.store = store
        #: mailbox id -> (sentinel watch, {modseq: result, or a future while the query is in flight})
        self.entries: OrderedDict[int, tuple[Watch, dict[int, Changes | asyncio.Future[Changes | None]]]] = (
            OrderedDict()
        )

    async def get(self, mailbox_id: int, modseq: int, fresh: bool = False) -> Changes:
        while True:
            entry = self.entries.get(mailbox_id)
            if entry is None:
                entry = (self.store.watch(mailbox_id), {})
                self.entries[mailbox_id] = entry
                while len(self.entries) > self.MAX_MAILBOXES:
                    self.entries.popitem(last=False)[1][0].close()
            else:
                self.entries.move_to_end(mailbox_id)
            sentinel, results = entry
            if sentinel.pending:  # a new generation: nothing from before it may be handed out
                sentinel.clear()
                results.clear()
            hit = None if fresh else results.get(modseq)
            if hit is None:
                return await self._query(mailbox_id, modseq, results)
            if not isinstance(hit, asyncio.Future):
                return hit
            done = await asyncio.shield(hit)
            if done is not None:
                return done
            # the query's owner failed or was cancelled: go round and ask the store

    async def _query(
        self, mailbox_id: int, modseq: int, results: dict[int, Changes | asyncio.Future[Changes | None]]
    ) -> Changes:
        if len(results) >= self.MAX_RESULTS:
            results.clear()
        waiting: asyncio.Future[Changes | None] = asyncio.get_running_loop().create_future()
        results[modseq] = waiting
        changes: Changes | None = None
        try:
            changes = await self.store.changes_since(mailbox_id, modseq)
            return changes
        finally:
            if results.get(modseq) is waiting:
                if changes is None:
                    del results[modseq]
                else:
                    results[modseq] = changes
            waiting.set_result(changes)


class _Deadline:
    """The wait for the client's next command, timed by one lazily re-armed timer per connection.

    ``asyncio.timeout`` around every read cost ~7 µs per command (a timer made and cancelled each time);
    here a read only notes when it started. The timer fires at most once per timeout period: when the
    connection is not waiting, or has waited less than the timeout, it re-arms for the rest; otherwise it
    cancels the serving task, and :meth:`expired_by` turns that cancellation into the timeout (the way
    ``asyncio.timeout`` does, so a cancellation from elsewhere still propagates).
    """

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = timeout
        self.since = self.loop.time()
        self.waiting = False
        self.fired = False
        self.handle = self.loop.call_at(self.since + timeout, self._check)

    def start(self, timeout: float) -> None:
        """A wait for the client begins now; it may last ``timeout`` seconds."""
        self.timeout = timeout
        self.since = self.loop.time()
        self.waiting = True
        if self.handle.when() > self.since + timeout:  # a shorter timeout than the timer's: re-arm sooner
            self.handle.cancel()
            self.handle = self.loop.call_at(self.since + timeout, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if not self.waiting:  # busy with a command: the next wait cannot end before a timeout from now
            self.handle = self.loop.call_at(now + self.timeout, self._check)
        elif now < self.since + self.timeout:  # this wait began after the timer was set
            self.handle = self.loop.call_at(self.since + self.timeout, self._check)
        elif self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def expired_by(self, exc: asyncio.CancelledError) -> bool:
        """True when ``exc`` is this deadline's own cancellation (then it is consumed)."""
        if not self.fired or self.task is None:
            return False
        self.fired = False
        return self.task.uncancel() == 0

    def close(self) -> None:
        self.handle.cancel()


class _Io:
    def __init__(self, conn: Connection, reader: CommandReader, timeout: float) -> None:
        self.conn = conn
        self.reader = reader
        self.timeout = timeout

    def write(self, data: bytes) -> None:
        self.conn.write(data)

    async def drain(self) -> None:
        await self.conn.drain()

    async def read_line(self) -> bytes | None:
        self.reader.read_line_mode = True
        try:
            while True:
                ev = self.reader.next_event()
                if isinstance(ev, Line):
                    return ev.data
                if ev is not None:
                    return None
                data = await self.conn.read(READ_CHUNK, timeout=self.timeout)
                if not data:
                    return None
                self.reader.receive_data(data)
        finally:
            self.reader.read_line_mode = False


async def handle(conn: Connection, app: App, spec: ListenerSpec) -> None:
    """Serve one IMAP connection until LOGOUT, EOF, timeout or a fatal protocol error."""
    cfg = app.config.imap
    plaintext_ok = app.config.auth.allow_plaintext_on_loopback and conn.is_loopback
    reader = CommandReader(cfg.max_line, cfg.max_literal)
    io = _Io(conn, reader, cfg.pre_auth_timeout)
    store = app.store

    async def append(mailbox_id: int, raw: bytes, flags: frozenset[str], when: float | None) -> int:
        placed = await store.append(raw, [AppendTarget(mailbox_id, flags, when)])
        return placed[0][1]

    snapshots = app.extras.get("imap.snapshots")
    if not isinstance(snapshots, Snapshots):
        snapshots = Snapshots()
        app.extras["imap.snapshots"] = snapshots
    shared = app.extras.get("imap.changes")
    if not isinstance(shared, _SharedChanges):
        shared = _SharedChanges(store)
        app.extras["imap.changes"] = shared
    blobs = app.extras.get("imap.blobs")
    if not isinstance(blobs, BlobCache):
        blobs = BlobCache(cfg.body_cache_bytes)
        app.extras["imap.blobs"] = blobs
    session = Session(
        store=store,  # Store satisfies MailPort structurally
        append=append,
        authenticate=app.auth.authenticate,
        io=io,
        config=cfg,
        peer_ip=conn.peer[0],
        tls=conn.is_tls,
        starttls=spec.service == "imap",
        plaintext_ok=plaintext_ok,
        hostname=app.hostname,
        snapshots=snapshots,
        changes_source=shared,
        blob_cache=blobs,
    )
    limiter = app.extras.get("imap.userip")
    if not isinstance(limiter, _UserIpLimiter):
        limiter = _UserIpLimiter(cfg.max_connections_per_user_ip)
        app.extras["imap.userip"] = limiter
    admitted: list[tuple[str, str]] = []

    def admit(address: str, ip: str) -> bool:
        ok = limiter.admit(address, ip)
        if ok:
            admitted.append((address, ip))
        return ok

    session.admit = admit
    conn.write(f"* OK [CAPABILITY {session.capabilities()}] Postroom IMAP ready\r\n".encode())
    try:
        await _serve(conn, app, session, reader, io)
    finally:
        session.deselect()
        for address, ip in admitted:
            limiter.release(address, ip)


async def _serve(conn: Connection, app: App, session: Session, reader: CommandReader, io: _Io) -> None:
    cfg = app.config.imap
    deadline = _Deadline(cfg.pre_auth_timeout)
    try:
        await _commands(conn, app, session, reader, io, deadline)
    finally:
        deadline.close()


async def _commands(
    conn: Connection, app: App, session: Session, reader: CommandReader, io: _Io, deadline: _Deadline
) -> None:
    cfg = app.config.imap
    while True:
        ev = reader.next_event()
        if ev is None:
            io.timeout = cfg.pre_auth_timeout if session.state is State.NOT_AUTH else cfg.idle_timeout
            deadline.start(io.timeout)
            try:
                data = await conn.read(READ_CHUNK)
            except asyncio.CancelledError as exc:
                if not deadline.expired_by(exc):
                    raise
                conn.write(b"* BYE Autologout; idle for too long\r\n")
                return
            finally:
                deadline.waiting = False
            if not data:
                return
            reader.receive_data(data)
            continue
        if isinstance(ev, Command):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("imap %s:%d C: %s", conn.peer[0], conn.peer[1], redact(ev.line))
            outcome = await execute(session, ev)
            session.flush()
            if session.bye:
                conn.write(f"* BYE {session.bye}\r\n".encode())
                return
            if outcome is Outcome.LOGOUT:
                return
            if outcome is Outcome.STARTTLS:
                reader.clear()
                try:
                    await conn.start_tls(app.tls)
                except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                    log.warning("imap STARTTLS handshake with %s failed: %s", conn.peer[0], exc)
                    return
                reader.clear()
            elif outcome is Outcome.IDLE and not await _idle(conn, session, reader, ev):
                return
        elif isinstance(ev, ContinueLiteral):
            conn.write(b"+ Ready for literal data\r\n")
        elif isinstance(ev, LiteralRejected):
            if ev.fatal:
                conn.write(f"* BYE [TOOBIG] Literal of {ev.size} octets is too large\r\n".encode())
                return
            conn.write(f"{ev.tag} NO [TOOBIG] Literal of {ev.size} octets is too large\r\n".encode())
        elif isinstance(ev, LineTooLong):
            log.warning("imap line too long from %s", conn.peer[0])
            conn.write(f"{ev.tag} BAD [TOOBIG] Command line too long\r\n".encode())
        elif isinstance(ev, Malformed):
            conn.write(f"{ev.tag} BAD {ev.reason}\r\n".encode())
        elif isinstance(ev, Line):  # pragma: no cover - only produced in read_line_mode
            continue


async def _idle(conn: Connection, session: Session, reader: CommandReader, cmd: Command) -> bool:
    """Run IDLE until DONE (True) or the connection ends (False). RFC 2177."""
    tag = cmd.line.split(b" ", 1)[0].decode("ascii", "replace")
    timeout = session.config.idle_timeout
    read_task: asyncio.Task[bytes] | None = None
    reader.read_line_mode = True
    try:
        while True:
            ev = reader.next_event()
            if isinstance(ev, Line):
                reader.read_line_mode = False
                if ev.data.strip().upper() == b"DONE":
                    await idle_done(session, tag)
                else:
                    session.tagged(tag, "BAD", "Expected DONE")
                session.flush()
                return True
            if ev is not None:
                continue
            if read_task is None:
                read_task = asyncio.ensure_future(conn.read(READ_CHUNK))
            waiters: set[asyncio.Future[object]] = {cast("asyncio.Future[object]", read_task)}
            watch_task: asyncio.Task[None] | None = None
            watch = session.watch
            if isinstance(watch, Watch):
                watch_task = asyncio.ensure_future(watch.wait())
                waiters.add(cast("asyncio.Future[object]", watch_task))
            try:
                done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if watch_task is not None and not watch_task.done():
                    watch_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch_task
            if not done:
                conn.write(b"* BYE Autologout; idle for too long\r\n")
                return False
            if read_task in done:
                data = read_task.result()
                read_task = None
                if not data:
                    return False
                reader.receive_data(data)
            if watch_task is not None and watch_task in done:
                await session.poll(allow_expunge=True)
                session.flush()
                if session.bye:
                    conn.write(f"* BYE {session.bye}\r\n".encode())
                    return False
    finally:
        reader.read_line_mode = False
        if read_task is not None and not read_task.done():
            read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read_task
