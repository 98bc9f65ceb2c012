"""One client connection as the protocol adapters see it: read, write, upgrade to TLS, close.

Invariants:
- ``read`` returns the bytes received so far (at most ``max_bytes``), b"" at end of stream, and raises
  :class:`TimeoutError` after ``timeout`` seconds without data.
- ``start_tls`` **discards every plaintext byte received and not yet read** before the handshake, so
  commands pipelined after STARTTLS/STLS never run inside TLS (the CVE-2011-0411 class). The adapter must
  also drop whatever its sans-I/O core still buffers.
- Writes are buffered by the transport; ``drain`` waits while the peer is slow to read (flow control), so a
  streaming FETCH never holds more than the transport's high-water mark in memory.
- Nothing here knows any mail protocol.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast


class TransportOwner:
    """What a served connection knows about its transport and peer: the base of :class:`Connection` (the
    pull API). :class:`postroom.net.served.ServedProtocol` (callback-driven sessions) has the same members
    but not this base: it is compiled, and a compiled base would slow every attribute of ``Connection``
    (an interpreted subclass of a native class; IMAP at 32 clients, measured: ``docs/benchmarks.md``)."""

    transport: asyncio.Transport | None
    peer: tuple[str, int]
    is_tls: bool
    tls_info: str  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", for Received: headers

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


class Connection(TransportOwner, asyncio.Protocol):
    """An asyncio Protocol with a small pull API for the protocol adapters."""

    HIGH_WATER = 256 * 1024  # octets buffered for writing before ``drain`` blocks
    READ_PAUSE = 1024 * 1024  # octets received and unread before the transport stops reading

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._reading_paused = False
        self.closed: asyncio.Future[None] | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.is_tls = False
        self.tls_info = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", for Received: headers

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.closed = asyncio.get_running_loop().create_future()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.local = (str(local[0]), int(local[1])) if local else ("", 0)
        self.transport.set_write_buffer_limits(high=self.HIGH_WATER)
        if transport.get_extra_info("ssl_object") is not None:
            self.note_tls(transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self.READ_PAUSE and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- the adapters' API ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` received bytes; b"" at EOF; TimeoutError after ``timeout`` idle seconds."""
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    async with asyncio.timeout(timeout):
                        await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        if len(data) > max_bytes:
            self._chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self._buffered -= len(data)
        if self._reading_paused and self._buffered < self.READ_PAUSE // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def unread_bytes(self) -> int:
        return self._buffered

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def write_blocked(self) -> bool:
        """True while the transport's write buffer is above the high-water mark: ``drain`` would wait.
        Hot loops test this before awaiting ``drain`` (a coroutine call per reply costs more than a test)."""
        return self._paused_writing

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above the high-water mark."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._paused_writing:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def start_tls(self, context: ssl.SSLContext, timeout: float = 30.0) -> None:
        """Upgrade to TLS as the server. Unread plaintext is discarded first (see module invariants)."""
        assert self.transport is not None
        self._chunks.clear()
        self._buffered = 0
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if new_transport is None:  # pragma: no cover - only when the transport closed meanwhile
            raise ConnectionError("connection closed during TLS handshake")
        self.transport = new_transport
        # No second clear here: from the handshake on, every byte comes decrypted through the TLS transport
        # (plaintext sent early is fed to the handshake and fails it). A fast client's first command may
        # already be buffered when the handshake completes; discarding it would hang the session.
        self.note_tls(new_transport)


def tls_description(transport: asyncio.BaseTransport) -> str | None:
    """The protocol version and cipher of a TLS transport (e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", for
    Received: headers), or None when it has no TLS object."""
    obj: Any = transport.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0] if cipher else ''}".strip()


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1, also written as IPv4-mapped IPv6."""
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")
