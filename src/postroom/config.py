"""One typed, frozen configuration tree, loaded from TOML.

Invariants:
- :class:`Config` is immutable; every value has a typed default, so an empty file is a valid config.
- Loading validates every key and type; an error is a :class:`ConfigError` naming the file and the key.
- CLI overrides are derived from the fields (``--set smtp.max_recipients=200``), never hand-copied.
- Each protocol owns its limits dataclass (``smtp/limits.py`` …); this module only assembles them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from postroom.auth.limits import AuthConfig
from postroom.delivery.limits import DeliveryConfig
from postroom.errors import ConfigError
from postroom.imap.limits import ImapConfig
from postroom.net.eventloop import EVENT_LOOPS
from postroom.net.limits import NetConfig
from postroom.pop3.limits import Pop3Config
from postroom.smtp.limits import SmtpConfig

#: The standard port of each service (the seed's table); non-root processes add 10000, except 2525.
STANDARD_PORTS: dict[str, tuple[int, ...]] = {
    "smtp": (25, 2525),
    "submission": (587,),
    "submissions": (465,),
    "pop3": (110,),
    "pop3s": (995,),
    "imap": (143,),
    "imaps": (993,),
    "http": (),
}


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: the certificate. Empty paths mean a self-signed one generated under ``data_dir/tls``."""

    cert: str = ""
    key: str = ""


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    """``[listeners]``: ``"host:port"`` lists per service; an empty list turns the service off."""

    smtp: tuple[str, ...] = ()
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    pop3: tuple[str, ...] = ()
    pop3s: tuple[str, ...] = ()
    imap: tuple[str, ...] = ()
    imaps: tuple[str, ...] = ()
    http: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: ``sqlite:///path/to/dir`` (default: ``data_dir/store``) or ``postgresql://…``."""

    url: str = ""
    #: "batch": the store's writer thread waits and commits under Linux's SCHED_BATCH (its wake-ups do not
    #: preempt the event loop, so under CPU contention each group commit gathers more messages; with a CPU
    #: free it changes nothing); "normal": the default policy throughout (docs/store.md).
    writer_scheduling: str = "batch"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` names the file it came from (for error messages)."""

    hostname: str = ""
    data_dir: str = "var"
    domains: tuple[str, ...] = ()
    workers: int = 0  # 0: one per core
    log_level: str = "INFO"
    tls: TlsConfig = field(default_factory=TlsConfig)
    listeners: ListenersConfig = field(default_factory=ListenersConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    net: NetConfig = field(default_factory=NetConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    source: str = "<defaults>"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{(self.data_path / 'store').resolve()}"

    @property
    def cert_path(self) -> Path:
        return Path(self.tls.cert) if self.tls.cert else self.data_path / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return Path(self.tls.key) if self.tls.key else self.data_path / "tls" / "key.pem"

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains


T = TypeVar("T")


def default_listeners(is_root: bool) -> ListenersConfig:
    """Listeners on the standard ports for root, else each port + 10000 (2525 stays 2525)."""
    values: dict[str, tuple[str, ...]] = {}
    for service, ports in STANDARD_PORTS.items():
        shifted = [p if (is_root or p == 2525) else p + 10000 for p in ports]
        values[service] = tuple(f"0.0.0.0:{p}" for p in shifted)
    return ListenersConfig(**values)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML value to the field's type ``hint`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - no such fields
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: type[T], table: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in names or key == "source":
            raise ConfigError(f"unknown key '{path}'")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    def fail(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{cfg.source}: {key}: {why}")

    for service in STANDARD_PORTS:
        for addr in getattr(cfg.listeners, service):
            try:
                parse_hostport(addr)
            except ValueError as exc:
                fail(f"listeners.{service}", str(exc))
    if cfg.workers < 0:
        fail("workers", "must be 0 (one per core) or more")
    for d in cfg.domains:
        if not d or "@" in d or " " in d:
            fail("domains", f"invalid domain {d!r}")
    if cfg.net.event_loop not in EVENT_LOOPS:
        fail("net.event_loop", f"must be one of {', '.join(EVENT_LOOPS)}")
    if cfg.delivery.tls_policy not in ("opportunistic", "require", "verify"):
        fail("delivery.tls_policy", "must be opportunistic, require or verify")
    if not (0 < cfg.delivery.smtp_port < 65536):
        fail("delivery.smtp_port", "must be a port number")
    if cfg.imap.max_line < 8192:
        fail("imap.max_line", "must be at least 8192 (RFC 7162 §4)")
    if cfg.imap.idle_timeout < 1800:
        fail("imap.idle_timeout", "must be at least 1800 seconds (RFC 9051 §5.4)")
    if cfg.pop3.idle_timeout < 600:
        fail("pop3.idle_timeout", "must be at least 600 seconds (RFC 1939 §3)")
    if cfg.smtp.max_command_line < 512:
        fail("smtp.max_command_line", "must be at least 512 (RFC 5321 §4.5.3.1.4)")
    if cfg.smtp.max_text_line < 1000:
        fail("smtp.max_text_line", "must be at least 1000 (RFC 5321 §4.5.3.1.6)")
    if cfg.smtp.max_received < 0:
        fail("smtp.max_received", "must be 0 (no limit) or more; RFC 5321 §6.3 suggests at least 100")
    if cfg.store.writer_scheduling not in ("batch", "normal"):
        fail("store.writer_scheduling", "must be batch or normal")
    if cfg.store.url and not cfg.store.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        fail("store.url", "must start with sqlite:/// or postgresql://")


def parse_hostport(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:25"`` / ``"[::1]:25"`` → (host, port). Raises ValueError with a clear message."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_s.isdigit() or not (0 <= int(port_s) < 65536):
        raise ValueError(f"{addr!r}: port must be a number 0-65535")
    return host, int(port_s)


def load(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Load ``path`` (or defaults), apply ``overrides`` ("section.key" → TOML value text), validate."""
    table: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    for dotted, text in (overrides or {}).items():
        _apply_override(table, dotted, text, source)
    try:
        cfg = _build(Config, table, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    listeners = cfg.listeners
    if "listeners" not in table:
        listeners = default_listeners(is_root)
    cfg = dataclasses.replace(
        cfg,
        hostname=cfg.hostname or socket.getfqdn() or "localhost",
        domains=tuple(d.lower().rstrip(".") for d in cfg.domains),
        listeners=listeners,
        source=source,
    )
    _validate(cfg)
    return cfg


def _apply_override(table: dict[str, Any], dotted: str, text: str, source: str) -> None:
    """``--set smtp.max_recipients=200``: the value is parsed as TOML, falling back to a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = table
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {dotted}: '{part}' is not a table")
        node = child
    node[parts[-1]] = value


def field_paths(cls: type[Any] = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Every settable ``section.key`` with its type: the source of the CLI's override help."""
    out: list[tuple[str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            out.extend(field_paths(hint, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out
