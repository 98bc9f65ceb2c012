"""SASL PLAIN (RFC 4616) and LOGIN as sans-I/O exchanges, shared by SMTP, POP3 and IMAP.

The protocols only frame: they pass each base64 line the client sent (``b"*"`` cancels, RFC 4954 §4) and
send back the base64 challenge they are given. The exchange ends with :class:`Credentials`, which the
protocol hands to the authenticator. No I/O, no password checks here.

Invariants: a malformed response raises :class:`SaslError` (the protocol answers 501 / BAD / -ERR);
``b"*"`` raises :class:`SaslCancelled`; NUL bytes are only meaningful as PLAIN separators.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from postroom.errors import RemoteProtocolError

MECHANISMS = ("PLAIN", "LOGIN")
MAX_RESPONSE = 12 * 1024  # octets of base64 per response (RFC 4954 §4 has 12288 for AUTH lines)


class SaslError(RemoteProtocolError):
    """The client's SASL response is malformed."""


class SaslCancelled(RemoteProtocolError):
    """The client sent ``*`` (RFC 4954 §4, RFC 9051 §6.2.2)."""


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes  # base64 text to send, b"" for an empty challenge


@dataclass(frozen=True, slots=True)
class Credentials:
    authzid: str
    username: str
    password: str


def _decode(line: bytes) -> bytes:
    line = line.strip()
    if line == b"*":
        raise SaslCancelled("authentication cancelled")
    if len(line) > MAX_RESPONSE:
        raise SaslError("SASL response too long")
    if line == b"=":  # RFC 4954 §4: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64 in SASL response") from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("SASL credentials are not UTF-8") from None


class SaslExchange:
    """One authentication exchange. Call :meth:`start` then :meth:`respond` until Credentials come back."""

    def __init__(self, mechanism: str) -> None:
        mech = mechanism.upper()
        if mech not in MECHANISMS:
            raise SaslError(f"unsupported mechanism {mechanism}")
        self.mechanism = mech
        self._step = 0
        self._username = ""

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        """Begin; ``initial`` is the initial response (SASL-IR) or None."""
        if self.mechanism == "PLAIN":
            if initial is None:
                return Challenge(b"")
            return self._plain(_decode(initial))
        if initial is None:
            self._step = 1
            return Challenge(base64.b64encode(b"Username:"))
        self._username = _text(_decode(initial))
        self._step = 2
        return Challenge(base64.b64encode(b"Password:"))

    def respond(self, line: bytes) -> Challenge | Credentials:
        data = _decode(line)
        if self.mechanism == "PLAIN":
            return self._plain(data)
        if self._step == 1:
            self._username = _text(data)
            self._step = 2
            return Challenge(base64.b64encode(b"Password:"))
        if self._step == 2:
            self._step = 3
            return Credentials("", self._username, _text(data))
        raise SaslError("unexpected SASL response")

    @staticmethod
    def _plain(data: bytes) -> Credentials:
        parts = data.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
        return Credentials(_text(parts[0]), _text(parts[1]), _text(parts[2]))
