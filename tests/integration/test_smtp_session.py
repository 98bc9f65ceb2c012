"""The callback-driven SMTP session (``smtp.adapter.SmtpSession``) while a step is running.

The store's ``append`` is held at a gate, so the session is caught in the middle of a delivery: bytes the
client sends meanwhile must be held and answered afterwards in order, a flood of them must pause reading
(and lose nothing), and a graceful shutdown must let the message finish with 250 before saying 421.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningServer
from postroom.net.server import shutdown
from postroom.smtp import adapter
from postroom.wire.replies import Reply

ALICE, ALICE_PW = "alice@example.test", "alice-pass-1"
Factory = Callable[..., RunningServer]
pytestmark = pytest.mark.timeout(60)

TRANSACTION = b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<%s>\r\nDATA\r\nSubject: %s\r\n\r\nbody\r\n.\r\n"


class Gate:
    """Holds every ``store.append`` until :meth:`open`; counts the appends that reached it."""

    def __init__(self, srv: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()
        real = srv.app.store.append

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.reached.set()
            while not self._open.is_set():
                await asyncio.sleep(0.01)
            return await real(*args, **kwargs)

        monkeypatch.setattr(srv.app.store, "append", gated)

    def open(self) -> None:
        self._open.set()


def connect(srv: RunningServer) -> tuple[socket.socket, Any]:
    """A connection past HELO (one reply line, so the file buffers nothing beyond it)."""
    sock = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"HELO c\r\n")
    assert f.readline().startswith(b"250")
    return sock, f


def start_delivery(srv: RunningServer, monkeypatch: pytest.MonkeyPatch) -> tuple[Gate, socket.socket, Any]:
    """A connection whose first message ("one") is held at the store's gate."""
    gate = Gate(srv, monkeypatch)
    sock, f = connect(srv)
    sock.sendall(TRANSACTION % (ALICE.encode(), b"one"))
    assert gate.reached.wait(10)
    return gate, sock, f


def serve_with(srv: RunningServer, monkeypatch: pytest.MonkeyPatch, session: type[adapter.SmtpSession]) -> None:
    """New SMTP connections get ``session`` (a subclass that watches flow control): the compiled session
    class itself cannot be patched."""
    for listener in srv.listeners:
        if listener.spec.service == "smtp":
            monkeypatch.setattr(listener, "handler", session)


def codes(f: Any, n: int) -> list[bytes]:
    return [f.readline()[:3] for _ in range(n)]


@pytest.fixture
def srv(server_factory: Factory) -> RunningServer:
    s = server_factory(services=["smtp"])
    s.add_user(ALICE, ALICE_PW)
    return s


