"""What every protocol adapter is handed: the config, the store, the authenticator and TLS.

Invariants: one :class:`App` per worker process; the adapters never open their own store or TLS context.
``tls`` is the current server context; a SIGHUP reload replaces it, so read it at each handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from postroom.auth.service import Authenticator
from postroom.config import Config
from postroom.net.connection import Connection
from postroom.store.api import Store

if TYPE_CHECKING:
    from postroom.net.served import ServedProtocol

TlsMode = Literal["implicit", "starttls"]


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listening address: the service it serves and how TLS starts there."""

    service: str  # "smtp" | "submission" | "submissions" | "pop3" | "pop3s" | "imap" | "imaps" | "http"
    host: str
    port: int
    tls: TlsMode


@dataclass(slots=True)
class App:
    config: Config
    store: Store
    auth: Authenticator
    tls: ssl.SSLContext
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. "queue": the outbound queue runner

    @property
    def hostname(self) -> str:
        return self.config.hostname


#: A protocol adapter: serves one connection until it ends. It must never swallow CancelledError.
ConnectionHandler = Callable[[Connection, App, ListenerSpec], Awaitable[None]]
#: What a listener serves its connections with: a connection handler (run in a task per connection) or a
#: callback-driven session class (:class:`postroom.net.served.ServedProtocol`, no task per connection).
Handler = ConnectionHandler | type["ServedProtocol"]
