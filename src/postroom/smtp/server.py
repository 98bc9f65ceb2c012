"""The sans-I/O SMTP server core (RFC 5321 with PIPELINING, 8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES,
CHUNKING, DSN, STARTTLS and AUTH): bytes in, reply bytes and events out.

Use: ``core = SmtpServer(settings)``; send ``core.data_to_send()`` (the greeting first); feed received bytes
with ``core.receive_data``; take ``core.next_event()`` until it is :data:`NEED_DATA`, answering every event
that asks for a decision (see :mod:`postroom.smtp.events`); send ``data_to_send()`` again.

Invariants:
- Every command goes through :data:`DISPATCH` (verb → handler) and :data:`ALLOWED` (verb → states); the
  state transitions are all in this file. No reflection.
- Replies go out in the order of the commands (RFC 2920 §3.1): while an event awaits its answer, no further
  input is processed.
- Only ``<CRLF>.<CRLF>`` ends DATA (:class:`postroom.wire.dotstuff.DotReader`); BDAT chunks are consumed by
  exact length even when the command is refused, so chunk bytes are never run as commands (RFC 3030 §2).
- After STARTTLS's 220 every buffered plaintext byte is dropped, and :meth:`tls_started` resets the whole
  session: EHLO is required again, nothing learnt before TLS survives (RFC 3207 §4.2).
- Every 5xx counts as an error; at ``max_errors`` the core answers 421 and closes. An HTTP verb closes at once.
- The core never imports asyncio, socket, ssl or the store.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postroom.auth.sasl import MAX_RESPONSE, Challenge, Credentials, SaslCancelled, SaslError, SaslExchange
from postroom.errors import LocalProtocolError, ReplyError
from postroom.mime import split_header
from postroom.smtp import commands
from postroom.smtp.events import (
    NEED_DATA,
    AuthAttempt,
    Close,
    Envelope,
    Event,
    MailFrom,
    Message,
    RcptTo,
    Recipient,
    StartTls,
)
from postroom.smtp.limits import SmtpConfig
from postroom.wire import replies
from postroom.wire.dotstuff import DotReader
from postroom.wire.linebuffer import TOO_LONG, LineBuffer
from postroom.wire.replies import Reply

# RFC 1869 §4.1.2: extensions raise the command line limit for MAIL/RCPT (DSN ORCPT alone may be 500).
PARAMS_EXTRA = 1000  # octets allowed beyond max_command_line on MAIL and RCPT lines
#: Events the adapter must answer before the core goes on (a tuple: ``isinstance`` with ``A | B`` builds a
#: union object on every call, ~0.35 µs, and next_event runs ~11 times per message).
ANSWERED_EVENTS = (MailFrom, RcptTo, Message, AuthAttempt)
REPLIED_EVENTS = (MailFrom, RcptTo, Message)  # answered with a Reply (AuthAttempt: answer_auth)
HTTP_VERBS = frozenset({b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"PATCH"})


class State(enum.Enum):
    GREETED = "greeted"  # greeting sent, waiting for EHLO/HELO
    READY = "ready"  # EHLO done, no mail transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    CHUNKING = "chunking"  # BDAT chunks received, waiting for more (RFC 3030)
    DATA = "data"  # reading DATA content (input mode, not a command state)
    BDAT = "bdat"  # reading a BDAT chunk (input mode)
    AUTH = "auth"  # inside a SASL exchange: the next line is a response, not a command
    TLS = "tls"  # 220 to STARTTLS queued; waiting for the handshake
    CLOSED = "closed"

    # Members are singletons compared by identity, so the identity hash is consistent with equality, and it
    # is computed in C: every command looks its state up in ALLOWED (Enum's own ``__hash__`` is Python).
    __hash__ = object.__hash__


_ANY = frozenset({State.GREETED, State.READY, State.MAIL, State.RCPT, State.CHUNKING})

#: Which command may run in which state. Anything else gets the reply from :data:`SEQUENCE_REPLIES`.
ALLOWED: dict[bytes, frozenset[State]] = {
    b"EHLO": _ANY - {State.CHUNKING},
    b"HELO": _ANY - {State.CHUNKING},
    b"MAIL": frozenset({State.READY}),
    b"RCPT": frozenset({State.MAIL, State.RCPT}),
    b"DATA": frozenset({State.RCPT}),
    b"BDAT": _ANY,  # refused by _bdat according to the state, but its chunk is always consumed
    b"RSET": _ANY,
    b"NOOP": _ANY,
    b"QUIT": _ANY,
    b"VRFY": _ANY,
    b"EXPN": _ANY,
    b"HELP": _ANY,
    b"STARTTLS": frozenset({State.READY}),
    b"AUTH": frozenset({State.READY}),
}

#: The reply for a known command in the wrong state (default: 503 bad sequence).
SEQUENCE_REPLIES: dict[tuple[bytes, State], Reply] = {
    (b"MAIL", State.MAIL): replies.NESTED_MAIL,
    (b"MAIL", State.RCPT): replies.NESTED_MAIL,
    (b"RCPT", State.READY): replies.NEED_MAIL,
    (b"DATA", State.READY): replies.NEED_MAIL,
    (b"DATA", State.MAIL): Reply.of(554, "5.5.1", "No valid recipients"),
    (b"DATA", State.CHUNKING): Reply.of(503, "5.5.1", "DATA not allowed after BDAT"),
    (b"STARTTLS", State.MAIL): Reply.of(503, "5.5.1", "STARTTLS not allowed during a mail transaction"),
    (b"STARTTLS", State.RCPT): Reply.of(503, "5.5.1", "STARTTLS not allowed during a mail transaction"),
    (b"AUTH", State.MAIL): Reply.of(503, "5.5.1", "AUTH not allowed during a mail transaction"),
    (b"AUTH", State.RCPT): Reply.of(503, "5.5.1", "AUTH not allowed during a mail transaction"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """What one session's core needs to know. The adapter builds it from the App and the listener."""

    hostname: str
    limits: SmtpConfig
    submission: bool = False  # True on 587/465: AUTH required, AUTH offered
    tls: bool = False  # the connection is already TLS (465, or after STARTTLS)
    starttls: bool = True  # STARTTLS may be offered (a TLS context exists)
    plaintext_auth: bool = False  # AUTH allowed before TLS (loopback and configured so)


