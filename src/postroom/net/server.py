"""Listening sockets: each accepted connection becomes a :class:`Connection` served by its handler task.

Invariants:
- On an implicit-TLS listener the handshake completes before the handler sees a byte, and uses the
  *current* ``App.tls`` (a SIGHUP reload reaches listeners that already exist, see ``net.tls.follow``).
- Every connection handler runs in its own task, tracked in ``Listener.sessions`` so shutdown can drain
  them; a callback-driven session (a :class:`~postroom.net.served.ServedProtocol` class as the handler) is
  tracked by its ``done`` future instead.
- Connection limits (``[net] max_connections`` per worker over all listeners of one App,
  ``max_connections_per_ip`` per listener) are checked when a connection is accepted; a connection over a
  limit gets the service's "try later" line (:data:`REFUSALS`) and is closed without reaching the handler.
- A handler's unexpected exception is logged with its traceback and the connection closed; CancelledError
  propagates.
- Shutdown (:func:`shutdown`): stop accepting, set :func:`shutdown_event` so sessions can finish their
  current command and say goodbye, wait up to ``grace`` seconds, then cancel the sessions still running.
- A listening address that cannot be bound gives one :class:`ListenError` line naming service and address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from postroom.app import App, ConnectionHandler, Handler, ListenerSpec
from postroom.errors import PostroomError
from postroom.log import new_connection_id
from postroom.net import tls as tls_mod
from postroom.net.connection import Connection
from postroom.net.served import ServedProtocol

log = logging.getLogger(__name__)

BACKLOG = 1024  # pending connections per listening socket (the kernel caps it at net.core.somaxconn)
CANCEL_WAIT = 5.0  # seconds shutdown waits for cancelled sessions to unwind

_SMTP_BUSY = "421 4.7.0 {host} Too many connections, try again later\r\n"  # RFC 5321 §3.8, RFC 3463
_POP3_BUSY = "-ERR [SYS/TEMP] Too many connections, try again later\r\n"  # RFC 3206 §4
_IMAP_BUSY = "* BYE Too many connections, try again later\r\n"  # RFC 9051 §7.1.5 (greeting may be BYE)

#: What a connection over a limit is told before it is closed, per service.
REFUSALS: dict[str, str] = {
    "smtp": _SMTP_BUSY,
    "submission": _SMTP_BUSY,
    "submissions": _SMTP_BUSY,
    "pop3": _POP3_BUSY,
    "pop3s": _POP3_BUSY,
    "imap": _IMAP_BUSY,
    "imaps": _IMAP_BUSY,
    "http": "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
}


class ListenError(PostroomError):
    """A listening address could not be bound (in use, no permission, not on this machine)."""


@dataclass(slots=True)
class _Shared:
    """Per-App state shared by all its listeners (kept in ``app.extras``)."""

    connections: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


def _shared(app: App) -> _Shared:
    state = app.extras.get("net.shared")
    if not isinstance(state, _Shared):
        state = _Shared()
        app.extras["net.shared"] = state
    return state


def shutdown_event(app: App) -> asyncio.Event:
    """Set when the server begins a graceful shutdown. Long-lived sessions (IMAP IDLE, a slow client)
    should answer their current command and close: SMTP ``421``, IMAP ``* BYE``, POP3 ``-ERR``."""
    return _shared(app).stopping


def _describe(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(service: str, host: str, port: int) -> socket.socket:
    """A bound, not yet listening TCP socket for ``host:port``; ListenError (one clear line) on failure.
    Several worker processes share it (``postroom serve``): they all accept from its one queue."""
    where = _describe(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where} for {service}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {where} for {service}: {_why(exc)}") from None
    return sock


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another server running?)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    return exc.strerror or str(exc)


class Listener:
    """One listening address and the sessions it has accepted."""

    def __init__(self, spec: ListenerSpec, app: App, handler: Handler) -> None:
        self.spec = spec
        self.app = app
        self.handler = handler
        self.sessions: set[asyncio.Future[None]] = set()  # a task per pull session, a future per served one
        self.server: asyncio.Server | None = None
        self.per_ip: dict[str, int] = {}
        self.refused = 0  # connections turned away by a limit, for tests and metrics
        self._port: int | None = None
        self.closing = False

    @property
    def port(self) -> int:
        """The port listened on (the real one when ``spec.port`` was 0); still known after close."""
        assert self._port is not None, "Listener.port before start()"
        return self._port

    def _factory(self) -> asyncio.Protocol:
        handler = self.handler
        if isinstance(handler, type):  # a callback-driven session class (net.served): a protocol by its methods
            return cast(asyncio.Protocol, cast(type[ServedProtocol], handler)(self))
        return _ServedConnection(self, handler)

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listen on ``spec.host:spec.port`` (or on ``sock``, already bound). Raises ListenError."""
        loop = asyncio.get_running_loop()
        ssl_ctx = self.app.tls if self.spec.tls == "implicit" else None
        if ssl_ctx is not None:
            tls_mod.follow(ssl_ctx, lambda: self.app.tls)
        if sock is None:
            sock = bind_socket(self.spec.service, self.spec.host, self.spec.port)
        try:
            self.server = await loop.create_server(
                self._factory,
                sock=sock,
                ssl=ssl_ctx,
                ssl_handshake_timeout=self.app.config.net.tls_handshake_timeout if ssl_ctx else None,
                backlog=BACKLOG,
            )
        except OSError as exc:
            sock.close()
            where = _describe(self.spec.host, self.spec.port)
            raise ListenError(f"cannot listen on {where} for {self.spec.service}: {_why(exc)}") from None
        self._port = int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        self.closing = True
        if self.server is not None:
            self.server.close()

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting, give running sessions ``grace`` seconds, cancel the rest, and wait for them.
        Only this listener closes: the App's :func:`shutdown_event` is left alone."""
        await shutdown([self], grace, announce=False)

    # -- limits -----------------------------------------------------------------------------------
    def admit_session(self, session: ServedProtocol, ip: str) -> asyncio.Future[None] | None:
        """Admit a callback-driven session: its ``done`` future, tracked in :attr:`sessions` until it is
        resolved (connection lost) or cancelled (shutdown); None when refused (answered and closed)."""
        if not self._admit_or_refuse(session, session.conn_id, ip):
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._track(done, ip)
        return done

    def _admit_or_refuse(self, conn: Connection | ServedProtocol, conn_id: str, ip: str) -> bool:
        if self.closing:  # accepted (e.g. mid-handshake) just as the listener closed
            conn.abort()
            return False
        if self._admit(ip):
            return True
        self.refused += 1
        log.warning("%s: refused connection %s from %s: too many connections", self.spec.service, conn_id, ip)
        conn.write(REFUSALS.get(self.spec.service, "").format(host=self.app.hostname).encode())
        conn.close()
        return False

    def _track(self, session: asyncio.Future[None], ip: str) -> None:
        self.sessions.add(session)

        def done(f: asyncio.Future[None]) -> None:
            self.sessions.discard(f)
            self._release(ip)

        session.add_done_callback(done)

    def _admit(self, ip: str) -> bool:
        shared = _shared(self.app)
        limits = self.app.config.net
        if shared.connections >= limits.max_connections:
            return False
        if self.per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return False
        shared.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def _release(self, ip: str) -> None:
        _shared(self.app).connections -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


