"""Named limits of outbound delivery. Overridable under ``[delivery]`` in the config."""

from __future__ import annotations

from dataclasses import dataclass, field

SMTP_PORT = 25  # RFC 5321 §4.5.4; tests point this elsewhere
# Seconds between attempts: 5 min, 15, 30, 1 h, 2 h, then every 4 h (RFC 5321 §4.5.4.1: at least 30 min).
RETRY_SCHEDULE = (300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
MAX_QUEUE_AGE = 5 * 24 * 3600.0  # seconds before a deferred recipient bounces, RFC 5321 §4.5.4.1
DESTINATION_CONCURRENCY = 20  # connections per destination domain, like Postfix's default
CONNECT_TIMEOUT = 30.0  # seconds
COMMAND_TIMEOUT = 300.0  # seconds, RFC 5321 §4.5.3.2
MAX_CONNECTIONS = 100  # outbound connections of one process, all destinations together
MAX_RECIPIENTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: servers must accept at least 100
MESSAGES_PER_CONNECTION = 100  # transactions before a reused connection is closed (Postfix: 100)
CONNECTION_IDLE = 5.0  # seconds an idle connection is kept for reuse (Postfix smtp_connection_cache_time_limit 2s)
POLL_INTERVAL = 60.0  # seconds between looks at the queue when nothing woke the runner
CLAIM_BATCH = 200  # queue entries claimed per look
ROUTE_CACHE = 60.0  # seconds a resolved MX route is reused (the resolver's cache still honours shorter TTLs
#                     for lookups after that; a busy queue asks DNS about a domain once a minute at most)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """``[delivery]``: how mail for remote recipients leaves this server."""

    nameservers: tuple[str, ...] = ()  # empty: the system resolver
    smtp_port: int = SMTP_PORT
    smarthost: str = ""  # e.g. "smtp+starttls://user@smtp.office365.com:587" or a preset name
    smarthost_password_file: str = ""  # else POSTROOM_SMARTHOST_PASSWORD
    tls_policy: str = "opportunistic"  # opportunistic | require | verify
    retry_schedule: tuple[float, ...] = field(default=RETRY_SCHEDULE)
    max_queue_age: float = MAX_QUEUE_AGE
    destination_concurrency: int = DESTINATION_CONCURRENCY
    connect_timeout: float = CONNECT_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT
    dkim_selector: str = "postroom"
    dkim: bool = True  # sign mail from local domains that have keys under data_dir/dkim
    tls_ca_file: str = ""  # CA bundle for tls_policy = "verify" (default: the system's)
    helo_name: str = ""  # EHLO name (default: hostname)
    max_connections: int = MAX_CONNECTIONS
    max_recipients: int = MAX_RECIPIENTS_PER_TRANSACTION
    messages_per_connection: int = MESSAGES_PER_CONNECTION
    connection_idle: float = CONNECTION_IDLE
    poll_interval: float = POLL_INTERVAL
    claim_batch: int = CLAIM_BATCH
    route_cache: float = ROUTE_CACHE
    success_notices: bool = True  # send "relayed" DSNs for NOTIFY=SUCCESS when the peer lacks DSN
