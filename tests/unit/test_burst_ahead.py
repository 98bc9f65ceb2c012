"""The sender's lookahead buffer (``burst.job._Ahead``): bounded, refilled in bulk, ends for every taker."""

from __future__ import annotations

import asyncio

from postroom.burst.job import _Ahead
from postroom.burst.produce import Built


def built(n: int) -> Built:
    return Built(f"k{n}", b"m", "", "f.pdf", f"<{n}@x>")


async def test_refilled_in_quarters_and_never_over_its_size() -> None:
    ahead = _Ahead(8)
    loop = asyncio.get_running_loop()
    refills = 0
    fed = 0

    async def feeder() -> None:
        nonlocal refills, fed
        while fed < 40:
            refills += 1
            while ahead.wants_more() and fed < 40:
                ahead.put(built(fed), loop.create_future())
                fed += 1
                assert len(ahead.items) <= 8
            await ahead.room()
        ahead.end()

    task = asyncio.create_task(feeder())
    got = []
    while (item := await ahead.take()) is not None:
        got.append(item[0].key)
        await asyncio.sleep(0)
    await task
    assert got == [f"k{n}" for n in range(40)]
    assert refills <= 40 // 2 + 1  # topped up once per quarter of the buffer, not once per message


async def test_end_releases_every_waiting_taker_and_pop_never_waits() -> None:
    ahead = _Ahead(4)
    assert ahead.pop() is None
    takers = [asyncio.create_task(ahead.take()) for _ in range(3)]
    await asyncio.sleep(0)
    ahead.put(built(1), asyncio.get_running_loop().create_future())
    ahead.end()
    results = await asyncio.gather(*takers)
    assert sorted(r is None for r in results) == [False, True, True]
