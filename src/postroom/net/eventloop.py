"""The event loop every server process runs on: uvloop (libuv) by default, or the standard library's.

``[net] event_loop = "uvloop" | "asyncio"``. uvloop runs the same asyncio code (protocols, transports,
``start_tls``, ``call_soon_threadsafe``, signal handlers) with its I/O machinery in C: measured on the SMTP
load of ``bench/smtp_throughput.py`` it cut the server's CPU per message by about a third (see
``docs/benchmarks.md``). ``asyncio`` is there for debugging and for platforms without uvloop.

Invariants:
- Every process that serves connections (``postroom serve``'s workers and the test fixture) gets its loop from
  here, so the tests run on the loop production runs on.
- Nothing else in Postroom may depend on which loop it is: transports are typed as ``asyncio.Transport``
  structurally (uvloop's are not subclasses of it), so code never ``isinstance``-checks them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from postroom.net.limits import EVENT_LOOP

EVENT_LOOPS = ("uvloop", "asyncio")

T = TypeVar("T")


def loop_factory(kind: str = EVENT_LOOP) -> Callable[[], asyncio.AbstractEventLoop]:
    """A callable making a new loop of ``kind`` (one of :data:`EVENT_LOOPS`)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if kind == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {kind!r} (expected one of {', '.join(EVENT_LOOPS)})")


def new_event_loop(kind: str = EVENT_LOOP) -> asyncio.AbstractEventLoop:
    return loop_factory(kind)()


def run(main: Coroutine[Any, Any, T], kind: str = EVENT_LOOP) -> T:
    """``asyncio.run`` on a loop of ``kind``."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
