"""What every served connection knows about its transport and peer (:class:`TransportOwner`).

Shared by :class:`postroom.net.connection.Connection` (the pull API, plain Python) and
:class:`postroom.net.served.ServedProtocol` (callback-driven sessions, compiled with mypyc).

Invariants:
- Compiled by ``make native`` as a mypyc native class that interpreted classes may subclass (``Connection``
  does), so the compiled ``ServedProtocol`` can inherit from it: a native class needs native bases.
- Nothing here knows any mail protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mypy_extensions import mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)
class TransportOwner:
    """A connection's transport, peer and TLS state, and the ways to end it."""

    transport: asyncio.Transport | None
    peer: tuple[str, int]
    is_tls: bool
    tls_info: str  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", for Received: headers

    def note_tls(self, transport: asyncio.BaseTransport) -> None:
        self.is_tls = True
        obj: Any = transport.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            self.tls_info = f"{obj.version()} {cipher[0] if cipher else ''}".strip()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.peer[0])


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1, also written as IPv4-mapped IPv6."""
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")
