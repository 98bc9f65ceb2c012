"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463), and the common ones.

Invariants: a reply's text never contains CR or LF (each element of ``lines`` is one line); the enhanced
code's class digit equals the reply code's first digit; :meth:`Reply.encode` gives the exact wire bytes,
multi-line replies as ``250-…`` then ``250 …``. Enhanced codes are shown only when the session enabled
ENHANCEDSTATUSCODES (the encoder is told).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "" when the reply has none (e.g. 220 greeting, 354, 334)
    lines: tuple[str, ...]

    @classmethod
    def of(cls, code: int, enhanced: str, *lines: str) -> Reply:
        return cls(code, enhanced, tuple(lines) or ("",))

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def encode(self, enhanced: bool = True) -> bytes:
        return _encode(self, enhanced)

    def _encode(self, enhanced: bool) -> bytes:
        code = str(self.code)
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


@functools.lru_cache(maxsize=1024)
def _encode(reply: Reply, enhanced: bool) -> bytes:
    """Replies are immutable and mostly the same few: their wire form is computed once."""
    return reply._encode(enhanced)


# -- the table of common replies (RFC 5321 §4.2.2 codes, RFC 3463 enhanced codes) -----------------------
OK = Reply.of(250, "2.0.0", "OK")
SENDER_OK = Reply.of(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Recipient OK")
RESET_OK = Reply.of(250, "2.0.0", "Reset OK")
NOOP_OK = Reply.of(250, "2.0.0", "OK")
START_DATA = Reply.of(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply.of(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply.of(235, "2.7.0", "Authentication successful")
VRFY_CANNOT = Reply.of(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = Reply.of(502, "5.5.1", "EXPN not available")

SERVICE_CLOSING = Reply.of(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply.of(421, "4.4.2", "Timeout exceeded, closing connection")
LOCAL_ERROR = Reply.of(451, "4.3.0", "Local error in processing, try again later")
STORAGE_FULL = Reply.of(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipients")
NO_TLS_AVAILABLE = Reply.of(454, "4.7.0", "TLS not available")

SYNTAX_ERROR = Reply.of(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply.of(500, "5.5.6", "Line too long")
PARAM_SYNTAX = Reply.of(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply.of(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply.of(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply.of(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply.of(503, "5.5.1", "Bad sequence of commands")
SEND_HELO_FIRST = Reply.of(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply.of(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply.of(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = Reply.of(503, "5.5.1", "Sender already specified")
PARAM_NOT_IMPLEMENTED = Reply.of(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
AUTH_REQUIRED = Reply.of(530, "5.7.0", "Authentication required")
TLS_REQUIRED = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_FAILED = Reply.of(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply.of(501, "5.0.0", "Authentication cancelled")
UNKNOWN_USER = Reply.of(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply.of(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply.of(553, "5.7.1", "Sender address not owned by authenticated user")
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply.of(550, "5.6.11", "Bare CR or LF in message data is not allowed, use CRLF")
MAIL_LOOP = Reply.of(554, "5.4.6", "Too many Received: header fields, mail loop suspected")  # RFC 5321 §6.3
TEXT_LINE_TOO_LONG = Reply.of(550, "5.6.0", "Message has a line longer than allowed (RFC 5321 4.5.3.1.6)")
UTF8_REQUIRED = Reply.of(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
HTTP_REJECTED = Reply.of(554, "5.7.0", "This is an SMTP server, not a web proxy; closing")
