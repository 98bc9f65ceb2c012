"""Callback-driven sessions: an asyncio Protocol that *is* the session, with no task per connection.

The pull API of :class:`~postroom.net.connection.Connection` costs a task, and a future per read, for every
connection. A service whose dialogue is short and mostly synchronous (SMTP: one message per connection
from most MTAs) subclasses :class:`ServedProtocol` instead and reacts to ``data_received`` directly,
starting a task only for the steps that must wait (a store commit, a password check, a TLS handshake).

Invariants:
- The :class:`~postroom.net.server.Listener` admits the connection in ``connection_made`` (connection
  limits, a closing listener) before :meth:`ServedProtocol.session_started` runs; a refused connection never
  reaches the subclass.
- Each admitted session is represented in ``Listener.sessions`` by its ``done`` future, resolved when the
  connection is lost. Shutdown waits for these futures and cancels the ones still running after the
  grace period: a cancelled ``done`` calls :meth:`ServedProtocol.session_cancelled`, which must abort the
  connection and cancel any step task.
- Flow control: when the transport's write buffer passes ``HIGH_WATER`` the protocol stops reading until
  it drains, so a client that pipelines commands without reading replies cannot grow our memory.
- ``ServedProtocol`` is not a subclass of ``asyncio.Protocol``: event loops only call its methods (uvloop
  and asyncio alike), and without that Python base mypyc compiles it, and the SMTP session built on it, as
  native classes (``make native``; measured in ``docs/benchmarks.md``, SMTP). Interpreted subclasses are
  allowed (other services, tests). For the same reason it does not share
  :class:`~postroom.net.connection.TransportOwner` with the pull API but has the same members.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

from mypy_extensions import mypyc_attr

from postroom.log import new_connection_id
from postroom.net.connection import is_loopback_host, tls_description

if TYPE_CHECKING:
    from postroom.net.server import Listener

log = logging.getLogger(__name__)


@mypyc_attr(allow_interpreted_subclasses=True)
class ServedProtocol:
    """Base of a callback-driven session served by a Listener (see the module invariants)."""

    HIGH_WATER: Final = 256 * 1024  # octets buffered for writing before the session stops reading

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.app = listener.app
        self.spec = listener.spec
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.conn_id = ""
        self.peer: tuple[str, int] = ("", 0)
        self.is_tls = False
        self.tls_info = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", for Received: headers
        self.lost = False  # the connection is gone (connection_lost ran)
        self._write_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.conn_id = new_connection_id()
        done = self.listener.admit_session(self, self.peer[0])
        if done is None:
            return  # refused: the listener has answered and closed
        self.done = done
        done.add_done_callback(self._done_changed)
        self.transport.set_write_buffer_limits(high=self.HIGH_WATER)
        if transport.get_extra_info("ssl_object") is not None:
            self.note_tls(transport)
        self.session_started()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        done = self.done
        if done is not None and not done.done():
            done.set_result(None)
            self.session_ended()

    def pause_writing(self) -> None:
        self._write_paused = True
        self.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.resume_reading()

    # -- for subclasses -----------------------------------------------------------------------------
    def session_started(self) -> None:
        """The connection was admitted: greet, start timers."""

    def session_ended(self) -> None:
        """The connection is gone (not called for a cancelled session: see :meth:`session_cancelled`)."""

    def session_cancelled(self) -> None:
        """Shutdown gave up waiting: abort now. Subclasses also cancel their step task."""
        self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self._write_paused:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def note_tls(self, transport: asyncio.BaseTransport) -> None:
        self.is_tls = True
        info = tls_description(transport)
        if info is not None:
            self.tls_info = info

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.peer[0])

    def _done_changed(self, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            try:
                self.session_cancelled()
            except Exception:  # pragma: no cover - a bug in a subclass must not break shutdown
                log.exception("session %s: cancelling failed", self.conn_id)
                self.abort()
