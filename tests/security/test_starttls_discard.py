"""STARTTLS must not carry plaintext across the upgrade (CVE-2011-0411 class, aiosmtpd's and Postfix's bug).

A client (or a man in the middle) pipelines a command after ``STARTTLS`` in the same plaintext packet. If the
server kept those bytes, it would run the injected command inside the TLS session as if the client had sent
it encrypted. ``Connection.start_tls`` must discard them. The handler here is a tiny protocol written for the
test that reads one byte at a time, so the injected bytes stay in the Connection's buffer (not the
handler's) and the test checks exactly the Connection's guarantee. A deliberately leaky Connection shows the
test catches the bug.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from postroom.app import App, ListenerSpec
from postroom.auth.service import Authenticator
from postroom.config import Config
from postroom.net import tls
from postroom.net.connection import Connection
from postroom.net.server import Listener
from postroom.store.api import Store


async def read_line_bytewise(conn: Connection) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        data = await conn.read(1, timeout=10)
        if not data:
            return line
        line += data
    return line


async def echo_handler(conn: Connection, app: App, spec: ListenerSpec) -> None:
    conn.write(b"220 ready\r\n")
    while True:
        line = await read_line_bytewise(conn)
        if not line:
            return
        if line == b"STARTTLS\r\n":
            conn.write(b"220 go ahead\r\n")
            await conn.start_tls(app.tls)
            continue
        conn.write(b"250 got " + line)


class LeakyConnection(Connection):
    """The bug: plaintext buffered before the upgrade survives it."""

    async def start_tls(self, context: ssl.SSLContext, timeout: float = 30.0) -> None:
        saved = list(self._chunks)
        await super().start_tls(context, timeout)
        self._chunks.extend(saved)
        self._buffered += sum(map(len, saved))


@pytest.fixture
def app(tmp_path: Path) -> App:
    cfg = Config(hostname="mx.example.test", data_dir=str(tmp_path))
    ctx, _ = tls.load(cfg)
    store = cast(Store, None)  # the protocol under test never touches the store
    return App(cfg, store, Authenticator(store, cfg.auth), ctx)


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def run_client(port: int) -> list[bytes]:
    """Send STARTTLS with an injected command in the same packet; return the replies seen after TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline() == b"220 ready\r\n"
        raw.sendall(b"STARTTLS\r\nINJECTED\r\n")
        assert f.readline() == b"220 go ahead\r\n"
        f.close()
        with client_ctx().wrap_socket(raw) as tls_sock:
            tf = tls_sock.makefile("rb")
            tls_sock.sendall(b"REAL\r\n")
            first = tf.readline()
            tls_sock.sendall(b"AGAIN\r\n")
            second = tf.readline()
            tf.close()
            return [first, second]


@pytest.fixture
def serve_in_thread() -> Iterator[Callable[..., int]]:
    """Start a server on a fresh loop in a thread (the client above is blocking)."""
    import threading

    loops: list[tuple[asyncio.AbstractEventLoop, Callable[[], Coroutine[Any, Any, None]]]] = []

    def start(app: App, leaky: bool) -> int:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def up() -> tuple[int, Callable[[], Coroutine[Any, Any, None]]]:
            if not leaky:
                listener = Listener(ListenerSpec("smtp", "127.0.0.1", 0, "starttls"), app, echo_handler)
                await listener.start()
                return listener.port, listener.close
            tasks: set[asyncio.Task[None]] = set()

            class Served(LeakyConnection):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    super().connection_made(transport)
                    spec = ListenerSpec("smtp", "127.0.0.1", 0, "starttls")
                    task = asyncio.get_running_loop().create_task(echo_handler(self, app, spec))
                    tasks.add(task)

            server = await asyncio.get_running_loop().create_server(Served, "127.0.0.1", 0)

            async def close() -> None:
                server.close()
                for t in tasks:
                    t.cancel()

            return int(server.sockets[0].getsockname()[1]), close

        port, close = asyncio.run_coroutine_threadsafe(up(), loop).result(10)
        loops.append((loop, close))
        return port

    yield start
    for loop, close in loops:
        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def test_plaintext_pipelined_after_starttls_is_discarded(app: App, serve_in_thread: Callable[..., int]) -> None:
    port = serve_in_thread(app, leaky=False)
    assert run_client(port) == [b"250 got REAL\r\n", b"250 got AGAIN\r\n"]


def test_the_check_catches_a_leaky_connection(app: App, serve_in_thread: Callable[..., int]) -> None:
    port = serve_in_thread(app, leaky=True)
    assert run_client(port)[0] == b"250 got INJECTED\r\n"
