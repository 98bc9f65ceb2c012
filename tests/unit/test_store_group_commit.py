"""GroupCommitWriter: one transaction per batch; a job that raises fails alone, the others commit once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from postroom.store.sqlite_db import GroupCommitWriter, Touched, connect


def _writer(path: Path) -> GroupCommitWriter:
    conn = connect(path)
    conn.execute("CREATE TABLE t(k TEXT PRIMARY KEY, v INTEGER)")
    conn.close()
    return GroupCommitWriter(path, cleanup=lambda t: None, announce=lambda t: None)


async def _batch(writer: GroupCommitWriter, jobs: list[Any]) -> list[Any]:
    """Submit ``jobs`` while the writer is held, so they form one batch."""
    gate = threading.Event()
    held = asyncio.ensure_future(writer.submit(lambda c, t: gate.wait(5)))
    await asyncio.sleep(0.05)  # the writer thread is now inside the holding job
    futures = [asyncio.ensure_future(writer.submit(job)) for job in jobs]
    await asyncio.sleep(0)
    gate.set()
    await held
    return await asyncio.gather(*futures, return_exceptions=True)


def insert(key: str, value: int) -> Any:
    def job(c: sqlite3.Connection, t: Touched) -> int:
        c.execute("INSERT INTO t VALUES(?, ?)", (key, value))
        t.mailboxes.add(value)
        return value

    return job


def test_a_failing_job_fails_alone_and_the_batch_commits_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    writer = _writer(path)

    def fails_half_way(c: sqlite3.Connection, t: Touched) -> None:
        c.execute("INSERT INTO t VALUES('half', 0)")  # must be undone
        raise ValueError("no")

    async def main() -> list[Any]:
        writer.start()
        try:
            return await _batch(writer, [insert("a", 1), fails_half_way, insert("b", 2), insert("a", 3)])
        finally:
            writer.stop()

    commits_before = writer.commits
    results = asyncio.run(main())
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], sqlite3.IntegrityError)  # duplicate key: its own failure only
    assert writer.commits - commits_before == 2  # the holding job's batch, then this one
    rows = sorted(connect(path).execute("SELECT k, v FROM t").fetchall())
    assert rows == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("n", [1, 5])
def test_a_clean_batch_runs_each_job_once(tmp_path: Path, n: int) -> None:
    path = tmp_path / "db"
    writer = _writer(path)
    runs: list[int] = []

    def counted(i: int) -> Any:
        def job(c: sqlite3.Connection, t: Touched) -> int:
            runs.append(i)  # only a test may look outside the connection
            c.execute("INSERT INTO t VALUES(?, ?)", (f"k{i}", i))
            return i

        return job

    async def main() -> list[Any]:
        writer.start()
        try:
            return await _batch(writer, [counted(i) for i in range(n)])
        finally:
            writer.stop()

    assert asyncio.run(main()) == list(range(n))
    assert runs == list(range(n))
