"""The asyncio adapter: one :class:`SmtpSession` per connection runs a sans-I/O
:class:`~postroom.smtp.server.SmtpServer` core and makes its decisions with the store, the authenticator and
the config.

The session is callback-driven (:class:`~postroom.net.served.ServedProtocol`): received bytes go straight
into the core, and every decision that needs no I/O (MX senders, recipients found in the lookup cache) is
answered on the spot. Only a step that must wait — storing a message, an uncached recipient lookup, a
password check, a TLS handshake — runs as a task; while it runs, received bytes are held (and reading is
paused past :data:`HOLD_LIMIT`) and fed to the core when it ends. Most MX sessions therefore cost one task,
for the delivery, instead of a task and a future per read.

Invariants:
- **250 means durable**: the reply to the final dot / BDAT LAST is queued only after ``store.append``
  returned (the store fsyncs, with group commit). Any failure gives 451 4.3.0 (StoreFullError: 452 4.3.1),
  never 250. One stored copy serves every local recipient of a transaction.
- Submission only: a message without ``Date:`` or ``Message-ID:`` gets them (RFC 6409 §8,
  ``smtp.submission``); mail arriving as an MX is stored as sent.
- Remote recipients (submission only) go to the outbound queue through the same ``append`` call, in the
  same commit as the local copies. ``Return-Path:`` is added only when there are local recipients; the
  queue runner drops a leading ``Return-Path:`` before relaying (RFC 5321 §4.4).
- Replies go out in command order: the core processes no input while a decision is pending, and the
  session writes what the core queued whenever it needs more input.
- STARTTLS: plaintext held or buffered after the command is dropped before the handshake, and the core
  drops what it buffered (RFC 3207 §4.2, the CVE-2011-0411 class).
- Deadlines: a command must be complete within ``command_timeout`` of the previous one (a client trickling
  bytes does not reset it); message content must progress every ``data_timeout`` and finish within
  ``data_deadline``. Then 421 and close. No deadline runs while a step (our own work) runs.
- Graceful shutdown (``net.server.shutdown_event``): a session waiting for a command answers ``421 4.3.2``
  and closes; one receiving or storing a message finishes it (250 or 4xx) and then says 421.
- A client that half-closes (plain TCP) gets the replies to everything it sent, then the connection closes.
- CancelledError is never swallowed; an unexpected exception while delivering becomes 451 4.3.0 and is
  logged with its traceback; one anywhere else is logged and the connection aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from mypy_extensions import mypyc_attr

from postroom.app import App
from postroom.errors import StoreFullError
from postroom.net.served import ServedProtocol
from postroom.net.server import Listener, shutdown_event
from postroom.smtp import policy, trace
from postroom.smtp.events import NEED_DATA, AuthAttempt, Close, Event, MailFrom, Message, RcptTo, StartTls
from postroom.smtp.server import Settings, SmtpServer
from postroom.smtp.submission import complete as complete_submission
from postroom.store.api import Account, AppendTarget, OutboundEnvelope, OutboundRecipient
from postroom.wire import replies
from postroom.wire.replies import Reply

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_PREFIX = os.urandom(3).hex()

#: How often (seconds) the sessions of an App look for a graceful shutdown (one timer per App).
SHUTDOWN_POLL = 0.5
#: Recipient lookups are cached this long (seconds) per process; a new account is found within it.
RCPT_CACHE_TTL = 2.0
RCPT_CACHE_SIZE = 10_000
#: Octets received while a step runs (e.g. a client pipelining after its final dot) before reading pauses.
HOLD_LIMIT = 1024 * 1024
SUBMISSION_SERVICES = frozenset({"submission", "submissions"})

Step = Coroutine[Any, Any, None]


class _Local:
    """Token of an accepted local recipient: the INBOX it lands in."""

    __slots__ = ("mailbox_id",)

    def __init__(self, mailbox_id: int) -> None:
        self.mailbox_id = mailbox_id


def _rcpt_cache(app: App) -> dict[str, tuple[float, int]]:
    cache: dict[str, tuple[float, int]] = app.extras.setdefault("smtp.rcpt_cache", {})
    return cache


def _cached_inbox(app: App, key: str) -> int | None:
    """The INBOX of ``key`` if a lookup found it within the last :data:`RCPT_CACHE_TTL` seconds."""
    hit = _rcpt_cache(app).get(key)
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


async def _inbox_for(app: App, key: str) -> int | None:
    """The INBOX mailbox id mail to ``key`` lands in (alias-resolved), cached briefly per process."""
    cached = _cached_inbox(app, key)
    if cached is not None:
        return cached
    cache = _rcpt_cache(app)
    now = time.monotonic()
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


class _Sessions:
    """The live SMTP sessions of one App. While there are any, a timer looks every :data:`SHUTDOWN_POLL`
    seconds for a graceful shutdown and tells the sessions waiting for a command to say 421 and close
    (sessions busy with a message notice it when they finish). One timer per App, not one per session."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self.stopping = shutdown_event(app)
        self.loop = loop
        self.live: set[SmtpSession] = set()
        self._handle: asyncio.TimerHandle | None = None

    @staticmethod
    def of(app: App) -> _Sessions:
        sessions = app.extras.get("smtp.sessions")
        loop = asyncio.get_running_loop()
        if not isinstance(sessions, _Sessions) or sessions.loop is not loop:
            sessions = _Sessions(app, loop)
            app.extras["smtp.sessions"] = sessions
        return sessions

    def add(self, session: SmtpSession) -> None:
        self.live.add(session)
        if self._handle is None:
            self._handle = self.loop.call_later(SHUTDOWN_POLL, self._poll)

    def _poll(self) -> None:
        self._handle = None
        if self.stopping.is_set():
            for session in list(self.live):
                session.interrupt_if_idle()
        if self.live:
            self._handle = self.loop.call_later(SHUTDOWN_POLL, self._poll)


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it to watch flow control
class SmtpSession(ServedProtocol):
    """One SMTP connection (MX on ``smtp``, submission on ``submission``/``submissions``): the core, the
    transport and the decisions. See the module docstring for the invariants."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self.limits = self.app.config.smtp
        self.submission = self.spec.service in SUBMISSION_SERVICES
        self.account: Account | None = None
        self.core: SmtpServer | None = None
        self._loop = asyncio.get_running_loop()
        self._sessions = _Sessions.of(self.app)
        self._step: asyncio.Task[None] | None = None
        self._held: list[bytes] = []  # received while a step runs
        self._held_size = 0
        self._closing = False  # the core said Close: the last reply is written, the transport closing
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._seen_commands = -1
        self._command_deadline = 0.0
        self._data_deadline: float | None = None
        self._when = math.inf  # the armed deadline; inf when none
        self._timer: asyncio.TimerHandle | None = None

    # -- the connection ---------------------------------------------------------------------------------
    def session_started(self) -> None:
        self.core = SmtpServer(self._settings())
        self._sessions.add(self)
        self._guarded(self._pump)

    def _settings(self) -> Settings:
        """The core's settings: immutable, so one object per kind of session serves them all."""
        app = self.app
        plaintext = app.config.auth.allow_plaintext_on_loopback and self.is_loopback
        key = (self.spec.service, self.is_tls, plaintext)
        cache: dict[tuple[str, bool, bool], Settings] = app.extras.setdefault("smtp.settings", {})
        settings = cache.get(key)
        if settings is None or settings.hostname != app.hostname or settings.limits is not self.limits:
            settings = cache[key] = Settings(
                hostname=app.hostname,
                limits=self.limits,
                submission=self.submission,
                tls=self.is_tls,
                starttls=not self.is_tls,
                plaintext_auth=plaintext,
            )
        return settings

    def data_received(self, data: bytes) -> None:
        if self._step is not None:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > HOLD_LIMIT:
                self.pause_reading()
            return
        core = self.core
        if core is None:
            return  # refused by the listener
        try:  # _guarded, inlined: this runs for every read
            core.receive_data(data)
            self._pump()
        except Exception:
            self._failed()

    def eof_received(self) -> bool:
        """The client half-closed. Over TCP the replies to everything it sent still go out (a client may
        shut down its side after QUIT and then read), and the connection closes once the core has nothing
        left to answer. A TLS transport closes at EOF whatever we return, so there we let it."""
        if self.is_tls or self.core is None:
            return False
        self._eof = True
        if self._step is None and not self._closing:
            self._guarded(self._pump)
        return True

    def session_ended(self) -> None:
        self._stop()

    def session_cancelled(self) -> None:
        self._stop()
        if self._step is not None:
            self._step.cancel()
        self.abort()

    def _stop(self) -> None:
        self._sessions.live.discard(self)
        self._when = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run ``action`` from a callback (a read, a timer, the end of a step): a bug in one session is logged
        and aborts its connection, instead of escaping into the event loop and leaving the client waiting."""
        try:
            action()
        except Exception:
            self._failed()

    def _failed(self) -> None:
        self._log(logging.ERROR, "session failed", exc_info=True)
        self.abort()

    def _log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        log.log(level, "[%s %s] " + msg, self.conn_id, self.peer[0], *args, exc_info=exc_info)

    # -- the core's events ------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Run the core until it needs input or a step must wait; write what it queued."""
        core = self.core
        assert core is not None
        while not self.lost:
            event = core.next_event()
            if event is NEED_DATA:
                self._flush()
                if self._eof:
                    self._finish()  # no more input will come: everything sent is answered
                elif not self._closing:
                    self._await_input(core)
                return
            react = REACTIONS[type(event)]
            step = react(self, event)
            if step is not None:
                self._step = self._loop.create_task(self._run_step(step))
                return

    def _flush(self) -> None:
        assert self.core is not None
        out = self.core.data_to_send()
        if out:
            self.write(out)

    async def _run_step(self, step: Step) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception:
            self._failed()
            return
        finally:
            self._step = None
        if not self.lost:
            self._guarded(self._resume)

    def _resume(self) -> None:
        """After a step: feed what arrived meanwhile, in order, and carry on."""
        held, self._held = self._held, []
        if self._held_size > HOLD_LIMIT:
            self.resume_reading()
        self._held_size = 0
        assert self.core is not None
        for data in held:
            self.core.receive_data(data)
        self._pump()

    def _await_input(self, core: SmtpServer) -> None:
        """Between reads: arm the deadline for the next bytes, or answer a timeout or a shutdown."""
        limits = self.limits
        now = self._loop.time()
        if core.in_data:
            if self._data_deadline is None:
                self._data_deadline = now + limits.data_deadline
            until = min(now + limits.data_timeout, self._data_deadline)
        else:
            self._data_deadline = None
            if core.commands != self._seen_commands:
                self._seen_commands = core.commands
                self._command_deadline = now + limits.command_timeout
            until = self._command_deadline
            if self._sessions.stopping.is_set():
                core.shutting_down()  # 421 4.3.2: the server is going away (RFC 5321 §3.8)
                self._pump()
                return
        if until <= now:
            self._time_out(core)
            return
        self._when = until
        timer = self._timer
        if timer is None or timer.when() > until:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(until, self._check_deadline)

    def _check_deadline(self) -> None:
        # One timer per session, moved only when a deadline comes nearer: usually a single timer handle
        # serves the whole connection, instead of one per read.
        self._timer = None
        if self._when == math.inf or self._step is not None or self.lost or self._closing:
            return
        if self._loop.time() < self._when:
            self._timer = self._loop.call_at(self._when, self._check_deadline)
            return
        core = self.core
        assert core is not None
        self._guarded(lambda: self._time_out(core))

    def _time_out(self, core: SmtpServer) -> None:
        self._when = math.inf
        self._log(logging.WARNING, "timeout, closing")
        core.timed_out()
        self._pump()

    def interrupt_if_idle(self) -> None:
        """Graceful shutdown: a session waiting for a command says 421 4.3.2 and closes now."""
        core = self.core
        if core is None or self._step is not None or self.lost or self._closing or core.in_data:
            return
        core.shutting_down()
        self._guarded(self._pump)

    def _on_close(self, event: Event) -> None:
        self._finish()

    def _finish(self) -> None:
        """Write what the core queued and close (after the transport has sent it)."""
        self._closing = True
        self._stop()
        self._flush()
        self.close()

    def _on_mail(self, event: Event) -> Step | None:
        assert isinstance(event, MailFrom)
        if not self.submission:
            self._answer(replies.SENDER_OK)
            return None
        return self._mail_step(event)

    def _on_rcpt(self, event: Event) -> Step | None:
        assert isinstance(event, RcptTo)
        route = policy.route_recipient(
            event.address,
            submission=self.submission,
            authenticated=self.account is not None,
            is_local_domain=self.app.config.is_local_domain,
        )
        if isinstance(route, Reply):
            self._log(logging.WARNING, "relay attempt to %s refused", str(event.address)[:100])
            self._answer(route)
            return None
        if route == "remote":
            self._answer(replies.RECIPIENT_OK, OutboundRecipient(str(event.address), event.notify, event.orcpt))
            return None
        key = policy.postmaster_address(event.address, self.app.config.domains)
        if key is None:
            self._answer(replies.UNKNOWN_USER)
            return None
        mailbox_id = _cached_inbox(self.app, key)
        if mailbox_id is not None:
            self._answer(replies.RECIPIENT_OK, _Local(mailbox_id))
            return None
        return self._rcpt_step(key)

    def _answer(self, reply: Reply, token: Any = None) -> None:
        assert self.core is not None
        self.core.answer(reply, token)

    def _on_message(self, event: Event) -> Step:
        assert isinstance(event, Message)
        return self._deliver_step(event)

    def _on_auth(self, event: Event) -> Step:
        assert isinstance(event, AuthAttempt)
        return self._auth_step(event)

    def _on_starttls(self, event: Event) -> Step:
        return self._starttls_step()

    # -- steps (tasks) ----------------------------------------------------------------------------------
    async def _mail_step(self, event: MailFrom) -> None:
        self._answer(await self._mail(event))

    async def _rcpt_step(self, key: str) -> None:
        mailbox_id = await _inbox_for(self.app, key)
        if mailbox_id is None:
            self._answer(replies.UNKNOWN_USER)
        else:
            self._answer(replies.RECIPIENT_OK, _Local(mailbox_id))

    async def _deliver_step(self, event: Message) -> None:
        self._answer(await self._deliver(event))

    async def _starttls_step(self) -> None:
        core = self.core
        assert core is not None and self.transport is not None
        self._flush()  # the 220
        self._held.clear()  # RFC 3207 §4.2: plaintext pipelined after STARTTLS is discarded
        try:
            transport = await self._loop.start_tls(
                self.transport,
                cast(asyncio.BaseProtocol, self),  # a protocol by its methods (net.served)
                self.app.tls,
                server_side=True,
                ssl_handshake_timeout=self.app.config.net.tls_handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._log(logging.WARNING, "STARTTLS handshake failed: %s", exc)
            self.abort()
            return
        if transport is None:  # pragma: no cover - only when the transport closed meanwhile
            self.abort()
            return
        self.transport = transport
        self.note_tls(transport)
        core.tls_started()
        self._seen_commands = -1

    async def _auth_step(self, event: AuthAttempt) -> None:
        creds = event.credentials
        account = None
        if not creds.authzid or creds.authzid.lower() == creds.username.strip().lower():
            account = await self.app.auth.authenticate(creds.username, creds.password, self.peer[0])
        self.account = account
        assert self.core is not None
        self.core.answer_auth(account.address if account is not None else None)
        if account is not None:
            self._log(logging.INFO, "authenticated as %s (%s)", account.address, event.mechanism)

    # -- decisions -------------------------------------------------------------------------------
    async def _mail(self, event: MailFrom) -> Reply:
        """Submission only (MX senders are answered in ``_on_mail``): the sender must be the account's."""
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
        self._log(logging.WARNING, "sender %s not owned by %s", key[:100], account.address)
        return replies.SENDER_NOT_OWNED

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
            peer_ip=self.peer[0],
            hostname=self.app.hostname,
            protocol=env.protocol,
            queue_id=queue_id,
            tls_info=self.tls_info if self.is_tls else "",
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
        # leaves nothing half-delivered for the client's retry to duplicate). The message is analysed at its
        # first FETCH, not before the 250: the final dot waits for the disk only.
        data = complete_submission(event.data, self.app.hostname) if self.submission else event.data
        raw = (trace.return_path(mail.sender) if mailboxes else b"") + received + data
        try:
            await self.app.store.append(raw, [AppendTarget(m) for m in mailboxes], outbound, analyze=False)
        except StoreFullError:
            self._log(logging.ERROR, "store full, message %s refused", queue_id)
            return replies.STORAGE_FULL
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log(logging.ERROR, "storing message %s failed", queue_id, exc_info=True)
            return replies.LOCAL_ERROR
        self._log(
            logging.INFO,
            "stored id=%s size=%d local=%d remote=%d with=%s",
            queue_id,
            len(event.data),
            len(mailboxes),
            len(remote),
            env.protocol,
        )
        return Reply.of(250, "2.0.0", f"OK id={queue_id}")


#: What the session does with each event the core hands out: answer it now (None) or start a step.
REACTIONS: dict[type[Event], Callable[[SmtpSession, Event], Step | None]] = {
    MailFrom: SmtpSession._on_mail,
    RcptTo: SmtpSession._on_rcpt,
    Message: SmtpSession._on_message,
    AuthAttempt: SmtpSession._on_auth,
    StartTls: SmtpSession._on_starttls,
    Close: SmtpSession._on_close,
}