class SmtpServer:
    """One SMTP server session. See the module docstring for the calling protocol and invariants."""

    def __init__(self, settings: Settings, *, greet: bool = True) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.is_tls = settings.tls
        self.state = State.GREETED
        self.helo = ""
        self.esmtp = False
        self.authenticated = ""  # identity after a successful AUTH
        self.errors = 0
        self.commands = 0  # command lines processed (the adapter resets its per-command deadline on change)
        self._out: list[bytes] = []
        self._lines = LineBuffer(max(self.limits.max_command_line + PARAMS_EXTRA, MAX_RESPONSE + 16))
        self._reader: DotReader | None = None
        self._chunk_left = 0  # octets of the current BDAT chunk still to consume
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None  # the reply for a refused chunk, once it is consumed
        self._chunk_return = State.READY  # the state to go back to after a refused chunk
        self._chunks: list[bytes] = []
        self._chunk_size = 0
        self._chunk_too_big = False
        self._mail: MailFrom | None = None
        self._rcpts: list[Recipient] = []
        self._sasl: SaslExchange | None = None
        self._waiting: Event | None = None  # an event handed out and not yet answered
        self._ready: list[Event] = []
        if greet:
            self._out.append(_greeting(settings.hostname))

    # -- the adapter's API ------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_data(self) -> bool:
        """True while message content (DATA or a BDAT chunk) is being received."""
        return self.state in (State.DATA, State.BDAT)

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED or self.state is State.TLS:
            return  # RFC 3207 §4.2: plaintext after STARTTLS is discarded
        if self.state is State.DATA and self._waiting is None:
            assert self._reader is not None
            rest = self._reader.feed(data)
            if rest is not None:
                self._data_done(rest)
        elif self.state is State.BDAT and self._waiting is None:
            self._consume_chunk(data)
        else:
            self._lines.feed(data)

    def next_event(self) -> Event:
        if self._waiting is not None:
            raise LocalProtocolError(f"answer {type(self._waiting).__name__} before asking for more")
        while not self._ready:
            if self.state in (State.CLOSED, State.TLS, State.DATA, State.BDAT):
                break
            line = self._lines.next_line()
            if line is None:
                break
            self.commands += 1
            if self.state is State.AUTH:
                self._auth_line(line)
            else:
                self._command(line)
        if not self._ready:
            return NEED_DATA
        event = self._ready.pop(0)
        if isinstance(event, ANSWERED_EVENTS):
            self._waiting = event
        return event

    def answer(self, reply: Reply, token: Any = None) -> None:
        """Answer the pending MailFrom, RcptTo or Message event with ``reply``."""
        event = self._waiting
        if not isinstance(event, REPLIED_EVENTS):
            raise LocalProtocolError("no MAIL, RCPT or message event awaits an answer")
        self._waiting = None
        if isinstance(event, MailFrom):
            if reply.is_positive:
                self._mail = event
                self.state = State.MAIL
        elif isinstance(event, RcptTo):
            if reply.is_positive:
                self._rcpts.append(Recipient(event, token))
                self.state = State.RCPT
        else:
            self._reset_transaction()
        self._reply(reply)

    def answer_auth(self, identity: str | None) -> None:
        """Answer the pending AuthAttempt: the authenticated identity, or None when it failed."""
        if not isinstance(self._waiting, AuthAttempt):
            raise LocalProtocolError("no AUTH event awaits an answer")
        self._waiting = None
        self.state = State.READY
        if identity:
            self.authenticated = identity
            self._reply(replies.AUTH_OK)
        else:
            self._reply(replies.AUTH_FAILED)

    def tls_started(self) -> None:
        """The STARTTLS handshake completed: forget everything (RFC 3207 §4.2), wait for EHLO."""
        if self.state is not State.TLS:
            raise LocalProtocolError("tls_started without STARTTLS")
        self.is_tls = True
        self.state = State.GREETED
        self.helo = ""
        self.esmtp = False
        self._lines.clear()
        self._reset_transaction()

    def timed_out(self) -> None:
        """The adapter's deadline passed: 421 and close (RFC 5321 §4.5.3.2)."""
        self._close(replies.TIMEOUT)

    def shutting_down(self) -> None:
        self._close(replies.SERVICE_CLOSING)

    # -- replies ----------------------------------------------------------------------------------
    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.encode())
        if reply.code >= 500:
            self.errors += 1
            if self.limits.max_errors and self.errors >= self.limits.max_errors:
                self._close(replies.TOO_MANY_ERRORS)

    def _close(self, reply: Reply) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._out.append(reply.encode())
        self._lines.clear()
        self._ready.append(Close())

    def _reset_transaction(self) -> None:
        self._mail = None
        self._rcpts = []
        self._reader = None
        self._chunks = []
        self._chunk_size = 0
        self._chunk_too_big = False
        if self.state in (State.MAIL, State.RCPT, State.CHUNKING, State.DATA, State.BDAT):
            self.state = State.READY

    # -- commands ---------------------------------------------------------------------------------
    def _command(self, line: bytes) -> None:
        if line == TOO_LONG:
            self._reply(replies.LINE_TOO_LONG)
            return
        verb, arg = commands.split_command(line)
        if verb in HTTP_VERBS:  # a web client or proxy abuse: close at once (like Postfix's forbidden cmds)
            self._close(replies.HTTP_REJECTED)
            return
        limit = self.limits.max_command_line - 2  # the limit counts CRLF
        if verb in (b"MAIL", b"RCPT"):
            limit += PARAMS_EXTRA
        if len(line) > limit and verb != b"AUTH":
            self._reply(replies.LINE_TOO_LONG)
            return
        handler = DISPATCH.get(verb)
        if handler is None:
            self._reply(replies.SYNTAX_ERROR)
            return
        if verb == b"BDAT":  # its chunk must be consumed in every state; _bdat refuses it if need be
            _bdat(self, arg.decode("ascii", "replace"))
            return
        if self.state not in ALLOWED[verb]:
            if self.state is State.GREETED:
                self._reply(replies.SEND_HELO_FIRST)
            else:
                self._reply(SEQUENCE_REPLIES.get((verb, self.state), replies.BAD_SEQUENCE))
            return
        try:
            text = arg.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(replies.PARAM_SYNTAX)
            return
        try:
            handler(self, text)
        except ReplyError as exc:
            self._reply(Reply.of(exc.code, exc.enhanced, exc.text))

    def _capabilities(self) -> list[str]:
        caps = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.limits.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "CHUNKING",  # RFC 3030
            "DSN",  # RFC 3461
        ]
        if not self.is_tls and self.settings.starttls:
            caps.append("STARTTLS")  # RFC 3207
        if self._auth_offered():
            caps.append("AUTH PLAIN LOGIN")  # RFC 4954
        return caps

    def _auth_offered(self) -> bool:
        s = self.settings
        return s.submission and not self.authenticated and (self.is_tls or s.plaintext_auth)

    def _feed_rest_to_reader(self) -> None:
        assert self._reader is not None
        rest = self._reader.feed(self._lines.take_rest())
        if rest is not None:
            self._data_done(rest)

    def _data_done(self, rest: bytes) -> None:
        reader = self._reader
        assert reader is not None
        self.state = State.RCPT
        self._lines.feed(rest)
        if reader.error is not None:
            self._reset_transaction()
            self._reply(_READER_ERRORS[reader.error])
            return
        self._emit_message(reader.content())

    def _emit_message(self, data: bytes) -> None:
        assert self._mail is not None
        if self.limits.max_received and received_fields(data) >= self.limits.max_received:
            self._reset_transaction()  # RFC 5321 §6.3: a loop; 554 like Postfix's hopcount_limit
            self._reply(replies.MAIL_LOOP)
            return
        env = Envelope(self._mail, tuple(self._rcpts), self.helo, self._protocol(), self.authenticated)
        self._ready.append(Message(env, data))

    def _protocol(self) -> str:
        """RFC 3848 / RFC 6531 §3.7.3 "with" keyword for the Received: header."""
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self._mail is not None and self._mail.smtputf8 else "ESMTP"
        return base + ("S" if self.is_tls else "") + ("A" if self.authenticated else "")

    # -- BDAT (RFC 3030) --------------------------------------------------------------------------
    def _consume_chunk(self, data: bytes) -> None:
        take = data[: self._chunk_left]
        self._chunk_left -= len(take)
        if self._chunk_refusal is None and not self._chunk_too_big:
            self._chunk_size += len(take)
            if self.limits.max_message_size and self._chunk_size > self.limits.max_message_size:
                self._chunk_too_big = True
                self._chunks = []
            else:
                self._chunks.append(take)
        if self._chunk_left == 0:
            self._chunk_done()
        rest = data[len(take) :]
        if rest:
            self._lines.feed(rest)

    def _chunk_done(self) -> None:
        refusal = self._chunk_refusal
        if refusal is not None:
            self._chunk_refusal = None
            self.state = self._chunk_return
            self._reply(refusal)
            return
        if self._chunk_too_big:
            self._reset_transaction()
            self._reply(replies.MESSAGE_TOO_BIG)
            return
        self.state = State.CHUNKING
        if not self._chunk_last:
            self._reply(Reply.of(250, "2.0.0", f"{self._chunk_size} octets received"))
            return
        data = b"".join(self._chunks)
        self._chunks = []
        self._emit_message(data)

    def _auth_line(self, line: bytes) -> None:
        if line == TOO_LONG:
            self.state = State.READY
            self._sasl = None
            self._reply(Reply.of(501, "5.5.2", "Authentication response too long"))
            return
        _sasl_step(self, lambda sasl: sasl.respond(line))


