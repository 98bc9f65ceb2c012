"""POP3 under the listener's connection limits (the per-IP limit lives in ``postroom.net.server``)."""

from __future__ import annotations

import poplib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningServer
from postroom.errors import StoreError
from postroom.net.server import shutdown
from postroom.store.api import AppendTarget

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


def test_graceful_shutdown_says_goodbye_and_removes_nothing(server_factory: Factory) -> None:
    srv = server_factory(services=["pop3s"])
    srv.add_user("bob@example.test", "pw")

    async def one() -> None:
        acct = await srv.store.get_account("bob@example.test")
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        await srv.store.append(b"Subject: s\r\n\r\nbody\r\n", [AppendTarget(mb.id)])

    srv.call(one())
    client = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)
    client.user("bob@example.test")
    client.pass_("pw")
    client.dele(1)
    cancelled = srv.call(shutdown(srv.listeners, grace=10))
    assert cancelled == 0  # the idle session ended by itself, long before the grace period
    assert client.file.readline() == b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"
    assert client.file.readline() == b""
    assert len(srv.inbox("bob@example.test")) == 1


def test_store_failures_become_err_replies_and_free_the_lock(server_factory: Factory) -> None:
    srv = server_factory(services=["pop3s"])
    srv.add_user("dan@example.test", "pw")

    async def one() -> None:
        acct = await srv.store.get_account("dan@example.test")
        assert acct is not None
        mb = await srv.store.get_mailbox(acct.id, "INBOX")
        assert mb is not None
        await srv.store.append(b"Subject: s\r\n\r\nbody\r\n", [AppendTarget(mb.id)])

    srv.call(one())
    real_read = srv.store.read
    failures: list[BaseException] = [StoreError("disk on fire"), RuntimeError("a bug of ours")]

    async def failing_read(blob_id: int) -> bytes:
        if failures:
            raise failures.pop(0)
        return await real_read(blob_id)

    srv.store.read = failing_read  # type: ignore[method-assign]
    client = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)
    client.user("dan@example.test")
    client.pass_("pw")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Message is no longer available"):
        client.retr(1)  # a store error: the session goes on
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Internal server error"):
        client.retr(1)  # our bug: -ERR, logged with its traceback, connection closed
    assert client.file.readline() == b""
    again = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)
    again.user("dan@example.test")
    again.pass_("pw")  # the lock was released
    assert again.retr(1)[1] == [b"Subject: s", b"", b"body"]
    again.quit()


def test_login_delay_advertised_and_enforced(server_factory: Factory) -> None:
    srv = server_factory(services=["pop3s"], pop3={"login_delay": 3600})
    srv.add_user("eve@example.test", "pw")
    first = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)
    assert first.capa()["LOGIN-DELAY"] == ["3600"]
    first.user("eve@example.test")
    first.pass_("pw")
    first.quit()
    second = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=srv.client_tls(), timeout=10)
    second.user("eve@example.test")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[LOGIN-DELAY\]"):
        second.pass_("pw")
    second.user("eve@example.test")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
        second.pass_("wrong")  # the password is checked first: the delay tells nothing to a guesser
    second.quit()
