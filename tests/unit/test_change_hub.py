"""ChangeHub's cross-process channel: peers learned from HELLO, dead peers dropped, no listing per commit; a
process is sent only the changes its sessions watch, and a watch registered before a commit was announced
is never missed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postroom.store import changes
from postroom.store.changes import ChangeHub


async def _woken(hub: ChangeHub, mailbox: int, timeout: float = 2.0) -> bool:
    watch = hub.watch("m", mailbox)
    try:
        async with asyncio.timeout(timeout):
            await watch.wait()
        return True
    except TimeoutError:
        return False
    finally:
        watch.close()


def test_a_new_process_is_found_by_its_hello_not_by_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(changes, "PEER_RESCAN", 3600.0)  # no periodic listing in this test
        a = ChangeHub(tmp_path)
        a.start(loop)  # A lists run/ once now (nobody else there)
        a.notify([1])
        b = ChangeHub(tmp_path)
        b.start(loop)  # B says HELLO to A
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(_woken(b, 7))
        await asyncio.sleep(0)
        a.notify([7])
        assert await waiting, "B did not hear A's change: A never learned of B"
        waiting = asyncio.create_task(_woken(a, 8))
        await asyncio.sleep(0)
        b.notify([8])
        assert await waiting
        a.stop()
        b.stop()

    asyncio.run(main())


def test_a_stopped_process_is_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = ChangeHub(tmp_path), ChangeHub(tmp_path)
        a.start(loop)
        b.start(loop)
        await asyncio.sleep(0.05)
        assert len(a._peers) == 1
        b.stop()
        a.notify([1])
        assert not a._peers
        a.stop()
        assert not list(tmp_path.iterdir())

    asyncio.run(main())


def test_a_dead_process_socket_is_removed(tmp_path: Path) -> None:
    """A socket file whose process died without cleaning up (kill -9) is found by the listing and removed."""
    import socket

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(tmp_path / "notify-1-dead.sock"))
    dead.close()  # the file stays, nobody listens

    async def main() -> None:
        a = ChangeHub(tmp_path)
        a.start(asyncio.get_running_loop())
        a.notify([1])
        assert [p.name for p in tmp_path.iterdir()] == [a._sock_path.name if a._sock_path else ""]
        a.stop()

    asyncio.run(main())


def _pending(hub: ChangeHub) -> list[bytes]:
    """The datagrams waiting in ``hub``'s socket, read without running its event-loop reader."""
    import socket

    assert hub._sock is not None
    out = []
    while True:
        try:
            out.append(hub._sock.recv(changes.MAX_DATAGRAM, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


async def _pair(tmp_path: Path) -> tuple[ChangeHub, ChangeHub]:
    """Two started hubs that know each other's interest sets."""
    loop = asyncio.get_running_loop()
    a, b = ChangeHub(tmp_path), ChangeHub(tmp_path)
    a.start(loop)
    b.start(loop)
    await asyncio.sleep(0.05)
    assert a._peers == {str(b._sock_path): set()} and b._peers == {str(a._sock_path): set()}
    return a, b


def test_a_process_is_sent_only_the_changes_it_watches(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = await _pair(tmp_path)
        a.notify([7], [3])
        assert _pending(b) == [], "B watches nothing, yet A's commit woke it"
        w7 = b.watch("m", 7)
        wa = b.watch("a", 3)
        a.notify([7, 8], [3, 4])  # A has not run its reader since B's watches: it must still see them
        assert _pending(b) == [b"m7;a3"]
        w7.close()
        a.notify([7])
        assert _pending(b) == [], "B stopped watching 7"
        wa.close()
        a.stop()
        b.stop()

    asyncio.run(main())


def test_a_watch_made_just_before_the_announcement_is_woken(tmp_path: Path) -> None:
    """B registers its watch, then A announces a commit at once, before A's event loop has read B's
    datagram: the watch is still woken (A reads its socket before it decides whom to tell)."""

    async def main() -> None:
        a, b = await _pair(tmp_path)
        watch = b.watch("m", 5)
        a.notify([5])
        async with asyncio.timeout(2):
            await watch.wait()
        watch.close()
        a.stop()
        b.stop()

    asyncio.run(main())


def test_a_peer_whose_interest_is_unknown_is_sent_everything(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = await _pair(tmp_path)
        a._peers[str(b._sock_path)] = None  # as for a peer found by listing run/ that has not answered yet
        a.notify([9], [2])
        assert _pending(b) == [b"m9;a2"]
        a.stop()
        b.stop()

    asyncio.run(main())


def test_the_periodic_refresh_repairs_a_lost_interest_datagram(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = await _pair(tmp_path)
        watch = b.watch("m", 7)
        await asyncio.sleep(0.05)
        a._peers[str(b._sock_path)] = set()  # as if B's "+m7" had been dropped
        b._refresh()  # what B does every PEER_RESCAN seconds
        await asyncio.sleep(0.05)
        assert a._peers[str(b._sock_path)] == {"m7"}
        watch.close()
        a.stop()
        b.stop()

    asyncio.run(main())


def test_a_large_interest_set_spans_datagrams(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a = ChangeHub(tmp_path)
        watches = [a.watch("m", i) for i in range(1, 3001)]  # ~17 KB of ids: five datagrams
        a.start(loop)
        b = ChangeHub(tmp_path)
        b.start(loop)
        await asyncio.sleep(0.05)
        assert len(a._interest()) > 1
        assert b._peers[str(a._sock_path)] == {f"m{i}" for i in range(1, 3001)}
        for w in watches:
            w.close()
        a.stop()
        b.stop()

    asyncio.run(main())


def test_a_process_killed_without_bye_is_dropped_at_the_next_refresh(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = await _pair(tmp_path)
        assert b._sock is not None
        b._sock.close()  # kill -9: no BYE, the socket file stays
        b._sock = None
        a._refresh()
        assert a._peers == {}
        assert [p.name for p in tmp_path.iterdir()] == [a._sock_path.name if a._sock_path else ""]
        a.stop()

    asyncio.run(main())