def test_input_during_a_delivery_is_answered_after_it_in_order(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, sock, _f = start_delivery(srv, monkeypatch)
    sock.sendall(TRANSACTION % (ALICE.encode(), b"two") + b"QUIT\r\n")  # arrives while "one" is stored
    received = b""
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        while chunk := sock.recv(4096):
            received += chunk
    assert b"250 2.0.0 OK" not in received  # nothing past the pending message before it is durable
    sock.settimeout(10)
    gate.open()
    while chunk := sock.recv(4096):
        received += chunk
    lines = received.splitlines()
    assert [line[:3] for line in lines] == [b"250", b"250", b"354", b"250"] * 2 + [b"221"]
    assert lines[3].startswith(b"250 2.0.0 OK id=") and lines[7].startswith(b"250 2.0.0 OK id=")
    sock.close()
    subjects = [m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in srv.inbox(ALICE)]
    assert subjects == [b"one", b"two"]


def test_a_flood_during_a_delivery_pauses_reading_and_loses_nothing(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter, "HOLD_LIMIT", 4096)
    paused: list[int] = []

    class Watched(adapter.SmtpSession):
        def pause_reading(self) -> None:
            paused.append(self._held_size)
            super().pause_reading()

    serve_with(srv, monkeypatch, Watched)
    gate, sock, f = start_delivery(srv, monkeypatch)
    noops = 2000
    sock.sendall(b"NOOP\r\n" * noops + b"QUIT\r\n")  # 12 KB, three times the hold limit
    deadline = 100
    while not paused and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert paused and paused[0] > 4096
    gate.open()
    assert codes(f, 3) == [b"250", b"250", b"354"]
    assert f.readline().startswith(b"250 2.0.0 OK id=")
    assert codes(f, noops) == [b"250"] * noops
    assert f.readline().startswith(b"221")
    sock.close()


def test_shutdown_during_a_delivery_finishes_it_then_says_421(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, sock, f = start_delivery(srv, monkeypatch)
    stopped = asyncio.run_coroutine_threadsafe(shutdown(srv.listeners, grace=10.0), srv.loop)
    threading.Event().wait(0.8)  # past one SHUTDOWN_POLL: the busy session must not be interrupted
    gate.open()
    assert codes(f, 3) == [b"250", b"250", b"354"]
    assert f.readline().startswith(b"250 2.0.0 OK id=")
    assert f.readline().startswith(b"421 4.3.2")
    assert f.readline() == b""
    assert stopped.result(10) == 0  # the session left by itself
    sock.close()
    assert len(srv.inbox(ALICE)) == 1


def test_a_client_that_does_not_read_its_replies_stops_being_read(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused: list[bool] = []

    class SmallBuffers(adapter.SmtpSession):
        def session_started(self) -> None:
            assert self.transport is not None
            self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.transport.set_write_buffer_limits(high=8192)  # instead of HIGH_WATER
            super().session_started()

        def pause_writing(self) -> None:
            paused.append(True)
            super().pause_writing()

    serve_with(srv, monkeypatch, SmallBuffers)
    sock, f = connect(srv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    noops = 20_000  # 120 KB of commands, 340 KB of replies, none read until all are sent
    sender = threading.Thread(target=sock.sendall, args=(b"NOOP\r\n" * noops + b"QUIT\r\n",))
    sender.start()
    deadline = 200
    while not paused and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert paused  # the replies backed up: the session stopped reading commands
    assert codes(f, noops) == [b"250"] * noops
    assert f.readline().startswith(b"221")
    sender.join(10)
    sock.close()


def test_a_client_that_half_closes_after_quit_still_gets_every_reply(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, sock, f = start_delivery(srv, monkeypatch)
    sock.sendall(b"NOOP\r\nQUIT\r\n")
    sock.shutdown(socket.SHUT_WR)  # the client is done sending; the delivery of "one" is still pending
    threading.Event().wait(0.2)
    gate.open()
    assert codes(f, 3) == [b"250", b"250", b"354"]
    assert f.readline().startswith(b"250 2.0.0 OK id=")
    assert codes(f, 1) == [b"250"]
    assert f.readline().startswith(b"221")
    assert f.readline() == b""
    sock.close()
    assert len(srv.inbox(ALICE)) == 1


def test_a_client_that_half_closes_mid_session_is_answered_then_closed(srv: RunningServer) -> None:
    sock, f = connect(srv)
    sock.sendall(b"NOOP\r\nNOOP\r\n")
    sock.shutdown(socket.SHUT_WR)  # no QUIT: the server answers what it got, then closes
    assert codes(f, 2) == [b"250", b"250"]
    assert f.readline() == b""
    sock.close()


def test_a_bug_after_a_delivery_aborts_the_connection_and_is_logged(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in the session's own code when a step has ended (here: the core, asked for its next
    event after the message's 250) must not vanish into a failed task and leave the client waiting: it is
    logged with its traceback and the connection is aborted."""
    delivered: list[bool] = []

    class Buggy(adapter.SmtpSession):
        def _answer(self, reply: Reply, token: Any = None) -> None:
            super()._answer(reply, token)
            if reply.code == 250 and reply.enhanced == "2.0.0":  # the answer to the message
                delivered.append(True)

        def _pump(self) -> None:
            if delivered:
                raise RuntimeError("planted bug")
            super()._pump()

    serve_with(srv, monkeypatch, Buggy)
    sock, f = connect(srv)
    with caplog.at_level(logging.ERROR, logger="postroom.smtp.adapter"):
        sock.sendall(TRANSACTION % (ALICE.encode(), b"one"))
        rest = f.read()  # returns at EOF: aborted, not left hanging (the socket timeout is 10 s)
    assert b"250 2.0.0 OK" not in rest
    sock.close()
    assert any(
        r.name == "postroom.smtp.adapter" and "planted bug" in r.getMessage() + str(r.exc_info) for r in caplog.records
    )


async def _only_structure(srv: RunningServer, address: str) -> dict[str, Any]:
    """The stored structure of the one message in ``address``'s INBOX (analysed now if still pending)."""
    acct = await srv.store.get_account(address)
    assert acct is not None
    mb = await srv.store.get_mailbox(acct.id, "INBOX")
    assert mb is not None
    (msg,) = await srv.store.messages(mb.id)
    return (await srv.store.structures([msg.blob_id]))[msg.blob_id]


def test_a_message_the_analyser_fails_on_is_still_delivered(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the parse-once analysis (planted) must not refuse mail: the message gets 250 and is stored
    (SMTP defers the analysis to the first read), and that first read gets the minimal structure, with the
    failure logged (an MX answering 451 would see every retry of the sender fail the same way, and the
    mail would never arrive)."""
    from postroom.store import sqlite_append

    def broken(raw: bytes) -> Any:
        raise ValueError("planted analyser bug")

    monkeypatch.setattr(sqlite_append, "analyze", broken)
    sock, f = connect(srv)
    sock.sendall(TRANSACTION % (ALICE.encode(), b"odd") + b"QUIT\r\n")
    assert codes(f, 5) == [b"250", b"250", b"354", b"250", b"221"]
    sock.close()
    (raw,) = srv.inbox(ALICE)
    assert raw.endswith(b"Subject: odd\r\n\r\nbody\r\n")

    with caplog.at_level(logging.ERROR, logger="postroom.store.sqlite_append"):
        st = srv.call(_only_structure(srv, ALICE))
    assert "planted analyser bug" in caplog.text
    assert st["fields"] == [] and st["env"] == [None] * 10
    assert raw[st["body"]["o"] + st["body"]["h"] :] == b"body\r\n"


def test_delivery_defers_the_analysis_to_the_first_read(srv: RunningServer) -> None:
    """The final dot waits for the disk, not for the MIME analysis: the stored row holds the pending
    structure until the first ``structures`` call, which analyses the message, keeps the result and
    returns what ``analyze`` gives for the stored bytes."""
    import sqlite3

    from postroom.mime import STRUCTURE_VERSION, analyze
    from postroom.store.sqlite import SqliteStore
    from postroom.store.sqlite_append import PENDING_STRUCTURE

    sock, f = connect(srv)
    sock.sendall(TRANSACTION % (ALICE.encode(), b"later") + b"QUIT\r\n")
    assert codes(f, 5) == [b"250", b"250", b"354", b"250", b"221"]
    sock.close()
    (raw,) = srv.inbox(ALICE)
    store = srv.store
    assert isinstance(store, SqliteStore)
    db = store.blob_dir.parent / "meta.db"

    def stored() -> str:
        conn = sqlite3.connect(db)
        try:
            (text,) = conn.execute("SELECT structure FROM blobs ORDER BY id DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return str(text)

    assert stored() == PENDING_STRUCTURE

    st = srv.call(_only_structure(srv, ALICE))
    assert st == analyze(raw) and st["v"] == STRUCTURE_VERSION
    assert "later" in str(st["env"])
    assert stored() != PENDING_STRUCTURE and srv.call(_only_structure(srv, ALICE)) == st
