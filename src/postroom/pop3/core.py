"""The sans-I/O POP3 server session (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH RFC 5034).

Bytes go in with :meth:`Pop3Session.receive_data`; :meth:`Pop3Session.next_event` answers every command it can
from its own state (writing the reply to :meth:`Pop3Session.data_to_send`) and returns an event only when the
adapter must do I/O (see :mod:`postroom.pop3.events`). No asyncio, socket, ssl or store here.

Invariants:
- States follow RFC 1939 §3: AUTHORIZATION → TRANSACTION → UPDATE, plus CLOSED. Which command is valid in
  which state is one table, :data:`COMMANDS`; dispatch goes only through it.
- The maildrop (numbers, sizes, UIDs) is fixed at login; DELE only marks, RSET unmarks, and only QUIT in
  TRANSACTION produces :class:`~postroom.pop3.events.Update` (RFC 1939 §6). A session that ends any other way
  never asks for a deletion.
- While an event is outstanding, no further command is parsed: replies stay in command order (PIPELINING,
  RFC 2449 §6.6).
- After STLS everything still buffered is dropped (RFC 2595 §3.1), so no pipelined plaintext command ever
  runs inside TLS.
- USER/PASS/AUTH are refused and not advertised before TLS unless ``plaintext_ok`` (loopback allowance).
- Unknown user and wrong password get byte-identical replies (:data:`AUTH_FAILED`).
- Only :class:`~postroom.errors.RemoteProtocolError` subclasses are caught from parsing; everything else is
  our bug and propagates to the adapter.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

from postroom.auth.sasl import MECHANISMS, Challenge, Credentials, SaslCancelled, SaslError, SaslExchange
from postroom.errors import LocalProtocolError
from postroom.pop3.events import (
    NEED_DATA,
    Authenticate,
    Close,
    Event,
    Retrieve,
    StartTls,
    Update,
)
from postroom.pop3.framing import TERMINATOR, dotstuff, top
from postroom.pop3.limits import Pop3Config
from postroom.pop3.maildrop import EMPTY, Maildrop
from postroom.pop3.parser import BadLine, Command, LineBuffer, parse_line


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"  # same for unknown user and bad password
IN_USE = b"-ERR [IN-USE] Unable to lock maildrop: another session is using it\r\n"  # RFC 2449 §8.1.1
LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Minimum time between logins has not passed yet\r\n"  # RFC 2449 §8.1.2
PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS first\r\n"
TEMP_FAILURE = b"-ERR [SYS/TEMP] Temporary server failure, try again later\r\n"  # RFC 3206 §4
NO_SUCH_MESSAGE = b"-ERR No such message\r\n"
MAX_MESSAGE_NUMBER_DIGITS = 10  # a maildrop never holds 10**10 messages; bounds int() work


def _number(text: str) -> int | None:
    """A decimal message number or count as RFC 1939 §3 allows (digits only), else None."""
    if not text or len(text) > MAX_MESSAGE_NUMBER_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


_E = TypeVar("_E", StartTls, Authenticate, Retrieve, Update)
Handler = Callable[["Pop3Session", Command], Event | None]


class Pop3Session:
    """One POP3 server session. See the module docstring for the protocol it keeps."""

    def __init__(
        self,
        config: Pop3Config,
        *,
        hostname: str = "localhost",
        tls_active: bool = False,
        stls_available: bool = False,
        plaintext_ok: bool = False,
        implementation: str = "Postroom",
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.tls_active = tls_active
        self.stls_available = stls_available and not tls_active
        self.plaintext_ok = plaintext_ok
        self.implementation = implementation
        self.state = State.AUTHORIZATION
        self.username = ""  # the authenticated login, once TRANSACTION
        self.errors = 0
        self._lines = LineBuffer(config.max_command_line)
        self._out: list[bytes] = []
        self._out_size = 0
        self._pending: Event | None = None
        self._user: str | None = None  # USER seen, waiting for PASS
        self._sasl: SaslExchange | None = None
        self._drop: Maildrop = EMPTY
        self._deleted: set[int] = set()  # message numbers marked by DELE
        self._count = 0  # messages not marked deleted
        self._size = 0  # their octets
        self._emit(f"+OK {implementation} POP3 server ready\r\n".encode())

    # -- the adapter's API ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._lines.feed(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return out

    @property
    def pending_output(self) -> int:
        """Octets waiting in :meth:`data_to_send` (the adapter flushes early above its high-water mark)."""
        return self._out_size

    @property
    def in_sasl(self) -> bool:
        """True while an AUTH exchange waits for the client's next (secret) response line."""
        return self._sasl is not None

    @property
    def buffered_input(self) -> int:
        return self._lines.buffered

    def next_event(self) -> Event:
        """Answer buffered commands until one needs I/O (that event), input runs out or the session ends."""
        if self._pending is not None:
            raise LocalProtocolError(f"{type(self._pending).__name__} is still outstanding")
        while self.state is not State.CLOSED:
            item = self._lines.next_line()
            if item is None:
                return NEED_DATA
            event = self._line(item)
            if event is not None:
                if not isinstance(event, Close):
                    self._pending = event
                return event
        return Close()

    def tls_started(self) -> None:
        """The TLS handshake after STLS finished: drop any plaintext still buffered (RFC 2595 §3.1)."""
        self._finish(StartTls)
        self._lines.clear()
        self.tls_active = True
        self.stls_available = False

    def tls_failed(self) -> None:
        """The handshake failed: the session is over."""
        self._finish(StartTls)
        self.state = State.CLOSED

    def login_ok(self, username: str, maildrop: Maildrop) -> None:
        """Credentials verified and maildrop locked and loaded: enter TRANSACTION (RFC 1939 §4)."""
        self._finish(Authenticate)
        self.state = State.TRANSACTION
        self.username = username
        self._drop = maildrop
        self._deleted.clear()
        self._count, self._size = maildrop.count, maildrop.size
        self._emit(f"+OK Logged in, maildrop has {self._count} messages ({self._size} octets)\r\n".encode())

    def login_failed(self) -> None:
        """Unknown user or wrong password (indistinguishable on the wire)."""
        self._finish(Authenticate)
        self._emit(AUTH_FAILED)
        self._error()

    def login_in_use(self) -> None:
        """Credentials fine but another session holds the maildrop lock (RFC 1939 §4, RFC 2449 [IN-USE])."""
        self._finish(Authenticate)
        self._emit(IN_USE)

    def login_too_soon(self) -> None:
        """Credentials fine, but the last login was less than LOGIN-DELAY seconds ago (RFC 2449 §6.8, §8.1.2)."""
        self._finish(Authenticate)
        self._emit(LOGIN_DELAY)
        self._error()

    def login_unavailable(self) -> None:
        """The store failed while logging in."""
        self._finish(Authenticate)
        self._emit(TEMP_FAILURE)

    def message(self, raw: bytes) -> None:
        """The bytes of the outstanding :class:`Retrieve`: send them as a dot-stuffed multi-line reply."""
        event = self._finish(Retrieve)
        if event.lines is None:
            size = self._drop.entries[event.number - 1].size
            self._emit(f"+OK {size} octets\r\n".encode())
            body = dotstuff(raw)
        else:
            self._emit(b"+OK Top of message follows\r\n")
            body = dotstuff(top(raw, event.lines))
        self._emit(body)
        self._emit(TERMINATOR)

    def message_unavailable(self) -> None:
        """The message bytes could not be read (e.g. removed underneath by IMAP EXPUNGE)."""
        self._finish(Retrieve)
        self._emit(b"-ERR [SYS/TEMP] Message is no longer available\r\n")

    def update_result(self, removed: int, ok: bool = True) -> Close:
        """The UPDATE state's deletions finished (RFC 1939 §6): say goodbye and close."""
        self._finish(Update)
        return self._sign_off(removed, ok)

    def _sign_off(self, removed: int, ok: bool) -> Close:
        if ok:
            left = len(self._drop) - removed
            self._emit(f"+OK {self.implementation} POP3 server signing off ({left} messages left)\r\n".encode())
        else:
            self._emit(b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")  # RFC 1939 §6
        self.state = State.CLOSED
        return Close()

    # -- internals -------------------------------------------------------------------------------
    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _finish(self, kind: type[_E]) -> _E:
        event = self._pending
        if not isinstance(event, kind):
            raise LocalProtocolError(f"no {kind.__name__} outstanding (have {event!r})")
        self._pending = None
        return event

    def _error(self) -> Event | None:
        self.errors += 1
        if self.errors >= self.config.max_errors:
            self._emit(b"-ERR Too many errors, closing connection\r\n")
            self.state = State.CLOSED
            return Close()
        return None

    def _err(self, text: bytes) -> Event | None:
        self._emit(text)
        return self._error()

    def _line(self, item: bytes | BadLine) -> Event | None:
        if self._sasl is not None:
            if isinstance(item, BadLine):
                self._sasl = None
                self._lines.max_line = self.config.max_command_line
                return self._err(b"-ERR [AUTH] SASL response too long\r\n")
            return self._sasl_response(item)
        parsed = item if isinstance(item, BadLine) else parse_line(item)
        if isinstance(parsed, BadLine):
            return self._err(f"-ERR {parsed.reason.capitalize()}\r\n".encode())
        entry = COMMANDS.get(parsed.verb)
        if entry is None:
            return self._err(b"-ERR Unknown command\r\n")
        states, handler = entry
        if self.state not in states:
            return self._err(f"-ERR {parsed.verb} not valid in the {self.state.value} state\r\n".encode())
        return handler(self, parsed)

    def _auth_allowed(self) -> bool:
        return self.tls_active or self.plaintext_ok

    def _message(self, text: str) -> int | None:
        """Resolve a message-number argument to a 1-based index of a message not marked deleted."""
        n = _number(text)
        if n is None or n < 1 or n > len(self._drop) or n in self._deleted:
            return None
        return n

    # -- AUTHORIZATION ---------------------------------------------------------------------------
    def _capa(self, cmd: Command) -> Event | None:
        lines = ["TOP", "UIDL"]
        if self.state is State.AUTHORIZATION and self._auth_allowed():
            lines += ["USER", "SASL " + " ".join(MECHANISMS)]
        lines += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.stls_available and self.state is State.AUTHORIZATION:
            lines.append("STLS")
        if self.config.expire:
            lines.append(f"EXPIRE {self.config.expire}")
        if self.config.login_delay > 0:
            lines.append(f"LOGIN-DELAY {self.config.login_delay}")
        lines.append(f"IMPLEMENTATION {self.implementation}")
        self._emit(("+OK Capability list follows\r\n" + "".join(f"{x}\r\n" for x in lines)).encode())
        self._emit(TERMINATOR)
        return None

    def _stls(self, cmd: Command) -> Event | None:
        if not self.stls_available:
            return self._err(b"-ERR STLS not available (TLS is already active or not offered)\r\n")
        self._emit(b"+OK Begin TLS negotiation\r\n")
        self._lines.clear()  # RFC 2595 §3.1: nothing pipelined after STLS may run inside TLS
        return StartTls()

    def _user_cmd(self, cmd: Command) -> Event | None:
        if not self._auth_allowed():
            return self._err(PLAINTEXT_REFUSED)
        if not cmd.rest:
            return self._err(b"-ERR USER needs a name\r\n")
        self._user = cmd.rest.strip()
        self._emit(b"+OK\r\n")
        return None

    def _pass(self, cmd: Command) -> Event | None:
        if not self._auth_allowed():
            return self._err(PLAINTEXT_REFUSED)
        user, self._user = self._user, None
        if user is None:
            return self._err(b"-ERR USER first\r\n")
        return Authenticate(user, cmd.rest, mechanism="USER")

    def _apop(self, cmd: Command) -> Event | None:
        # RFC 1939 §7: APOP needs the plaintext shared secret; Postroom stores only argon2 hashes.
        return self._err(b"-ERR APOP not supported\r\n")

    def _auth(self, cmd: Command) -> Event | None:
        if not cmd.args:  # list the mechanisms, as servers before RFC 5034 did (fetchmail probes this)
            listing = "".join(f"{m}\r\n" for m in MECHANISMS) if self._auth_allowed() else ""
            self._emit(f"+OK\r\n{listing}".encode())
            self._emit(TERMINATOR)
            return None
        if not self._auth_allowed():
            return self._err(PLAINTEXT_REFUSED)
        if len(cmd.args) > 2:
            return self._err(b"-ERR Syntax: AUTH mechanism [initial-response]\r\n")
        try:
            exchange = SaslExchange(cmd.args[0])
            initial = cmd.args[1].encode("ascii", "surrogateescape") if len(cmd.args) == 2 else None
            step = exchange.start(initial)
        except SaslCancelled:
            return self._err(b"-ERR [AUTH] Authentication cancelled\r\n")
        except SaslError:
            return self._err(b"-ERR [AUTH] Invalid SASL mechanism or response\r\n")
        return self._sasl_step(exchange, step)

    def _sasl_step(self, exchange: SaslExchange, step: Challenge | Credentials) -> Event | None:
        if isinstance(step, Challenge):
            self._sasl = exchange
            self._lines.max_line = max(self.config.max_command_line, 12 * 1024 + 2)  # RFC 5034 §4
            self._emit(b"+ " + step.data + b"\r\n")
            return None
        self._sasl = None
        self._lines.max_line = self.config.max_command_line
        return Authenticate(step.username, step.password, step.authzid, exchange.mechanism)

    def _sasl_response(self, line: bytes) -> Event | None:
        exchange = self._sasl
        assert exchange is not None
        try:
            step = exchange.respond(line)
        except SaslCancelled:
            self._sasl = None
            self._lines.max_line = self.config.max_command_line
            return self._err(b"-ERR [AUTH] Authentication cancelled\r\n")  # RFC 5034 §4
        except SaslError:
            self._sasl = None
            self._lines.max_line = self.config.max_command_line
            return self._err(b"-ERR [AUTH] Invalid SASL response\r\n")
        return self._sasl_step(exchange, step)

    def _quit(self, cmd: Command) -> Event | None:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE  # RFC 1939 §6
            uids = tuple(self._drop.entries[i - 1].uid for i in sorted(self._deleted))
            if uids:
                return Update(uids)
            return self._sign_off(0, True)
        self._emit(f"+OK {self.implementation} POP3 server signing off\r\n".encode())
        self.state = State.CLOSED
        return Close()

    # -- TRANSACTION -----------------------------------------------------------------------------
    def _stat(self, cmd: Command) -> Event | None:
        self._emit(f"+OK {self._count} {self._size}\r\n".encode())
        return None

    def _list(self, cmd: Command) -> Event | None:
        if cmd.args:
            n = self._message(cmd.args[0])
            if n is None:
                return self._err(NO_SUCH_MESSAGE)
            self._emit(f"+OK {n} {self._drop.entries[n - 1].size}\r\n".encode())
            return None
        self._emit(f"+OK {self._count} messages ({self._size} octets)\r\n".encode())
        self._emit(self._drop.scan_lines(self._deleted))
        self._emit(TERMINATOR)
        return None

    def _uidl(self, cmd: Command) -> Event | None:
        if cmd.args:
            n = self._message(cmd.args[0])
            if n is None:
                return self._err(NO_SUCH_MESSAGE)
            self._emit(f"+OK {n} {self._drop.unique_id(self._drop.entries[n - 1])}\r\n".encode())
            return None
        self._emit(b"+OK\r\n")
        self._emit(self._drop.uidl_lines(self._deleted))
        self._emit(TERMINATOR)
        return None

    def _retr(self, cmd: Command) -> Event | None:
        if len(cmd.args) != 1:
            return self._err(b"-ERR Syntax: RETR msg\r\n")
        n = self._message(cmd.args[0])
        if n is None:
            return self._err(NO_SUCH_MESSAGE)
        entry = self._drop.entries[n - 1]
        return Retrieve(n, entry.uid, entry.blob_id)

    def _top(self, cmd: Command) -> Event | None:
        if len(cmd.args) != 2:
            return self._err(b"-ERR Syntax: TOP msg n\r\n")
        lines = _number(cmd.args[1])
        if lines is None:
            return self._err(b"-ERR Invalid line count\r\n")
        n = self._message(cmd.args[0])
        if n is None:
            return self._err(NO_SUCH_MESSAGE)
        entry = self._drop.entries[n - 1]
        return Retrieve(n, entry.uid, entry.blob_id, lines)

    def _dele(self, cmd: Command) -> Event | None:
        if len(cmd.args) != 1:
            return self._err(b"-ERR Syntax: DELE msg\r\n")
        n = _number(cmd.args[0])
        if n is None or n < 1 or n > len(self._drop):
            return self._err(NO_SUCH_MESSAGE)
        if n in self._deleted:
            return self._err(f"-ERR Message {n} already deleted\r\n".encode())
        self._deleted.add(n)
        self._count -= 1
        self._size -= self._drop.entries[n - 1].size
        self._emit(f"+OK Message {n} deleted\r\n".encode())
        return None

    def _noop(self, cmd: Command) -> Event | None:
        self._emit(b"+OK\r\n")
        return None

    def _rset(self, cmd: Command) -> Event | None:
        self._deleted.clear()
        self._count, self._size = self._drop.count, self._drop.size
        self._emit(f"+OK Maildrop has {self._count} messages ({self._size} octets)\r\n".encode())
        return None


_AUTHZ = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTHZ | _TRANS

#: verb → (states where it is valid, handler). RFC 1939 §4-§7, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4.
COMMANDS: dict[str, tuple[frozenset[State], Handler]] = {
    "CAPA": (_BOTH, Pop3Session._capa),
    "QUIT": (_BOTH, Pop3Session._quit),
    "STLS": (_AUTHZ, Pop3Session._stls),
    "USER": (_AUTHZ, Pop3Session._user_cmd),
    "PASS": (_AUTHZ, Pop3Session._pass),
    "APOP": (_AUTHZ, Pop3Session._apop),
    "AUTH": (_AUTHZ, Pop3Session._auth),
    "STAT": (_TRANS, Pop3Session._stat),
    "LIST": (_TRANS, Pop3Session._list),
    "UIDL": (_TRANS, Pop3Session._uidl),
    "RETR": (_TRANS, Pop3Session._retr),
    "TOP": (_TRANS, Pop3Session._top),
    "DELE": (_TRANS, Pop3Session._dele),
    "NOOP": (_TRANS, Pop3Session._noop),
    "RSET": (_TRANS, Pop3Session._rset),
}
