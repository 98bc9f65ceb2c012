"""The asyncio side of the outbound SMTP client: one connection to one peer address.

Invariants:
- Every byte written comes from :mod:`postroom.delivery.wire`, so CR/LF in an address is refused before the
  connection sees anything, and DATA is CRLF-only and dot-stuffed.
- After the peer's ``220`` to STARTTLS nothing received in plaintext is ever read: the reply buffer is
  discarded and every plaintext chunk arriving before the handshake completes is dropped and counted
  (RFC 3207 §4.2, the CVE-2011-0411 class seen from the client side). The EHLO is repeated inside TLS and
  the pre-TLS extensions are forgotten (RFC 3207 §4.2).
- PIPELINING (RFC 2920) groups MAIL, every RCPT and DATA in one write; the message itself is only sent after
  a ``354``. Without PIPELINING each command waits for its reply. With ``all_or_nothing`` (the burst sender)
  a transaction of several recipients sends DATA only after every RCPT was accepted, so no recipient gets a
  message another was refused; ``before_data`` is awaited after the ``354`` and before the first octet of
  the message, and :attr:`SmtpClient.data_started` says whether any octet of it may have left. ``then``
  lets the next transaction's command group (:meth:`SmtpClient.head`) ride in the same write as this one's
  message (RFC 2920 §3.1: message content may start a group); still one transaction at a time.
- No method swallows :class:`asyncio.CancelledError`; a broken connection raises :class:`ConnectionError`,
  :class:`TimeoutError` or :class:`RemoteProtocolError`, and the caller closes it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from postroom.delivery import wire
from postroom.delivery.wire import Extensions, Reply
from postroom.errors import LocalProtocolError, RemoteProtocolError
from postroom.log import TRACE

log = logging.getLogger(__name__)

DATA_INIT_TIMEOUT = 120.0  # seconds for the 354, RFC 5321 §4.5.3.2.3
DATA_END_TIMEOUT = 600.0  # seconds for the reply to the final dot, RFC 5321 §4.5.3.2.6


@dataclass(frozen=True, slots=True)
class Rcpt:
    """One recipient of a transaction with its DSN parameters (RFC 3461 §4)."""

    address: str
    notify: str = ""
    orcpt: str = ""


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """The replies of one mail transaction: MAIL, each RCPT (in order), and DATA's final reply.

    ``data`` is None when no recipient was accepted or MAIL failed; then ``rcpts`` carries the reason.
    """

    mail: Reply
    rcpts: tuple[Reply, ...]
    data: Reply | None

    def outcome(self, index: int) -> Reply:
        """The reply that decides recipient ``index``: its RCPT failure, else DATA's final reply."""
        rcpt = self.rcpts[index]
        if not rcpt.positive or self.data is None:
            return rcpt
        return self.data


@dataclass(frozen=True, slots=True)
class Head:
    """A transaction's whole command group for one pipelined write: MAIL, every RCPT, DATA."""

    data: bytes
    rcpts: int


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = wire.ReplyParser()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: Exception | None = None
        self.eof = False
        self.drop_plaintext = False
        self.dropped = 0
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self.listener: Callable[[], None] | None = None  # called instead of waking a waiter (SmtpClient.listen)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.drop_plaintext:
            self.dropped += len(data)
            return
        try:
            self.parser.feed(data)
        except RemoteProtocolError as exc:
            self.error = exc
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = ConnectionError(str(exc))
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self.listener is not None:
            self.listener()
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def drain(self) -> None:
        if self._paused and not self.eof:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None


