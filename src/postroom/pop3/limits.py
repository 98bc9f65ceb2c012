"""Named POP3 limits and timeouts, each with its source. Overridable under ``[pop3]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

MAX_COMMAND_LINE = 255  # octets incl. CRLF, RFC 2449 §4
IDLE_TIMEOUT = 10 * 60.0  # seconds; RFC 1939 §3: the autologout timer MUST be at least 10 minutes
MAX_ERRORS = 10  # bad commands before the server closes the connection


@dataclass(frozen=True, slots=True)
class Pop3Config:
    """``[pop3]``: limits and behaviour of the POP3 server."""

    max_command_line: int = MAX_COMMAND_LINE
    idle_timeout: float = IDLE_TIMEOUT
    max_errors: int = MAX_ERRORS
    mark_seen_on_retr: bool = False  # the seed: POP3 has no shared read state; opt in to set \Seen
    apop: bool = False  # RFC 1939 §7, off by default (MD5 of a shared secret)
    login_delay: int = 0  # seconds, advertised as LOGIN-DELAY (RFC 2449) when > 0
    expire: str = ""  # advertised EXPIRE value (RFC 2449), e.g. "NEVER" or days; empty: not advertised
