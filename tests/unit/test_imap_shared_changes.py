"""The adapter's per-process ``changes_since`` sharing: one query per commit for all woken sessions, never a
result older than an announcement the caller could have seen, NOOP always asks."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from postroom.imap.adapter import _SharedChanges
from postroom.store.api import Changes, Store


class _Watch:
    def __init__(self) -> None:
        self.pending = False

    def clear(self) -> None:
        self.pending = False

    def close(self) -> None:
        pass


class _Store:
    """Just ``watch`` and ``changes_since``; ``gate`` (when set) holds every query until it is opened."""

    def __init__(self) -> None:
        self.watches: list[_Watch] = []
        self.queries = 0
        self.modseq = 5
        self.gate: asyncio.Event | None = None

    def watch(self, mailbox_id: int) -> _Watch:
        w = _Watch()
        self.watches.append(w)
        return w

    def commit(self) -> None:
        self.modseq += 1
        for w in self.watches:
            w.pending = True

    async def changes_since(self, mailbox_id: int, modseq: int) -> Changes:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        return Changes([], [], self.modseq, 10)


async def test_one_query_per_generation_and_fresh_always_asks() -> None:
    store = _Store()
    shared = _SharedChanges(cast(Store, store))
    first = await shared.get(1, 5)
    assert await shared.get(1, 5) is first and store.queries == 1
    assert (await shared.get(1, 4)).highestmodseq == 5 and store.queries == 2  # another MODSEQ: its own query
    store.commit()
    after = await shared.get(1, 5)
    assert after.highestmodseq == 6 and store.queries == 3  # the announcement started a new generation
    assert await shared.get(1, 5) is after and store.queries == 3
    store.modseq = 7  # committed, not announced yet (a datagram still on its way, or lost)
    assert (await shared.get(1, 5)).highestmodseq == 6
    assert (await shared.get(1, 5, fresh=True)).highestmodseq == 7 and store.queries == 4


async def test_sessions_share_a_query_in_flight_and_survive_its_owner_being_cancelled() -> None:
    store = _Store()
    shared = _SharedChanges(cast(Store, store))
    store.gate = asyncio.Event()
    owner = asyncio.ensure_future(shared.get(1, 5))
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(shared.get(1, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    assert store.queries == 1
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*others)
    assert all(r.highestmodseq == 5 for r in results)
    assert store.queries == 2  # one of the waiters asked again, the others shared its query
