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
