"""Where burst messages go: transport URLs, provider presets with their limits, and the SMTP sender.

URLs: ``smtp+starttls://user@host:587`` (STARTTLS required), ``smtps://user@host:465`` (TLS from the first
byte), ``smtp://host:25`` (plain; AUTH over plain text only to a loopback address). Query options:
``cafile=PATH`` (trust this CA), ``verify=no`` (test servers only), ``concurrency=N``, ``helo=NAME``.
The password never comes from the URL or the command line: ``POSTROOM_SMTP_PASSWORD`` or a prompt.

Invariants:
- Security is explicit: with ``smtp+starttls`` a server without STARTTLS is an error, never a silent
  downgrade; certificates are verified unless ``verify=no``.
- :class:`Sender` keeps up to ``concurrency`` connections open and reuses each for many messages. Every
  message is all-or-nothing: if any recipient is refused, the transaction is reset and nothing is sent.
- Replies decide: 2xx sent; 5xx failed, never retried; 4xx (including 421) and lost connections before DATA
  back off exponentially and retry up to ``max_attempts``. A connection lost *during* DATA is ``unknown``
  (the server may have accepted it) and never retried automatically.
- ``on_sending`` (the ledger's durable "sending" mark) runs while MAIL and RCPT are in flight and is
  awaited before DATA: nothing of the message is transmitted before the mark is on disk.
- Provider limits are enforced here: messages per minute is a pace, recipients per message is checked in
  the plan, per-day limits are checked against the ledger before sending.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from postroom.errors import ConfigError

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
    """Opening a session failed; ``stage`` says where (connect, tls, starttls, auth)."""

    def __init__(self, stage: str, detail: str, *, code: int = 0, cause: BaseException | None = None) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail
        self.code = code
        self.cause = cause


async def open_session(t: Transport, password: str | None, *, timeout: float = CONNECT_TIMEOUT) -> aiosmtplib.SMTP:
    """Connect, negotiate TLS as the URL says, authenticate. Raises :class:`SessionError`."""
    ctx = t.tls_context() if t.security != "plain" else None
    smtp = aiosmtplib.SMTP(
        hostname=t.host,
        port=t.port,
        use_tls=t.security == "tls",
        start_tls=False,
        tls_context=ctx if t.security == "tls" else None,
        timeout=timeout,
        local_hostname=t.helo,
    )
    try:
        await smtp.connect()
    except aiosmtplib.SMTPException as exc:
        raise SessionError("connect", str(exc), cause=exc.__cause__ or exc) from exc
    except (OSError, ssl.SSLError) as exc:
        raise SessionError("connect", str(exc), cause=exc) from exc
    try:
        await smtp.ehlo()
        if t.security == "starttls":
            if not smtp.supports_extension("starttls"):
                raise SessionError("starttls", "the server does not offer STARTTLS")
            try:
                await smtp.starttls(tls_context=ctx)
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                raise SessionError("tls", str(exc), cause=exc.__cause__ or exc) from exc
            await smtp.ehlo()
        if t.user:
            if t.security == "plain" and not t.is_loopback:
                raise SessionError("auth", "refusing to send the password without TLS to a remote host")
            if not smtp.supports_extension("auth"):
                raise SessionError("auth", "the server offers no AUTH on this connection")
            try:
                # One mechanism only: a second try after a refusal counts as another failed login
                # against providers' lock-out limits.
                if "PLAIN" in smtp.server_auth_methods or "plain" in smtp.server_auth_methods:
                    await smtp.auth_plain(t.user, password or "")
                else:
                    await smtp.auth_login(t.user, password or "")
            except aiosmtplib.SMTPAuthenticationError as exc:
                raise SessionError("auth", exc.message, code=exc.code, cause=exc) from exc
    except SessionError:
        smtp.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:
        smtp.close()
        raise SessionError("greeting", f"{exc.code} {exc.message}", code=exc.code, cause=exc) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        smtp.close()
        raise SessionError("greeting", str(exc), cause=exc) from exc
    return smtp


OnSending = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


class Sender:
    """Sends envelopes over a small pool of reused connections, pacing to the provider's limits."""

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
        self._idle: list[tuple[aiosmtplib.SMTP, int]] = []
        self._slots = asyncio.Semaphore(transport.limits.concurrency)
        self._pace_lock = asyncio.Lock()
        self._next_start = 0.0

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            try:
                await smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()

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

    async def send(self, env: Envelope, on_sending: OnSending) -> Outcome:
        """Deliver one envelope with retries; never raises for SMTP or network trouble."""
        async with self._slots:
            attempt = 0
            while True:
                attempt += 1
                outcome = await self._attempt(env, on_sending)
                if outcome.status != "deferred" or attempt >= self.max_attempts:
                    return outcome
                if outcome.retry_now:
                    attempt -= 1
                    continue
                delay = min(BACKOFF_MAX, self.backoff_base * 2 ** (attempt - 1))
                log.info("deferred (%s); retry %d in %.1fs", outcome.reply, attempt + 1, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, env: Envelope, on_sending: OnSending) -> Outcome:
        await self._pace()
        if self._idle:
            smtp, used = self._idle.pop()
        else:
            try:
                smtp, used = await open_session(self.transport, self.password), 0
            except SessionError as exc:
                if exc.stage == "auth" and 500 <= exc.code < 600:
                    return Outcome("failed", f"{exc.code} {exc.detail}")
                return Outcome("deferred", f"{exc.stage}: {exc.detail}")
        options_b = [b"SMTPUTF8"] if env.smtputf8 else []
        if env.smtputf8 and not smtp.supports_extension("smtputf8"):
            self._release(smtp, used)
            return Outcome("failed", "the server does not support SMTPUTF8 (RFC 6531) for these addresses")
        # The durable "sending" mark is written while MAIL and RCPT travel; DATA waits for it.
        marked = asyncio.ensure_future(on_sending())
        try:
            # One deadline for the envelope instead of one timer task per command (aiosmtplib's
            # per-command timeout costs a task each; at thousands of messages a second that shows).
            async with asyncio.timeout(COMMAND_TIMEOUT * (1 + len(env.recipients))):
                # Addresses were validated (postroom.wire.address) when the plan was made; execute_command
                # still refuses CR/LF. Going around mail()/rcpt() saves re-parsing them per message.
                await _expect(smtp, (250,), b"MAIL", b"FROM:<" + env.sender.encode() + b">", *options_b)
                for rcpt in env.recipients:
                    await _expect(smtp, (250, 251), b"RCPT", b"TO:<" + rcpt.encode() + b">")
        except aiosmtplib.SMTPResponseException as exc:
            await marked
            if exc.code != 421 and await _reset(smtp):
                self._release(smtp, used)
            else:
                smtp.close()
            status = "failed" if 500 <= exc.code < 600 else "deferred"
            return Outcome(status, f"{exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await marked
            smtp.close()
            return Outcome("deferred", f"connection lost before DATA: {exc!r}", retry_now=used > 0)
        except BaseException:
            marked.cancel()
            raise
        try:
            await marked
            async with asyncio.timeout(DATA_TIMEOUT):
                reply = await smtp.data(env.data, timeout=None)
        except aiosmtplib.SMTPResponseException as exc:
            # A reply to DATA or to the final dot that is not 2xx: the server did not take the message.
            if exc.code != 421 and await _reset(smtp):
                self._release(smtp, used)
            else:
                smtp.close()
            status = "failed" if 500 <= exc.code < 600 else "deferred"
            return Outcome(status, f"{exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            return Outcome("unknown", f"connection lost during DATA; the server may have accepted it ({exc})")
        self._release(smtp, used + 1)
        return Outcome("sent", f"{reply.code} {reply.message}")

    def _release(self, smtp: aiosmtplib.SMTP, used: int) -> None:
        if used >= MESSAGES_PER_CONNECTION or not smtp.is_connected:
            smtp.close()
        else:
            self._idle.append((smtp, used))


async def _expect(smtp: aiosmtplib.SMTP, ok: tuple[int, ...], *args: bytes) -> None:
    """Run one command; a reply outside ``ok`` raises :class:`aiosmtplib.SMTPResponseException`."""
    reply = await smtp.execute_command(*args, timeout=None)
    if reply.code not in ok:
        raise aiosmtplib.SMTPResponseException(reply.code, reply.message)


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a refused transaction; True when the connection is still usable."""
    try:
        await smtp.rset(timeout=COMMAND_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
        return False
    return True
