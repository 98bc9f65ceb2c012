"""GroupCommitWriter: one transaction per batch; a job that raises fails alone, the others commit once."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from postroom.errors import StoreError, StoreFullError
from postroom.store.sqlite_db import GroupCommitWriter, Touched, connect


def _table(path: Path) -> None:
    conn = connect(path)
    conn.execute("CREATE TABLE t(k TEXT PRIMARY KEY, v INTEGER)")
    conn.close()


def _writer(path: Path) -> GroupCommitWriter:
    _table(path)
    return GroupCommitWriter(path, cleanup=lambda t: None, announce=lambda t: None)


async def _batch(writer: GroupCommitWriter, jobs: list[Any]) -> list[Any]:
    """Submit ``jobs`` while the writer is held, so they form one batch. A job is a ``WriteFn`` or a
    ``(fn, many, arg)`` bulk job."""
    gate = threading.Event()
    held = asyncio.ensure_future(writer.submit(lambda c, t: gate.wait(5)))
    await asyncio.sleep(0.05)  # the writer thread is now inside the holding job
    futures = [
        asyncio.ensure_future(
            writer.submit(job[0], None, job[1], job[2]) if isinstance(job, tuple) else writer.submit(job)
        )
        for job in jobs
    ]
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


class _Bulk:
    """A bulk insert into ``t`` that counts its calls; ``one(key, value)`` is the job for one row."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def many(self, c: sqlite3.Connection, args: list[tuple[str, int]], t: Touched) -> list[int]:
        self.calls.append([k for k, _ in args])
        c.executemany("INSERT INTO t VALUES(?, ?)", args)
        t.mailboxes.update(v for _, v in args)
        return [v for _, v in args]

    def one(self, key: str, value: int) -> tuple[Any, Any, Any]:
        def fn(c: sqlite3.Connection, t: Touched) -> int:
            result: int = self.many(c, [(key, value)], t)[0]
            return result

        return (fn, self.many, (key, value))


def test_neighbouring_bulk_jobs_run_as_one_call_in_order(tmp_path: Path) -> None:
    path = tmp_path / "db"
    writer = _writer(path)
    bulk = _Bulk()
    jobs = [bulk.one("a", 1), bulk.one("b", 2), insert("c", 3), bulk.one("d", 4), bulk.one("e", 5), bulk.one("f", 6)]

    async def main() -> list[Any]:
        writer.start()
        try:
            return await _batch(writer, jobs)
        finally:
            writer.stop()

    assert asyncio.run(main()) == [1, 2, 3, 4, 5, 6]
    assert bulk.calls == [["a", "b"], ["d", "e", "f"]]  # the plain job in between splits the run
    rows = sorted(connect(path).execute("SELECT k, v FROM t").fetchall())
    assert rows == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("f", 6)]


def test_a_failing_bulk_member_fails_alone(tmp_path: Path) -> None:
    """A duplicate key fails the bulk call; the batch runs again job by job and only that job fails."""
    path = tmp_path / "db"
    writer = _writer(path)
    bulk = _Bulk()

    async def main() -> list[Any]:
        writer.start()
        try:
            return await _batch(writer, [bulk.one("a", 1), bulk.one("a", 2), bulk.one("b", 3)])
        finally:
            writer.stop()

    results = asyncio.run(main())
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert bulk.calls[0] == ["a", "a", "b"]  # the bulk try, rolled back
    assert bulk.calls[1:] == [["a"], ["a"], ["b"]]  # then each job alone, in its savepoint
    rows = sorted(connect(path).execute("SELECT k, v FROM t").fetchall())
    assert rows == [("a", 1), ("b", 3)]


class _Fast:
    """A fast version of ``_Bulk.many`` (what ``sqlite_native`` is to appends): commits with a connection
    of its own under the write lock, or declines the batches whose first key is ``decline``; with
    ``sync_errno`` set it reports that the WAL's fdatasync failed."""

    def __init__(self, path: Path, decline: str = "", sync_errno: int = 0) -> None:
        self.conn = connect(path)
        self.decline, self.sync_errno = decline, sync_errno
        self.calls: list[list[str]] = []

    def fast(self, args: list[tuple[str, int]], lock_fd: int, wal_fd: int) -> tuple[list[Any], Touched, int] | None:
        assert wal_fd >= 0
        self.calls.append([k for k, _ in args])
        if args[0][0] == self.decline:
            return None
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany("INSERT INTO t VALUES(?, ?)", args)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        return [v * 10 for _, v in args], Touched(mailboxes={v for _, v in args}), self.sync_errno


