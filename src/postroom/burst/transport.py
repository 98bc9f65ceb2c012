"""Where burst messages go: transport URLs, provider presets with their limits, and the SMTP sender.

URLs: ``smtp+starttls://user@host:587`` (STARTTLS required), ``smtps://user@host:465`` (TLS from the first
byte), ``smtp://host:25`` (plain; AUTH over plain text only to a loopback address). Query options:
``cafile=PATH`` (trust this CA), ``verify=no`` (test servers only), ``concurrency=N``, ``helo=NAME``.
The password never comes from the URL or the command line: ``POSTROOM_SMTP_PASSWORD`` or a prompt.

Invariants:
- Security is explicit: with ``smtp+starttls`` a server without STARTTLS is an error, never a silent
  downgrade; certificates are verified unless ``verify=no``.
- The wire is :class:`postroom.delivery.client.SmtpClient`, the relay's client: PIPELINING (RFC 2920) puts
  MAIL, RCPT and DATA in one write, and the next waiting message's group rides in the same write as the
  previous message's data (still one transaction at a time), so a message costs one round trip instead of
  four; every byte comes from :mod:`postroom.delivery.wire` (addresses checked for CR/LF, DATA CRLF-only
  and dot-stuffed).
- The steady state of an unpaced pipelining connection runs in :mod:`postroom.burst.express` (callbacks,
  no coroutine per message); it hands anything else back to this module's coroutine path unchanged.
- :class:`Sender` keeps up to ``concurrency`` connections open and reuses each for many messages
  (``MESSAGES_PER_CONNECTION``). Every message is all-or-nothing: if any recipient is refused, the
  transaction is reset and nothing is sent (with several recipients DATA waits for every RCPT reply).
- Replies decide: 2xx sent; 5xx failed, never retried; 4xx (including 421) and lost connections before DATA
  back off exponentially and retry up to ``max_attempts`` (a 4xx to the final dot while the next message's
  commands are on that connection closes it; that message starts over). A connection lost *during* DATA is
  ``unknown`` (the server may have accepted it) and never retried automatically.
- ``on_sending`` (the ledger's durable "sending" mark) is awaited after the ``354`` and before the first
  octet of the message: nothing of the message is transmitted before the mark is on disk. If it fails, the
  connection is dropped without the final dot (the server discards the transaction), every connection
  loop stops and the error is raised as itself (never taken for a network error and retried).
- Provider limits are enforced here: messages per minute is a pace, recipients per message is checked in
  the plan, per-day limits are checked against the ledger before sending.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from postroom.burst.express import Express
from postroom.delivery.client import Head, Rcpt, SmtpClient
from postroom.errors import ConfigError, LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0  # seconds for TCP + TLS + greeting; RFC 5321 §4.5.3.2.1 allows 5 min, users won't wait
COMMAND_TIMEOUT = 60.0  # seconds per command reply; RFC 5321 §4.5.3.2 suggests 5 min (DATA end: 10 min)
DATA_TIMEOUT = 600.0  # seconds for the reply to the final dot, RFC 5321 §4.5.3.2.6
MAX_ATTEMPTS = 5  # tries per message for 4xx / lost connections
BACKOFF_BASE = 2.0  # seconds before the 2nd try, doubling each time
BACKOFF_MAX = 300.0  # seconds, cap of one wait
MESSAGES_PER_CONNECTION = 100  # then reconnect: many providers close long sessions (Office 365 ~ 30)

Security = str  # "starttls" | "tls" | "plain"


@dataclass(frozen=True, slots=True)
class Limits:
    """A provider's sending limits; None is unlimited."""

    messages_per_minute: int | None = None
    recipients_per_message: int | None = None
    messages_per_day: int | None = None
    recipients_per_day: int | None = None
    concurrency: int = 4


@dataclass(frozen=True, slots=True)
class Transport:
    """A parsed transport URL (plus the preset it came from, if any)."""

    security: Security
    host: str
    port: int
    user: str | None = None
    cafile: str | None = None
    verify: bool = True
    helo: str | None = None
    preset: str | None = None
    limits: Limits = Limits()

    def __str__(self) -> str:
        scheme = {"starttls": "smtp+starttls", "tls": "smtps", "plain": "smtp"}[self.security]
        user = f"{self.user}@" if self.user else ""
        return f"{scheme}://{user}{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context (built once per process and settings: loading the CA store is slow)."""
        return _tls_context(self.cafile, self.verify)


