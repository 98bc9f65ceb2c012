"""What the POP3 core asks its adapter to do, and what the adapter hands back. Frozen dataclasses, no I/O.

The core (:mod:`postroom.pop3.core`) answers every command it can answer from its own state. For the few
that need the outside world it returns one of these events from ``next_event()`` and waits for the matching
call (``auth_result``, ``message``, ``update_result``, ``tls_started``) before it reads the next command.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MaildropEntry:
    """One message of the maildrop as fixed at login (RFC 1939 §5: numbers never change in a session)."""

    uid: int
    blob_id: int
    size: int  # octets of the stored message, CRLF line endings: what STAT/LIST report (RFC 1939 §5)


@dataclass(frozen=True, slots=True)
class NeedData:
    """Every received command has been answered: send ``data_to_send()`` and read more."""


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class StartTls:
    """``+OK`` to STLS is in ``data_to_send()``: send it, run the TLS handshake, then call ``tls_started``.

    Everything received after the STLS line has been dropped by the core (RFC 2595 §3.1, CVE-2011-0411).
    """


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials; on success lock and load the maildrop, then call ``auth_result``."""

    username: str
    password: str
    authzid: str = ""
    mechanism: str = "USER"  # USER (USER/PASS) or the SASL mechanism name


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Read message ``number`` (blob ``blob_id``) and call ``message(raw)``; ``lines`` is set for TOP."""

    number: int
    uid: int
    blob_id: int
    lines: int | None = None  # None: RETR (whole message); n: TOP msg n (RFC 1939 §7)


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION (RFC 1939 §6): remove these UIDs, then call ``update_result``."""

    uids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """Send ``data_to_send()`` and close the connection (QUIT, too many errors). Nothing more follows."""


Event = NeedData | StartTls | Authenticate | Retrieve | Update | Close