def received_fields(data: bytes) -> int:
    """The ``Received:`` fields in the header block of ``data`` (message content, CRLF line endings): the
    trace fields every relay adds, counted to detect a mail loop (RFC 5321 §6.3)."""
    header = data[: split_header(data)[0]].lower()
    return header.count(b"\nreceived:") + header.startswith(b"received:")


@functools.lru_cache(maxsize=16)
def _greeting(hostname: str) -> bytes:
    return Reply.of(220, "", f"{hostname} ESMTP Postroom").encode()


@functools.lru_cache(maxsize=64)
def _caps_wire(caps: tuple[str, ...]) -> bytes:
    """The EHLO reply's extension lines (after the greeting line), computed once per set."""
    return Reply(250, "", caps).encode()


_READER_ERRORS: dict[str, Reply] = {
    "bare": replies.BARE_LINE_ENDING,
    "line": replies.TEXT_LINE_TOO_LONG,
    "size": replies.MESSAGE_TOO_BIG,
}


# -- command handlers: (core, argument text) -> None; they reply or queue an event ------------------
def _ehlo(core: SmtpServer, arg: str, *, esmtp: bool = True) -> None:
    if not arg or " " in arg:
        raise commands.fail(replies.PARAM_SYNTAX)
    core._reset_transaction()
    core.helo = arg
    core.esmtp = esmtp
    core.state = State.READY
    greeting = f"{core.settings.hostname} greets {arg}"
    if not esmtp:
        core._reply(Reply.of(250, "", greeting))
        return
    caps = core._capabilities()
    core._out.append(f"250-{greeting}\r\n".encode() + _caps_wire(tuple(caps)))