class SmtpClient:
    """One outbound SMTP connection. Create with :meth:`connect`."""

    def __init__(self, proto: _Protocol, peer: tuple[str, int], command_timeout: float) -> None:
        self._p = proto
        self.peer = peer
        self.command_timeout = command_timeout
        self.ext = Extensions()
        self.greeting: Reply | None = None
        self.is_tls = False
        self.tls_info = ""
        self.transactions = 0
        self.broken = False
        self.data_started = False  # the current transaction's message octets were handed to the transport

    @classmethod
    async def connect(
        cls,
        address: str,
        port: int,
        *,
        connect_timeout: float,
        command_timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        read_greeting: bool = True,
    ) -> SmtpClient:
        """Open a TCP (or implicit-TLS) connection and read the greeting (unless ``read_greeting`` is False:
        then the caller reads it with :meth:`read_reply`, telling a silent peer from an unreachable one)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        async with asyncio.timeout(connect_timeout):
            _transport, proto = await loop.create_connection(
                _Protocol,
                host=address,
                port=port,
                family=family,
                ssl=tls,
                server_hostname=server_hostname if tls is not None else None,
            )
        client = cls(proto, (address, port), command_timeout)
        if tls is not None:
            client._note_tls()
        if not read_greeting:
            return client
        try:
            client.greeting = await client.read_reply()
        except BaseException:
            client.close()
            raise
        return client

    # -- replies and commands -------------------------------------------------------------------
    async def read_reply(self, timeout: float | None = None) -> Reply:
        p = self._p
        deadline: float | None = None
        while True:
            if p.error is not None:
                self.broken = True
                raise p.error
            reply = p.parser.next_reply()
            if reply is not None:
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "%s < %s", self.peer[0], reply)
                return reply
            if p.eof:
                self.broken = True
                raise ConnectionError("connection closed by the peer")
            # The timer is armed only when we actually wait: pipelined replies often arrive together.
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + (timeout or self.command_timeout)
            p.waiter = waiter = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                p.waiter = None

    # -- callback-driven use (the burst sender's express lane) ----------------------------------
    def listen(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called whenever bytes, end of stream or an error arrive (None: back to
        :meth:`read_reply`). The callback takes replies with :meth:`reply_nowait`; no reply may be awaited
        while it is set."""
        self._p.listener = callback

    def reply_nowait(self) -> Reply | None:
        """The next complete reply if one has arrived, else None. Raises like :meth:`read_reply` when the
        connection broke (an error, or end of stream with no reply left)."""
        p = self._p
        if p.error is not None:
            self.broken = True
            raise p.error
        reply = p.parser.next_reply()
        if reply is None and p.eof:
            self.broken = True
            raise ConnectionError("connection closed by the peer")
        if reply is not None and log.isEnabledFor(TRACE):
            log.log(TRACE, "%s < %s", self.peer[0], reply)
        return reply

    def unread(self, replies: list[Reply]) -> None:
        """Give replies taken with :meth:`reply_nowait` back, for :meth:`read_reply` to return first."""
        self._p.parser.unread(replies)

    def send(self, data: bytes, shown: str | None = None) -> None:
        """Write ``data`` (already wire form: a :meth:`head`, a ``wire.data_payload``); raises
        ConnectionError when the connection is closed."""
        self._write(data, shown)

    def _write(self, data: bytes, shown: str | None = None) -> None:
        """Send ``data``; the TRACE transcript shows ``shown`` instead when given (secrets, bodies)."""
        t = self._p.transport
        if t is None or t.is_closing() or self._p.eof:
            self.broken = True
            raise ConnectionError("connection closed")
        if log.isEnabledFor(TRACE):
            text = shown if shown is not None else data.decode("utf-8", "replace").rstrip("\r\n")
            log.log(TRACE, "%s > %s", self.peer[0], text.replace("\r\n", " | "))
        t.write(data)

    async def command(self, line: bytes, timeout: float | None = None, shown: str | None = None) -> Reply:
        self._write(line, shown)
        return await self.read_reply(timeout)

    # -- session set-up -------------------------------------------------------------------------
    async def ehlo(self, name: str) -> Reply:
        """EHLO, falling back to HELO on a 5xx (RFC 5321 §4.1.4); sets :attr:`ext`."""
        reply = await self.command(wire.ehlo_command(name))
        if reply.permanent:
            reply = await self.command(b"HELO " + wire.ehlo_command(name)[5:])
            self.ext = Extensions()
        elif reply.positive:
            self.ext = Extensions.from_reply(reply)
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """STARTTLS and the handshake. Plaintext pipelined after the 220 is discarded, never read."""
        reply = await self.command(b"STARTTLS\r\n")
        if reply.code != 220:
            return reply
        p = self._p
        p.drop_plaintext = True
        leftover = p.parser.buffered
        p.parser.discard()
        if leftover:
            log.warning("%s sent %d octets after 220 to STARTTLS; discarded", self.peer[0], leftover)
        assert p.transport is not None
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            p.transport,
            p,
            context,
            server_side=False,
            server_hostname=server_hostname,
            ssl_handshake_timeout=self.command_timeout,
        )
        if new is None:  # pragma: no cover - the transport closed meanwhile
            raise ConnectionError("connection closed during the TLS handshake")
        p.transport = new
        if p.dropped:
            log.warning("%s sent %d plaintext octets during STARTTLS; discarded", self.peer[0], p.dropped)
        p.parser.discard()
        p.drop_plaintext = False
        self.ext = Extensions()  # RFC 3207 §4.2: forget what was learned before TLS
        self._note_tls()
        return reply

    def _note_tls(self) -> None:
        t = self._p.transport
        obj = t.get_extra_info("ssl_object") if t is not None else None
        self.is_tls = obj is not None
        if obj is not None:
            cipher = obj.cipher()
            self.tls_info = f"{obj.version()} {cipher[0] if cipher else ''}".strip()

    async def auth(self, user: str, password: str, *, allow_plaintext: bool = False) -> Reply:
        """AUTH PLAIN (RFC 4616) or LOGIN, whichever the peer offers. Only inside TLS, unless the caller
        passes ``allow_plaintext`` (the burst sender does for a loopback peer only)."""
        if not self.is_tls and not allow_plaintext:
            raise LocalProtocolError("refusing to send a password without TLS")
        mechs = self.ext.auth_mechanisms
        if "PLAIN" in mechs or not mechs:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            return await self.command(b"AUTH PLAIN " + token + b"\r\n", shown="AUTH PLAIN ****")
        reply = await self.command(b"AUTH LOGIN\r\n")
        for secret in (user, password):
            if reply.code != 334:
                return reply
            reply = await self.command(base64.b64encode(secret.encode()) + b"\r\n", shown="****")
        return reply

    # -- transactions ---------------------------------------------------------------------------
    def head(
        self,
        sender: str,
        rcpts: Sequence[Rcpt],
        message: bytes,
        *,
        eight_bit: bool,
        smtputf8: bool,
        all_or_nothing: bool = False,
    ) -> Head | None:
        """The command group of a transaction that goes in one write, or None when it cannot (no
        PIPELINING, or all-or-nothing with several recipients). Raises LocalProtocolError like
        :meth:`transaction` for an address that cannot go on the wire."""
        ext = self.ext
        if not ext.has("PIPELINING") or (all_or_nothing and len(rcpts) > 1):
            return None
        addresses = [r.address for r in rcpts]
        group = wire.command_group(sender, addresses, ext, size=len(message), eight_bit=eight_bit, smtputf8=smtputf8)
        return Head(group, len(addresses))

    async def transaction(
        self,
        sender: str,
        rcpts: Sequence[Rcpt],
        message: bytes,
        *,
        eight_bit: bool,
        smtputf8: bool,
        ret: str = "",
        envid: str = "",
        all_or_nothing: bool = False,
        before_data: Callable[[], Awaitable[None]] | None = None,
        sent_head: Head | None = None,
        then: Callable[[], bytes] | None = None,
        payload: bytes | None = None,
    ) -> TransactionResult:
        """One mail transaction. Commands are encoded (and addresses checked) before anything is written.

        ``all_or_nothing``: the message goes only when every recipient was accepted (else RSET, ``data`` None).
        ``before_data`` runs after the ``354`` and before any octet of the message; if it raises, the
        connection is closed without the final dot (the peer discards the transaction) and the error rises.
        ``sent_head``: this transaction's :meth:`head` already went out (with the previous message).
        ``then``: called right before the message is written; what it returns is written right after it.
        ``payload``: ``wire.data_payload(message)``, when the caller made it already (off the event loop).
        """
        ext = self.ext
        self.data_started = False
        if sent_head is not None:
            self.transactions += 1
            mail_reply = await self.read_reply()
            rcpt_replies = tuple([await self.read_reply() for _ in range(sent_head.rcpts)])
            data_reply = await self.read_reply(DATA_INIT_TIMEOUT)
            return await self._after_data_command(
                mail_reply, rcpt_replies, data_reply, message, all_or_nothing, before_data, then, payload
            )
        mail = wire.mail_command(
            sender, ext, size=len(message), eight_bit=eight_bit, smtputf8=smtputf8, ret=ret, envid=envid
        )
        rcpt_lines = [
            wire.rcpt_command(r.address, ext, smtputf8=smtputf8, notify=r.notify, orcpt=r.orcpt) for r in rcpts
        ]
        self.transactions += 1
        if all_or_nothing and len(rcpt_lines) > 1 and ext.has("PIPELINING"):
            # DATA waits for the RCPT replies: a 354 after a refusal would leave only "." or a dropped
            # connection to keep the others from getting the message.
            self._write(mail + b"".join(rcpt_lines))
            mail_reply = await self.read_reply()
            rcpt_replies = tuple([await self.read_reply() for _ in rcpt_lines])
            if not mail_reply.positive or not all(r.positive for r in rcpt_replies):
                await self.rset()
                return TransactionResult(mail_reply, rcpt_replies, None)
            data_reply = await self.command(b"DATA\r\n", DATA_INIT_TIMEOUT)
        elif ext.has("PIPELINING"):
            self._write(mail + b"".join(rcpt_lines) + b"DATA\r\n")
            mail_reply = await self.read_reply()
            rcpt_replies = tuple([await self.read_reply() for _ in rcpt_lines])
            data_reply = await self.read_reply(DATA_INIT_TIMEOUT)
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.positive:
                return TransactionResult(mail_reply, tuple(mail_reply for _ in rcpts), None)
            rcpt_replies = tuple([await self.command(line) for line in rcpt_lines])
            if not any(r.positive for r in rcpt_replies) or (
                all_or_nothing and not all(r.positive for r in rcpt_replies)
            ):
                await self.rset()
                return TransactionResult(mail_reply, rcpt_replies, None)
            data_reply = await self.command(b"DATA\r\n", DATA_INIT_TIMEOUT)
        return await self._after_data_command(
            mail_reply, rcpt_replies, data_reply, message, all_or_nothing, before_data, then, payload
        )

    async def _after_data_command(
        self,
        mail_reply: Reply,
        rcpt_replies: tuple[Reply, ...],
        data_reply: Reply,
        message: bytes,
        all_or_nothing: bool,
        before_data: Callable[[], Awaitable[None]] | None,
        then: Callable[[], bytes] | None,
        payload: bytes | None,
    ) -> TransactionResult:
        if not mail_reply.positive:
            rcpt_replies = tuple(mail_reply for _ in rcpt_replies)
        if data_reply.code != 354:
            if data_reply.positive:  # a broken peer said 2xx to DATA: the session state is unknown
                self.broken = True
            await self.rset()
            if mail_reply.positive and any(r.positive for r in rcpt_replies):
                rcpt_replies = tuple(data_reply if r.positive else r for r in rcpt_replies)
            return TransactionResult(mail_reply, rcpt_replies, None)
        if not mail_reply.positive or not any(r.positive for r in rcpt_replies):
            # RFC 2920 §3.1: a 354 although nothing was accepted: send an empty message and drop it.
            await self.command(b".\r\n", DATA_END_TIMEOUT)
            return TransactionResult(mail_reply, rcpt_replies, None)
        if all_or_nothing and not all(r.positive for r in rcpt_replies):
            # Only reachable with one pipelined write (a single recipient cannot be partly refused); a
            # 354 with a refused recipient: end without the dot, so nobody gets it.
            self.close()
            raise ConnectionError("354 after a refused recipient; connection dropped, nothing sent")
        if before_data is not None:
            try:
                await before_data()
            except BaseException:
                self.close()  # no final dot: the peer discards the transaction (RFC 5321 §4.1.1.4)
                raise
        if payload is None:
            payload = wire.data_payload(message)
        following = then() if then is not None else b""
        self.data_started = True
        self._write(
            payload + following, shown=f"[message, {len(payload)} octets]" + (" + next MAIL" if following else "")
        )
        await self._p.drain()
        final = await self.read_reply(DATA_END_TIMEOUT)
        return TransactionResult(mail_reply, rcpt_replies, final)

    async def rset(self) -> None:
        if self.broken:
            return
        try:
            reply = await self.command(b"RSET\r\n")
        except (ConnectionError, TimeoutError, RemoteProtocolError):
            self.broken = True
            return
        if not reply.positive:
            self.broken = True

    @property
    def usable(self) -> bool:
        t = self._p.transport
        return not self.broken and not self._p.eof and t is not None and not t.is_closing()

    async def quit(self) -> None:
        """QUIT politely (bounded by a short timeout), then close."""
        try:
            if self.usable:
                self._write(b"QUIT\r\n")
                await self.read_reply(timeout=min(5.0, self.command_timeout))
        except (ConnectionError, TimeoutError, RemoteProtocolError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        t = self._p.transport
        self.broken = True
        if t is not None and not t.is_closing():
            t.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
