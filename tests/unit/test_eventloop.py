"""net.eventloop: the configured loop is the one that runs."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from postroom.net import eventloop
from postroom.net.limits import EVENT_LOOP


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_default_is_uvloop() -> None:
    assert EVENT_LOOP == "uvloop"
    assert issubclass(eventloop.run(_loop_type()), uvloop.Loop)


def test_asyncio_is_selectable() -> None:
    kind = eventloop.run(_loop_type(), "asyncio")
    assert not issubclass(kind, uvloop.Loop)
    assert issubclass(kind, asyncio.BaseEventLoop)


def test_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop"):
        eventloop.new_event_loop("twisted")
