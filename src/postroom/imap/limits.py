"""Named IMAP limits and timeouts, each with its source. Overridable under ``[imap]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE = 64 * 1024  # octets per command line; RFC 7162 §4 asks servers to accept at least 8192
MAX_LITERAL = 64 * 1024 * 1024  # octets; larger literals get NO [TOOBIG] before "+" (RFC 7888 §4)
MAX_DEPTH = 16  # parenthesis nesting; defence against the "NOOP ((((" memory attack
MAX_CONNECTIONS_PER_USER_IP = 20  # like Dovecot's mail_max_userip_connections (10)
IDLE_TIMEOUT = 30 * 60.0  # seconds; RFC 9051 §5.4 autologout timer is at least 30 minutes
PRE_AUTH_TIMEOUT = 60.0  # seconds before LOGIN/AUTHENTICATE, as Dovecot's login processes do
APPEND_LIMIT = MAX_LITERAL  # octets per APPENDed message, advertised as APPENDLIMIT= (RFC 7889)
BODY_CACHE_BYTES = 32 * 1024 * 1024  # octets of message bytes cached per worker (immutable, so always valid)
FETCH_BATCH = 200  # messages whose structures one FETCH loads per store call (bounds memory per step)


@dataclass(frozen=True, slots=True)
class ImapConfig:
    """``[imap]``: limits of the IMAP server."""

    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL
    max_depth: int = MAX_DEPTH
    max_connections_per_user_ip: int = MAX_CONNECTIONS_PER_USER_IP
    idle_timeout: float = IDLE_TIMEOUT
    pre_auth_timeout: float = PRE_AUTH_TIMEOUT
    append_limit: int = APPEND_LIMIT
    fetch_batch: int = FETCH_BATCH
    body_cache_bytes: int = BODY_CACHE_BYTES