@functools.lru_cache(maxsize=8)
def _tls_context(cafile: str | None, verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# Provider presets: host, port, security and published limits.
# Office 365: 30 messages/minute, 10,000 recipients/day, 3 concurrent connections per mailbox.
# Gmail (Workspace): 2,000 messages/day, 100 recipients per message over SMTP; cc and bcc count.
PRESETS: dict[str, Transport] = {
    "gmail": Transport(
        "starttls",
        "smtp.gmail.com",
        587,
        preset="gmail",
        limits=Limits(recipients_per_message=100, messages_per_day=2000, concurrency=3),
    ),
    "office365": Transport(
        "starttls",
        "smtp.office365.com",
        587,
        preset="office365",
        limits=Limits(messages_per_minute=30, recipients_per_day=10000, concurrency=3),
    ),
    "outlook": Transport(
        "starttls",
        "smtp-mail.outlook.com",
        587,
        preset="outlook",
        # Outlook.com is served by the same Exchange Online front end: its published limits apply.
        limits=Limits(messages_per_minute=30, recipients_per_day=10000, concurrency=1),
    ),
    "postroom": Transport("starttls", "localhost", 587, preset="postroom", limits=Limits(concurrency=8)),
}
_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
    "smtp": ("plain", 25),
}


def parse_transport(url: str | None, preset: str | None = None, user: str | None = None) -> Transport:
    """Combine ``--preset`` and ``--transport``: the URL's parts override the preset's; limits stay."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[preset] if preset else None
    if url is None:
        if base is None:
            raise ConfigError("give --transport URL or --preset NAME (or --to-eml DIR / --dry-run)")
        return replace(base, user=user or base.user)
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(f"transport {url!r}: scheme must be smtp+starttls, smtps or smtp")
    if parts.password is not None:
        raise ConfigError("transport URL must not contain a password; use POSTROOM_SMTP_PASSWORD or the prompt")
    if not parts.hostname:
        raise ConfigError(f"transport {url!r}: no host")
    security, default_port = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"transport {url!r}: invalid port") from None
    query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=False).items()}
    unknown = set(query) - {"cafile", "verify", "concurrency", "helo"}
    if unknown:
        raise ConfigError(f"transport {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
    limits = base.limits if base else Limits()
    if "concurrency" in query:
        try:
            limits = replace(limits, concurrency=max(1, min(64, int(query["concurrency"]))))
        except ValueError:
            raise ConfigError(f"transport {url!r}: concurrency must be a number") from None
    verify = query.get("verify", "yes").lower() not in ("no", "0", "false")
    return Transport(
        security=security,
        host=parts.hostname,
        port=port,
        user=user or (unquote(parts.username) if parts.username else None),
        cafile=query.get("cafile"),
        verify=verify,
        helo=query.get("helo"),
        preset=preset,
        limits=limits,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one message: ``sent``, ``failed``, ``deferred`` or ``unknown`` and the reply."""

    status: str
    reply: str
    retry_now: bool = False  # a reused connection had gone stale: try again at once on a fresh one


class SessionError(Exception):
    """Opening a session failed; ``stage`` says where (connect, greeting, tls, starttls, auth)."""

    def __init__(self, stage: str, detail: str, *, code: int = 0, cause: BaseException | None = None) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail
        self.code = code
        self.cause = cause


_NETWORK_ERRORS = (OSError, TimeoutError, RemoteProtocolError)  # ConnectionError and ssl.SSLError are OSErrors


def _describe(exc: BaseException, waiting_for: str) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"timed out waiting for {waiting_for}"
    return str(exc) or repr(exc)


