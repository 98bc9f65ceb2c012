"""Transport URLs, presets and the plain-words explanations (pure: no network)."""

from __future__ import annotations

import socket

import pytest

from postroom.burst.check import explain
from postroom.burst.transport import PRESETS, SessionError, parse_transport
from postroom.errors import ConfigError


def test_urls_and_presets() -> None:
    t = parse_transport("smtp+starttls://me%40x.example@mail.x.example:2587?concurrency=2&cafile=/ca.pem")
    assert (t.security, t.host, t.port, t.user, t.cafile, t.limits.concurrency) == (
        "starttls",
        "mail.x.example",
        2587,
        "me@x.example",
        "/ca.pem",
        2,
    )
    assert parse_transport("smtps://h.example").port == 465 and parse_transport("smtp://h.example").port == 25
    g = parse_transport(None, "gmail", "me@gmail.com")
    assert (g.host, g.port, g.security, g.user) == ("smtp.gmail.com", 587, "starttls", "me@gmail.com")
    assert g.limits.recipients_per_message == 100 and g.limits.messages_per_day == 2000
    o = PRESETS["office365"].limits
    assert o.messages_per_minute == 30 and o.recipients_per_day == 10000
    # A URL with a preset keeps the preset's limits.
    assert parse_transport("smtp://127.0.0.1:2525", "office365").limits.messages_per_minute == 30


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("smtp://u:pw@h.example", "must not contain a password"),
        ("ftp://h.example", "scheme must be"),
        ("smtp://h.example?colour=red", "unknown option"),
        ("smtp://", "no host"),
    ],
)
def test_bad_urls(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_transport(url)
    with pytest.raises(ConfigError, match="unknown preset"):
        parse_transport(None, "hotmale")


def test_provider_auth_explanations() -> None:
    gmail = parse_transport(None, "gmail", "me@gmail.com")
    text = explain(SessionError("auth", "5.7.8 Username and Password not accepted", code=535), gmail)
    assert "app password" in text
    o365 = parse_transport(None, "office365", "me@corp.example")
    text = explain(
        SessionError("auth", "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled", code=535),
        o365,
    )
    assert "535 5.7.139" in text and "SMTP AUTH is disabled" in text


def test_blocked_port_and_dns_explanations() -> None:
    t = parse_transport("smtp://mail.example:25")
    timeout = SessionError("connect", "Timed out connecting to mail.example on port 25", cause=TimeoutError())
    assert "blocked" in explain(timeout, t) and "2525" in explain(timeout, t)
    dns = SessionError("connect", "boom", cause=socket.gaierror(-2, "Name or service not known"))
    assert "does not resolve" in explain(dns, t)