def _helo(core: SmtpServer, arg: str) -> None:
    _ehlo(core, arg, esmtp=False)


def _mail(core: SmtpServer, arg: str) -> None:
    if core.settings.submission and not core.authenticated:
        raise commands.fail(replies.AUTH_REQUIRED)
    event = commands.parse_mail(arg, max_size=core.limits.max_message_size)
    core._ready.append(event)


def _rcpt(core: SmtpServer, arg: str) -> None:
    assert core._mail is not None
    if len(core._rcpts) >= core.limits.max_recipients:
        core._reply(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10
        return
    core._ready.append(commands.parse_rcpt(arg, smtputf8=core._mail.smtputf8))


def _data(core: SmtpServer, arg: str) -> None:
    if arg:
        raise commands.fail(replies.PARAM_SYNTAX)
    core.state = State.DATA
    core._reader = DotReader(core.limits.max_text_line, core.limits.max_message_size)
    core._reply(replies.START_DATA)
    core._feed_rest_to_reader()


def _bdat(core: SmtpServer, arg: str) -> None:
    words = arg.split(" ")
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 20:
        # Without a valid size the chunk cannot be skipped: nothing after this can be trusted.
        core._close(Reply.of(501, "5.5.4", "Invalid BDAT syntax, closing connection"))
        return
    if len(words) == 2 and words[1].upper() != "LAST":
        core._close(Reply.of(501, "5.5.4", "Invalid BDAT syntax, closing connection"))
        return
    refusal: Reply | None = None
    if core.state is State.GREETED:
        refusal = replies.SEND_HELO_FIRST
    elif core.state is State.READY:
        refusal = replies.NEED_MAIL
    elif core.state is State.MAIL:
        refusal = Reply.of(554, "5.5.1", "No valid recipients")
    core._chunk_refusal = refusal
    core._chunk_return = core.state
    core._chunk_left = int(words[0])
    core._chunk_last = len(words) == 2
    core.state = State.BDAT
    if core._chunk_left == 0:
        core._chunk_done()
    else:
        core._consume_chunk(core._lines.take_rest())


def _rset(core: SmtpServer, arg: str) -> None:
    core._reset_transaction()
    core._reply(replies.RESET_OK)


def _noop(core: SmtpServer, arg: str) -> None:
    core._reply(replies.NOOP_OK)


def _quit(core: SmtpServer, arg: str) -> None:
    core._close(Reply.of(221, "2.0.0", f"{core.settings.hostname} closing connection"))


def _vrfy(core: SmtpServer, arg: str) -> None:
    core._reply(replies.VRFY_CANNOT)  # RFC 5321 §3.5.3: 252 reveals nothing


def _expn(core: SmtpServer, arg: str) -> None:
    core._reply(replies.EXPN_DISABLED)


def _help(core: SmtpServer, arg: str) -> None:
    core._reply(Reply.of(214, "2.0.0", "See RFC 5321"))


def _starttls(core: SmtpServer, arg: str) -> None:
    if arg:
        raise commands.fail(replies.PARAM_SYNTAX)
    if core.is_tls:
        raise commands.fail(Reply.of(503, "5.5.1", "TLS already active"))
    if not core.settings.starttls:
        core._reply(replies.NO_TLS_AVAILABLE)
        return
    if core.authenticated:
        raise commands.fail(Reply.of(503, "5.5.1", "STARTTLS not allowed after AUTH"))
    core._reply(replies.READY_TLS)
    core.state = State.TLS
    core._lines.clear()  # RFC 3207 §4.2: pipelined plaintext after STARTTLS is discarded
    core._ready.append(StartTls())


def _auth(core: SmtpServer, arg: str) -> None:
    if not core.settings.submission:
        raise commands.fail(replies.NOT_IMPLEMENTED)
    if core.authenticated:
        raise commands.fail(Reply.of(503, "5.5.1", "Already authenticated"))
    if not core.is_tls and not core.settings.plaintext_auth:
        raise commands.fail(replies.TLS_REQUIRED)  # RFC 4954 §4, RFC 3207: no plaintext passwords
    mech, _, initial = arg.partition(" ")
    try:
        core._sasl = SaslExchange(mech)
    except SaslError:
        raise commands.fail(Reply.of(504, "5.5.4", "Unrecognized authentication mechanism")) from None
    core.state = State.AUTH
    _sasl_step(core, lambda sasl: sasl.start(initial.encode() if initial else None))


def _sasl_step(core: SmtpServer, step: Callable[[SaslExchange], Challenge | Credentials]) -> None:
    assert core._sasl is not None
    try:
        result = step(core._sasl)
    except SaslCancelled:
        core.state = State.READY
        core._reply(replies.AUTH_CANCELLED)
        return
    except SaslError:
        core.state = State.READY
        core._reply(Reply.of(501, "5.5.2", "Malformed authentication response"))
        return
    if isinstance(result, Challenge):
        core._out.append(b"334 " + result.data + b"\r\n")
        return
    mechanism = core._sasl.mechanism
    core._sasl = None
    core._ready.append(AuthAttempt(mechanism, result))


DISPATCH: dict[bytes, Callable[[SmtpServer, str], None]] = {
    b"EHLO": _ehlo,
    b"HELO": _helo,
    b"MAIL": _mail,
    b"RCPT": _rcpt,
    b"DATA": _data,
    b"BDAT": _bdat,
    b"RSET": _rset,
    b"NOOP": _noop,
    b"QUIT": _quit,
    b"VRFY": _vrfy,
    b"EXPN": _expn,
    b"HELP": _help,
    b"STARTTLS": _starttls,
    b"AUTH": _auth,
}
