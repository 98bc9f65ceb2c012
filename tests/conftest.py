"""Shared fixtures: a whole Postroom server on 127.0.0.1:0, run in a background thread.

``server`` (or ``server_factory(**overrides)``) gives a :class:`RunningServer`: a real App (SQLite store in
``tmp_path``, self-signed TLS, Authenticator) with a listener per service of ``serve.HANDLERS``, each on an
ephemeral loopback port. Tests use blocking clients (smtplib, imaplib, poplib, swaks …) directly, and
``server.call(coro)`` to run store operations on the server's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postroom.app import App, ListenerSpec, TlsMode
from postroom.auth.passwords import hash_password
from postroom.auth.service import Authenticator
from postroom.config import Config, ListenersConfig
from postroom.net import eventloop, tls
from postroom.net.server import Listener
from postroom.serve import HANDLERS, IMPLICIT_TLS, load_object
from postroom.store.api import Account, Store
from postroom.store.sqlite import open_store

T = TypeVar("T")

DOMAIN = "example.test"
HOST = "127.0.0.1"


def require_program(name: str) -> str:
    """The path of a Debian program; skip when missing, unless POSTROOM_REQUIRE_INTEROP=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("POSTROOM_REQUIRE_INTEROP") == "1":
            pytest.fail(f"{name} is required (POSTROOM_REQUIRE_INTEROP=1) but not installed")
        pytest.skip(f"{name} not installed")
    return path


def make_test_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``hostname``, 127.0.0.1 and ::1, made the way the server makes its own."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    tls.generate_self_signed(cert_path, key_path, hostname)
    return cert_path, key_path


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server's own TLS policy (``net.tls``) with this certificate, so tests exercise what runs."""
    return tls.server_context(tls.CertFiles(cert, key, self_signed=True))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_test_cert(tmp_path_factory.mktemp("tls"))


@dataclasses.dataclass
class RunningServer:
    app: App
    data_dir: Path
    ports: dict[str, int]
    cafile: Path
    loop: asyncio.AbstractEventLoop
    listeners: list[Listener]
    host: str = HOST
    domain: str = DOMAIN

    @property
    def store(self) -> Store:
        return self.app.store

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_user(self, address: str, password: str) -> Account:
        return self.call(self.app.store.create_account(address, hash_password(password)))

    def client_tls(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (hostname 'localhost')."""
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        ctx.check_hostname = False
        return ctx

    def inbox(self, address: str) -> list[bytes]:
        """Every message in the user's INBOX, oldest first (via the store API)."""

        async def read_all() -> list[bytes]:
            acct = await self.app.store.get_account(address)
            assert acct is not None, address
            mb = await self.app.store.get_mailbox(acct.id, "INBOX")
            assert mb is not None
            return [await self.app.store.read(m.blob_id) for m in await self.app.store.messages(mb.id)]

        return self.call(read_all())


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@pytest.fixture
def server_factory(tmp_path: Path, tls_files: tuple[Path, Path]) -> Iterator[Callable[..., RunningServer]]:
    """``server_factory(services=None, **config_overrides)`` → a started RunningServer."""
    started: list[RunningServer] = []

    def make(services: list[str] | None = None, **overrides: Any) -> RunningServer:
        data_dir = tmp_path / f"srv{len(started)}"
        cert, key = tls_files
        cfg = Config(
            hostname="mx.example.test",
            data_dir=str(data_dir),
            domains=(DOMAIN,),
            listeners=ListenersConfig(),
            source="<test>",
        )
        for section, values in overrides.items():
            if isinstance(values, dict):
                cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
            else:
                cfg = dataclasses.replace(cfg, **{section: values})
        loop = eventloop.new_event_loop(cfg.net.event_loop)
        thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True)
        thread.start()

        async def start() -> tuple[App, list[Listener], dict[str, int]]:
            store = open_store(cfg.store_url)
            await store.open()
            app = App(cfg, store, Authenticator(store, cfg.auth), server_tls_context(cert, key))
            listeners: list[Listener] = []
            ports: dict[str, int] = {}
            for service, ref in HANDLERS.items():  # the same table `postroom serve` uses
                if services is not None and service not in services:
                    continue
                mode: TlsMode = "implicit" if service in IMPLICIT_TLS else "starttls"
                lst = Listener(ListenerSpec(service, HOST, 0, mode), app, load_object(ref))
                await lst.start()
                listeners.append(lst)
                ports[service] = lst.port
            return app, listeners, ports

        app, listeners, ports = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        srv = RunningServer(app, data_dir, ports, cert, loop, listeners)
        started.append(srv)
        return srv

    yield make

    for srv in started:

        async def stop(s: RunningServer = srv) -> None:
            for lst in s.listeners:
                await lst.close()
                for task in list(lst.sessions):
                    task.cancel()
                if lst.sessions:
                    await asyncio.wait(lst.sessions, timeout=5)
            await s.app.store.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), srv.loop).result(30)
        finally:
            srv.loop.call_soon_threadsafe(srv.loop.stop)


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server with every available service, domain ``example.test``, no users yet."""
    return server_factory()