def _prepared(job: tuple[Any, Any, Any]) -> tuple[Any, None, Any, Any]:
    """``submit``'s arguments for a ``_Bulk.one`` job."""
    return (job[0], None, job[1], job[2])


def _fast_writer(path: Path, bulk: _Bulk, fast: _Fast) -> GroupCommitWriter:
    return GroupCommitWriter(path, cleanup=lambda t: None, announce=lambda t: None, fast=(bulk.many, fast.fast))


def test_a_batch_of_one_bulk_function_goes_to_its_fast_version(tmp_path: Path) -> None:
    """Offered only batches whose every job names the bulk function, and only once the WAL's descriptor
    is open (the first commit opens it); a declined batch runs on the Python path."""
    path = tmp_path / "db"
    _table(path)
    bulk, fast = _Bulk(), _Fast(path, decline="x")
    writer = _fast_writer(path, bulk, fast)

    async def main() -> list[Any]:
        writer.start()
        try:
            first = await writer.submit(*_prepared(bulk.one("first", 0)))
            pure = await _batch(writer, [bulk.one("a", 1), bulk.one("b", 2)])
            mixed = await _batch(writer, [bulk.one("c", 3), insert("d", 4)])
            declined = await _batch(writer, [bulk.one("x", 5), bulk.one("y", 6)])
            return [first, pure, mixed, declined]
        finally:
            writer.stop()

    assert asyncio.run(main()) == [0, [10, 20], [3, 4], [5, 6]]
    assert fast.calls == [["a", "b"], ["x", "y"]]
    assert bulk.calls == [["first"], ["c"], ["x", "y"]]
    rows = sorted(connect(path).execute("SELECT k FROM t").fetchall())
    assert rows == [(k,) for k in ("a", "b", "c", "d", "first", "x", "y")]


def test_a_fast_version_that_raises_fails_its_batch_and_the_writer_carries_on(tmp_path: Path) -> None:
    """An exception (a bug: declining is returning None) leaves it unknown whether the batch committed:
    it is not run again, every caller hears StoreError, and the next batch is served."""
    path = tmp_path / "db"
    _table(path)
    bulk, fast = _Bulk(), _Fast(path)
    real = fast.fast

    def broken(args: list[tuple[str, int]], lock_fd: int, wal_fd: int) -> Any:
        if args[0][0] == "a":
            raise TypeError("a bug")
        return real(args, lock_fd, wal_fd)

    writer = GroupCommitWriter(path, cleanup=lambda t: None, announce=lambda t: None, fast=(bulk.many, broken))

    async def main() -> list[Any]:
        writer.start()
        try:
            await writer.submit(*_prepared(bulk.one("first", 0)))
            # Bounded: before, the exception ended the writer thread and nobody was ever answered.
            failed = await asyncio.wait_for(_batch(writer, [bulk.one("a", 1), bulk.one("b", 2)]), 10)
            return [*failed, await asyncio.wait_for(writer.submit(*_prepared(bulk.one("c", 3))), 10)]
        finally:
            writer.stop()

    first, second, third = asyncio.run(main())
    assert isinstance(first, StoreError) and isinstance(second, StoreError)
    assert third == 30
    assert bulk.calls == [["first"]]  # the failed batch was not run again on the Python path


def test_a_failed_wal_sync_of_the_fast_version_fails_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _table(path)
    bulk, fast = _Bulk(), _Fast(path, sync_errno=28)
    writer = _fast_writer(path, bulk, fast)

    async def main() -> list[Any]:
        writer.start()
        try:
            await writer.submit(*_prepared(bulk.one("first", 0)))
            return await _batch(writer, [bulk.one("a", 1), bulk.one("b", 2)])
        finally:
            writer.stop()

    results = asyncio.run(main())
    assert all(isinstance(r, StoreFullError) for r in results), results


def test_callers_are_answered_after_the_wal_fsync_which_runs_outside_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    writer = _writer(path)
    syncing, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        syncing.set()
        release.wait(5)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)

    async def main() -> None:
        writer.start()
        try:
            answer = asyncio.ensure_future(writer.submit(insert("a", 1)))
            assert await asyncio.to_thread(syncing.wait, 5)
            await asyncio.sleep(0.05)
            assert not answer.done()  # committed, not yet durable: nobody is told
            lock_fd = os.open(str(path) + ".writer-lock", os.O_RDWR)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the next writer need not wait
            finally:
                os.close(lock_fd)
            release.set()
            assert await answer == 1
        finally:
            release.set()
            writer.stop()

    asyncio.run(main())
    assert connect(path).execute("SELECT k, v FROM t").fetchall() == [("a", 1)]


