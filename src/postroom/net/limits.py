"""Named connection limits of every listener. Overridable under ``[net]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass

MAX_CONNECTIONS = 20_000  # per worker process, all listeners together
MAX_CONNECTIONS_PER_IP = 200  # per worker process, per remote address, per listener
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds for an implicit-TLS or STARTTLS handshake
SHUTDOWN_GRACE = 10.0  # seconds SIGTERM waits for sessions to finish before closing them
EVENT_LOOP = "uvloop"  # the default; net/eventloop.py lists the choices


@dataclass(frozen=True, slots=True)
class NetConfig:
    """``[net]``: limits shared by every listener."""

    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    event_loop: str = EVENT_LOOP
