"""Named authentication limits. Overridable under ``[auth]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

CACHE_TTL = 60.0  # seconds a verified (address, password) stays cached, like Dovecot's auth_cache_ttl
CACHE_SIZE = 10_000  # entries in the verified-credential cache
THROTTLE_BASE_DELAY = 0.5  # seconds of delay after the first failure from one IP
THROTTLE_MAX_DELAY = 15.0  # seconds; the delay doubles per failure up to this
THROTTLE_WINDOW = 15 * 60.0  # seconds after which an IP's failures are forgotten


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: password checking, caching and failure throttling."""

    allow_plaintext_on_loopback: bool = False  # plaintext AUTH/LOGIN/USER before TLS from 127.0.0.0/8, ::1
    cache_ttl: float = CACHE_TTL
    cache_size: int = CACHE_SIZE
    throttle_base_delay: float = THROTTLE_BASE_DELAY
    throttle_max_delay: float = THROTTLE_MAX_DELAY
    throttle_window: float = THROTTLE_WINDOW
