"""What the sans-I/O SMTP server core hands its adapter: small frozen events, like h11's.

Events that need a decision (:class:`MailFrom`, :class:`RcptTo`, :class:`AuthAttempt`, :class:`Message`)
pause the core until the adapter calls :meth:`SmtpServer.answer` / :meth:`SmtpServer.answer_auth`; the
core processes no further input meanwhile, so replies go out in command order (RFC 2920 §3.1).
:class:`StartTls` asks the adapter to run the handshake and then call :meth:`SmtpServer.tls_started`;
:class:`Close` means the last reply is queued and the connection should be closed once it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from postroom.auth.sasl import Credentials
from postroom.wire.address import Address


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM``: answer with a Reply; a positive one starts the transaction."""

    sender: Address | None  # None: the null reverse-path <>
    size: int | None  # SIZE= (RFC 1870), None when not given
    body: str  # "7BIT" | "8BITMIME" | "" (RFC 6152)
    smtputf8: bool  # RFC 6531 §3.4
    ret: str  # DSN RET= FULL | HDRS | "" (RFC 3461 §4.3)
    envid: str  # DSN ENVID= as received (xtext decoded)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """``RCPT TO``: answer with a Reply (and a token the adapter gets back in the envelope)."""

    address: Address
    notify: str  # DSN NOTIFY= "", "NEVER" or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 §4.1)
    orcpt: str  # DSN ORCPT= "addr-type;address" as received (RFC 3461 §4.2)


@dataclass(frozen=True, slots=True)
class Recipient:
    """An accepted recipient: the RCPT event and the adapter's token for it (e.g. the resolved mailbox)."""

    rcpt: RcptTo
    token: Any


@dataclass(frozen=True, slots=True)
class Envelope:
    mail: MailFrom
    recipients: tuple[Recipient, ...]
    helo: str
    protocol: str  # RFC 3848 / RFC 6531 §3.7.3 "with" keyword: ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS, …
    authenticated: str  # the authenticated identity, "" if none


@dataclass(frozen=True, slots=True)
class Message:
    """The whole message arrived (final dot or BDAT LAST): store it, then answer with a Reply."""

    envelope: Envelope
    data: bytes  # unstuffed, CRLF line endings, without the trace headers


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """A SASL exchange finished: check the credentials, then :meth:`SmtpServer.answer_auth`."""

    mechanism: str
    credentials: Credentials


@dataclass(frozen=True, slots=True)
class StartTls:
    """The 220 to STARTTLS is queued: send it, run the handshake, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued, then close (after QUIT's 221 or a 421)."""


@dataclass(frozen=True, slots=True)
class NeedData:
    """No event until more bytes arrive."""


NEED_DATA = NeedData()

Event = MailFrom | RcptTo | Message | AuthAttempt | StartTls | Close | NeedData
