"""The asyncio adapter: runs one :class:`~postroom.smtp.server.SmtpServer` core over a Connection and makes
its decisions with the store, the authenticator and the config.

Invariants:
- **250 means durable**: the reply to the final dot / BDAT LAST is queued only after ``store.append``
  returned (the store fsyncs, with group commit). Any failure gives 451 4.3.0 (StoreFullError: 452 4.3.1),
  never 250. One stored copy serves every local recipient of a transaction.
- Remote recipients (submission only) go to the outbound queue through the same ``append`` call, in the
  same commit as the local copies. ``Return-Path:`` is added only when there are local recipients; the
  queue runner drops a leading ``Return-Path:`` before relaying (RFC 5321 §4.4).
- After STARTTLS the Connection drops unread plaintext and the core drops what it buffered.
- Deadlines: a command must be complete within ``command_timeout`` of the previous one (a client trickling
  bytes does not reset it); message content must progress every ``data_timeout`` and finish within
  ``data_deadline``. Then 421 and close.
- Graceful shutdown (``net.server.shutdown_event``): a session waiting for a command answers ``421 4.3.2``
  and closes; one receiving or storing a message finishes it (250 or 4xx) and then says 421.
- CancelledError is never swallowed; an unexpected exception while delivering becomes 451 4.3.0 and is
  logged with its traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import MutableMapping
from typing import Any

from postroom.app import App, ListenerSpec
from postroom.errors import StoreFullError
from postroom.net.connection import Connection
from postroom.net.server import shutdown_event
from postroom.smtp import policy, trace
from postroom.smtp.events import AuthAttempt, Close, MailFrom, Message, NeedData, RcptTo, StartTls
from postroom.smtp.server import Settings, SmtpServer
from postroom.store.api import Account, AppendTarget, OutboundEnvelope, OutboundRecipient
from postroom.wire import replies
from postroom.wire.replies import Reply

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_PREFIX = os.urandom(3).hex()

#: How often (seconds) sessions waiting for a command look for a graceful shutdown (one timer per App).
SHUTDOWN_POLL = 0.5
#: Recipient lookups are cached this long (seconds) per process; a new account is found within it.
RCPT_CACHE_TTL = 2.0
RCPT_CACHE_SIZE = 10_000


class _ConnLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        assert self.extra is not None
        return f"[{self.extra['cid']} {self.extra['peer']}] {msg}", kwargs


class _Local:
    """Token of an accepted local recipient: the INBOX it lands in."""

    __slots__ = ("mailbox_id",)

    def __init__(self, mailbox_id: int) -> None:
        self.mailbox_id = mailbox_id


async def _inbox_for(app: App, key: str) -> int | None:
    """The INBOX mailbox id mail to ``key`` lands in (alias-resolved), cached briefly per process."""
    cache: dict[str, tuple[float, int | None]] = app.extras.setdefault("smtp.rcpt_cache", {})
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    account = await app.store.resolve(key)
    mailbox_id: int | None = None
    if account is not None:
        mbox = await app.store.get_mailbox(account.id, "INBOX")
        mailbox_id = mbox.id if mbox is not None else None
    if len(cache) >= RCPT_CACHE_SIZE:
        cache.clear()
    # Only hits are cached: an unknown user becomes known as soon as the account exists.
    if mailbox_id is not None:
        cache[key] = (now + RCPT_CACHE_TTL, mailbox_id)
    return mailbox_id


class _Deadline:
    """One timer per session instead of one per read (an ``asyncio.timeout`` per read costs a timer
    handle, a heap push and a cancel each time). ``arm(when)`` before a read, ``disarm()`` after; when
    the timer finds an armed deadline passed it cancels the task, and :meth:`expired` claims that."""

    __slots__ = ("_fired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        self._loop = loop
        self._task = task
        self._when = math.inf
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def arm(self, when: float) -> None:
        self._when = when
        handle = self._handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(when, self._check)

    def disarm(self) -> None:
        self._when = math.inf  # the timer stays; when it fires it finds nothing armed and stops

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def interrupt(self) -> None:
        """End the current read now (graceful shutdown); no-op when no read is armed."""
        if self._when != math.inf:
            self._fired = True
            self._task.cancel()

    def _check(self) -> None:
        self._handle = None
        if self._when == math.inf:
            return
        if self._loop.time() < self._when:
            self._handle = self._loop.call_at(self._when, self._check)
            return
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """True (once) when the CancelledError being handled came from this deadline."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0


