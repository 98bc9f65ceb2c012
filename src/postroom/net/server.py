"""Listening sockets: each accepted connection becomes a :class:`Connection` served by its handler task.

Invariants:
- On an implicit-TLS listener the handshake completes before the handler sees a byte.
- Every handler runs in its own task, tracked in ``Listener.sessions`` so shutdown can drain them.
- A handler's unexpected exception is logged with its traceback and the connection closed; CancelledError
  propagates.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from postroom.app import App, Handler, ListenerSpec
from postroom.net.connection import Connection

log = logging.getLogger(__name__)


class Listener:
    """One listening address and the sessions it has accepted."""

    def __init__(self, spec: ListenerSpec, app: App, handler: Handler) -> None:
        self.spec = spec
        self.app = app
        self.handler = handler
        self.sessions: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _factory(self) -> Connection:
        conn = _ServedConnection(self)
        return conn

    async def start(self, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ssl_ctx = self.app.tls if self.spec.tls == "implicit" else None
        family = socket.AF_INET6 if ":" in self.spec.host else socket.AF_INET
        self.server = await loop.create_server(
            self._factory,
            host=self.spec.host,
            port=self.spec.port,
            family=family,
            ssl=ssl_ctx,
            ssl_handshake_timeout=self.app.config.net.tls_handshake_timeout if ssl_ctx else None,
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=1024,
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _ServedConnection(Connection):
    def __init__(self, listener: Listener) -> None:
        super().__init__()
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._run())
        self.listener.sessions.add(task)
        task.add_done_callback(self.listener.sessions.discard)

    async def _run(self) -> None:
        try:
            await self.listener.handler(self, self.listener.app, self.listener.spec)
        except asyncio.CancelledError:
            self.abort()
            raise
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("%s session from %s failed", self.listener.spec.service, self.peer[0])
        finally:
            self.close()