@pytest.mark.parametrize(("errno", "expected"), [(5, StoreError), (28, StoreFullError)])
def test_a_failed_wal_fsync_fails_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno: int, expected: type[Exception]
) -> None:
    """Committed but perhaps not on disk: nobody is told it worked (EIO: 451; ENOSPC: 452)."""
    path = tmp_path / "db"
    writer = _writer(path)

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno, os.strerror(errno))

    async def main() -> list[Any]:
        writer.start()
        try:
            monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
            results: list[Any] = list(
                await asyncio.gather(
                    writer.submit(insert("a", 1)), writer.submit(insert("b", 2)), return_exceptions=True
                )
            )
            monkeypatch.undo()
            results.append(await writer.submit(insert("c", 3)))  # the writer carries on
            return results
        finally:
            writer.stop()

    first, second, third = asyncio.run(main())
    assert isinstance(first, expected) and isinstance(second, expected)
    assert third == 3


def test_without_wal_commits_stay_synchronous_full(tmp_path: Path) -> None:
    """Where WAL cannot be used, SQLite keeps a rollback journal: then COMMIT itself must sync (FULL), and
    there is no WAL file for the writer to sync."""

    def rollback_journal(path: Path) -> sqlite3.Connection:
        conn = connect(path)
        conn.execute("PRAGMA journal_mode=DELETE")
        return conn

    path = tmp_path / "db"
    _table(path)
    writer = GroupCommitWriter(path, cleanup=lambda t: None, announce=lambda t: None, opener=rollback_journal)

    async def main() -> tuple[int, int]:
        writer.start()
        try:
            value = await writer.submit(insert("a", 1))
            assert writer._conn is not None
            return value, writer._conn.execute("PRAGMA synchronous").fetchone()[0]
        finally:
            writer.stop()

    assert asyncio.run(main()) == (1, 2)  # 2: FULL
    assert not (tmp_path / "db-wal").exists()


def _policy_of(thread: threading.Thread) -> int:
    assert thread.native_id is not None
    return os.sched_getscheduler(thread.native_id)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a scheduling policy per thread is Linux's")
@pytest.mark.parametrize("batch", [False, True])
def test_the_writer_waits_and_commits_fast_under_sched_batch_and_runs_python_transactions_normally(
    tmp_path: Path, batch: bool
) -> None:
    path = tmp_path / "db"
    _table(path)
    caller = os.sched_getscheduler(0)
    seen: dict[str, int] = {}

    def many(c: sqlite3.Connection, args: list[Any], t: Touched) -> list[Any]:
        seen["declined"] = os.sched_getscheduler(0)  # the Python path of the batch the fast version declined
        return [insert(key, value)(c, t) for key, value in args]

    def fast(args: list[Any], lock_fd: int, wal_fd: int) -> tuple[list[Any], Touched, int] | None:
        seen["fast"] = os.sched_getscheduler(0)  # 0: the calling thread, the writer
        return None  # declined: the same batch then runs on the Python path

    def python_job(c: sqlite3.Connection, t: Touched) -> int:
        seen["python"] = os.sched_getscheduler(0)
        return int(insert("p", 1)(c, t))

    writer = GroupCommitWriter(
        path, cleanup=lambda t: None, announce=lambda t: None, fast=(many, fast), batch_scheduling=batch
    )

    async def main() -> None:
        writer.start()
        try:
            await writer.submit(python_job)  # the first commit opens the WAL descriptor the fast path needs
            await writer.submit(insert("f", 0), None, many, ("f", 2))
            seen["waiting"] = _policy_of(writer._worker)
        finally:
            writer.stop()

    asyncio.run(main())
    waiting = os.SCHED_BATCH if batch else caller
    assert seen == {"python": caller, "fast": waiting, "declined": caller, "waiting": waiting}
    assert os.sched_getscheduler(0) == caller  # the caller's own policy is untouched
    assert sorted(connect(path).execute("SELECT k, v FROM t").fetchall()) == [("f", 2), ("p", 1)]


def test_the_served_store_gets_the_configured_writer_scheduling(tmp_path: Path) -> None:
    from postroom.config import Config, StoreConfig
    from postroom.serve import open_configured_store

    cfg = Config(data_dir=str(tmp_path), store=StoreConfig(writer_scheduling="normal"))

    async def main() -> str:
        store = await open_configured_store(cfg)
        try:
            return str(getattr(store, "writer_scheduling"))  # noqa: B009 - SqliteStore's, not the Store API's
        finally:
            await store.close()

    assert asyncio.run(main()) == "normal"