class _Idle:
    """Sessions waiting for their next command. When the server begins a graceful shutdown they answer
    ``421 4.3.2`` and close at once; sessions busy with a message finish it first. One polling timer per
    App while any session waits, instead of a waiter task per connection."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self.stopping = shutdown_event(app)
        self.loop = loop
        self.waiting: set[_Deadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    @staticmethod
    def of(app: App) -> _Idle:
        idle = app.extras.get("smtp.idle")
        loop = asyncio.get_running_loop()
        if not isinstance(idle, _Idle) or idle.loop is not loop:
            idle = _Idle(app, loop)
            app.extras["smtp.idle"] = idle
        return idle

    def add(self, deadline: _Deadline) -> None:
        self.waiting.add(deadline)
        if self._handle is None:
            self._handle = self.loop.call_later(SHUTDOWN_POLL, self._poll)

    def _poll(self) -> None:
        self._handle = None
        if self.stopping.is_set():
            for deadline in list(self.waiting):
                deadline.interrupt()
        elif self.waiting:
            self._handle = self.loop.call_later(SHUTDOWN_POLL, self._poll)


class Session:
    """One SMTP connection: the core, the connection and the decisions."""

    def __init__(self, conn: Connection, app: App, spec: ListenerSpec) -> None:
        self.conn = conn
        self.app = app
        self.spec = spec
        self.limits = app.config.smtp
        self.submission = spec.service in ("submission", "submissions")
        self.account: Account | None = None
        self.log = _ConnLog(log, {"cid": f"{_PREFIX}{next(_ids):x}", "peer": conn.peer[0]})
        plaintext_ok = app.config.auth.allow_plaintext_on_loopback and conn.is_loopback
        self.core = SmtpServer(
            Settings(
                hostname=app.hostname,
                limits=self.limits,
                submission=self.submission,
                tls=conn.is_tls,
                starttls=not conn.is_tls,
                plaintext_auth=plaintext_ok,
            )
        )

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(asyncio.get_running_loop(), task)
        try:
            await self._loop(deadline)
        finally:
            deadline.close()

    async def _loop(self, deadline: _Deadline) -> None:
        core, conn, limits = self.core, self.conn, self.limits
        loop = asyncio.get_running_loop()
        idle = _Idle.of(self.app)
        seen_commands = -1
        command_deadline = 0.0
        data_deadline: float | None = None
        while True:
            event = core.next_event()
            if isinstance(event, NeedData):
                out = core.data_to_send()
                if out:
                    conn.write(out)
                    if conn.write_blocked:
                        await conn.drain()
                now = loop.time()
                if core.in_data:
                    if data_deadline is None:
                        data_deadline = now + limits.data_deadline
                    until = min(now + limits.data_timeout, data_deadline)
                else:
                    data_deadline = None
                    if core.commands != seen_commands:
                        seen_commands = core.commands
                        command_deadline = now + limits.command_timeout
                    until = command_deadline
                between_commands = not core.in_data
                if between_commands and idle.stopping.is_set():
                    core.shutting_down()  # 421 4.3.2: the server is going away (RFC 5321 §3.8)
                    continue
                data = b""
                if until > now:
                    deadline.arm(until)
                    if between_commands:
                        idle.add(deadline)
                    try:
                        data = await conn.read(65536)
                    except asyncio.CancelledError:
                        if not deadline.expired():
                            raise
                        if idle.stopping.is_set() and between_commands:
                            continue  # back to the top: 421 4.3.2 and close
                        until = now
                    finally:
                        deadline.disarm()
                        idle.waiting.discard(deadline)
                if until <= now:
                    self.log.warning("timeout, closing")
                    core.timed_out()
                    continue
                if not data:
                    return
                core.receive_data(data)
            elif isinstance(event, RcptTo):
                reply, token = await self._rcpt(event)
                core.answer(reply, token)
            elif isinstance(event, Message):
                core.answer(await self._deliver(event))
            elif isinstance(event, MailFrom):
                core.answer(await self._mail(event))
            elif isinstance(event, AuthAttempt):
                await self._auth(event)
            elif isinstance(event, StartTls):
                conn.write(core.data_to_send())
                await conn.drain()
                try:
                    await conn.start_tls(self.app.tls, timeout=self.app.config.net.tls_handshake_timeout)
                except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                    self.log.warning("STARTTLS handshake failed: %s", exc)
                    conn.abort()
                    return
                core.tls_started()
                seen_commands = -1
            elif isinstance(event, Close):
                conn.write(core.data_to_send())
                await conn.drain()
                conn.close()
                return

    # -- decisions --------------------------------------------------------------------------------
    async def _mail(self, event: MailFrom) -> Reply:
        if not self.submission:
            return replies.SENDER_OK
        account = self.account
        sender = event.sender
        if account is None or sender is None:
            return replies.SENDER_NOT_OWNED
        key = sender.lookup_key
        if key == account.address:
            return replies.SENDER_OK
        owner = await self.app.store.resolve(key)
        if owner is not None and owner.id == account.id:
            return replies.SENDER_OK
        self.log.warning("sender %s not owned by %s", key[:100], account.address)
        return replies.SENDER_NOT_OWNED

    async def _rcpt(self, event: RcptTo) -> tuple[Reply, Any]:
        address = event.address
        route = policy.route_recipient(
            address,
            submission=self.submission,
            authenticated=self.account is not None,
            is_local_domain=self.app.config.is_local_domain,
        )
        if isinstance(route, Reply):
            self.log.warning("relay attempt to %s refused", str(address)[:100])
            return route, None
        if route == "remote":
            return replies.RECIPIENT_OK, OutboundRecipient(str(address), event.notify, event.orcpt)
        key = policy.postmaster_address(address, self.app.config.domains)
        mailbox_id = await _inbox_for(self.app, key) if key else None
        if mailbox_id is None:
            return replies.UNKNOWN_USER, None
        return replies.RECIPIENT_OK, _Local(mailbox_id)

    async def _auth(self, event: AuthAttempt) -> None:
        creds = event.credentials
        account = None
        if not creds.authzid or creds.authzid.lower() == creds.username.strip().lower():
            account = await self.app.auth.authenticate(creds.username, creds.password, self.conn.peer[0])
        self.account = account
        self.core.answer_auth(account.address if account is not None else None)
        if account is not None:
            self.log.info("authenticated as %s (%s)", account.address, event.mechanism)

    async def _deliver(self, event: Message) -> Reply:
        env = event.envelope
        queue_id = f"{_PREFIX}{next(_ids):x}"
        mailboxes: list[int] = []
        remote: list[OutboundRecipient] = []
        for rcpt in env.recipients:
            token = rcpt.token
            if isinstance(token, _Local):
                if token.mailbox_id not in mailboxes:
                    mailboxes.append(token.mailbox_id)
            elif isinstance(token, OutboundRecipient):
                remote.append(token)
        only = env.recipients[0].rcpt.address if len(env.recipients) == 1 else None
        received = trace.received(
            helo=env.helo,
            peer_ip=self.conn.peer[0],
            hostname=self.app.hostname,
            protocol=env.protocol,
            queue_id=queue_id,
            tls_info=self.conn.tls_info if self.conn.is_tls else "",
            recipient=only,
        )
        mail = env.mail
        outbound = None
        if remote:
            outbound = OutboundEnvelope(
                sender=str(mail.sender) if mail.sender is not None else "",
                recipients=tuple(remote),
                ret=mail.ret,
                envid=mail.envid,
                smtputf8=mail.smtputf8,
                eight_bit=mail.body == "8BITMIME" or not event.data.isascii(),
            )
        # One stored copy, one commit, for the local mailboxes and the queue alike (atomic: a failure
        # leaves nothing half-delivered for the client's retry to duplicate).
        raw = (trace.return_path(mail.sender) if mailboxes else b"") + received + event.data
        try:
            await self.app.store.append(raw, [AppendTarget(m) for m in mailboxes], outbound)
        except StoreFullError:
            self.log.error("store full, message %s refused", queue_id)
            return replies.STORAGE_FULL
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("storing message %s failed", queue_id)
            return replies.LOCAL_ERROR
        self.log.info(
            "stored id=%s size=%d local=%d remote=%d with=%s",
            queue_id,
            len(event.data),
            len(mailboxes),
            len(remote),
            env.protocol,
        )
        return Reply.of(250, "2.0.0", f"OK id={queue_id}")


async def handle(conn: Connection, app: App, spec: ListenerSpec) -> None:
    """Serve one SMTP connection (MX on ``smtp``, submission on ``submission``/``submissions``)."""
    await Session(conn, app, spec).run()