async def open_session(t: Transport, password: str | None, *, timeout: float = CONNECT_TIMEOUT) -> SmtpClient:
    """Connect, negotiate TLS as the URL says, authenticate. Raises :class:`SessionError`.

    Stages: ``connect`` (TCP, and the handshake for smtps), ``greeting`` (connected, then no or a bad
    greeting/EHLO: a silent peer on an implicit-TLS port looks like this), ``starttls`` (not offered or
    refused), ``tls`` (the STARTTLS handshake, certificate checks included), ``auth``.
    """
    helo = t.helo or _local_name()
    implicit = t.tls_context() if t.security == "tls" else None
    try:
        client = await SmtpClient.connect(
            t.host,
            t.port,
            connect_timeout=timeout,
            command_timeout=timeout,
            tls=implicit,
            server_hostname=t.host,
            read_greeting=False,
        )
    except _NETWORK_ERRORS as exc:
        raise SessionError("connect", _describe(exc, "the connection"), cause=exc) from exc
    try:
        greeting = await client.read_reply()
        if greeting.code != 220:
            raise SessionError("greeting", str(greeting), code=greeting.code)
        reply = await client.ehlo(helo)
        if not reply.positive:
            raise SessionError("greeting", f"EHLO refused: {reply}", code=reply.code)
        if t.security == "starttls":
            if not client.ext.has("STARTTLS"):
                raise SessionError("starttls", "the server does not offer STARTTLS")
            try:
                reply = await client.starttls(t.tls_context(), t.host)
            except _NETWORK_ERRORS as exc:
                raise SessionError("tls", _describe(exc, "the TLS handshake"), cause=exc) from exc
            if reply.code != 220:
                raise SessionError("starttls", f"STARTTLS refused: {reply}", code=reply.code)
            reply = await client.ehlo(helo)
            if not reply.positive:
                raise SessionError("greeting", f"EHLO after STARTTLS refused: {reply}", code=reply.code)
        if t.user:
            if t.security == "plain" and not t.is_loopback:
                raise SessionError("auth", "refusing to send the password without TLS to a remote host")
            if not client.ext.has("AUTH"):
                raise SessionError("auth", "the server offers no AUTH on this connection")
            # One mechanism only (PLAIN if offered, else LOGIN): a second try after a refusal counts as
            # another failed login against providers' lock-out limits.
            reply = await client.auth(t.user, password or "", allow_plaintext=t.security == "plain")
            if reply.code != 235:  # RFC 4954 §6
                raise SessionError("auth", " ".join(reply.lines), code=reply.code)
    except SessionError:
        client.close()
        raise
    except _NETWORK_ERRORS as exc:
        client.close()
        raise SessionError("greeting", _describe(exc, "the server's greeting"), cause=exc) from exc
    except BaseException:
        client.close()
        raise
    client.command_timeout = COMMAND_TIMEOUT
    return client


@functools.cache
def _local_name() -> str:
    """The EHLO name when the URL gives none (looked up once: getfqdn may ask the resolver)."""
    return socket.getfqdn() or "localhost"


OnSending = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to send. ``payload``: ``data`` in wire form (``delivery.wire.data_payload``) when it was
    made ahead, off the event loop (the producer does it); otherwise the client makes it when it sends."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False
    payload: bytes | None = None


@dataclass(slots=True)
class Work:
    """One message for :meth:`Sender.run`: the envelope, its durable mark, and where its outcome goes.

    ``mark_now``, when given, is the mark's synchronous shortcut: True (and the start recorded, as
    ``on_sending`` would) when the mark is already durable; False means ``on_sending`` must be awaited."""

    env: Envelope
    on_sending: OnSending
    done: Callable[[Outcome], None]
    mark_now: Callable[[], bool] | None = None


Take = Callable[[], Awaitable[Work | None]]  # the next message, waiting for one; None: no more
Poll = Callable[[], Work | None]  # the next message if one is ready now, else None


class _MarkFailed(Exception):
    """``on_sending`` raised (the ledger failed): never to be taken for a network error and retried."""


@dataclass(slots=True)
class _Line:
    """One connection loop's state: its session, messages sent on it, and a message already begun."""

    client: SmtpClient | None = None
    used: int = 0
    carried: tuple[Work, Head | None] | None = None
    busy: bool = False  # inside a transaction: QUIT now could land in a message's data


