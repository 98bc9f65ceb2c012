"""The supervisor's stop: a grace period, then SIGKILL once a second until the workers are reaped.

No process is forked or signalled here: the workers are made-up pids, the signals the supervisor sends are
recorded instead of sent, and ``sigtimedwait`` and the clock are simulated.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import types
from typing import Any

import pytest

from postroom import serve
from postroom.config import Config
from postroom.net.limits import NetConfig

GRACE = 2.0


class _Sim:
    """A simulated clock and signal queue for one supervisor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sup: serve._Supervisor) -> None:
        self.now = 1000.0
        self.waits = 0
        self.pending: list[int] = []  # signals to deliver, in order
        self.sent: list[tuple[float, int]] = []  # (time, signal) the supervisor sent its workers
        self.reap_at = float("inf")  # when the kernel has finished the workers
        self.sup = sup
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(signal, "sigtimedwait", self.sigtimedwait)
        monkeypatch.setattr(sup, "_signal_all", lambda sig: self.sent.append((self.now, int(sig))))
        monkeypatch.setattr(sup, "_reap", self.reap)

    def sigtimedwait(self, sigs: Any, timeout: float) -> Any:
        self.waits += 1
        assert self.waits < 1000, "the supervisor is spinning"
        if self.pending:
            return types.SimpleNamespace(si_signo=self.pending.pop(0))
        if self.now + timeout >= self.reap_at:
            self.now = self.reap_at
            return types.SimpleNamespace(si_signo=signal.SIGCHLD)
        self.now += timeout
        return None

    def reap(self) -> None:
        if self.now >= self.reap_at:
            self.sup.children.clear()


def _supervisor() -> serve._Supervisor:
    plan = types.SimpleNamespace(workers=0, cfg=Config(net=NetConfig(shutdown_grace=GRACE)))
    sup = serve._Supervisor(plan, [])  # type: ignore[arg-type]
    sup.children = {999_991: (0, 0.0), 999_992: (1, 0.0)}  # made up: nothing is sent to them
    return sup


def test_workers_that_outlive_the_grace_get_sigkill_once_a_second_not_in_a_busy_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sup = _supervisor()
    sim = _Sim(monkeypatch, sup)
    sim.pending = [signal.SIGTERM]
    start = sim.now
    sim.reap_at = start + GRACE + serve.KILL_MARGIN + 4.5  # e.g. stuck in uninterruptible sleep a while

    assert sup.run() == 0

    terms = [t for t, sig in sim.sent if sig == signal.SIGTERM]
    kills = [t for t, sig in sim.sent if sig == signal.SIGKILL]
    assert terms == [start]
    assert kills[0] == pytest.approx(start + GRACE + serve.KILL_MARGIN)
    assert len(kills) == 5  # at the deadline, then every KILL_REPEAT seconds until reaped
    assert all(b - a == pytest.approx(serve.KILL_REPEAT) for a, b in itertools.pairwise(kills))
    assert sim.waits < 20


def test_a_crash_loop_stops_the_other_workers_with_the_same_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    sup = _supervisor()
    sim = _Sim(monkeypatch, sup)
    sup.quick_crashes = {0: serve.MAX_QUICK_CRASHES - 1}
    waited = iter([(999_991, 1 << 8), (0, 0)])  # worker 1 exits with status 1, again within MIN_UPTIME
    monkeypatch.setattr(os, "waitpid", lambda pid, flags: next(waited))
    sup.children[999_991] = (0, sim.now)

    serve._Supervisor._reap(sup)  # the real one, not the simulation's

    assert sup.failed and sup.stopping
    assert sim.sent == [(sim.now, int(signal.SIGTERM))]
    assert sup.kill_at == pytest.approx(sim.now + GRACE + serve.KILL_MARGIN)  # not "now": no SIGKILL yet
    sim.reap_at = sim.now + 1.0  # the last worker exits one second into its grace
    assert sup.run() == 1
    assert [sig for _, sig in sim.sent] == [signal.SIGTERM]
