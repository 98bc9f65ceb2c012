"""POP3 under the listener's connection limits (the per-IP limit lives in ``postroom.net.server``)."""

from __future__ import annotations

import poplib
import socket
from collections.abc import Callable
from typing import Any

from conftest import RunningServer

Factory = Callable[..., RunningServer]


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_per_ip_connection_limit(server_factory: Factory) -> None:
    srv = server_factory(services=["pop3"], net={"max_connections_per_ip": 2})
    held: list[Any] = [poplib.POP3(srv.host, srv.ports["pop3"], timeout=10) for _ in range(2)]
    sock = socket.create_connection((srv.host, srv.ports["pop3"]), timeout=10)
    assert recv_all(sock) == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    for c in held:
        c.quit()
