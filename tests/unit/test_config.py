"""The config tree: defaults, TOML loading, errors that name file and key, overrides, the port rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from postroom import config
from postroom.config import Config, ListenersConfig, default_listeners, field_paths, load, parse_hostport
from postroom.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = load()
    assert cfg.data_dir == "var"
    assert cfg.hostname  # from the machine
    assert cfg.source == "<defaults>"
    assert cfg.store_url.startswith("sqlite:///") and cfg.store_url.endswith("/var/store")
    assert cfg.cert_path == Path("var/tls/cert.pem")
    assert cfg.worker_count >= 1
    # With no [listeners] table every service listens (on the port rule's ports).
    assert cfg.listeners.smtp and cfg.listeners.imaps and cfg.listeners.pop3s


def test_empty_file_is_valid(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert cfg.source == str(tmp_path / "postroom.toml")


@pytest.mark.parametrize(
    ("is_root", "expected"),
    [
        (True, {"smtp": (25, 2525), "submission": (587,), "submissions": (465,), "pop3": (110,)}),
        (False, {"smtp": (10025, 2525), "submission": (10587,), "submissions": (10465,), "pop3": (10110,)}),
    ],
)
def test_default_port_rule(is_root: bool, expected: dict[str, tuple[int, ...]]) -> None:
    listeners = default_listeners(is_root)
    for service, ports in expected.items():
        assert tuple(parse_hostport(a)[1] for a in getattr(listeners, service)) == ports
    shift = 0 if is_root else 10000
    assert [parse_hostport(a)[1] for a in listeners.pop3s] == [995 + shift]
    assert [parse_hostport(a)[1] for a in listeners.imap] == [143 + shift]
    assert [parse_hostport(a)[1] for a in listeners.imaps] == [993 + shift]
    assert listeners.http == ()


def test_full_file(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            """
hostname = "mx.example.org"
data_dir = "/srv/mail"
domains = ["Example.ORG.", "example.net"]
workers = 3
[tls]
cert = "/etc/ssl/mail.pem"
key = "/etc/ssl/mail.key"
[listeners]
smtp = ["0.0.0.0:25", "[::]:25"]
imaps = ["127.0.0.1:993"]
[store]
url = "sqlite:////srv/mail/store"
writer_scheduling = "normal"
[delivery]
nameservers = ["127.0.0.1"]
smtp_port = 2526
smarthost = "smtp+starttls://me@smtp.office365.com:587"
[smtp]
max_recipients = 500
[net]
shutdown_grace = 2.5
""",
        )
    )
    assert cfg.hostname == "mx.example.org"
    assert cfg.domains == ("example.org", "example.net")
    assert cfg.is_local_domain("EXAMPLE.org.")
    assert not cfg.is_local_domain("example.com")
    assert cfg.worker_count == 3
    assert cfg.cert_path == Path("/etc/ssl/mail.pem")
    assert cfg.listeners.smtp == ("0.0.0.0:25", "[::]:25")
    assert cfg.listeners.submission == ()  # an explicit [listeners] table: unlisted services are off
    assert cfg.store_url == "sqlite:////srv/mail/store"
    assert cfg.store.writer_scheduling == "normal" and Config().store.writer_scheduling == "batch"
    assert cfg.delivery.smtp_port == 2526
    assert cfg.smtp.max_recipients == 500
    assert cfg.net.shutdown_grace == 2.5  # an int/float in TOML becomes the field's float


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("hostname = ", "not valid TOML"),
        ("[smtp]\nmax_recipients = 'many'", "smtp.max_recipients: expected an integer"),
        ("[smtp]\nmax_recipients = true", "smtp.max_recipients: expected an integer"),
        ("[smtp]\nno_such_key = 1", "unknown key 'smtp.no_such_key'"),
        ("bogus = 1", "unknown key 'bogus'"),
        ("smtp = 3", "smtp: expected a table"),
        ("domains = 'example.org'", "domains: expected a list"),
        ("[listeners]\nsmtp = ['nohostport']", "listeners.smtp"),
        ("[listeners]\nsmtp = ['127.0.0.1:99999']", "port must be a number"),
        ("workers = -1", "workers"),
        ("domains = ['a@b']", "invalid domain"),
        ("[imap]\nmax_line = 100", "RFC 7162"),
        ("[pop3]\nidle_timeout = 5", "RFC 1939"),
        ("[smtp]\nmax_received = -1", "smtp.max_received: must be 0"),
        ("[store]\nurl = 'mysql://x'", "store.url"),
        ("[store]\nwriter_scheduling = 'idle'", "store.writer_scheduling: must be batch or normal"),
        ("[delivery]\ntls_policy = 'sometimes'", "delivery.tls_policy"),
        ("[net]\nevent_loop = 'twisted'", "net.event_loop: must be one of uvloop, asyncio"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")


def test_overrides_are_toml_values_with_string_fallback(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, "[smtp]\nmax_recipients = 5\n"),
        {
            "smtp.max_recipients": "200",
            "hostname": "mx.override.test",  # not TOML: taken as a string
            "domains": '["a.test", "b.test"]',
            "auth.allow_plaintext_on_loopback": "true",
            "listeners.imap": '["127.0.0.1:1143"]',
        },
    )
    assert cfg.smtp.max_recipients == 200
    assert cfg.hostname == "mx.override.test"
    assert cfg.domains == ("a.test", "b.test")
    assert cfg.auth.allow_plaintext_on_loopback is True
    assert cfg.listeners.imap == ("127.0.0.1:1143",)


def test_override_with_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.max_recipients"):
        load(None, {"smtp.max_recipients": "lots"})


def test_field_paths_cover_every_leaf() -> None:
    paths = dict(field_paths())
    assert "source" not in paths
    for expected in (
        "hostname",
        "tls.cert",
        "listeners.imaps",
        "store.url",
        "net.max_connections_per_ip",
        "delivery.smarthost",
        "pop3.mark_seen_on_retr",
        "imap.max_literal",
    ):
        assert expected in paths
    # Every path can be set through an override and reads back.
    cfg = Config()
    for path, hint in paths.items():
        node: object = cfg
        for part in path.split("."):
            node = getattr(node, part)
        assert not dataclasses.is_dataclass(node), path
        assert hint is not None


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_hostport("[::1]:993") == ("::1", 993)
    assert parse_hostport("localhost:0") == ("localhost", 0)
    for bad in ("25", ":25", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hostname = "x"  # type: ignore[misc]
    assert isinstance(cfg.listeners, ListenersConfig)
    assert config.STANDARD_PORTS["smtp"] == (25, 2525)
