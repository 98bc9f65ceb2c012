"""Process accounting the benchmarks share: a server's CPU time read from ``/proc``."""

from __future__ import annotations

import contextlib
import os

_TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> float:
    """Seconds of CPU used by ``pid`` and every process below it, reaped children included (utime,
    stime, cutime, cstime from ``/proc``): the whole server, whatever its process model."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
                stats[int(entry)] = fields
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in stats and p not in tree:
            tree.add(p)
            todo.extend(c for c, parent in parents.items() if parent == p)
    return sum(sum(int(x) for x in stats[p][11:15]) for p in tree) / _TICK