class Sender:
    """Sends envelopes over up to ``concurrency`` reused connections, pacing to the provider's limits.

    :meth:`run` gives each connection its own loop that takes one message at a time. When another
    message is already waiting as one is written, its MAIL/RCPT/DATA group goes out in the same write
    (one round trip and one system call per message instead of two); it is still one transaction at a
    time, and that next message's own mark is awaited at its own ``354``.
    """

    def __init__(
        self,
        transport: Transport,
        password: str | None,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.transport = transport
        self.password = password
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self._lines: list[_Line] = []
        self._pace_lock = asyncio.Lock()
        self._next_start = 0.0
        self._quitting: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """QUIT idle connections; one still inside a transaction is dropped (no final dot: discarded)."""
        lines, self._lines = self._lines, []
        for line in lines:
            if line.busy and line.client is not None:
                line.client.close()
        clients = [line.client for line in lines if line.client is not None and not line.busy]
        await asyncio.gather(*(c.quit() for c in clients), *self._quitting)

    async def _pace(self) -> None:
        per_minute = self.transport.limits.messages_per_minute
        if not per_minute:
            return
        async with self._pace_lock:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 60.0 / per_minute
        if wait > 0:
            await asyncio.sleep(wait)

    async def run(self, take: Take, poll: Poll) -> None:
        """Deliver every message ``take`` gives until it gives None; each outcome goes to its ``done``.
        Never raises for SMTP or network trouble (a failing ``on_sending`` does raise)."""
        lines = [_Line() for _ in range(self.transport.limits.concurrency)]
        self._lines.extend(lines)
        tasks = [asyncio.ensure_future(self._loop(line, take, poll)) for line in lines]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # one loop failed (or we are cancelled): stop the others mid-transaction too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _loop(self, line: _Line, take: Take, poll: Poll) -> None:
        while True:
            if line.carried is not None:
                work, head = line.carried
                line.carried = None
            else:
                got = await take()
                if got is None:
                    return
                work, head = got, None
            first: Outcome | None = None
            if head is None and self._express_ok(line, work):
                handback = await self._express(line, work, poll)
                if handback is None:
                    continue
                work, first = handback
            attempt = 0
            while True:
                attempt += 1
                if first is not None:
                    outcome, first = first, None
                else:
                    line.busy = True
                    try:
                        outcome = await self._attempt(line, work, head, poll)
                    finally:
                        line.busy = False
                head = None
                if outcome.status != "deferred" or attempt >= self.max_attempts:
                    break
                if outcome.retry_now:
                    attempt -= 1
                    continue
                delay = min(BACKOFF_MAX, self.backoff_base * 2 ** (attempt - 1))
                log.info("deferred (%s); retry %d in %.1fs", outcome.reply, attempt + 1, delay)
                await asyncio.sleep(delay)
            work.done(outcome)

    # -- the express lane (burst/express.py) ------------------------------------------------------
    def _express_ok(self, line: _Line, work: Work) -> bool:
        """May ``work`` ride the express lane on ``line`` now: an open pipelining connection with room for
        another message, an unpaced transport, one recipient, SMTPUTF8 when it needs it?"""
        client, env = line.client, work.env
        return (
            client is not None
            and client.usable
            and client.ext.has("PIPELINING")
            and not self.transport.limits.messages_per_minute
            and len(env.recipients) == 1
            and line.used + 1 < MESSAGES_PER_CONNECTION
            and (not env.smtputf8 or client.ext.has("SMTPUTF8"))
        )

    async def _express(self, line: _Line, work: Work, poll: Poll) -> tuple[Work, Outcome] | None:
        client = line.client
        assert client is not None
        lane = Express(
            line,
            client,
            poll,
            eligible=lambda w: self._express_ok(line, w),
            outcome=Outcome,
        )
        line.busy = True
        try:
            handback = await lane.run(work)
        finally:
            line.busy = False
        self._recycle(line)
        return handback

    async def _attempt(self, line: _Line, work: Work, head: Head | None, poll: Poll) -> Outcome:
        env = work.env
        paced = bool(self.transport.limits.messages_per_minute)
        if paced:
            await self._pace()
        client = line.client
        if client is None or not client.usable:
            if client is not None:
                client.close()
            head = None
            try:
                client = line.client = await open_session(self.transport, self.password)
            except SessionError as exc:
                line.client = None
                if exc.stage == "auth" and 500 <= exc.code < 600:
                    return Outcome("failed", f"{exc.code} {exc.detail}")
                return Outcome("deferred", f"{exc.stage}: {exc.detail}")
            line.used = 0
        reused = line.used > 0
        if env.smtputf8 and not client.ext.has("SMTPUTF8"):
            return Outcome("failed", "the server does not support SMTPUTF8 (RFC 6531) for these addresses")

        def then() -> bytes:
            """The next waiting message's command group, to follow this message in the same write."""
            if paced or line.used + 1 >= MESSAGES_PER_CONNECTION:
                return b""
            if line.carried is not None:  # waiting since its commands were lost with a connection
                nxt = line.carried[0]
            else:
                polled = poll()
                if polled is None:
                    return b""
                nxt = polled
            line.carried = (nxt, None)
            if self._express_ok(line, nxt):
                return b""  # it rides the express lane from the next turn on: no group ahead
            if nxt.env.smtputf8 and not client.ext.has("SMTPUTF8"):
                return b""
            try:
                h = client.head(
                    nxt.env.sender,
                    [Rcpt(a) for a in nxt.env.recipients],
                    nxt.env.data,
                    eight_bit=not nxt.env.data.isascii(),
                    smtputf8=nxt.env.smtputf8,
                    all_or_nothing=True,
                )
            except LocalProtocolError:
                return b""  # it fails on its own turn, with the reason
            if h is None:
                return b""
            line.carried = (nxt, h)
            return h.data

        async def before_data() -> None:
            try:
                await work.on_sending()
            except Exception as exc:  # an OSError here is the ledger's, not the connection's
                raise _MarkFailed() from exc

        try:
            result = await client.transaction(
                env.sender,
                [Rcpt(a) for a in env.recipients] if head is None else (),  # a sent head has them
                env.data,
                eight_bit=not env.data.isascii(),
                smtputf8=env.smtputf8,
                all_or_nothing=True,
                before_data=before_data,
                sent_head=head,
                then=then,
                payload=env.payload,
            )
        except _MarkFailed as exc:  # the client dropped the connection without the final dot
            self._drop(line)
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        except LocalProtocolError as exc:  # an address that cannot go on the wire (the plan validated them)
            return Outcome("failed", f"not sent: {exc}")
        except _NETWORK_ERRORS as exc:
            self._drop(line)
            if client.data_started:
                return Outcome("unknown", f"connection lost during DATA; the server may have accepted it ({exc!r})")
            return Outcome("deferred", f"connection lost before DATA: {exc!r}", retry_now=reused)
        except BaseException:  # cancelled (Ctrl-C) or the ledger failed: never reuse a connection mid-transaction
            self._drop(line)
            raise
        if result.data is not None and result.data.positive:
            line.used += 1
            self._recycle(line)
            return Outcome("sent", str(result.data))
        # The first refusal decides: MAIL, a RCPT, DATA's 354 or the final reply (the client sent RSET).
        refused = next((r for r in (result.mail, *result.rcpts) if not r.positive), result.data)
        assert refused is not None
        if refused.code == 421 or (refused.transient and line.carried is not None and line.carried[1] is not None):
            # 421: the server is closing (RFC 5321 §3.8). A 4xx to be retried while the next message's
            # commands are on the wire: that one cannot be taken back, so the connection goes.
            self._drop(line)
        else:
            self._recycle(line)
        return Outcome("failed" if refused.permanent else "deferred", str(refused))

    def _drop(self, line: _Line) -> None:
        """Close the connection; a message whose commands went out on it starts over on the next."""
        if line.client is not None:
            line.client.close()
            line.client = None
        if line.carried is not None:
            line.carried = (line.carried[0], None)

    def _recycle(self, line: _Line) -> None:
        """After a transaction: keep the connection, or end it politely after MESSAGES_PER_CONNECTION."""
        client = line.client
        if client is None:
            return
        if not client.usable:
            self._drop(line)
        elif line.used >= MESSAGES_PER_CONNECTION:  # then() never pipelines into this one
            task = asyncio.get_running_loop().create_task(client.quit())
            self._quitting.add(task)
            task.add_done_callback(self._quitting.discard)
            line.client = None