async def shutdown(listeners: Iterable[Listener], grace: float, *, announce: bool = True) -> int:
    """Graceful stop of ``listeners``: returns how many sessions had to be cancelled after ``grace``.

    ``announce`` sets :func:`shutdown_event` of their Apps (the server is going away).
    """
    listeners = list(listeners)
    for listener in listeners:
        listener.stop_accepting()
        if announce:
            _shared(listener.app).stopping.set()
    sessions = {task for listener in listeners for task in listener.sessions}
    pending: set[asyncio.Future[None]] = set()
    if sessions:
        _, pending = await asyncio.wait(sessions, timeout=max(grace, 0.0))
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        if stuck:  # a handler that ignores cancellation is a bug; do not hang the shutdown on it
            log.error("%d sessions ignored cancellation; leaving them behind", len(stuck))
    for listener in listeners:
        if listener.server is not None:
            with contextlib.suppress(Exception):
                await listener.server.wait_closed()
    return len(pending)


class _ServedConnection(Connection):
    def __init__(self, listener: Listener, handler: ConnectionHandler) -> None:
        super().__init__()
        self.listener = listener
        self.handler = handler
        self.conn_id = new_connection_id()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        listener = self.listener
        ip = self.peer[0]
        if not listener._admit_or_refuse(self, self.conn_id, ip):
            return
        task = asyncio.get_running_loop().create_task(self._run())
        listener._track(task, ip)

    async def _run(self) -> None:
        try:
            await self.handler(self, self.listener.app, self.listener.spec)
        except asyncio.CancelledError:
            self.abort()
            raise
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("%s session %s from %s failed", self.listener.spec.service, self.conn_id, self.peer[0])
        finally:
            self.close()
