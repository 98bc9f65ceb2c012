"""ChangeHub's cross-process channel: peers learned from HELLO, dead peers dropped, no listing per commit."""

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
        a = ChangeHub(tmp_path)
        a.start(loop)
        a.notify([1])  # A lists run/ once now (nobody else there) ...
        monkeypatch.setattr(changes, "PEER_RESCAN", 3600.0)  # ... and never again in this test
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
