"""The optional smarthost: every outbound message goes to one relay instead of the recipients' MX.

``[delivery] smarthost`` is a URL or a preset name:

- ``smtp://host:25`` - plain SMTP with opportunistic STARTTLS (the ``tls_policy`` applies),
- ``smtp+starttls://user@host:587`` - STARTTLS required and the certificate verified,
- ``smtps://user@host:465`` - TLS from the first byte (RFC 8314), verified,
- ``gmail``, ``office365``, ``outlook`` (optionally ``gmail://user@example.com``) - the provider's
  submission host, port, security and its sending limits.

Invariants: the password never comes from the URL or the command line; it is read from
``smarthost_password_file`` or the environment variable :data:`PASSWORD_ENV`. A password is only ever sent
inside TLS (:meth:`postroom.delivery.client.SmtpClient.auth` refuses otherwise).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, replace
from typing import Literal

from postroom.errors import ConfigError

PASSWORD_ENV = "POSTROOM_SMARTHOST_PASSWORD"  # noqa: S105 - the variable name, not a secret

Security = Literal["plain", "starttls", "tls"]


@dataclass(frozen=True, slots=True)
class Smarthost:
    host: str
    port: int
    security: Security  # plain: STARTTLS per tls_policy; starttls: required; tls: implicit
    verify: bool  # check the certificate against ``host``
    user: str = ""
    password: str = ""
    concurrency: int = 0  # connections at once (0: the destination_concurrency)
    messages_per_connection: int = 0  # 0: the configured default
    per_minute: int = 0  # messages a minute at most (0: no limit)


#: Provider presets (the seed's table: Gmail 587/STARTTLS and 465/TLS, Office 365 587/STARTTLS).
#: Office 365 / Outlook.com allow 3 concurrent connections per mailbox and 30 messages a minute (Exchange
#: Online sending limits); Gmail publishes daily quotas only, 20 a minute keeps a day's burst under them.
PRESETS: dict[str, Smarthost] = {
    "gmail": Smarthost(
        "smtp.gmail.com", 587, "starttls", True, concurrency=5, messages_per_connection=50, per_minute=20
    ),
    "office365": Smarthost(
        "smtp.office365.com", 587, "starttls", True, concurrency=3, messages_per_connection=30, per_minute=30
    ),
    "outlook": Smarthost(
        "smtp-mail.outlook.com", 587, "starttls", True, concurrency=3, messages_per_connection=30, per_minute=30
    ),
}

_SCHEMES: dict[str, tuple[Security, int, bool]] = {
    "smtp": ("plain", 25, False),
    "smtp+starttls": ("starttls", 587, True),
    "smtps": ("tls", 465, True),
}


def parse(url: str, password_file: str = "", env: dict[str, str] | None = None) -> Smarthost | None:
    """The smarthost described by ``url`` (None when empty). Raises ConfigError naming the problem."""
    if not url:
        return None
    environ = os.environ if env is None else env
    if url in PRESETS:
        host = PRESETS[url]
    else:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            raise ConfigError("delivery.smarthost: put the password in a file or $" + PASSWORD_ENV)
        if parts.scheme in PRESETS:
            host = replace(PRESETS[parts.scheme], user=urllib.parse.unquote(parts.username or ""))
        elif parts.scheme in _SCHEMES:
            if not parts.hostname:
                raise ConfigError(f"delivery.smarthost: no host in {url!r}")
            security, port, verify = _SCHEMES[parts.scheme]
            try:
                port = parts.port or port
            except ValueError:
                raise ConfigError(f"delivery.smarthost: bad port in {url!r}") from None
            host = Smarthost(parts.hostname, port, security, verify, user=urllib.parse.unquote(parts.username or ""))
        else:
            raise ConfigError(
                f"delivery.smarthost: unknown scheme in {url!r} (smtp, smtp+starttls, smtps or a preset: "
                + ", ".join(PRESETS)
                + ")"
            )
    if host.user:
        password = ""
        if password_file:
            try:
                with open(password_file, encoding="utf-8") as fh:
                    password = fh.readline().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"delivery.smarthost_password_file: {exc.strerror}") from None
        else:
            password = environ.get(PASSWORD_ENV, "")
        if not password:
            raise ConfigError(f"delivery.smarthost: no password (smarthost_password_file or ${PASSWORD_ENV})")
        host = replace(host, password=password)
    return host


class RateLimit:
    """At most ``per_minute`` messages in any 60 seconds, as a token bucket (burst = ``per_minute``).

    Sans-I/O: :meth:`reserve` takes the current time and returns how long the caller must wait before its
    message may go; the reservation is made at once, so concurrent callers queue up in order.
    """

    def __init__(self, per_minute: int, now: float) -> None:
        self.interval = 60.0 / per_minute
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.stamp = now

    def reserve(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens * self.interval
