"""The listener layer: connection limits with each protocol's refusal, graceful shutdown, bind errors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest

from postroom.app import App, Handler, ListenerSpec
from postroom.auth.service import Authenticator
from postroom.config import Config
from postroom.net import tls
from postroom.net.connection import Connection
from postroom.net.limits import NetConfig
from postroom.net.served import ServedProtocol
from postroom.net.server import Listener, ListenError, shutdown, shutdown_event
from postroom.store.api import Store

WAIT = 10.0  # seconds any single expected event may take before the test fails


async def greet_then_wait(conn: Connection, app: App, spec: ListenerSpec) -> None:
    """Say hello, then answer each line until EOF (or return on "bye")."""
    conn.write(b"hello\r\n")
    while True:
        data = await conn.read(timeout=WAIT * 3)
        if not data or data.strip() == b"bye":
            return
        conn.write(b"ok " + data)


async def never_ends(conn: Connection, app: App, spec: ListenerSpec) -> None:
    conn.write(b"hello\r\n")
    await asyncio.Event().wait()


async def explodes(conn: Connection, app: App, spec: ListenerSpec) -> None:
    raise RuntimeError("handler bug")


def make_app(tmp_path: Path, **net: int | float) -> App:
    cfg = Config(hostname="mx.example.test", data_dir=str(tmp_path), net=NetConfig(**net))  # type: ignore[arg-type]
    ctx, _ = tls.load(cfg)
    store = cast(Store, None)  # listeners never touch the store
    return App(cfg, store, Authenticator(store, cfg.auth), ctx)


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., asyncio.Future[Listener]]]:
    listeners: list[Listener] = []

    async def start(app: App, service: str, handler: Handler, mode: str = "starttls") -> Listener:
        listener = Listener(ListenerSpec(service, "127.0.0.1", 0, mode), app, handler)  # type: ignore[arg-type]
        await listener.start()
        listeners.append(listener)
        return listener

    yield start  # type: ignore[misc]
    await shutdown(listeners, 0.0)


async def connect(
    port: int, ssl_ctx: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx), WAIT)


async def first_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), WAIT)


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("service", "refusal"),
    [
        ("smtp", b"421 4.7.0 mx.example.test Too many connections"),
        ("submission", b"421 4.7.0 mx.example.test Too many connections"),
        ("pop3", b"-ERR [SYS/TEMP] Too many connections"),
        ("imap", b"* BYE Too many connections"),
    ],
)
async def test_per_ip_limit_refuses_with_protocol_line(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]], service: str, refusal: bytes
) -> None:
    app = make_app(tmp_path, max_connections_per_ip=2)
    listener = await started(app, service, greet_then_wait)
    held = [await connect(listener.port) for _ in range(2)]
    for reader, _ in held:
        assert await first_line(reader) == b"hello\r\n"
    reader, writer = await connect(listener.port)
    assert (await first_line(reader)).startswith(refusal)
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # and closed
    writer.close()
    assert listener.refused == 1
    # One leaves; a new connection gets in again.
    held[0][1].close()
    await until(lambda: len(listener.sessions) == 1)
    reader, writer = await connect(listener.port)
    assert await first_line(reader) == b"hello\r\n"
    writer.close()
    for _, w in held[1:]:
        w.close()


async def test_total_limit_spans_listeners_and_implicit_tls(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]
) -> None:
    app = make_app(tmp_path, max_connections=1)
    smtp = await started(app, "smtp", greet_then_wait)
    imaps = await started(app, "imaps", greet_then_wait, "implicit")
    reader, writer = await connect(smtp.port)
    assert await first_line(reader) == b"hello\r\n"
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    r2, w2 = await connect(imaps.port, client)
    assert await first_line(r2) == b"* BYE Too many connections, try again later\r\n"  # inside TLS
    w2.close()
    writer.close()


async def test_graceful_shutdown_lets_sessions_finish(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]
) -> None:
    app = make_app(tmp_path)
    listener = await started(app, "smtp", greet_then_wait)
    reader, writer = await connect(listener.port)
    assert await first_line(reader) == b"hello\r\n"
    stopping = asyncio.create_task(shutdown([listener], grace=WAIT))
    await until(shutdown_event(app).is_set)
    with pytest.raises(OSError):  # no longer accepting
        await connect(listener.port)
    # The running session still works and ends on its own, well within the grace period.
    writer.write(b"ping\r\n")
    assert await first_line(reader) == b"ok ping\r\n"
    writer.write(b"bye\r\n")
    assert await asyncio.wait_for(stopping, WAIT) == 0
    writer.close()


async def test_shutdown_cancels_sessions_after_grace(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]
) -> None:
    app = make_app(tmp_path)
    listener = await started(app, "imap", never_ends)
    reader, writer = await connect(listener.port)
    assert await first_line(reader) == b"hello\r\n"
    assert await asyncio.wait_for(shutdown([listener], grace=0.2), WAIT) == 1
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert not listener.sessions
    writer.close()


async def test_handler_exception_is_logged_and_connection_closed(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(tmp_path)
    listener = await started(app, "pop3", explodes)
    with caplog.at_level(logging.ERROR, logger="postroom.net.server"):
        reader, writer = await connect(listener.port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        await until(lambda: not listener.sessions)
    assert "handler bug" in caplog.text
    writer.close()


async def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listener = Listener(ListenerSpec("smtp", "127.0.0.1", port, "starttls"), app, greet_then_wait)
        with pytest.raises(ListenError) as err:
            await listener.start()
    message = str(err.value)
    assert message == f"cannot listen on 127.0.0.1:{port} for smtp: address already in use (is another server running?)"


async def test_sessions_see_connection_ids(tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]) -> None:
    seen: list[str] = []

    async def record(conn: Connection, app: App, spec: ListenerSpec) -> None:
        from postroom.log import connection_logger

        adapter = connection_logger(logging.getLogger("test"), conn)
        seen.append(str(adapter.extra["conn_id"]) if adapter.extra else "")
        conn.write(b"hello\r\n")

    app = make_app(tmp_path)
    listener = await started(app, "smtp", record)
    for _ in range(2):
        reader, writer = await connect(listener.port)
        assert await first_line(reader) == b"hello\r\n"
        writer.close()
    assert len(seen) == 2 and seen[0] != seen[1] and all(seen)


def test_config_limits_are_named() -> None:
    net = NetConfig()
    assert dataclasses.asdict(net).keys() >= {"max_connections", "max_connections_per_ip", "shutdown_grace"}


async def test_closing_one_listener_leaves_the_others(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]
) -> None:
    app = make_app(tmp_path)
    first = await started(app, "smtp", greet_then_wait)
    second = await started(app, "pop3", greet_then_wait)
    await first.close()
    assert not shutdown_event(app).is_set()
    with pytest.raises(OSError):
        await connect(first.port)
    reader, writer = await connect(second.port)
    assert await first_line(reader) == b"hello\r\n"
    writer.close()
    # A new listener on the same App (a restarted service) serves as well.
    again = await started(app, "smtp", greet_then_wait)
    reader, writer = await connect(again.port)
    assert await first_line(reader) == b"hello\r\n"
    writer.close()


class Served(ServedProtocol):
    """A callback-driven session: hello, then "ok <line>" per line; counts what the listener let through."""

    started_ids: list[str] = []
    cancelled = 0

    def session_started(self) -> None:
        Served.started_ids.append(self.conn_id)
        self.write(b"hello\r\n")

    def data_received(self, data: bytes) -> None:
        self.write(b"ok " + data)

    def session_cancelled(self) -> None:
        Served.cancelled += 1
        super().session_cancelled()


async def test_served_sessions_obey_the_limits_and_the_shutdown(
    tmp_path: Path, started: Callable[..., asyncio.Future[Listener]]
) -> None:
    """A ServedProtocol class as the handler: admitted by the same limits (a refused connection never reaches
    ``session_started``), tracked by its ``done`` future, and aborted when shutdown gives up on it."""
    Served.started_ids, Served.cancelled = [], 0
    app = make_app(tmp_path, max_connections_per_ip=2)
    listener = await started(app, "smtp", Served)
    held = [await connect(listener.port) for _ in range(2)]
    for reader, _ in held:
        assert await first_line(reader) == b"hello\r\n"
    reader, writer = await connect(listener.port)
    assert (await first_line(reader)).startswith(b"421 4.7.0 mx.example.test Too many connections")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    assert listener.refused == 1 and len(Served.started_ids) == 2 and len(set(Served.started_ids)) == 2
    held[0][1].close()  # one leaves: its slot is free again
    await until(lambda: len(listener.sessions) == 1)
    reader, writer = await connect(listener.port)
    assert await first_line(reader) == b"hello\r\n"
    writer.write(b"ping\r\n")
    assert await first_line(reader) == b"ok ping\r\n"
    # These sessions never end by themselves: shutdown cancels them after the grace period, which aborts.
    assert await asyncio.wait_for(shutdown([listener], grace=0.2), WAIT) == 2
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert Served.cancelled == 2 and not listener.sessions
    writer.close()
    held[1][1].close()
